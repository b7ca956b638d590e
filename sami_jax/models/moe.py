"""Mixtral mixture of experts: a top-k router, a dropless grouped path, and a dense reference.

Shapes: n tokens (batch and sequence flattened), d embed, f expert hidden, e experts, k chosen
experts per token. Router as in Mixtral/HF: softmax over all experts in float32, keep the top k,
renormalize them to sum to one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def route(x_nd: jax.Array, router_de: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
    """Top-k expert ids [n, k] (int32) and their renormalized float32 weights [n, k]."""
    logits = jnp.einsum("nd,de->ne", x_nd, router_de).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    return experts, weights / jnp.sum(weights, axis=-1, keepdims=True)


def _swiglu(h_gate, h_up):
    return jax.nn.silu(h_gate) * h_up


def moe_dropless(x_nd, router_de, w1_edf, w3_edf, w2_efd, top_k: int) -> jax.Array:
    """Every token reaches its k experts (no capacity, nothing dropped).

    The n*k (token, expert) pairs are sorted by expert and run as one grouped matmul per weight
    (`lax.ragged_dot`), so the work is n*k expert MLPs, not n*e as in the dense path.
    """
    n, d = x_nd.shape
    num_experts = w1_edf.shape[0]
    experts_nk, weights_nk = route(x_nd, router_de, top_k)
    flat = experts_nk.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = order // top_k  # which token each sorted pair came from
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    xs = x_nd[token]
    h = _swiglu(jax.lax.ragged_dot(xs, w1_edf, group_sizes), jax.lax.ragged_dot(xs, w3_edf, group_sizes))
    y = jax.lax.ragged_dot(h.astype(x_nd.dtype), w2_efd, group_sizes)
    y = y.astype(jnp.float32) * weights_nk.reshape(-1)[order][:, None]
    return jnp.zeros((n, d), jnp.float32).at[token].add(y).astype(x_nd.dtype)


def moe_dense(x_nd, router_de, w1_edf, w3_edf, w2_efd, top_k: int) -> jax.Array:
    """Reference: every expert on every token, combined with zero weight for the unchosen ones."""
    experts_nk, weights_nk = route(x_nd, router_de, top_k)
    combine_ne = jnp.sum(jax.nn.one_hot(experts_nk, w1_edf.shape[0], dtype=jnp.float32) * weights_nk[..., None],
                         axis=1)
    h = _swiglu(jnp.einsum("nd,edf->nef", x_nd, w1_edf), jnp.einsum("nd,edf->nef", x_nd, w3_edf))
    y = jnp.einsum("nef,efd->ned", h.astype(x_nd.dtype), w2_efd).astype(jnp.float32)
    return jnp.einsum("ned,ne->nd", y, combine_ne).astype(x_nd.dtype)


MOE_IMPLS = {"dropless": moe_dropless, "dense": moe_dense}
