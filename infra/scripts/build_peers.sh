#!/usr/bin/env bash
# Installs the optional llama.cpp peer (llama-cpp-python, the `peers` extra) into .venv, built from its
# sdist for this host: `make bench-peers` runs it, `make test` never does. About 8 minutes on 2 cores.
#
# GGML_NATIVE compiles for this CPU. On CPUs with AMX (Intel Xeon Sapphire Rapids and later) the native
# build also compiles ggml's AMX matmul, which crashed in `llama_decode` on the Q4_1 SmolLM2 GGUF on an
# Intel Xeon host here (segfault on the first decode; ggml-org/llama.cpp#20824 reports the same in
# ggml_backend_amx_mul_mat). There the build names the host's AVX-512 sets itself and leaves AMX out.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=.venv/bin
flags=$(grep -m1 '^flags' /proc/cpuinfo || true)
has() { [[ " $flags " == *" $1 "* ]] && echo ON || echo OFF; }
if [[ $(has amx_int8) == ON || $(has amx_tile) == ON ]]; then
    cmake_args="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
    cmake_args+=" -DGGML_AVX512=$(has avx512f) -DGGML_AVX512_VBMI=$(has avx512vbmi)"
    cmake_args+=" -DGGML_AVX512_VNNI=$(has avx512_vnni) -DGGML_AVX512_BF16=$(has avx512_bf16)"
    cmake_args+=" -DGGML_AVX_VNNI=$(has avx_vnni) -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
else
    cmake_args="-DGGML_NATIVE=ON"
fi
echo "building llama-cpp-python with CMAKE_ARGS=$cmake_args"
version=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml)  # the `peers` extra's pin
CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$BIN/python" -m pip install --quiet --force-reinstall --no-deps --no-cache-dir --no-binary llama-cpp-python \
    "llama-cpp-python==$version"
"$BIN/python" -m pip install --quiet -c constraints.txt -e '.[peers]'  # its dependencies (numpy, jinja2, diskcache)
"$BIN/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
