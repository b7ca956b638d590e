#!/usr/bin/env bash
# One prepared call for a lent H100/H200 (device tool): uses the machine's own jax, flax, optax, orbax,
# transformers and torch (no registry access there; sami_jax is pure Python, so no install step), checks
# correctness on the GPU, and times ours against the PyTorch/HF reference in the same run:
#   1. the sampler vs HF `generate` (1.1B-shaped bf16, 256 prompts x 256 tokens, 128 new, top-p 0.9);
#   2. the SAMI step vs the same step in PyTorch (1.1B-shaped, bf16 compute, 64 sequences x 512 tokens).
#   run(command="bash benchmarks/gpu.sh", timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 - <<'PY'
import importlib
for m in ("jax", "flax", "optax", "orbax.checkpoint", "transformers", "torch", "tokenizers", "jinja2", "tqdm"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "?"))
    except ImportError as e:
        print(m, "MISSING:", e)
PY
status=0
# 0.6 leaves room for PyTorch, which holds its model in the same process
XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 python3 benchmarks/gpu_sampler.py --json "$OUT/gpu_sampler.json" || status=1
python3 benchmarks/sami_step.py --setting gpu-1.1b --json "$OUT/gpu_sami_step.json" || status=1
exit $status
