"""Experiment 3 of the paper: Llama-3-70B with 20 diverse principles (§7.3), TL;DR posts, CoT sampling.

    python -m sami_jax.main --config=configs/llama3_70b_diverse.py:as_run --workdir=gs://BUCKET/llama_diverse \
        --config.model.path=/path/to/Meta-Llama-3-70B \
        --config.constitutions=PATH/constitutions_opus_diverse/constitutions.json

Per query two of the 15 learned principles with random sides against their full opposite; 5 held out.
4, 8, 12 steps per iteration ("double the number of batches"); as run: lr 1e-6 (Table 1 says 5e-7),
RMSprop with bf16 master weights, up to 500 new tokens for the CoT generation prompt (§6.3).
Mesh: tensor parallel over 8 chips (the 8 KV heads; beyond 8 ways the collectives dominate) x FSDP over
the rest of the slice; data parallel across slices. The 8-query `as_run` step splits the batch over fsdp
only, so up to 64 chips per slice. Fits a v5p-32 (16 chips, benchmarks/CAPACITY_SECTION.md).
"""

from sami_jax.run_config import paper_config

DATA = "data/tldr"


def get_config(settings: str = "as_run"):
    c = paper_config("rmsprop", settings, lr_as_run=1e-6, bf16_master_as_run=True, steps_per_iteration=4)
    c.task = "tldr_cot"
    c.constitutions = "constitutions_opus_diverse/constitutions.json"  # the authors' file (A.15); see above
    c.data.sources = [dict(path=f"{DATA}/train_posts.jsonl", kind="tldr", subset=None, limit=10000)]
    c.data.eval_sources = [dict(path=f"{DATA}/validation_posts.jsonl", kind="tldr", subset=None, limit=250)]
    c.sampling.max_new_tokens = 500
    c.eval.max_new_tokens = 500
    c.train.remat = "full"
    c.mesh.update(data=1, fsdp=-1, tensor=8, expert=1)
    return c
