"""A lean forward for Llama-family decoders, over the engine's slot KV cache.

transformers' `LlamaModel.forward` is written for every use (training, masks built from 2D
padding, hooks, output flags); on a CPU decoding one token, its ~25 small ops per layer and the
module calls around them cost as much as the weights' own reads. This forward does one layer in
four projections (q/k/v fused, gate/up fused), one RMSNorm call per norm, RoPE applied to q and k
together, and SDPA over the cache's rows with the engine's 4D mask, as gpt-fast does. It uses the
model's own modules and weights (its norms' weights, its rotary module, its projections: dense,
quantized (models/quant.py) or wrapped by a SAT adapter's LoRA), so it computes what the model
computes, and the transformers model stays whole for training and for other architectures.

    forward = LlamaForward.maybe_build(model)   # None for a model it does not cover
    hidden = forward(embeds, position_ids, mask, cache)   # [R, T, H] after the final norm
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

from models.quant import Int4Linear

FUSED = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}


def _unwrap(module: nn.Module) -> nn.Module:
    """The projection under a SAT adapter's RowMaskedLoRA (models/adapter.py), else the module."""
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
        attn, mlp = layer.self_attn, layer.mlp
        self.input_norm, self.post_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.qkv = fuse([_unwrap(getattr(attn, n)) for n in FUSED["qkv"]])
        self.o_proj, self.down_proj = attn.o_proj, mlp.down_proj
        self.gate_up = fuse([_unwrap(getattr(mlp, n)) for n in FUSED["gate_up"]])
        # a SAT adapter's LoRA on a fused projection: (the LoRA module, its columns of the fused output)
        self.loras: dict[str, list[tuple[nn.Module, slice]]] = {"qkv": [], "gate_up": []}
        for parent, fused in ((attn, "qkv"), (mlp, "gate_up")):
            start = 0
            for name in FUSED[fused]:
                module = getattr(parent, name)
                width = _unwrap(module).out_features
                if module is not _unwrap(module):
                    self.loras[fused].append((module, slice(start, start + width)))
                start += width


class LlamaForward:
    def __init__(self, model: nn.Module):
        config, decoder = model.config, model.get_decoder()
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.layers = [_Layer(layer) for layer in decoder.layers]
        self.norm, self.rotary = decoder.norm, decoder.rotary_emb
        self.rows = None  # a SAT adapter's SatRows (which rows of this forward are SATs), set by the engine

    @classmethod
    def maybe_build(cls, model: nn.Module) -> LlamaForward | None:
        """Llama-shaped models only (plain RoPE and RMSNorm, no biases, SiLU MLP); else None."""
        config = model.config
        if getattr(config, "model_type", None) not in ("llama",) or getattr(config, "hidden_act", "") != "silu":
            return None
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            return None
        forward = cls(model)
        if any(layer.qkv is None or layer.gate_up is None for layer in forward.layers):
            return None
        return forward

    def __call__(self, embeds: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor, cache) -> torch.Tensor:
        """embeds [R, T, H], position_ids [R, T], mask [R, 1, T, L] additive -> hidden [R, T, H]."""
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
            qkv = self._project(layer, "qkv", _rms_norm(layer.input_norm, x))  # [R*T, (Hq + 2 Hkv) D]
            qk = qkv[:, :qk_width].view(R, T, heads + kv_heads, D)
            qk = qk * cos + rotate_half(qk) * sin  # RoPE on q and k at once
            q = qk[:, :, :heads].unflatten(2, (kv_heads, group)).permute(0, 2, 3, 1, 4).reshape(R, kv_heads, -1, D)
            k = qk[:, :, heads:].transpose(1, 2)  # [R, Hkv, T, D]
            v = qkv[:, qk_width:].view(R, T, kv_heads, D).transpose(1, 2)
            keys, values = cache.update(k, v, i)  # [R, Hkv, L, D]
            attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # [R, Hkv, group*T, D]
            attn = attn.unflatten(2, (group, T)).permute(0, 3, 1, 2, 4).reshape(R * T, heads * D)
            x = x + layer.o_proj(attn)
            gate, up = self._project(layer, "gate_up", _rms_norm(layer.post_norm, x)).chunk(2, dim=-1)
            x = x + layer.down_proj(F.silu(gate) * up)
        return _rms_norm(self.norm, x).view(R, T, hidden)

    def _project(self, layer: _Layer, name: str, h: torch.Tensor) -> torch.Tensor:
        """h [N, in] -> [N, out] of a fused projection, plus the adapter's LoRA at SAT rows."""
        y = getattr(layer, name)(h)
        index = self.rows.index if self.rows is not None else None
        if index is None or not layer.loras[name]:
            return y
        h_sat = h[index]  # y[rows, cols] += s · B A h[rows] per adapted projection (models/adapter.py)
        for lora, cols in layer.loras[name]:
            y[index, cols] += lora.delta(h_sat).to(y.dtype)
        return y


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """transformers' LlamaRMSNorm (normalised in fp32, scaled in the input's dtype); one kernel in fp32."""
    eps = getattr(norm, "variance_epsilon", None) or norm.eps
    if x.dtype == torch.float32:
        return F.rms_norm(x, x.shape[-1:], norm.weight, eps=eps)
    return norm.weight * F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)

