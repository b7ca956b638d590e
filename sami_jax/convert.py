"""Convert weights between formats.

    python -m sami_jax.convert --src=PATH --dst=DIR --format=hf|orbax [--dtype=bfloat16] [--max-shard-gb=2]

--src: an HF folder (config.json + safetensors), a .gguf file, or an orbax model folder.
--dst: the folder to write; it must not already hold a model.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sami_jax.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="HF folder, .gguf file or orbax model folder")
    parser.add_argument("--dst", required=True, help="output folder")
    parser.add_argument("--format", choices=("hf", "orbax"), default="hf")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="dtype of the written weights (default: the source's; float32 for GGUF)")
    parser.add_argument("--max-shard-gb", type=float, default=2.0, help="HF safetensors shard size")
    args = parser.parse_args(argv)

    from sami_jax.api import load_model
    from sami_jax.checkpoints.hf import save_hf
    from sami_jax.checkpoints.orbax import save_orbax

    dst = pathlib.Path(args.dst)
    if dst.exists() and any(dst.glob("config.json")):
        parser.error(f"{dst} already holds a model (config.json); choose an empty folder")
    start = time.perf_counter()
    dtype = DTYPES[args.dtype] if args.dtype else None
    model = load_model(args.src, dtype=dtype)
    if args.format == "hf":
        written = save_hf(model.params, model.config, dst, max_shard_bytes=int(args.max_shard_gb * 1024**3),
                          tokenizer=model.tokenizer)
    else:
        written = save_orbax(model.params, model.config, dst, tokenizer=model.tokenizer)
    print(f"wrote {len(written)} files to {dst} ({args.format}) in {time.perf_counter() - start:.1f}s: "
          f"{', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
