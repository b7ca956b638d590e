#!/usr/bin/env bash
# One prepared call for a lent H100/H200 (device tool): uses the machine's own jax, flax, optax, orbax,
# transformers and torch (no registry access there; sami_jax is pure Python, so no install step), checks
# correctness on the GPU, and times ours against the PyTorch/HF reference in the same run:
#   1. the sampler vs HF `generate` (1.1B-shaped bf16, 256 prompts x 256 tokens, 128 new, top-p 0.9);
#   2. the SAMI step vs the same step in PyTorch (1.1B-shaped, bf16 compute, 64 sequences x 512 tokens).
# PROFILE=1: the same runs with XLA's command buffers (CUDA graphs) off, so that a profile sees each kernel
# rather than one op per graph, plus a table of where the device time goes (benchmarks/op_profile.py) for a
# prefill and a decode chunk and for one SAMI step; tables and compiled HLO go to $OUT, as does the log.
#   run(command="bash benchmarks/gpu.sh", timeout_s=540)   # about 4 minutes on an H200 in session 16, before
#   the two unrolled-layer variants (each compiles longer)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp}"
exec > >(tee "$OUT/gpu.log") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 - <<'PY'
import importlib
for m in ("jax", "flax", "optax", "orbax.checkpoint", "transformers", "torch", "tokenizers", "jinja2", "tqdm"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "?"))
    except ImportError as e:
        print(m, "MISSING:", e)
PY
profile=()
if [ -n "${PROFILE:-}" ]; then
  export XLA_FLAGS="--xla_gpu_enable_command_buffer= ${XLA_FLAGS:-}"
  profile=(--profile "$OUT")
fi
status=0
# 0.6 leaves room for PyTorch, which holds its model in the same process
XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 python3 benchmarks/gpu_sampler.py --json "$OUT/gpu_sampler.json" \
  --variants per-layer,einsum-prefill \
  "${profile[@]}" || status=1
# cuDNN attention only (the einsum attention stores [t, t] scores: 24% MFU in session 9); the reference keeps
# 4 micro-batches of 16 sequences; ours runs 2 of 32 and 1 of 64 (the best on an H200, 49% MFU in session 16;
# out of memory on an H100), each with the layer scan and with the layers unrolled over per-layer weights
# (`loop`: no copies of weights out of the stacked arrays, no stacked activation buffers; 11% of the H100
# step's kernel time in session 13; not yet timed on a GPU); the last is profiled. XLA's dynamic-slice
# fusion and full while-loop unrolling (variant options xla_NAME=VALUE) measured no change in session 16.
python3 benchmarks/sami_step.py --setting gpu-1.1b --json "$OUT/gpu_sami_step.json" "${profile[@]}" \
  --variants "${SAMI_STEP_VARIANTS:-cudnn:dots_no_batch:m2,cudnn:dots_no_batch:m2:loop,cudnn:dots_no_batch:m1,cudnn:dots_no_batch:m1:loop}" || status=1
exit $status
