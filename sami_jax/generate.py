"""Sample from any model.

    python -m sami_jax.generate --model=PATH --prompts=FILE.jsonl --out=FILE.jsonl \\
        [--max-new-tokens=64] [--temperature=0] [--top-p=1] [--top-k=0] [--stop=STR ...] \\
        [--batch-size=16] [--seed=0] [--chat] [--truncate]

Input: one JSON object per line with a "prompt". Output, in input order, one line per prompt:
{"prompt", "text", "token_ids", "length", "finish_reason"}. --chat wraps each prompt as a user turn
with the tokenizer's chat template (when it has one).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from tqdm import tqdm


def read_prompts(path) -> list[str]:
    """The "prompt" of every line of a jsonl file (local or gs://); errors name the file and line."""
    from sami_jax.data.queries import jsonl_rows

    prompts = []
    for n, record in jsonl_rows(path):
        if not isinstance(record.get("prompt"), str):
            raise ValueError(f"{path}:{n}: expected an object with a string \"prompt\"")
        prompts.append(record["prompt"])
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sami_jax.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF folder, .gguf file or orbax model folder")
    parser.add_argument("--prompts", required=True, help="JSONL with a \"prompt\" per line")
    parser.add_argument("--out", required=True, help="JSONL to write")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chat", action="store_true", help="format prompts with the chat template")
    parser.add_argument("--truncate", action="store_true", help="keep the last tokens of too-long prompts")
    args = parser.parse_args(argv)

    from sami_jax.api import load_model
    from sami_jax.sampling import Sampler, SamplingParams
    from sami_jax.tokenizer import apply_chat_template

    try:
        sp = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, stop=tuple(args.stop), seed=args.seed)
        prompts = read_prompts(args.prompts)
    except ValueError as e:
        parser.error(str(e))
    model = load_model(args.model)
    if model.tokenizer is None:
        parser.error(f"{args.model} has no tokenizer files")
    inputs = prompts
    if args.chat:
        template = model.tokenizer.chat_template
        if template is None:
            parser.error(f"{args.model}: --chat, but the tokenizer has no chat template")
        inputs = [apply_chat_template(template, p) for p in prompts]
    sampler = Sampler(model)
    with tqdm(total=len(inputs), unit="prompt", file=sys.stderr) as bar:
        def progress(n):
            bar.update(n)
            s = sampler.stats
            bar.set_postfix(tok_s=f"{s['new_tokens'] / max(s['run_s'], 1e-9):.1f}", compile_s=f"{s['compile_s']:.1f}")

        results = sampler.generate(inputs, sp, batch_size=args.batch_size, truncate=args.truncate,
                                   progress=progress)
    out = pathlib.Path(args.out)
    with open(out, "w", encoding="utf-8") as f:
        for prompt, r in zip(prompts, results, strict=True):
            f.write(json.dumps({"prompt": prompt, "text": r.text, "token_ids": r.token_ids, "length": r.length,
                                "finish_reason": r.finish_reason}) + "\n")
    s = sampler.stats
    dropped = sum(r.prompt_tokens_dropped for r in results)
    print(f"wrote {len(results)} generations to {out}: {s['new_tokens']} new tokens, "
          f"{s['new_tokens'] / max(s['run_s'], 1e-9):.1f} tokens/s after {s['compile_s']:.1f}s of compilation"
          + (f"; {dropped} prompt tokens left-truncated" if dropped else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
