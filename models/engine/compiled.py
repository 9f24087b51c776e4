"""The compiled forward: the lean SDPA forward (models/engine/llama.py) through torch.compile (inductor),
one static graph per shape class, replayed as a CUDA graph on GPUs.

A forward of R sequences x T new tokens runs in the smallest class (R_b >= R, T_b >= T): padding rows
write their KV into a spare cache row, padding tokens of a real row write past its tokens (as the
eager batched forward does), and every padding row sees only itself. Attention reads the cache's
whole width (masked past each row's keys), as gpt-fast does: the shapes stay fixed for any context,
at the price of reading every key column (little on a GPU; on a CPU, cap `max_context`).

The classes compile in a background worker, cached by inductor under the model cache folder
(`<cache>/inductor`, or $TORCHINDUCTOR_CACHE_DIR), so a replica that starts on a warm cache loads
its graphs in seconds. Until every class is ready the engine runs eager; then it switches to the
compiled forward for every forward that fits a class (wider prefill chunks stay eager). The switch
is all at once, so a verify never mixes a compiled row with an eager one. With the start-up
self-check on, the engine waits for the classes and checks the compiled path itself. On CUDA each
class is also captured as a CUDA graph, in the serving thread, on its first use. An error from a graph (or
a forward that would need a new one) turns the compiled path off: eager serves from then on.

    compiled = CompiledForward.maybe_build(lean, cache, widths=(1, 4, 16), batches=(1, 4, 16), device=dev)
    hidden = compiled(embeds, positions, start, local, slots)   # [R, T, H], or None: run eager
    compiled.report()   # classes ready with their compile seconds, failures, the cache folder
"""

from __future__ import annotations

import os
import queue
import threading
import time

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

from models.engine.llama import LlamaForward, _rms_norm, project


def inductor_cache_dir() -> str:
    """Where inductor keeps compiled graphs: $TORCHINDUCTOR_CACHE_DIR as the user set it, else <model
    cache>/inductor (inductor reads the variable at every cache access, and writes its /tmp default into
    it when it finds none: that value is replaced)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from models.weights.base_model import cache_root

    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, os.path.abspath(default_cache_dir())):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root() / "inductor")
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def _bucket(n: int, sizes: tuple[int, ...]) -> int | None:
    return next((s for s in sizes if s >= n), None)


class CompiledForward:
    def __init__(self, lean: LlamaForward, cache, widths: tuple[int, ...], batches: tuple[int, ...],
                 device: torch.device):
        self.lean, self.cache, self.device = lean, cache, device
        self.spare_row = cache.slots  # the first row after the sequences' own (SlotKVCache(spare_rows=1))
        self.widths, self.batches = tuple(sorted(set(widths))), tuple(sorted(set(batches)))
        self.columns = cache.keys[0].shape[2]
        self.cuda_graphs = device.type == "cuda"
        inductor_cache_dir()
        # dynamo compiles one graph per class and engine (its guards see this object's modules): room for them
        torch._dynamo.config.recompile_limit += len(self.classes)
        # the whole RoPE table, made once: a fixed input of every graph (positions index it)
        cos, sin = lean._rope_fp32(self.columns)
        self.rope = (cos.to(device), sin.to(device))
        self._fn = torch.compile(self._layers, dynamic=False, fullgraph=True)
        self.forwards = 0  # forwards run compiled
        self.ready: dict[tuple[int, int], float] = {}  # class -> seconds its compile took
        self.failed: dict[tuple[int, int], str] = {}
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._queue: queue.Queue = queue.Queue()
        for key in self.classes:
            self._queue.put(key)
        self._worker = threading.Thread(target=self._compile_loop, name="sdsat-compile", daemon=True)
        self._worker.start()

    @classmethod
    def maybe_build(cls, lean: LlamaForward | None, cache, widths, batches, device
                    ) -> CompiledForward | None:
        """A compiled forward for a lean forward of dense projections (int4 and Q8_0 modules call ctypes
        kernels, which a graph cannot hold); else None."""
        if lean is None:
            return None
        if not all(type(m) is nn.Linear for layer in lean.layers for m in layer.projections.values()):
            return None
        return cls(lean, cache, widths, batches, device)

    # ---- the graph: every layer of the lean SDPA forward over static shapes ------------------------
    def _layers(self, x: torch.Tensor, positions: torch.Tensor, first: torch.Tensor, cols: torch.Tensor,
                seen: torch.Tensor, slots: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
                keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
        """x [R, T, H] embeds, positions [R, T], first [R] each row's committed keys, cols [R, T] the columns
        each token's KV is written to, seen [R, T, T] which new tokens each one sees, slots [R] cache rows
        -> hidden [R, T, H] after the final norm. The same ops as LlamaForward.__call__ (RoPE from the same
        fp32 table, the mask Engine._mask builds, here over all L columns), the KV write an index_put."""
        lean = self.lean
        R, T, hidden = x.shape
        L = self.columns
        heads, kv_heads, D = lean.heads, lean.kv_heads, lean.head_dim
        column = torch.arange(L, device=x.device)
        visible = (column[None, None, :] < first[:, None, None]) | \
            ((column[None, None, None, :] == cols[:, None, :, None]) & seen[..., None]).any(dim=2)  # [R, T, L]
        mask = torch.zeros(R, 1, T, L, dtype=x.dtype, device=x.device)
        mask = mask.masked_fill(~visible[:, None], torch.finfo(x.dtype).min)
        group, qk_width = heads // kv_heads, (heads + kv_heads) * D
        cos = cos_table[positions].to(x.dtype)[:, :, None]  # [R, T, 1, D]
        sin = sin_table[positions].to(x.dtype)[:, :, None]
        mask = mask.repeat(1, 1, group, 1)  # [R, 1, group*T, L]: query heads folded as in the eager forward
        x = x.reshape(R * T, hidden)
        for i, layer in enumerate(lean.layers):
            qkv = project(layer.projections["qkv"], _rms_norm(layer.input_norm, x), False)
            qk = qkv[:, :qk_width].view(R, T, heads + kv_heads, D)
            qk = qk * cos + rotate_half(qk) * sin
            k = qk[:, :, heads:]  # [R, T, Hkv, D]
            v = qkv[:, qk_width:].view(R, T, kv_heads, D)
            keys[i][slots[:, None], :, cols] = k.to(keys[i].dtype)  # [R, T] rows x cols <- [R, T, Hkv, D]
            values[i][slots[:, None], :, cols] = v.to(values[i].dtype)
            k_all = keys[i][:, :, :L].index_select(0, slots)  # [R, Hkv, L, D]
            v_all = values[i][:, :, :L].index_select(0, slots)
            q = qk[:, :, :heads].unflatten(2, (kv_heads, group)).permute(0, 2, 3, 1, 4).reshape(R, kv_heads, -1, D)
            attn = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)
            attn = attn.unflatten(2, (group, T)).permute(0, 3, 1, 2, 4).reshape(R * T, heads * D)
            x = x + project(layer.projections["o_proj"], attn, False)
            gate, up = project(layer.projections["gate_up"], _rms_norm(layer.post_norm, x), False).chunk(2, dim=-1)
            x = x + project(layer.projections["down_proj"], F.silu(gate) * up, False)
        return _rms_norm(lean.norm, x).view(R, T, hidden)

    # ---- serving: pick a class, pad into it, run its graph ------------------------------------------
    @property
    def classes(self) -> list[tuple[int, int]]:
        return [(b, w) for b in self.batches for w in self.widths]

    @property
    def active(self) -> bool:
        """Whether forwards run compiled: every class compiled, none failed (here or while serving)."""
        return len(self.ready) == len(self.classes) and not self.failed

    def __call__(self, embeds: torch.Tensor, positions: torch.Tensor, start: torch.Tensor, local: torch.Tensor,
                 slots: list[int]) -> torch.Tensor | None:
        """embeds [R, T, H], positions [R, T] (CPU), start [R] first new column per row, local [R, T, T] which
        new tokens each sees -> hidden [R, T, H], or None where the forward runs eager (not active, no class
        fits, or the keys would run past the cache's columns)."""
        R, T, hidden = embeds.shape
        key = (_bucket(R, self.batches), _bucket(T, self.widths))
        if not self.active or None in key or int(start.max()) + key[1] > self.columns:
            return None
        inputs = self._inputs(key, embeds, positions, start, local, slots)
        try:
            with torch.compiler.set_stance("fail_on_recompile"):  # never a compile in the serving thread
                if not self.cuda_graphs:
                    out = self._fn(*inputs, self.cache.keys, self.cache.values)[:R, :T]
                else:
                    if key not in self._graphs:  # all graphs share the first one's memory pool
                        pool = next(iter(self._graphs.values()), None)
                        self._graphs[key] = _Graph(self._fn, inputs, self.cache, pool)
                    out = self._graphs[key](inputs)[:R, :T].clone()
        except Exception as error:  # the compiled path is off from here on (the report says why): eager serves
            self.failed[key] = f"while serving: {type(error).__name__}: {error}"[:500]
            return None
        self.forwards += 1
        return out

    def _inputs(self, key, embeds, positions, start, local, slots):
        """The class's padded inputs (module docstring): x, positions, first, cols, seen, slots, cos, sin."""
        (B, W), (R, T, hidden) = key, embeds.shape
        x = embeds.new_zeros(B, W, hidden)
        x[:R, :T] = embeds
        pos = torch.zeros(B, W, dtype=torch.long)
        pos[:R, :T] = positions
        first = torch.zeros(B, dtype=torch.long)
        first[:R] = start
        cols = first[:, None] + torch.arange(W)[None]  # [B, W]; padding rows write columns 0..W-1 of the spare row
        seen = torch.eye(W, dtype=torch.bool).repeat(B, 1, 1)  # padding sees itself only
        seen[:R, :T, :T] = local
        rows = torch.tensor(list(slots) + [self.spare_row] * (B - R), dtype=torch.long)
        return (x, *(t.to(self.device) for t in (pos, first, cols, seen, rows)), *self.rope)

    # ---- the background worker ---------------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> bool:
        """Block until every queued compile has finished (tests, `make setup`); whether it did in time."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def _compile_loop(self) -> None:
        """Compile every queued class, then end (the thread holds no engine once its work is done)."""
        while True:
            try:
                key = self._queue.get_nowait()
            except queue.Empty:
                return
            try:
                t0 = time.perf_counter()
                B, W = key
                embeds = torch.zeros(B, W, self.lean.norm.weight.shape[0], dtype=self.cache.keys[0].dtype,
                                     device=self.device)
                local = torch.ones(B, W, W, dtype=torch.bool).tril()
                with torch.inference_mode():  # the serving loop's mode: the graph's guards must match it
                    inputs = self._inputs(key, embeds, torch.zeros(B, W, dtype=torch.long),
                                          torch.zeros(B, dtype=torch.long), local, [self.spare_row] * B)
                    self._fn(*inputs, self.cache.keys, self.cache.values)  # writes the spare row only
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                self.ready[key] = time.perf_counter() - t0
            except Exception as error:  # a class that does not compile stays eager; the report says why
                self.failed[key] = f"{type(error).__name__}: {error}"[:500]
            finally:
                self._queue.task_done()

    def report(self) -> dict:
        """What is compiled: classes (sequences x tokens) ready with their compile seconds, pending and failed,
        whether forwards run compiled, the CUDA graphs captured and the cache folder."""
        fmt = "{}x{}".format
        ready, failed = dict(self.ready), dict(self.failed)  # the worker may be adding to them
        return {"classes_ready": {fmt(*k): round(v, 1) for k, v in sorted(ready.items())},
                "pending": self._queue.unfinished_tasks, "active": self.active,
                "forwards": self.forwards, "failed": {fmt(*k): v for k, v in failed.items()},
                "cuda_graphs": len(self._graphs), "cache_dir": inductor_cache_dir()}


class _Graph:
    """One class's compiled forward captured as a CUDA graph: inputs are copied into static buffers, then
    the graph replays every kernel in one launch (as vLLM and gpt-fast's reduce-overhead do)."""

    def __init__(self, fn, inputs: tuple, cache, pool=None):
        self.changing = len(inputs) - 2  # every input but the two RoPE tables, which stay put
        self.static = tuple(t.clone() for t in inputs[: self.changing]) + tuple(inputs[self.changing :])
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the capture (allocator, lazy init)
            fn(*self.static, cache.keys, cache.values)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool.graph.pool() if pool is not None else None):
            self.out = fn(*self.static, cache.keys, cache.values)

    def __call__(self, inputs: tuple) -> torch.Tensor:
        for dst, src in zip(self.static[: self.changing], inputs[: self.changing], strict=True):
            dst.copy_(src)
        self.graph.replay()
        return self.out
