"""The forward pass on 8 fake CPU devices (mesh 2 fsdp x 4 tensor) equals the single-device one,
with parameters created directly with their target shardings."""

import jax
import numpy as np
import pytest
import tiny
from jax.sharding import PartitionSpec as P

import sami_jax
from sami_jax.models.config import PRESETS
from sami_jax.sharding import Sharder, make_mesh, mesh_shape, param_shardings

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices: XLA_FLAGS="
                                "--xla_force_host_platform_device_count=8 before jax is imported (conftest sets it)")


@pytest.mark.parametrize("name", ["llama_kv4", "mixtral_4x2"])
def test_sharded_forward_equals_single_device(tmp_path, name):
    # 8 heads / 4 KV heads so heads split over tensor=4; the expert count (4) is divisible too.
    hf = tiny.hf_model(name, num_attention_heads=8, num_key_value_heads=4, hidden_size=64, intermediate_size=128)
    path = tiny.save(hf, tmp_path)
    mesh = make_mesh({"fsdp": 2, "tensor": 4})
    sharded = sami_jax.load_model(path, mesh=mesh)
    single = sami_jax.load_model(path)

    q = sharded.params["layers"]["self_attn"]["q_proj"]
    assert q.sharding.spec == P(None, "fsdp", "tensor", None)
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (2, 32, 2, 8)
    emb = sharded.params["embed_tokens"]
    assert emb.sharding.spec == P("tensor", "fsdp")

    toks = tiny.tokens(4, 24)
    out = sharded.logits(toks)
    assert out.sharding.spec[0] == "fsdp"  # batch stays sharded through the layers
    np.testing.assert_allclose(np.asarray(out), np.asarray(single.logits(toks)), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(out), tiny.hf_logits(hf, toks), atol=1e-4, rtol=0)


def test_mesh_shapes_and_rules():
    assert mesh_shape({"fsdp": -1, "tensor": 2}, 8) == {"data": 1, "fsdp": 4, "tensor": 2, "expert": 1}
    with pytest.raises(ValueError, match="only one mesh axis may be -1"):
        mesh_shape({"fsdp": -1, "tensor": -1}, 8)
    with pytest.raises(ValueError, match="needs 6 devices"):
        mesh_shape({"fsdp": 3, "tensor": 2}, 8)
    with pytest.raises(ValueError, match="unknown mesh axes"):
        mesh_shape({"model": 2}, 8)
    sharder = Sharder.create(make_mesh({"fsdp": 2, "tensor": 4}))
    # SmolLM2: 3 KV heads do not split over tensor=4, so they stay replicated on that axis.
    specs = param_shardings(PRESETS["smollm2-135m"], sharder)
    assert specs["layers"]["self_attn"]["k_proj"].spec == P(None, "fsdp", None, None)
    assert specs["layers"]["mlp"]["down_proj"].spec == P(None, "tensor", "fsdp")
