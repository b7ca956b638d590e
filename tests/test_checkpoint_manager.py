"""RunCheckpointer (training-run checkpoints via orbax's CheckpointManager) and PreemptionGuard."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from sami_jax.checkpoints import CheckpointError
from sami_jax.checkpoints.manager import FINGERPRINT_FILE, PreemptionGuard, RunCheckpointer
from sami_jax.sharding import make_mesh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FP = {"architecture": "llama", "hidden_size": 64, "num_layers": 2, "vocab_size": 128, "param_count": 40_000}


def one_device():
    return SingleDeviceSharding(jax.devices()[0])


def make_state(scale: int = 1):
    dev = one_device()
    put = lambda x: jax.device_put(x, dev)
    return {
        "params": {
            "embed": put(jnp.arange(24, dtype=jnp.bfloat16).reshape(6, 4) * scale),
            "layers": {"w": put(jnp.linspace(-1, 1, 8, dtype=jnp.float32).reshape(2, 4) * scale)},
        },
        "opt": {"count": put(jnp.int32(7 * scale)), "mu": put(jnp.full((3,), 0.5 * scale, jnp.float32))},
        "step": put(jnp.int32(scale)),
    }


def abstract_of(state, sharding=None):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or x.sharding), state)


def assert_trees_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def snapshot(directory):
    """{relative path: bytes} of every file under directory."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


def test_round_trip_state_and_meta(tmp_path):
    state = make_state(3)
    meta = {
        "iteration": 2,
        "step": 3,
        "data": {"epoch": 0, "offset": 48},
        "rng": {"seed": 17, "key": [0, 42]},
        "lr": 1.25e-6,
        "note": "after iteration 2",
        "done": False,
    }
    with RunCheckpointer(tmp_path / "checkpoints", fingerprint=FP) as ckpt:
        assert ckpt.latest_step() is None and ckpt.all_steps() == []
        assert ckpt.save(3, state, meta)
        ckpt.wait()
    with RunCheckpointer(tmp_path / "checkpoints", fingerprint=FP) as ckpt:
        assert ckpt.latest_step() == 3
        restored, restored_meta = ckpt.restore(None, abstract_of(state))
    assert_trees_equal(restored, state)
    assert restored["params"]["embed"].dtype == jnp.bfloat16 and restored["opt"]["count"].dtype == jnp.int32
    assert restored_meta == meta


def test_restore_onto_concrete_arrays_and_numpy_meta(tmp_path):
    state = make_state(2)
    with RunCheckpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(5, state, {"step": np.int64(5), "rng_state": np.arange(3, dtype=np.uint32), "pair": (1, 2)})
        assert ckpt.all_steps() == [5]  # synchronous: committed when save returns
        assert os.path.isdir(tmp_path / "5")
        restored, meta = ckpt.restore(5, make_state(0))  # concrete arrays: their shardings are used
    assert_trees_equal(restored, state)
    assert meta == {"step": 5, "rng_state": [0, 1, 2], "pair": [1, 2]}  # through JSON


def test_keep_prunes_to_newest(tmp_path):
    with RunCheckpointer(tmp_path, keep=2) as ckpt:
        for step in range(1, 6):
            ckpt.save(step, make_state(step), {"step": step})
        ckpt.wait()
        assert ckpt.all_steps() == [4, 5]
        assert ckpt.latest_step() == 5
    assert sorted(p for p in os.listdir(tmp_path) if p.isdigit()) == ["4", "5"]
    with RunCheckpointer(tmp_path, keep=2) as ckpt:
        assert ckpt.all_steps() == [4, 5]
        restored, meta = ckpt.restore(4, abstract_of(make_state()))
    assert_trees_equal(restored, make_state(4))
    assert meta == {"step": 4}


def test_latest_step_and_skipped_or_duplicate_steps(tmp_path):
    with RunCheckpointer(tmp_path, keep=5) as ckpt:
        for step in (10, 20, 30):
            assert ckpt.save(step, make_state(), {"step": step})
            assert ckpt.latest_step() == step
        assert not ckpt.save(25, make_state(), {"step": 25})  # older than the latest: skipped
        with pytest.raises(CheckpointError, match="30 already exists"):
            ckpt.save(30, make_state(), {"step": 30}, force=True)
        ckpt.wait()
        assert ckpt.all_steps() == [10, 20, 30]
        with pytest.raises(CheckpointError, match=r"no checkpoint 15; have \[10, 20, 30\]"):
            ckpt.restore(15, abstract_of(make_state()))
        _, meta = ckpt.restore(20, abstract_of(make_state()))
        assert meta == {"step": 20}


def test_async_save_then_wait(tmp_path):
    state = make_state(4)
    expected = jax.tree.map(np.asarray, state)
    with RunCheckpointer(tmp_path, async_save=True) as ckpt:
        assert ckpt.save(1, state, {"step": 1})
        # The arrays are on the host once save returns, so a training step may donate (delete) them.
        for leaf in jax.tree.leaves(state):
            leaf.delete()
        ckpt.wait()
        assert os.path.isfile(tmp_path / "1" / "commit_success.txt")
        assert not [p for p in os.listdir(tmp_path) if "tmp" in p]
        restored, _ = ckpt.restore(1, abstract_of(make_state()))
    assert_trees_equal(restored, expected)


def test_restore_waits_for_pending_save(tmp_path):
    with RunCheckpointer(tmp_path) as ckpt:
        ckpt.save(1, make_state(1), {"step": 1})
        ckpt.save(2, make_state(2), {"step": 2})
        restored, meta = ckpt.restore(None, abstract_of(make_state()))  # no wait() in between
    assert meta == {"step": 2}
    assert_trees_equal(restored, make_state(2))


def test_restore_errors(tmp_path):
    with RunCheckpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointError, match="no complete checkpoint"):
            ckpt.restore(None, abstract_of(make_state()))
        ckpt.save(1, make_state(), {})
        ckpt.wait()
        wrong_shape = abstract_of(make_state())
        wrong_shape["opt"]["mu"] = jax.ShapeDtypeStruct((4,), jnp.float32, sharding=one_device())
        with pytest.raises(CheckpointError, match=r"does not fit the restore target: opt/mu is \(3,\) in the "
                           r"checkpoint, \(4,\) in the target"):
            ckpt.restore(1, wrong_shape)  # named from the saved metadata, before orbax starts reading
        no_sharding = abstract_of(make_state())
        no_sharding["step"] = jax.ShapeDtypeStruct((), jnp.int32)
        with pytest.raises(CheckpointError, match=r"\['step'\].*has no sharding"):
            ckpt.restore(1, no_sharding)
        with pytest.raises(TypeError, match="meta must be JSON-serializable"):
            ckpt.save(2, make_state(), {"bad": object()})


def test_fingerprint_written_on_first_save(tmp_path):
    with RunCheckpointer(tmp_path / "checkpoints", fingerprint={**FP, "mesh": ("fsdp", "tensor")}) as ckpt:
        assert not (tmp_path / "checkpoints" / FINGERPRINT_FILE).exists()
        ckpt.save(1, make_state(), {})
        assert (tmp_path / "checkpoints" / FINGERPRINT_FILE).exists()
    # The same fingerprint (JSON reads the tuple back as a list), or none given: opens fine.
    with RunCheckpointer(tmp_path / "checkpoints", fingerprint={**FP, "mesh": ["fsdp", "tensor"]}) as ckpt:
        assert ckpt.latest_step() == 1
    with RunCheckpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.latest_step() == 1


def test_fingerprint_mismatch_raises_and_touches_nothing(tmp_path):
    workdir = tmp_path / "run1"
    directory = workdir / "checkpoints"
    with RunCheckpointer(directory, keep=1, fingerprint=FP) as ckpt:
        ckpt.save(1, make_state(1), {"step": 1})
        ckpt.save(2, make_state(2), {"step": 2})
    # A leftover of a killed save, which opening the directory normally cleans up.
    os.makedirs(directory / "3.orbax-checkpoint-tmp" / "state")
    before = snapshot(directory)
    other = {**FP, "hidden_size": 128, "num_layers": 4, "rope_theta": 1e6}
    other.pop("param_count")
    with pytest.raises(CheckpointError) as info:
        RunCheckpointer(directory, keep=1, fingerprint=other)
    msg = str(info.value)
    assert str(directory) in msg and f"workdir {workdir}" in msg
    assert "hidden_size: stored 64, now 128" in msg
    assert "num_layers: stored 2, now 4" in msg
    assert "param_count: stored 40000, now '<absent>'" in msg
    assert "rope_theta: stored '<absent>', now 1000000.0" in msg
    assert "architecture" not in msg and "vocab_size" not in msg  # equal keys are not listed
    assert "--workdir" in msg and "delete" in msg
    assert snapshot(directory) == before
    assert os.path.isdir(directory / "3.orbax-checkpoint-tmp")
    with RunCheckpointer(directory, fingerprint=FP) as ckpt:  # the right model still resumes
        restored, meta = ckpt.restore(None, abstract_of(make_state()))
    assert meta == {"step": 2}
    assert_trees_equal(restored, make_state(2))


SAVE_MESH = {"fsdp": 2, "tensor": 4}


@pytest.mark.parametrize("target", ["fsdp4_tensor2", "fsdp8", "one_device"])
def test_restore_on_another_mesh(tmp_path, target):
    spec = PartitionSpec("fsdp", "tensor")
    src_mesh = make_mesh(SAVE_MESH)
    values = {
        "w": np.arange(8 * 16, dtype=np.float32).reshape(8, 16) / 7,
        "e": (np.arange(16 * 8, dtype=np.float32).reshape(16, 8) - 50).astype(jnp.bfloat16),
        "count": np.int32(11),
    }
    state = {
        "w": jax.device_put(values["w"], NamedSharding(src_mesh, spec)),
        "e": jax.device_put(values["e"], NamedSharding(src_mesh, spec)),
        "count": jax.device_put(values["count"], NamedSharding(src_mesh, PartitionSpec())),
    }
    assert len(state["w"].sharding.device_set) == 8
    with RunCheckpointer(tmp_path) as ckpt:
        ckpt.save(1, state, {"mesh": SAVE_MESH})

    if target == "one_device":
        matrix = scalar = one_device()
    else:
        mesh = make_mesh({"fsdp": 4, "tensor": 2} if target == "fsdp4_tensor2" else {"fsdp": 8, "tensor": 1})
        matrix, scalar = NamedSharding(mesh, spec), NamedSharding(mesh, PartitionSpec())
    abstract = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=scalar if k == "count" else matrix)
        for k, v in values.items()
    }
    with RunCheckpointer(tmp_path) as ckpt:
        restored, meta = ckpt.restore(1, abstract)
    assert meta == {"mesh": SAVE_MESH}
    for key, want in values.items():
        assert restored[key].sharding == abstract[key].sharding
        assert restored[key].dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(restored[key]), want)


# The child saves step 1 and waits, then starts an async save of step 2. To stop it at a known point it
# replaces orbax's commit (the rename of the tmp folder; its name is private to orbax 0.12) by "write a
# marker file and hang"; the test then SIGKILLs it, as a scheduler would, while the data is on disk
# uncommitted.
KILLED_SAVE_CHILD = textwrap.dedent("""
    import os, sys, time
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from sami_jax.checkpoints.manager import RunCheckpointer

    directory, marker = sys.argv[1], sys.argv[2]
    ckpt = RunCheckpointer(directory, keep=3)
    state = lambda v: {"w": jnp.full((4, 4), v, jnp.float32), "step": jnp.int32(v)}
    ckpt.save(1, state(1), {"step": 1})
    ckpt.wait()

    async def hang_before_commit(self):
        with open(marker, "w") as f:
            f.write(str(self.get()))
        time.sleep(600)

    atomicity.AtomicRenameTemporaryPath.finalize = hang_before_commit
    ckpt.save(2, state(2), {"step": 2})
    time.sleep(600)
""")


def test_save_killed_before_commit_is_ignored(tmp_path):
    directory, marker = tmp_path / "checkpoints", tmp_path / "marker"
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_SAVE_CHILD, str(directory), str(marker)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            if child.poll() is not None:
                pytest.fail(
                    f"child exited ({child.returncode}) before its save reached the commit:\n"
                    + child.stderr.read().decode()[-3000:]
                )
            assert time.monotonic() < deadline, "child never reached the commit of step 2"
            time.sleep(0.05)
        time.sleep(0.1)  # let it enter the sleep
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
        child.stderr.close()

    # Step 2's arrays were written but never committed: its folder (and its items') still have tmp names.
    leftovers = [p for p in os.listdir(directory) if p.startswith("2.") and "tmp" in p]
    assert leftovers == ["2.orbax-checkpoint-tmp"]
    written = snapshot(directory / leftovers[0])
    assert any(f.startswith("state") and "ocdbt" in f for f in written), sorted(written)
    assert not (directory / "2").exists()

    with RunCheckpointer(directory, keep=3) as ckpt:
        assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
        restored, meta = ckpt.restore(
            None,
            {
                "w": jax.ShapeDtypeStruct((4, 4), jnp.float32, sharding=one_device()),
                "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=one_device()),
            },
        )
        assert meta == {"step": 1}
        np.testing.assert_array_equal(np.asarray(restored["w"]), np.ones((4, 4), np.float32))
        # The resumed run saves step 2 again, over the leftover.
        ckpt.save(2, {"w": jnp.full((4, 4), 2.0), "step": jnp.int32(2)}, {"step": 2})
        ckpt.wait()
        assert ckpt.all_steps() == [1, 2]
    assert not [p for p in os.listdir(directory) if "tmp" in p]


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


def test_preemption_guard_catches_sigterm_and_restores_handler():
    calls = []
    sentinel = lambda signum, frame: calls.append(signum)
    original = signal.signal(signal.SIGTERM, sentinel)
    try:
        with PreemptionGuard() as guard:
            assert not guard.requested and not guard.should_stop() and guard.signum is None
            assert signal.getsignal(signal.SIGTERM) != sentinel
            os.kill(os.getpid(), signal.SIGTERM)
            assert wait_for(lambda: guard.requested)
            assert guard.signum == signal.SIGTERM and guard.should_stop()
            # The process is still alive and running Python.
            assert sum(range(10)) == 45
        assert signal.getsignal(signal.SIGTERM) is sentinel
        assert guard.requested  # the flag outlives the block
        assert calls == []  # the previous handler never saw the guarded signal
        os.kill(os.getpid(), signal.SIGTERM)
        assert wait_for(lambda: calls == [signal.SIGTERM])
    finally:
        signal.signal(signal.SIGTERM, original)


def test_preemption_guard_sigint_optional_and_twice_interrupts():
    before = signal.getsignal(signal.SIGINT)
    with PreemptionGuard() as guard:
        assert signal.getsignal(signal.SIGINT) is before  # SIGINT untouched by default
    with PreemptionGuard(sigint=True) as guard:
        os.kill(os.getpid(), signal.SIGINT)
        assert wait_for(lambda: guard.requested)
        assert guard.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            wait_for(lambda: False, timeout=2.0)
    assert signal.getsignal(signal.SIGINT) is before


def test_preemption_guard_outside_main_thread_installs_nothing():
    before = signal.getsignal(signal.SIGTERM)
    seen = {}

    def run():
        with PreemptionGuard() as guard:
            seen["handler"] = signal.getsignal(signal.SIGTERM)
            seen["requested"] = guard.requested
            guard.request()
            seen["stop"] = guard.should_stop()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == {"handler": before, "requested": False, "stop": True}
    assert signal.getsignal(signal.SIGTERM) is before


def test_should_stop_all_reduce_path():
    # With one process should_stop() returns the flag; the multi-process all-reduce (process_allgather)
    # is exercised here directly, where it gathers this single process's flag.
    guard = PreemptionGuard()
    assert guard._agree() is False
    guard.request(signal.SIGTERM)
    assert guard._agree() is True and guard.should_stop() is True
