"""Loading and saving SDSAT checkpoints in Hugging Face format.

A checkpoint directory holds what `save_pretrained` writes for the model and the tokenizer, plus
`sdsat.json` (SAT ids, k_train), for trained models `train_config.yaml`, and optionally an MLP
speculator in `speculator/` (models/speculator.py). Loading never touches a model hub: directories
are local, and `HF_HUB_OFFLINE=1` is set before transformers loads.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from models.sat import SatSpec

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TRAINER_STATE = "trainer_state.pt"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_tokenizer(directory: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def load_model(directory: str | Path, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu"):
    """A causal LM from a local directory (weights stored in 16 bits are upcast to `dtype`)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(directory), local_files_only=True, dtype=dtype, attn_implementation=attn_implementation
    )
    return model.to(device).eval()


def new_model(config, attn_implementation: str = "sdpa", seed: int = 0):
    """A randomly initialised causal LM from a config (seeded)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config._attn_implementation = attn_implementation
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)


def save_checkpoint(directory: str | Path, model, tokenizer, sat: SatSpec | None,
                    files: dict[str, str] | None = None, dtype: torch.dtype | None = None,
                    trainer_state: dict | None = None, state_dict: dict | None = None) -> Path:
    """Write a complete checkpoint atomically: into a temporary sibling, then rename over the target.
    `state_dict` replaces the model's own weights (a sharded model passes its gathered full state)."""
    to_save = model
    if state_dict is not None:
        if dtype is not None:
            state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    elif dtype is not None and dtype != next(model.parameters()).dtype:
        import copy

        to_save = copy.deepcopy(model).to(dtype)
    with replacing(directory) as tmp:
        to_save.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        if sat is not None:
            sat.save(tmp)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)
    return Path(directory)


@contextmanager
def replacing(directory: str | Path) -> Iterator[Path]:
    """Write a directory atomically: fill the yielded temporary sibling; on success it replaces `directory`."""
    target = Path(directory)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    if target.exists():
        old = target.with_name(target.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old)
    else:
        tmp.rename(target)
