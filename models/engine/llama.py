"""A lean forward for Llama-family decoders, over the engine's slot KV cache.

transformers' `LlamaModel.forward` is written for every use (training, masks built from 2D
padding, hooks, output flags); on a CPU decoding one token, its ~25 small ops per layer and the
module calls around them cost as much as the weights' own reads. This forward does one layer in
four projections (q/k/v fused, gate/up fused), one RMSNorm call per norm, RoPE applied to q and k
together, and SDPA over the cache's rows with the engine's 4D mask, as gpt-fast does. It uses the
model's own modules and weights (its norms' weights, its rotary module, its projections: dense,
quantized (models/weights/quant.py) or wrapped by a SAT adapter's LoRA), so it computes what the model
computes, and the transformers model stays whole for training and for other architectures.

    forward = LlamaForward.maybe_build(model)   # None for a model it does not cover
    hidden = forward(embeds, position_ids, mask, cache)   # [R, T, H] after the final norm (SDPA)
    hidden = forward(embeds, position_ids, None, cache, Attention(slots, start, local, scale))  # invariant

With `Attention` (the CPU default) the forward runs models/engine/kernels.c: per layer three calls of C
glue between the four projections, or, for an int4 model and a forward without SAT rows, all layers in
one call (`sdsat_forward_q4`), which composes the same C functions and so gives the same bits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

from models.engine.kernels import Attention, Q4Plan, add_norm, linear, q4_linear, q8_linear, silu_mul_cast, supports
from models.weights.quant import Int4Linear, Int8Linear

# the lean forward's projections: name -> (the attention or MLP module's projections it computes at once)
PROJECTIONS = {"qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")), "o_proj": ("self_attn", ("o_proj",)),
               "gate_up": ("mlp", ("gate_proj", "up_proj")), "down_proj": ("mlp", ("down_proj",))}


def _unwrap(module: nn.Module) -> nn.Module:
    """The projection under a SAT adapter's RowMaskedLoRA (models/weights/adapter.py), else the module."""
    return getattr(module, "base", module) if hasattr(module, "lora_a") else module


def fuse(parts: list[nn.Module]) -> nn.Module | None:
    """One projection computing the concatenated outputs of `parts` (same input), or None."""
    if all(type(p) is nn.Linear and p.bias is None for p in parts):
        fused = nn.Linear(parts[0].in_features, sum(p.out_features for p in parts), bias=False)
        fused.weight = nn.Parameter(torch.cat([p.weight.detach() for p in parts]), requires_grad=False)
        for p, w in zip(parts, fused.weight.split([p.out_features for p in parts]), strict=True):
            # the model's own weights become views of the fused one: no second copy
            p.weight = nn.Parameter(w, requires_grad=p.weight.requires_grad)
        return fused
    if all(isinstance(p, Int4Linear) for p in parts):
        return Int4Linear.cat(parts)
    return None


class _Layer:
    def __init__(self, layer: nn.Module):
        self.input_norm, self.post_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.eps, self.post_eps = _eps(self.input_norm), _eps(self.post_norm)
        self._norm_weights: dict[str, torch.Tensor] = {}
        self.projections: dict[str, nn.Module | None] = {}
        # a SAT adapter's LoRA on a projection: (the LoRA module, its columns of the projection's output)
        self.loras: dict[str, list[tuple[nn.Module, slice]]] = {}
        for name, (parent_name, parts) in PROJECTIONS.items():
            parent = getattr(layer, parent_name)
            modules = [getattr(parent, part) for part in parts]
            bases = [_unwrap(m) for m in modules]
            self.projections[name] = bases[0] if len(bases) == 1 else fuse(bases)
            self.loras[name], start = [], 0
            for module, base in zip(modules, bases, strict=True):
                if module is not base:
                    self.loras[name].append((module, slice(start, start + base.out_features)))
                start += base.out_features

    def norm_weight(self, which: str) -> torch.Tensor:
        """The input or post-attention norm's weight as an fp32 contiguous tensor (made once)."""
        if which not in self._norm_weights:
            norm = self.input_norm if which == "input" else self.post_norm
            self._norm_weights[which] = norm.weight.detach().float().contiguous()
        return self._norm_weights[which]


class LlamaForward:
    def __init__(self, model: nn.Module):
        config, decoder = model.config, model.get_decoder()
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scale = getattr(decoder.layers[0].self_attn, "scaling", self.head_dim**-0.5)  # SDPA's default
        self.layers = [_Layer(layer) for layer in decoder.layers]
        self.norm, self.rotary = decoder.norm, decoder.rotary_emb
        self.rows = None  # a SAT adapter's SatRows (which rows of this forward are SATs), set by the engine
        self.sat_lora_int8 = True  # the int4 plan's LoRA as int8 codes (EngineConfig.sat_lora), set by the engine
        self._rope_f32: tuple[torch.Tensor, torch.Tensor] | None = None  # the fused forward's fp32 tables
        self._final: tuple[torch.Tensor, float] | None = None  # the final norm's fp32 weight and eps
        self._plan: tuple[tuple, Q4Plan | None] | None = None  # (the KV cache it was made for, the plan)

    def fused_projections(self):
        """The Int4Linear modules this forward made by fusing a layer's projections (qkv, gate_up)."""
        for layer in self.layers:
            for module in layer.projections.values():
                if isinstance(module, Int4Linear) and module._parts:
                    yield module

    @classmethod
    def maybe_build(cls, model: nn.Module) -> LlamaForward | None:
        """Llama-shaped models only (plain RoPE and RMSNorm, no biases, SiLU MLP); else None."""
        config = model.config
        if getattr(config, "model_type", None) not in ("llama",) or getattr(config, "hidden_act", "") != "silu":
            return None
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            return None
        forward = cls(model)
        if any(p is None for layer in forward.layers for p in layer.projections.values()):
            return None
        return forward

    def __call__(self, embeds: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None, cache,
                 attention: Attention | None = None) -> torch.Tensor:
        """embeds [R, T, H], position_ids [R, T] -> hidden [R, T, H]. Attention runs through `attention`
        (models/engine/kernels.py: each row on its own, width-invariant) when given, else through
        SDPA with `mask` [R, 1, T, L] (additive)."""
        if attention is not None:
            return self._fused(embeds, position_ids, cache, attention)
        R, T, hidden = embeds.shape
        cos, sin = self.rotary(embeds, position_ids)  # [R, T, D]
        cos, sin = cos[:, :, None], sin[:, :, None]  # broadcast over heads
        heads, kv_heads, D = self.heads, self.kv_heads, self.head_dim
        group, qk_width = heads // kv_heads, (heads + kv_heads) * D
        # Attention runs with each kv head's `group` query heads folded into the query length: [R, Hkv,
        # group*T, D]. Besides sparing the GQA repeat, it keeps the query length >= 2: CPU SDPA takes
        # another path for one query row, whose result differs in the last bits from the same row of a
        # wider call, enough to flip greedy tokens in bf16. Folded, a verify row equals ar's bit for bit.
        mask = mask.repeat(1, 1, group, 1)  # [R, 1, group*T, L], row g*T + t
        x = embeds.reshape(R * T, hidden)  # rows flat: every projection is one [R*T, in] matmul
        for i, layer in enumerate(self.layers):
            qkv = self._project(layer, "qkv", _rms_norm(layer.input_norm, x), False)  # [R*T, (Hq + 2 Hkv) D]
            qk = qkv[:, :qk_width].view(R, T, heads + kv_heads, D)
            qk = qk * cos + rotate_half(qk) * sin  # RoPE on q and k at once
            k = qk[:, :, heads:].transpose(1, 2)  # [R, Hkv, T, D]
            v = qkv[:, qk_width:].view(R, T, kv_heads, D).transpose(1, 2)
            keys, values = cache.update(k, v, i)  # [R, Hkv, L, D]
            q = qk[:, :, :heads].unflatten(2, (kv_heads, group)).permute(0, 2, 3, 1, 4).reshape(R, kv_heads, -1, D)
            attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # [R, Hkv, group*T, D]
            attn = attn.unflatten(2, (group, T)).permute(0, 3, 1, 2, 4).reshape(R * T, heads * D)
            x = x + self._project(layer, "o_proj", attn, False)
            gate_up = self._project(layer, "gate_up", _rms_norm(layer.post_norm, x), False)  # [R*T, 2I]
            gate, up = gate_up.chunk(2, dim=-1)
            x = x + self._project(layer, "down_proj", F.silu(gate) * up, False)
        return _rms_norm(self.norm, x).view(R, T, hidden)

    def _fused(self, embeds: torch.Tensor, position_ids: torch.Tensor, cache, attention: Attention) -> torch.Tensor:
        """The forward through models/engine/kernels.py: per layer its four projections (int4 through the
        Q4_1 x Q8_1 kernel, dense ones through the invariant kernel) and three calls to the C glue between
        them (residual add + RMSNorm, RoPE + KV write + attention, SiLU-gate) instead of some thirty small
        library ops. The residual stream is fp32 throughout; every row is computed on its own."""
        R, T, hidden = embeds.shape
        x = embeds.reshape(R * T, hidden).to(torch.float32, copy=True)  # the residual stream, updated in place
        positions = position_ids.reshape(-1).to(torch.int64).contiguous()
        rope = self._rope_fp32(int(positions.max()) + 1)
        sat_rows = self.rows.index if self.rows is not None else None
        plan = self._q4_plan(cache)  # int4: the same steps in one C call (SAT rows' LoRA included)
        if plan is not None and (sat_rows is None or plan.lora is not None):
            sat = None if sat_rows is None else sat_rows.to(torch.int64).contiguous()
            return attention.forward_q4(x, plan, rope, positions, sat).to(embeds.dtype).view(R, T, hidden)
        delta: torch.Tensor | None = None
        for i, layer in enumerate(self.layers):
            h = add_norm(x, delta, layer.norm_weight("input"), layer.eps, torch.float32)
            qkv = self._project(layer, "qkv", h, True)
            attn = attention.rope_attend(qkv, self.heads, self.kv_heads, rope, positions, cache.keys[i],
                                         cache.values[i], torch.float32)
            o = self._project(layer, "o_proj", attn, True)
            h = add_norm(x, o, layer.norm_weight("post"), layer.post_eps, torch.float32)
            gate_up = self._project(layer, "gate_up", h, True)
            delta = self._project(layer, "down_proj", silu_mul_cast(gate_up, torch.float32), True)
        final = self._final_norm()
        return add_norm(x, delta, final[0], final[1], embeds.dtype).view(R, T, hidden)

    def _q4_plan(self, cache) -> Q4Plan | None:
        """The whole-forward plan (kernels.c's sdsat_forward_q4) for a model whose projections are all
        Int4Linear with one RMSNorm epsilon, made once per KV cache; else None (the per-layer loop)."""
        key = (id(cache), cache.keys[0].data_ptr())  # the plan points at the adapter's own tensors: no copies
        if self._plan is None or self._plan[0] != key:
            plan = None
            loras = [lora for layer in self.layers for parts in layer.loras.values() for lora, _ in parts]
            mods = [[layer.projections[n] for n in PROJECTIONS] for layer in self.layers]
            eps = ({layer.eps for layer in self.layers}, {layer.post_eps for layer in self.layers})
            if all(type(m) is Int4Linear for row in mods for m in row) and all(len(e) == 1 for e in eps) \
                    and all(supports(t.dtype) for t in cache.keys + cache.values):
                rows = []
                for i, (layer, (qkv, o, gate_up, down)) in enumerate(zip(self.layers, mods, strict=True)):
                    rows.append([layer.norm_weight("input"), qkv.codes, qkv.d, qkv.m, o.codes, o.d, o.m,
                                 layer.norm_weight("post"), gate_up.codes, gate_up.d, gate_up.m,
                                 down.codes, down.d, down.m, cache.keys[i], cache.values[i]])
                first = mods[0][0]
                intermediate = mods[0][2].out_features // 2
                plan = Q4Plan(rows, (first.in_features, self.heads, self.kv_heads, self.head_dim, intermediate),
                              (*(e.pop() for e in eps), self._final_norm()[1]), self._final_norm()[0],
                              *self._lora_table(loras, intermediate), lora_int8=self.sat_lora_int8)
            self._plan = (key, plan)
        return self._plan[1]

    def _lora_table(self, loras: list, intermediate: int) -> tuple[list | None, int, float]:
        """The SAT adapter's LoRA for sdsat_forward_q4: per layer (A, B) of q, k, v, o, gate, up, down (None
        where not adapted), the adapter's own tensors (bf16 under int4: no copy), its rank and scale; (None, 0,
        0.0) without an adapter or for one this table cannot describe (SAT forwards then take the loop)."""
        if not loras or len({(m.lora_a.shape[0], m.scale, m.lora_a.dtype) for m in loras}) != 1 \
                or not supports(loras[0].lora_a.dtype):
            return None, 0, 0.0
        qkv_starts = (0, self.heads * self.head_dim, (self.heads + self.kv_heads) * self.head_dim)
        slots = {("qkv", start): i for i, start in enumerate(qkv_starts)}
        slots.update({("o_proj", 0): 3, ("gate_up", 0): 4, ("gate_up", intermediate): 5, ("down_proj", 0): 6})
        table = []
        for layer in self.layers:
            row: list[torch.Tensor | None] = [None] * 14
            for name, parts in layer.loras.items():
                for lora, cols in parts:
                    slot = slots.get((name, cols.start))
                    if slot is None:
                        return None, 0, 0.0
                    if not (lora.lora_a.is_contiguous() and lora.lora_b.is_contiguous()):
                        return None, 0, 0.0
                    row[2 * slot], row[2 * slot + 1] = lora.lora_a.detach(), lora.lora_b.detach()
            table.append(row)
        return table, loras[0].lora_a.shape[0], float(loras[0].scale)

    def _final_norm(self) -> tuple[torch.Tensor, float]:
        if self._final is None:
            self._final = (self.norm.weight.detach().float().contiguous(), _eps(self.norm))
        return self._final

    def _rope_fp32(self, needed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [P >= needed, D] fp32 contiguous tables for the fused forward."""
        if self._rope_f32 is None or self._rope_f32[0].shape[0] < needed:
            size = max(needed, 2 * (self._rope_f32[0].shape[0] if self._rope_f32 else 0), 1024)
            probe = torch.zeros(1, 1, 1, dtype=torch.float32, device=self.norm.weight.device)
            cos, sin = self.rotary(probe, torch.arange(size, device=probe.device)[None])  # [1, size, D]
            self._rope_f32 = (cos[0].float().contiguous(), sin[0].float().contiguous())
        return self._rope_f32

    def _project(self, layer: _Layer, name: str, h: torch.Tensor, invariant: bool) -> torch.Tensor:
        """h [N, in] -> [N, out] contiguous of one (fused) projection, plus the adapter's LoRA at SAT rows."""
        y = project(layer.projections[name], h, invariant)
        index = self.rows.index if self.rows is not None else None
        if index is not None and layer.loras[name]:
            h_sat = h[index]  # y[rows, cols] += s · B A h[rows] per adapted projection (models/weights/adapter.py)
            for lora, cols in layer.loras[name]:
                y[index, cols] += lora.delta(h_sat).to(y.dtype)
        return y.contiguous()


def project(module: nn.Module, x: torch.Tensor, invariant: bool) -> torch.Tensor:
    """x [N, in] -> [N, out]. Dense fp32/bf16 weights on the CPU go through the width-invariant kernel
    when `invariant`; int4 and Q8_0 modules run kernels.c's integer kernels (every row on its own, in one
    fixed order), whether invariant or not."""
    if invariant and type(module) is nn.Linear and module.bias is None and supports(module.weight.dtype) \
            and module.weight.is_contiguous():
        return linear(x, module.weight)
    if invariant and type(module) is Int4Linear:  # no module call on the hot path; fp32 rows in and out
        return q4_linear(x, module.codes, module.d, module.m, module.out_features)
    if invariant and type(module) is Int8Linear and x.device.type == "cpu" and x.dim() == 2:  # the LM head: as
        return q8_linear(x, module.codes, module.d, module.out_features).to(x.dtype)  # module(x) computes it
    return module(x)


def _eps(norm: nn.Module) -> float:
    return getattr(norm, "variance_epsilon", None) or norm.eps


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """transformers' LlamaRMSNorm (normalised in fp32, scaled in the input's dtype); one kernel in fp32."""
    eps = _eps(norm)
    if x.dtype == torch.float32:
        return F.rms_norm(x, x.shape[-1:], norm.weight, eps=eps)
    return norm.weight * F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)

