"""Generation speed: our Sampler vs HF transformers `generate` (PyTorch), same SmolLM2-135M-Instruct
weights (the real GGUF, float32), same prompts, batch and lengths, in one run.

    python benchmarks/sampler.py [--json PATH] [--threads N]

Prompts are real HH-RLHF dialogues cut to about 128 tokens (batch 16) and one of them (batch 1); 64 new
tokens, greedy and top-p 0.9. Reported: new tokens per second of the timed call (ours after its compile,
which is printed apart; HF after one warm-up call). EOS is disabled on both sides so every row produces
exactly 64 tokens. ratio = ours / reference; the targets are >= 2 at batch 16 and >= 1 at batch 1.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pathlib
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the records here")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()

    import jax
    import torch
    import transformers

    import sami_jax
    from sami_jax.sampling import Sampler, SamplingParams

    torch.set_num_threads(args.threads)
    from sami_jax.demo import smollm2_gguf

    gguf = smollm2_gguf()
    model = sami_jax.load_model(gguf)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                           dtype=torch.float32).eval()
    with gzip.open(HH, "rt") as f:
        texts = [json.loads(line)["chosen"] for line in f]
    prompts = [model.tokenizer.encode(t)[:128] for t in texts if len(model.tokenizer.encode(t)) >= 120][:16]
    n = args.new_tokens
    records = []
    for batch in (16, 1):
        rows = prompts[:batch]
        for label, sp, hf_kwargs in [
            ("greedy", SamplingParams(max_new_tokens=n), dict(do_sample=False)),
            ("top-p 0.9", SamplingParams(max_new_tokens=n, temperature=1.0, top_p=0.9),
             dict(do_sample=True, top_p=0.9, temperature=1.0, top_k=0)),
        ]:
            sampler = Sampler(model, chunk=16)
            sampler.generate(rows, sp, eos_ids=[])  # compiles
            compile_s = sampler.stats["compile_s"]
            start = time.perf_counter()
            out = sampler.generate(rows, sp, eos_ids=[])
            ours_s = time.perf_counter() - start
            assert all(r.length == n for r in out)

            width = max(len(r) for r in rows)
            ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
            gen = dict(attention_mask=mask, max_new_tokens=n, min_new_tokens=n, pad_token_id=0, **hf_kwargs)
            with torch.no_grad():
                hf.generate(ids, **{**gen, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
                start = time.perf_counter()
                hf.generate(ids, **gen)
                ref_s = time.perf_counter() - start
            ours, ref = batch * n / ours_s, batch * n / ref_s
            records.append({"setting": f"batch {batch}, {label}, prompt ~{width} + {n} new", "ours": ours,
                            "reference": ref, "unit": "new tokens/s", "ratio": ours / ref,
                            "ours_compile_s": compile_s})
            print(f"{records[-1]['setting']:40s} ours {ours:8.1f}  HF {ref:8.1f} new tokens/s  ratio {ours / ref:5.2f}"
                  f"  (our compile {compile_s:.1f}s)", flush=True)
    print(f"machine: {os.cpu_count()} CPUs, jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"torch {torch.__version__} ({args.threads} threads), transformers {transformers.__version__}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
