#!/usr/bin/env bash
# One prepared call for a lent H100/H200 (device tool): installs sami_jax without touching the
# machine's packages (it has jax, flax, orbax, transformers and torch; no registry access), checks
# correctness on the GPU, and times our sampler against HF `generate` on the same weights.
#   run(command="bash benchmarks/gpu.sh", timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # no install step needed: the package is pure Python
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.6            # leave room for PyTorch in the same run
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python - <<'PY'
import importlib
for m in ("jax", "flax", "optax", "orbax.checkpoint", "transformers", "torch", "tokenizers", "jinja2", "tqdm"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "?"))
    except ImportError as e:
        print(m, "MISSING:", e)
PY
python benchmarks/gpu_sampler.py --json "${OUT:-/tmp}/gpu_sampler.json"
