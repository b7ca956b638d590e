"""A random tiny model on the bundled dialogue queries: the whole loop (2 iterations) in under a minute.
Tests and smoke runs use it; its numbers mean nothing.

    python -m sami_jax.main --config=configs/tiny.py --workdir=/tmp/tiny
"""

from sami_jax.run_config import base_config


def get_config():
    c = base_config()
    c.model.path = "random"
    c.model.tokenizer = "smollm2-135m-instruct"  # a real tokenizer, so prompts and filters are real text
    c.data.held_out = 4
    c.data.max_prompt_len = 512
    c.sampling.max_new_tokens = 12
    c.sampling.batch_size = 8
    c.train.iterations = 2
    c.train.batch_size = 4
    c.train.micro_batch_size = 2
    c.train.steps_start = 1  # 1, then 2 steps
    c.train.steps_increment = 1
    c.train.seq_multiple = 64
    c.optim.update(name="adamw", learning_rate=1e-3, schedule="constant", warmup_steps=0)
    c.eval.max_new_tokens = 12
    c.eval.batch_size = 4
    c.eval.examples = 2
    c.checkpoint.every_steps = 1
    return c
