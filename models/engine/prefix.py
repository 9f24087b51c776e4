"""Prompt-prefix KV reuse: the engine side (pure torch; stores live elsewhere, e.g. infra/prefix_cache.py).

Prompts are cut into fixed blocks of `block_size` tokens. A `PrefixStore` maps a prompt's leading
full blocks to their KV, `[layers, 2, kv_heads, block_size, head_dim]` per block; the engine asks
it for the longest cached prefix before prefill, copies those blocks into the sequence's cache row,
prefills only the rest, then offers the new full blocks back. A store may be slow or absent: a miss
is always fine, so every failure inside a store must be reported as a miss.
"""

from __future__ import annotations

from typing import Protocol

import torch

from models.engine.kv_cache import kv_dims


class PrefixStore(Protocol):
    block_size: int

    def lookup(self, prompt_ids: list[int], tenant: str) -> list[torch.Tensor]:
        """KV of the longest run of leading full blocks it holds for this tenant (possibly none)."""

    def offer(self, prompt_ids: list[int], blocks: list[torch.Tensor], start_block: int, tenant: str) -> None:
        """New full blocks `start_block..` of this prompt, to keep (asynchronously, if it likes)."""


def block_shape(config, block_size: int) -> tuple[int, ...]:
    """[layers, 2 (key, value), kv_heads, block_size, head_dim] of one block of a model's KV."""
    kv_heads, head_dim = kv_dims(config)
    return (config.num_hidden_layers, 2, kv_heads, block_size, head_dim)


def kv_dtype(cache) -> torch.dtype:
    """The dtype blocks are read and written in: the KV cache's own (bf16 under int4 or bf16 weights)."""
    return cache.keys[0].dtype


def read_blocks(cache, slot: int, start_block: int, end_block: int, block_size: int) -> list[torch.Tensor]:
    """Blocks [start_block, end_block) of a cache row as [layers, 2, kv_heads, block, head_dim] tensors."""
    out = []
    for b in range(start_block, end_block):
        cols = slice(b * block_size, (b + 1) * block_size)
        out.append(torch.stack([torch.stack([k[slot, :, cols], v[slot, :, cols]])
                                for k, v in zip(cache.keys, cache.values, strict=True)]).cpu())
    return out


def write_blocks(cache, slot: int, blocks: list[torch.Tensor], block_size: int) -> int:
    """Copy leading blocks into a cache row; returns the number of tokens now committed."""
    n = len(blocks) * block_size
    if blocks:
        kv = torch.cat(blocks, dim=3)  # one copy, then two per layer (not two per layer and block)
        for layer, (k, v) in enumerate(zip(cache.keys, cache.values, strict=True)):
            k[slot, :, :n] = kv[layer, 0].to(k.device, k.dtype)
            v[slot, :, :n] = kv[layer, 1].to(v.device, v.dtype)
    cache.commit(slot, n)
    return n
