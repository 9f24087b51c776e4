"""Data-parallel SDSAT training on Ray Train: the loop of models/training/train.py, run by N workers.

    sdsat train --config train.yaml --workers 2                        # CPU workers (gloo), one machine
    sdsat train --config train.yaml --workers 8 --gpus-per-worker 1    # DDP over NCCL
    sdsat train --config train.yaml --workers 16 --gpus-per-worker 1 --fsdp \\
        --address auto --storage-path /shared/runs                    # sharded, on a Ray cluster

A `TorchTrainer` starts the workers and their torch.distributed group. Every worker builds the same model
and data, wraps the model in DDP (or shards it with FSDP2) and runs `models.training.train.run_steps`, taking every
N-th micro-batch of each step; the loss is normalised by the step's token count over all workers, so N
workers make the update that one process makes with grad_accum * N. Rank 0 writes log.jsonl, the progress
bar and `checkpoint-last` (the single-process format), which it reports to Ray Train as the run's
checkpoint. A failed worker restarts the group from the last checkpoint (`max_failures`); after a killed
driver, the same command resumes: Ray Train finds the run under its storage path, or else the workers
resume from `output_dir/checkpoint-last`. Ray is imported inside the functions that need it, so building
the `sdsat train` parser does not load it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from models.config import field
from models.errors import ConfigError
from models.training.train import FINAL, LAST, Run, TrainData, prepare_data, prepare_model, run_steps, save_final
from models.training.train_config import MODEL_PRESETS, TrainConfig
from models.weights.checkpoint import DTYPES, TRAINER_STATE, save_checkpoint

# Test hook: "STEP:MARKER" makes the last worker's process die while it loads the rows of step STEP,
# once (it creates the MARKER file first, so the restarted worker carries on).
CRASH_ENV = "SDSAT_TRAIN_CRASH"


@dataclass(frozen=True)
class ScaleConfig:
    workers: int = field(0, "data-parallel Ray Train workers; 0 trains in this process, without Ray")
    gpus_per_worker: float = field(0.0, "GPUs per worker (1 for DDP or FSDP over NCCL); 0: CPU workers over gloo")
    cpus_per_worker: float = field(1.0, "CPUs reserved per worker (fractions let workers share cores); "
                                        "also its torch threads unless --num-threads is set")
    fsdp: bool = field(False, "shard parameters, gradients and optimizer state over the workers (torch FSDP2) "
                              "instead of a full replica per worker (DDP): for models that do not fit one GPU")
    address: str | None = field(None, "Ray cluster to join (auto: the one `ray start` runs on this node); "
                                      "default: start a local one in this process")
    storage_path: str | None = field(None, "where Ray Train keeps the run's checkpoints; shared storage (NFS, "
                                           "s3://...) on a multi-node cluster (default: OUTPUT_DIR/ray)")
    run_name: str | None = field(None, "Ray Train run name under storage_path; the same name resumes the run "
                                       "(default: OUTPUT_DIR's name and a hash of its absolute path)")
    max_failures: int = field(3, "restarts of the worker group from the last checkpoint after a worker "
                                 "fails (-1: unlimited)")

    def __post_init__(self):
        if self.workers < 0 or self.gpus_per_worker < 0 or self.cpus_per_worker <= 0:
            raise ConfigError("workers and gpus_per_worker must be >= 0, cpus_per_worker > 0")


def fit_ray(cfg: TrainConfig, scale: ScaleConfig, progress: bool = True,
            worker_env: dict[str, str] | None = None) -> dict:
    """Train on `scale.workers` Ray Train workers; returns the final metrics, as `train` does.
    Joins the Ray instance this process already has, else `scale.address`, else starts one."""
    import ray
    import ray.train

    if scale.workers < 1:
        raise ConfigError("Ray Train needs --workers >= 1")
    if os.environ.get("RAY_TRAIN_V2_ENABLED", "1").lower() in ("0", "false"):
        raise ConfigError("sdsat train --workers needs Ray Train V2: unset RAY_TRAIN_V2_ENABLED")
    cfg = _absolute_paths(cfg)  # workers run in Ray's own working directory, maybe on other nodes
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_options = {"checkpoint_config": ray.train.CheckpointConfig(num_to_keep=2),
                   # Workers with the job's own runtime environment start from Ray's idle worker processes.
                   "worker_runtime_env": {"env_vars": worker_env} if worker_env else None}
    trainer = _torch_trainer(_worker_loop, {"cfg": cfg, "scale": scale, "progress": progress}, scale, out,
                             run_options)
    return dict(trainer.fit().metrics)


def fit_ray_adapter(cfg, scale: ScaleConfig, progress: bool = True) -> dict:
    """The frozen-base SAT adapter (models/training/train_adapter.py) on `scale.workers` Ray Train workers: each
    takes every N-th row of a step's batch and the gradients are averaged over gloo/NCCL; rank 0 writes
    checkpoint-last.pt, which a restarted group (`max_failures`) or a re-run resumes from. On several
    nodes, output_dir must be shared storage."""
    if scale.workers < 1 or scale.workers > cfg.batch_size:
        raise ConfigError(f"the adapter trains on 1..batch_size ({cfg.batch_size}) workers, got {scale.workers}")
    cfg = dataclasses.replace(cfg, data=str(Path(cfg.data).resolve()), output_dir=str(Path(cfg.output_dir).resolve()),
                              model=cfg.model and str(Path(cfg.model).resolve()))
    trainer = _torch_trainer(_frozen_base_worker_loop, {"kind": "adapter", "cfg": cfg, "scale": scale,
                                                        "progress": progress}, scale, Path(cfg.output_dir), {})
    return dict(trainer.fit().metrics)


def fit_ray_speculator(cfg, scale: ScaleConfig, progress: bool = True) -> dict:
    """A base-tied MLP speculator on recorded data (models/training/train_speculator.py's train_recorded) on
    `scale.workers` Ray Train workers: each takes every N-th window of a step's batch and the gradients are
    averaged; rank 0 writes checkpoint-last, which a restarted group or a re-run resumes from."""
    if not cfg.hidden_data:
        raise ConfigError("--workers trains the base-tied speculator on recorded data: set --hidden-data")
    if scale.workers < 1 or scale.workers > cfg.batch_size:
        raise ConfigError(f"the speculator trains on 1..batch_size ({cfg.batch_size}) workers, got {scale.workers}")
    absolute = {name: str(Path(value).resolve()) for name in ("hidden_data", "heldout_data", "output_dir", "save_to",
                                                              "model") if (value := getattr(cfg, name))}
    cfg = dataclasses.replace(cfg, **absolute)
    trainer = _torch_trainer(_frozen_base_worker_loop, {"kind": "speculator", "cfg": cfg, "scale": scale,
                                                        "progress": progress}, scale, Path(cfg.output_dir), {})
    return dict(trainer.fit().metrics)


def _torch_trainer(loop, loop_config: dict, scale: ScaleConfig, out: Path, run_options: dict):
    """A TorchTrainer of `scale.workers` workers (gloo on CPUs, NCCL on GPUs) whose run is named after
    `out` and kept under `scale.storage_path` (default out/ray); joins or starts Ray first."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        ray.init(address=scale.address)
    use_gpu = scale.gpus_per_worker > 0
    resources = {"CPU": scale.cpus_per_worker} | ({"GPU": scale.gpus_per_worker} if use_gpu else {})
    return TorchTrainer(
        loop, train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=scale.workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=scale.run_name or f"{out.name}-{hashlib.sha256(str(out).encode()).hexdigest()[:8]}",
            storage_path=scale.storage_path or str(out / "ray"),
            failure_config=ray.train.FailureConfig(max_failures=scale.max_failures), **run_options),
    )


def _frozen_base_worker_loop(config: dict) -> None:
    """A worker of fit_ray_adapter (config["kind"] "adapter") or fit_ray_speculator ("speculator"): both
    trainers take (cfg, progress, rank, world); rank 0 reports the final folder as the run's checkpoint."""
    import ray.train

    if config["kind"] == "adapter":
        from models.training.train_adapter import train
    else:
        from models.training.train_speculator import train_recorded as train

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg, scale = config["cfg"], config["scale"]
    ctx = ray.train.get_context()
    if not cfg.num_threads:
        torch.set_num_threads(max(1, int(scale.cpus_per_worker)))
    rank = ctx.get_world_rank()
    metrics = train(cfg, progress=config["progress"], rank=rank, world=ctx.get_world_size())
    # the driver's result carries the metrics reported with a checkpoint: rank 0's, with the final folder
    final = Path(cfg.output_dir) / "final" if config["kind"] == "adapter" else Path(metrics["saved_to"])
    checkpoint = ray.train.Checkpoint.from_directory(final) if rank == 0 else None
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=final.name,
                     delete_local_checkpoint_after_upload=False)


def _absolute_paths(cfg: TrainConfig) -> TrainConfig:
    def absolute(path: str) -> str:
        return str(Path(path).resolve())

    return dataclasses.replace(
        cfg,
        model=cfg.model if cfg.model in MODEL_PRESETS else absolute(cfg.model),
        tokenizer=cfg.tokenizer and absolute(cfg.tokenizer),
        corpus=tuple(map(absolute, cfg.corpus)),
        heldout=tuple(map(absolute, cfg.heldout)),
        output_dir=absolute(cfg.output_dir),
    )


def _worker_loop(config: dict) -> None:
    """One Ray Train worker: build (or resume) the run, then the shared loop on this worker's rows."""
    import ray.train
    import ray.train.torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers tokenize in one thread each
    cfg, scale = config["cfg"], config["scale"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.num_threads or max(1, int(scale.cpus_per_worker)))
    device = ray.train.torch.get_device()
    out = Path(cfg.output_dir)
    parallel = Shards(cfg) if scale.fsdp else Replicas()

    checkpoint = ray.train.get_checkpoint()  # the last one Ray recorded, after a worker failure or a driver restart
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as ray_dir:
        resume_dir = _newest_checkpoint([Path(ray_dir)] if ray_dir else [], out / LAST)
        model, tokenizer, sat = prepare_model(cfg, resume_dir)
        state = torch.load(resume_dir / TRAINER_STATE, weights_only=False) if resume_dir else None
    from_ray = resume_dir is not None and resume_dir != out / LAST
    resumed_from = checkpoint.path if from_ray else resume_dir and str(resume_dir)
    model.to(device)
    data = _in_turns(ctx, lambda: prepare_data(cfg, model, tokenizer, sat, out))
    if os.environ.get(CRASH_ENV) and rank == world - 1:
        data = TrainData(_CrashingRows(data.train, cfg.batch_size * cfg.grad_accum * world), data.heldout)
    run = Run.create(cfg, parallel.wrap(model), tokenizer, sat, data, device)
    if state is not None:
        run.load_trainer_state(state, lambda optimizer_state: parallel.load_optimizer(run, optimizer_state))

    def save(run: Run) -> None:
        model_state, optimizer_state = parallel.full_state(run)  # every worker: FSDP gathers its shards
        reported = None
        if rank == 0:
            save_checkpoint(out / LAST, parallel.unwrap(run.model), tokenizer, sat, run.files,
                            trainer_state=run.trainer_state(optimizer_state), state_dict=model_state)
            reported = ray.train.Checkpoint.from_directory(out / LAST)
        # The driver's result is the metrics of the last checkpoint, so the final one carries the final
        # metrics. Ray copies checkpoint-last into the run's storage; it stays in output_dir as well.
        final = {"resumed_from": resumed_from} if run.step == cfg.max_steps else {}
        ray.train.report(run.metrics | final, checkpoint=reported, checkpoint_dir_name=f"checkpoint-{run.step:06d}",
                         delete_local_checkpoint_after_upload=False)

    finished_before = run.step == cfg.max_steps
    show = config["progress"] and rank == 0
    run_steps(run, save, out / "log.jsonl" if rank == 0 else None, show, rows_offset=rank, rows_stride=world,
              bar_options={"file": _Lines(sys.stderr), "mininterval": 1.0})
    if finished_before:  # a finished run started again: report its final metrics once more
        save(run)
    run.metrics["resumed_from"] = resumed_from
    model_state, _ = parallel.full_state(run, optimizer=False)
    if rank == 0:
        save_final(run, out / FINAL, parallel.unwrap(run.model), model_state)


def _newest_checkpoint(ray_dirs: list[Path], last: Path) -> Path | None:
    """Ray's checkpoint, unless checkpoint-last is newer: Ray records a reported checkpoint when it next
    polls the workers, so a worker that dies just after a report can leave Ray one checkpoint behind."""
    found = [d for d in (*ray_dirs, last) if (d / TRAINER_STATE).is_file()]
    if not found:
        return None
    return max(found, key=lambda d: torch.load(d / TRAINER_STATE, weights_only=False, mmap=True)["step"])


def _in_turns(ctx, build):
    """build() on rank 0 first (it writes the token cache and any self-distilled data under output_dir),
    then on the first worker of each other node, then on the rest, which find the cache."""
    result = None
    for my_turn in (ctx.get_world_rank() == 0, ctx.get_local_rank() == 0, True):
        if my_turn and result is None:
            result = build()
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
    return result


class Replicas:
    """DDP: a full model on every worker; backward averages the gradients (Ray's prepare_model wraps)."""

    def wrap(self, model):
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy="ddp")

    def unwrap(self, model):
        return getattr(model, "module", model)

    def full_state(self, run: Run, optimizer: bool = True) -> tuple[dict | None, dict | None]:
        return None, None  # rank 0 holds everything already

    def load_optimizer(self, run: Run, state: dict) -> None:
        run.optimizer.load_state_dict(state)


class Shards:
    """FSDP2: each decoder layer's parameters, gradients and AdamW state are split over the workers and
    all-gathered layer by layer for compute. Checkpoints gather the full state to rank 0 (CPU), so they
    load like any other; the optimizer state is keyed by parameter name, so resume an FSDP run with --fsdp."""

    def __init__(self, cfg: TrainConfig):
        self.compute = DTYPES[cfg.dtype]

    def wrap(self, model):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=self.compute, reduce_dtype=torch.float32)
        layer_types = set(getattr(model, "_no_split_modules", None) or ())  # e.g. LlamaDecoderLayer
        for module in model.modules():
            if type(module).__name__ in layer_types:
                fully_shard(module, mp_policy=policy)
        fully_shard(model, mp_policy=policy)  # the rest: embeddings, final norm, LM head
        return model

    def unwrap(self, model):
        return model

    def full_state(self, run: Run, optimizer: bool = True) -> tuple[dict | None, dict | None]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # on rank 0; empty elsewhere
        model_state = get_model_state_dict(run.model, options=options)
        names = {}  # tied weights (embeddings = LM head) are saved once, under their first name
        for name, param in run.model.named_parameters(remove_duplicate=False):
            if names.setdefault(id(param), name) != name:
                model_state.pop(name, None)
        optimizer_state = get_optimizer_state_dict(run.model, run.optimizer, options=options) if optimizer else None
        return model_state, optimizer_state

    def load_optimizer(self, run: Run, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(run.model, run.optimizer, state, options=StateDictOptions(full_state_dict=True))


class _Lines:
    """tqdm redraws its line after a carriage return; Ray forwards worker output to the driver by lines."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.strip("\r\n ")
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


class _CrashingRows:
    """The training rows, except that the process exits (as a killed or OOM-ed worker does) when it first
    loads the rows of the step named in $SDSAT_TRAIN_CRASH (after Ray has recorded the last checkpoint,
    so that the test knows where the run resumes)."""

    def __init__(self, data, rows_per_step: int):
        step, marker = os.environ[CRASH_ENV].split(":", 1)
        self.data, self.rows_per_step, self.step, self.marker = data, rows_per_step, int(step), Path(marker)

    def __len__(self) -> int:
        return len(self.data)

    def batch(self, start: int, count: int):
        if start // self.rows_per_step == self.step and not self.marker.exists():
            import ray.train

            self.marker.touch()
            ray.train.get_all_reported_checkpoints()  # die after Ray has recorded the last checkpoint
            os._exit(1)
        return self.data.batch(start, count)
