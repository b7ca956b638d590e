"""The chunked vocabulary log-probs against a plain numpy log-softmax and its analytic gradient, with XLA's
products and with the CPU kernels' on AMX tiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sami_jax.models.logprobs import vocab_logprobs


def _numpy_reference(x, w, targets, g):
    """log-probs [n] and the gradients of sum(g * log-probs) with respect to x and w, in float64."""
    x, w, g = (a.astype(np.float64) for a in (x, w, g))
    logits = x @ w.T
    logits -= logits.max(axis=1, keepdims=True)
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    rows = np.arange(len(targets))
    lp = log_softmax[rows, targets]
    dlogits = -np.exp(log_softmax) * g[:, None]
    dlogits[rows, targets] += g
    return lp, dlogits @ w, dlogits.T @ x


@pytest.mark.parametrize("keep", [True, False, None])  # the forward's logits read back, recomputed, by size (kept)
@pytest.mark.parametrize("v, chunk", [(384, 128), (300, 128), (300, 512)])  # divisible, padded, one padded chunk
def test_vocab_logprobs_match_numpy(v, chunk, keep, training_on_kernels):
    rng = np.random.default_rng(0)
    n, d = 24, 16
    x = rng.normal(size=(n, d)).astype(np.float32)
    w = rng.normal(size=(v, d)).astype(np.float32)
    targets = rng.integers(0, v, n)
    targets[:3] = [0, v - 1, min(chunk, v - 2)]  # first column, last (in the padded chunk), a chunk boundary
    g = rng.normal(size=n).astype(np.float32)
    lp_ref, dx_ref, dw_ref = _numpy_reference(x, w, targets, g)

    def loss(x, w):
        return jnp.sum(vocab_logprobs(x, w, jnp.asarray(targets), chunk, training_on_kernels, keep) * g)

    lp = jax.jit(vocab_logprobs, static_argnums=(3, 4, 5))(x, w, jnp.asarray(targets), chunk, training_on_kernels, keep)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    text = grad.lower(x, w).as_text()
    # logits, (recompute,) dx, dw
    assert text.count("sami_dense_matmul") == (3 + (keep is False) if training_on_kernels else 0)
    assert text.count("transpose_x = true") == (1 if training_on_kernels else 0)  # dw
    dx, dw = grad(x, w)
    np.testing.assert_allclose(lp, lp_ref, rtol=0, atol=2e-5)
    np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=2e-5)
    np.testing.assert_allclose(dw, dw_ref, rtol=0, atol=2e-5)
    assert dw.shape == w.shape
