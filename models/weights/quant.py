"""Weight-only quantization for CPU decoding, faithful to the base's own GGUF blocks.

The embedded base (models/weights/base_model.py) is a Q4_1 GGUF: every decoder projection was stored as
blocks of 32 weights `w = d·q + m` (q in 0..15, d and m fp16), and transformers' GGUF reader
dequantized them to fp32 exactly that way. `recover_q4_1` reads the blocks back out of the fp32
weights (m is the block's minimum, d its (max - min) / 15 rounded to fp16, q = (w - m) / d) and
checks that `d·q + m` gives every weight back bit for bit, so `dtype: int4` serves the GGUF's own
blocks (`Int4Linear`). The tied LM head is Q8_0 in the GGUF (int8 codes, an fp16 d per block of 32);
`Int8Linear` recovers those blocks the same way (exactly, for this GGUF). Input embeddings keep the
exact table.

Both run models/engine/kernels.c's integer kernels, llama.cpp's arithmetic for these formats: each
row's activations quantized per block of 32 to int8 (Q8_1), exact integer dot products (AVX-512 VNNI
where the CPU has it), the block scales applied in one fixed order. A row's result does not depend on
the other rows of the call, so speculative decoding under int4 stays token-identical to plain decoding
under int4. Without the kernels (no C compiler) they fall back to PyTorch's int4 kernel and a bf16 head.

    model = load_model(folder, dtype=torch.float32); report = quantize_model(model)
"""

from __future__ import annotations

import torch
from torch import nn

GROUP = 32  # Q4_1 block size; also a group size the int4 kernel supports


class Int4Linear(nn.Module):
    """y = x @ W^T with W held as the GGUF's Q4_1 blocks (w = d·q + m per block of 32; 4-bit codes, fp16 d
    and m); no bias.

    On the CPU it runs models/engine/kernels.c's `sdsat_q4_linear`, llama.cpp's own arithmetic for these
    blocks: each row's activations quantized per block to int8 (Q8_1), integer dot products (AVX-512
    VNNI where the CPU has it), then `(d·dx)·isum + m·sx` per block in one fixed order, so a row's result
    does not depend on the other rows of the call. The codes are kept in tiles of 16 outputs (the
    layout that kernel reads; see kernels.c). Where the kernels cannot be built it falls back to
    PyTorch's int4 CPU kernel on the same blocks (bf16 activations and scale/zero), packed on first use."""

    TILE = 16

    def __init__(self, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor, group: int = GROUP):
        """q: [N, K] int codes in 0..15; d, m: [N, K / group] (w = d·q + m), stored as fp16 (the GGUF's)."""
        super().__init__()
        if group != GROUP:
            raise ValueError(f"Q4_1 blocks are {GROUP} weights")
        self.out_features, self.in_features = q.shape
        self.group = group
        N, K, T = self.out_features, self.in_features, self.TILE
        pad = -N % T
        q = torch.cat([q.to(torch.uint8), q.new_zeros(pad, K, dtype=torch.uint8)])
        tiles = q.view(-1, T, K // GROUP, 2, 4, 4)  # [tile, n, block, half, g, j]: code 16·half + 4g + j
        packed = tiles[:, :, :, 0] | (tiles[:, :, :, 1] << 4)  # [tile, n, block, g, j]
        self.register_buffer("codes", packed.permute(0, 2, 3, 1, 4).contiguous())  # [tile, block, g, n, j]
        # d and m are kept as their fp16 bits in int16 tensors: `module.to(dtype)` (as an adapter's .to() reaches
        # the projections it wraps) converts floating-point buffers, and must not touch these
        self.register_buffer("d", _scale_tiles(d, T))
        self.register_buffer("m", _scale_tiles(m, T))
        self._aten: tuple[torch.Tensor, torch.Tensor] | None = None
        self._parts: list[tuple[Int4Linear, int, int]] = []  # cat(): (a part, its first tile, its tiles)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., K]
        from models.engine.kernels import kernel_unavailable, q4_linear

        flat = x.reshape(-1, self.in_features)
        if x.device.type == "cpu" and kernel_unavailable() is None:
            y = q4_linear(flat, self.codes, self.d, self.m, self.out_features)
        else:
            packed, scale_zero = self.aten_packing()
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.to(torch.bfloat16), packed, self.group, scale_zero)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def blocks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q [N, K] codes in 0..15, d and m [N, K / 32] fp32): the blocks back out of the tiles."""
        N, K = self.out_features, self.in_features
        c = self.codes.permute(0, 3, 1, 2, 4)  # [tile, n, block, g, j]
        q = torch.stack([c & 0xF, c >> 4], dim=3).reshape(-1, K)[:N]  # half, then g, then j: code 16·half + 4g + j
        return q, _scales(self.d, N), _scales(self.m, N)

    def aten_packing(self) -> tuple[torch.Tensor, torch.Tensor]:
        """PyTorch's int4 CPU packing of the same blocks (made once, when first needed): it computes
        x @ ((q - 8)·scale + zero), so scale = d and zero = m + 8d, both bf16."""
        if self._aten is None:
            q, d, m = self.blocks()
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
            sz = torch.stack([d, m + 8 * d], dim=-1).transpose(0, 1).contiguous()  # [K / group, N, 2]
            self._aten = (packed, sz.to(torch.bfloat16))
        return self._aten

    @classmethod
    def cat(cls, parts: list[Int4Linear]) -> Int4Linear | None:
        """One module for the concatenated outputs of `parts` (same input; each a whole number of tiles of
        16 outputs); the parts' codes and scales become views of the fused ones: no second copy."""
        if any(p.in_features != parts[0].in_features or p.out_features % cls.TILE for p in parts):
            return None
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.in_features, fused.group = parts[0].in_features, parts[0].group
        fused.out_features = sum(p.out_features for p in parts)
        for name in ("codes", "d", "m"):
            fused.register_buffer(name, torch.cat([getattr(p, name) for p in parts]))
        fused._aten, fused._parts = None, []
        start = 0
        for p in parts:
            tiles = p.out_features // cls.TILE
            fused._parts.append((p, start, tiles))
            start += tiles
        fused._point_parts()
        return fused

    def _point_parts(self) -> None:
        for p, start, tiles in self._parts:
            for name in ("codes", "d", "m"):
                setattr(p, name, getattr(self, name)[start : start + tiles])
            p._aten = None

    def quantized_tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.d, self.m]

    def relocate(self, take) -> None:
        """Move the codes and scales to `take(tensor)`'s copies (models/engine/memory.py); the parts of a
        fused module follow as views."""
        for name in ("codes", "d", "m"):
            setattr(self, name, take(getattr(self, name)))
        self._aten = None  # a fallback packing made from the old tensors: made again if needed
        self._point_parts()

    def dequantized(self) -> torch.Tensor:
        """The [N, K] fp32 weights d·q + m of the blocks (for tests and reports)."""
        q, d, m = self.blocks()
        blocks = q.float().reshape(self.out_features, -1, GROUP)
        return (d[..., None] * blocks + m[..., None]).reshape(self.out_features, self.in_features)


def _scale_tiles(scales: torch.Tensor, tile: int) -> torch.Tensor:
    """Per-block scales [N, K/32] -> the kernels' layout [ceil(N / tile), K/32, tile], rounded to fp16 and
    kept as its bits in int16 (rows past N are 0)."""
    padded = torch.cat([scales.float(), scales.new_zeros(-scales.shape[0] % tile, scales.shape[1],
                                                         dtype=torch.float32)])
    return padded.view(-1, tile, scales.shape[1]).transpose(1, 2).to(torch.float16).contiguous().view(torch.int16)


def _scales(tiles: torch.Tensor, n: int) -> torch.Tensor:
    """_scale_tiles' inverse: [n, K/32] fp32."""
    return tiles.view(torch.float16).transpose(1, 2).reshape(-1, tiles.shape[1])[:n].float()


class Int8Linear(nn.Module):
    """y = x @ W^T with W as Q8_0 blocks, the GGUF's own format for the LM head: per block of 32 weights,
    int8 codes and an fp16 d (w = d·q); no bias.

    On the CPU it runs models/engine/kernels.c's `sdsat_q8_linear` (llama.cpp's arithmetic: the rows'
    activations quantized per block to int8, integer dot products, then d·dx per block in one fixed
    order; batch-invariant). Codes are kept plus 128, in tiles of 16 outputs (the kernel's layout).
    Without the kernels: the dequantized weights in bf16 through F.linear (made on first use)."""

    TILE = 16

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = N, K = weight.shape
        if K % GROUP:
            raise ValueError(f"Q8_0 needs an input size that is a multiple of {GROUP}")
        w = weight.detach().float().reshape(N, K // GROUP, GROUP)
        d = (w.abs().amax(-1) / 127).half().float()  # [N, K/32]; a Q8_0 block's largest code is +-127
        q = torch.where(d[..., None] > 0, w / d[..., None].clamp(min=torch.finfo(torch.float16).tiny), 0.0)
        q = q.round().clamp(-127, 127)
        self.exact_block_fraction = ((d[..., None] * q) == w).all(-1).float().mean().item()
        pad = -N % self.TILE
        q = torch.cat([q.to(torch.int16), q.new_zeros(pad, K // GROUP, GROUP, dtype=torch.int16)])
        tiles = (q + 128).to(torch.uint8).view(-1, self.TILE, K // GROUP, 8, 4)  # [tile, n, block, g, j]
        self.register_buffer("codes", tiles.permute(0, 2, 3, 1, 4).contiguous())  # [tile, block, g, n, j]
        self.register_buffer("d", _scale_tiles(d, self.TILE))
        self._dense: torch.Tensor | None = None

    def quantized_tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.d]

    def relocate(self, take) -> None:
        """Move the codes and scales to `take(tensor)`'s copies (models/engine/memory.py)."""
        self.codes, self.d = take(self.codes), take(self.d)
        self._dense = None  # a fallback copy made from the old tensors: made again if needed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from models.engine.kernels import kernel_unavailable, q8_linear

        flat = x.reshape(-1, self.in_features)
        if x.device.type == "cpu" and kernel_unavailable() is None:
            y = q8_linear(flat, self.codes, self.d, self.out_features).to(x.dtype)
        else:
            if self._dense is None:
                self._dense = self.dequantized().to(torch.bfloat16)
            y = torch.nn.functional.linear(flat.to(torch.bfloat16), self._dense.to(flat.device)).to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The [N, K] fp32 weights d·q of the blocks."""
        N, K = self.out_features, self.in_features
        q = self.codes.permute(0, 3, 1, 2, 4).reshape(-1, K // GROUP, GROUP)[:N].float() - 128
        return (_scales(self.d, N)[..., None] * q).reshape(N, K)


def recover_q4_1(w: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Q4_1 blocks of fp32 weights w [N, K]: (q [N, K], d [N, K/group], m [N, K/group], the fraction of
    blocks whose `d·q + m` equals w exactly). A block that does not come back exactly (weights that
    were never Q4_1) still gets the nearest asymmetric 4-bit code."""
    N, K = w.shape
    blocks = w.float().reshape(N, K // group, group)
    m = blocks.amin(-1).half().float()  # m and d were stored in fp16 (a Q4_1 block's minimum is its m)
    d = ((blocks.amax(-1) - m) / 15).half().float()
    safe = torch.where(d > 0, d, torch.ones_like(d))
    q = ((blocks - m[..., None]) / safe[..., None]).round().clamp(0, 15)
    exact = ((d[..., None] * q + m[..., None]) == blocks).all(-1)
    return q.reshape(N, K).to(torch.int32), d, m, exact.float().mean().item()


def _int4_from_linear(linear: nn.Linear) -> tuple[Int4Linear, float, float]:
    """(module, exact-block fraction, largest weight change from rounding scale/zero to bf16)."""
    if linear.bias is not None or linear.in_features % GROUP:
        raise ValueError("int4 needs bias-free projections whose input size is a multiple of 32")
    w = linear.weight.detach().float()
    q, d, m, exact = recover_q4_1(w)
    module = Int4Linear(q, d, m)
    change = (module.dequantized() - w).abs().max().item()
    return module, exact, change


def quantize_model(model, scheme: str = "int4") -> dict:
    """Replace the decoder's projections (int4) and the LM head (int8) in place; everything else
    becomes bf16, the kernels' activation dtype. `model` must be loaded in fp32 (the exact GGUF
    values); an attached SAT adapter's LoRA wrappers keep working (their base is swapped).
    Returns a report: exact Q4_1 blocks, the largest weight change of each part, bytes held."""
    if scheme != "int4":
        raise ValueError(f"unknown quantization scheme {scheme!r} (int4)")
    if next(model.parameters()).dtype != torch.float32:
        raise ValueError("quantize_model needs the fp32 model (the exact dequantized GGUF values)")
    exact, changes = [], []
    for layer in model.get_decoder().layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    module, block_exact, change = _int4_from_linear(child)
                    setattr(parent, name, module)
                    exact.append(block_exact)
                    changes.append(change)
    head = model.get_output_embeddings()
    head_weight = head.weight.detach()
    embed = model.get_input_embeddings()
    if embed.weight is head.weight:  # tied: the input side keeps its own exact table
        embed.weight = nn.Parameter(head_weight.clone(), requires_grad=False)
    int8_head = Int8Linear(head_weight)
    head_change = (int8_head.dequantized() - head_weight.float()).abs().max().item()  # 0 for the GGUF's Q8_0
    model.config.tie_word_embeddings = False
    model.set_output_embeddings(int8_head)
    for p in model.parameters():  # norms, embeddings, LoRA tensors. Buffers keep their dtypes: RoPE's
        p.data = p.data.to(torch.bfloat16)  # inv_freq stays fp32, as transformers keeps it under bf16
    return {
        "scheme": "int4 projections (the GGUF's Q4_1 blocks of 32, fp16 d and m; activations quantized "
                  "per block to int8 as llama.cpp's Q8_1), LM head as the GGUF's Q8_0 blocks (same activations)",
        "projections": len(exact),
        "q4_1_exact_block_fraction": round(sum(exact) / len(exact), 6),
        "max_projection_weight_change": max(changes),
        "max_lm_head_weight_change": head_change,
        "q8_0_exact_block_fraction": round(int8_head.exact_block_fraction, 6),
        "decode_bytes": decode_bytes(model),
    }


def decode_tensors(model) -> list[tuple[str, torch.Tensor]]:
    """What a single-stream decode step reads: every projection and the LM head (parameters and
    quantized buffers, with their scales), each once; the input embedding table only where it is the
    LM head too (a step reads one row of it otherwise). Norm weights and the like are left out, and
    a SAT adapter's LoRA tensors (models/weights/adapter.py), which only SAT rows read."""
    embed = model.get_input_embeddings().weight
    tied = getattr(model.get_output_embeddings(), "weight", None) is embed
    seen, out = set(), []
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if id(t) in seen or (t is embed and not tied) or (t.dim() < 2 and t.numel() <= 4096) or ".lora_" in name:
            continue
        seen.add(id(t))
        out.append((name, t))
    return out


def decode_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for _, t in decode_tensors(model))


def decode_weights(model) -> int:
    """The number of weights behind `decode_tensors`: a quantized projection's in x out (its codes, tiles'
    padding and scales are not weights), every other tensor's elements."""
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, (Int4Linear, Int8Linear))}
    count = 0
    for name, t in decode_tensors(model):
        owner, _, leaf = name.rpartition(".")
        if owner in quantized:
            module = quantized[owner]
            count += module.in_features * module.out_features if leaf == "codes" else 0
        else:
            count += t.numel()
    return count
