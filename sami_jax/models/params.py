"""The parameter tree: one spec per leaf (shape, logical axes, initializer), then init / abstract trees.

Leaf names follow HF (q_proj, gate_proj, block_sparse_moe.w1, ...). Layers are stacked on a
leading `layers` axis so the forward pass can `lax.scan` over them. Linear weights are stored
[in, out] (HF stores [out, in]) with attention heads split out, so that heads can be sharded:

    embed_tokens                 [vocab, embed]
    layers/input_layernorm       [layers, embed]
    layers/self_attn/q_proj      [layers, embed, heads, head_dim]
    layers/self_attn/k_proj      [layers, embed, kv_heads, head_dim]      (v_proj alike)
    layers/self_attn/o_proj      [layers, heads, head_dim, embed]
    layers/post_attention_layernorm [layers, embed]
    layers/mlp/{gate,up}_proj    [layers, embed, mlp];  down_proj [layers, mlp, embed]
    layers/block_sparse_moe/gate [layers, embed, experts]              (Mixtral router)
    layers/block_sparse_moe/w1   [layers, experts, embed, mlp]  (gate; w3 = up alike; w2 = down transposed)
    norm                         [embed]
    lm_head                      [embed, vocab]                         (absent when tied)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from sami_jax.models.config import ModelConfig

Params = dict  # nested dict of arrays, see the module docstring


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # logical axis names, one per dim
    init: str = "normal"  # "normal" (std 0.02, as HF's initializer_range) or "ones"


def param_specs(config: ModelConfig) -> Params:
    """A tree of ParamSpec with the same structure as the params."""
    c = config
    L, D, H, K, Dh, F, V = (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                            c.intermediate_size, c.vocab_size)
    layers = {
        "input_layernorm": ParamSpec((L, D), ("layers", "norm"), "ones"),
        "post_attention_layernorm": ParamSpec((L, D), ("layers", "norm"), "ones"),
        "self_attn": {
            "q_proj": ParamSpec((L, D, H, Dh), ("layers", "embed", "heads", "head_dim")),
            "k_proj": ParamSpec((L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim")),
            "v_proj": ParamSpec((L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim")),
            "o_proj": ParamSpec((L, H, Dh, D), ("layers", "heads", "head_dim", "embed")),
        },
    }
    if c.is_moe:
        E = c.num_experts
        layers["block_sparse_moe"] = {
            "gate": ParamSpec((L, D, E), ("layers", "embed", None)),
            "w1": ParamSpec((L, E, D, F), ("layers", "experts", "embed", "mlp")),
            "w3": ParamSpec((L, E, D, F), ("layers", "experts", "embed", "mlp")),
            "w2": ParamSpec((L, E, F, D), ("layers", "experts", "mlp", "embed")),
        }
    else:
        layers["mlp"] = {
            "gate_proj": ParamSpec((L, D, F), ("layers", "embed", "mlp")),
            "up_proj": ParamSpec((L, D, F), ("layers", "embed", "mlp")),
            "down_proj": ParamSpec((L, F, D), ("layers", "mlp", "embed")),
        }
    specs = {"embed_tokens": ParamSpec((V, D), ("vocab", "embed")), "layers": layers,
             "norm": ParamSpec((D,), ("norm",), "ones")}
    if not c.tie_word_embeddings:
        specs["lm_head"] = ParamSpec((D, V), ("embed", "vocab"))
    return specs


def is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def num_params(config: ModelConfig) -> int:
    """Parameter count (tied embeddings counted once)."""
    leaves = jax.tree.leaves(param_specs(config), is_leaf=is_spec)
    return sum(math.prod(s.shape) for s in leaves)


def abstract_params(config: ModelConfig, dtype=jnp.float32, shardings=None) -> Params:
    """ShapeDtypeStructs of the params (with shardings when given), for AOT and restore targets."""
    specs = param_specs(config)
    if shardings is None:
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), specs, is_leaf=is_spec)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, dtype, sharding=sh), specs, shardings,
                        is_leaf=is_spec)


def init_params(config: ModelConfig, key: jax.Array, dtype=jnp.float32, shardings=None) -> Params:
    """Random params (normal std 0.02, norms ones), created directly with their target shardings."""
    specs = param_specs(config)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)

    def make() -> Params:
        keys = jax.random.split(key, len(leaves))
        out = [jnp.ones(s.shape, dtype) if s.init == "ones"
               else (0.02 * jax.random.normal(k, s.shape, jnp.float32)).astype(dtype)
               for s, k in zip(leaves, keys, strict=True)]
        return jax.tree.unflatten(treedef, out)

    make_fn: Callable = jax.jit(make, out_shardings=shardings) if shardings is not None else jax.jit(make)
    return make_fn()
