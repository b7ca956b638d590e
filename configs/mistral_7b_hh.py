"""Experiment 1 of the paper: Mistral-7B on HH-RLHF (helpful-base and harmless-base), §7.2 constitutions.

    python -m sami_jax.main --config=configs/mistral_7b_hh.py:as_run --workdir=gs://BUCKET/mistral_7b_hh \
        --config.model.path=/path/to/Mistral-7B-v0.1

`:as_run` (default) reproduces the code behind the published numbers, `:paper` follows Table 1
(run_config.paper_config says what differs). Data: the HH-RLHF train splits (first 10,000 rows of each,
as the authors selected); 1000 of each subset's filtered pairs were used per run.

Mesh: FSDP over every chip of a slice (mesh.fsdp=-1), data parallel across slices (mesh.dcn.data=-1). The
batch is split by query, so `as_run`'s 8-query step splits at most 8 ways: on more chips give the rest to
tensor parallelism (--config.mesh.fsdp=8 --config.mesh.tensor=-1). Fits a v5p-8 (4 chips) with
--config.train.remat=full (benchmarks/CAPACITY_SECTION.md; `python -m sami_jax.aot` checks any slice).
"""

from sami_jax.run_config import paper_config

DATA = "data/hh-rlhf"  # https://huggingface.co/datasets/Anthropic/hh-rlhf, jsonl.gz as released


def get_config(settings: str = "as_run"):
    c = paper_config("adamw", settings)
    c.task = "hh"
    c.constitutions = "hh"
    c.data.sources = [dict(path=f"{DATA}/helpful-base/train.jsonl.gz", kind="hh", subset="helpful", limit=10000),
                      dict(path=f"{DATA}/harmless-base/train.jsonl.gz", kind="hh", subset="harmless", limit=10000)]
    c.data.eval_sources = [
        dict(path=f"{DATA}/helpful-base/test.jsonl.gz", kind="hh", subset="helpful", limit=125),
        dict(path=f"{DATA}/harmless-base/test.jsonl.gz", kind="hh", subset="harmless", limit=125)]
    c.mesh.update(data=1, fsdp=-1, tensor=1, expert=1)
    return c
