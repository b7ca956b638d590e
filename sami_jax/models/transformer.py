"""The decoder forward pass as pure functions over the params tree (see params.py for its layout).

Shapes: b batch, t sequence, d embed, v vocab. The layers are stacked on a leading axis and run
with `lax.scan` (one compiled layer whatever the depth) under a configurable remat policy.
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
import os
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import NamedSharding, PartitionSpec

from sami_jax.models import attention, cpu_kernels, logprobs, moe
from sami_jax.models.config import ModelConfig
from sami_jax.sharding import Sharder

# The name of the training kernels' outputs (`_matmuls_kernel`, `attention.gqa_attention`'s kernel): the dot policies
# keep them as they keep XLA's dots.
CPU_DOT = cpu_kernels.CPU_DOT
_policies = jax.checkpoint_policies
# Names of jax.checkpoint policies: what the backward pass may keep instead of recomputing.
REMAT_POLICIES = {
    "none": None,  # no rematerialization: fastest, most memory
    "full": _policies.nothing_saveable,  # recompute each layer in the backward pass
    # keep matmul outputs
    "dots": _policies.save_from_both_policies(_policies.checkpoint_dots, _policies.save_only_these_names(CPU_DOT)),
    # keep weight matmuls
    "dots_no_batch": _policies.save_from_both_policies(_policies.dots_with_no_batch_dims_saveable,
                                                       _policies.save_only_these_names(CPU_DOT)),
}


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """HF's RMSNorm: normalize in float32, cast back to x's dtype, then scale."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * y.astype(x.dtype)


def positions_from_mask(mask_bt: jax.Array) -> jax.Array:
    """Per-row positions 0, 1, ... counted over real tokens only, so left padding shifts nothing."""
    return jnp.maximum(jnp.cumsum(mask_bt.astype(jnp.int32), axis=-1) - 1, 0)


def _rows(x, n_in: int) -> tuple[tuple[int, ...], jax.Array]:
    """x [..., *in] as (its leading shape, x flattened to [tokens, prod(in)]), for a matmul over in."""
    lead = x.shape[:x.ndim - n_in]
    return lead, x.reshape(math.prod(lead), -1)


def _matmuls(x, ws, n_in: int = 1) -> tuple[jax.Array, ...]:
    """x [..., *in] times each w [*in, *out] (the last n_in dims of x against the first n_in of w):
    a tuple of [..., *out], one matmul per weight over x flattened to [tokens, in]."""
    lead, x2 = _rows(x, n_in)
    return tuple((x2 @ w.reshape(x2.shape[1], -1)).reshape(*lead, *w.shape[n_in:]) for w in ws)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmuls_cpu(x, ws, n_in):
    """`_matmuls` whose backward pass forms each weight's gradient as x^T [in, tokens] @ dy [tokens, out],
    with x^T materialized once for all the weights that share x (or, where x is wider than the outputs,
    as the transpose of dy^T @ x). Left to autodiff, XLA's CPU backend
    contracts the tokens by copying each [tokens, out] output gradient into a transposed layout in a
    loop fusion that reads it with a stride: about 0.4 s per SmolLM2 layer in a 4,096-token step, more
    than a third of the MLP's backward. Same values; used on the CPU only (GPUs and TPUs transpose in
    their matmuls)."""
    return _matmuls(x, ws, n_in)


def _matmuls_cpu_fwd(x, ws, n_in):
    return _matmuls(x, ws, n_in), (x, ws)


def _weight_grads(x2, dy2s, ws) -> tuple[jax.Array, ...]:
    """dW = x^T dy for x [tokens, in] and each dy [tokens, out] (`_matmuls_cpu`'s way), shaped as ws."""
    barrier = jax.lax.optimization_barrier  # keeps each transpose apart, or XLA folds it back into the dot
    if x2.shape[1] <= sum(dy2.shape[1] for dy2 in dy2s):  # transpose the narrower side: x once, for every weight
        x_t = barrier(x2.T)
        dws = [x_t @ dy2 for dy2 in dy2s]
    else:  # e.g. the MLP's down projection: dW^T = dy^T @ x, then a transpose of the small result
        dws = [(barrier(dy2.T) @ x2).T for dy2 in dy2s]
    return tuple(dw.reshape(w.shape).astype(w.dtype) for dw, w in zip(dws, ws, strict=True))


def _matmuls_cpu_bwd(n_in, res, dys):
    x, ws = res
    _, x2 = _rows(x, n_in)
    dy2s = [dy.reshape(x2.shape[0], -1) for dy in dys]
    dx = sum(dy2 @ w.reshape(x2.shape[1], -1).T for w, dy2 in zip(ws, dy2s, strict=True))
    return dx.reshape(x.shape).astype(x.dtype), _weight_grads(x2, dy2s, ws)


_matmuls_cpu.defvjp(_matmuls_cpu_fwd, _matmuls_cpu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmuls_kernel(x, ws, n_in):
    """`_matmuls_cpu` on the CPU kernels (`cpu_kernels.training`): AMX tiles at float32 accuracy (each float32 split
    exactly into three bf16 pieces), or the packed AVX2 GEMM where there is no AVX-512. x W on `cpu_kernels.dot`,
    dy W^T on `dot_nt` and dW = x^T dy on `dot_tn`, each operand read as XLA holds it (no transposed copy; on AMX no
    packed copy either). Its outputs carry the name CPU_DOT, which the dot remat policies keep. Float32, unsharded
    (`_project`).

    In a SAMI step on SmolLM2 (2 cores, shared prompts, `dots_no_batch`, 4 micro-batches, one process,
    alternating): 14.34 s against 15.08 s with XLA's dots, when each call packed its weight as panels with an XLA
    transpose (session 27); dW on `dot_tn` instead of XLA's transpose and dot: paired ratio 0.914 (session 30);
    the weights read as they are instead of packed by XLA: 0.92-1.05x per product, 0.99 in the step (session
    31, within the VM's noise). On the AVX2 GEMM (2-core AMD EPYC, session 36): paired medians 0.949, 0.986 and
    0.946 in three comparisons of 5 rounds. In a layer scan its weights are `LayerWeight`s, read in place from their
    stacks."""
    return _kernel_products(x, ws, n_in)


def _kernel_products(x, ws, n_in):
    lead, x2 = _rows(x, n_in)
    ys = (checkpoint_name(_dot_weight(cpu_kernels.dot, x2, w, x2.shape[1]), CPU_DOT) for w in ws)
    return tuple(y.reshape(*lead, *w.shape[n_in:]) for y, w in zip(ys, ws, strict=True))


def _dot_weight(product, x2, w, k: int):
    """`cpu_kernels.dot` or `dot_nt` of x2 and the weight w ([*in, *out] as [k, out]), a `LayerWeight` read in place
    from its stack."""
    if isinstance(w, LayerWeight):
        return product(x2, w.stack.reshape(w.stack.shape[0], k, -1), w.index)
    return product(x2, w.reshape(k, -1))


def _matmuls_kernel_fwd(x, ws, n_in):
    # (a LayerWeight's slice is not kept: its stack and index are, and the slice is never formed)
    kept = tuple(LayerWeight(None, w.stack, w.index) if isinstance(w, LayerWeight) else w for w in ws)
    return _kernel_products(x, ws, n_in), (x, kept)


def _matmuls_kernel_bwd(n_in, res, dys):
    x, ws = res
    _, x2 = _rows(x, n_in)
    dy2s = [dy.reshape(x2.shape[0], -1) for dy in dys]
    dx = sum(_dot_weight(cpu_kernels.dot_nt, dy2, w, x2.shape[1]) for w, dy2 in zip(ws, dy2s, strict=True))
    dws = (cpu_kernels.dot_tn(x2, dy2).reshape(w.shape) for w, dy2 in zip(ws, dy2s, strict=True))
    return dx.reshape(x.shape), tuple(LayerWeight(dw, None, None) if isinstance(w, LayerWeight) else dw
                                      for w, dw in zip(ws, dws, strict=True))


_matmuls_kernel.defvjp(_matmuls_kernel_fwd, _matmuls_kernel_bwd)


def training_kernels(*arrays) -> bool:
    """Whether training runs on the CPU kernels, its attention (`attention.gqa_attention`'s kernel) and its dense
    products (`_matmuls_kernel`, the layers' weights read in place from their stacks): float32 arrays, a CPU backend
    and `cpu_kernels.training()` (AMX tiles, or the AVX2 GEMM where there is no AVX-512; `SAMI_JAX_CPU_KERNELS`,
    `SAMI_JAX_AMX`); the callers add: one device (the kernels are calls XLA cannot partition)."""
    return (jax.default_backend() == "cpu" and all(a.dtype == jnp.float32 for a in arrays)
            and cpu_kernels.training())


def _kernel_applies(x, ws, n_in: int) -> bool:
    """Whether `_matmuls_kernel` takes these products: `training_kernels`, with more rows than a decode step's."""
    return math.prod(x.shape[:x.ndim - n_in]) > cpu_kernels.ONE_PASS_ROWS and training_kernels(x, *ws)


@flax.struct.dataclass
class LayerWeight:
    """A projection weight inside the layer scan on the CPU kernels (`hidden_states`): `w`, the layer's slice
    [*in, *out], through which its gradient flows, and the stack [layers, *in, *out] it is a slice of with the layer's
    index, which `_matmuls_kernel`'s products read in place. The slice itself is never formed: XLA copied each weight
    out of the stack for each kernel call, forward and backward (the SAMI step on SmolLM2, 2 cores: paired 0.97
    of the time with the copies, session 32)."""

    w: jax.Array | None
    stack: jax.Array | None  # (gradient-stopped: the gradient is the slice's)
    index: jax.Array | None  # int32 []

    @property
    def shape(self):
        return self.stack.shape[1:]

    @property
    def dtype(self):
        return self.stack.dtype


def _in_place(p, stacks, index):
    """A layer's params p with each dense projection weight as a `LayerWeight` of its slice in stacks."""
    def wrap(path, w, stack):
        return LayerWeight(w, stack, index) if getattr(path[-1], "key", None) in _PROJECTION_INPUT_DIMS else w
    return jax.tree_util.tree_map_with_path(wrap, p, stacks)


@flax.struct.dataclass
class OutIn:
    """A projection weight stored as [*out, *in], the transpose of the params tree's [*in, *out]
    (`split_layers(out_in=True)`; the sampler's per-layer layout, see `_matmuls_out_in`). With `outs`,
    w [sum of the outputs' sizes, in] holds several projections of the same input, one after another, and
    the product is split into outputs of these shapes. With `panels`, w is that [out, in] weight packed
    for `cpu_kernels.matmul` ([ceil(out / 16), in, 16] float32, or uint8 blocks from `pack_blocks`;
    `split_layers(panels=True)`), and `outs` is set."""

    w: jax.Array
    outs: tuple[tuple[int, ...], ...] | None = flax.struct.field(pytree_node=False, default=None)
    panels: bool = flax.struct.field(pytree_node=False, default=False)

    @property
    def dtype(self):
        return self.w.dtype


def uses_cpu_kernels(params) -> bool:
    """Whether params hold weights packed for `cpu_kernels` (`split_layers(panels=True)`, which loads them):
    then the sampler's other float32 steps on that one CPU device use the kernels too."""
    lm_head = params.get("lm_head")
    return isinstance(lm_head, OutIn) and lm_head.panels


# Rows up to which `_matmuls_out_in` multiplies as (W x^T)^T; measured on a 2-core Zen 2 (XLA CPU).
_OUT_IN_MAX_ROWS = 64


def _matmuls_out_in(x, ws: Sequence[OutIn], n_in: int, dtype=None) -> tuple[jax.Array, ...]:
    """x [..., *in] times each `OutIn` [*out, *in]: a tuple of [..., *out] (one per output of a fused one).

    With few rows (decoding) on a CPU, each product is formed as W [out, in] @ x^T [in, rows] and transposed
    after a barrier (or XLA folds the transpose back into the dot): XLA's CPU GEMM runs a 16-row
    SmolLM2 product 1.6-1.9x faster that way round, e.g. [16, 576] x [576, 1536] 1.10 -> 0.64 ms and
    the [16, 576] x [576, 49152] vocab projection 29 -> 16 ms, weights read from memory as in a decode
    step. With many rows, x @ W^T, as fast as the [*in, *out] layout. Panels go to `cpu_kernels.matmul`
    (float32) whatever the rows."""
    lead, x2 = _rows(x, n_in)

    def x_wt(x2, w2):
        return jnp.matmul(x2, w2.T, preferred_element_type=dtype)

    def w_xt(x2, w2):
        return jax.lax.optimization_barrier(jnp.matmul(w2, x2.T, preferred_element_type=dtype)).T

    out = []
    for w in ws:
        if w.panels:
            y = cpu_kernels.matmul(x2.astype(jnp.float32), w.w, sum(math.prod(o) for o in w.outs))
            y = y.astype(dtype or x2.dtype)
        elif x2.shape[0] <= _OUT_IN_MAX_ROWS:  # (GPUs take either operand transposed in the GEMM itself)
            y = jax.lax.platform_dependent(x2, w.w.reshape(-1, x2.shape[1]), cpu=w_xt, default=x_wt)
        else:
            y = x_wt(x2, w.w.reshape(-1, x2.shape[1]))
        outs = w.outs or (w.w.shape[:w.w.ndim - n_in],)
        splits = np.cumsum([math.prod(o) for o in outs])[:-1]
        out.extend(part.reshape(*lead, *o) for part, o in zip(jnp.split(y, splits, axis=-1), outs, strict=True))
    return tuple(out)


def _weights(tree, names: Sequence[str]) -> list:
    """The named projection weights of a layer, or the one `OutIn` that fuses them (`split_layers`)."""
    fused = tree.get("+".join(names))
    return [fused] if fused is not None else [tree[n] for n in names]


def _project(x, ws, n_in: int = 1, sharded: bool = False) -> tuple[jax.Array, ...]:
    """`_matmuls`, with `_matmuls_cpu`'s backward where the program is lowered for a CPU (chosen at
    lowering, so that a TPU program compiled ahead of time on a CPU host keeps autodiff's), or, in an
    unsharded program where `training_kernels` holds, `_matmuls_kernel`; weights given as `OutIn` go through
    `_matmuls_out_in`."""
    if isinstance(ws[0], OutIn):
        return _matmuls_out_in(x, ws, n_in)
    slices = tuple(w.w if isinstance(w, LayerWeight) else w for w in ws)
    cpu = (lambda x: _matmuls_kernel(x, tuple(ws), n_in)) if not sharded and _kernel_applies(x, ws, n_in) else \
        (lambda x: _matmuls_cpu(x, slices, n_in))
    return jax.lax.platform_dependent(x, cpu=cpu, default=lambda x: _matmuls(x, slices, n_in))


def _layer(config: ModelConfig, moe_impl: str, sharder: Sharder | None, x, p, cos, sin, attend):
    """One decoder layer. `attend(q, k, v) -> (out [b, t, h, d], aux)` does the attention proper, so the
    same layer serves the full-sequence pass and the KV-cache pass; returns (x, aux)."""
    c = config
    h = rms_norm(x, p["input_layernorm"], c.rms_norm_eps)
    sharded = sharder is not None  # (the CPU kernels are calls XLA cannot partition)
    q, k, v = _project(h, _weights(p["self_attn"], ("q_proj", "k_proj", "v_proj")), sharded=sharded)
    if sharder is not None:
        q = sharder.constrain(q, ("batch", None, "heads", None))
        k = sharder.constrain(k, ("batch", None, "kv_heads", None))
        v = sharder.constrain(v, ("batch", None, "kv_heads", None))
    q, k = attention.apply_rope(q, cos, sin), attention.apply_rope(k, cos, sin)
    a, aux = attend(q, k, v)
    x = x + _project(a, [p["self_attn"]["o_proj"]], n_in=2, sharded=sharded)[0]
    h = rms_norm(x, p["post_attention_layernorm"], c.rms_norm_eps)
    if c.is_moe:
        m = p["block_sparse_moe"]
        b, t, d = h.shape
        y = moe.MOE_IMPLS[moe_impl](h.reshape(b * t, d), m["gate"], m["w1"], m["w3"], m["w2"],
                                    c.num_experts_per_tok).reshape(b, t, d)
    else:
        m = p["mlp"]
        gate, up = _project(h, _weights(m, ("gate_proj", "up_proj")), sharded=sharded)
        y = _project(jax.nn.silu(gate) * up, [m["down_proj"]], sharded=sharded)[0]
    x = x + y
    if sharder is not None:
        x = sharder.constrain(x, ("batch", None, None))
    return x, aux


def _logits(params, x, config: ModelConfig, sharder: Sharder | None) -> jax.Array:
    x = rms_norm(x, params["norm"], config.rms_norm_eps)
    if isinstance(params.get("lm_head"), OutIn):
        logits = _matmuls_out_in(x, [params["lm_head"]], 1, jnp.float32)[0]
    else:
        head_dv = params["embed_tokens"].T if config.tie_word_embeddings else params["lm_head"]
        logits = jnp.einsum("btd,dv->btv", x, head_dv, preferred_element_type=jnp.float32)
    if sharder is not None:
        logits = sharder.constrain(logits, ("batch", None, "vocab"))
    return logits


def _embed(params, tokens_bt, sharder: Sharder | None) -> jax.Array:
    x = jnp.take(params["embed_tokens"], tokens_bt, axis=0)
    return sharder.constrain(x, ("batch", None, None)) if sharder is not None else x


def forward(params, tokens_bt: jax.Array, config: ModelConfig, *, sharder: Sharder | None = None,
            logit_positions_bn: jax.Array | None = None, **kwargs) -> jax.Array:
    """Logits float32 [b, t, v] for token ids [b, t] ([b, n, v] with logit_positions_bn); kwargs as for
    `hidden_states`."""
    x = hidden_states(params, tokens_bt, config, sharder=sharder, positions_bn=logit_positions_bn, **kwargs)
    return _logits(params, x, config, sharder)


def token_logprobs(params, tokens_bt: jax.Array, config: ModelConfig, targets_bn: jax.Array,
                   logit_positions_bn: jax.Array, *, sharder: Sharder | None = None, **kwargs) -> jax.Array:
    """float32 [b, n]: log p(targets_bn | the logits at logit_positions_bn), a log-softmax over the vocabulary;
    kwargs as for `hidden_states`. On a CPU (and unsharded) without the [b, n, v] logits in memory
    (`logprobs.vocab_logprobs`); elsewhere from `forward`'s logits."""
    x = hidden_states(params, tokens_bt, config, sharder=sharder, positions_bn=logit_positions_bn, **kwargs)

    def plain(x, targets):
        logits = _logits(params, x, config, sharder)
        return jnp.take_along_axis(logits, targets[..., None], -1)[..., 0] - jax.nn.logsumexp(logits, axis=-1)

    if sharder is not None:
        return plain(x, targets_bn)

    def chunked(x, targets):
        w_vd = params["embed_tokens"] if config.tie_word_embeddings else params["lm_head"].T
        x = rms_norm(x, params["norm"], config.rms_norm_eps)
        b, n, d = x.shape
        x = x.reshape(b * n, d)
        kernel = _kernel_applies(x, (w_vd,), 1)  # (the products of `_project`'s choice, for the same reasons)
        return logprobs.vocab_logprobs(x, w_vd, targets.reshape(b * n), 1024, kernel).reshape(b, n)

    return jax.lax.platform_dependent(x, targets_bn, cpu=chunked, default=plain)


def hidden_states(params, tokens_bt: jax.Array, config: ModelConfig, *, mask_bt: jax.Array | None = None,
                  positions_bt: jax.Array | None = None, remat: str = "none", moe_impl: str = "dropless",
                  sharder: Sharder | None = None, positions_bn: jax.Array | None = None,
                  attention_impl: str = "einsum", prefix_windows: tuple[int, int] | None = None) -> jax.Array:
    """The last layer's output [b, t, d] for token ids [b, t] (before the final norm; [b, n, d] at
    positions_bn of each row).

    mask_bt: 1 for real tokens, 0 for padding (left or right); padding keys are never attended.
    positions_bt: RoPE positions; by default counted over real tokens (`positions_from_mask`).
    Params with "layers" stacked run as a layer scan; with "layers" a tuple of per-layer trees
    (`unstack_layers`), as a loop unrolled in the program.
    remat: a key of REMAT_POLICIES. moe_impl: "dropless" (grouped matmuls) or "dense" (reference).
    Params may be float32 or bfloat16; the activations follow the params' dtype.
    positions_bn: only these positions of each row (e.g. those whose logits score a response's tokens),
    which saves the vocab projection's FLOPs and the [b, t, v] buffer everywhere else.
    attention_impl: "einsum" (any padding; scores materialized; on the CPU kernels, forward and backward, where
    `training_kernels` holds and there is no sharder) or "cudnn" (flash attention on NVIDIA GPUs in bf16; rows
    must be right-padded, as SAMI's pair batches are).
    prefix_windows: (P, n) for rows laid out as a prefix of P slots followed by windows of n slots that
    each continue it alone (`attention.prefix_windows_attention`; SAMI's shared prompts); needs mask_bt
    and positions_bt; einsum only.
    """
    if attention_impl not in ("einsum", "cudnn"):
        raise ValueError(f"attention_impl must be 'einsum' or 'cudnn', got {attention_impl!r}")
    b, t = tokens_bt.shape
    if prefix_windows is not None and (attention_impl != "einsum" or positions_bt is None or mask_bt is None):
        raise ValueError("prefix_windows needs attention_impl='einsum', mask_bt and positions_bt")
    mask_bt = jnp.ones((b, t), bool) if mask_bt is None else mask_bt.astype(bool)
    if positions_bt is None:
        positions_bt = positions_from_mask(mask_bt)
    cos, sin = attention.rope_cos_sin(positions_bt, attention.rope_inv_freq(config))

    x = _embed(params, tokens_bt, sharder)
    # (attention on the CPU kernels, `attention.gqa_attention`; the projections' weights read from their stacks)
    kernel = sharder is None and training_kernels(x)

    if attention_impl == "cudnn":
        lengths_b = jnp.sum(mask_bt, axis=1, dtype=jnp.int32)

        def attend(q, k, v):
            return attention.fused_attention(q, k, v, lengths_b, config.sliding_window), None
    elif prefix_windows is not None:
        def attend(q, k, v):
            return attention.prefix_windows_attention(q, k, v, mask_bt, positions_bt, *prefix_windows,
                                                      config.sliding_window, kernel), None
    else:
        idx_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        mask_bts = attention.attention_mask(idx_bt, idx_bt, mask_bt, config.sliding_window)

        def attend(q, k, v):
            return attention.gqa_attention(q, k, v, mask_bts, kernel), None

    def body(x, p):
        return _layer(config, moe_impl, sharder, x, p, cos, sin, attend)[0]

    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; choose one of {sorted(REMAT_POLICIES)}")
    if remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)

    if isinstance(params["layers"], tuple):  # per-layer params (`unstack_layers`): no slices of a stack
        for p in params["layers"]:
            x = body(x, p)
    elif kernel:  # the projections read each layer's weights in place from the stacks (`LayerWeight`)
        layers = params["layers"]
        stacks = jax.lax.stop_gradient(layers)
        n = jax.tree.leaves(layers)[0].shape[0]
        x, _ = jax.lax.scan(lambda x, xs: (body(x, _in_place(xs[0], stacks, xs[1])), None), x,
                            (layers, jnp.arange(n, dtype=jnp.int32)))
    else:
        x, _ = jax.lax.scan(lambda x, p: (body(x, p), None), x, params["layers"])
    if positions_bn is not None:
        x = jnp.take_along_axis(x, positions_bn[..., None], axis=1)
    return x


def unstack_layers(params):
    """The params with the stacked "layers" as a tuple of per-layer trees (slices; inside a jitted function,
    where a cast that precedes them fuses with them). `hidden_states` then runs the layers as an unrolled
    loop: each layer's matmuls read its weights as whole arrays, and its saved activations are buffers of
    their own, where a scan copies weights out of the stack and writes activations into stacked buffers
    (11% of an H100 SAMI step's kernel time, session 13's profile). Costs compile time per layer."""
    layers = params["layers"]
    n = jax.tree.leaves(layers)[0].shape[0]
    return {**params, "layers": tuple(jax.tree.map(lambda a, i=i: a[i], layers) for i in range(n))}


def stack_layers(params):
    """The inverse of `unstack_layers` (e.g. for gradients taken with respect to per-layer params)."""
    return {**params, "layers": jax.tree.map(lambda *a: jnp.stack(a), *params["layers"])}


@flax.struct.dataclass
class KVCache:
    """Keys and values at KV-head width for every layer, [layers, b, kv_heads, s, d], and which slots
    hold a real token ([b, s]). Slots are shared by all rows: prompts are left-padded to a common
    length, so slot index differences equal position differences within a row. Heads come before slots
    so that attention's batch dims (b, kv_heads) lead and XLA reads the cache without transposing it."""

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]
    valid: jax.Array

    @classmethod
    def create(cls, config: ModelConfig, batch: int, length: int, dtype, sharder: Sharder | None = None,
               per_layer: bool = False) -> KVCache:
        """An empty cache; per_layer: k and v are tuples of one [b, kv_heads, s, d] buffer per layer (for
        per-layer params, see `split_layers`) instead of one stacked array each."""
        shape, axes = (batch, config.num_kv_heads, length, config.head_dim), ("batch", "kv_heads", None, None)
        if not per_layer:
            shape, axes = (config.num_layers, *shape), (None, *axes)

        def zeros():
            z = jnp.zeros(shape, dtype)
            return z if sharder is None else sharder.constrain(z, axes)

        if per_layer:
            return cls(k=tuple(zeros() for _ in range(config.num_layers)),
                       v=tuple(zeros() for _ in range(config.num_layers)), valid=jnp.zeros((batch, length), bool))
        return cls(k=zeros(), v=zeros(), valid=jnp.zeros((batch, length), bool))


# The dense projections' weights and how many leading dims of each are its input.
_PROJECTION_INPUT_DIMS = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate_proj": 1, "up_proj": 1,
                          "down_proj": 1}
# Projections of the same input that `split_layers(out_in=True)` fuses (n_in 1 each).
_FUSED = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))


def split_layers(params, out_in: bool = False, panels: bool = False):
    """The params with "layers" as a tuple of per-layer trees, each leaf a buffer of its own (a copy, made
    on the params' devices with the same sharding less the layer axis). `forward_cached` then loops over
    the layers in Python instead of scanning the stacked arrays: a scan hands each layer's weights to the
    matmuls as a slice of the stack, which XLA copies out at every decode step on the CPU (a SmolLM2-135M
    decode step at batch 1 spent 2.6 of its 3.0 s in those copies; the loop halves the step time).

    out_in: the dense projections' weights and the vocab projection as `OutIn` ([*out, *in]; the head of
    tied embeddings is the embedding table itself, not a copy), for `_matmuls_out_in`. Where they are not
    sharded, q/k/v and gate/up are each fused into one `OutIn` (keys "q_proj+k_proj+v_proj",
    "gate_proj+up_proj"): one [960, 576] product instead of three takes 0.42 ms instead of 0.60 at 16 rows.

    panels (implies out_in; float32 params on one CPU device, with `cpu_kernels.load()` done): each `OutIn`
    packed as panels for `cpu_kernels.matmul`; the vocab projection of tied embeddings is then a packed copy
    of the table (113 MB for SmolLM2-135M). Where a weight's values are exactly those of a GGUF quantized type
    (`cpu_kernels.pack_blocks`: Q8_0, Q4_0/1, Q5_0/1 files, before any training), its panels are stored as
    8-bit blocks instead: 1.25 bytes a weight for 4, the same products to the bit (SmolLM2-135M's Q4_1/Q8_0
    GGUF: all 121 weights, 538 -> 168 MB, a batch-16 decode step's products 40 -> 29 ms on 2 cores)."""
    out_in = out_in or panels
    layers = params["layers"]
    n = jax.tree.leaves(layers)[0].shape[0]

    def transposed(path, a):  # the permutation of a's per-layer dims that the layout asks for
        n_in = _PROJECTION_INPUT_DIMS.get(getattr(path[-1], "key", None)) if out_in else None
        dims = tuple(range(a.ndim - 1))
        return dims if n_in is None else dims[n_in:] + dims[:n_in]

    perms = jax.tree_util.tree_map_with_path(transposed, layers)

    def sharding(a, perm):
        s = a.sharding
        if not isinstance(s, NamedSharding):
            return s
        spec = (*s.spec, *(None,) * (a.ndim - len(s.spec)))[1:]
        return NamedSharding(s.mesh, PartitionSpec(*(spec[i] for i in perm)))

    def wrap(a, perm):
        return OutIn(a) if perm != tuple(range(len(perm))) else a

    layer_shardings = jax.tree.map(lambda a, perm: wrap(sharding(a, perm), perm), layers, perms)
    fuse = [(group, names) for group, names in _FUSED if out_in and group in layers
            and all(n in layers[group] and layers[group][n].sharding.is_fully_replicated for n in names)]

    def fused(layer, join):  # one `OutIn` in place of each group of projections
        layer = {**layer}
        for group, names in fuse:
            rest = {k: a for k, a in layer[group].items() if k not in names}
            fused_w = join([layer[group][n].w for n in names])
            layer[group] = {**rest, "+".join(names): OutIn(fused_w, tuple(layers[group][n].shape[2:] for n in names))}
        return layer

    def concat(parts):  # [*out, in] each
        return jnp.concatenate([w.reshape(-1, w.shape[-1]) for w in parts])

    def replicated(parts):
        s = parts[0]
        return NamedSharding(s.mesh, PartitionSpec()) if isinstance(s, NamedSharding) else s

    shardings = (fused(layer_shardings, replicated),) * n

    def to_panels(path, w):
        if not (panels and isinstance(w, OutIn)):
            return w
        n_in = _PROJECTION_INPUT_DIMS[path[-1].key.split("+")[0]]
        outs = w.outs or (w.w.shape[:w.w.ndim - n_in],)
        return OutIn(cpu_kernels.pack(w.w.reshape(-1, math.prod(w.w.shape[w.w.ndim - n_in:]))), outs, panels=True)

    def split(ls):
        return tuple(jax.tree_util.tree_map_with_path(
            to_panels, fused(jax.tree.map(lambda a, perm, i=i: wrap(a[i].transpose(perm), perm), ls, perms), concat),
            is_leaf=lambda w: isinstance(w, OutIn)) for i in range(n))

    # (Panels live on the params' one device: no shardings to give.)
    out = {**params, "layers": jax.jit(split, out_shardings=None if panels else shardings)(layers)}
    if out_in:
        head = params["embed_tokens"] if "lm_head" not in params else jax.jit(lambda w: w.T)(params["lm_head"])
        out["lm_head"] = OutIn(jax.jit(cpu_kernels.pack)(head), ((head.shape[0],),), panels=True) if panels \
            else OutIn(head)
    if panels:
        out = _panels_as_blocks(out)
    return out


def _panels_as_blocks(params):
    """params with each panel `OutIn` whose weights `cpu_kernels.pack_blocks` can store as blocks replaced
    by the blocks (packed on threads of their own: the packer releases the GIL)."""
    is_panels = lambda w: isinstance(w, OutIn) and w.panels
    leaves, treedef = jax.tree.flatten(params, is_leaf=is_panels)
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        blocks = list(pool.map(lambda w: cpu_kernels.pack_blocks(w.w) if is_panels(w) else None, leaves))
    return jax.tree.unflatten(treedef, [w if b is None else OutIn(jax.device_put(b, w.w.sharding), w.outs, panels=True)
                                        for w, b in zip(leaves, blocks, strict=True)])


def forward_cached(params, tokens_bt: jax.Array, config: ModelConfig, cache: KVCache, start: jax.Array, *,
                   positions_bt: jax.Array, mask_bt: jax.Array, moe_impl: str = "dropless",
                   sharder: Sharder | None = None, last_only: bool = False, fresh: bool = False,
                   prefill_attention: str = "einsum") -> tuple[jax.Array, KVCache]:
    """Runs tokens [b, t] that occupy cache slots [start, start + t): attends over every valid cached slot
    before them and causally among themselves (inside the sliding window), writes their keys and values,
    and returns float32 logits [b, t, v] and the updated cache. Prefill is t = prompt length at start 0
    with `fresh=True` (an empty cache, which is then not read); decoding is t = 1.

    mask_bt marks which of the new tokens are real (padding is never attended); positions_bt are their
    RoPE positions. last_only: logits for the last position only ([b, 1, v]); a prefill needs no more, and
    the vocab projection of every prompt token is a large share of its FLOPs.
    prefill_attention: how a fresh prefill's tokens attend among themselves (rows left-padded): "einsum"
    (scores in memory), or flash attention through `attention.fused_attention_left_padded`, "cudnn" (NVIDIA
    GPUs, bf16/fp16) or "xla" (jax's portable implementation of the same call). Float32 params packed for
    the CPU kernels (`uses_cpu_kernels`) attend through `cpu_kernels.attention` instead.

    Per-layer params (`split_layers`) and a per-layer cache (`KVCache.create(per_layer=True)`) run as a
    Python loop over the layers, each writing the new keys and values into its own buffers and then
    attending over them. Stacked ones run as a layer scan: each layer reads its cache slice as a scan
    input and returns only the new keys and values, and one update after the scan writes them all, in
    place when the cache is donated. (Carrying the stacked cache through the scan and updating it per
    layer made XLA copy a layer's cache every step.)
    """
    b, t = tokens_bt.shape
    length = cache.valid.shape[1]
    cos, sin = attention.rope_cos_sin(positions_bt, attention.rope_inv_freq(config))
    q_idx = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
    kv_idx = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    valid = jax.lax.dynamic_update_slice(cache.valid, mask_bt.astype(bool), (0, start))
    new_mask = attention.attention_mask(q_idx, q_idx, mask_bt.astype(bool), config.sliding_window)
    if prefill_attention not in ("einsum", "cudnn", "xla"):
        raise ValueError(f"prefill_attention must be 'einsum', 'cudnn' or 'xla', got {prefill_attention!r}")

    def attend_new(q, k, v):  # the new tokens among themselves (a fresh prefill)
        if prefill_attention == "einsum":
            return attention.gqa_attention(q, k, v, new_mask)
        return attention.fused_attention_left_padded(q, k, v, mask_bt, config.sliding_window, prefill_attention)

    def write(buf, new_btkd):  # new keys or values into their slots of a [b, kv, s, d] buffer
        return jax.lax.dynamic_update_slice(buf, new_btkd.swapaxes(1, 2).astype(buf.dtype), (0, 0, start, 0))

    per_layer = isinstance(params["layers"], tuple)
    if per_layer != isinstance(cache.k, tuple):
        raise ValueError("per-layer params (split_layers) need a per-layer cache (KVCache.create(per_layer=True)), "
                         "and stacked params a stacked one")
    x = _embed(params, tokens_bt, sharder)
    if per_layer:
        # Each layer writes its new keys and values into its own buffers, then attends over them (after a
        # prefill, only among the new tokens). Attending over the old buffers and writing afterwards made
        # XLA copy both buffers of every layer at each decode step: 28 of a 160 ms step at batch 16.
        mask = None if fresh else attention.attention_mask(q_idx, kv_idx, valid, config.sliding_window)
        # Weights packed as panels mean the CPU kernels are loaded: float32 attention then runs through
        # cpu_kernels.attention, which reads only each query's unmasked slots (SmolLM2, batch 16, 64 new tokens
        # after 128 on the 2-core CPU: the decode steps', 6.22 -> 5.74 s a run; the prefill's, 2.42 -> 2.27 s).
        # A fresh prefill then attends over the buffers it has just written (its tokens in slots [start,
        # start + t)), whatever prefill_attention says.
        kernel = uses_cpu_kernels(params) and cache.k[0].dtype == jnp.float32
        if kernel and fresh:
            mask = jax.lax.dynamic_update_slice(jnp.zeros((b, t, length), bool), new_mask, (0, 0, start))
        k, v = [], []
        for p, kc, vc in zip(params["layers"], cache.k, cache.v, strict=True):
            def attend(q, k_new, v_new, kc=kc, vc=vc):
                kc, vc = write(kc, k_new), write(vc, v_new)
                if kernel:
                    return cpu_kernels.attention(q, kc, vc, mask).astype(q.dtype), (kc, vc)
                if fresh:
                    return attend_new(q, k_new, v_new), (kc, vc)
                return attention.gqa_attention_bksd(q, kc, vc, mask), (kc, vc)

            x, (kc, vc) = _layer(config, moe_impl, sharder, x, p, cos, sin, attend)
            k.append(kc)
            v.append(vc)
        k, v = tuple(k), tuple(v)
    else:
        old_mask = attention.attention_mask(q_idx, kv_idx, cache.valid, config.sliding_window)

        def step(x, xs):
            p, kc, vc = xs if not fresh else (xs, None, None)

            def attend(q, k, v):
                if fresh:
                    return attend_new(q, k, v), (k, v)
                return attention.gqa_attention_cached(q, kc, vc, old_mask, k, v, new_mask), (k, v)

            x, (k, v) = _layer(config, moe_impl, sharder, x, p, cos, sin, attend)
            return x, (k.swapaxes(1, 2), v.swapaxes(1, 2))  # [b, kv, t, d], the cache's layout

        xs = params["layers"] if fresh else (params["layers"], cache.k, cache.v)
        x, (k_new, v_new) = jax.lax.scan(step, x, xs)  # k_new [layers, b, kv, t, d]
        k = jax.lax.dynamic_update_slice(cache.k, k_new.astype(cache.k.dtype), (0, 0, 0, start, 0))
        v = jax.lax.dynamic_update_slice(cache.v, v_new.astype(cache.v.dtype), (0, 0, 0, start, 0))
    return _logits(params, x[:, -1:] if last_only else x, config, sharder), KVCache(k=k, v=v, valid=valid)
