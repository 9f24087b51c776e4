"""Prefix reuse through the service: usage reports cached prompt tokens; affinity routing keeps a
prefix on one replica."""

from concurrent.futures import ThreadPoolExecutor

import httpx
from ray import serve
from svc_helpers import app_args

from infra.affinity_router import affinity_key
from services.app import build_app

LONG = " ".join(str((i * 5) % 24) for i in range(80))  # 80 tokens: five 16-token blocks


def test_repeated_prefix_is_served_from_cache_with_identical_output(service):
    body = {"prompt": LONG, "max_tokens": 8, "temperature": 0}
    first = httpx.post(service + "/v1/completions", json=body, timeout=60).json()
    second = httpx.post(service + "/v1/completions", json=body, timeout=60).json()
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 64  # 4 blocks; the last token is prefilled
    assert second["choices"][0]["text"] == first["choices"][0]["text"]


def test_affinity_routing_keeps_a_prefix_on_one_replica(ray_session, counting_sdsat_dir):
    serve.run(build_app(app_args(counting_sdsat_dir, min_replicas=2, max_replicas=2)), name="affinity",
              route_prefix="/affinity")
    handle = serve.get_deployment_handle("Decoder", "affinity")
    params = {"max_new_tokens": 2, "temperature": 0.0}
    seen: dict[int, set] = {}
    for group in range(4):
        head = [(group * 3 + i) % 24 + 1 for i in range(40)]
        for j in range(5):
            prompt = head + [j + 1]
            request = {"request_id": f"g{group}-{j}", "prompt_ids": prompt, "params": params,
                       "affinity_key": affinity_key(prompt)}
            items = list(handle.options(stream=True).generate.remote(request))
            seen.setdefault(group, set()).add(items[-1]["replica"])
    assert all(len(replicas) == 1 for replicas in seen.values()), seen
    # a burst: every request still lands where its own key points (not where an earlier one's did)
    def send(group: int, j: int) -> tuple[int, str]:
        prompt = [(group * 3 + i) % 24 + 1 for i in range(40)] + [j + 7]
        request = {"request_id": f"burst-{group}-{j}", "prompt_ids": prompt, "params": params,
                   "affinity_key": affinity_key(prompt)}
        return group, list(handle.options(stream=True).generate.remote(request))[-1]["replica"]

    with ThreadPoolExecutor(8) as pool:
        burst = list(pool.map(lambda gj: send(*gj), [(g, j) for j in range(2) for g in range(4)]))
    assert all(replica in seen[group] for group, replica in burst), (burst, seen)
    serve.delete("affinity")
