"""`sdsat bench --peers llama.cpp` (services/bench/peers.py): the peer is optional. Without it the command
says how to install it; with it (`make bench-peers`), a short run on the embedded GGUF reports both
engines side by side with decode-only timings and r(w)."""

import importlib.util
import json
import subprocess
import sys

import pytest

from services.bench.peers import peer_unavailable

HAS_PEER = importlib.util.find_spec("llama_cpp") is not None


def test_an_unknown_peer_is_refused_and_a_missing_one_explained():
    assert "unknown peer" in peer_unavailable("vllm")
    why = peer_unavailable("llama.cpp")
    assert (why is None) == HAS_PEER
    if why is not None:
        assert "make bench-peers" in why


@pytest.mark.skipif(HAS_PEER, reason="llama-cpp-python is installed here: the command runs (test below)")
def test_the_command_fails_clearly_without_the_peer():
    run = subprocess.run([sys.executable, "-m", "services.cli", "bench", "--peers", "llama.cpp", "--limit", "1"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "make bench-peers" in run.stderr


@pytest.mark.skipif(not HAS_PEER, reason="llama-cpp-python (the optional `peers` extra) is not installed")
def test_both_engines_decode_the_same_prompts_side_by_side(tmp_path):
    out = tmp_path / "peers.json"
    subprocess.run([sys.executable, "-m", "services.cli", "bench", "--peers", "llama.cpp", "--dtype", "int4",
                    "--threads", "2", "--limit", "1", "--completion-limit", "1", "--heldout-snippets", "0",
                    "--methods", "prompt-lookup", "--ks", "2", "--max-new-tokens", "12", "--no-progress",
                    "--json", str(out)], check=True, capture_output=True, text=True)
    report = json.loads(out.read_text())
    rows = {(r["engine"], r["method"], r["k"]): r for r in report["rows"]}
    assert set(rows) == {("llama.cpp", "plain", 0), ("llama.cpp", "plain-raw", 0), ("llama.cpp", "prompt-lookup", 3),
                         ("sdsat-engine", "ar", 0), ("sdsat-engine", "prompt-lookup", 2)}
    assert rows[("llama.cpp", "plain", 0)]["vs_llama_cpp"] == 1.0
    assert rows[("sdsat-engine", "prompt-lookup", 2)]["identical_to_our_ar"] == 1.0  # lossless, as always
    assert all(r["decode_ms_per_token"] > 0 for r in rows.values()) and report["prompts"] == 2
    for engine in ("llama.cpp", "sdsat-engine"):
        assert set(report["cost_ratio_r"][engine]) == {"2", "3", "4", "8", "t1_ms"}
        assert report["cost_ratio_r"][engine]["4"] > 1.0  # a wider forward costs more than a 1-token one
    assert report["gguf"].endswith(".gguf") and report["threads"] == 2
