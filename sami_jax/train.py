"""The SAMI iterative loop (sami-method.md §4), resumable at any point.

For t = 1..N: sample one response per (query, constitution) with pi_{t-1} (pi_0 = the base model) on the
task's generation prompt, post-process and filter (§3); restart from the base weights and train
steps(t) SAMI steps on the filtered pairs (training prompts with the principle order reshuffled per
constitution, §3.7); checkpoint; evaluate pi_t on held-out queries: the paper's MI estimate (§2.3,
summed log-probs over K constitutions) and the response length per constitution. Iteration 0 is the
base model's evaluation.

Workdir layout (everything a rerun needs to continue where a killed run stopped):
    config.json                 the resolved config
    checkpoints/                orbax: train state (params, optimizer, step) + meta (iteration, step, data position)
    iterations/<t>/data.jsonl   iteration t's filtered training pairs (written once, atomically)
    iterations/<t>/eval.json    pi_t's held-out evaluation (t = 0: the base model)
    metrics.jsonl, tensorboard/ per-step and per-iteration metrics
    report/report.md            Markdown report with PNG plots (rewritten after every iteration)

Everything random is seeded from `config.seed` and the iteration, so a resumed run computes exactly
what the uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from tqdm.auto import tqdm

from sami_jax.api import Model, load_model
from sami_jax.checkpoints import CheckpointError
from sami_jax.checkpoints.manager import PreemptionGuard, RunCheckpointer
from sami_jax.data.constitutions import load_constitutions, shuffle_principles
from sami_jax.data.queries import bundled_queries, load_queries_counted, split_queries
from sami_jax.data.tasks import chat_task, get_task
from sami_jax.distributed import agree, global_array, host_array
from sami_jax.models.config import ModelConfig
from sami_jax.models.params import init_params, num_params
from sami_jax.optim import OptimConfig
from sami_jax.perf import peak_flops, train_flops
from sami_jax.report import MetricsWriter, read_metrics, write_report
from sami_jax.run_config import run_mesh, steps_for, validate
from sami_jax.sami import build_pair_batch, init_train_state, logprob_matrix, prompt_window, response_window, sami_step
from sami_jax.sampling import Sampler, SamplingParams
from sami_jax.sharding import Sharder, param_shardings
from sami_jax.tokenizer import load_tokenizer

log = logging.getLogger("sami_jax")


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, no usable data); the message says what was kept."""


class Preempted(Exception):
    """SIGTERM arrived; the state is saved and the same command resumes."""


@dataclasses.dataclass
class Query:
    text: str
    subset: str | None


# ------------------------------------------------------------------------------------------------ setup
def _resolve_path(path: str) -> str:
    """A model or tokenizer path, with the name "smollm2-135m-instruct" standing for the bundled GGUF."""
    if path == "smollm2-135m-instruct":
        from sami_jax.demo import smollm2_gguf

        return str(smollm2_gguf())
    return path


def load_base_model(config, mesh) -> Model:
    """The base policy pi_BASE on `mesh`, params in config.model.param_dtype."""
    dtype = jnp.dtype(config.model.param_dtype)
    path = _resolve_path(config.model.path)
    if path == "random":
        tok_path = _resolve_path(config.model.tokenizer)
        if not tok_path:
            raise ValueError("config.model.path = 'random' needs config.model.tokenizer (a tokenizer path)")
        tokenizer = load_tokenizer(tok_path)
        r = config.model.random
        model_config = ModelConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=r.hidden_size, intermediate_size=r.intermediate_size,
            num_layers=r.num_layers, num_heads=r.num_heads, num_kv_heads=r.num_kv_heads, head_dim=r.head_dim,
            max_position_embeddings=r.max_position_embeddings, tie_word_embeddings=r.tie_word_embeddings,
            bos_token_id=tokenizer.bos_id, eos_token_ids=tuple(tokenizer.eos_ids), pad_token_id=tokenizer.pad_id)
        sharder = Sharder.create(mesh)
        params = init_params(model_config, jax.random.key(config.seed), dtype, param_shardings(model_config, sharder))
        return Model(model_config, params, tokenizer, sharder)
    model = load_model(path, dtype=dtype, mesh=mesh)
    if config.model.tokenizer:
        model.tokenizer = load_tokenizer(config.model.tokenizer)
    if model.tokenizer is None:
        raise ValueError(f"{path}: the model has no tokenizer; set config.model.tokenizer")
    return model


def _source_queries(src: dict, skip_bad_lines: bool) -> tuple[list[Query], int]:
    path = src["path"]
    if path.startswith("bundled:"):
        texts, bad = bundled_queries(path.split(":", 1)[1]), 0
    else:
        texts, bad = load_queries_counted(path, kind=src.get("kind") or "auto", skip_bad_lines=skip_bad_lines)
    if src.get("limit"):
        texts = texts[: src["limit"]]
    return [Query(t, src.get("subset")) for t in texts], bad


def _read_sources(sources, skip_bad_lines: bool) -> tuple[list[Query], int]:
    """The queries of every source in order, and the malformed lines skipped."""
    queries, bad = [], 0
    for src in sources:
        qs, n = _source_queries(dict(src), skip_bad_lines)
        queries += qs
        bad += n
    return queries, bad


def load_data(config) -> tuple[list[Query], list[Query], dict[str, int]]:
    """(train pool, held-out queries, counts). The pool is shuffled with the run's seed."""
    pool, bad = _read_sources(config.data.sources, config.data.skip_bad_lines)
    if config.data.eval_sources:
        held, bad_eval = _read_sources(config.data.eval_sources, config.data.skip_bad_lines)
        pool, bad = split_queries(pool, 0, config.seed)[0], bad + bad_eval  # the same seeded shuffle
    else:
        pool, held = split_queries(pool, config.data.held_out, config.seed)
    return pool, held, {"bad_lines": bad}


def fingerprint(model_config: ModelConfig) -> dict:
    c = model_config
    return {"architecture": c.architecture, "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
            "num_layers": c.num_layers, "num_heads": c.num_heads, "num_kv_heads": c.num_kv_heads,
            "num_experts": c.num_experts, "num_params": num_params(c)}


def _write_atomic(path: epath.Path, text: str) -> None:
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(text)
    tmp.rename(path)


# ------------------------------------------------------------------------------------------------ runner
class Runner:
    """One SAMI run in one workdir. `run()` does (or finishes) every iteration and writes the report."""

    def __init__(self, config, workdir: str | os.PathLike):
        validate(config)
        self.config = config
        self.workdir = epath.Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.primary = jax.process_index() == 0
        self.mesh = run_mesh(config)
        self.base = load_base_model(config, self.mesh)
        self.tokenizer = self.base.tokenizer
        self.task = get_task(config.task)
        if config.task_format == "chat":
            self.task = chat_task(self.task, self.tokenizer.chat_template)
        self.scheme = load_constitutions(config.constitutions)
        self.pool, self.held_out, self.data_counts = load_data(config)
        self.ckpt = RunCheckpointer(self.workdir / "checkpoints", keep=config.checkpoint.keep,
                                    async_save=config.checkpoint.async_save, fingerprint=fingerprint(self.base.config))
        if self.primary:
            (self.workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
        self.writer = MetricsWriter(self.workdir, enabled=self.primary)
        self.sampler = Sampler(self.base, chunk=16)
        self.optim = OptimConfig(**dict(config.optim))
        compute = config.model.compute_dtype
        self.compute_dtype = jnp.dtype(compute) if compute and compute != config.model.param_dtype else None
        self.sharder = self.base.sharder
        low_precision = (self.compute_dtype or jnp.dtype(config.model.param_dtype)) in (jnp.bfloat16, jnp.float16)
        self.attention_impl = config.train.attention
        if self.attention_impl == "auto":
            self.attention_impl = "cudnn" if jax.default_backend() == "gpu" and low_precision else "einsum"
        # Scoring runs in the params' dtype; cuDNN needs bf16/fp16 there too.
        low_precision_params = jnp.dtype(config.model.param_dtype) in (jnp.bfloat16, jnp.float16)
        self.score_attention = self.attention_impl if low_precision_params else "einsum"
        self.shared = config.train.share_prompts and self.attention_impl == "einsum"
        self.score_shared = config.train.share_prompts and self.score_attention == "einsum"
        self._score_fn = jax.jit(logprob_matrix, static_argnames=("config", "reduce", "response_len", "prompts_shared",
                                                                  "prompt_len", "attention_impl"))
        self.peak = peak_flops(jax.devices()[0])
        self._judge = None  # made on first use (a local judge loads a model)
        self.started = time.strftime("%Y-%m-%d %H:%M:%S")

    # ---------------------------------------------------------------------------------------- paths
    def _iter_dir(self, t: int) -> epath.Path:
        d = self.workdir / "iterations" / str(t)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _cum_steps(self, t: int) -> int:
        """Global optimizer steps after iteration t (the checkpoint numbering)."""
        return sum(steps_for(self.config, i) for i in range(1, t + 1))

    # ---------------------------------------------------------------------------------------- sampling
    def _generate(self, params, prompts: Sequence[str], max_new_tokens: int, desc: str, guard) -> list[str]:
        """Post-processed responses to `prompts` from the policy `params`, batch by batch."""
        cfg = self.config.sampling
        sp = SamplingParams(max_new_tokens=max_new_tokens, temperature=cfg.temperature,
                            top_p=cfg.top_p if cfg.temperature > 0 else 1.0, stop=self.task.stop_strings,
                            seed=self.config.seed)
        self.sampler.params = params
        out: list[str] = []
        bs = cfg.batch_size
        with tqdm(total=len(prompts), desc=desc, unit="seq", disable=not self.primary) as bar:
            for lo in range(0, len(prompts), bs):
                if guard.should_stop():
                    raise Preempted(f"during {desc}")
                gens = self.sampler.generate(list(prompts[lo:lo + bs]), sp, batch_size=bs)
                out += [self.task.postprocess(g.text) for g in gens]
                bar.update(len(gens))
        self.sampler.release()  # training needs the memory of its per-layer weights
        return out

    def _fits(self, prompt: str) -> bool:
        return len(self.tokenizer.encode(prompt, add_bos=self.tokenizer.add_bos_default)) <= \
            self.config.data.max_prompt_len

    def sample_iteration(self, t: int, params, guard) -> tuple[list[dict], dict[str, int]]:
        """Iteration t's training pairs: sampled with `params` (pi_{t-1}), filtered, principles shuffled."""
        cfg = self.config
        need = steps_for(cfg, t) * cfg.train.batch_size
        pool = self.pool
        if cfg.data.alternate_splits:
            half = len(pool) // 2
            pool = pool[:half] if t % 2 else pool[half:]
        rng = random.Random(f"{cfg.seed}-constitutions-{t}")
        records, counts = [], {"kept": 0, "dropped": 0, "too_long": 0}
        cursor = 0
        while len(records) < need and cursor < len(pool):
            want = math.ceil((need - len(records)) * cfg.sampling.oversample)
            chunk = []
            while len(chunk) < want and cursor < len(pool):
                q = pool[cursor]
                cursor += 1
                cons = list(self.scheme.training_pair(rng, q.subset))
                prompts = [self.task.generation_prompt(c, q.text) for c in cons]
                if not all(self._fits(p) for p in prompts):
                    counts["too_long"] += 1
                    continue
                chunk.append((q, cons, prompts))
            flat = [p for _, _, prompts in chunk for p in prompts]
            responses = self._generate(params, flat, cfg.sampling.max_new_tokens, f"iteration {t}: sampling", guard)
            for i, (q, cons, _) in enumerate(chunk):
                ys = responses[2 * i: 2 * i + 2]
                if not self.task.keep_pair(ys):
                    counts["dropped"] += 1
                    continue
                counts["kept"] += 1
                records.append({"query": q.text, "subset": q.subset, "constitutions": cons, "responses": ys,
                                "train_prompts": [self.task.training_prompt(shuffle_principles(c, rng), q.text)
                                                  for c in cons]})
        if not records:
            raise TrainingError(f"iteration {t}: every sampled pair was filtered out ({counts}); nothing to train on")
        if len(records) < need:
            log.warning("iteration %d: %d pairs survived the filters, %d are needed; they are reused in order",
                        t, len(records), need)
        records = records[:need]
        random.Random(f"{cfg.seed}-order-{t}").shuffle(records)
        counts["pool_used"] = cursor
        return records, counts

    def iteration_data(self, t: int, params_fn: Callable[[], Any], guard) -> list[dict]:
        path = self._iter_dir(t) / "data.jsonl"
        if agree(path.exists()):  # process 0 writes it; every process must agree on sampling (collectives)
            return [json.loads(line) for line in path.read_text().splitlines()]
        records, counts = self.sample_iteration(t, params_fn(), guard)
        if self.primary:
            _write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
            (self._iter_dir(t) / "sampling.json").write_text(json.dumps(counts))
        self.writer.write(self._cum_steps(t - 1), {f"sample/{k}": v for k, v in counts.items()}, iteration=t)
        return records

    # ---------------------------------------------------------------------------------------- training
    def _step_batch(self, records: list[dict], step: int, seq_len: int, prompt_len: int, response_len: int):
        cfg = self.config.train
        b = cfg.batch_size
        rows = [records[(step * b + i) % len(records)] for i in range(b)]
        batch = build_pair_batch(self.tokenizer, [r["train_prompts"] for r in rows], [r["responses"] for r in rows],
                                 keep_eos=cfg.keep_eos, pad_to_multiple=seq_len)
        assert batch.tokens.shape[-1] == seq_len and response_window(batch.loss_mask, 1) <= response_len
        assert prompt_window(batch.loss_mask, 1) <= prompt_len
        a = b // cfg.micro_batch_size
        arrays = [x.reshape(a, cfg.micro_batch_size, *x.shape[1:]) for x in
                  (batch.tokens, batch.attention, batch.loss_mask)]
        sharding = self.sharder.sharding(arrays[0].shape, (None, "batch", None, None, None))
        return [global_array(x, sharding) for x in arrays], int(batch.attention.sum()), int(batch.loss_mask.sum())

    def _lengths(self, records: list[dict]) -> tuple[int, int, int]:
        """(sequence length, prompt window, response window) of an iteration's steps: one compile per
        iteration."""
        eos = int(self.config.train.keep_eos)
        prompt = max(len(self.tokenizer.encode(p, add_bos=self.tokenizer.add_bos_default))
                     for r in records for p in r["train_prompts"])
        response = max(len(self.tokenizer.encode(y)) + eos for r in records for y in r["responses"])
        m = self.config.train.seq_multiple
        seq_len = -(-(prompt + response) // m) * m
        return seq_len, min(-(-prompt // 16) * 16, seq_len), -(-response // 16) * 16

    def _new_state(self):
        """A fresh train state from the base params with every leaf on the mesh: init_train_state leaves its
        step counters on one device, which a run over several processes can neither pass to sami_step nor
        restore a checkpoint into."""
        mesh_devices = set(self.mesh.devices.flat)
        return jax.tree.map(lambda x: x if x.sharding.device_set == mesh_devices else
                            global_array(x, self.sharder.replicated()), init_train_state(self.base.params, self.optim))

    def train_iteration(self, t: int, records: list[dict], guard):
        """Trains pi_t from the base weights (or from this iteration's last checkpoint); returns its params."""
        cfg = self.config
        n_steps = steps_for(cfg, t)
        first, last = self._cum_steps(t - 1), self._cum_steps(t)
        state = self._new_state()
        latest = self.ckpt.latest_step()
        if latest is not None and latest > first:
            state, meta = self.ckpt.restore(latest, state)
            log.info("iteration %d: resumed at step %d of %d", t, meta["step"], n_steps)
        start = int(state.step)
        if start >= n_steps:
            return state.params
        lengths = self._lengths(records)
        kwargs = dict(config=self.base.config, optim=self.optim, reduce=cfg.train.reduce, remat=cfg.train.remat,
                      compute_dtype=self.compute_dtype, sharder=self.sharder, response_len=lengths[2],
                      attention_impl=self.attention_impl, prompts_shared=self.shared,
                      prompt_len=lengths[1] if self.shared else None, scan_layers=cfg.train.scan_layers)
        arrays, _, _ = self._step_batch(records, start, *lengths)
        t0 = time.perf_counter()
        step_fn = sami_step.lower(state, *arrays, **kwargs).compile()
        compile_s = time.perf_counter() - t0
        every = cfg.checkpoint.every_steps
        with tqdm(total=n_steps, initial=start, desc=f"iteration {t}: training", unit="step",
                  disable=not self.primary) as bar:
            for s in range(start, n_steps):
                arrays, real_tokens, scored = self._step_batch(records, s, *lengths)
                t0 = time.perf_counter()
                state, metrics = step_fn(state, *arrays)
                metrics = {k: float(host_array(v)) for k, v in metrics.items()}
                dt = time.perf_counter() - t0
                if not all(math.isfinite(v) for v in metrics.values()):
                    self.ckpt.wait()
                    kept = self.ckpt.latest_step()
                    raise TrainingError(
                        f"iteration {t}, step {s + 1}: non-finite metrics {metrics}; stopped without saving. The "
                        f"last good checkpoint ({'none' if kept is None else f'step {kept}'}) in "
                        f"{self.workdir / 'checkpoints'} is intact; lower optim.learning_rate or check the data.")
                metrics["tokens_per_s"] = real_tokens / dt
                if self.peak:  # the pairs' FLOPs, shared prompts or not: the work the authors' step does
                    flops = train_flops(self.base.config, arrays[0].size, lengths[0], logit_tokens=scored)
                    metrics["mfu"] = flops / dt / self.peak
                if s == start:
                    metrics["compile_s"] = compile_s
                g = first + s + 1
                self.writer.write(g, {f"train/{k}": v for k, v in metrics.items()}, iteration=t)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['row_accuracy']:.2f}")
                bar.update(1)
                done = s + 1 == n_steps
                stop = guard.should_stop()
                if done or stop or (every and (s + 1) % every == 0):
                    self.ckpt.save(g, state, {"iteration": t, "step": s + 1, "global_step": g,
                                              "data_position": (s + 1) * cfg.train.batch_size,
                                              "seed": cfg.seed}, force=done or stop)
                if stop and not done:
                    self.ckpt.wait()
                    raise Preempted(f"iteration {t} at step {s + 1} of {n_steps}; checkpoint {g} saved")
        self.ckpt.wait()
        assert self.ckpt.latest_step() == last
        return state.params

    def params_after(self, t: int):
        """pi_t's params: the base for t = 0, else the checkpoint that ends iteration t."""
        if t == 0:
            return self.base.params
        target = self._new_state()
        step = self._cum_steps(t)
        if step not in self.ckpt.all_steps():
            raise CheckpointError(f"{self.workdir / 'checkpoints'}: the checkpoint ending iteration {t} (step {step}) "
                                  "is missing; delete iterations/ past it or start a new --workdir")
        return self.ckpt.restore(step, target)[0].params

    # ---------------------------------------------------------------------------------------- evaluation
    def evaluate(self, t: int, params, guard, extra: dict | None = None) -> dict:
        """pi_t on the held-out queries: MI estimate (§2.3) and response length per constitution. `extra`
        (the iteration's sampling counts and steps) is stored with the result for the report."""
        path = self._iter_dir(t) / "eval.json"
        if agree(path.exists()):
            return json.loads(path.read_text())
        cfg = self.config
        rng = random.Random(f"{cfg.seed}-eval")  # the same constitutions at every iteration
        queries, cons, prompts, too_long = [], [], [], 0
        for q in self.held_out:
            cs = self.scheme.mi_constitutions(rng)
            ps = [self.task.generation_prompt(c, q.text) for c in cs]
            if all(self._fits(p) for p in ps):
                queries.append(q)
                cons.append(cs)
                prompts += ps
            else:
                too_long += 1
        if not queries:
            raise TrainingError(f"every held-out query's prompt exceeds data.max_prompt_len ({too_long} queries)")
        k = len(cons[0])
        flat = self._generate(params, prompts, cfg.eval.max_new_tokens, f"iteration {t}: evaluation", guard)
        responses = [flat[i * k:(i + 1) * k] for i in range(len(queries))]
        m = self.score(params, [[self.task.training_prompt(c, q.text) for c in cs]
                                for q, cs in zip(queries, cons, strict=True)], responses)
        # MI_i,j = log p(y_j | c_j, x_i) - mean_k log p(y_j | c_k, x_i), averaged over targets j, then queries.
        mi_q = np.mean(np.diagonal(m, axis1=1, axis2=2) - m.mean(axis=1), axis=1)
        labels = self.scheme.mi_labels()
        lengths = np.array([[len(self.tokenizer.encode(y)) for y in ys] for ys in responses], float)
        sem = (lambda x: float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else 0.0)
        result = {
            "iteration": t, "mi": float(mi_q.mean()), "mi_sem": sem(mi_q), "n_eval": len(queries),
            "skipped_too_long": too_long,
            "lengths": {lab: float(lengths[:, j].mean()) for j, lab in enumerate(labels)},
            "length_sems": {lab: sem(lengths[:, j]) for j, lab in enumerate(labels)},
            "empty_responses": int((lengths == 0).sum()),
            "examples": [{"query": q.text, "constitution_label": labels[j], "response": responses[i][j]}
                         for i, q in enumerate(queries[: cfg.eval.examples]) for j in range(k)],
            # Every query's response under the first (positive) constitution: what the judge compares.
            "responses": [{"id": str(i), "query": q.text, "constitution": cs[0], "response": ys[0],
                           "length": int(lengths[i, 0])}
                          for i, (q, cs, ys) in enumerate(zip(queries, cons, responses, strict=True))],
            **(extra or {}),
        }
        log.info("iteration %d: held-out MI %.4f +- %.4f over %d queries", t, result["mi"], result["mi_sem"],
                 len(queries))
        if self.primary:
            _write_atomic(path, json.dumps(result, indent=1))
        self.writer.write(self._cum_steps(t), {"eval/mi": result["mi"], **{
            f"eval/length/{lab}": v for lab, v in result["lengths"].items()}}, iteration=t)
        return result

    def judge_iteration(self, t: int, evals: list[dict]) -> dict:
        """Win rates of pi_t's held-out responses (positive constitution) against the base model's and, when
        configured, against eval.judge_baseline; judged in both A/B orders on process 0 and stored in
        iterations/<t>/judge.json (judge answers are cached under iterations/<t>/judge_*/)."""
        from sami_jax import judge as J

        path = self._iter_dir(t) / "judge.json"
        if path.exists():
            return json.loads(path.read_text())
        cfg = self.config.eval
        baselines = {}
        if t > 0:
            baselines["base"] = evals[0]["responses"]
        if cfg.judge_baseline:
            baselines["baseline"] = J.read_responses(cfg.judge_baseline)
        result = {}
        if baselines and self.primary:
            if self._judge is None:
                if jax.process_count() > 1 and not cfg.judge.startswith("openai:"):
                    raise TrainingError("a multi-process run judges on process 0 only: use an openai: judge "
                                        "(e.g. `python -m sami_jax.serve` on the judge model)")
                self._judge = J.make_judge(cfg.judge, max_tokens=cfg.judge_max_tokens)
            task = "hh" if self.config.task == "hh" else "tldr"
            for name, baseline in baselines.items():
                try:
                    pairs = J.pair_up(evals[t]["responses"], baseline, names=(f"iteration {t}", name))
                except ValueError as e:
                    raise TrainingError(f"eval.judge_baseline {cfg.judge_baseline}: {e}") from None
                log.info("iteration %d: judging %d pairs against %s in both orders", t, len(pairs), name)
                result[name] = J.judge_pairs(pairs, self._judge, task, self._iter_dir(t) / f"judge_{name}")
            _write_atomic(path, json.dumps(result, indent=1))
            for name, summary in result.items():
                self.writer.write(self._cum_steps(t), {f"judge/{name}/win_rate": summary["mean_of_orders"]["win_rate"],
                                                       f"judge/{name}/order_agreement": summary["order_agreement"]},
                                  iteration=t)
        return result

    def score(self, params, prompts: list[list[str]], responses: list[list[str]]) -> np.ndarray:
        """M[q, k, j] = summed log p(responses[q][j] | prompts[q][k]) (empty responses score 0)."""
        bs = self.config.eval.batch_size
        out = []
        for lo in tqdm(range(0, len(prompts), bs), desc="scoring", unit="batch", disable=not self.primary):
            ps, ys = prompts[lo:lo + bs], responses[lo:lo + bs]
            pad = bs - len(ps)
            ys_safe = [[y if y else " " for y in row] for row in ys]  # a placeholder token, masked out below
            batch = build_pair_batch(self.tokenizer, ps + ps[:1] * pad, ys_safe + ys_safe[:1] * pad,
                                     pad_to_multiple=self.config.train.seq_multiple)
            tokens, attention, loss_mask = (global_array(x, self.sharder.replicated())
                                            for x in (batch.tokens, batch.attention, batch.loss_mask))
            m = host_array(self._score_fn(params, self.base.config, tokens, attention, loss_mask,
                                          reduce="sum", response_len=response_window(batch.loss_mask, 32),
                                          prompts_shared=self.score_shared,
                                          prompt_len=prompt_window(batch.loss_mask, 32) if self.score_shared else None,
                                          attention_impl=self.score_attention))[: len(ps)]
            empty = np.array([[not y for y in row] for row in ys])
            out.append(np.where(empty[:, None, :], 0.0, m))
        return np.concatenate(out)

    # ---------------------------------------------------------------------------------------- the loop
    def run(self) -> pathlib.Path:
        cfg = self.config
        evals = []
        with PreemptionGuard() as guard:
            try:
                evals.append(self.evaluate(0, self.base.params, guard))
                if cfg.eval.judge:
                    evals[0]["judge"] = self.judge_iteration(0, evals)
                for t in range(1, cfg.train.iterations + 1):
                    eval_path = self._iter_dir(t) / "eval.json"
                    if agree(eval_path.exists()):
                        evals.append(json.loads(eval_path.read_text()))
                        if cfg.eval.judge:  # a run killed between its evaluation and its judging
                            evals[t]["judge"] = self.judge_iteration(t, evals)
                        continue
                    records = self.iteration_data(t, lambda t=t: self.params_after(t - 1), guard)
                    log.info("iteration %d: %d training pairs", t, len(records))
                    params = self.train_iteration(t, records, guard)
                    sampling = self._iter_dir(t) / "sampling.json"
                    counts = json.loads(sampling.read_text()) if sampling.exists() else {}
                    evals.append(self.evaluate(t, params, guard, {
                        "kept": counts.get("kept"), "dropped": counts.get("dropped"), "steps": steps_for(cfg, t)}))
                    if cfg.eval.judge:
                        evals[t]["judge"] = self.judge_iteration(t, evals)
                    self.write_report(evals)
            finally:
                self.ckpt.wait()
        self.writer.close()
        self.ckpt.close()
        return self.write_report(evals)

    def write_report(self, evals: list[dict]) -> pathlib.Path:
        """Writes the report (process 0 only); returns its path."""
        if not self.primary:
            return self.workdir / "report" / "report.md"
        cfg = self.config
        info = {"model": cfg.model.path, "task": cfg.task, "constitutions": cfg.constitutions,
                "settings": cfg.settings, "iterations": cfg.train.iterations,
                "batch size (queries)": cfg.train.batch_size,
                "optimizer": f"{cfg.optim.name} lr {cfg.optim.learning_rate}",
                "train pool / held-out queries": f"{len(self.pool)} / {len(self.held_out)}",
                "malformed jsonl lines skipped": self.data_counts["bad_lines"],
                "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "started": self.started}
        metrics = read_metrics(self.workdir / "metrics.jsonl") if (self.workdir / "metrics.jsonl").exists() else []
        return write_report(self.workdir, title=f"SAMI run: {cfg.model.path} on {cfg.task}", run_info=info,
                            iterations=evals, metrics=metrics)


def run(config, workdir) -> pathlib.Path:
    """Runs (or resumes) SAMI in `workdir`; returns the report's path. Raises Preempted on SIGTERM."""
    return Runner(config, workdir).run()


def summary(workdir: str | os.PathLike) -> str:
    """MI and lengths per evaluated iteration, from the run's eval.json files."""
    evals = sorted((json.loads(p.read_text()) for p in epath.Path(workdir).glob("iterations/*/eval.json")),
                   key=lambda e: e["iteration"])
    lines = []
    for e in evals:
        lengths = ", ".join(f"{k} {v:.1f}" for k, v in e["lengths"].items())
        lines.append(f"iteration {e['iteration']}: MI {e['mi']:.3f} +- {e['mi_sem']:.3f} "
                     f"(n={e['n_eval']}); mean response tokens: {lengths}")
    return "\n".join(lines)
