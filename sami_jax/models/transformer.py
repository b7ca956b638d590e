"""The decoder forward pass as pure functions over the params tree (see params.py for its layout).

Shapes: b batch, t sequence, d embed, v vocab. The layers are stacked on a leading axis and run
with `lax.scan` (one compiled layer whatever the depth) under a configurable remat policy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sami_jax.models import attention, moe
from sami_jax.models.config import ModelConfig
from sami_jax.sharding import Sharder

# Names of jax.checkpoint policies: what the backward pass may keep instead of recomputing.
REMAT_POLICIES = {
    "none": None,  # no rematerialization: fastest, most memory
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute each layer in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmuls
}


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """HF's RMSNorm: normalize in float32, cast back to x's dtype, then scale."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * y.astype(x.dtype)


def positions_from_mask(mask_bt: jax.Array) -> jax.Array:
    """Per-row positions 0, 1, ... counted over real tokens only, so left padding shifts nothing."""
    return jnp.maximum(jnp.cumsum(mask_bt.astype(jnp.int32), axis=-1) - 1, 0)


def _layer(config: ModelConfig, moe_impl: str, sharder: Sharder | None, x, p, cos, sin, mask_bts):
    c = config
    h = rms_norm(x, p["input_layernorm"], c.rms_norm_eps)
    q = jnp.einsum("btd,dhk->bthk", h, p["self_attn"]["q_proj"])
    k = jnp.einsum("btd,dhk->bthk", h, p["self_attn"]["k_proj"])
    v = jnp.einsum("btd,dhk->bthk", h, p["self_attn"]["v_proj"])
    if sharder is not None:
        q = sharder.constrain(q, ("batch", None, "heads", None))
        k = sharder.constrain(k, ("batch", None, "kv_heads", None))
        v = sharder.constrain(v, ("batch", None, "kv_heads", None))
    q, k = attention.apply_rope(q, cos, sin), attention.apply_rope(k, cos, sin)
    a = attention.gqa_attention(q, k, v, mask_bts)
    x = x + jnp.einsum("bthk,hkd->btd", a, p["self_attn"]["o_proj"])
    h = rms_norm(x, p["post_attention_layernorm"], c.rms_norm_eps)
    if c.is_moe:
        m = p["block_sparse_moe"]
        b, t, d = h.shape
        y = moe.MOE_IMPLS[moe_impl](h.reshape(b * t, d), m["gate"], m["w1"], m["w3"], m["w2"],
                                    c.num_experts_per_tok).reshape(b, t, d)
    else:
        m = p["mlp"]
        g = jax.nn.silu(jnp.einsum("btd,df->btf", h, m["gate_proj"])) * jnp.einsum("btd,df->btf", h, m["up_proj"])
        y = jnp.einsum("btf,fd->btd", g, m["down_proj"])
    x = x + y
    if sharder is not None:
        x = sharder.constrain(x, ("batch", None, None))
    return x


def forward(params, tokens_bt: jax.Array, config: ModelConfig, *, mask_bt: jax.Array | None = None,
            positions_bt: jax.Array | None = None, remat: str = "none", moe_impl: str = "dropless",
            sharder: Sharder | None = None) -> jax.Array:
    """Logits float32 [b, t, v] for token ids [b, t].

    mask_bt: 1 for real tokens, 0 for padding (left or right); padding keys are never attended.
    positions_bt: RoPE positions; by default counted over real tokens (`positions_from_mask`).
    remat: a key of REMAT_POLICIES. moe_impl: "dropless" (grouped matmuls) or "dense" (reference).
    Params may be float32 or bfloat16; activations follow the params' dtype, logits are float32.
    """
    b, t = tokens_bt.shape
    mask_bt = jnp.ones((b, t), bool) if mask_bt is None else mask_bt.astype(bool)
    if positions_bt is None:
        positions_bt = positions_from_mask(mask_bt)
    cos, sin = attention.rope_cos_sin(positions_bt, attention.rope_inv_freq(config))
    idx_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    mask_bts = attention.attention_mask(idx_bt, idx_bt, mask_bt, config.sliding_window)

    x = jnp.take(params["embed_tokens"], tokens_bt, axis=0)
    if sharder is not None:
        x = sharder.constrain(x, ("batch", None, None))

    body = functools.partial(_layer, config, moe_impl, sharder)
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; choose one of {sorted(REMAT_POLICIES)}")
    if remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)

    def step(x, p):
        return body(x, p, cos, sin, mask_bts), None

    x, _ = jax.lax.scan(step, x, params["layers"])
    x = rms_norm(x, params["norm"], config.rms_norm_eps)
    head_dv = params["embed_tokens"].T if config.tie_word_embeddings else params["lm_head"]
    logits = jnp.einsum("btd,dv->btv", x, head_dv, preferred_element_type=jnp.float32)
    if sharder is not None:
        logits = sharder.constrain(logits, ("batch", None, "vocab"))
    return logits
