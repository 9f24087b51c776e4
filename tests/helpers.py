"""Helpers shared by tests in several directories: free ports, a test-owned redis-server, polling."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(port: int) -> subprocess.Popen:
    """A throw-away redis-server on `port` (no persistence), once it answers PING."""
    import redis

    proc = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            return proc
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def wait_for(predicate, timeout: float, period: float = 0.5) -> bool:
    """Poll until `predicate()` is true or `timeout` seconds pass; its last value."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(period)
    return predicate()


def one_token_and_verify_logits(engine, prompt: list[int]):
    """After prefilling `prompt`: the logits of a 1-token forward of the next token, and row 0 of a
    4-token (verify-shaped) forward starting with that token, at the same cache state."""
    import torch

    from models.engine import SamplingParams

    request = engine.add_request(prompt, SamplingParams(max_new_tokens=8, ignore_eos=True))
    while not engine.running or not engine.running[0].output_ids:
        engine.step()
    seq = engine.running[0]
    with torch.inference_mode():
        one = engine._forward([seq], [[seq.cur]])[0][0][0]
        four = engine._forward([seq], [[seq.cur, 7, 8, 9]])[0][0][0]
    engine.cancel(request)
    return one, four
