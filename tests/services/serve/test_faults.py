"""Fault injection: a decoder replica killed under load, a batch engine actor killed mid-job, the prefix
cache's Redis stopped and restarted under load, a node removed from a two-node Ray cluster."""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import ray
import redis
from helpers import free_port, start_redis, wait_for
from ray import serve
from ray._private import state
from svc_helpers import alive_actors, app_args
from test_batch import _batch_command, _complete_lines, _greedy_reference, _rows

from infra.affinity_router import _score, affinity_key
from services.app import build_app

ROOT = Path(__file__).resolve().parents[3]
HERE = Path(__file__).resolve().parents[1]  # tests/services: two_node_cluster.py and svc_helpers.py


def _env() -> dict:
    """For subprocesses, read after `ray.init` (which may turn on Ray's token authentication in os.environ)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), str(ROOT / "tests")])}  # the project, and the tests' shared helpers


def _decoder_ids(app: str) -> set[str]:
    """Unique ids of the app's alive decoder replicas (actor names end in `#<unique id>`)."""
    return {a["Name"].rsplit("#", 1)[-1] for a in alive_actors(f"ServeReplica:{app}:Decoder")}


def _running(app: str) -> int:
    status = serve.status().applications[app].deployments["Decoder"]
    return sum(n for s, n in status.replica_states.items() if str(s).endswith("RUNNING"))


def _clean_error(body) -> bool:
    error = body.get("error") if isinstance(body, dict) else None
    return isinstance(error, dict) and bool(error.get("message")) and bool(error.get("type"))


def _body(prompt: str, max_tokens: int, stream: bool) -> dict:
    """A greedy completion of exactly `max_tokens` tokens, streamed with its usage or whole."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    return {**body, "stream": True, "stream_options": {"include_usage": True}} if stream else body


def _request(url: str, body: dict, timeout: float, result: dict | None = None) -> dict:
    """One request to its end: {"outcome": "full" | "error" | "bad", ...}. Whole: 200 with all tokens, or a
    5xx (not 504: that is a hang cut short) with an OpenAI error body. Streamed: SSE that ends in [DONE]
    after either all tokens or an error event; a dropped connection or a timeout is "bad"."""
    want = body["max_tokens"]
    result = result if result is not None else {}
    result.update(stream=body.get("stream", False), first=None)
    try:
        if not body.get("stream"):
            r = httpx.post(url, json=body, timeout=timeout)
            result["status"] = r.status_code
            try:
                data = r.json()
            except ValueError:
                data = r.text
            if r.status_code == 200:
                full = data["usage"]["completion_tokens"] == want and data["choices"][0]["finish_reason"] == "length"
                result.update(outcome="full" if full else "bad", text=data["choices"][0]["text"])
            else:
                clean = 500 <= r.status_code < 600 and r.status_code != 504 and _clean_error(data)
                result.update(outcome="error" if clean else "bad", body=data)
        else:
            events = []
            with httpx.stream("POST", url, json=body, timeout=timeout) as r:
                result["status"] = r.status_code
                if r.status_code != 200:
                    r.read()
                    data = r.json()
                    clean = 500 <= r.status_code < 600 and r.status_code != 504 and _clean_error(data)
                    result.update(outcome="error" if clean else "bad", body=data)
                    return {**result, "end": time.time()}
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        result["first"] = result["first"] or time.time()
                        events.append(line[6:])
            result["events"] = events[-3:]
            if not events or events[-1] != "[DONE]":
                result["outcome"] = "bad"
            else:
                parsed = [json.loads(e) for e in events[:-1]]
                errors = [e for e in parsed if "error" in e]
                if errors:
                    result.update(outcome="error" if _clean_error(errors[0]) else "bad", body=errors[0])
                else:
                    usage = parsed[-1].get("usage") if parsed else None
                    full = bool(usage) and usage["completion_tokens"] == want
                    text = "".join(c["choices"][0]["text"] for c in parsed if c.get("choices"))
                    result.update(outcome="full" if full else "bad", text=text)
    except Exception as err:  # a dropped connection, a timeout
        result.update(outcome="bad", exception=repr(err))
    return {**result, "end": time.time()}


def _prompts_for(model_dir, replicas: list[str], per_replica: int) -> dict[str, list[str]]:
    """Counting prompts whose affinity (rendezvous hashing, as the decoder's request router does) picks each
    replica: `per_replica` of them per replica id."""
    from models.weights.checkpoint import load_tokenizer
    from models.weights.tokenizer import encode_text

    tokenizer = load_tokenizer(model_dir)
    chosen: dict[str, list[str]] = {r: [] for r in replicas}
    start = 0
    while any(len(p) < per_replica for p in chosen.values()):
        prompt = " ".join(str((start + i) % 24) for i in range(3 + start % 5))
        key = affinity_key(encode_text(tokenizer, prompt))
        best = max(replicas, key=lambda r: _score(key, SimpleNamespace(replica_id=SimpleNamespace(unique_id=r))))
        if len(chosen[best]) < per_replica and prompt not in chosen[best]:
            chosen[best].append(prompt)
        start += 1
    return chosen


@pytest.mark.timeout(240)
def test_killed_decoder_replica_fails_cleanly_and_is_replaced(ray_session, counting_sdsat_dir):
    app, max_tokens = "faults", 900
    args = app_args(counting_sdsat_dir, min_replicas=2, max_replicas=2, prefix_cache=False,
                    engine={"method": "ar", "k": 0, "max_context": 1024})
    args["router"]["request_timeout_s"] = 120
    serve.run(build_app(args), name=app, route_prefix="/faults")
    url = f"http://127.0.0.1:{ray_session}/faults/v1/completions"
    try:
        replicas = sorted(_decoder_ids(app))
        assert len(replicas) == 2
        victim, survivor = replicas
        prompts = _prompts_for(counting_sdsat_dir, replicas, per_replica=4)
        streams = [(r, _body(p, max_tokens, stream=True)) for r in replicas for p in prompts[r][:2]]
        wholes = [(r, _body(p, max_tokens, stream=False)) for r in replicas for p in prompts[r][2:]]
        live = [{} for _ in streams + wholes]  # filled in by the threads: a stream's first event
        with ThreadPoolExecutor(len(live)) as pool:
            futures = []
            # Streams one at a time, each routed before the next arrives: Serve's FIFO routing hands a chosen
            # replica to the oldest waiting request, so the affinity prediction holds only for lone requests.
            for (_, body), seen in zip(streams + wholes, live, strict=True):
                futures.append(pool.submit(_request, url, body, 150, seen))
                if body.get("stream"):
                    assert wait_for(lambda seen=seen: seen.get("first"), 60, 0.05), seen
            # the whole requests routed and generating too; a 900-token request lasts about 1.4 s on an AMD EPYC
            # Zen 4 host since the engine runs on the thread that built it, so the kill must come soon
            time.sleep(0.3)
            (actor,) = [a for a in alive_actors(f"ServeReplica:{app}:Decoder") if a["Name"].endswith(victim)]
            t_kill = time.time()
            ray.kill(ray.get_actor(actor["Name"], namespace="serve"))
            results = [f.result(timeout=200) for f in futures]
        jobs = [(replica, r) for (replica, _), r in zip(streams + wholes, results, strict=True)]
        brief = [(replica == victim, r["stream"], r.get("status"), r["outcome"], round(r["end"] - t_kill, 1),
                  r.get("exception") or r.get("body") or r.get("events")) for replica, r in jobs]
        print("killed replica?, stream, status, outcome, s after the kill, detail:", *brief, sep="\n")
        assert all(r["end"] > t_kill for r in results), "a request ended before the kill: make them longer"
        assert all(r["outcome"] != "bad" and r["end"] - t_kill < 90 for r in results), brief
        assert all(r["outcome"] == "full" for replica, r in jobs if replica == survivor and r["stream"]), brief
        errors = [r for r in results if r["outcome"] == "error"]
        assert all(r["body"]["error"]["type"] == "service_unavailable" and r["status"] == (200 if r["stream"] else 503)
                   for r in errors), errors  # a stream's 200 went out with its first tokens
        assert any(r["stream"] for r in errors), brief  # the victim's streams had sent tokens: they cannot be retried

        assert wait_for(lambda: _running(app) == 2 and victim not in _decoder_ids(app)
                         and len(_decoder_ids(app)) == 2, 120), "the killed replica was not replaced"
        after = [_body(p, 32, stream=i % 2 == 1) for i, p in enumerate(sum(prompts.values(), []))]
        with ThreadPoolExecutor(len(after)) as pool:
            later = list(pool.map(lambda body: _request(url, body, 60), after))
        assert all(r["outcome"] == "full" for r in later), later
    finally:
        serve.delete(app)


@pytest.mark.timeout(300)
def test_batch_job_loses_no_rows_when_an_engine_actor_dies(counting_sdsat_dir, ray_session, tmp_path):
    rows = _rows()[:24]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    address = ray.get_runtime_context().gcs_address
    command = _batch_command(counting_sdsat_dir, address, inp, out) + ["--replicas", "2"]
    driver = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        workers: list = []

        def started() -> bool:
            workers[:] = [a for a in alive_actors("MapWorker(MapBatches(EngineWorker))") if a["Pid"]]
            return _complete_lines(out) >= 2 or driver.poll() is not None

        assert wait_for(started, 200, 0.1), "the batch job did not start"
        done_at_kill = _complete_lines(out)
        if driver.poll() is not None:
            pytest.fail(f"the batch job ended before the kill: {driver.communicate()[1].decode()[-3000:]}")
        assert workers and done_at_kill < len(rows), (done_at_kill, workers)
        victim = workers[0]
        os.kill(victim["Pid"], signal.SIGKILL)  # a crash: Ray Data's actors restart and retry their batches
        stderr = driver.communicate(timeout=240)[1].decode()
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, stderr[-3000:]
    summary = json.loads(Path(str(out) + ".summary.json").read_text())
    written = [json.loads(line) for line in out.read_text().splitlines()]
    ids = [w["id"] for w in written]
    assert len(ids) == len(set(ids)) == len(rows) == summary["written"] and summary["errors"] == 0
    assert {w["id"]: w["completion"] for w in written} == _greedy_reference(counting_sdsat_dir, rows)
    assert state.actors(actor_id=victim["ActorID"])["NumRestarts"] >= 1  # recovered by a restart, not by luck
    print(f"killed pid {victim['Pid']} with {done_at_kill}/{len(rows)} rows written")


def _cache_counters(handle, replicas: int) -> dict[str, int]:
    """The prefix-cache counters summed over the decoder replicas (stats calls land on random replicas)."""
    seen: dict[str, dict] = {}
    for _ in range(20):
        for response in [handle.stats.remote() for _ in range(2 * replicas)]:  # concurrent calls spread
            stats = response.result(timeout_s=30)
            seen[stats["replica"]] = stats["prefix_cache"]
        if len(seen) == replicas:
            return {k: sum(c[k] for c in seen.values()) for k in stats["prefix_cache"]}
    raise AssertionError(f"stats reached only replicas {sorted(seen)}")


@pytest.mark.timeout(300)
def test_redis_stopped_and_restarted_under_load_fails_no_request(ray_session, counting_sdsat_dir):
    app, port, max_tokens = "faults_redis", free_port(), 12
    server = start_redis(port)
    # Two replicas without prefix affinity: a prefix one replica wrote is read from Redis by the other.
    args = app_args(counting_sdsat_dir, min_replicas=2, max_replicas=2, affinity_routing=False,
                    redis_url=f"redis://127.0.0.1:{port}/0")
    serve.run(build_app(args), name=app, route_prefix="/faults-redis")
    url = f"http://127.0.0.1:{ray_session}/faults-redis/v1/completions"
    decoder = serve.get_deployment_handle("Decoder", app)
    results: list[tuple[str, str, dict]] = []  # (phase at the start, prompt, result)
    phase, stop = ["up"], threading.Event()

    def prompt(c: int, n: int) -> str:
        """Client c's n-th prompt: a 3-block prefix of its own shared by 3 requests in a row (the first one's
        replica writes it back; a later one routed to the other replica reads it from Redis), then a block
        and a bit unique to the request."""
        shared, unique = random.Random(f"{c}/{n // 3}"), random.Random(f"{c}/{n}/tail")
        return " ".join(str(x) for x in [shared.randrange(24) for _ in range(48)] +
                        [unique.randrange(24) for _ in range(20)])

    def client(c: int) -> None:
        n = 0
        while not stop.is_set():
            tag, text = phase[0], prompt(c, n)
            results.append((tag, text, _request(url, _body(text, max_tokens, stream=n % 3 == 1), 60)))
            n += 1

    def served(tag: str, n: int) -> bool:
        return sum(t == tag for t, _, _ in results) >= n

    def redis_hits_beyond(n: int) -> dict | None:
        counters = _cache_counters(decoder, 2)
        return counters if counters["hit_blocks_redis"] > n else None

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(4)]
    try:
        for t in threads:
            t.start()
        assert wait_for(lambda: served("up", 12) and redis_hits_beyond(0), 90), "no Redis hits before the outage"
        before = _cache_counters(decoder, 2)
        server.terminate()
        server.wait()
        phase[0] = "down"
        assert wait_for(lambda: served("down", 12), 60, 0.1)
        during = _cache_counters(decoder, 2)
        server = start_redis(port)  # the same port, empty
        phase[0] = "restarting"
        time.sleep(1.5)  # past the cache's back-off after its last error
        phase[0] = "restarted"
        assert wait_for(lambda: served("restarted", 12) and redis_hits_beyond(during["hit_blocks_redis"]), 90), \
            "no Redis hits after the restart"
        stop.set()
        for t in threads:
            t.join(timeout=60)
        after = _cache_counters(decoder, 2)
        keys = redis.Redis(port=port).dbsize()
    finally:
        stop.set()
        server.terminate()
        server.wait()
        serve.delete(app)
    print("prefix-cache counters before, during and after the outage:", before, during, after, sep="\n")
    print("requests per phase:", {tag: sum(t == tag for t, _, _ in results) for tag in dict.fromkeys(
        t for t, _, _ in results)})
    bad = [(t, r) for t, _, r in results if r["outcome"] != "full"]
    assert not bad, bad
    assert {"up", "down", "restarted"} <= {t for t, _, _ in results}
    reference = _greedy_reference_for(counting_sdsat_dir, sorted({p for _, p, _ in results}), max_tokens)
    assert all(r["text"] == reference[p] for _, p, r in results)  # the cache never changes an output
    assert before["hit_blocks_redis"] > 0  # shared through Redis before the outage,
    assert during["errors"] > before["errors"]  # the outage was noticed, and cost misses only,
    assert after["hit_blocks_redis"] > during["hit_blocks_redis"]  # and shared again through the restarted Redis
    assert after["writes"] > during["writes"] and keys > 0


def _greedy_reference_for(model_dir, prompts: list[str], max_tokens: int) -> dict[str, str]:
    from models.engine import Engine, EngineConfig, SamplingParams
    from models.weights.tokenizer import encode_text

    engine = Engine.from_pretrained(model_dir, EngineConfig(method="ar", k=0, device="cpu"))
    params = SamplingParams(max_new_tokens=max_tokens, ignore_eos=True)
    outs = engine.generate_batch([encode_text(engine.tokenizer, p) for p in prompts], params)
    return {p: o["text"] for p, o in zip(prompts, outs, strict=True)}


@pytest.mark.timeout(300)
def test_two_node_cluster_spreads_replicas_and_survives_losing_a_node(counting_sdsat_dir):
    run = subprocess.run([sys.executable, str(HERE / "two_node_cluster.py"), str(counting_sdsat_dir)], cwd=ROOT,
                         env=_env(), capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stderr[-4000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    print(summary)
    assert len(summary["nodes"]) == 2 and set(summary["decoder_nodes_before"]) == set(summary["nodes"])
    assert summary["ok_before"] == summary["sent_before"]
    assert summary["removed"] in summary["decoder_nodes_before"] and summary["removed"] != summary["head"]
    assert summary["recovered_s"] is not None and summary["recovered_s"] < 120
    assert summary["decoder_nodes_after"] == [summary["head"]] * 2
    assert summary["ok_after"] == summary["sent_after"]
