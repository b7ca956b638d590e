"""The main job on the tiny config: a full 2-iteration run, SIGKILL then resume to the same params, SIGTERM
leaving a complete checkpoint, and the run's bad-input paths (NaN loss, another model's workdir,
unknown config keys, bad jsonl lines, over-long prompts)."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from openai_stub import Stub

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
# The runs are separate processes on one CPU device (the 8 fake devices of conftest would multiply memory).
ENV = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0", "JAX_PLATFORMS": "cpu"}


def _cmd(workdir, *overrides):
    return [sys.executable, "-m", "sami_jax.main", f"--config={TINY}", f"--workdir={workdir}", *overrides]


def _run(workdir, *overrides, timeout=600):
    return subprocess.run(_cmd(workdir, *overrides), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def _steps(workdir) -> list[int]:
    d = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _final_params(workdir):
    """The params of the newest checkpoint, read with orbax directly (not through our manager)."""
    import orbax.checkpoint as ocp

    step = max(_steps(workdir))
    with ocp.CheckpointManager(pathlib.Path(workdir) / "checkpoints") as mngr:
        restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return step, restored["state"]["params"]


@pytest.fixture(scope="module")
def judge_stub():
    """A loopback OpenAI-style judge that always answers "A": a pure position bias."""
    stub = Stub(answer=lambda user: "Comparison: the first.\nFinal Response: A")
    yield stub
    stub.close()


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, judge_stub):
    """An uninterrupted tiny run (2 iterations: 1 + 2 steps), as a user would start it, with a judge."""
    workdir = tmp_path_factory.mktemp("reference")
    proc = _run(workdir, f"--config.eval.judge=openai:{judge_stub.url}:judge")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, proc


def test_full_run_writes_everything(reference_run):
    workdir, proc = reference_run
    report = workdir / "report" / "report.md"
    assert f"report: {report}" in proc.stdout
    text = report.read_text()
    for t in (0, 1, 2):
        ev = json.loads((workdir / "iterations" / str(t) / "eval.json").read_text())
        assert ev["iteration"] == t and np.isfinite(ev["mi"]) and ev["n_eval"] == 4
        assert len(ev["lengths"]) == 4  # K = 4 constitutions for HH (§2.3)
        assert f"{ev['mi']:.3f}" in text
    for t in (1, 2):
        rows = [json.loads(line) for line in (workdir / "iterations" / str(t) / "data.jsonl").read_text().splitlines()]
        assert len(rows) == 4 * t  # steps(t) * batch size
        for r in rows:  # training prompts hold the same principles as the generation constitutions, reshuffled
            for c, p in zip(r["constitutions"], r["train_prompts"], strict=True):
                principles = sorted(line.split(". ", 1)[1] for line in c.splitlines())
                assert all(x in p for x in principles)
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if "train/loss" in m]
    assert [m["step"] for m in train] == [1, 2, 3] and [m["iteration"] for m in train] == [1, 2, 2]
    assert all(m["train/tokens_per_s"] > 0 for m in train)
    assert _steps(workdir)[-1] == 3
    assert (workdir / "report" / "mi.png").exists()
    # Judging: each iteration's responses vs the base model's, both orders; an always-"A" judge splits them.
    for t in (1, 2):
        judged = json.loads((workdir / "iterations" / str(t) / "judge.json").read_text())["base"]
        assert judged["n"] == 4 and judged["order_agreement"] == 0.0
        assert (judged["candidate_first"]["win_rate"], judged["baseline_first"]["win_rate"]) == (100.0, 0.0)
        rows = (workdir / "iterations" / str(t) / "judge_base" / "judgments.jsonl").read_text().splitlines()
        assert all({"candidate_first", "baseline_first"} <= set(json.loads(r)) for r in rows) and len(rows) == 4
    assert "### Judge win rates" in text and (workdir / "report" / "win_rate.png").exists()
    assert any("judge/base/win_rate" in m for m in metrics)


def test_judge_baseline_file_and_mismatched_queries(reference_run, judge_stub, tmp_path):
    """eval.judge_baseline: judged against every iteration (0 included); a file of other queries is an error."""
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(reference_run[0], workdir)
    for path in workdir.glob("iterations/*/judge.json"):
        path.unlink()
    base = json.loads((workdir / "iterations" / "0" / "eval.json").read_text())["responses"]
    baseline = tmp_path / "instruct.jsonl"
    baseline.write_text("".join(json.dumps({**r, "response": "short " + r["response"]}) + "\n" for r in base))
    proc = _run(workdir, f"--config.eval.judge=openai:{judge_stub.url}:judge",
                f"--config.eval.judge_baseline={baseline}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for t in (0, 1, 2):
        judged = json.loads((workdir / "iterations" / str(t) / "judge.json").read_text())
        assert judged["baseline"]["n"] == 4 and ("base" in judged) == (t > 0)
    baseline.write_text("".join(json.dumps({**r, "query": "another query"}) + "\n" for r in base))
    for path in workdir.glob("iterations/*/judge.json"):
        path.unlink()
    proc = _run(workdir, f"--config.eval.judge=openai:{judge_stub.url}:judge",
                f"--config.eval.judge_baseline={baseline}")
    assert proc.returncode == 1 and "query 0 differs" in proc.stderr


def test_sigkill_mid_iteration_then_resume_gives_the_same_params(reference_run, tmp_path):
    workdir = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(workdir), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    # Step 2 is the first step of iteration 2 (checkpoints every step): kill before its last step.
    while 2 not in _steps(workdir) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 3 not in _steps(workdir), "the run finished before it could be killed"
    resumed = _run(workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    step, params = _final_params(workdir)
    ref_step, ref_params = _final_params(reference_run[0])
    assert step == ref_step == 3
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ref_eval = json.loads((reference_run[0] / "iterations/2/eval.json").read_text())
    assert json.loads((workdir / "iterations/2/eval.json").read_text())["mi"] == ref_eval["mi"]


def test_sigterm_saves_a_complete_checkpoint_and_exits_cleanly(tmp_path):
    workdir = tmp_path / "preempted"
    proc = subprocess.Popen(_cmd(workdir), cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    metrics = workdir / "metrics.jsonl"
    def training() -> bool:
        return metrics.exists() and "train/loss" in metrics.read_text()

    while proc.poll() is None and time.time() < deadline and not training():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "preempted" in err and "rerun the same command" in err
    step, params = _final_params(workdir)  # a complete checkpoint that orbax itself restores
    assert step >= 1 and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    workdir = tmp_path / "nan"
    proc = _run(workdir, "--config.optim.learning_rate=1e30", "--config.optim.clip_norm=0.0",
                "--config.train.iterations=1", "--config.train.steps_start=3")
    assert proc.returncode == 1
    assert "non-finite" in proc.stderr and "intact" in proc.stderr
    step, _params = _final_params(workdir)
    assert step == 1  # the step whose loss was finite; its params are huge but were written completely


def test_workdir_of_another_model_is_refused(reference_run):
    workdir = reference_run[0]
    before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    proc = _run(workdir, "--config.model.random.hidden_size=32")
    assert proc.returncode != 0
    assert "hidden_size" in proc.stderr and str(workdir) in proc.stderr
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before


def test_unknown_config_key_is_an_error(tmp_path):
    proc = _run(tmp_path, "--config.train.batch_sizee=3", timeout=120)
    assert proc.returncode != 0 and "batch_sizee" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_bad_jsonl_lines_and_long_prompts(tmp_path):
    from sami_jax import train
    from sami_jax.data.queries import QueryDataError
    from sami_jax.run_config import load_config_file

    good = [f"How do I fix a bike chain, case {i}?" for i in range(10)]
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join([json.dumps({"query": q}) for q in good[:5]] + ["{not json"] +
                              [json.dumps({"query": q}) for q in good[5:]]) + "\n")
    config = load_config_file(TINY)
    config.unlock()
    config.data.sources = [dict(path=str(path), kind="jsonl", subset="harmless", limit=None)]
    with pytest.raises(QueryDataError, match=rf"{path.name}:6"):
        train.load_data(config)
    config.data.skip_bad_lines = True
    pool, held, counts = train.load_data(config)
    assert counts["bad_lines"] == 1 and len(pool) + len(held) == 10

    # A query whose generation prompt is over max_prompt_len is skipped and counted, never cut.
    config.data.sources = [dict(path="bundled:dialogue", kind="jsonl", subset="harmless", limit=None)]
    config.mesh.fsdp, config.mesh.tensor = 2, 4  # conftest's 8 devices; the micro-batch of 2 splits over fsdp
    runner = train.Runner(config, tmp_path / "w")
    long_query = "Tell me everything about bicycles. " * 200
    runner.pool = [train.Query(long_query, "harmless"), *runner.pool]
    records, counts = runner.sample_iteration(1, runner.base.params, guard=_NoStop())
    assert counts["too_long"] == 1
    assert all(r["query"] != long_query for r in records) and len(records) == 4


class _NoStop:
    def should_stop(self) -> bool:
        return False
