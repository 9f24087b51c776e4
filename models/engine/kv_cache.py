"""A preallocated, slot-based KV cache that a transformers model writes through `update()`.

One cache serves the draft and the verify steps and every sequence of a replica: sequence `s`
owns row `slot` of every layer's `[slots, kv_heads, capacity, head_dim]` key/value buffers and
has `length[slot]` committed entries. A forward writes its new tokens right after the committed
ones (`write_at`), and keeping only an accepted prefix of them is a length change, never a copy
(as gpt-fast and the released SDSAT code do). Entries past `length` are stale and always masked.

Active sequences are kept in rows 0..n-1 (a leaving sequence's row is refilled by the last one),
so a forward over every active sequence reads the buffers as views, without a gather.
"""

from __future__ import annotations

import torch

# Forwards attend over a key length rounded up to this many columns (the extra ones are masked).
# CPU attention kernels reduce over the key length in vector lanes with a tail; a length that depends
# on the forward's width (ar: L + 1, a verify: L + k + 1) changes the tail and so the rounding of the
# visible keys' sum. At a multiple of 64 every width sees the same lanes: a verify row then equals the
# 1-token forward bit for bit (measured in bf16, where the difference otherwise flips greedy tokens).
KV_ALIGN = 64


def _aligned(n: int) -> int:
    return -(-n // KV_ALIGN) * KV_ALIGN


def kv_dims(config) -> tuple[int, int]:
    """(kv_heads, head_dim) of a transformers model config (GQA and explicit head_dim included)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return kv_heads, head_dim


class SlotKVCache:
    """Duck-types the part of `transformers.Cache` that attention layers call: `update()`."""

    def __init__(self, num_layers: int, slots: int, kv_heads: int, head_dim: int, capacity: int,
                 headroom: int, dtype: torch.dtype, device: torch.device | str, spare_rows: int = 0):
        # headroom: padded tokens of a batched forward are written past `capacity`, never out of bounds;
        # spare rows (after the `slots` rows) take the KV of a compiled forward's padding rows
        shape = (slots + spare_rows, kv_heads, _aligned(capacity + headroom), head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = torch.zeros(slots + spare_rows, dtype=torch.long)
        self.slots = slots  # rows that sequences own
        self.capacity = capacity
        self._rows: slice | torch.Tensor = slice(0, 0)
        self._write_rows: torch.Tensor | None = None
        self._write_cols: torch.Tensor | None = None
        self._kv_len = 0

    @classmethod
    def for_model(cls, config, slots: int, capacity: int, headroom: int, dtype, device, spare_rows: int = 0
                  ) -> SlotKVCache:
        kv_heads, head_dim = kv_dims(config)
        return cls(config.num_hidden_layers, slots, kv_heads, head_dim, capacity, headroom, dtype, device, spare_rows)

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def write_at(self, rows: list[int], width: int) -> tuple[torch.Tensor, int]:
        """Prepare a forward of `width` new tokens per row, written after each row's committed
        entries. Returns (`start` [R]: each row's first new column, `kv_len` the key length seen)."""
        if len(rows) == 1:  # one sequence (every single-stream step): the same result in fewer ops
            row = rows[0]
            start = self.length[row : row + 1].clone()
            first = int(start[0])
            self._kv_len = kv_len = _aligned(first + width)
            self._rows, self._write_rows, self._write_cols = slice(row, row + 1), None, slice(first, first + width)
            return start, kv_len
        idx = torch.tensor(rows, dtype=torch.long)
        start = self.length[idx]
        kv_len = _aligned(int(start.max()) + width)  # <= the buffers' columns
        contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
        self._rows = slice(rows[0], rows[0] + len(rows)) if contiguous else idx
        self._kv_len = kv_len
        if contiguous and bool((start == start[0]).all()):  # one block of the buffers: a plain copy
            first = int(start[0])
            self._write_rows, self._write_cols = None, slice(first, first + width)
        else:
            self._write_rows = idx[:, None].expand(-1, width)
            self._write_cols = start[:, None] + torch.arange(width)[None, :]
        return start, kv_len

    def write(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int) -> None:
        """Write [R, H, T, D] new keys/values at the prepared columns (attention that reads the buffers
        itself, models/engine/kernels.py, needs nothing more)."""
        k_buf, v_buf = self.keys[layer_idx], self.values[layer_idx]
        if self._write_rows is None:
            k_buf[self._rows, :, self._write_cols] = key_states
            v_buf[self._rows, :, self._write_cols] = value_states
        else:
            k_buf[self._write_rows, :, self._write_cols] = key_states.transpose(1, 2).to(k_buf.dtype)
            v_buf[self._write_rows, :, self._write_cols] = value_states.transpose(1, 2).to(v_buf.dtype)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """`write`, then the rows' [R, H, L, D] keys and values (a copy where the rows are not contiguous)."""
        self.write(key_states, value_states, layer_idx)
        k_buf, v_buf = self.keys[layer_idx], self.values[layer_idx]
        return k_buf[self._rows, :, : self._kv_len], v_buf[self._rows, :, : self._kv_len]

    def commit(self, row: int, new_length: int) -> None:
        """Keep the first `new_length` entries of a row (rollback of drafts and SAT entries)."""
        self.length[row] = new_length

    def move(self, src: int, dst: int) -> None:
        """Copy row `src` into row `dst` (used to keep active rows contiguous)."""
        n = int(self.length[src])
        for buf in self.keys + self.values:
            buf[dst, :, :n] = buf[src, :, :n]
        self.length[dst] = n
        self.length[src] = 0

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Make row `dst` start with the first n entries of row `src` (shared prompt prefix)."""
        for buf in self.keys + self.values:
            buf[dst, :, :n] = buf[src, :, :n]
        self.length[dst] = n

    def get_seq_length(self, layer_idx: int = 0) -> int:  # asked by some transformers code paths
        return self._kv_len
