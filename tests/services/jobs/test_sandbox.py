"""The sandbox of `sdsat eval humaneval`, and the eval job end to end on the tiny counting model (in both
forms: completion, and chat with a chat template added to the model's tokenizer)."""

import json
import os
import pwd
import shutil
from pathlib import Path

import pytest

from services.jobs.humaneval import check_program, load_problems, model_prompt
from services.jobs.sandbox import SandboxLimits, run_python

ROOT = Path(__file__).resolve().parents[3]
QUICK = SandboxLimits(timeout_s=5, cpu_s=1, memory_mb=256)
CPU_BOUND = SandboxLimits(timeout_s=60, cpu_s=1, memory_mb=256)  # 1 s of CPU can take many seconds on a busy machine


def test_passing_and_failing_programs():
    assert run_python("assert sum(range(4)) == 6", QUICK).status == "passed"
    failed = run_python("assert 1 == 2, 'wrong'", QUICK)
    assert failed.status == "failed" and failed.detail == "AssertionError: wrong"


def test_infinite_loop_is_killed():
    result = run_python("while True:\n    pass\n", CPU_BOUND)
    assert result.status == "cpu" and result.wall_s < CPU_BOUND.timeout_s
    ignored = run_python("import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass\n",
                         CPU_BOUND)
    assert ignored.status == "cpu"  # the hard limit a second later
    sleeper = run_python("import time\ntime.sleep(60)\n", SandboxLimits(timeout_s=1))
    assert sleeper.status == "timeout" and sleeper.wall_s < 5


def test_memory_hog_is_stopped():
    assert run_python("x = bytearray(8 * 2**30)\n", QUICK).status == "memory"
    growing = run_python("chunks = []\nwhile True:\n    chunks.append(bytearray(2**20))\n", QUICK)
    assert growing.status == "memory" and growing.detail == "MemoryError"


def test_limits_cannot_be_raised_and_writes_stay_in_the_work_dir(tmp_path):
    raised = run_python("import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))\n", QUICK)
    assert raised.status == "failed" and "not allowed" in raised.detail
    assert run_python("open('scratch.txt', 'w').write('ok')\n", QUICK).status == "passed"
    big = run_python("open('big', 'wb').write(b'0' * (64 * 2**20))\n", QUICK)
    assert big.status == "failed" and "File too large" in big.detail


@pytest.mark.skipif(os.geteuid() != 0, reason="privileges are dropped only when running as root")
def test_root_runs_programs_as_nobody(tmp_path):
    nobody = pwd.getpwnam("nobody").pw_uid
    assert run_python(f"import os\nassert os.getuid() == os.geteuid() == {nobody}\nassert os.getgroups() in "
                      "([], [os.getgid()])\n", QUICK).status == "passed"
    tmp_path.chmod(0o755)
    target = tmp_path / "planted.txt"
    assert run_python(f"open({str(target)!r}, 'w')\n", QUICK).status == "failed" and not target.exists()


def test_humaneval_program_passes_with_the_canonical_solution():
    problem = load_problems(1)[0]
    assert not model_prompt(problem).endswith("\n")
    assert run_python(check_program(problem, "\n" + problem["canonical_solution"]), QUICK).status == "passed"
    assert run_python(check_program(problem, "\n    return None\n"), QUICK).status == "failed"


def test_eval_job_on_the_counting_model(counting_sdsat_dir, ray_session, tmp_path):
    """The whole pipeline (batch job in the test's Ray, then the sandbox); the model cannot code: pass@1 0."""
    from services.jobs.batch import BatchJob
    from services.jobs.humaneval import run_humaneval
    from services.serve.config import DecoderConfig

    decoder = DecoderConfig(model_dir=str(counting_sdsat_dir), engine={"max_batch": 2}, device="cpu")
    job = BatchJob(input="", output=str(tmp_path / "he.jsonl"), decoder=decoder, batch_size=2, progress=False)
    report = run_humaneval(job, limit=2, max_tokens=8, limits=QUICK, workers=2)
    assert report["problems"] == 2 and report["passed"] == 0 and report["pass@1"] == 0.0
    assert report["form"] == "completion"  # the counting tokenizer has no chat template
    assert report["generation"]["written"] == 2 and report["completion_tokens"] > 0
    results = [json.loads(line) for line in (tmp_path / "he.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in results] == ["HumanEval/0", "HumanEval/1"]
    assert all(r["status"] == "failed" and r["completion"] is not None for r in results)


def test_eval_job_in_chat_form(counting_sdsat_dir, ray_session, tmp_path):
    """With a chat template the auto form is chat: the rows go to the batch job as messages (through the
    Ray Data actors) and every answer is checked and kept; the counting model cannot code: pass@1 0."""
    from services.jobs.batch import BatchJob
    from services.jobs.humaneval import run_humaneval
    from services.serve.config import DecoderConfig

    model = tmp_path / "chat-model"
    shutil.copytree(counting_sdsat_dir, model)
    (model / "chat_template.jinja").write_text("{% for m in messages %}1 2 {{ m['content'] }} {% endfor %}3")
    decoder = DecoderConfig(model_dir=str(model), engine={"max_batch": 2}, device="cpu")
    job = BatchJob(input="", output=str(tmp_path / "he.jsonl"), decoder=decoder, batch_size=2, progress=False)
    report = run_humaneval(job, limit=2, max_tokens=8, limits=QUICK, workers=2)
    assert report["form"] == "chat" and report["max_tokens"] == 8 and report["pass@1"] == 0.0
    assert report["generation"]["written"] == 2 and report["generation"]["errors"] == 0
    requests = [json.loads(line) for line in (tmp_path / "he.requests.jsonl").read_text().splitlines()]
    assert all("messages" in r and "stop" not in r for r in requests)
    results = [json.loads(line) for line in (tmp_path / "he.jsonl").read_text().splitlines()]
    assert all(r["form"] == "chat" and r["answer"] is not None and r["status"] != "no completion" for r in results)
