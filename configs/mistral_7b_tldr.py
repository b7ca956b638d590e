"""Experiment 2 of the paper: Mistral-7B on TL;DR with the mistral-written principles (§7.1).

    python -m sami_jax.main --config=configs/mistral_7b_tldr.py:as_run --workdir=gs://BUCKET/mistral_7b_tldr \
        --config.model.path=/path/to/Mistral-7B-v0.1

Data: the TL;DR posts of openai/summarize_from_feedback "comparisons" train `info` (deduplicated by id, the
first 3000) as jsonl rows with a `post` field; evaluation on 250 validation posts. For the claude-opus
principles pass the authors' directory of 0..5.json: --config.constitutions=PATH/constitutions_opus.

Mesh and capacity as configs/mistral_7b_hh.py (same model and shapes).
"""

from sami_jax.run_config import paper_config

DATA = "data/tldr"


def get_config(settings: str = "as_run"):
    c = paper_config("adamw", settings)
    c.task = "tldr"
    c.constitutions = "tldr_mistral"
    c.data.sources = [dict(path=f"{DATA}/train_posts.jsonl", kind="tldr", subset=None, limit=3000)]
    c.data.eval_sources = [dict(path=f"{DATA}/validation_posts.jsonl", kind="tldr", subset=None, limit=250)]
    c.mesh.update(data=1, fsdp=-1, tensor=1, expert=1)
    return c
