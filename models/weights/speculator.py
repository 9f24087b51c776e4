"""The combined token/embedding ("MLP") speculator (Wertheimer et al. 2024, arXiv 2404.19124).

A small recurrent MLP beside a frozen base model. From the base model's last hidden state s_0 (the
decoder output before the LM head) and the token t_0 the base model just produced, head i computes

    s_{i+1} = GELU(LN_i(state_weight * Proj_i(s_i) + emb_weight * Emb_i(t_i)));  logits_i = Head_i(s_{i+1})

and t_{i+1} is chosen from logits_i: head i drafts the token i+1 places after t_0, conditioned on the
tokens drafted before it. The speculator lives beside its base checkpoint as `<checkpoint>/speculator/`
(config.json + model.safetensors, parameter names as in IBM's and vLLM's `MLPSpeculator`), where
`Engine.from_pretrained` finds it. models/training/train_speculator.py trains it; the engine's `mlp` method drafts
with it.

    spec = MLPSpeculator(SpeculatorConfig(emb_dim=256, vocab_size=32000, n_predict=4))
    spec.save(ckpt / SPECULATOR_DIR); MLPSpeculator.maybe_load(ckpt)
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from models.errors import ConfigError

SPECULATOR_DIR = "speculator"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class SpeculatorConfig:
    emb_dim: int  # the base model's hidden size
    vocab_size: int  # the base model's vocabulary
    n_predict: int = 3  # heads: the most tokens drafted per iteration
    inner_dim: int = 0  # the speculator's state size; 0 = emb_dim
    tie_weights: bool = False  # one embedding, LN, head and (after the first) projection shared by all heads

    def __post_init__(self):
        if self.n_predict < 1 or self.emb_dim < 1 or self.vocab_size < 1 or self.inner_dim < 0:
            raise ConfigError(f"bad speculator config {self}: n_predict, emb_dim, vocab_size >= 1, inner_dim >= 0")

    @property
    def state_dim(self) -> int:
        return self.inner_dim or self.emb_dim


class ScaledNorm(nn.Module):
    """RMS normalisation with a learned scale and shift (the reference speculator's layer norm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight + self.bias


def _heads(make, n: int, tie: bool) -> nn.ModuleList:
    return nn.ModuleList([make()] * n if tie else [make() for _ in range(n)])


class MLPSpeculator(nn.Module):
    def __init__(self, config: SpeculatorConfig):
        super().__init__()
        self.config = config
        n, inner, tie = config.n_predict, config.state_dim, config.tie_weights
        self.emb = _heads(lambda: nn.Embedding(config.vocab_size, inner), n, tie)
        # the first projection reads the base model's state, whose size may differ: never tied
        self.proj = nn.ModuleList([nn.Linear(config.emb_dim, inner, bias=False),
                                   *_heads(lambda: nn.Linear(inner, inner, bias=False), n - 1, tie)])
        self.ln = _heads(lambda: ScaledNorm(inner), n, tie)
        self.head = _heads(lambda: nn.Linear(inner, config.vocab_size, bias=False), n, tie)
        self.activation = nn.GELU()
        # The paper's weighting: over the n_predict heads the base state's weight decays to sqrt(1/2);
        # the token embedding's grows with inner_dim, as its rows start with std 1/sqrt(inner_dim).
        self.state_weight = 0.5 ** (0.5 / n)
        self.emb_weight = math.sqrt((1 - self.state_weight**2) * inner / 2)
        for module in self.modules():
            if isinstance(module, nn.Embedding | nn.Linear):
                nn.init.normal_(module.weight, 0.0, 1 / math.sqrt(inner))

    @property
    def n_predict(self) -> int:
        return self.config.n_predict

    def step(self, i: int, state: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Head i: state [..., D_in] and the previous token [...] -> (next state [..., inner], logits [..., V])."""
        mixed = self.state_weight * self.proj[i](state) + self.emb_weight * self.emb[i](tokens)
        state = self.activation(self.ln[i](mixed))
        return state, self.head[i](state)

    def forward(self, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing. hidden: [B, N, emb_dim], the base state at positions 0..N-1; tokens:
        [B, N + n_predict - 1], tokens[:, p + i] is the token head i reads at position p (the token after
        position p + i). Returns logits [n_predict, B, N, V]; head i at p predicts the token after p + i + 1."""
        n_pos, state, out = hidden.shape[1], hidden, []
        for i in range(self.n_predict):
            state, logits = self.step(i, state, tokens[:, i : i + n_pos])
            out.append(logits)
        return torch.stack(out)

    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_model

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_FILE).write_text(json.dumps({"model_type": "mlp_speculator", **asdict(self.config)},
                                                   indent=2) + "\n")
        save_model(self, str(path / WEIGHTS_FILE))  # tied heads are stored once
        return path

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> MLPSpeculator:
        from safetensors.torch import load_model

        path = Path(directory)
        if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
            raise ConfigError(f"{path} holds no speculator ({CONFIG_FILE} + {WEIGHTS_FILE})")
        data = json.loads((path / CONFIG_FILE).read_text())
        data.pop("model_type", None)
        unknown = sorted(set(data) - {f.name for f in fields(SpeculatorConfig)})
        if unknown:
            raise ConfigError(f"{path / CONFIG_FILE}: unsupported speculator option(s) {', '.join(unknown)}")
        speculator = cls(SpeculatorConfig(**data))
        load_model(speculator, str(path / WEIGHTS_FILE))
        return speculator.to(device).eval()

    @classmethod
    def maybe_load(cls, checkpoint: str | Path, device: str | torch.device = "cpu") -> MLPSpeculator | None:
        """The speculator saved beside a base checkpoint, or None."""
        path = Path(checkpoint) / SPECULATOR_DIR
        return cls.load(path, device) if (path / CONFIG_FILE).is_file() else None
