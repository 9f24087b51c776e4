"""`sdsat serve` as a process: what a supervisor (systemd, Kubernetes, a shell's `kill`) sees. Its own local Ray,
apart from the test session's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import yaml
from svc_helpers import app_args, free_port


def test_sigterm_stops_sdsat_serve_cleanly(tmp_path, counting_sdsat_dir):
    """SIGTERM shuts Serve and the local Ray down and exits 0, as Ctrl-C does (Ray's own handler used to dump a
    stack and abort, leaving its processes behind)."""
    port = free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{"name": "sdsat", "route_prefix": "/", "import_path": "services.app:build_app",
                          "args": app_args(counting_sdsat_dir)}]}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["HF_HUB_OFFLINE"] = "1"
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "--config", str(config),
                                 "--object-store-mb", "100"], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "shutting down" in text and "SIGTERM received" not in text
    try:
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
        served = True
    except httpx.HTTPError:
        served = False
    assert not served  # the proxy went with it
