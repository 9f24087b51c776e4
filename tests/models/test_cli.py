"""`sdsat generate`, `sdsat convert` and `sdsat compile` through the real command line."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _sdsat(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)


def test_generate_json_matches_across_methods(counting_sdsat_dir):
    outs = {}
    for method in ("ar", "sdsat", "sdsat-fused", "prompt-lookup"):
        proc = _sdsat("generate", "--model", str(counting_sdsat_dir), "--prompt", "3 4 5", "--method", method,
                      "--k", "4", "--max-new-tokens", "12", "--json", "-")
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs[method] = json.loads(proc.stdout)
    assert outs["ar"]["text"].startswith("6 7 8")
    assert len({json.dumps(o["token_ids"]) for o in outs.values()}) == 1
    stats = outs["sdsat"]["stats"]
    assert set(stats) >= {"forwards", "iterations", "drafted", "accepted", "emitted", "accepted_per_position",
                          "acceptance_rate", "mean_accepted_per_iteration", "forwards_per_token"}
    assert stats["emitted"] == len(outs["sdsat"]["token_ids"]) and stats["accepted"] > 0


def test_generate_bad_input_is_a_clear_error(counting_sdsat_dir):
    proc = _sdsat("generate", "--model", str(counting_sdsat_dir), "--prompt", "3 4", "--top-p", "0")
    assert proc.returncode == 2 and "top_p must be in (0, 1]" in proc.stderr


def test_convert_writes_sat_metadata(tmp_path, counting_sdsat_dir):
    import shutil

    model = tmp_path / "released"
    shutil.copytree(counting_sdsat_dir, model)
    (model / "sdsat.json").unlink()
    proc = _sdsat("convert", "--model", str(model), "--sat-ids", "3", "--k-train", "5", "--json", "-")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((model / "sdsat.json").read_text())["sat_ids"] == [3]
    bad = _sdsat("convert", "--model", str(model), "--sat-ids", "99999", "--k-train", "5")
    assert bad.returncode == 2 and "outside the vocabulary" in bad.stderr


def test_compile_without_a_gpu_compiles_nothing_and_succeeds():
    """`make setup` runs `sdsat compile`: on a CPU host it must pass at once (CPUs serve kernels.c)."""
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA host compiles the served model here; tests/gpu covers the compiled graphs")
    proc = _sdsat("compile", "--config", str(ROOT / "infra" / "serve_config.yaml"))
    assert proc.returncode == 0 and "no CUDA GPU here, nothing to compile" in proc.stdout, proc.stderr[-2000:]
