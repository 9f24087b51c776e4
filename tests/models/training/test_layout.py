"""Training layout invariants I1/I2 (models/training/data/layout.py), SAT vocabulary set-up and the loss."""

import pytest
import torch
from helpers import tiny_llama

from models.errors import SatVocabularyError
from models.training.data.layout import IGNORE, build_sat_batch, sample_anchors, sdsat_loss
from models.weights.sat import SatSpec, add_sat_tokens

VOCAB = 40


def _batch_with_padding():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB - 8, (3, 12), generator=g)
    lengths = torch.tensor([12, 9, 5])
    ids[1, 9:] = 0  # padding
    ids[2, 5:] = 0
    anchors = torch.tensor([[0, 4, 10], [2, 7, -1], [1, 3, -1]])
    return ids, lengths, anchors


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("slot_ids", [[VOCAB - 1] * 4, [VOCAB - 4, VOCAB - 3, VOCAB - 2, VOCAB - 1]],
                         ids=["repeated", "diverse"])
def test_invariants_i1_i2(attn, slot_ids):
    model = tiny_llama(VOCAB, attn=attn)
    ids, lengths, anchors = _batch_with_padding()
    batch = build_sat_batch(ids, lengths, anchors, slot_ids)
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits
        n, k = ids.shape[1], len(slot_ids)
        for b in range(ids.shape[0]):
            length = int(lengths[b])
            plain = model(ids[b : b + 1, :length]).logits[0]
            # I1: real-token logits equal a plain forward on the row (padding excluded).
            torch.testing.assert_close(logits[b, :length], plain, atol=1e-5, rtol=0)
            # I2: slot i of block p equals the last logits of a plain forward on x[:p+1] + [S_1..S_i].
            for a, p in enumerate(anchors[b].tolist()):
                if p < 0:
                    continue
                for i in range(1, k + 1):
                    seq = torch.cat([ids[b, : p + 1], torch.tensor(slot_ids[:i])])[None]
                    expect = model(seq).logits[0, -1]
                    torch.testing.assert_close(logits[b, n + a * k + i - 1], expect, atol=1e-5, rtol=0)
        assert torch.isfinite(logits).all()  # padded rows and empty blocks never give NaN


def test_labels_and_positions():
    ids, lengths, anchors = _batch_with_padding()
    batch = build_sat_batch(ids, lengths, anchors, [VOCAB - 1] * 3)
    n = ids.shape[1]
    # row 0, anchor 4, slot 2: position 6, label x[7]
    col = n + 1 * 3 + 1
    assert batch.position_ids[0, col] == 6 and batch.labels[0, col] == ids[0, 7]
    # anchor 10 in a 12-long row: slot 1 targets x[12], past the end -> ignored
    assert (batch.labels[0, n + 2 * 3 : n + 3 * 3] == IGNORE).all()
    assert batch.labels[0, n + 3] == ids[0, 6]  # anchor 4, slot 1 -> x[6]
    # real labels stop at the row's end; padding has none
    assert batch.labels[1, 7] == ids[1, 8] and (batch.labels[1, 8:n] == IGNORE).all()
    # a missing anchor's block has no labels
    assert (batch.labels[1, n + 2 * 3 :] == IGNORE).all()


def test_std_until_limits_real_labels():
    ids, lengths, anchors = _batch_with_padding()
    batch = build_sat_batch(ids, lengths, anchors, [VOCAB - 1] * 2, std_until=torch.tensor([4, 4, 4]))
    assert (batch.labels[:, 3 : ids.shape[1]] == IGNORE).all()
    assert (batch.labels[0, :3] == ids[0, 1:4]).all()


def test_sample_anchors_range_and_padding():
    g = torch.Generator().manual_seed(0)
    anchors = sample_anchors(torch.tensor([50, 3, 1]), 8, g, start=torch.tensor([10, 0, 0]))
    assert anchors.shape == (3, 8)
    assert ((anchors[0] >= 10) & (anchors[0] <= 48)).all() and len(set(anchors[0].tolist())) == 8
    assert sorted(anchors[1].tolist()) == [-1] * 6 + [0, 1]
    assert (anchors[2] == -1).all()


def test_loss_weights_and_warmup():
    ids, lengths, anchors = _batch_with_padding()
    batch = build_sat_batch(ids, lengths, anchors, [VOCAB - 1] * 3)
    logits = torch.randn(*batch.input_ids.shape, VOCAB)
    full = sdsat_loss(logits, batch, sat_lambda=0.5)
    torch.testing.assert_close(full.total, full.std + 0.5 * full.sat)
    warm = sdsat_loss(logits, batch, std_weight=0.0)
    torch.testing.assert_close(warm.total, warm.sat)
    decayed = sdsat_loss(logits, batch, slot_decay=0.0)  # slot 1 only
    slot1 = (batch.sat_slot == 1) & (batch.labels != IGNORE)
    ce = torch.nn.functional.cross_entropy(logits[slot1], batch.labels[slot1])
    torch.testing.assert_close(decayed.sat, ce)


def test_add_sat_tokens_new_rows_are_mean(count_tokenizer):
    import copy

    tok = copy.deepcopy(count_tokenizer)
    model = tiny_llama(len(tok))
    old = model.get_input_embeddings().weight.detach().clone()
    spec = add_sat_tokens(model, tok, k_train=3, diverse=True)
    assert spec.k_train == 3 and len(spec.ids) == 3 and min(spec.ids) >= old.shape[0]
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    for i in spec.ids:
        torch.testing.assert_close(emb[i], old.mean(0))
    assert head.shape[0] == emb.shape[0] == len(tok)
    assert tok.convert_ids_to_tokens(list(spec.ids)) == ["<|sat_1|>", "<|sat_2|>", "<|sat_3|>"]
    assert spec.slot_ids(5) == [*spec.ids, spec.ids[-1], spec.ids[-1]]  # past k_train: last id


def test_sat_spec_roundtrip_and_reuse(tmp_path, count_tokenizer):
    model = tiny_llama(len(count_tokenizer))
    spec = add_sat_tokens(model, count_tokenizer, k_train=5, reuse_ids=[25])  # <unk>: never emitted for this vocabulary
    assert spec.ids == (25,) and spec.slot_ids(3) == [25] * 3
    spec.save(tmp_path)
    assert SatSpec.load(tmp_path) == spec


def test_sat_vocabulary_errors(count_tokenizer):
    model = tiny_llama(len(count_tokenizer))
    with pytest.raises(SatVocabularyError, match="adding tokens is not allowed"):
        add_sat_tokens(model, count_tokenizer, k_train=4, allow_new_tokens=False)
    with pytest.raises(SatVocabularyError, match="k >= 1"):
        add_sat_tokens(model, count_tokenizer, k_train=0)
    with pytest.raises(SatVocabularyError, match="outside the embedding"):
        add_sat_tokens(model, count_tokenizer, k_train=2, reuse_ids=[10_000])
    with pytest.raises(SatVocabularyError, match="k must be >= 0"):
        SatSpec(ids=(3,), k_train=2).slot_ids(-1)
