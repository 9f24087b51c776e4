"""A two-node Ray cluster on one machine (`ray.cluster_utils.Cluster`) serving the app with 2 decoder
replicas: where the replicas land, then the second node removed and the service's recovery.

    python tests/services/two_node_cluster.py MODEL_DIR     # prints a JSON summary on its last line

Run by tests/services/serve/test_faults.py (its own Ray: a test session's `ray.init` cannot host a second node).
"""

import json
import sys
import time

import httpx
import ray
from ray import serve
from ray.cluster_utils import Cluster
from svc_helpers import alive_actors, app_args, free_port

from services.app import build_app

APP = "two_node"
NODE = {"object_store_memory": 80 * 2**20, "include_dashboard": False}


def decoder_nodes() -> list[str]:
    return sorted(a["Address"]["NodeID"] for a in alive_actors(f"ServeReplica:{APP}:Decoder"))


def running() -> int:
    app = serve.status().applications.get(APP)
    if app is None or "Decoder" not in app.deployments:
        return 0
    return sum(n for s, n in app.deployments["Decoder"].replica_states.items() if str(s).endswith("RUNNING"))


def ok(url: str, timeout: float = 30) -> bool:
    try:
        r = httpx.post(url, json={"prompt": "1 2 3", "max_tokens": 16, "temperature": 0, "ignore_eos": True},
                       timeout=timeout)
        return r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16
    except httpx.HTTPError:
        return False


def main(model_dir: str) -> dict:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, **NODE})
    worker = cluster.add_node(num_cpus=1, **NODE)
    try:
        ray.init(address=cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}})
        port = free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(app_args(model_dir, min_replicas=2, max_replicas=2)), name=APP, route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1/completions"
        head = cluster.head_node.node_id
        summary = {"head": head, "nodes": sorted([head, worker.node_id]), "decoder_nodes_before": decoder_nodes(),
                   "sent_before": 4, "ok_before": sum(ok(url) for _ in range(4)), "removed": worker.node_id}
        t0 = time.time()
        cluster.remove_node(worker)
        recovered, failed = None, 0
        while time.time() - t0 < 150:
            if ok(url, timeout=20):
                if running() == 2 and decoder_nodes() == [head, head]:
                    recovered = time.time() - t0
                    break
            else:
                failed += 1
            time.sleep(0.5)
        summary.update(recovered_s=recovered, failed_while_recovering=failed, decoder_nodes_after=decoder_nodes(),
                       sent_after=6, ok_after=sum(ok(url) for _ in range(6)))
        return summary
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])), flush=True)
