"""Training configuration (`TrainConfig`) and named model presets created from a config.

Every default is written here once, with a comment on why; `sdsat train --help` is generated from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from transformers import LlamaConfig

from models.config import field
from models.errors import ConfigError

# Llama-architecture presets for models trained from scratch. "tiny" is for tests (seconds on CPU);
# "code-small" is the embedded default model's shape (see models/checkpoints/).
MODEL_PRESETS: dict[str, dict] = {
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024,
    ),
    "code-small": dict(
        hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=2048,
    ),
}


def preset_config(name: str, tokenizer) -> LlamaConfig:
    """A LlamaConfig for a preset, sized to the tokenizer's vocabulary (ids of special tokens set)."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,  # small models: the embedding matrix is most of the parameters
        rope_theta=10000.0,
        **MODEL_PRESETS[name],
    )


@dataclass(frozen=True)
class TrainConfig:
    # What to train
    model: str = field("tiny", "model directory (Hugging Face format) or preset name: " + ", ".join(MODEL_PRESETS))
    tokenizer: str | None = field(None, "tokenizer directory (default: the model directory; required for presets)")
    corpus: tuple[str, ...] = field((), "training corpus: files, directories (*.py, *.txt, *.md) or .jsonl "
                                        "files with a 'text' field; comma-separated")
    heldout: tuple[str, ...] = field((), "held-out corpus for evaluation (default: split off the corpus by file)")
    heldout_fraction: float = field(0.05, "fraction of corpus documents held out when --heldout is not given")
    output_dir: str = field("runs/train", "where checkpoints and the final model are written; "
                                          "a run resumes from output_dir/checkpoint-last if present")
    # SDSAT
    sat_k: int = field(5, "SAT block size k_train; 0 trains a plain causal LM (no SAT blocks)")
    sat_diverse: bool = field(False, "k distinct SAT ids (slot i takes id i) instead of one repeated id")
    sat_reuse_ids: tuple[int, ...] = field((), "reuse these existing unused vocabulary ids as SATs "
                                                "(1 id, or k ids when diverse) instead of adding tokens")
    allow_new_tokens: bool = field(True, "allow adding SAT special tokens (resizing the embeddings)")
    anchors_per_seq: int = field(16, "SAT blocks per training sequence (anchors sampled at random)")
    sat_lambda: float = field(1.0, "weight of the SAT loss: loss = CE(std) + sat_lambda * CE(SAT)")
    sat_slot_decay: float = field(1.0, "per-slot SAT loss weight decay^(i-1) (e.g. 0.8); 1 = equal weights")
    sat_warmup_steps: int = field(0, "first steps train the SAT loss only (standard loss off)")
    data_source: Literal["corpus", "self-distill"] = field(
        "corpus", "SAT labels from the corpus, or from the model's own greedy continuations of corpus "
                  "contexts (self-distillation; standard loss stays on the real context tokens)")
    distill_sequences: int = field(1024, "self-distill: number of generated sequences")
    distill_context: int = field(128, "self-distill: real corpus tokens before each continuation")
    distill_new_tokens: int = field(128, "self-distill: greedy tokens generated per sequence")
    distill_batch_size: int = field(64, "self-distill: sequences generated per batch")
    distill_mix: float = field(0.0, "self-distill: fraction of each micro-batch taken from corpus windows "
                                    "(real-token loss over the whole window, no SAT blocks) to keep LM quality")
    fim_rate: float = field(0.0, "fraction of documents turned into fill-in-the-middle samples (needs FIM tokens)")
    # Optimisation
    seq_len: int = field(256, "tokens per training sequence")
    batch_size: int = field(8, "sequences per micro-batch")
    grad_accum: int = field(1, "micro-batches per optimizer step")
    max_steps: int = field(1000, "optimizer steps")
    lr: float = field(3e-4, "peak learning rate (AdamW)")
    min_lr_ratio: float = field(0.1, "cosine schedule decays to lr * min_lr_ratio")
    warmup_steps: int = field(50, "linear learning-rate warm-up steps")
    weight_decay: float = field(0.1, "AdamW weight decay on matrices (not on norms)")
    grad_clip: float = field(1.0, "max gradient norm; 0 disables clipping")
    seed: int = field(0, "seed for initialisation, data order and anchors")
    # Runtime
    device: str = field("auto", "cpu, cuda, cuda:N, or auto (cuda when available)")
    dtype: Literal["float32", "bfloat16", "float16"] = field("float32", "training compute dtype (autocast on GPU)")
    attn_implementation: Literal["sdpa", "eager"] = field("sdpa", "transformers attention implementation")
    num_threads: int = field(0, "torch CPU threads; 0 keeps torch's default")
    eval_every: int = field(100, "evaluate held-out L_std and L_sat every N steps (0: only at the end)")
    eval_batches: int = field(4, "held-out micro-batches per evaluation")
    save_every: int = field(100, "write checkpoint-last every N steps")
    log_every: int = field(10, "append a line to output_dir/log.jsonl every N steps")
    save_dtype: Literal["float32", "bfloat16", "float16"] = field("float32", "dtype of the saved weights")

    def __post_init__(self):
        checks = [
            (self.sat_k >= 0, f"sat_k must be >= 1 for SDSAT training (0 = plain), got {self.sat_k}"),
            (self.seq_len >= 2 and self.batch_size >= 1 and self.grad_accum >= 1, "seq_len >= 2, batch sizes >= 1"),
            (self.max_steps >= 1 and self.lr > 0, "max_steps >= 1 and lr > 0"),
            (0.0 <= self.heldout_fraction < 1.0 and 0.0 <= self.fim_rate <= 1.0 and 0.0 <= self.distill_mix < 1.0,
             "fractions must lie in [0, 1)"),
            (self.anchors_per_seq >= 1 or self.plain, "anchors_per_seq must be >= 1 in SDSAT mode"),
            (self.data_source == "corpus" or not self.plain, "self-distill data needs SAT mode (sat_k >= 1)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def plain(self) -> bool:
        return self.sat_k == 0


@dataclass(frozen=True)
class SpeculatorTrainConfig:
    """`sdsat train-speculator`: an MLP speculator for a frozen base model (models/training/train_speculator.py)."""

    # What to train
    model: str = field("", "base model directory (Hugging Face format); it stays frozen")
    corpus: tuple[str, ...] = field((), "training corpus, as for `sdsat train`; comma-separated")
    output_dir: str = field("runs/speculator", "checkpoints, log.jsonl and the data cache")
    save_to: str = field("", "where the final speculator goes; empty = MODEL/speculator, beside the base "
                             "checkpoint, where the engine finds it")
    resume: bool = field(True, "resume from output_dir/checkpoint-last when present (false: start over)")
    n_predict: int = field(3, "heads = the most tokens drafted per iteration (the paper: 3-4, 7 for a code model)")
    inner_dim: int = field(0, "speculator state size; 0 = the base model's hidden size")
    tie_weights: bool = field(False, "one set of weights for every head after the first projection "
                                     "(fewer parameters when there are many heads)")
    base_tied: bool = field(False, "use the base's frozen token embedding and LM head in every head; the "
                                   "speculator learns square maps only (a few MB instead of 2 x V x inner a head)")
    draft_vocab: int = field(0, "base_tied: heads score the N most frequent tokens of the data (0 = all)")
    # Data, option 1: recorded by the served engine (models/training/data/speculator_data.py). Stage 1 = every
    # position (prompts: ordinary text), stage 2 = the answer positions (the base model's own output)
    hidden_data: str = field("", "folder of shards with the served base's hidden states; when set, no base forward "
                                 "runs and the corpus / distill options are unused")
    heldout_data: str = field("", "recorded held-out shards: greedy acceptance by position every eval_every steps")
    labels: Literal["kl", "ce"] = field("kl", "recorded data: kl = the base's distribution over the draft vocabulary "
                                              "(its LM head on the recorded states), ce = the recorded token")
    autocast: bool = field(False, "bf16 autocast for the speculator's matmuls (CPUs with avx512_bf16, GPUs)")
    eval_every: int = field(0, "held-out acceptance every N steps (0 = at the end only)")
    # Data, option 2: stage 1 = teacher forcing on corpus windows, stage 2 = the base model's own continuations
    seq_len: int = field(256, "tokens per training window")
    stage2_fraction: float = field(0.3, "share of the steps (the last ones) trained on the base model's own greedy "
                                        "continuations, which greedy verification accepts, instead of the corpus")
    distill_sequences: int = field(256, "stage 2: generated sequences (once, cached in output_dir/cache)")
    distill_context: int = field(64, "stage 2: corpus tokens before each continuation")
    distill_new_tokens: int = field(192, "stage 2: greedy tokens generated per sequence")
    distill_batch_size: int = field(32, "stage 2: sequences generated per batch")
    # Optimisation: only the speculator learns, so a higher rate than fine-tuning the base model
    batch_size: int = field(8, "sequences per step")
    max_steps: int = field(1000, "optimizer steps, both stages")
    lr: float = field(1e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = field(0.1, "cosine schedule decays to lr * min_lr_ratio")
    warmup_steps: int = field(50, "linear learning-rate warm-up steps")
    weight_decay: float = field(0.1, "AdamW weight decay on matrices (not on norms)")
    grad_clip: float = field(1.0, "max gradient norm; 0 disables clipping")
    seed: int = field(0, "seed for initialisation, data order and the stage-2 contexts")
    # Runtime
    device: str = field("auto", "cpu, cuda, cuda:N, or auto (cuda when available)")
    dtype: Literal["float32", "bfloat16", "float16"] = field("float32", "the base model's compute dtype "
                                                                        "(the speculator trains in fp32)")
    num_threads: int = field(0, "torch CPU threads; 0 keeps torch's default")
    save_every: int = field(100, "write checkpoint-last every N steps")
    log_every: int = field(10, "append a line to output_dir/log.jsonl every N steps")

    def __post_init__(self):
        checks = [
            (bool(self.model), "--model (the base model directory) is required"),
            (self.n_predict >= 1 and self.inner_dim >= 0, "n_predict must be >= 1 and inner_dim >= 0"),
            (self.draft_vocab >= 0 and (self.base_tied or not self.draft_vocab), "draft_vocab needs base_tied"),
            (self.base_tied == bool(self.hidden_data),
             "base_tied speculators train on recorded data (hidden_data), and recorded data trains base_tied ones"),
            (self.seq_len >= self.n_predict + 2, f"seq_len must be >= n_predict + 2, got {self.seq_len}"),
            (self.stage2_fraction == 0 or bool(self.hidden_data) or 0 < self.distill_context <= self.seq_len,
             "distill_context must be in [1, seq_len]"),
            (self.stage2_fraction == 0 or bool(self.hidden_data) or self.distill_new_tokens >= self.n_predict + 1,
             "distill_new_tokens must be >= n_predict + 1"),
            (0.0 <= self.stage2_fraction <= 1.0, "stage2_fraction must lie in [0, 1]"),
            (self.batch_size >= 1 and self.max_steps >= 1 and self.lr > 0, "batch_size, max_steps >= 1, lr > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def stage1_steps(self) -> int:
        return self.max_steps - round(self.max_steps * self.stage2_fraction)


@dataclass(frozen=True)
class AdapterTrainConfig:
    """The frozen-base SAT adapter (models/weights/adapter.py, models/training/train_adapter.py)."""

    model: str = field("", "base model directory (default: the converted SmolLM2-135M-Instruct); stays frozen")
    data: str = field("runs/adapter/data.jsonl",
                      "self-distilled rows from `python -m models.training.data.self_distill`")
    output_dir: str = field("runs/adapter/train", "checkpoint-last.pt, log.jsonl and final/")
    k_train: int = field(5, "SAT slots per block (and distinct SAT embeddings): serving uses k <= k_train")
    rank: int = field(16, "LoRA rank (the probe: rank 16 took the SAT loss from 4.9 to 3.3 where "
                          "embeddings alone stalled)")
    alpha: float = field(32.0, "LoRA scale numerator (scale = alpha / rank)")
    targets: tuple[str, ...] = field(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                                     "projections that get a row-masked LoRA")
    labels: Literal["kl", "ce"] = field("kl", "kl: match the frozen base's full next-token distribution at each "
                                              "target (free from the no-grad pass); ce: its greedy token only")
    anchors_per_seq: int = field(48, "SAT blocks per sequence, at random positions of the generated part "
                                     "(0 = every position)")
    batch_size: int = field(4, "sequences per step (one no-grad standard pass each)")
    max_steps: int = field(600, "optimizer steps")
    lr: float = field(2e-3, "peak learning rate (AdamW) of the LoRA matrices")
    embedding_lr: float = field(5e-3, "peak learning rate of the SAT embeddings")
    min_lr_ratio: float = field(0.1, "cosine schedule decays to lr * min_lr_ratio")
    warmup_steps: int = field(20, "linear learning-rate warm-up steps")
    weight_decay: float = field(0.0, "AdamW weight decay on the LoRA matrices")
    grad_clip: float = field(1.0, "max gradient norm; 0 disables clipping")
    seed: int = field(0, "seed for initialisation, data order and anchors")
    heldout_rows: int = field(16, "rows at the end of the data file kept for the held-out SAT loss")
    init_from: str = field("", "adapter folder whose weights start this run (a later round resumes a shipped "
                               "adapter under a fresh schedule); its k_train, rank, alpha and targets "
                               "must match this run's")
    device: str = field("auto", "cpu, cuda, cuda:N, or auto")
    dtype: Literal["float32", "bfloat16"] = field("bfloat16", "compute dtype of the frozen base (the teacher): "
                                                           "use the dtype that is served")
    num_threads: int = field(0, "torch CPU threads; 0 keeps torch's default")
    save_every: int = field(25, "write checkpoint-last.pt every N steps")
    log_every: int = field(5, "append a line to output_dir/log.jsonl every N steps")
    eval_every: int = field(0, "held-out SAT loss every N steps (0: only at the end)")
    snapshot_every: int = field(0, "keep the adapter of every Nth step in output_dir/snapshots/step-N (with its "
                                   "training seconds), for acceptance against training time; 0 = none")
