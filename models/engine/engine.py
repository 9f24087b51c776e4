"""The decoding engine: continuous batching of draft-then-verify over one slot KV cache.

    engine = Engine.from_pretrained("models/checkpoints/sdsat-code-small", EngineConfig(method="sdsat", k=5))
    result = engine.generate(prompt_ids, SamplingParams(max_new_tokens=64))
    # or: engine.add_request(id, prompt_ids, params); while engine.has_work(): outputs = engine.step()

Each `step()` admits waiting requests into free KV slots, prefills up to `prefill_chunk` prompt
tokens (batched, so long prompts do not stall running streams) and runs one decoding iteration for
every running sequence, the same loop for every method:

    draft   -> each sequence's drafter (models/engine/drafters/__init__.py) proposes, batched per drafter
    verify  -> one batched forward over each sequence's [cur, d_1..d_k] + the rows its drafter adds
    accept  -> greedy match or exact speculative sampling with the drafter's q, per sequence
    commit  -> keep the KV of cur + accepted drafts (a length change), let the drafter keep what it
               needs, emit accepted + bonus
"""

from __future__ import annotations

import itertools
import time
from collections import deque

import torch

from models.engine.compiled import CompiledForward
from models.engine.config import EngineConfig, SamplingParams
from models.engine.drafters import DRAFTERS, drafter_for
from models.engine.drafters.base import Drafter, sample_token
from models.engine.invariance import WIDTHS, check_invariance
from models.engine.kernels import Attention
from models.engine.kernels import set_threads as set_kernel_threads
from models.engine.kv_cache import SlotKVCache
from models.engine.llama import LlamaForward, project
from models.engine.memory import huge_page_bytes, place_in_huge_pages
from models.engine.planner import Planner, manifest_priors, resolve
from models.engine.prefix import read_blocks, write_blocks
from models.engine.sampling import process_logits, verify_greedy, verify_sampling
from models.engine.sequence import RequestOutput, Sequence
from models.errors import ConfigError, InvalidRequestError, PromptTooLongError
from models.weights.quant import Int4Linear, Int8Linear
from models.weights.sat import SatSpec
from models.weights.speculator import MLPSpeculator

PREFILL_LIBRARY_ROWS = 16  # the widest forward the self-check and the identity tests cover


class Engine:
    def __init__(self, model, tokenizer, sat: SatSpec | None, config: EngineConfig, prefix_store=None,
                 speculator: MLPSpeculator | None = None, adapter=None, quantization: dict | None = None,
                 acceptance_priors: dict[str, list[float]] | None = None):
        self.model, self.tokenizer, self.sat, self.config = model.eval(), tokenizer, sat, config
        self.adapter = adapter  # a models.weights.adapter.SatAdapter attached to `model` (SAT rows only), or None
        self.prefix_store = prefix_store  # a models.engine.prefix.PrefixStore, or None
        if config.record_hidden and prefix_store is not None:  # cached prompt blocks would have no states
            raise ConfigError("record_hidden (training data) needs an engine without a prefix cache")
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.decoder, self.lm_head = model.get_decoder(), model.get_output_embeddings()
        self.embed_tokens = model.get_input_embeddings()
        if speculator is not None:  # a base_tied one drafts with the base's own (exact, unquantized) table
            speculator = speculator.attach_base(self.embed_tokens.weight).to(self.device, self.dtype).eval()
            if quantization is not None and speculator.config.base_tied:  # int4: an int8 draft head, as the LM head
                speculator.quantize_head()
        self.speculator = speculator
        self.lean = LlamaForward.maybe_build(model) if config.forward == "lean" else None
        # int4 on a CPU: the quantized weights in one block of 2 MiB pages, streamed faster (models/engine/memory.py)
        self.huge_page_bytes = place_in_huge_pages(self._quantized_modules()) if quantization is not None \
            and self.device.type == "cpu" else 0
        self.kernels_unavailable: str | None = None
        self.invariant_kernels = self._use_invariant_kernels(config)  # models/engine/kernels.py, else libraries
        if self.invariant_kernels:  # as many threads as torch's (Ray's OMP_NUM_THREADS would say 1)
            set_kernel_threads(torch.get_num_threads())
        if self.lean is not None and adapter is not None:
            self.lean.rows = adapter.rows
            self.lean.sat_lora_int8 = config.sat_lora == "int8"
        self.quantization = quantization  # the report of models.weights.quant.quantize_model (dtype int4), or None
        positions = model.config.max_position_embeddings  # never beyond what the model was trained for
        self.max_context = min(config.max_context, positions) if config.max_context else positions
        headroom = max(config.prefill_chunk, (config.max_k + 1) ** 2)
        compiling = config.compile and self.lean is not None and not self.invariant_kernels
        self.cache = SlotKVCache.for_model(model.config, config.max_batch, self.max_context, headroom,
                                           self.dtype, self.device, spare_rows=int(compiling))
        # the compiled forward (models/engine/compiled.py): its classes compile in the background from here; the
        # largest batch class is max_batch, so every decode step fits one
        batches = {b for b in config.compile_batches if b < config.max_batch} | {config.max_batch}
        self.compiled = CompiledForward.maybe_build(self.lean, self.cache, config.compile_widths, batches,
                                                    self.device) if compiling else None
        # a verify forward is k + 1 rows: with a compiled forward, k stays within its widest class
        self.k_cap = config.max_k if self.compiled is None else max(self.compiled.widths) - 1
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # running[i] owns cache row i
        self._ids = itertools.count()
        self.batch_sizes: deque[int] = deque(maxlen=100_000)  # decode batch sizes of recent iterations (tests)
        self.cancelled = 0
        self.draft_seconds = 0.0  # wall time spent drafting (benchmarks: the draft's own cost per iteration)
        self.forward_seconds = 0.0  # wall time in model forwards (reset after the self-check below)
        # lossless speculation needs width-invariant forwards: checked here, on this host (None: not checked);
        # a compiled forward is checked once its classes are ready (the first compile: minutes; then cached)
        self.invariance = None
        if self.compiled is not None and config.self_check:  # the widths a verify can have here, compiled
            self.compiled.wait()
            widths = sorted({w for w in WIDTHS if w <= self.k_cap + 1} | {self.k_cap + 1})
            self.invariance = check_invariance(self, tuple(widths)) if self.k_cap > 0 else None
        elif config.self_check:
            self.invariance = check_invariance(self)
        # what the self-check saw: compiled graphs or eager ops (a graph error while serving turns them off)
        self._checked_compiled = self.compiled is not None and self.compiled.active
        # where a step's time goes, from here on (the planner: time outside the forward per decoded token;
        # its own calibration counts as neither)
        self.forward_seconds = self.outside_seconds = self.calibration_seconds = 0.0
        self.decoded_tokens = 0
        # method `auto` (models/engine/planner.py): this host's forward costs, measured on the first auto request
        self.planner = Planner(self, acceptance_priors)

    def huge_pages(self) -> dict:
        """The int4 weights' placement (models/engine/memory.py): MiB copied into the huge-page block, and MiB
        of it the kernel backs with 2 MiB pages now (0 where transparent huge pages are off)."""
        backed = 0
        if self.huge_page_bytes:
            backed = huge_page_bytes(self._quantized_modules()[0].quantized_tensors()[0])
        return {"placed_mib": round(self.huge_page_bytes / 2**20, 1), "backed_mib": round(backed / 2**20, 1)}

    def _quantized_modules(self) -> list:
        """Every Int4Linear and Int8Linear the engine reads (the lean forward's fused projections in place of
        their parts, which are views of them), the LM head and the speculator's int8 head included."""
        fused = list(self.lean.fused_projections()) if self.lean is not None else []
        parts = {id(p) for f in fused for p, _, _ in f._parts}
        found = [m for m in self.model.modules() if isinstance(m, (Int4Linear, Int8Linear)) and id(m) not in parts]
        head = getattr(self.speculator, "int8_head", None)
        return fused + found + ([head] if head is not None else [])

    @classmethod
    def from_pretrained(cls, directory, config: EngineConfig | None = None) -> Engine:
        from models.weights.checkpoint import load_adapter, load_model, load_tokenizer, resolve_device, resolve_dtype

        config = config or EngineConfig()
        device = resolve_device(config.device)
        quantized = config.dtype == "int4"
        if quantized and device.type != "cpu":
            raise ConfigError("dtype int4 runs on the CPU only (PyTorch's int4 CPU kernel); use bfloat16 on GPUs")
        dtype = torch.float32 if quantized else resolve_dtype(config.dtype, device)
        model = load_model(directory, config.attn_implementation, dtype, device)
        adapter = load_adapter(directory, model)
        report = None
        if quantized:  # after the adapter is attached: its LoRA wrappers keep the quantized projections
            from models.weights.quant import quantize_model

            report = quantize_model(model)
            if adapter is not None:
                adapter.to(torch.bfloat16)
        return cls(model, load_tokenizer(directory), SatSpec.maybe_load(directory), config,
                   speculator=MLPSpeculator.maybe_load(directory), adapter=adapter, quantization=report,
                   acceptance_priors=manifest_priors(directory))

    def _use_invariant_kernels(self, config: EngineConfig) -> bool:
        """Whether the lean forward's attention and dense projections, and the LM head, run the
        width-invariant kernels (CPU, `attention: invariant`, a compiler at hand)."""
        from models.engine.kernels import kernel_unavailable, supports

        if self.lean is None or self.device.type != "cpu" or config.attention != "invariant":
            return False
        if not supports(self.dtype):
            self.kernels_unavailable = f"the width-invariant kernels read fp32 and bf16, not {self.dtype}"
            return False
        self.kernels_unavailable = kernel_unavailable()  # why not (the self-check's report carries it), or None
        return self.kernels_unavailable is None

    @property
    def speculation_lossless(self) -> bool:
        """False when the start-up self-check found a verify row that differs from the 1-token forward, or
        when the forward it checked (compiled graphs) has since been turned off for eager ops never checked."""
        if self.compiled is not None and self.compiled.active != self._checked_compiled:
            return False
        return self.invariance is None or self.invariance.lossless

    def speculates_losslessly(self, drafter: Drafter) -> bool:
        """Whether `drafter`'s speculation stays token-identical to `ar` here: not where the self-check failed,
        nor for SAT rows, which run eager beside a compiled forward's graphs (their rows and the graphs' can
        differ). Where it does not, requests for it are served with `ar`."""
        return self.speculation_lossless and not (drafter.sat_rows and self.compiled is not None)

    @property
    def weights_dtype(self) -> str:
        """What the weights are served as: "int4", or the compute dtype's name ("float32", ...)."""
        return "int4" if self.quantization else str(self.dtype).replace("torch.", "")

    # ---- requests -------------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    tenant: str = "default") -> str:
        method = params.method or self.config.method
        k = self.config.k if params.k is None else params.k
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty")
        if len(prompt_ids) >= self.max_context:
            raise PromptTooLongError(f"prompt has {len(prompt_ids)} tokens; the context limit is {self.max_context}")
        if k > self.config.max_k:
            raise InvalidRequestError(f"k must be <= {self.config.max_k}, got {k}")
        if method == "auto":  # the planner picks the method at admission; a request's k caps its draft length
            drafter = None
            k = self.config.max_k if params.k is None else k
        else:
            drafter = drafter_for(method)
            if (why := drafter.unavailable(self)) is not None:
                raise InvalidRequestError(why)
        if drafter is not None and drafter.speculative and not self.speculates_losslessly(drafter):
            method, drafter = "ar", drafter_for("ar")  # never a silently lossy speculation
        generator = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else int(torch.randint(2**62, ()))
            generator = torch.Generator().manual_seed(seed)
        seq = Sequence(request_id or f"req-{next(self._ids)}", list(prompt_ids), params, method,
                       k if drafter is None or drafter.speculative else 0, self.tokenizer.eos_token_id,
                       self.max_context, self.tokenizer, generator, tenant=tenant, auto=drafter is None)
        if self.config.record_hidden:
            seq.hidden_trace = []
        self.waiting.append(seq)
        return seq.request_id

    def cancel(self, request_id: str) -> bool:
        """Stop a request and free its slot now. Returns whether it was found."""
        for seq in [*self.waiting, *self.running]:
            if seq.request_id == request_id and not seq.finished:
                seq.cancel()
                self.cancelled += 1
                if seq in self.waiting:
                    self.waiting.remove(seq)
                else:
                    self._release(seq)
                return True
        return False

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- the engine step ------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        t0, forward0, calibration0 = time.perf_counter(), self.forward_seconds, self.calibration_seconds
        admitted = False
        while self.waiting and len(self.running) < self.cache.slots:  # admission: a free KV slot
            seq, admitted = self.waiting.popleft(), True
            if seq.auto:  # its method, for the batch it joins (the first time: this host's costs, in its free row)
                resolve(self, seq, min(self.cache.slots, len(self.running) + 1 + len(self.waiting)))
            seq.slot = len(self.running)
            self.cache.commit(seq.slot, 0)
            self.running.append(seq)
            seq.timings["admitted"] = time.time_ns()
            if self.prefix_store is not None:
                self._load_prefix(seq)
                seq.timings["prefix_lookup"] = time.time_ns()
        prefilling = [s for s in self.running if s.prefilled < len(s.prompt_ids)]
        decoding = [s for s in self.running if s.prefilled == len(s.prompt_ids) and not s.finished]
        if prefilling:
            self._prefill(prefilling)
        emitted = -sum(len(s.output_ids) for s in decoding)
        if decoding:
            self._iterate(decoding)
        emitted += sum(len(s.output_ids) for s in decoding)  # tokens this step decoded
        outputs = [out for s in list(self.running) if (out := s.take_output()) is not None]
        if len(decoding) == 1 and not prefilling and not admitted:  # a lone sequence's step: what auto's trials time
            self.planner.measure(decoding[0].method, decoding[0].k_plan, time.perf_counter() - t0, emitted)
        for seq in [s for s in self.running if s.finished]:
            self.planner.observe(seq)
            self._release(seq)
        self.outside_seconds += time.perf_counter() - t0 - (self.forward_seconds - forward0) \
            - (self.calibration_seconds - calibration0)
        self.decoded_tokens += emitted
        return outputs

    def _release(self, seq: Sequence) -> None:
        """Free a finished sequence's slot; the last running sequence moves into it."""
        last = self.running[-1]
        if last is not seq:
            self.cache.move(last.slot, seq.slot)
            last.slot = seq.slot
            self.running[seq.slot] = last
        self.running.pop()

    def _prefill(self, seqs: list[Sequence]) -> None:
        budget, chunks, owners = self.config.prefill_chunk, [], []
        for seq in seqs:
            if budget <= 0:
                break
            n = min(budget, len(seq.prompt_ids) - seq.prefilled)
            chunks.append(seq.prompt_ids[seq.prefilled : seq.prefilled + n])
            owners.append(seq)
            budget -= n
        record = self.config.record_hidden
        logits, hidden = self._forward(owners, chunks, last_only=not record)
        for seq, chunk, row, state in zip(owners, chunks, logits, hidden, strict=True):
            if record:
                seq.hidden_trace.append(state.to("cpu", torch.bfloat16))
                row, state = row[-1:], state[-1:]
            seq.prefilled += len(chunk)
            self.cache.commit(seq.slot, seq.prefilled)
            seq.stats.forwards += 1
            if seq.prefilled == len(seq.prompt_ids):  # the prompt's last logits give the first token
                if self.prefix_store is not None:
                    self._offer_prefix(seq)
                token = sample_token(seq, row[-1])
                self._drafter(seq).after_accept(self, seq, row, state, 0)  # row 0 predicted the first token
                seq.emit([token], row[-1:])
                seq.timings["prefill"] = time.time_ns()

    def _load_prefix(self, seq: Sequence) -> None:
        """Start a sequence from the longest cached prefix of its prompt (at least one token is left
        to prefill: its logits give the first output token)."""
        size = self.prefix_store.block_size
        blocks = self.prefix_store.lookup(seq.prompt_ids, seq.tenant)[: (len(seq.prompt_ids) - 1) // size]
        if blocks:
            seq.prefilled = seq.cached_tokens = write_blocks(self.cache, seq.slot, blocks, size)

    def _offer_prefix(self, seq: Sequence) -> None:
        size = self.prefix_store.block_size
        first, last = seq.cached_tokens // size, len(seq.prompt_ids) // size
        if last > first:
            self.prefix_store.offer(seq.prompt_ids, read_blocks(self.cache, seq.slot, first, last, size), first,
                                    seq.tenant)

    # ---- one decoding iteration ------------------------------------------------------------------
    def _iterate(self, seqs: list[Sequence]) -> None:
        """One draft -> verify -> accept -> commit round over every decoding sequence."""
        batch_k = self.config.k_under_load(self.config.max_k, len(seqs))
        self.batch_sizes.append(len(seqs))
        # draft: clamp each k, then every drafter proposes for all its sequences at once
        t0 = time.perf_counter()
        self._draft(seqs, batch_k)
        self.draft_seconds += time.perf_counter() - t0
        live = [s for s in seqs if not s.finished]  # a drafter may emit (two-step SDSAT's exact token)
        if not live:
            return
        # verify: one batched forward over every live chain [cur, d_1..d_k] and its drafter's extra rows
        logits, hidden = self._verify_forward(live)
        for seq, rows, states in zip(live, logits, hidden, strict=True):
            # accept: the longest draft prefix the target agrees with, plus a bonus / recovered token
            accepted, emitted = self._accept(seq, rows[: len(seq.drafts) + 1])
            # commit: keep cur + accepted drafts, let the drafter keep its state, emit the tokens
            self._commit(seq, rows, states, accepted, emitted)

    def _drafter(self, seq: Sequence) -> Drafter:
        return drafter_for(seq.method)

    def _draft(self, seqs: list[Sequence], batch_k: int) -> None:
        """Set each sequence's k for this iteration and its drafts."""
        for seq in seqs:
            room = self.max_context - seq.context_len  # cache room left for the chunk
            cap = min(seq.k, batch_k, self.k_cap)
            k = min(cap, seq.remaining - 1, room - 1)  # k drafts + bonus fit
            if seq.auto:  # the best draft length for its method at this iteration's batch size
                k = min(k, self.planner.k_for(seq.method, len(seqs), cap=cap))
            seq.k_plan = k = max(0, k)
            seq.k_now = self._drafter(seq).k_for(self, seq, k)
            if seq.k_now == 0:
                seq.drafts, seq.draft_probs = [], None
        groups: dict[str, list[Sequence]] = {}  # method -> its sequences that draft this iteration
        for seq in seqs:
            if seq.k_now > 0:
                groups.setdefault(seq.method, []).append(seq)
        for method, drafter in DRAFTERS.items():  # registry order: the same order of forwards every iteration
            if method in groups:
                drafter.propose(self, groups[method])

    def _verify_forward(self, seqs: list[Sequence]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per sequence its [T_i, V] logits and [T_i, H] hidden states over [cur, *drafts, *extra rows]."""
        chunks, layouts = [], []
        for seq in seqs:
            extra, layout = self._drafter(seq).verify_rows(self, seq)
            chunks.append([seq.cur, *seq.drafts, *extra])
            layouts.append(layout)
        return self._forward(seqs, chunks, layouts)

    def _accept(self, seq: Sequence, target_logits: torch.Tensor) -> tuple[int, list[int]]:
        """target_logits: [len(drafts) + 1, V] at the chain. Returns (accepted, emitted tokens)."""
        drafts = torch.tensor(seq.drafts, dtype=torch.long)
        if seq.params.greedy:
            return verify_greedy(target_logits, drafts)
        p = seq.params
        target = process_logits(target_logits, p.temperature, p.top_p, p.top_k)
        u = seq.uniforms(len(seq.drafts) + 1)
        return verify_sampling(target, seq.draft_probs, drafts, u[:-1], u[-1])

    def _commit(self, seq: Sequence, rows: torch.Tensor, states: torch.Tensor, accepted: int,
                emitted: list[int]) -> None:
        """rows [T, V] / states [T, H]: this sequence's rows of the verify forward."""
        seq.stats.forwards += 1
        seq.stats.record(len(seq.drafts), accepted)
        # a length change: rejected drafts and any drafter rows (SAT blocks) past it are dropped
        self.cache.commit(seq.slot, seq.context_len + accepted)  # cur + accepted drafts
        if seq.hidden_trace is not None:
            seq.hidden_trace.append(states[: accepted + 1].to("cpu", torch.bfloat16))
        self._drafter(seq).after_accept(self, seq, rows, states, accepted)
        seq.emit(emitted, rows[: len(emitted)])

    # ---- the batched forward --------------------------------------------------------------------
    def _forward(self, seqs: list[Sequence], chunks: list[list[int]], layouts=None, last_only=False):
        t0 = time.perf_counter()
        try:
            return self._run_forward(seqs, chunks, layouts, last_only)
        finally:
            self.forward_seconds += time.perf_counter() - t0

    def _run_forward(self, seqs: list[Sequence], chunks: list[list[int]], layouts=None, last_only=False):
        """One model forward over new tokens of several sequences, written after each one's committed
        KV. layouts[i] = (position offsets, local [T_i, T_i] visibility) or None for a causal chunk.
        Returns per sequence its [T_i, V] logits on the CPU and [T_i, H] final hidden states on the
        model's device (or [1, V] and [1, H] with last_only)."""
        R, T = len(seqs), max(map(len, chunks))
        start, kv_len = self.cache.write_at([s.slot for s in seqs], T)
        if R == 1 and not (layouts and layouts[0] is not None):  # one causal chunk (every plain decode step)
            ids, offsets = torch.tensor(chunks), torch.arange(T)[None]
            local = torch.ones(1, T, T, dtype=torch.bool).tril()
        else:
            ids = torch.zeros(R, T, dtype=torch.long)
            offsets = torch.arange(T).repeat(R, 1)
            local = torch.eye(T, dtype=torch.bool).repeat(R, 1, 1)  # padding sees itself only
            for i, chunk in enumerate(chunks):
                n = len(chunk)
                ids[i, :n] = torch.tensor(chunk)
                layout = layouts[i] if layouts else None
                if layout is None:
                    local[i, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
                else:
                    offsets[i, :n] = torch.tensor(layout[0])
                    local[i, :n, :n] = layout[1]
        positions_cpu = start[:, None] + offsets
        ids, positions = ids.to(self.device), positions_cpu.to(self.device)
        # decode and verify forwards always run the invariant kernels (speculation == ar needs them); a
        # prefill chunk wider than PREFILL_LIBRARY_ROWS runs the libraries' faster kernels unless
        # `invariant_prefill` (prefill is the same for every method, so identity does not need it)
        invariant = self.invariant_kernels and (not last_only or self.config.invariant_prefill
                                                or T <= PREFILL_LIBRARY_ROWS)
        # SAT ids of an adapter lie past the vocabulary: the adapter embeds them and marks their rows
        sat_ids = self.adapter is not None and \
            max((max(c) for c in chunks if c), default=0) >= self.adapter.config.vocab_size
        embeds = self.adapter.embed(self.model, ids) if sat_ids else self.embed_tokens(ids)
        try:
            if invariant:  # each row on its own, in one fixed order (models/engine/kernels.py)
                attention = Attention(torch.tensor([s.slot for s in seqs]), start, local, self.lean.scale)
                hidden = self.lean(embeds, positions, None, self.cache, attention)  # [R, T, H]
            elif self.lean is not None:
                hidden = None if self.compiled is None or sat_ids else \
                    self.compiled(embeds, positions_cpu, start, local, [s.slot for s in seqs])  # None: run eager
                if hidden is None:
                    hidden = self.lean(embeds, positions, self._mask(start, local, kv_len).to(self.device), self.cache)
            else:
                mask = self._mask(start, local, kv_len).to(self.device)
                hidden = self.decoder(inputs_embeds=embeds, position_ids=positions, attention_mask=mask,
                                      cache=self.cache, use_cache=True).last_hidden_state
        finally:
            if self.adapter is not None:
                self.adapter.clear()
        lengths = [len(c) for c in chunks]
        if last_only:
            last = torch.tensor(lengths, device=self.device) - 1
            hidden = hidden[torch.arange(R, device=self.device), last][:, None]  # [R, 1, H]
            logits = project(self.lm_head, hidden[:, 0], invariant)  # [R, V]
            return list(logits.float().cpu()[:, None]), list(hidden)
        # the LM head runs on real rows only (padding of shorter chunks is never read)
        real = hidden[0, : lengths[0]] if R == 1 else torch.cat([h[:n] for h, n in zip(hidden, lengths, strict=True)])
        logits = project(self.lm_head, real, invariant).float().cpu().split(lengths)  # [T_i, V] each
        return list(logits), [hidden[i, :n] for i, n in enumerate(lengths)]

    def _mask(self, start: torch.Tensor, local: torch.Tensor, kv_len: int) -> torch.Tensor:
        """The additive [R, 1, T, kv_len] mask of a forward: each row sees its sequence's committed keys
        and the new columns `local` [R, T, T] gives it."""
        R, T = local.shape[:2]
        visible = (torch.arange(kv_len)[None, None, :] < start[:, None, None]).repeat(1, T, 1)  # [R, T, L]
        cols = (start[:, None] + torch.arange(T)[None, :])[:, None, :].expand(R, T, T)
        visible.scatter_(2, cols, local)
        mask = torch.zeros(R, 1, T, kv_len, dtype=self.dtype)
        return mask.masked_fill_(~visible[:, None], torch.finfo(self.dtype).min)

    # ---- convenience ----------------------------------------------------------------------------
    def generate(self, prompt_ids: list[int], params: SamplingParams | None = None) -> dict:
        """Run one request to completion (other queued requests progress too)."""
        return self.generate_batch([prompt_ids], params)[0]

    def generate_batch(self, prompts: list[list[int]], params: SamplingParams | None = None) -> list[dict]:
        params = params or SamplingParams()
        ids = [self.add_request(p, params) for p in prompts]
        results = {i: {"token_ids": [], "text": ""} for i in ids}
        while any(not results[i].get("finished") for i in ids):
            for out in self.step():
                if out.request_id in results:
                    r = results[out.request_id]
                    r["token_ids"] += out.token_ids
                    r["text"] += out.text
                    r.update(finished=out.finished, finish_reason=out.finish_reason, stats=out.stats,
                             cached_tokens=out.cached_tokens)
        return [results[i] for i in ids]
