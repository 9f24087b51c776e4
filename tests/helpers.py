"""Helpers shared by tests in several directories: free ports, a test-owned redis-server, polling, a tiny
random Llama and the logits of chains of several widths. (Test modules import from here, never from
conftest: two conftest.py files share that module name.)"""

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


def chain_logits(engine, prompt: list[int], widths=(1, 2, 4, 8, 16)) -> dict:
    """After prefilling `prompt`: for each width w, the logits [w, V] of one forward of a chain of w new
    tokens (the next token, then fixed fillers), each from the same cache state. Row 0 of every width
    predicts the same position; width 1 is the plain 1-token forward."""
    import torch

    from models.engine import SamplingParams

    request = engine.add_request(prompt, SamplingParams(max_new_tokens=8, ignore_eos=True))
    while not engine.running or not engine.running[0].output_ids:
        engine.step()
    seq = engine.running[0]
    vocab = engine.model.config.vocab_size
    chunk = [seq.cur] + [(7 + 13 * j) % vocab for j in range(max(widths) - 1)]
    with torch.inference_mode():
        out = {w: engine._forward([seq], [chunk[:w]])[0][0] for w in widths}
    engine.cancel(request)
    return out


def tiny_llama(vocab_size: int, attn: str = "sdpa", seed: int = 0, **overrides):
    """A small random Llama (2 layers, GQA) for engine and training tests; `overrides` change its shape."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
    config = LlamaConfig(vocab_size=vocab_size, **{**shape, **overrides})
    return LlamaForCausalLM._from_config(config, attn_implementation=attn).eval()
