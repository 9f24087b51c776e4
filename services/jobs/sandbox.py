"""Run untrusted Python (model-written code and its tests) in a limited subprocess.

    result = run_python("assert 1 + 1 == 2", SandboxLimits(timeout_s=5))
    result.status  # "passed", "failed", "timeout", "cpu", "memory" or "output"

Each run gets a fresh temporary directory as working directory, HOME and TMPDIR, a minimal
environment, no stdin, and a new session, so a wall-clock timeout kills the whole process group.
When this process is root the program runs as `nobody` with no supplementary groups. Resource
limits (address space, CPU seconds, file size, processes, open files, no core dumps) are set by a
tiny launcher that then execs the interpreter: the limits hold from the first instruction of the
program, and no Python runs between fork and exec in this (threaded) process, which `preexec_fn`
would do. stderr goes to a file bounded by the file-size limit, stdout to /dev/null.

This is a guard against accidents (infinite loops, memory blow-ups, stray writes), not a security
boundary: there is no network, filesystem or syscall isolation (see docs_batch_section.md).
"""

from __future__ import annotations

import functools
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from models.errors import ConfigError

SANDBOX_USER = "nobody"

# Runs as `python -I -c LAUNCHER AS CPU FSIZE NPROC NOFILE PROGRAM`: hard limits (so the program cannot
# raise them), then exec. CPU: SIGXCPU at the soft limit, SIGKILL a second later if it is ignored.
_LAUNCHER = """import os, resource, sys
names = ("RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NPROC", "RLIMIT_NOFILE")
for name, value in zip(names, map(int, sys.argv[1:6])):
    resource.setrlimit(getattr(resource, name), (value, value + (name == "RLIMIT_CPU")))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
os.execv(sys.executable, [sys.executable, "-I", "-B", sys.argv[6]])
"""


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock; HumanEval tests take milliseconds
    cpu_s: int = 10  # RLIMIT_CPU: a busy loop dies here even if the wall clock is generous
    memory_mb: int = 1024  # RLIMIT_AS: address space, the interpreter itself needs ~30 MB
    file_mb: int = 16  # RLIMIT_FSIZE: the largest file the program (and its stderr) may write
    processes: int = 32  # RLIMIT_NPROC: per user, so it bounds fork bombs of `nobody` as a whole
    open_files: int = 64  # RLIMIT_NOFILE

    def launcher_args(self) -> list[str]:
        return [str(v) for v in (self.memory_mb * 2**20, self.cpu_s, self.file_mb * 2**20, self.processes,
                                 self.open_files)]


@dataclass
class SandboxResult:
    status: str  # passed | failed | timeout | cpu | memory | output
    returncode: int | None
    detail: str  # the last line of stderr, or what killed it
    wall_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def unprivileged_user() -> pwd.struct_passwd | None:
    """The user to run as: `nobody` when this process is root, else None (run as ourselves)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SANDBOX_USER)
    except KeyError as err:
        raise ConfigError(f"running as root but there is no {SANDBOX_USER!r} user to drop privileges to") from err


def _identity(user: pwd.struct_passwd | None) -> dict:
    return {} if user is None else {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


@functools.cache
def sandbox_python() -> str:
    """An interpreter the sandbox user can run: this one, else the system's python3 (root's own
    interpreter often lives under /root, which `nobody` cannot enter)."""
    identity = _identity(unprivileged_user())
    candidates = [sys.executable, shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")]
    for exe in filter(None, candidates):
        try:
            probe = subprocess.run([exe, "-I", "-c", "import resource"], cwd="/", capture_output=True, timeout=30,
                                   **identity)
        except OSError:  # not executable by that user
            continue
        if probe.returncode == 0:
            return exe
    raise ConfigError("no Python interpreter that the sandbox user can run (tried "
                      f"{', '.join(filter(None, candidates))})")


def _status(returncode: int, stderr: str) -> tuple[str, str]:
    last = stderr.strip().splitlines()[-1][:300] if stderr.strip() else ""
    if returncode == 0:
        return "passed", last
    if returncode in (-signal.SIGXCPU, -signal.SIGKILL):  # SIGKILL: the CPU hard limit (memory fails softly)
        return "cpu", "CPU time limit exceeded"
    if returncode == -signal.SIGXFSZ:
        return "output", "file size limit exceeded"
    if "MemoryError" in stderr or returncode == -signal.SIGSEGV:
        return "memory", last or "killed (memory limit)"
    return "failed", last or f"exit status {returncode}"


def run_python(source: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `source` as a script under the limits; never raises for anything the program does."""
    limits = limits or SandboxLimits()
    user = unprivileged_user()
    python = sandbox_python()
    with tempfile.TemporaryDirectory(prefix="sdsat-sandbox-") as tmp:
        work = Path(tmp)
        program = work / "program.py"
        program.write_text(source)
        program.chmod(0o644)
        if user is not None:
            os.chown(work, user.pw_uid, user.pw_gid)
        work.chmod(0o700)
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        t0 = time.perf_counter()
        with open(work / ".stderr", "w+b") as err:
            proc = subprocess.Popen([python, "-I", "-c", _LAUNCHER, *limits.launcher_args(), str(program)],
                                    cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err, start_new_session=True, **_identity(user))
            try:
                returncode, timed_out = proc.wait(timeout=limits.timeout_s), False
            except subprocess.TimeoutExpired:
                returncode, timed_out = None, True
            _kill_group(proc)
            if timed_out:
                returncode = proc.wait()
            err.seek(0)
            stderr = err.read()[-8192:].decode("utf-8", "replace")
        wall = time.perf_counter() - t0
    if timed_out:
        return SandboxResult("timeout", returncode, f"timed out after {limits.timeout_s:g} s", wall)
    status, detail = _status(returncode, stderr)
    return SandboxResult(status, returncode, detail, wall)


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the program's process group (the program on timeout, whatever it left running either way)
    and wait until it is gone, so a fork loop cannot outlive the sandbox."""
    for _ in range(100):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.01)
