"""Multi-host runs: the distributed flags (sami_jax.distributed.plan), the global-array helpers, and the
acceptance test: the main job as 2 processes x 4 CPU devices (jax.distributed on localhost, gloo
collectives) computes what one process with 8 devices computes, on the same logical mesh."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from sami_jax import distributed
from sami_jax.distributed import DistributedError, Plan, plan

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.py"

SLURM = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}


# ------------------------------------------------------------------------------------------------ flags
def test_no_flags_outside_a_cluster_is_one_process():
    assert plan(env={}) == Plan("off")
    assert plan(env={**SLURM, "SLURM_NTASKS": "1"}) == Plan("off")  # a one-task SLURM job needs nothing


def test_explicit_flags():
    assert plan(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3, env={}) == \
        Plan("explicit", "10.0.0.1:1234", 4, 3, None)
    assert plan(coordinator_address="h:1", num_processes=2, process_id=0, local_device_ids="2,3", env={}) == \
        Plan("explicit", "h:1", 2, 0, (2, 3))


@pytest.mark.parametrize("kwargs, message", [
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), "--process_id=2 must be < --num_processes=2"),
    (dict(coordinator_address="h:1"), "without --num_processes, --process_id"),
    (dict(coordinator_address="h:1", num_processes=2), "without --process_id"),
    (dict(num_processes=2, process_id=0), "without --coordinator_address"),
    (dict(coordinator_address="localhost", num_processes=2, process_id=0), "must be HOST:PORT"),
    (dict(coordinator_address="h:1", num_processes=0, process_id=0), "--num_processes must be >= 1"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=-1), "--process_id must be >= 0"),
    (dict(local_device_ids="0,1"), "--local_device_ids alone"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=0, local_device_ids="0,x"), "comma-separated"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=0, local_device_ids="1,1"), "distinct"),
    (dict(mode="off", num_processes=2), "--distributed=off contradicts --num_processes"),
    (dict(mode="slurm"), "needs SLURM's environment"),
    (dict(mode="cluster"), "--distributed must be one of"),
])
def test_inconsistent_flags_are_errors(kwargs, message):
    with pytest.raises(DistributedError, match=message):
        plan(**kwargs, env={})


def test_slurm():
    # One task per GPU (jax's own SLURM detection fills in everything; each task gets GPU SLURM_LOCALID).
    assert plan(env={**SLURM, "SLURM_NTASKS": "8", "SLURM_STEP_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "4"}) == \
        Plan("slurm")
    # One task per node on nodes with 4 GPUs: each process drives all of them.
    one_per_node = {**SLURM, "SLURM_NTASKS": "2", "SLURM_STEP_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "4"}
    assert plan(env=one_per_node) == Plan("slurm_node", local_device_ids=(0, 1, 2, 3))
    # The sbatch script's form: explicit coordinator and count, the process id from SLURM_PROCID (jax).
    assert plan("slurm_node", coordinator_address="gpu01:6379", num_processes=2,
                env={**one_per_node, "CUDA_VISIBLE_DEVICES": "4,6"}) == \
        Plan("slurm_node", "gpu01:6379", 2, None, (0, 1))  # CUDA renumbers the visible GPUs from 0
    assert plan("slurm_node", local_device_ids="0,1,2", env={**SLURM, "SLURM_NTASKS": "2"}).local_device_ids == \
        (0, 1, 2)
    with pytest.raises(DistributedError, match="cannot tell this node's GPUs"):
        plan("slurm_node", env={**SLURM, "SLURM_NTASKS": "2"})


def test_main_rejects_inconsistent_flags_before_touching_devices(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sami_jax.main", f"--config={TINY}", f"--workdir={tmp_path}",
                           "--coordinator_address=127.0.0.1:1", "--num_processes=2", "--process_id=2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode != 0
    assert "--process_id=2 must be < --num_processes=2" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_global_and_host_arrays_round_trip():
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(2, -1), ("data", "fsdp"))
    x = np.arange(48, dtype=np.float32).reshape(4, 12)
    a = distributed.global_array(x, NamedSharding(mesh, PartitionSpec("data", "fsdp")))
    assert a.sharding.spec == PartitionSpec("data", "fsdp")
    np.testing.assert_array_equal(distributed.host_array(a), x)
    key = jax.random.key(7)
    k = distributed.global_array(key, NamedSharding(mesh, PartitionSpec()))
    np.testing.assert_array_equal(jax.random.normal(k, (3,)), jax.random.normal(key, (3,)))
    assert distributed.agree(True) and not distributed.agree(False)  # one process: its own answer


# ------------------------------------------------------------------------------------------------ acceptance
# Tiny config, 1 iteration of 2 SAMI steps with sampling and evaluation, on the mesh fsdp=2 x tensor=4: the
# fsdp axis (params, batch) spans both processes, tensor lies within each. Adam's early updates are nearly
# sign(gradient), so a gradient that is zero up to rounding (gloo sums across processes in another order than
# one process does) would move a weight by +-lr either way; eps = 1 makes the update about lr x the gradient,
# and lr = 1 moves some weights by about 4e-4 while the two runs stay within about 2e-7 of each other.
CONFIG = f"""
import importlib.util

_spec = importlib.util.spec_from_file_location("tiny", {str(TINY)!r})
_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tiny)


def get_config():
    c = _tiny.get_config()
    c.train.iterations = 1
    c.train.steps_start = 2
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.expert = 1, 2, 4, 1
    c.optim.learning_rate = 1.0
    c.optim.weight_decay = 0.0
    c.optim.eps = 1.0
    return c
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_job(config, workdir, logs: pathlib.Path, processes: int, devices: int, timeout: float = 240) -> list[str]:
    """`python -m sami_jax.main` as `processes` processes with `devices` CPU devices each; returns their
    logs. A process that fails or a job past `timeout` seconds kills them all (a lone survivor would wait
    for its peers' collectives)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"}
    cmd = [sys.executable, "-m", "sami_jax.main", f"--config={config}", f"--workdir={workdir}"]
    if processes > 1:
        cmd += [f"--coordinator_address=127.0.0.1:{_free_port()}", f"--num_processes={processes}"]
    paths = [logs / f"{pathlib.Path(workdir).name}.{i}.log" for i in range(processes)]
    procs = []
    try:
        for i, path in enumerate(paths):
            with path.open("w") as out:
                extra = [f"--process_id={i}"] if processes > 1 else []
                procs.append(subprocess.Popen(cmd + extra, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    texts = [path.read_text() for path in paths]
    for i, (p, text) in enumerate(zip(procs, texts, strict=True)):
        assert p.returncode == 0, f"process {i} of {workdir} exited with {p.returncode}:\n{text[-4000:]}"
    return texts


def _params(workdir, step: int):
    """The params of checkpoint `step`, read with orbax directly onto one device (the job saved them sharded
    over 8 devices, by one or two processes)."""
    import orbax.checkpoint as ocp

    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    path = pathlib.Path(workdir) / "checkpoints" / str(step) / "state"
    with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.metadata(path).item_metadata
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), tree)
        return ckptr.restore(path, target)["params"]


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def test_two_processes_compute_what_one_process_computes(tmp_path):
    config = tmp_path / "tiny_2steps.py"
    config.write_text(CONFIG)
    multi, single = tmp_path / "multi", tmp_path / "single"
    logs = _run_job(config, multi, tmp_path, processes=2, devices=4)
    assert "jax.distributed (explicit): process 0 of 2, 4 local of 8 devices" in logs[0]
    assert "jax.distributed (explicit): process 1 of 2, 4 local of 8 devices" in logs[1]
    assert "report:" in logs[0] and "report:" not in logs[1]  # the summary is printed once
    single_log = _run_job(config, single, tmp_path, processes=1, devices=8)[0]
    assert "jax.distributed" not in single_log  # no flags, no cluster: nothing initialized

    # Losses per step (metrics.jsonl is written by process 0 alone: one row per step).
    train = {w: [r for r in _rows(w / "metrics.jsonl") if "train/loss" in r] for w in (multi, single)}
    assert [r["step"] for r in train[multi]] == [r["step"] for r in train[single]] == [1, 2]
    for key in ("train/loss", "train/grad_norm"):  # not the accuracies: argmaxes of a random model's near-ties
        np.testing.assert_allclose([r[key] for r in train[multi]], [r[key] for r in train[single]],
                                   rtol=0, atol=1e-6, err_msg=key)

    # The same sampled training pairs, and the same held-out evaluation of pi_0 and pi_1.
    assert (multi / "iterations/1/data.jsonl").read_text() == (single / "iterations/1/data.jsonl").read_text()
    for t in (0, 1):
        ev = {w: json.loads((w / f"iterations/{t}/eval.json").read_text()) for w in (multi, single)}
        assert ev[multi]["lengths"] == ev[single]["lengths"]
        assert ev[multi]["mi"] == pytest.approx(ev[single]["mi"], abs=1e-5)
    assert (multi / "report" / "report.md").exists()

    # The params after each step, from the orbax checkpoints both processes wrote together.
    before = None
    for step in (1, 2):
        got, want = _params(multi, step), _params(single, step)
        for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6,
                                       err_msg=f"step {step} {jax.tree_util.keystr(path)}")
        if before is not None:  # the step moved weights by far more than the tolerance
            moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(before), strict=True))
            assert moved > 1e-4
        before = got
