"""Verification with hand-built logits, stop handling, streaming text, and exact sampling statistics."""

import pytest
import torch

from models.engine.config import SamplingParams
from models.engine.sampling import process_logits, sample_from, verify_greedy, verify_sampling
from models.engine.sequence import Sequence

V = 6


def _logits_favouring(tokens: list[int]) -> torch.Tensor:
    """[len(tokens), V] logits whose argmax at row i is tokens[i] (a gap of 5)."""
    logits = torch.zeros(len(tokens), V)
    logits[torch.arange(len(tokens)), torch.tensor(tokens)] = 5.0
    return logits


def test_greedy_all_accepted_gives_bonus():
    accepted, emitted = verify_greedy(_logits_favouring([3, 1, 4, 2]), torch.tensor([3, 1, 4]))
    assert accepted == 3 and emitted == [3, 1, 4, 2]


def test_greedy_first_rejected_emits_target_token():
    accepted, emitted = verify_greedy(_logits_favouring([3, 1, 4, 2]), torch.tensor([5, 1, 4]))
    assert accepted == 0 and emitted == [3]


def test_greedy_middle_rejection_stops_the_run():
    accepted, emitted = verify_greedy(_logits_favouring([3, 1, 4, 2]), torch.tensor([3, 0, 4]))
    assert accepted == 1 and emitted == [3, 1]


class _CharTokenizer:
    """id i decodes to chr(ord('a') + i); id 0 is EOS."""

    eos_token_id = 0

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(ord("a") + i) for i in ids)


def _seq(params: SamplingParams, prompt=(1, 2), max_context=64) -> Sequence:
    return Sequence("r", list(prompt), params, "sdsat", 4, 0, max_context, _CharTokenizer())


def test_eos_inside_the_accepted_run_finishes_there():
    seq = _seq(SamplingParams(max_new_tokens=10))
    kept = seq.emit([3, 4, 0, 5, 6])
    assert kept == 3 and seq.finished and seq.finish_reason == "stop"
    out = seq.take_output()
    assert out.text == "de" and out.token_ids == [3, 4, 0] and seq.stats.emitted == 3


def test_max_tokens_reached_mid_run():
    seq = _seq(SamplingParams(max_new_tokens=4))
    seq.emit([3])
    assert seq.emit([4, 5, 6, 7, 8]) == 3
    assert seq.finish_reason == "length" and seq.output_ids == [3, 4, 5, 6]


def test_context_limit_finishes_with_length():
    seq = _seq(SamplingParams(max_new_tokens=100), prompt=(1,) * 10, max_context=13)
    seq.emit([3, 4, 5, 6])
    assert seq.finish_reason == "length" and len(seq.output_ids) == 3


def test_stop_string_spanning_two_tokens_and_holdback():
    seq = _seq(SamplingParams(max_new_tokens=20, stop=("fg",)))
    seq.emit([3, 4, 5])  # "def": "f" may start the stop string, so it is held back
    assert seq.take_output().text == "de"
    seq.emit([6, 7, 8])  # "g" completes "fg": text ends right before it; "h" is dropped
    out = seq.take_output()
    assert seq.finished and out.text == "" and seq.text == "de" and seq.stats.emitted == 4


def test_streaming_never_splits_utf8_characters():
    from models.weights.tokenizer import train_code_tokenizer

    text = "def grüße():\n    return 'naïve ☃ 日本語 🐍'\n"
    tok = train_code_tokenizer(["def f(x):\n    return x\n"] * 20, vocab_size=300)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text)  # multi-byte characters span several byte-level tokens
    seq = Sequence("r", [1], SamplingParams(max_new_tokens=500), "ar", 0, None, 4096, tok)
    pieces = []
    for token in ids:
        seq.emit([token])
        out = seq.take_output()
        if out is not None:
            assert "\ufffd" not in out.text
            pieces.append(out.text)
    assert "".join(pieces) == text


class _CountingDecoder:
    """Wraps a tokenizer and counts the ids it is asked to decode."""

    def __init__(self, tokenizer):
        self.tokenizer, self.decoded = tokenizer, 0

    def decode(self, ids, skip_special_tokens=False):
        self.decoded += len(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("with_stop", [False, True], ids=["no-stop", "stop-strings"])
def test_incremental_text_equals_a_full_decode_at_linear_cost(with_stop):
    """Random ids of the served model's tokenizer (multi-byte characters split across tokens, special tokens,
    invalid byte runs), emitted in runs of 1-4 as speculation does: the streamed text is a full decode of
    what was kept (up to the first stop string), each run's stop check ends on the token a full decode
    ends on, and the ids decoded per token stay bounded instead of growing with the output."""
    from models.weights.base_model import base_model_dir, ensure_base_model
    from models.weights.tokenizer import load_tokenizer

    ensure_base_model()
    tok = load_tokenizer(base_model_dir())
    text = "def grüße(x):\n    return 'naïve ☃ 日本語 🐍'\n\n<|im_end|>\nclass A:\n    pass\n" * 3
    ids = tok(text, add_special_tokens=False)["input_ids"]
    gen = torch.Generator().manual_seed(0)
    ids += torch.randint(0, len(tok), (200,), generator=gen).tolist()
    # a stop string that first turns up among the random ids, and one that never does
    stop = (tok.decode(ids[250:252], skip_special_tokens=False), "never in the text") if with_stop else ()
    counting = _CountingDecoder(tok)
    seq = Sequence("r", [1], SamplingParams(max_new_tokens=len(ids), stop=stop, ignore_eos=True), "ar", 0,
                   tok.eos_token_id, 4096, counting)
    pieces, at = [], 0
    while not seq.finished:
        run = ids[at : at + 1 + at % 4]
        at += len(run)
        seq.emit(run)
        if (out := seq.take_output()) is not None:
            pieces.append(out.text)
    full = tok.decode(seq.output_ids, skip_special_tokens=False)
    if stop:  # kept: the shortest prefix of ids whose full decode holds a stop string
        first = next(n for n in range(1, len(ids) + 1)
                     if any(s in tok.decode(ids[:n], skip_special_tokens=False) for s in stop))
        assert seq.stopped_by_string and len(seq.output_ids) == first
        full = full[: min(i for s in stop if (i := full.find(s)) >= 0)]
    else:
        assert seq.output_ids == ids
    assert "".join(pieces) == full == seq.text
    assert len(seq.output_ids) > 200
    assert counting.decoded < 8 * len(seq.output_ids)  # a full decode per run: about 60 per token here


def test_process_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    torch.testing.assert_close(process_logits(logits, 1.0, 1.0, 2), torch.tensor([0.625, 0.375, 0.0, 0.0]))
    torch.testing.assert_close(process_logits(logits, 1.0, 0.8, 0), torch.tensor([0.625, 0.375, 0.0, 0.0]))
    torch.testing.assert_close(process_logits(logits, 1.0, 0.85, 0), torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)
    assert process_logits(logits, 1e-6, 1.0, 0).argmax() == 0


def _tv(counts: torch.Tensor, p: torch.Tensor) -> float:
    return 0.5 * float((counts / counts.sum() - p).abs().sum())


@pytest.mark.parametrize("point_mass", [False, True], ids=["sat-q", "prompt-lookup"])
def test_speculative_sampling_preserves_the_target_distribution(point_mass):
    """Many draws on a 4-token vocabulary: the first emitted token follows p_0 and, after an
    accepted first draft, the second follows p_1 (total variation < 0.02)."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.1, 0.6, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1]])
    first, second = torch.zeros(4), torch.zeros(4)
    draws = 40_000
    for _ in range(draws):
        if point_mass:
            drafts, q_used = torch.tensor([1, 3]), None
        else:
            drafts, q_used = sample_from(q, torch.rand(2, generator=g)), q
        u = torch.rand(3, generator=g)
        _, emitted = verify_sampling(p, q_used, drafts, u[:2], u[2])
        first[emitted[0]] += 1
        if emitted[0] == drafts[0] and len(emitted) > 1:
            second[emitted[1]] += 1
    assert _tv(first, p[0]) < 0.02
    assert _tv(second, p[1]) < 0.02


def test_eos_after_half_a_character_ends_the_text_as_a_full_decode_does():
    from models.weights.base_model import base_model_dir, ensure_base_model
    from models.weights.tokenizer import load_tokenizer

    ensure_base_model()
    tok = load_tokenizer(base_model_dir())
    ids = tok("x = '𝔘𝔘'", add_special_tokens=False)["input_ids"]
    cut = next(n for n in range(1, len(ids)) if tok.decode(ids[:n]).endswith("\ufffd"))  # mid-character
    seq = Sequence("r", [1], SamplingParams(max_new_tokens=50), "ar", 0, tok.eos_token_id, 4096, tok)
    pieces = []
    for token in [*ids[:cut], tok.eos_token_id]:
        seq.emit([token])
        if (out := seq.take_output()) is not None:
            pieces.append(out.text)
    assert seq.finish_reason == "stop" and "".join(pieces) == tok.decode(ids[:cut]) == seq.text
    again = seq.take_output()
    assert again is None or again.text == ""  # the flush is not sent twice
