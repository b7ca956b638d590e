"""benchmarks/op_profile.py, the device-time table the GPU benchmarks print: on a CPU it must find XLA's
thunks, attribute the time to the right HLO instruction, and describe it from the compiled module."""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.op_profile import describe_hlo, op_profile


def test_profile_names_the_matmul(tmp_path):
    @jax.jit
    def f(a, b):
        return jnp.tanh(a @ b)

    a = jnp.asarray(np.random.default_rng(0).normal(size=(512, 512)), jnp.float32)
    compiled = f.lower(a, a).compile()
    f(a, a).block_until_ready()
    out = tmp_path / "ops.json"
    rows = op_profile(lambda: [f(a, a).block_until_ready() for _ in range(5)], [compiled.as_text()],
                      out_json=str(out))
    mine = [r for r in rows if r["module"] == "jit_f"]
    assert mine and sum(r["count"] for r in mine) >= 5
    top = max(mine, key=lambda r: r["ms"])
    assert top["ms"] > 0 and "dot" in top["what"], top  # a 512^3 matmul outweighs the tanh
    assert json.loads(out.read_text())["rows"][0]["ms"] == rows[0]["ms"]


def test_describe_hlo_keys_by_module():
    text = jax.jit(lambda x: jnp.sum(x * 2.0)).lower(jnp.ones((4, 8))).compile().as_text()
    descs = describe_hlo(text + "\n\n" + text.replace("HloModule jit_", "HloModule other_"))
    modules = {m for m, _ in descs}
    assert len(modules) == 2 and any(m.startswith("other_") for m in modules)
    assert any("reduce" in d for d in descs.values())
