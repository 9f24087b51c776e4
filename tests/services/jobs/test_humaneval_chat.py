"""The chat form of `sdsat eval humaneval`: code blocks out of chat answers, the programs checked in
the sandbox (real HumanEval problems, hand-written answers), the requests and the form chosen."""

import json

import pytest

from models.errors import ConfigError
from models.weights.chat import code_task_messages, extract_code
from services.jobs.batch import BatchRequest
from services.jobs.humaneval import (
    MAX_TOKENS,
    STOP,
    build_program,
    check_one,
    load_problems,
    resolve_form,
    write_requests,
)
from services.jobs.sandbox import SandboxLimits, run_python

LIMITS = SandboxLimits(timeout_s=30, cpu_s=2, memory_mb=256)  # wall time is generous: the cores are shared

SOLUTION_0 = '''def has_close_elements(numbers: List[float], threshold: float) -> bool:
    """Whether any two numbers are closer to each other than threshold."""
    for i, a in enumerate(numbers):
        for b in numbers[i + 1:]:
            if abs(a - b) < threshold:
                return True
    return False
'''
WRONG_0 = SOLUTION_0.replace("abs(a - b) < threshold", "a - b < threshold")  # misses pairs in one order
CLOSED = f"Here is the completed function:\n\n```python\nfrom typing import List\n\n\n{SOLUTION_0}```\n\n" \
         "It compares every pair of numbers once."
UNCLOSED = f"Sure!\n```python\n{SOLUTION_0}"  # the answer ran out of max_tokens inside its block
USAGE_FIRST = "You call it like this:\n\n```python\n>>> has_close_elements([1.0, 2.8, 3.0], 0.3)\nTrue\n```\n\n" \
              f"and it is written so:\n\n```py\n{SOLUTION_0}```\n"
BODY_ONLY = ("```python\n    return any(abs(a - b) < threshold\n"
             "               for i, a in enumerate(numbers) for b in numbers[i + 1:])\n```")


@pytest.fixture(scope="module")
def problems() -> dict[str, dict]:
    return {p["task_id"]: p for p in load_problems(51)}


def test_extract_code_from_chat_answers():
    assert extract_code(CLOSED) == f"from typing import List\n\n\n{SOLUTION_0}"
    assert extract_code(UNCLOSED) == SOLUTION_0
    assert extract_code(USAGE_FIRST) == SOLUTION_0  # the block with the def, not the usage shown first
    assert extract_code("```\nx = 1\n```") == "x = 1\n"  # no language tag, no def: the first block
    no_block = "    return sorted(set(l))"
    assert extract_code(no_block) == no_block


def test_chat_answers_with_the_function_pass_and_wrong_ones_fail(problems):
    problem = problems["HumanEval/0"]
    for answer in (CLOSED, UNCLOSED, USAGE_FIRST):
        program = build_program(problem, answer, "chat")
        assert program.checked_as == "function" and program.code == extract_code(answer)
        result = run_python(program.text, LIMITS)
        assert result.status == "passed", (answer, result.detail)
    # USAGE_FIRST has no import of List: the prompt's own imports come first
    wrong = build_program(problem, f"```python\n{WRONG_0}```", "chat")
    assert wrong.checked_as == "function" and run_python(wrong.text, LIMITS).status == "failed"


def test_the_prompts_helpers_stay_for_a_function_answer(problems):
    """HumanEval/38's tests call encode_cyclic, defined in the prompt, not in the answer."""
    answer = "```python\ndef decode_cyclic(s: str):\n    return encode_cyclic(encode_cyclic(s))\n```"
    program = build_program(problems["HumanEval/38"], answer, "chat")
    assert program.checked_as == "function" and run_python(program.text, LIMITS).status == "passed"


def test_a_block_without_the_entry_point_continues_the_prompt(problems):
    problem = problems["HumanEval/0"]
    body = build_program(problem, BODY_ONLY, "chat")
    assert body.checked_as == "body" and run_python(body.text, LIMITS).status == "passed"
    flush_left = build_program(problem, "```python\nreturn False\n```", "chat")  # statements written unindented
    assert flush_left.code == "\n    return False\n"
    assert run_python(flush_left.text, LIMITS).status == "failed"  # runs (indented), and is wrong
    helper_only = build_program(problem, "```python\ndef helper(x):\n    return x\n```", "chat")
    assert helper_only.checked_as == "body"


def test_completion_form_is_unchanged(problems):
    problem = problems["HumanEval/0"]
    program = build_program(problem, "\n" + problem["canonical_solution"], "completion")
    assert program.checked_as == "body" and run_python(program.text, LIMITS).status == "passed"


def test_result_rows_record_the_form_the_answer_and_the_code(problems):
    problem = problems["HumanEval/0"]
    generated = {"id": problem["task_id"], "completion": CLOSED, "usage": {"completion_tokens": 90},
                 "speculation": None}
    row = check_one(problem, generated, LIMITS, "chat")
    assert row["form"] == "chat" and row["passed"] and row["checked_as"] == "function"
    assert row["answer"] == CLOSED and row["completion"] == extract_code(CLOSED) and row["completion_tokens"] == 90
    missing = check_one(problem, None, LIMITS, "chat")
    assert missing["form"] == "chat" and not missing["passed"] and missing["answer"] is None


def test_requests_of_each_form(problems, tmp_path):
    chosen = [problems["HumanEval/0"], problems["HumanEval/38"]]
    write_requests(chosen, tmp_path / "chat.jsonl", 384, "chat")
    rows = [json.loads(line) for line in (tmp_path / "chat.jsonl").read_text().splitlines()]
    assert [r["messages"] for r in rows] == [code_task_messages(p["prompt"]) for p in chosen]
    assert all("stop" not in r and "prompt" not in r and r["max_tokens"] == 384 for r in rows)
    write_requests(chosen, tmp_path / "completion.jsonl", 256)
    rows = [json.loads(line) for line in (tmp_path / "completion.jsonl").read_text().splitlines()]
    assert all("messages" not in r and r["stop"] == list(STOP) for r in rows)
    assert all(BatchRequest.model_validate(r) for r in rows)  # what `sdsat batch` accepts


def test_auto_form_follows_the_chat_template(chat_tokenizer_dir, count_tokenizer_dir):
    assert resolve_form("auto", str(chat_tokenizer_dir)) == "chat"
    assert resolve_form("auto", str(count_tokenizer_dir)) == "completion"
    assert resolve_form("completion", "/nonexistent") == "completion"  # an explicit form loads nothing
    assert MAX_TOKENS["chat"] > MAX_TOKENS["completion"]
    with pytest.raises(ConfigError, match="unknown form"):
        resolve_form("fim", str(chat_tokenizer_dir))
