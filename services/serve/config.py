"""Service configuration: the typed arguments of the app builder (and of infra/serve_config.yaml).

One pydantic model per deployment, a description per field, unknown keys rejected. The engine's
own options live in `models.engine.EngineConfig`; `DecoderConfig.engine` overrides them by name.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.weights.checkpoint import default_model_dir


class DecoderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_dir: str = Field(default_factory=default_model_dir, description="model directory: HF format, or an "
                                                                          "SDSAT adapter folder naming its base")
    model_name: str | None = Field(None, description="the name clients pass as `model` (default: the shipped "
                                                     "model's name, else the folder's name)")
    model_aliases: list[str] | None = Field(None, description="more names for the same weights, listed by /v1/models "
                                                              "(default: an adapter's base name, whose outputs are the "
                                                              "same)")
    engine: dict = Field(default_factory=dict, description="EngineConfig overrides (method, k, max_batch, "
                                                           "max_context, prefill_chunk, load_policy, ...)")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: one GPU per replica when the cluster has GPUs, else CPU (resolved at deploy time)")
    num_cpus: float = Field(0.5, description="CPUs reserved per CPU replica (fractional so several fit on 2 cores)")
    cpu_threads: int = Field(1, description="torch threads per replica on CPU (0 = torch's default)")
    min_replicas: int = Field(1, ge=0, description="autoscaling lower bound")
    max_replicas: int = Field(2, ge=1, description="autoscaling upper bound")
    initial_replicas: int | None = Field(None, description="replicas at deploy time (default: min_replicas)")
    target_ongoing_requests: float = Field(
        4.0, gt=0, description="autoscaling target of in-flight requests per replica (set explicitly: Ray's LLM "
                               "defaults never trigger scaling for a small model)")
    upscale_delay_s: float = Field(5.0, ge=0, description="sustained load before adding a replica")
    downscale_delay_s: float = Field(30.0, ge=0, description="sustained idleness before removing a replica")
    metrics_interval_s: float = Field(1.0, gt=0, description="how often replicas report load to the autoscaler")
    max_ongoing_requests: int = Field(32, ge=1, description="requests a replica accepts at once (its engine "
                                                            "batches up to engine.max_batch, the rest wait inside)")
    max_queued_requests: int = Field(64, ge=-1, description="requests queued in callers beyond that; more get "
                                                            "429 with Retry-After (-1 = unbounded)")
    graceful_shutdown_timeout_s: float = Field(60.0, description="downscale/redeploy: in-flight requests get this "
                                                                 "long to finish")
    stream_interval_ms: float = Field(50.0, ge=0, description="streamed responses: after the first token at once, "
                                                             "at most one message per this many ms (0 = one per "
                                                             "engine step; per-step messages took a 2-core host "
                                                             "from 0.69 to 1.19 s for 128 tokens); answers in one "
                                                             "piece get the first token, then the rest at once")
    prefix_cache: bool = Field(True, description="reuse prompt-prefix KV (in-replica LRU, plus Redis when reachable)")
    prefix_block_size: int = Field(16, ge=1, description="tokens per cached prefix block")
    prefix_local_mb: int = Field(256, ge=1, description="in-replica prefix cache size (MiB)")
    prefix_ttl_s: int = Field(3600, ge=1, description="Redis TTL of prefix blocks (bound memory with Redis maxmemory)")
    prefix_chunk_mb: float = Field(16.0, gt=0, description="Redis value size: up to 16 consecutive blocks are "
                                                           "stored together, within this many MiB; one round trip each")
    prefix_write_queue_mb: int = Field(256, ge=1, description="write-back backlog bound (MiB); beyond it the oldest "
                                                              "queued chunks are dropped and counted")
    redis_latency_s: float = Field(0.05, gt=0, description="allowance per Redis round trip; its timeout adds the "
                                                           "time its bytes take at redis_min_mb_s (slower = a miss)")
    redis_min_mb_s: float = Field(50.0, gt=0, description="slowest transfer rate (MB/s) a Redis read or write may "
                                                           "have before it counts as a miss")
    redis_url: str | None = Field(None, description="Redis for shared prefix KV (default: $REDIS_URL, else "
                                                    "redis://127.0.0.1:6379/0); may carry a password, rediss:// = TLS")
    affinity_routing: bool = Field(True, description="route requests sharing a prompt prefix to the same replica")

    @model_validator(mode="after")
    def _names(self):
        """Default names: the shipped adapter is `smollm2-135m-instruct-sdsat` and also answers to its base's
        name; the converted base is `smollm2-135m-instruct`; any other folder is called by its name."""
        from pathlib import Path

        from models.training.recipe_adapter import NAME, SHIP_DIR
        from models.weights.adapter import AdapterConfig, is_adapter_dir
        from models.weights.base_model import BASE_NAME, base_model_dir

        folder = Path(self.model_dir)
        if self.model_name is None:
            shipped = folder.resolve() == SHIP_DIR.resolve()
            self.model_name = NAME if shipped else BASE_NAME if folder == base_model_dir() else folder.name
        if self.model_aliases is None:
            base = AdapterConfig.load(folder).base_name if is_adapter_dir(folder) else None
            self.model_aliases = [base] if base and base != self.model_name else []
        return self


class ApiKeyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: str = Field(..., min_length=1, max_length=128, description="who the key belongs to (prefix-cache salt)")
    key_sha256: str = Field(..., pattern="^[0-9a-f]{64}$", description="SHA-256 hex digest of the key (never the key)")
    requests_per_minute: int | None = Field(None, ge=1, description="this key's limit (default: the router's)")
    tokens_per_minute: int | None = Field(None, ge=1, description="prompt + max_tokens per minute (default: the "
                                                                  "router's)")


class RouterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_cpus: float = Field(0.1, description="CPUs reserved by the router (tokenization only)")
    replicas: int = Field(1, ge=1, description="router replicas")
    request_timeout_s: float = Field(120.0, gt=0, description="server-side limit per request: 504 past it")
    retry_after_s: int = Field(1, ge=0, description="Retry-After seconds sent with 429 (backpressure)")
    max_body_bytes: int = Field(1_000_000, ge=1, description="larger request bodies get 413")
    max_tokens_limit: int = Field(2048, ge=1, description="largest max_tokens a request may ask for")
    max_queued_requests: int = Field(256, ge=-1, description="HTTP requests queued at the router beyond its "
                                                             "max_ongoing_requests; more get 429")
    max_ongoing_requests: int = Field(256, ge=1, description="requests a router replica handles at once")
    api_keys: list[ApiKeyConfig] = Field(default_factory=list, description="API keys (none = open API); "
                                         "$SDSAT_API_KEYS=tenant:key,... adds keys, hashed at deploy time")
    requests_per_minute: int | None = Field(None, ge=1, description="default per-key request limit (None = off)")
    tokens_per_minute: int | None = Field(None, ge=1, description="default per-key token limit (None = off)")
    log_encoding: Literal["JSON", "TEXT"] = Field("JSON", description="Serve log format of the deployments")
    log_prompts: bool = Field(False, description="put prompts into the request log lines (off: never logged)")


class TelemetryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    otlp_endpoint: str | None = Field(None, description="OTLP/HTTP collector for traces (default: "
                                                        "$OTEL_EXPORTER_OTLP_ENDPOINT; neither = tracing off)")


class AppConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    decoder: DecoderConfig = Field(default_factory=DecoderConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
