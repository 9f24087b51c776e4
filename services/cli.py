"""The `sdsat` command line: training, generation, benchmarks and serving.

    sdsat train --model tiny --tokenizer TOK --corpus code/ --max-steps 30 --output-dir runs/x
    sdsat train --config train.yaml --max-steps 100

Subcommands import their heavy dependencies lazily, so `sdsat train` never loads Ray. Every command
that writes results takes `--json PATH` (`-` = stdout).
"""

from __future__ import annotations

import argparse
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


def cmd_train(args: argparse.Namespace) -> int:
    from models.config import config_from_args
    from models.train import train
    from models.train_config import TrainConfig

    cfg = config_from_args(TrainConfig, args)
    metrics = train(cfg, progress=not args.no_progress)
    write_json(args.json, metrics)
    return 0


def add_train_parser(sub) -> None:
    from models.config import add_arguments
    from models.train_config import TrainConfig

    p = sub.add_parser(
        "train", help="fine-tune a causal LM into an SDSAT model (or train a plain LM with --sat-k 0)",
        description="Fine-tune a Hugging Face causal LM with SAT blocks (SDSAT), or train a plain causal LM "
                    "(--sat-k 0). Options override a YAML --config; unknown keys are errors. A run resumes "
                    "from OUTPUT_DIR/checkpoint-last when present; the final model is in OUTPUT_DIR/final.",
    )
    p.add_argument("--config", help="YAML file of options (keys as below, with underscores)")
    p.add_argument("--json", help="write final metrics as JSON to PATH (- = stdout)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_arguments(p, TrainConfig)
    p.set_defaults(func=cmd_train)


def cmd_serve(args: argparse.Namespace) -> int:
    print("sdsat serve: the Ray Serve service is not built yet (see the project's issues).", file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdsat", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    sub.add_parser("serve", help="start the service (not built yet)").set_defaults(func=cmd_serve)
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
