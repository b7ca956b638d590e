"""Experiment 2 of the paper with Mixtral-8x7B: TL;DR, mistral-written principles, RMSprop.

    python -m sami_jax.main --config=configs/mixtral_8x7b_tldr.py:as_run --workdir=gs://BUCKET/mixtral_tldr \
        --config.model.path=/path/to/Mixtral-8x7B-v0.1

As run: bf16 master weights and bf16 RMSprop state (the authors loaded the model in bf16), activation
checkpointing.

Mesh: the 8 experts on the expert axis, FSDP over the rest of the slice (the weights without an experts
dim shard over fsdp x expert), data parallel across slices. The batch splits over fsdp x expert, so the
8-query `as_run` step runs on exactly 8 chips per slice unless the rest goes to tensor
(--config.mesh.tensor=-1). See benchmarks/CAPACITY_SECTION.md for what compiles.
"""

from sami_jax.run_config import paper_config

DATA = "data/tldr"


def get_config(settings: str = "as_run"):
    c = paper_config("rmsprop", settings, bf16_master_as_run=True)
    c.task = "tldr"
    c.constitutions = "tldr_mistral"
    c.data.sources = [dict(path=f"{DATA}/train_posts.jsonl", kind="tldr", subset=None, limit=3000)]
    c.data.eval_sources = [dict(path=f"{DATA}/validation_posts.jsonl", kind="tldr", subset=None, limit=250)]
    c.train.remat = "full"
    c.mesh.update(data=1, fsdp=-1, tensor=1, expert=8)
    return c
