"""Helpers shared by the service tests."""

from __future__ import annotations

from helpers import free_port  # noqa: F401 (the service tests import it from here)


def app_args(model_dir, **decoder) -> dict:
    """AppConfig arguments for the tiny counting model on CPU (1 replica unless overridden)."""
    base = {"model_dir": str(model_dir), "model_name": "counting", "num_cpus": 0.5, "cpu_threads": 1,
            "min_replicas": 1, "max_replicas": 1, "engine": {"method": "sdsat", "k": 4, "max_context": 1024}}
    base.update(decoder)
    return {"decoder": base, "router": {"num_cpus": 0.1, "request_timeout_s": 60}}


def alive_actors(class_name: str) -> list[dict]:
    """GCS actor-table entries of the alive actors of a class (`ray.util.state` needs the dashboard, which the
    tests leave off): "Name", "Pid", "Address"."NodeID", ..."""
    from ray._private import state

    return [a for a in state.actors(actor_state_name="ALIVE").values() if a["ActorClassName"] == class_name]
