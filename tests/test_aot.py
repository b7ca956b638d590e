"""`python -m sami_jax.aot` compiles the tiny config's SAMI step and decode step for a TPU v5e 2x2 slice on
this CPU (libtpu's compile-only topology), and rejects bad topologies and meshes with errors that say what
to change; a two-slice mesh puts the slices on the data axis."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from sami_jax import aot
from sami_jax.run_config import load_config_file, run_mesh
from sami_jax.sharding import ShardingError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="needs libtpu (pip install libtpu==0.0.42.1, in the test extra on Linux x86_64 "
                                       "with Python 3.11) to compile for a TPU topology")

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.py"
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


def _tiny(**mesh):
    config = load_config_file(TINY)
    config.unlock()
    config.mesh.update(mesh)
    config.lock()
    return config


def test_cli_compiles_tiny_step_and_decode(tmp_path, smollm2_gguf):
    """The CLI with config overrides: records per function, sane bytes, FLOPs near the analytic count."""
    out = tmp_path / "plan.json"
    proc = subprocess.run([sys.executable, "-m", "sami_jax.aot", f"--config={TINY}", "--topology=v5e:2x2",
                           "--config.mesh.fsdp=2", "--config.mesh.tensor=2", "--functions=sami_step,decode",
                           f"--json={out}"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sami_step" in proc.stdout and "decode" in proc.stdout and "fits" in proc.stdout
    records = {r["function"]: r for r in json.loads(out.read_text())}
    assert sorted(records) == ["decode", "sami_step"]
    for r in records.values():
        assert {"function", "topology", "chips", "bytes_per_chip", "hbm_bytes_per_chip", "fits", "flops",
                "estimated_step_s", "mfu"} <= set(r)
        assert r["topology"] == "v5e:2x2" and r["chips"] == 4
        assert r["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2, "expert": 1}
        assert r["hbm_bytes_per_chip"] == 16 * 2**30 and r["fits"] is True
        assert 0 < r["bytes_per_chip"] < 2**30 and r["argument_bytes"] > 0
        # XLA's per-chip FLOPs (loop bodies times their trip counts) x chips against sami_jax.perf's count of
        # matmul and attention FLOPs: XLA adds softmax, norms and the optimizer's elementwise work (about 8%
        # at this tiny width), and nothing is replicated, so the ratio sits just above 1. Counting the layer
        # and micro-batch loops once would give about 0.3.
        ratio = r["flops"] * r["chips"] / r["model_flops"]
        assert 1.0 <= ratio < 1.3, (r["function"], ratio)
        assert r["estimated_step_s"] > 0 and 0 < r["mfu"] <= 1
        assert "loops_without_trip_count" not in r
    step = records["sami_step"]
    # The donated train state is reused by the outputs, so it is counted once.
    assert step["alias_bytes"] > 0 and step["bytes_per_chip"] < step["argument_bytes"] + step["output_bytes"] + \
        step["temp_bytes"]


def test_bad_topology_names_the_known_forms():
    for name in ("v5p-128", "v5e:2x2x2", "tpu:4x4", "v5e:"):
        with pytest.raises(aot.AOTError, match=r"unknown topology .*known forms: .*v5p:4x4x4"):
            aot.parse_topology(name)
    with pytest.raises(aot.AOTError, match=r"libtpu rejects topology 'v5e:3x3'.*known forms"):
        aot.topology_devices("v5e:3x3")
    proc = subprocess.run([sys.executable, "-m", "sami_jax.aot", f"--config={TINY}", "--topology=v5p-8"], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown topology 'v5p-8'" in proc.stderr and "v5p:2x2x1" in proc.stderr


def test_mesh_that_does_not_match_the_chips():
    devices = aot.topology_devices("v5e:2x2")
    with pytest.raises(ShardingError, match=r"config.mesh .* needs 8 devices, have 4"):
        run_mesh(_tiny(fsdp=8), devices)
    with pytest.raises(ShardingError, match=r"config.mesh .*4 devices cannot be split over the fixed axes "
                                            r"\(tensor=3, product 3\); set --config.mesh.AXIS=N"):
        run_mesh(_tiny(fsdp=-1, tensor=3), devices)
    # FSDP over all 4 chips would split the tiny config's 2-query micro-batch 4 ways.
    with pytest.raises(ShardingError, match=r"config.train.micro_batch_size=2 is not a multiple of the 4 batch"):
        run_mesh(_tiny(), devices)


def test_two_slices_put_the_slices_on_data():
    devices = aot.topology_devices("v5e:2x2", num_slices=2)
    assert len(devices) == 8 and {d.slice_index for d in devices} == {0, 1}
    mesh = run_mesh(_tiny(fsdp=1, tensor=4), devices)  # batch shards: data 2, which the 2-query micro-batch fills
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 4, "expert": 1}
    for i in range(2):  # data index i holds exactly slice i: only the data axis crosses the DCN
        assert {d.slice_index for d in mesh.devices[i].ravel()} == {i}
    with pytest.raises(ShardingError, match=r"config.mesh.dcn .* needs 4 slices, have 2"):
        run_mesh(_tiny(fsdp=1, tensor=4, dcn={"data": 4}), devices)
