"""Meshes and sharding rules: the forward pass on 8 fake CPU devices (mesh 2 fsdp x 4 tensor) equals the
single-device one with parameters created directly with their target shardings; mesh sizes from the config,
the three strategies' rules (FSDP, FSDP x tensor, experts x FSDP) and the errors for what a mesh cannot split."""

import jax
import numpy as np
import pytest
import tiny
from jax.sharding import PartitionSpec as P

import sami_jax
from sami_jax.models.config import PRESETS, ModelConfig
from sami_jax.run_config import base_config, run_mesh
from sami_jax.sharding import Sharder, ShardingError, check_batch, make_mesh, mesh_shape, param_shardings

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
    with pytest.raises(ShardingError, match="only one mesh axis may be -1"):
        mesh_shape({"fsdp": -1, "tensor": -1}, 8)
    with pytest.raises(ShardingError, match="needs 6 devices"):
        mesh_shape({"fsdp": 3, "tensor": 2}, 8)
    with pytest.raises(ShardingError, match="unknown mesh axes"):
        mesh_shape({"model": 2}, 8)
    with pytest.raises(ShardingError, match=r"config.mesh.dcn .* needs 2 slices, have 1"):
        make_mesh({"fsdp": -1}, dcn={"data": 2}, what="config.mesh")
    # SmolLM2 (9 heads, 3 KV heads) on tensor=3: heads split; FSDP on embed.
    specs = param_shardings(PRESETS["smollm2-135m"], Sharder.create(make_mesh({"fsdp": 2, "tensor": 3},
                                                                              jax.devices()[:6])))
    assert specs["layers"]["self_attn"]["q_proj"].spec == P(None, "fsdp", "tensor", None)
    assert specs["layers"]["mlp"]["down_proj"].spec == P(None, "tensor", "fsdp")
    # Fewer KV heads than tensor ways: the K/V projections stay replicated on tensor (GQA practice).
    gqa = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8,
                      num_kv_heads=2, head_dim=8)
    sharder = Sharder.create(make_mesh({"fsdp": 2, "tensor": 4}))
    specs = param_shardings(gqa, sharder)
    assert specs["layers"]["self_attn"]["k_proj"].spec == P(None, "fsdp", None, None)
    assert specs["layers"]["self_attn"]["q_proj"].spec == P(None, "fsdp", "tensor", None)


def test_dims_the_mesh_cannot_split_are_errors():
    """A rule's mesh axes must divide the dim they shard (replicating it would silently undo FSDP or tensor
    parallelism); only KV heads and the batch may stay replicated."""
    sharder = Sharder.create(make_mesh({"fsdp": 2, "tensor": 4}))
    with pytest.raises(ShardingError, match=r"param layers/self_attn/o_proj \(30, 9, 64, 576\): heads dim of size 9 "
                                            r"cannot be split 4 ways over mesh axes tensor=4"):
        param_shardings(PRESETS["smollm2-135m"], sharder)
    narrow = ModelConfig(vocab_size=256, hidden_size=60, intermediate_size=128, num_layers=1, num_heads=4,
                         num_kv_heads=4, head_dim=16)
    with pytest.raises(ShardingError, match=r"embed dim of size 60 cannot be split 8 ways over mesh axes fsdp=8"):
        param_shardings(narrow, Sharder.create(make_mesh({"fsdp": 8})))
    # The batch of an activation may stay replicated (Model.logits on any batch) ...
    assert sharder.spec((3, 16, 64), ("batch", None, None)) == P(None, None, None)
    assert sharder.spec((4, 16, 64), ("batch", None, None)) == P("fsdp", None, None)
    # ... but a run's batches are checked when its mesh is built.
    check_batch(sharder.mesh, {"config.train.micro_batch_size": 4})
    with pytest.raises(ShardingError, match=r"config.train.micro_batch_size=3 is not a multiple of the 2 batch "
                                            r"shards of the mesh \(data 1 x fsdp 2 x expert 1\)"):
        check_batch(sharder.mesh, {"config.train.micro_batch_size": 3})


def test_expert_rules():
    """Mixtral on experts x FSDP: each expert weight has its experts on `expert` and embed on `fsdp`; weights
    without an experts dim (attention, router, embeddings) shard embed over both axes; the batch over both."""
    sharder = Sharder.create(make_mesh({"expert": 4, "fsdp": 2}))
    specs = param_shardings(PRESETS["mixtral-8x7b"], sharder)
    moe = specs["layers"]["block_sparse_moe"]
    assert moe["w1"].spec == P(None, "expert", "fsdp", None)
    assert moe["w2"].spec == P(None, "expert", None, "fsdp")
    assert moe["gate"].spec == P(None, ("fsdp", "expert"), None)
    assert specs["layers"]["self_attn"]["q_proj"].spec == P(None, ("fsdp", "expert"), None, None)
    assert specs["embed_tokens"].spec == P(None, ("fsdp", "expert"))
    assert sharder.spec((16, 8, 4096), ("batch", None, None)) == P(("fsdp", "expert"), None, None)
    with pytest.raises(ShardingError, match=r"param layers/block_sparse_moe/w1 .*: experts dim of size 8 cannot be "
                                            r"split 3 ways over mesh axes expert=3"):
        param_shardings(PRESETS["mixtral-8x7b"], Sharder.create(make_mesh({"expert": 3}, jax.devices()[:3]),
                                                                 {"experts": ("expert",)}))


def test_run_mesh_from_config():
    """config.mesh (ICI sizes + dcn) builds the run's mesh; the micro-batch and sampling batch must split over it."""
    config = base_config()
    config.train.update(batch_size=8, micro_batch_size=4)
    config.sampling.batch_size = 16
    config.mesh.update(fsdp=-1, tensor=2)
    assert dict(run_mesh(config).shape) == {"data": 1, "fsdp": 4, "tensor": 2, "expert": 1}
    config.mesh.update(fsdp=-1, tensor=1)
    with pytest.raises(ShardingError, match=r"config.train.micro_batch_size=4 is not a multiple of the 8 batch"):
        run_mesh(config)
    config.mesh.update(fsdp=3, tensor=1)
    with pytest.raises(ShardingError, match=r"config.mesh \{.*'fsdp': 3.*\} needs 3 devices, have 8"):
        run_mesh(config)
