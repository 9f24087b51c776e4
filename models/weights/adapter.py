"""The SAT adapter: SDSAT on a frozen base, lossless by construction.

The base model is never changed. The adapter adds
- one trainable embedding per SAT slot, addressed by virtual ids `V, V+1, ...` past the base's
  vocabulary V (so the base's embedding matrix and its tied LM head keep their V rows, and a SAT
  id can never be sampled as output), and
- a low-rank update (LoRA) on the chosen projections of every decoder layer that applies **only at
  SAT rows**: `y = W x`, then `y[sat_rows] += s · B A x[sat_rows]`. Rows of standard tokens never
  touch the adapter's tensors, so their hidden states, logits and KV entries are the base's bit for
  bit, and one forward can carry standard rows and SAT rows together (the fused iteration).

This follows BiTA (Lin et al. 2024, arXiv 2401.12522: a frozen model with trained prompt/mask
tokens) with SDSAT's layout (models/training/data/layout.py). Files, beside `sdsat.json` in a checkpoint folder:
`adapter.json` (config + the base's name and the sha256 of its weights) and `adapter.safetensors`.

    adapter = SatAdapter.create(model, AdapterConfig(...)); adapter.attach(model)
    embeds = adapter.embed(model, ids)   # [B, T, H]; also marks this forward's SAT rows
    model.model(inputs_embeds=embeds, ...); adapter.clear()
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from models.errors import ConfigError

ADAPTER_CONFIG = "adapter.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class AdapterConfig:
    base_name: str
    base_sha256: str  # of the base's weights file: an adapter is only valid on the base it was trained on
    vocab_size: int  # the base's V: SAT ids are V .. V + num_sat - 1
    num_sat: int  # distinct SAT embeddings (slot i uses id V + min(i, num_sat - 1))
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = LLAMA_TARGETS
    base_dir: str = ""  # a base other than the installable one: its folder (the installable one is found by name)

    @property
    def sat_ids(self) -> tuple[int, ...]:
        return tuple(range(self.vocab_size, self.vocab_size + self.num_sat))

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "targets": list(self.targets)}, indent=2) + "\n"

    @classmethod
    def load(cls, directory: str | Path) -> AdapterConfig:
        data = json.loads((Path(directory) / ADAPTER_CONFIG).read_text())
        return cls(**{**data, "targets": tuple(data["targets"])})


class SatRows:
    """The flat row indices ([N] long) of the current forward's SAT tokens, shared by every LoRA layer."""

    def __init__(self):
        self.index: torch.Tensor | None = None


class RowMaskedLoRA(nn.Module):
    """`base(x)`, plus a low-rank update on the rows listed in `rows.index` only."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, rows: SatRows, dtype: torch.dtype):
        super().__init__()
        self.base, self.rows, self.scale = base, rows, alpha / rank
        device = base.weight.device
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=dtype, device=device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as LoRA: B = 0, so training starts at the base

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in]
        y = self.base(x)
        index = self.rows.index
        if index is None or index.numel() == 0:
            return y
        delta = self.delta(x.reshape(-1, x.shape[-1])[index])  # [N, out]
        return y.reshape(-1, y.shape[-1]).index_add(0, index, delta.to(y.dtype)).reshape(y.shape)

    def delta(self, x_sat: torch.Tensor) -> torch.Tensor:
        """s · B A x for SAT rows x_sat [N, in] -> [N, out] (in x_sat's dtype)."""
        return (x_sat @ self.lora_a.t().to(x_sat.dtype)) @ self.lora_b.t().to(x_sat.dtype) * self.scale


class SatAdapter(nn.Module):
    def __init__(self, config: AdapterConfig, hidden_size: int, num_layers: int, dtype=torch.float32,
                 device="cpu"):
        super().__init__()
        self.config = config
        self.sat_embeddings = nn.Parameter(torch.zeros(config.num_sat, hidden_size, dtype=dtype, device=device))
        self.dtype = dtype
        self.rows = SatRows()
        self.layers = nn.ModuleList(nn.ModuleDict() for _ in range(num_layers))
        self._attached = False

    @classmethod
    def create(cls, model, config: AdapterConfig, dtype: torch.dtype = torch.float32) -> SatAdapter:
        """A fresh adapter for `model`: SAT embeddings start at the mean token embedding. Its own
        tensors are kept in `dtype` (fp32 master weights for training under a bf16 base)."""
        embed = model.get_input_embeddings().weight
        adapter = cls(config, embed.shape[1], model.config.num_hidden_layers, dtype, embed.device)
        with torch.no_grad():
            adapter.sat_embeddings.copy_(embed.float().mean(0, keepdim=True).expand_as(adapter.sat_embeddings))
        adapter._wrap(model)
        return adapter

    def _wrap(self, model) -> None:
        """Put a RowMaskedLoRA around each target projection of every decoder layer."""
        for layer, slots in zip(model.get_decoder().layers, self.layers, strict=True):
            for parent in (layer.self_attn, layer.mlp):
                for name in self.config.targets:
                    base = getattr(parent, name, None)
                    if isinstance(base, RowMaskedLoRA):
                        raise ConfigError("an adapter is already attached to this model")
                    if isinstance(base, nn.Linear):
                        lora = RowMaskedLoRA(base, self.config.rank, self.config.alpha, self.rows, self.dtype)
                        setattr(parent, name, lora)
                        slots[name] = lora
        if not any(len(s) for s in self.layers):
            raise ConfigError(f"none of the target modules {self.config.targets} found in the model")
        self._attached = True

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The trained tensors only (the base's weights are not part of the adapter)."""
        return {k: v for k, v in self.state_dict().items() if k == "sat_embeddings" or ".lora_" in k}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if n == "sat_embeddings" or ".lora_" in n]

    # ---- one forward ----------------------------------------------------------------------------
    def embed(self, model, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of `ids` [B, T] (SAT ids from the adapter) and mark this forward's SAT rows."""
        V = self.config.vocab_size
        sat = ids >= V
        embeds = model.get_input_embeddings()(ids.clamp(max=V - 1))  # [B, T, H]
        index = sat.reshape(-1).nonzero().squeeze(1)
        self.rows.index = index if index.numel() else None
        if index.numel():
            flat = embeds.reshape(-1, embeds.shape[-1])
            flat = flat.index_copy(0, index, self.sat_embeddings[ids.reshape(-1)[index] - V].to(flat.dtype))
            embeds = flat.reshape(embeds.shape)
        return embeds

    def clear(self) -> None:
        self.rows.index = None

    # ---- files ----------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        (directory / ADAPTER_CONFIG).write_text(self.config.to_json())
        save_file({k: v.detach().contiguous() for k, v in self.adapter_state().items()},
                  str(directory / ADAPTER_WEIGHTS))

    @classmethod
    def load(cls, directory: str | Path, model, base_sha256: str | None = None) -> SatAdapter:
        """Attach the adapter saved in `directory` to `model` (checked against the base's hash)."""
        from safetensors.torch import load_file

        config = AdapterConfig.load(directory)
        if base_sha256 is not None and base_sha256 != config.base_sha256:
            raise ConfigError(f"{directory}: the adapter was trained on base weights {config.base_sha256[:12]}..., "
                              f"this base is {base_sha256[:12]}...")
        embed = model.get_input_embeddings().weight
        adapter = cls(config, embed.shape[1], model.config.num_hidden_layers, embed.dtype, embed.device)
        adapter._wrap(model)
        state = load_file(str(Path(directory) / ADAPTER_WEIGHTS))
        missing = set(adapter.adapter_state()) - set(state)
        if missing:
            raise ConfigError(f"{directory}: adapter weights lack {sorted(missing)[:3]}...")
        adapter.load_state_dict(state, strict=False)  # cast to the base's dtype by load_state_dict
        return adapter.to(embed.device)


def base_weights_sha256(directory: str | Path) -> str:
    """The identity of a base's weights: for a folder converted from a GGUF (models/weights/base_model.py) the
    GGUF's sha256, recorded at conversion; else the sha256 over the folder's safetensors files."""
    source = Path(directory) / "source.json"
    if source.is_file():
        return json.loads(source.read_text())["gguf_sha256"]
    digest = hashlib.sha256()
    for path in sorted(Path(directory).glob("*.safetensors")):
        digest.update(path.name.encode())
        with path.open("rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
    return digest.hexdigest()


def is_adapter_dir(directory: str | Path) -> bool:
    return (Path(directory) / ADAPTER_CONFIG).is_file()
