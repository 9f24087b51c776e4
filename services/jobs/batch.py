"""`sdsat batch`: offline generation over a JSONL file with Ray Data, resumable and exactly once.

    sdsat batch --input prompts.jsonl --output out.jsonl                  # a local Ray, one engine
    sdsat batch --input prompts.jsonl --output out.jsonl --replicas 4 --address auto

Input: one JSON object per line, `{"id", "prompt", ...}` or `{"id", "messages", ...}` (OpenAI-style
chat turns, rendered with the model's chat template by `models.weights.chat.encode_chat`; exactly one of
the two) plus the optional parameters of `BatchRequest`. Output: one line per id, `{"id",
"completion", "finish_reason", "usage", "speculation"}`, in completion order. Rows go through
`map_batches` over a fixed pool of engine actors (one GPU each when the cluster has GPUs, a
fraction of a CPU otherwise); inside an actor a batch of rows shares the engine's continuous
batching, each row with its own sampling parameters.

Exactly once: the driver appends each finished block of rows, then flushes and fsyncs, so a killed
run leaves complete lines plus at most one torn line. A re-run drops the torn line, skips the ids
already written and runs the rest; the driver also never writes an id twice, whatever Ray retries.
Malformed lines, duplicate ids and rows the engine rejects go to the errors file with their line
numbers, and the job goes on.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from models.engine import SamplingParams
from models.errors import DataError, InvalidRequestError, SdsatError
from services.serve.api import Speculation, usage
from services.serve.config import DecoderConfig


class ChatMessage(BaseModel):
    """One chat turn, as in the OpenAI chat API (text content only)."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: StrictStr


class BatchRequest(BaseModel):
    """One input line. Greedy by default: batch jobs are mostly evaluations, which must repeat."""

    model_config = ConfigDict(extra="forbid")

    id: StrictStr | StrictInt = Field(..., description="unique within the file: the key for resuming")
    prompt: str | None = Field(None, min_length=1, description="the prompt text (or give messages)")
    messages: list[ChatMessage] | None = Field(None, min_length=1, description="chat turns, rendered with the "
                                               "model's chat template (or give prompt)")
    max_tokens: int = Field(128, ge=1, description="tokens to generate at most")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    top_k: int = Field(0, ge=0, description="top-k sampling, 0 = off")
    seed: int | None = Field(None, ge=0, description="seed for sampling: set it to make a re-run repeat a row")
    stop: StrictStr | list[StrictStr] | None = Field(None, description="stop strings (the text ends before them)")
    speculation: Speculation | None = Field(None, description="decoding method and k for this row, as in the API")
    ignore_eos: bool = Field(False, description="keep generating past EOS")

    @model_validator(mode="after")
    def _one_input(self) -> BatchRequest:
        if (self.prompt is None) == (self.messages is None):
            raise PydanticCustomError("prompt_or_messages", "give exactly one of prompt and messages")
        return self

    def sampling_params(self) -> SamplingParams:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        spec = self.speculation or Speculation()
        return SamplingParams(max_new_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, seed=self.seed, stop=tuple(stops), method=spec.method, k=spec.k,
                              ignore_eos=self.ignore_eos)


def id_key(row_id: str | int) -> str:
    """The id as a set key: its JSON text, so the string "1" and the number 1 stay distinct."""
    return json.dumps(row_id)


def default_errors_path(output: str | Path) -> Path:
    return Path(output).with_suffix(".errors.jsonl")


# ---- input and output files ----------------------------------------------------------------------
@dataclass
class ParsedInput:
    rows: list[tuple[int, BatchRequest]]  # (line number, request): the first valid line of each id
    errors: list[dict]  # {"line", "id", "error"}


def _describe(err: Exception) -> str:
    if isinstance(err, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'line'}: {e['msg']}" for e in err.errors())
    return err.message if isinstance(err, SdsatError) else str(err)


def _raw_id(line: bytes):
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj.get("id") if isinstance(obj, dict) else None


def parse_input(path: str | Path) -> ParsedInput:
    """Validate every line; a bad line becomes an error entry, never an exception."""
    rows, errors, first_line = [], [], {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                request = BatchRequest.model_validate_json(line)
                request.sampling_params()  # the engine's own checks, reported here with the line number
            except (ValidationError, SdsatError) as err:
                errors.append({"line": n, "id": _raw_id(line), "error": _describe(err)})
                continue
            key = id_key(request.id)
            if key in first_line:
                errors.append({"line": n, "id": request.id, "error": f"duplicate id (first on line {first_line[key]})"})
                continue
            first_line[key] = n
            rows.append((n, request))
    return ParsedInput(rows, errors)


def read_done(path: str | Path) -> set[str]:
    """Keys of the rows already written. A torn last line (a run killed mid-write) is cut off the file."""
    path = Path(path)
    if not path.exists():
        return set()
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # bytes past `end` are a torn line
    lines = data[:end].splitlines()
    keep, done = end, set()
    for i, line in enumerate(lines):
        try:
            done.add(id_key(json.loads(line)["id"]))
        except (ValueError, KeyError, TypeError) as err:
            if i < len(lines) - 1:
                raise DataError(f"{path}: line {i + 1} is not a result line; fix or remove it") from err
            keep = end - len(line) - 1  # a garbled last line: drop it too
    if keep < len(data):
        with open(path, "r+b") as f:
            f.truncate(keep)
    return done


def _append_synced(f, lines: list[str]) -> None:
    f.write("".join(lines))
    f.flush()
    os.fsync(f.fileno())


# ---- the engine actor ------------------------------------------------------------------------------
def prompt_ids(tokenizer, request: BatchRequest) -> list[int]:
    """The row's prompt as ids: plain text never becomes special tokens, nor does a message's content."""
    from models.weights.chat import encode_chat, has_chat_template
    from models.weights.tokenizer import encode_text

    if request.prompt is not None:
        return encode_text(tokenizer, request.prompt)
    if not has_chat_template(tokenizer):  # known only here, where the model's tokenizer is loaded
        raise InvalidRequestError("this row has messages but the model's tokenizer has no chat template; "
                                  "give a prompt instead")
    return encode_chat(tokenizer, [m.model_dump() for m in request.messages])


def generate_rows(engine, requests: list[BatchRequest]) -> list[dict]:
    """Run requests through one engine's continuous batching; a rejected row becomes {"id", "error"}."""
    results: list[dict] = []
    pending: dict[str, dict] = {}  # engine request id -> its result
    for request in requests:
        result = {"id": request.id}
        results.append(result)
        try:
            ids = prompt_ids(engine.tokenizer, request)
            pending[engine.add_request(ids, request.sampling_params())] = result
        except SdsatError as err:
            result["error"] = err.message
            continue
        result["completion"] = ""
    while engine.has_work():
        for out in engine.step():
            result = pending.get(out.request_id)
            if result is None:
                continue
            result["completion"] += out.text
            if out.finished:
                result.update(finish_reason=out.finish_reason,
                              usage=usage(out.prompt_tokens, out.completion_tokens, None), speculation=out.stats)
    return results


class EngineWorker:
    """A Ray Data actor holding one engine; each call generates one batch of rows."""

    def __init__(self, decoder: dict):
        from services.serve.decoder import engine_from_config

        self.engine = engine_from_config(DecoderConfig(**decoder))

    def __call__(self, batch: dict) -> dict:
        t0 = time.perf_counter()
        results = generate_rows(self.engine, [BatchRequest.model_validate_json(r) for r in batch["request"]])
        share = (time.perf_counter() - t0) / len(results)  # engine seconds, split evenly over the batch
        return {"key": list(batch["key"]), "result": [json.dumps(r) for r in results],
                "engine_s": [share] * len(results)}


def build_dataset(requests: list[BatchRequest], decoder: DecoderConfig, replicas: int, batch_size: int):
    """The lazy Ray Data pipeline: rows -> map_batches over `replicas` engine actors."""
    import ray

    from services.app import cluster_has_gpus

    use_gpu = decoder.device == "cuda" or (decoder.device == "auto" and cluster_has_gpus())
    decoder = decoder.model_copy(update={"device": "cuda" if use_gpu else "cpu"})
    items = [{"key": id_key(r.id), "request": r.model_dump_json()} for r in requests]
    ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / batch_size)))
    resources = {"num_gpus": 1, "num_cpus": 1} if use_gpu else {"num_cpus": decoder.num_cpus}
    return ds.map_batches(EngineWorker, fn_constructor_kwargs={"decoder": decoder.model_dump()},
                          batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=replicas),
                          batch_format="numpy", **resources)


# ---- the driver --------------------------------------------------------------------------------------
@dataclass
class BatchJob:
    input: str
    output: str
    errors: str | None = None  # default: OUTPUT with the suffix .errors.jsonl
    decoder: DecoderConfig | None = None  # model_dir, engine overrides, device, num_cpus, cpu_threads
    replicas: int = 1  # engine actors
    batch_size: int = 16  # rows per map_batches call, best at the engine's max_batch
    address: str | None = None  # a running Ray cluster; None starts a local one
    object_store_mb: int = 256  # object store of a local Ray (rows are small)
    progress: bool = True


def run_batch(job: BatchJob) -> dict:
    """Generate every input row not yet in the output. Returns a summary of this run."""
    t0 = time.perf_counter()
    parsed = parse_input(job.input)
    done = read_done(job.output)
    todo = [(n, r) for n, r in parsed.rows if id_key(r.id) not in done]
    errors_path = Path(job.errors or default_errors_path(job.output))
    with open(errors_path, "w") as f:  # this run's report: input problems now, rejected rows as they come
        f.writelines(json.dumps(e) + "\n" for e in parsed.errors)
    summary = {"input_rows": len(parsed.rows) + len(parsed.errors), "valid_rows": len(parsed.rows),
               "already_done": len(parsed.rows) - len(todo), "written": 0, "errors": len(parsed.errors),
               "completion_tokens": 0, "engine_s": 0.0, "output": str(job.output), "errors_file": str(errors_path)}
    if todo:
        _execute(job, todo, done, errors_path, summary)
    summary["wall_s"] = time.perf_counter() - t0
    summary["tokens_per_s"] = summary["completion_tokens"] / summary["wall_s"]
    summary["engine_tokens_per_s"] = summary["completion_tokens"] / summary["engine_s"] if summary["engine_s"] else 0
    return summary


def _execute(job: BatchJob, todo: list[tuple[int, BatchRequest]], done: set[str], errors_path: Path,
             summary: dict) -> None:
    import ray
    from ray.data import DataContext
    from tqdm import tqdm

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=job.address, object_store_memory=None if job.address else job.object_store_mb * 2**20,
                 include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})
    DataContext.get_current().enable_progress_bars = False  # ours counts rows and tokens
    line_of = {id_key(r.id): n for n, r in todo}
    ds = build_dataset([r for _, r in todo], job.decoder or DecoderConfig(), job.replicas, job.batch_size)
    t_start = time.perf_counter()
    try:
        with (open(job.output, "a") as out, open(errors_path, "a") as err,
              tqdm(total=summary["valid_rows"], initial=summary["already_done"], unit="row",
                   disable=not job.progress, dynamic_ncols=True) as bar):
            for block in ds.iter_batches(batch_size=None, batch_format="numpy"):
                lines, rejected = [], []
                for key, text, engine_s in zip(block["key"], block["result"], block["engine_s"], strict=True):
                    result = json.loads(text)
                    summary["engine_s"] += float(engine_s)
                    if "error" in result:
                        rejected.append(json.dumps({"line": line_of[key], **result}) + "\n")
                    elif key not in done:
                        done.add(key)
                        lines.append(json.dumps(result) + "\n")
                        summary["completion_tokens"] += result["usage"]["completion_tokens"]
                _append_synced(out, lines)
                _append_synced(err, rejected)
                summary["written"] += len(lines)
                summary["errors"] += len(rejected)
                bar.update(len(lines) + len(rejected))
                bar.set_postfix(tok_s=f"{summary['completion_tokens'] / (time.perf_counter() - t_start):.1f}")
    finally:
        if started_ray:
            ray.shutdown()
