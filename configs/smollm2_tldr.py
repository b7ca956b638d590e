"""SAMI on the real SmolLM2-135M-Instruct with the paper's TL;DR setup (§7.1: the mistral-written principles,
positive against one of three antitheses; summaries start "The post").

    python -m sami_jax.main --config=configs/smollm2_tldr.py --workdir=/tmp/smollm2_tldr

Queries: the 250 Reddit posts of the authors' released response files (../shared/data beside the checkout;
these were the paper's evaluation posts, here split into a training pool and 16 held-out posts). Posts
whose generation prompt exceeds 512 tokens are skipped and counted. CPU-sized like smollm2_hh.py.
"""

import pathlib

from sami_jax.run_config import base_config

POSTS = (pathlib.Path(__file__).resolve().parents[2] / "shared/data/sami/janphilippfranken_sami/experiments/tldr/"
         "results/responses/base-mistral-mistral-constitution-temperature-0.0.json")


def get_config():
    c = base_config()
    c.task = "tldr"
    c.constitutions = "tldr_mistral"
    c.model.path = "smollm2-135m-instruct"
    c.task_format = "chat"  # an instruct model: constitution as the system message (data.tasks.chat_task)
    c.data.sources = [dict(path=str(POSTS), kind="tldr", subset=None, limit=None)]
    c.data.held_out = 16
    c.data.max_prompt_len = 512
    c.sampling.max_new_tokens = 64
    c.train.iterations = 1
    c.train.batch_size = 8
    # the CPU's fastest step, as in configs/smollm2_hh.py
    c.train.micro_batch_size = 1
    c.train.remat = "dots_no_batch"
    c.train.steps_start = 8
    c.train.steps_increment = 8
    c.train.seq_multiple = 64
    c.optim.update(name="adamw", learning_rate=1e-5, schedule="constant", warmup_steps=0)
    c.eval.max_new_tokens = 64
    c.eval.batch_size = 4
    return c
