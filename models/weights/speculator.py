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
VOCAB_FILE = "vocab.safetensors"  # base_tied: the draft vocabulary's token ids


@dataclass(frozen=True)
class SpeculatorConfig:
    emb_dim: int  # the base model's hidden size
    vocab_size: int  # the base model's vocabulary
    n_predict: int = 3  # heads: the most tokens drafted per iteration
    inner_dim: int = 0  # the speculator's state size; 0 = emb_dim
    tie_weights: bool = False  # one embedding, LN, head and (after the first) projection shared by all heads
    # base_tied: the base's own frozen token embedding and tied LM head stand in for every head's embedding
    # and output matrix (each V x inner, 28M parameters a head on SmolLM2); the speculator learns only square
    # maps into and out of them, so its file stays a few MB. Needs attach_base() before use.
    base_tied: bool = False
    draft_vocab: int = 0  # base_tied: heads score only these many tokens (the most frequent; 0 = all)

    def __post_init__(self):
        if self.n_predict < 1 or self.emb_dim < 1 or self.vocab_size < 1 or self.inner_dim < 0:
            raise ConfigError(f"bad speculator config {self}: n_predict, emb_dim, vocab_size >= 1, inner_dim >= 0")
        if not 0 <= self.draft_vocab <= self.vocab_size or (self.draft_vocab and not self.base_tied):
            raise ConfigError(f"bad speculator config {self}: draft_vocab in [0, vocab_size], with base_tied only")

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
        n, inner, tie, dim = config.n_predict, config.state_dim, config.tie_weights, config.emb_dim
        if config.base_tied:  # square maps around the base's frozen tables (attach_base)
            self.emb = _heads(lambda: nn.Linear(dim, inner, bias=False), n, tie)
            self.head = _heads(lambda: nn.Linear(inner, dim, bias=False), n, tie)
        else:
            self.emb = _heads(lambda: nn.Embedding(config.vocab_size, inner), n, tie)
            self.head = _heads(lambda: nn.Linear(inner, config.vocab_size, bias=False), n, tie)
        # the first projection reads the base model's state, whose size may differ: never tied
        self.proj = nn.ModuleList([nn.Linear(dim, inner, bias=False),
                                   *_heads(lambda: nn.Linear(inner, inner, bias=False), n - 1, tie)])
        self.ln = _heads(lambda: ScaledNorm(inner), n, tie)
        # base_tied: the draft vocabulary (saved) and the base's tables (attached, never saved)
        self.register_buffer("vocab_ids", torch.arange(config.draft_vocab or config.vocab_size), persistent=False)
        self.base_embedding: torch.Tensor | None = None  # [V, emb_dim]
        self.base_head: torch.Tensor | None = None  # [draft_vocab, emb_dim]: the LM head's rows of vocab_ids
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

    def set_vocab(self, vocab_ids: torch.Tensor) -> None:
        """base_tied: the draft vocabulary, [draft_vocab] token ids (training picks the most frequent)."""
        if vocab_ids.shape != self.vocab_ids.shape:
            raise ConfigError(f"draft vocabulary of {vocab_ids.numel()} ids; the config says {self.vocab_ids.numel()}")
        self.vocab_ids = vocab_ids.to(self.vocab_ids.device, torch.long)

    def attach_base(self, embedding: torch.Tensor, lm_head: torch.Tensor | None = None) -> MLPSpeculator:
        """base_tied: the frozen base's token embedding [V, emb_dim] and LM head weight (default: the
        embedding, as in tied models). Only the draft vocabulary's head rows are kept."""
        if self.config.base_tied:
            head = embedding if lm_head is None else lm_head
            dtype = next(self.parameters()).dtype
            self.base_embedding = embedding.detach()
            self.base_head = head.detach()[self.vocab_ids.to(head.device)].to(dtype)
        return self

    def quantize_head(self) -> MLPSpeculator:
        """int4 engines: the draft head's rows as int8 with one scale per row, the served LM head's own scheme and
        kernel (a quarter of the bf16 rows' bytes). Not a submodule: never saved, and .to() leaves it alone."""
        from models.weights.quant import Int8Linear

        if self.base_head is None:
            raise ConfigError("quantize_head() needs attach_base() first")
        object.__setattr__(self, "int8_head", Int8Linear(self.base_head.float()))
        return self

    def _apply(self, fn, recurse=True):  # .to(): the attached tables follow the speculator's device and dtype
        super()._apply(fn, recurse)
        if self.base_head is not None:
            self.base_head = fn(self.base_head)
            self.base_embedding = self.base_embedding.to(self.base_head.device)
        return self

    # `linear(module, x)` runs the speculator's own nn.Linear layers: module(x) by default; the engine passes its
    # kernels (models/engine/llama.py's project), which are several times faster for one row on a CPU.
    def embed(self, i: int, tokens: torch.Tensor, linear=None) -> torch.Tensor:
        if not self.config.base_tied:
            return self.emb[i](tokens)
        if self.base_embedding is None:
            raise ConfigError("a base_tied speculator needs attach_base(embedding) before use")
        x = self.base_embedding[tokens].to(self.emb[i].weight.dtype)
        return linear(self.emb[i], x) if linear else self.emb[i](x)

    def logits(self, i: int, state: torch.Tensor, linear=None) -> torch.Tensor:
        """Head i's scores: [..., V], or [..., draft_vocab] over vocab_ids when base_tied."""
        if not self.config.base_tied:
            return self.head[i](state)
        out = linear(self.head[i], state) if linear else self.head[i](state)
        if self.__dict__.get("int8_head") is not None:
            return self.int8_head(out).to(state.dtype)
        return out @ self.base_head.T

    def to_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary scores [..., draft_vocab] -> [..., V], -inf elsewhere (unchanged when all are scored)."""
        if logits.shape[-1] == self.config.vocab_size:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.config.vocab_size), float("-inf"))
        return full.scatter_(-1, self.vocab_ids.to(logits.device).expand_as(logits), logits)

    def advance(self, i: int, state: torch.Tensor, tokens: torch.Tensor, linear=None) -> torch.Tensor:
        """Head i's state: state [..., D_in] and the previous token [...] -> [..., inner]."""
        projected = linear(self.proj[i], state) if linear else self.proj[i](state)
        mixed = self.state_weight * projected + self.emb_weight * self.embed(i, tokens, linear)
        return self.activation(self.ln[i](mixed))

    def step(self, i: int, state: torch.Tensor, tokens: torch.Tensor,
             linear=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Head i: state [..., D_in] and the previous token [...] -> (next state [..., inner], logits). Logits
        are [..., V]; with base_tied they cover vocab_ids only ([..., draft_vocab])."""
        state = self.advance(i, state, tokens, linear)
        return state, self.logits(i, state, linear)

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
        # tied heads are stored once; the draft vocabulary travels as a tensor, the base's tables never do
        from safetensors.torch import save_file

        save_model(self, str(path / WEIGHTS_FILE))
        if self.config.base_tied:
            save_file({"vocab_ids": self.vocab_ids.cpu().contiguous()}, str(path / VOCAB_FILE))
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
        if speculator.config.base_tied:
            from safetensors.torch import load_file

            if not (path / VOCAB_FILE).is_file():
                raise ConfigError(f"{path} holds a base_tied speculator without its {VOCAB_FILE}")
            speculator.set_vocab(load_file(str(path / VOCAB_FILE))["vocab_ids"])
        return speculator.to(device).eval()

    @classmethod
    def maybe_load(cls, checkpoint: str | Path, device: str | torch.device = "cpu") -> MLPSpeculator | None:
        """The speculator saved beside a base checkpoint, or None."""
        path = Path(checkpoint) / SPECULATOR_DIR
        return cls.load(path, device) if (path / CONFIG_FILE).is_file() else None
