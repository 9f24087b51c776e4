"""The Python standard library's own `.py` sources as a code corpus, with a reproducible split.

Every CPython install carries a few megabytes of well-written Python, so the tiny models trained
here need no download. `stdlib_files` lists the sources (tests left out by default: they are
repetitive and some are deliberately broken), `split_files` holds out a fixed fraction by hashing
each file's relative path, and `corpus_manifest` records what was used (Python version, counts,
bytes, tokens and a hash of each file list) so that a checkpoint says exactly which data it saw.

    root = stdlib_root(); train, heldout = split_files(stdlib_files(), root)
    manifest = corpus_manifest(train, heldout, root, tokenizer=tok)
"""

from __future__ import annotations

import hashlib
import os
import platform
import sysconfig
from collections.abc import Sequence
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from models.errors import ConfigError
from models.weights.tokenizer import encode_texts

MAX_FILE_BYTES = 1_000_000  # a few generated tables are huge and would dominate a tiny corpus
ALWAYS_EXCLUDED_DIRS = frozenset({"site-packages", "__pycache__"})
# `idle_test` covers idlelib/idle_test; `test`/`tests` cover test/, lib2to3/tests, ctypes/test, etc.
TEST_DIRS = frozenset({"test", "tests", "idle_test"})
TOKEN_COUNT_BATCH = 256  # files per encode call: keeps the Rust threads busy, bounds memory


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def read_text(path: Path) -> str:
    """The file's exact text: bytes decoded as UTF-8, line endings untouched."""
    return Path(path).read_bytes().decode("utf-8")


def stdlib_files(include_tests: bool = False) -> list[Path]:
    """All usable `.py` files under the stdlib root, sorted by path relative to it."""
    root = stdlib_root()
    excluded = ALWAYS_EXCLUDED_DIRS if include_tests else ALWAYS_EXCLUDED_DIRS | TEST_DIRS
    found = []
    for directory, subdirs, names in os.walk(root):
        # Pruning in place stops os.walk from descending into excluded trees at all.
        subdirs[:] = [name for name in subdirs if name not in excluded]
        for name in names:
            if not name.endswith(".py") or (not include_tests and name.startswith("test_")):
                continue
            path = Path(directory) / name
            if _is_usable(path):
                found.append(path)
    return sorted(found, key=lambda path: _relative(path, root))


def _is_usable(path: Path) -> bool:
    if path.stat().st_size > MAX_FILE_BYTES:
        return False
    try:
        read_text(path)
    except UnicodeDecodeError:
        return False
    return True


def _relative(path: Path, root: Path) -> str:
    return Path(path).relative_to(root).as_posix()


def split_files(
    files: Sequence[Path], root: Path, heldout_fraction: float = 0.02, seed: int = 0
) -> tuple[list[Path], list[Path]]:
    """Split by file into (train, heldout), both sorted by relative path.

    A file's side depends only on (seed, its relative path), so adding or reordering files never
    moves another file across the split. With >= 2 files the held-out side is never empty: if no
    hash falls under the fraction, the file with the lowest hash is held out.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ConfigError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    ordered = sorted(files, key=lambda path: _relative(path, root))
    scores = {path: _split_score(_relative(path, root), seed) for path in ordered}
    heldout = [path for path in ordered if scores[path] < heldout_fraction]
    if not heldout and len(ordered) >= 2:
        heldout = [min(ordered, key=scores.__getitem__)]
    held = set(heldout)
    return [path for path in ordered if path not in held], heldout


def _split_score(relative_path: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by the seed and the path."""
    digest = hashlib.sha256(f"{seed}\0{relative_path}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def corpus_manifest(
    train: Sequence[Path],
    heldout: Sequence[Path],
    root: Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    include_tests: bool = False,
) -> dict:
    """What a training run read, as JSON-ready data; token counts only when a tokenizer is given."""
    return {
        "python_version": platform.python_version(),
        "implementation": platform.python_implementation(),
        "stdlib_root": str(root),
        "include_tests": include_tests,
        "splits": {
            "train": _split_summary(train, root, tokenizer),
            "heldout": _split_summary(heldout, root, tokenizer),
        },
    }


def _split_summary(files: Sequence[Path], root: Path, tokenizer: PreTrainedTokenizerBase | None) -> dict:
    relative = sorted(_relative(path, root) for path in files)
    summary = {
        "files": len(files),
        "bytes": sum(Path(path).stat().st_size for path in files),
        "sha256": hashlib.sha256("\n".join(relative).encode()).hexdigest(),
    }
    if tokenizer is not None:
        summary["tokens"] = count_tokens(files, tokenizer)
    return summary


def count_tokens(files: Sequence[Path], tokenizer: PreTrainedTokenizerBase) -> int:
    """Total tokens of the files' text, encoded as plain text (no special tokens, no EOS)."""
    total = 0
    for start in range(0, len(files), TOKEN_COUNT_BATCH):
        texts = [read_text(path) for path in files[start : start + TOKEN_COUNT_BATCH]]
        total += sum(len(ids) for ids in encode_texts(tokenizer, texts))
    return total
