"""A training checkpoint (params + optimizer state + step, through RunCheckpointer) saved on a 2 fsdp x 4 tensor
mesh of 8 fake CPU devices restores on 4 x 2, on 8 x 1 and on one device: every value equal and every array
on the sharding the restore target asked for. The state is a real sami.TrainState (bf16 params as the
Mixtral / Llama configs keep them, float32 AdamW moments) whose leaves are all made distinct."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sami_jax.aot import abstract_train_state
from sami_jax.checkpoints.manager import RunCheckpointer
from sami_jax.models.config import ModelConfig
from sami_jax.models.params import init_params
from sami_jax.optim import OptimConfig
from sami_jax.sami import init_train_state
from sami_jax.sharding import Sharder, make_mesh, param_shardings

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices: XLA_FLAGS="
                                "--xla_force_host_platform_device_count=8 before jax is imported (conftest sets it)")

CONFIG = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16)
OPTIM = OptimConfig(name="adamw", learning_rate=1e-3, schedule="constant", warmup_steps=0, clip_norm=1.0)
META = {"iteration": 2, "step": 3, "data_position": 24}


def _saved_state():
    """A TrainState on the 2 x 4 mesh whose every array holds distinct values (not Adam's zeros)."""
    sharder = Sharder.create(make_mesh({"fsdp": 2, "tensor": 4}))
    params = init_params(CONFIG, jax.random.key(0), jnp.bfloat16, param_shardings(CONFIG, sharder))
    state = init_train_state(params, OPTIM)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(1)
    leaves = [jax.device_put(rng.normal(size=x.shape).astype(x.dtype) if x.ndim else np.asarray(7, x.dtype),
                             x.sharding) for x in leaves]
    return jax.tree.unflatten(treedef, leaves)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    state = _saved_state()
    q = state.params["layers"]["self_attn"]["q_proj"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    mu = state.opt_state[1][0].mu["layers"]["mlp"]["down_proj"]
    assert mu.dtype == jnp.float32 and len(mu.sharding.device_set) == 8
    directory = tmp_path_factory.mktemp("run") / "checkpoints"
    with RunCheckpointer(directory, fingerprint={"model": "tiny"}) as ckpt:
        ckpt.save(3, state, META)
    return directory, jax.device_get(state)


def _target(kind: str):
    """The restore target on another mesh: abstract (ShapeDtypeStructs with shardings, nothing allocated) or,
    as train.py passes it, a freshly initialised state on the new mesh."""
    if kind == "one_device":
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = abstract_train_state(CONFIG, OPTIM, Sharder.create(make_mesh({"fsdp": 2, "tensor": 4})),
                                        jnp.bfloat16)
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), abstract)
    sharder = Sharder.create(make_mesh({"fsdp4_tensor2": {"fsdp": 4, "tensor": 2}, "fsdp8": {"fsdp": 8}}[kind]))
    if kind == "fsdp8":
        params = init_params(CONFIG, jax.random.key(5), jnp.bfloat16, param_shardings(CONFIG, sharder))
        return init_train_state(params, OPTIM)
    return abstract_train_state(CONFIG, OPTIM, sharder, jnp.bfloat16)


@pytest.mark.parametrize("kind", ["fsdp4_tensor2", "fsdp8", "one_device"])
def test_restore_on_another_mesh(checkpoint, kind):
    directory, saved = checkpoint
    target = _target(kind)
    with RunCheckpointer(directory, fingerprint={"model": "tiny"}) as ckpt:
        restored, meta = ckpt.restore(None, target)
    assert meta == META
    assert jax.tree.structure(restored) == jax.tree.structure(saved)
    pairs = zip(jax.tree_util.tree_flatten_with_path(restored)[0], jax.tree.leaves(saved), jax.tree.leaves(target),
                strict=True)
    for (path, got), want, tgt in pairs:
        name = jax.tree_util.keystr(path)
        assert got.dtype == want.dtype, name
        assert got.sharding == tgt.sharding, name
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=name)
    q = restored.params["layers"]["self_attn"]["q_proj"]
    want_spec = {"fsdp4_tensor2": (None, "fsdp", "tensor", None), "fsdp8": (None, "fsdp", None, None)}.get(kind)
    if want_spec is not None:
        assert q.sharding.spec == jax.sharding.PartitionSpec(*want_spec)
        assert q.addressable_shards[0].data.shape[1] == CONFIG.hidden_size // q.sharding.mesh.shape["fsdp"]
    else:
        assert q.sharding.device_set == {jax.devices()[0]}
