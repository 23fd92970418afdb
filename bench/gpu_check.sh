#!/usr/bin/env bash
# The GPU checks, in one script: on a Linux machine with an NVIDIA GPU, install imgpack with the `cuda` extra into
# its own venv, show what `imgpack doctor` sees, run the Z-Image and FLUX.2 parity tests on the GPU, then the
# storage-form benchmark (bf16 and int8 compute on the device) and the diffusers comparison at 1024x1024.
#
#     bash bench/gpu_check.sh                      # needs network for pip, or PIP_FIND_LINKS=DIR of wheels
#     IMGPACK_GPU_VENV=/path/venv bash bench/gpu_check.sh   # reuse a venv that already has imgpack[cuda,test]
#
# Everything it prints goes to stdout; exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${IMGPACK_GPU_VENV:-.venv-gpu}"
if [ ! -x "$venv/bin/imgpack" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    "$venv/bin/pip" install -q -e ".[${IMGPACK_CUDA_EXTRA:-cuda},test]"
fi
py="$venv/bin/python"

echo "== doctor"
"$venv/bin/imgpack" doctor
"$py" -c 'import sys, mlx.core as mx; sys.exit(0 if mx.cuda.is_available() else "MLX sees no CUDA device")'

echo "== parity on the GPU (float32 tiny models against diffusers' reference data)"
"$py" -m pytest -q -p no:cacheprovider tests/test_runtime.py tests/test_flux2.py \
    -k "prompt_embedding or transformer_forward or vae_decode or full_pipeline_image or ollama_flavour"

echo "== storage forms on the GPU (medium Z-Image, 1024x1024, 4 steps)"
"$py" bench/forms.py --forms f32,bf16,int8,int4 --size 1024 --steps 4

# The diffusers comparison needs an interpreter with torch and diffusers: IMGPACK_BENCH_DIFFUSERS_PYTHON=PATH.
if [ -n "${IMGPACK_BENCH_DIFFUSERS_PYTHON:-}" ] && [ -x "$IMGPACK_BENCH_DIFFUSERS_PYTHON" ]; then
    echo "== imgpack on the GPU against diffusers (torch; on the GPU too if its torch has CUDA)"
    "$py" bench/runtime.py --sizes 512,1024 --steps 4 --rounds 1
    "$py" bench/runtime.py --arch flux2 --sizes 512,1024 --steps 4 --rounds 1
fi
