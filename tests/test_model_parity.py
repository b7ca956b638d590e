"""Our forward pass against HF transformers (PyTorch) on tiny random models, imported through the
HF path: transformers' save_pretrained, then sami_jax.load_model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny

import sami_jax
from sami_jax.models.transformer import forward

SEQ = 24


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (HF model, folder it was saved to); built once per case."""
    cache = {}

    def get(name):
        if name not in cache:
            model = tiny.hf_model(name)
            cache[name] = model, tiny.save(model, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


@pytest.mark.parametrize("name", sorted(tiny.CASES))
def test_fp32_logits_match_hf(saved, name):
    hf, path = saved(name)
    model = sami_jax.load_model(path)
    toks = tiny.tokens(2, SEQ)
    ours = np.asarray(model.logits(toks))
    ref = tiny.hf_logits(hf, toks)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-4
    assert np.abs(ref).max() > 0.5  # the comparison is not between two near-zero tensors


def test_config_fields_come_from_hf(saved):
    cfg = sami_jax.load_model(saved("llama3_rope")[1]).config
    assert cfg.rope_scaling is not None and cfg.rope_scaling.factor == 8.0
    assert cfg.eos_token_ids == (1, 2)
    assert sami_jax.load_model(saved("mistral_window")[1]).config.sliding_window == 12
    mix = sami_jax.load_model(saved("mixtral_4x2")[1]).config
    assert (mix.num_experts, mix.num_experts_per_tok) == (4, 2)
    assert sami_jax.load_model(saved("llama_tied")[1]).config.tie_word_embeddings


def test_sliding_window_matters(saved):
    """Past the window, logits must differ from full attention, or the parity test proves nothing."""
    model = sami_jax.load_model(saved("mistral_window")[1])
    toks = jnp.asarray(tiny.tokens(1, SEQ))
    fwd = jax.jit(forward, static_argnames="config")
    windowed = fwd(model.params, toks, model.config)
    full = fwd(model.params, toks, model.config.replace(sliding_window=None))
    np.testing.assert_allclose(windowed[:, :12], full[:, :12], atol=1e-5)
    assert np.abs(np.asarray(windowed[:, 12:] - full[:, 12:])).max() > 1e-3


@pytest.mark.parametrize("name", ["llama_kv2", "mistral_window", "mixtral_4x2"])
def test_left_padding_matches_unpadded(saved, name):
    model = sami_jax.load_model(saved(name)[1])
    lengths = [SEQ, SEQ - 7, SEQ - 15]
    rows = [tiny.tokens(1, n, seed=i)[0] for i, n in enumerate(lengths)]
    padded = np.zeros((len(rows), SEQ), np.int64)
    mask = np.zeros((len(rows), SEQ), bool)
    for i, r in enumerate(rows):
        padded[i, SEQ - len(r):] = r
        mask[i, SEQ - len(r):] = True
    batch = np.asarray(model.logits(padded, mask))
    assert np.isfinite(batch).all()
    for i, r in enumerate(rows):
        alone = np.asarray(model.logits(r[None]))[0]
        np.testing.assert_allclose(batch[i, SEQ - len(r):], alone, atol=1e-5, rtol=0)


def test_dropless_moe_equals_dense_reference(saved):
    model = sami_jax.load_model(saved("mixtral_4x2")[1])
    toks = jnp.asarray(tiny.tokens(3, SEQ))
    fwd = jax.jit(forward, static_argnames=("config", "moe_impl"))
    dropless = fwd(model.params, toks, model.config, moe_impl="dropless")
    dense = fwd(model.params, toks, model.config, moe_impl="dense")
    np.testing.assert_allclose(dropless, dense, atol=1e-5, rtol=0)


def test_bf16_params_give_f32_logits(saved):
    hf, path = saved("llama_kv2")
    model = sami_jax.load_model(path, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(model.params)} == {jnp.dtype(jnp.bfloat16)}
    toks = tiny.tokens(2, SEQ)
    ours = model.logits(toks)
    assert ours.dtype == jnp.float32
    ref = tiny.hf_logits(hf, toks)
    assert np.abs(np.asarray(ours) - ref).max() < 0.05 * np.abs(ref).max()


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
def test_remat_policies_keep_values_and_grads(saved, remat):
    model = sami_jax.load_model(saved("llama_kv2")[1])
    toks = jnp.asarray(tiny.tokens(2, 16))

    def loss(params, policy):
        return jnp.mean(jax.nn.log_softmax(forward(params, toks, model.config, remat=policy))[..., 5])

    grad_fn = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    base_val, base_grad = grad_fn(model.params, "none")
    val, grad = grad_fn(model.params, remat)
    np.testing.assert_allclose(val, base_val, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(base_grad), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("window", [None, 5])
def test_fused_attention_semantics_match_the_masked_einsum(window):
    """The cuDNN path's mapping (causal + per-row lengths + window) through jax.nn.dot_product_attention,
    run here with its XLA implementation: equal to our masked einsum on every real query token of
    right-padded rows. (cuDNN itself needs an NVIDIA GPU: benchmarks/gpu.sh exercises it.)"""
    from sami_jax.models.attention import attention_mask, fused_attention, gqa_attention

    rng = np.random.default_rng(0)
    b, t, h, k, d = 3, 12, 4, 2, 8
    q, kk, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((b, t, h, d), (b, t, k, d), (b, t, k, d)))
    lengths = np.array([12, 7, 3])
    valid = np.arange(t)[None] < lengths[:, None]
    idx = jnp.broadcast_to(jnp.arange(t), (b, t))
    ref = gqa_attention(q, kk, v, attention_mask(idx, idx, jnp.asarray(valid), window))
    ours = fused_attention(q, kk, v, jnp.asarray(lengths, jnp.int32), window, implementation="xla")
    np.testing.assert_allclose(np.asarray(ours)[valid], np.asarray(ref)[valid], atol=1e-5)
