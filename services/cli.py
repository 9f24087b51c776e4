"""The `sdsat` command line: training, generation, benchmarks, serving, batch jobs and evaluation.

    sdsat train --model tiny --tokenizer TOK --corpus code/ --max-steps 30 --output-dir runs/x
    sdsat train --config train.yaml --max-steps 100
    sdsat train --config train.yaml --workers 2            # data-parallel on Ray Train
    sdsat train-speculator --model runs/sdsat/final --corpus code/ --max-steps 2000   # the `mlp` drafter

Subcommands import their heavy dependencies lazily, so `sdsat train` loads Ray only with --workers.
Every command that writes results takes `--json PATH` (`-` = stdout).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def write_json(path: str | None, payload: dict) -> None:
    if not path:
        return
    text = json.dumps(payload, indent=2, default=str) + "\n"
    if path == "-":
        sys.stdout.write(text)
    else:
        with open(path, "w") as f:
            f.write(text)


def _scale_from_args(args: argparse.Namespace, exclude: tuple[str, ...] = ()):
    """The Ray Train options of a training command (ScaleConfig fields, `exclude` left at their defaults)."""
    from models.config import build_config
    from services.jobs.train_ray import ScaleConfig

    return build_config(ScaleConfig, overrides={f.name: getattr(args, f.name) for f in dataclasses.fields(ScaleConfig)
                                                if f.name not in exclude})


def cmd_train(args: argparse.Namespace) -> int:
    from models.config import config_from_args
    from models.training.train_config import TrainConfig

    cfg = config_from_args(TrainConfig, args)
    scale = _scale_from_args(args)
    if scale.workers:
        from services.jobs.train_ray import fit_ray

        metrics = fit_ray(cfg, scale, progress=not args.no_progress)
    else:
        from models.training.train import train

        metrics = train(cfg, progress=not args.no_progress)
    write_json(args.json, metrics)
    return 0


def add_training_run_arguments(p) -> None:
    """The options every training command shares besides its config's own fields."""
    p.add_argument("--config", help="YAML file of options (keys as below, with underscores)")
    p.add_argument("--json", help="write final metrics as JSON to PATH (- = stdout)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def add_train_parser(sub) -> None:
    from models.config import add_arguments
    from models.training.train_config import TrainConfig
    from services.jobs.train_ray import ScaleConfig

    p = sub.add_parser(
        "train", help="fine-tune a causal LM into an SDSAT model (or train a plain LM with --sat-k 0)",
        description="Fine-tune a Hugging Face causal LM with SAT blocks (SDSAT), or train a plain causal LM "
                    "(--sat-k 0). Options override a YAML --config; unknown keys are errors. A run resumes "
                    "from OUTPUT_DIR/checkpoint-last when present; the final model is in OUTPUT_DIR/final. "
                    "--workers N runs the same training data-parallel on N Ray Train workers.",
    )
    add_training_run_arguments(p)
    add_arguments(p, TrainConfig)
    add_arguments(p.add_argument_group("scaling out with Ray Train (not read from --config)"), ScaleConfig)
    p.set_defaults(func=cmd_train)


def cmd_train_adapter(args: argparse.Namespace) -> int:
    from models.config import config_from_args
    from models.errors import ConfigError
    from models.training.train_config import AdapterTrainConfig

    cfg = config_from_args(AdapterTrainConfig, args)
    if args.fsdp:
        raise ConfigError("--fsdp does not apply to the adapter (a few million parameters): workers replicate it")
    scale = _scale_from_args(args, exclude=("fsdp",))
    if scale.workers:
        from services.jobs.train_ray import fit_ray_adapter

        metrics = fit_ray_adapter(cfg, scale, progress=not args.no_progress)
    else:
        from models.training.train_adapter import train

        metrics = train(cfg, progress=not args.no_progress)
    write_json(args.json, metrics)
    return 0


def add_train_adapter_parser(sub) -> None:
    from models.config import add_arguments
    from models.training.train_config import AdapterTrainConfig
    from services.jobs.train_ray import ScaleConfig

    p = sub.add_parser(
        "train-adapter", help="train a lossless SAT adapter on a frozen base (SDSAT without changing the model)",
        description="SDSAT on a frozen base: trainable SAT embeddings plus a LoRA that acts only at SAT rows, "
                    "trained on self-distilled rows (python -m models.training.data.self_distill). A run resumes from "
                    "OUTPUT_DIR/checkpoint-last.pt; the adapter is written to OUTPUT_DIR/final. The full "
                    "fine-tune of the paper stays `sdsat train`. --workers N runs it data-parallel on N Ray "
                    "Train workers. See models/training/train_adapter.py.",
    )
    add_training_run_arguments(p)
    add_arguments(p, AdapterTrainConfig)
    group = p.add_argument_group("scaling out with Ray Train (not read from --config)")
    add_arguments(group, ScaleConfig)
    p.set_defaults(func=cmd_train_adapter)


def cmd_train_speculator(args: argparse.Namespace) -> int:
    from models.config import config_from_args
    from models.errors import ConfigError
    from models.training.train_config import SpeculatorTrainConfig
    from models.training.train_speculator import train_speculator

    cfg = config_from_args(SpeculatorTrainConfig, args)
    if args.fsdp:
        raise ConfigError("--fsdp does not apply to the speculator (a few million parameters): workers replicate it")
    scale = _scale_from_args(args, exclude=("fsdp",))
    if scale.workers:
        from services.jobs.train_ray import fit_ray_speculator

        metrics = fit_ray_speculator(cfg, scale, progress=not args.no_progress)
    else:
        metrics = train_speculator(cfg, progress=not args.no_progress)
    write_json(args.json, metrics)
    return 0


def add_train_speculator_parser(sub) -> None:
    from models.config import add_arguments
    from models.training.train_config import SpeculatorTrainConfig
    from services.jobs.train_ray import ScaleConfig

    p = sub.add_parser(
        "train-speculator", help="train an MLP speculator for a frozen base model (decoding method `mlp`)",
        description="Train the combined token/embedding (MLP) speculator of a frozen base model: teacher forcing "
                    "on the corpus, then the model's own greedy continuations for the last --stage2-fraction of "
                    "the steps. A run resumes from OUTPUT_DIR/checkpoint-last when present; the speculator is "
                    "saved to MODEL/speculator (or --save-to), where `sdsat generate --method mlp` and the "
                    "service find it. Options override a YAML --config; unknown keys are errors.",
    )
    add_training_run_arguments(p)
    add_arguments(p, SpeculatorTrainConfig)
    group = p.add_argument_group("scaling out with Ray Train (not read from --config; recorded data only)")
    add_arguments(group, ScaleConfig)
    p.set_defaults(func=cmd_train_speculator)


def default_model_dir() -> str:
    from models.weights.checkpoint import default_model_dir as embedded  # no pydantic: runs on a bare GPU host

    return embedded()


def cmd_generate(args: argparse.Namespace) -> int:
    from models.engine import Engine, EngineConfig, SamplingParams
    from models.weights.sat import SatSpec

    method = args.method or ("sdsat" if SatSpec.maybe_load(args.model) else "ar")  # a base alone has no SATs
    engine = Engine.from_pretrained(args.model, EngineConfig(
        method=method, k=args.k, max_k=max(16, args.k), device=args.device, dtype=args.dtype, max_batch=1))
    if args.chat:
        from models.weights.chat import encode_chat

        prompt_ids = encode_chat(engine.tokenizer, [{"role": "user", "content": args.prompt}])
    else:
        prompt_ids = engine.tokenizer(args.prompt, add_special_tokens=False)["input_ids"]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop or ()))
    result = engine.generate(prompt_ids, params)
    payload = {"text": result["text"], "token_ids": result["token_ids"], "finish_reason": result["finish_reason"],
               "stats": result["stats"]}
    if args.json:
        write_json(args.json, payload)
    if args.json != "-":
        print(result["text"] if args.chat else args.prompt + result["text"])
    return 0


def add_generate_parser(sub) -> None:
    from models.engine.config import METHODS

    p = sub.add_parser("generate", help="generate a completion with the engine (no Ray)")
    p.add_argument("--model", default=default_model_dir(), help="model directory (default: the embedded model)")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message through the model's "
                                                       "chat template (instruct models)")
    p.add_argument("--method", choices=METHODS, default=None,
                   help="decoding method (default: sdsat for an SDSAT model, else ar)")
    p.add_argument("--k", type=int, default=5, help="draft tokens per iteration (default: 5)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most (default: 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling, 0 = off (default: 0)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (default: random)")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (default: auto)")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16", "int4"],
                   help="auto: bf16 on GPUs and CPUs with native bf16, else fp32; int4: the base's Q4_1 blocks as "
                        "4-bit weights, bf16 activations (CPU; default: %(default)s)")
    p.add_argument("--json", help="write {text, token_ids, finish_reason, stats} to PATH (- = stdout)")
    p.set_defaults(func=cmd_generate)


def cmd_convert(args: argparse.Namespace) -> int:
    """Write sdsat.json for an SDSAT checkpoint released without it (e.g. CodeLlama-SDSAT_L5_7B)."""
    from pathlib import Path

    from models.errors import ConfigError
    from models.weights.sat import SatSpec

    directory = Path(args.model)
    if not (directory / "config.json").is_file():
        raise ConfigError(f"{directory} has no config.json: not a Hugging Face model directory")
    config = json.loads((directory / "config.json").read_text())
    bad = [i for i in args.sat_ids if not 0 <= i < config.get("vocab_size", 0)]
    if bad:
        raise ConfigError(f"SAT ids {bad} are outside the vocabulary (vocab_size {config.get('vocab_size')})")
    spec = SatSpec(ids=tuple(args.sat_ids), k_train=args.k_train)
    path = spec.save(directory)
    write_json(args.json, {"path": str(path), **spec.to_dict()})
    print(f"wrote {path}: SAT ids {list(spec.ids)}, k_train {spec.k_train}", file=sys.stderr)
    return 0


def add_convert_parser(sub) -> None:
    p = sub.add_parser("convert", help="add SAT metadata (sdsat.json) to an existing SDSAT checkpoint",
                       description="Released SDSAT checkpoints carry no SAT metadata. For CodeLlama-SDSAT_L5_7B: "
                                   "sdsat convert --model DIR --sat-ids 32011 --k-train 5")
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--sat-ids", type=int, nargs="+", required=True,
                   help="the SAT id (repeated) or the k_train distinct ids (diverse)")
    p.add_argument("--k-train", type=int, required=True, help="SAT block size the model was trained with")
    p.add_argument("--json", help="write the metadata to PATH (- = stdout)")
    p.set_defaults(func=cmd_convert)


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from services.bench import common as bench

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.toy:  # the tiny counting model of the tests, on counting prompts
        from models.training.toy import counting_documents, train_counting_sdsat

        model = str(train_counting_sdsat(args.toy))
        prompts = [" ".join(d.split()[:6]) for d in counting_documents(args.limit, 6, seed=123)]
        warmup = [" ".join(d.split()[:6]) for d in counting_documents(4, 6, seed=7)]
        sets = None
    else:
        from models.weights.chat import has_chat_template
        from models.weights.checkpoint import load_tokenizer

        model = args.model
        chat = has_chat_template(load_tokenizer(model))  # a model without a template: its prompts in completion form
        prompts = ((bench.humaneval_chat_prompts if chat else bench.humaneval_prompts)(args.limit)
                   + bench.humaneval_prompts(args.completion_limit) + bench.stdlib_snippets(args.heldout_snippets))
        sets = {"humaneval-chat": args.limit, "humaneval": args.completion_limit, "heldout": args.heldout_snippets}
        # what `auto` learns acceptance from before the timed runs: the next HumanEval tasks, not benchmarked
        warmup = (bench.humaneval_chat_prompts if chat else bench.humaneval_prompts)(args.limit + 8)[args.limit:]
    ks = [int(k) for k in args.ks.split(",")]
    if args.cache_compare:
        report = {"cache_comparison": [bench.cache_comparison(model, k) for k in ks]}
        write_json(args.json or "-", report)
        return 0
    if args.engine_compare:
        from services.bench.common import parse_variants
        from services.bench.engine import engine_comparison

        report = engine_comparison(model, prompts, parse_variants(args.engine_compare, "lean"), args.max_new_tokens,
                                   args.reps, progress=not args.no_progress, context=args.max_context)
        write_json(args.json or "-", report)
        for row in report["variants"] if args.json not in (None, "-") else []:
            print(f"{row['dtype']:>9}:{row['forward']:<12} {row['ar_ms_per_token']:7.2f} ms/token "
                  f"({row['fraction_of_floor']:.2f} of its floor, r(8)={row['cost_ratio_r']['8']:.2f}, "
                  f"identical to {report['reference']}: {row['identical_to_reference']:.2f})")
        return 0
    if args.peers:
        from services.bench.peers import peer_comparison, peer_unavailable, print_table

        why = peer_unavailable(args.peers)
        if why:
            print(f"sdsat bench --peers: {why}", file=sys.stderr)
            return 2
        runs = [(m, k) for m in args.methods.split(",") if m in (*bench.K_SWEPT, "prompt-lookup") for k in ks]
        report = peer_comparison(model, prompts, runs, args.dtype, args.max_new_tokens, args.reps,
                                 progress=not args.no_progress)
        write_json(args.json or "-", report)
        if args.json not in (None, "-"):
            print_table(report)
        return 0
    if args.identity:
        from services.bench.common import parse_variants
        from services.bench.identity import identity_report, print_table

        report = identity_report(model, prompts, parse_variants(args.identity, "invariant"), args.max_new_tokens,
                                 args.reps,
                                 progress=not args.no_progress)
        write_json(args.json or "-", report)
        if args.json not in (None, "-"):
            print_table(report)
        return 0
    if args.dtype_compare:
        write_json(args.json or "-", {"dtype_comparison": bench.dtype_comparison(model, prompts, args.max_new_tokens)})
        return 0
    if args.batch_sweep:
        swept = (*bench.K_SWEPT, "prompt-lookup")
        runs = [("ar", 0)] + [(m, k) for m in args.methods.split(",") if m in swept for k in ks]
        runs += [("auto", 0)] if "auto" in args.methods.split(",") else []
        sizes = [int(b) for b in args.batch_sweep.split(",")]
        report = bench.batch_sweep(model, prompts, sizes, runs, args.max_new_tokens, args.reps, not args.no_progress,
                                   dtype=args.dtype, warmup_prompts=warmup)
        write_json(args.json, report)
        for row in report["rows"] if args.json != "-" else []:
            print(f"batch {row['batch']:>3} {row['method']:>12} k={row['k']}  {row['tokens_per_s']:8.1f} tok/s"
                  f"  x{row['vs_ar']:.2f} vs ar")
        return 0
    report = bench.run_bench(model, prompts, args.max_new_tokens, ks, args.reps, args.methods.split(","),
                             progress=not args.no_progress, prompt_sets=sets, dtype=args.dtype,
                             forward=args.forward, compile=args.compile, warmup_prompts=warmup,
                             sat_lora=args.sat_lora)
    write_json(args.json, report)
    if args.plot:
        bench.plot(report, args.plot)
    if args.json != "-":
        tables = {"all prompts": report["results"]}
        tables.update({f"{name} prompts": v["results"] for name, v in report.get("by_prompt_set", {}).items()})
        for title, rows in tables.items():
            print(title)
            for row in rows:
                acc = row["mean_accepted_per_iteration"]
                print(f"{row['method']:>16} k={row['k']:<2} {row['tokens_per_s']:8.1f} tok/s  "
                      f"x{row['speedup_vs_ar']:.2f}  acc/iter={acc if acc is None else round(acc, 2)}  "
                      f"identical={row['identical_fraction']:.2f}")
    return 0


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure ar / sdsat / sdsat-fused / mlp / prompt-lookup / transformers generate",
                       description="Speed of every decoding method on one model in one run "
                                   "(see services/bench/common.py).")
    p.add_argument("--model", default=default_model_dir(), help="model directory (default: the embedded model)")
    p.add_argument("--toy", metavar="DIR", help="use (training it first if needed) the tiny counting model in DIR")
    # Defaults sized so a full run on the 135M default stays under an hour on 2 cores (about 7 s per
    # 128-token generation in fp32 here): 16 chat + 4 completion HumanEval prompts, 4 held-out snippets,
    # k 2 and 3 (the best of the measured sweep), 2 repetitions: 24 prompts x 8 runs x 2 = 384 generations.
    p.add_argument("--limit", type=int, default=16,
                   help="HumanEval prompts in chat form (first N; completion form for a model without a chat "
                        "template; default: %(default)s)")
    p.add_argument("--completion-limit", type=int, default=4,
                   help="HumanEval prompts in completion form (first N; default: %(default)s)")
    p.add_argument("--heldout-snippets", type=int, default=4, help="held-out stdlib snippets (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per prompt (default: 128)")
    p.add_argument("--ks", default="2,3", help="k sweep (default: %(default)s)")
    p.add_argument("--reps", type=int, default=2, help="interleaved repetitions (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "int4"],
                   help="engine dtype; auto = bf16 on CPUs with native bf16, else fp32; int4 = the base's Q4_1 "
                        "blocks as 4-bit weights (default: %(default)s)")
    p.add_argument("--forward", default="lean", choices=["lean", "transformers"],
                   help="the engine's lean Llama forward or transformers' own (default: %(default)s)")
    p.add_argument("--compile", action="store_true",
                   help="the compiled forward (torch.compile; CUDA graphs on GPUs; models/engine/compiled.py), "
                        "timed once its shape classes are compiled")
    p.add_argument("--sat-lora", default="int8", choices=["int8", "weights"],
                   help="int4: the SAT adapter's LoRA as int8 codes or in the adapter's own dtype "
                        "(EngineConfig.sat_lora; default: %(default)s)")
    p.add_argument("--engine-compare", metavar="VARIANTS",
                   help="instead: single-stream ar speed, floor fraction, r(w) and agreement per dtype:forward "
                        "variant, e.g. float32:transformers,float32:lean,int4:lean (the first is the reference); "
                        "forward: lean, transformers, sdpa (lean with PyTorch's ops) or compiled (sdpa through "
                        "torch.compile)")
    p.add_argument("--max-context", type=int, default=4096,
                   help="--engine-compare: each engine's context limit (a compiled forward attends over all of "
                        "it; default: %(default)s)")
    p.add_argument("--identity", metavar="VARIANTS",
                   help="instead: per dtype:attention variant (e.g. int4:invariant,int4:sdpa), the start-up "
                        "self-check, ar ms/token, r(w), and how many outputs of each speculative method equal ar's")
    p.add_argument("--peers", metavar="PEER", choices=["llama.cpp"],
                   help="instead: this engine (ar and --methods x --ks) beside llama.cpp plain and with its prompt "
                        "lookup on the same GGUF, decode only, with r(w) of both (needs `make bench-peers`)")
    p.add_argument("--methods", default="sdsat,sdsat-fused,mlp,prompt-lookup,auto,hf-generate,hf-prompt-lookup",
                   help="methods besides ar (default: all; mlp only for a model with a speculator)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    p.add_argument("--cache-compare", action="store_true",
                   help="instead: one draft-verify step with the slot cache vs transformers' DynamicCache")
    p.add_argument("--dtype-compare", action="store_true",
                   help="instead: greedy ar under fp32 and bf16 on the same prompts, and where the outputs part")
    p.add_argument("--batch-sweep", metavar="SIZES",
                   help="instead: aggregate tokens/s at these batch sizes (e.g. 1,2,4,8,16) per method and k")
    p.add_argument("--json", help="write the report to PATH (- = stdout)")
    p.add_argument("--plot", help="write a PNG of speed-up and acceptance against k")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=cmd_bench)


def cmd_bench_serve(args: argparse.Namespace) -> int:
    from services.bench.common import humaneval_chat_prompts, humaneval_prompts
    from services.bench.serve import parse_methods, run_bench_serve

    prompts = humaneval_chat_prompts(args.limit) if args.chat else humaneval_prompts(args.limit)
    report = run_bench_serve(args.url, prompts, [int(c) for c in args.concurrency.split(",")],
                             args.runs, args.per_client, args.max_tokens, parse_methods(args.methods),
                             stream=not args.no_stream)
    write_json(args.json, report)
    if args.json != "-":
        for row in report["results"]:
            ttft = f"{row['median_ttft_s']:.3f}s" if row["median_ttft_s"] is not None else "-"
            print(f"{row['method']:>16} c={row['concurrency']:<3} median {row['median_latency_s']:.2f}s "
                  f"p99 {row['p99_latency_s']:.2f}s ttft {ttft} {row['tokens_per_s']:.1f} tok/s")
    return 0


def add_bench_serve_parser(sub) -> None:
    p = sub.add_parser("bench-serve", help="latency/throughput of a running service: SDSAT vs plain decoding")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="service base URL (default: %(default)s)")
    p.add_argument("--concurrency", default="1,4,16", help="concurrent clients (default: %(default)s)")
    p.add_argument("--runs", type=int, default=3, help="runs per setting, reported as medians (default: 3)")
    p.add_argument("--per-client", type=int, default=4, help="requests per client per run (default: 4)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per request (default: 128)")
    p.add_argument("--limit", type=int, default=48, help="HumanEval prompts used (default: 48)")
    p.add_argument("--chat", action="store_true", help="chat completions, prompts in the code-task chat form")
    p.add_argument("--methods", default="default,ar",
                   help="what the requests ask for, compared with ar: default (the service's own), ar, auto, or "
                        "method:k, e.g. prompt-lookup:1 (default: %(default)s)")
    p.add_argument("--no-stream", action="store_true", help="answers in one piece instead of streamed ones")
    p.add_argument("--json", help="write the report to PATH (- = stdout)")
    p.set_defaults(func=cmd_bench_serve)


def cmd_bench_prefix(args: argparse.Namespace) -> int:
    from services.bench.prefix import run_bench_prefix

    report = run_bench_prefix(args.model, args.prefix_tokens, args.reps, args.modes.split(","), args.threads,
                              args.write_back_wait, progress=not args.no_progress)
    write_json(args.json, report)
    if args.json != "-":
        for mode in ("engine", "service"):
            for row in report.get(mode, {}).get("rows", []):
                print(f"{mode:>8} {row['case']:>10}  ttft {row['median_ttft_s'] * 1000:7.1f} ms  "
                      f"x{row['vs_cold']:.2f} vs cold  hit rate {row['hit_rate']:.2f}")
    return 0


def add_bench_prefix_parser(sub) -> None:
    p = sub.add_parser("bench-prefix", help="time to first token with the prefix KV cache: cold, warm-local, "
                                            "warm from Redis", description="See services/bench/prefix.py.")
    p.add_argument("--model", default=default_model_dir(), help="model directory (default: the embedded model)")
    p.add_argument("--prefix-tokens", type=int, default=1000, help="shared prefix length (default: %(default)s)")
    p.add_argument("--reps", type=int, default=5, help="repetitions, reported as medians (default: %(default)s)")
    p.add_argument("--modes", default="engine,service", help="engine and/or service (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per engine (default: %(default)s)")
    p.add_argument("--write-back-wait", type=float, default=1.0,
                   help="service mode: seconds left for replica A's asynchronous write-back (default: %(default)s)")
    p.add_argument("--json", help="write the report to PATH (- = stdout)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=cmd_bench_prefix)


def load_serve_config(path: str | None) -> tuple[dict, dict]:
    """(http_options, app args) from a Serve config YAML (the first application's args)."""
    import yaml

    if not path:
        return {}, {}
    data = yaml.safe_load(open(path)) or {}
    apps = data.get("applications") or [{}]
    return data.get("http_options") or {}, apps[0].get("args") or {}


def start_service(config: str | None, host: str | None = None, port: int | None = None, address: str | None = None,
                  object_store_mb: int = 512, on_sigterm=None) -> str:
    """Start the service as `sdsat serve` does (a local Ray unless `address` names a cluster, Serve, the app);
    its base URL. on_sigterm: a SIGTERM handler to set again once Ray has set its own."""
    import ray
    from ray import serve

    from services.app import build_app
    from services.serve.config import AppConfig

    http, app_args = load_serve_config(config)
    host, port = host or http.get("host", "127.0.0.1"), port or http.get("port", 8000)
    app_config = AppConfig(**app_args)  # validate before starting anything
    if not ray.is_initialized():
        ray.init(address=address, object_store_memory=object_store_mb * 2**20 if address in (None, "local") else None,
                 include_dashboard=False, log_to_driver=False)
        if on_sigterm is not None:  # ray.init's handler dumps a stack and aborts, leaving Serve up
            import signal

            signal.signal(signal.SIGTERM, on_sigterm)
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": http.get("request_timeout_s")})
    serve.run(build_app(app_config), name="sdsat", route_prefix="/", blocking=False)
    return f"http://{host}:{port}"


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import time

    import ray
    from ray import serve

    # SIGTERM (systemd, Kubernetes, `kill`) stops it as Ctrl-C does, from the start on (set again after ray.init,
    # whose own handler would dump a stack and abort the process without shutting Serve down)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        url = start_service(args.config, args.host, args.port, args.address, args.object_store_mb,
                            on_sigterm=_interrupt)
        print(f"SDSAT service ready at {url}  (OpenAI API under /v1; Ctrl-C or SIGTERM stops it)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down", file=sys.stderr)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    """Compile the GPU replica's forward into the compile cache ahead of its first start (`make setup` runs
    this). Without a CUDA GPU it does nothing: CPU replicas run the int4 forward in C, built by `make setup`."""
    import time

    import torch

    if not torch.cuda.is_available():
        print("sdsat compile: no CUDA GPU here, nothing to compile (CPU replicas run kernels.c)")
        return 0
    from services.serve.config import AppConfig
    from services.serve.decoder import engine_from_config

    _, app_args = load_serve_config(args.config)
    decoder = AppConfig(**app_args).decoder.model_copy(update={"device": "cuda"})
    t0 = time.perf_counter()
    engine = engine_from_config(decoder)  # a GPU replica's engine: it compiles (and, self-checking, waits)
    if engine.compiled is None:
        print("sdsat compile: this config's GPU engine does not compile (compile: false, or no lean forward)")
        return 0
    engine.compiled.wait()
    report = engine.compiled.report()
    print(json.dumps({"seconds": round(time.perf_counter() - t0, 1), **report}, indent=2))
    return 1 if report["failed"] else 0


def add_compile_parser(sub) -> None:
    p = sub.add_parser("compile", help="compile the GPU replica's forward into the compile cache (no-op on CPUs)")
    p.add_argument("--config", default="infra/serve_config.yaml", help="Serve config YAML (default: %(default)s)")
    p.set_defaults(func=cmd_compile)


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="start the Ray Serve service (router + autoscaled decoders)")
    p.add_argument("--config", default="infra/serve_config.yaml", help="Serve config YAML (default: %(default)s)")
    p.add_argument("--host", default=None, help="listen address (default: the config's, else 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="listen port (default: the config's, else 8000)")
    p.add_argument("--address", default=None, help="join a running Ray cluster (e.g. auto) instead of starting one")
    p.add_argument("--object-store-mb", type=int, default=512, help="object store cap of a local Ray (MiB)")
    p.set_defaults(func=cmd_serve)


def decoder_from_args(args: argparse.Namespace):
    """The engine of `batch` and `eval` actors, configured as the service's decoder (unset = its default)."""
    from services.serve.config import DecoderConfig

    engine = {k: v for k, v in {"method": args.method, "k": args.k, "max_batch": args.batch_size,
                                "dtype": args.dtype, "max_context": args.max_context}.items() if v is not None}
    given = {"num_cpus": args.num_cpus, "cpu_threads": args.threads}
    return DecoderConfig(model_dir=args.model, engine=engine, device=args.device,
                         **{k: v for k, v in given.items() if v is not None})


def add_engine_job_arguments(p) -> None:
    """Options shared by `batch` and `eval`: the model, its engine actors and the Ray cluster."""
    from models.engine.config import METHODS
    from services.serve.config import DecoderConfig

    fields = DecoderConfig.model_fields
    p.add_argument("--model", default=default_model_dir(), help="model directory (default: the embedded model)")
    p.add_argument("--replicas", type=int, default=1, help="engine actors (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16,
                   help="rows per actor call, also the engine's KV slots (default: %(default)s)")
    p.add_argument("--method", choices=METHODS, default=None, help="decoding method (default: the engine's)")
    p.add_argument("--k", type=int, default=None, help="draft tokens per iteration (default: the engine's)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16", "int4"], default="float32",
                   help="engine dtype; auto = bf16 on GPUs and CPUs with native bf16, else fp32 (default: "
                        "%(default)s)")
    p.add_argument("--max-context", type=int, default=2048,
                   help="tokens per KV slot (prompt + output; slots are preallocated; default: %(default)s)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: one GPU per actor when the cluster has GPUs, else CPU (default: %(default)s)")
    p.add_argument("--num-cpus", type=float, default=None,
                   help=f"CPUs reserved per CPU actor (default: {fields['num_cpus'].default})")
    p.add_argument("--threads", type=int, default=None,
                   help=f"torch threads per CPU actor (default: {fields['cpu_threads'].default})")
    p.add_argument("--address", default=None, help="join a running Ray cluster (e.g. auto) instead of starting one")
    p.add_argument("--object-store-mb", type=int, default=256, help="object store cap of a local Ray (MiB)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--json", help="write the summary to PATH (- = stdout)")


def batch_job_from_args(args: argparse.Namespace, input_path: str, output: str, errors: str | None = None):
    from services.jobs.batch import BatchJob

    return BatchJob(input=input_path, output=output, errors=errors, decoder=decoder_from_args(args),
                    replicas=args.replicas, batch_size=args.batch_size, address=args.address,
                    object_store_mb=args.object_store_mb, progress=not args.no_progress)


def cmd_batch(args: argparse.Namespace) -> int:
    from services.jobs.batch import run_batch

    summary = run_batch(batch_job_from_args(args, args.input, args.output, args.errors))
    write_json(args.json, summary)
    if args.json != "-":
        print(f"{summary['written']} rows written to {summary['output']} ({summary['already_done']} done before), "
              f"{summary['errors']} errors in {summary['errors_file']}; "
              f"{summary['completion_tokens']} tokens, {summary['tokens_per_s']:.1f} tok/s", file=sys.stderr)
    return 0


def add_batch_parser(sub) -> None:
    p = sub.add_parser(
        "batch", help="generate completions for a JSONL file of prompts with Ray Data (resumable)",
        description='Each input line is {"id", "prompt", ...} with optional max_tokens, temperature, top_p, top_k, '
                    'seed, stop, speculation, ignore_eos (greedy by default). Output lines are {"id", "completion", '
                    '"finish_reason", "usage", "speculation"}. A re-run skips ids already in the output, so a killed '
                    'job resumes where it stopped. See services/jobs/batch.py.')
    p.add_argument("--input", required=True, help="JSONL file of prompts")
    p.add_argument("--output", required=True, help="JSONL file of results (appended to; resumed from)")
    p.add_argument("--errors", default=None,
                   help="JSONL report of malformed lines and rejected rows (default: OUTPUT with suffix .errors.jsonl)")
    add_engine_job_arguments(p)
    p.set_defaults(func=cmd_batch)


def cmd_eval_humaneval(args: argparse.Namespace) -> int:
    from services.jobs.humaneval import run_humaneval
    from services.jobs.sandbox import SandboxLimits

    limits = SandboxLimits(timeout_s=args.timeout, cpu_s=args.cpu_s, memory_mb=args.memory_mb)
    report = run_humaneval(batch_job_from_args(args, "", args.output), args.limit, args.max_tokens, limits,
                           args.workers, form=args.form)
    write_json(args.json, report)
    if args.json != "-":
        gen = report["generation"]
        print(f"pass@1 {report['pass@1']:.4f} ({report['passed']}/{report['problems']})  "
              f"{gen['tokens_per_s']:.1f} tok/s (engine {gen['engine_tokens_per_s']:.1f})  "
              f"accepted/iteration {report['mean_accepted_per_iteration']:.2f}  -> {report['results']}")
    return 0


def add_eval_parser(sub) -> None:
    from services.jobs.sandbox import SandboxLimits

    p = sub.add_parser("eval", help="functional-correctness benchmarks of a model (HumanEval)")
    benchmarks = p.add_subparsers(dest="benchmark", required=True)
    h = benchmarks.add_parser("humaneval", help="pass@1 on HumanEval: a batch job, then each sample's tests in a "
                                                "sandboxed subprocess", description="See services/jobs/humaneval.py.")
    h.add_argument("--limit", type=int, default=20, help="first N problems, 0 = all 164 (default: %(default)s)")
    h.add_argument("--form", choices=["auto", "completion", "chat"], default="auto",
                   help="chat: the prompt in a user message, the answer's code block checked; auto: chat when the "
                        "model's tokenizer has a chat template, else completion (default: %(default)s)")
    h.add_argument("--max-tokens", type=int, default=None,
                   help="tokens per answer at most (default: 256 in completion form, 384 in chat form)")
    h.add_argument("--output", default="humaneval.jsonl",
                   help="per-problem results; completions go to OUTPUT.completions.jsonl (default: %(default)s)")
    h.add_argument("--workers", type=int, default=2, help="tests run at once (default: %(default)s)")
    h.add_argument("--timeout", type=float, default=SandboxLimits.timeout_s,
                   help="wall-clock seconds per sample (default: %(default)s)")
    h.add_argument("--cpu-s", type=int, default=SandboxLimits.cpu_s,
                   help="CPU seconds per sample (default: %(default)s)")
    h.add_argument("--memory-mb", type=int, default=SandboxLimits.memory_mb,
                   help="address-space limit per sample in MiB (default: %(default)s)")
    add_engine_job_arguments(h)
    h.set_defaults(func=cmd_eval_humaneval)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdsat", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_train_adapter_parser(sub)
    add_train_speculator_parser(sub)
    add_generate_parser(sub)
    add_convert_parser(sub)
    add_bench_parser(sub)
    add_bench_serve_parser(sub)
    add_bench_prefix_parser(sub)
    add_serve_parser(sub)
    add_compile_parser(sub)
    add_batch_parser(sub)
    add_eval_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from models.errors import SdsatError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SdsatError as err:
        print(f"sdsat {args.command}: error: {err.message}", file=sys.stderr)
        return 2



if __name__ == "__main__":
    sys.exit(main())
