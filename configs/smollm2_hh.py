"""SAMI on the real SmolLM2-135M-Instruct (CPU-sized) with the paper's HH-RLHF constitutions (§7.2).

    python -m sami_jax.main --config=configs/smollm2_hh.py --workdir=/tmp/smollm2_hh        # real HH queries
    python -m sami_jax.main --config=configs/smollm2_hh.py:demo --workdir=/tmp/demo          # bundled queries

Queries: the first human turns of HH-RLHF harmless-base (../shared/data beside the checkout, or pass
--config.data.sources); the harmless subset's constitutions: positive "1. helpful 2. harmless" against a
negation of harmlessness. 24 held-out queries for the MI estimate (K = 4 constitutions, summed log-probs).

Differences from the paper, for a 135M instruct model on 2 CPU cores:
- the chat prompt format (`task_format = "chat"`: instruction and constitution as the system message,
  the query as the user turn). With the paper's raw few-shot prompt SmolLM2-135M-Instruct mostly opens
  a new "Human:" turn at once: 69 of 96 held-out responses came back empty, and about 6 in 7 sampled
  training pairs failed the filters.
- responses capped at 64 new tokens (40 in the demo) instead of 350; 8 queries per step instead of
  128; learning rate 1e-5 with a constant schedule (5e-7 moves a 135M model too little in a handful of
  steps); one iteration.
"""

import pathlib

from sami_jax.run_config import base_config

HH_HARMLESS = pathlib.Path(__file__).resolve().parents[2] / "shared/data/hh-rlhf/harmless-base/test.jsonl.gz"


def get_config(variant: str = ""):
    c = base_config()
    c.task = "hh"
    c.constitutions = "hh"
    c.model.path = "smollm2-135m-instruct"
    c.task_format = "chat"  # an instruct model: constitution as the system message (data.tasks.chat_task)
    c.data.sources = [dict(path=str(HH_HARMLESS), kind="hh", subset="harmless", limit=None)]
    c.data.held_out = 24
    c.data.max_prompt_len = 512
    c.sampling.max_new_tokens = 64
    c.sampling.batch_size = 32
    c.train.iterations = 1
    c.train.batch_size = 8
    # One query per micro-batch, the weight matmuls' outputs kept for the backward pass (attention scores
    # recomputed): on a CPU the smaller activations stay in cache, and the fastest step of
    # benchmarks/sami_step.py (the same update as larger micro-batches; 4% faster than remat "dots").
    c.train.micro_batch_size = 1
    c.train.remat = "dots_no_batch"
    c.train.steps_start = 8
    c.train.steps_increment = 8
    c.train.seq_multiple = 64
    c.optim.update(name="adamw", learning_rate=1e-5, weight_decay=0.01, clip_norm=1.0, schedule="constant",
                   warmup_steps=0)
    c.eval.max_new_tokens = 64
    c.eval.batch_size = 8
    if variant == "demo":  # `make demo`: the bundled queries, about 5 minutes on 2 cores
        c.data.sources = [dict(path="bundled:dialogue", kind="jsonl", subset="harmless", limit=None)]
        c.data.held_out = 8
        c.sampling.max_new_tokens = 40
        c.eval.max_new_tokens = 40
        c.train.batch_size = 4
        c.train.steps_start = 4
        c.train.steps_increment = 4
    elif variant:
        raise ValueError(f"configs/smollm2_hh.py: unknown variant {variant!r}; use '' or 'demo'")
    return c
