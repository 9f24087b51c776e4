"""Engine configuration, per-request sampling parameters and the speculation statistics schema.

`SpecStats` is the one stats schema used everywhere (CLI, bench, service `usage.speculation`,
metrics): forwards (target-model forwards, prefill included), iterations (draft-verify rounds),
drafted, accepted (draft tokens accepted; the exact and bonus tokens are not drafts), emitted
(output tokens), accepted_per_position and drafted_per_position (iterations that drafted position i:
acceptance at i given a draft there is accepted_per_position[i] / drafted_per_position[i]).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from models.config import field as cfg_field
from models.errors import InvalidRequestError

Method = Literal["ar", "sdsat", "sdsat-fused", "prompt-lookup", "mlp", "auto"]
# auto: the engine picks among the others by measured cost and acceptance (models/engine/planner.py)
METHODS: tuple[str, ...] = ("ar", "sdsat", "sdsat-fused", "prompt-lookup", "mlp", "auto")


@dataclass(frozen=True)
class EngineConfig:
    method: Method = cfg_field("sdsat", "default decoding method (a request may pick another)")
    k: int = cfg_field(5, "default draft length per iteration (0 = plain decoding)")
    max_batch: int = cfg_field(16, "KV slots: the most sequences decoded at once; more requests wait")
    max_context: int = cfg_field(0, "context limit in tokens; 0 = the model's max_position_embeddings")
    prefill_chunk: int = cfg_field(256, "prompt tokens prefilled per engine step (long prompts are chunked "
                                        "so they do not stall other streams)")
    max_k: int = cfg_field(16, "largest k a request may ask for")
    load_policy: tuple[int, ...] = cfg_field(
        (), "speculation under load: pairs batch_size,k meaning 'at batch size >= B use at most k' "
            "(e.g. 4,3,8,0: k<=3 from 4 sequences, plain decoding from 8); empty = never reduce")
    auto_trial_iterations: int = cfg_field(
        24, "method auto, one sequence at a time: iterations it times each promising (method, k) for before it "
            "trusts measured tokens per second over its cost model (models/engine/planner.py); 0 = the cost model "
            "alone")
    prompt_lookup_ngram: int = cfg_field(3, "prompt lookup: longest n-gram matched against the context")
    dtype: Literal["auto", "float32", "bfloat16", "float16", "int4"] = cfg_field(
        "float32", "compute dtype; auto = bf16 on GPUs and on CPUs with native bf16 (avx512_bf16/amx_bf16), "
                   "else fp32; int4 (CPU) = the base's Q4_1 blocks as 4-bit weights, bf16 activations "
                   "(models/weights/quant.py)")
    forward: Literal["lean", "transformers"] = cfg_field(
        "lean", "lean = the engine's own Llama forward (models/engine/llama.py; other architectures fall back "
                "to transformers'), transformers = the model's own forward")
    attention: Literal["invariant", "sdpa"] = cfg_field(
        "invariant", "lean forward's attention on CPUs: invariant = models/engine/kernels.c, every row computed on "
                     "its own in one fixed order, so a verify row equals the 1-token forward bit for bit on any "
                     "CPU; sdpa = PyTorch's SDPA (GPUs always use it; the start-up self-check says whether "
                     "speculation stays lossless with it)")
    compile: bool = cfg_field(
        False, "torch.compile (inductor) the lean forward where it runs PyTorch ops (GPUs, attention: sdpa), one "
               "graph per shape class, CUDA graphs on GPUs (models/engine/compiled.py); the compile cache lives under "
               "the model cache folder. The CPU's invariant kernels are C compiled at set-up, so this changes "
               "nothing there. false = eager (tests, debugging)")
    compile_widths: tuple[int, ...] = cfg_field(
        (1, 4, 16), "compiled shape classes: tokens per sequence (a forward is padded to the next one; wider "
                    "prefill chunks run eager). 16 covers the self-check's widest verify")
    compile_batches: tuple[int, ...] = cfg_field(
        (1, 4, 16), "compiled shape classes: sequences per forward (padded to the next one; more run eager)")
    invariant_prefill: bool = cfg_field(
        True, "prefill chunks wider than 16 rows through the invariant kernels too: a prompt's KV is then the same "
              "bits however it is chunked, batched or taken from the prefix cache, so a greedy answer does not "
              "depend on what the cache held (with false, SmolLM2 int4 gave another answer when 32 of 48 prompt "
              "tokens came from the cache). Costs 1.3-1.5x prefill time on a 1,000-1,900-token prompt on 2 vCPUs "
              "(docs/engine.md). Decode and verify always use them")
    sat_lora: Literal["int8", "weights"] = cfg_field(
        "int8", "int4 forward (kernels.c): the SAT adapter's LoRA on SAT rows as int8 codes with a scale per output "
                "(half the bytes of bf16; a SAT row's LoRA is a stream of 9.8 MB of bf16 weights on SmolLM2, which "
                "costs what reading them costs) or in the adapter's own dtype (weights). Standard rows, and so "
                "every verified token, are the same either way; only the drafts can differ")
    self_check: bool = cfg_field(
        True, "at load, compare verify rows with the 1-token forward on this host (models/engine/invariance.py); "
              "if they differ, speculative methods serve ar. false skips the check and trusts the kernels")
    record_hidden: bool = cfg_field(
        False, "training data: keep every position's final hidden state (the state that predicted the next token, "
               "as the served forward computes it) and hand it over with a request's last output (RequestOutput."
               "hidden, [prompt + output - 1, H] bf16); costs the LM head over every prompt row")
    device: str = cfg_field("auto", "cpu, cuda, cuda:N, or auto")
    attn_implementation: Literal["sdpa", "eager"] = cfg_field("sdpa", "transformers attention implementation")

    def __post_init__(self):
        if self.method not in METHODS:
            raise InvalidRequestError(f"method must be one of {METHODS}, got {self.method!r}")
        if not 0 <= self.k <= self.max_k:
            raise InvalidRequestError(f"k must be in [0, {self.max_k}], got {self.k}")
        if self.auto_trial_iterations < 0:
            raise InvalidRequestError(f"auto_trial_iterations must be >= 0, got {self.auto_trial_iterations}")
        if self.max_batch < 1 or self.prefill_chunk < 1:
            raise InvalidRequestError("max_batch and prefill_chunk must be >= 1")
        if not self.compile_widths or not self.compile_batches or min(self.compile_widths + self.compile_batches) < 1:
            raise InvalidRequestError("compile_widths and compile_batches need sizes >= 1")
        if len(self.load_policy) % 2:
            raise InvalidRequestError("load_policy takes pairs: batch_size,k,...")

    def k_under_load(self, k: int, batch_size: int) -> int:
        """The policy: the tightest limit among pairs whose batch size has been reached."""
        pairs = zip(self.load_policy[::2], self.load_policy[1::2], strict=True)
        for min_batch, max_k in sorted(pairs):
            if batch_size >= min_batch:
                k = min(k, max_k)
        return k


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    method: str | None = None  # None = the engine's default
    k: int | None = None  # None = the engine's default
    ignore_eos: bool = False
    logprobs: int | None = None  # report the chosen token's log-prob and the top-N alternatives

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise InvalidRequestError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0, got {self.top_k}")
        if self.k is not None and self.k < 0:
            raise InvalidRequestError(f"k must be >= 0, got {self.k}")
        if self.method is not None and self.method not in METHODS:
            raise InvalidRequestError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise InvalidRequestError(f"logprobs must be in [0, 20], got {self.logprobs}")
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class SpecStats:
    forwards: int = 0
    iterations: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    drafted_per_position: list[int] = field(default_factory=list)  # iterations that drafted position i at all

    def record(self, drafted: int, accepted: int) -> None:
        self.iterations += 1
        self.drafted += drafted
        self.accepted += accepted
        if len(self.accepted_per_position) < drafted:
            self.accepted_per_position.extend([0] * (drafted - len(self.accepted_per_position)))
            self.drafted_per_position.extend([0] * (drafted - len(self.drafted_per_position)))
        for i in range(accepted):
            self.accepted_per_position[i] += 1
        for i in range(drafted):
            self.drafted_per_position[i] += 1

    def merge(self, other: SpecStats) -> None:
        self.forwards += other.forwards
        self.emitted += other.emitted
        self.iterations += other.iterations
        self.drafted += other.drafted
        self.accepted += other.accepted
        for mine, theirs in ((self.accepted_per_position, other.accepted_per_position),
                             (self.drafted_per_position, other.drafted_per_position)):
            mine.extend([0] * (len(theirs) - len(mine)))
            for i, n in enumerate(theirs):
                mine[i] += n

    def to_dict(self) -> dict:
        return {
            "forwards": self.forwards, "iterations": self.iterations, "drafted": self.drafted,
            "accepted": self.accepted, "emitted": self.emitted,
            "accepted_per_position": list(self.accepted_per_position),
            "drafted_per_position": list(self.drafted_per_position),
            "acceptance_rate": self.accepted / self.drafted if self.drafted else 0.0,
            "mean_accepted_per_iteration": self.accepted / self.iterations if self.iterations else 0.0,
            "forwards_per_token": self.forwards / self.emitted if self.emitted else 0.0,
        }
