"""RoPE (HF rotate-half layout, Llama-3 scaling), masks and grouped-query attention.

Shapes: b batch, t query positions, s key positions, h query heads, k KV heads, g = h / k query
heads per KV head, d head_dim. KV heads are never repeated: queries are viewed as [b, t, k, g, d].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from sami_jax.models import cpu_kernels
from sami_jax.models.config import ModelConfig, RopeScaling

_NEG = float(np.finfo(np.float32).min)  # finite: a fully masked (padding) row stays NaN-free


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies [head_dim / 2] in float32, computed as HF does (Llama-3 scaling included)."""
    return inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)


def inv_freq(d: int, theta: float, s: RopeScaling | None = None) -> np.ndarray:
    """`rope_inv_freq` from its three fields: head dim d, base theta, Llama-3 scaling s (None: none)."""
    inv = (1.0 / (np.float32(theta) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d))))
    inv = inv.astype(np.float32)
    if s is None:
        return inv
    # Llama-3: long wavelengths are divided by `factor`, short ones kept, a smooth blend between.
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * np.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, blended, scaled).astype(np.float32)


def rope_cos_sin(positions_bt: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos, sin [b, t, head_dim / 2] in float32 for integer positions [b, t] (HF's tables repeat them for the
    second half of the head)."""
    freqs = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    return jnp.cos(freqs), jnp.sin(freqs)


def apply_rope(x_btnd: jax.Array, cos_bth: jax.Array, sin_bth: jax.Array) -> jax.Array:
    """Rotate-half RoPE on [b, t, heads, d] with `rope_cos_sin`'s half tables; computed in float32 like HF,
    returned in x's dtype. Each half is rotated on its own and the two joined once: XLA's CPU fusion of HF's
    x * cos + rotate_half(x) * sin (a concatenation inside the product) took 2.1x the time forward and 1.35x backward
    (SmolLM2's queries of a micro-batch, 2 cores, session 38)."""
    x = x_btnd.astype(jnp.float32)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos_bth[:, :, None, :], sin_bth[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_btnd.dtype)


def attention_mask(q_idx_bt: jax.Array, kv_idx_bs: jax.Array, kv_valid_bs: jax.Array,
                   sliding_window: int | None) -> jax.Array:
    """Boolean [b, t, s]: causal on sequence indices, key not padding, and inside the sliding window.

    Indices are slot positions in the (possibly left-padded) sequence; within a row the real tokens
    are contiguous, so index differences equal position differences.
    """
    q = q_idx_bt[:, :, None]
    kv = kv_idx_bs[:, None, :]
    mask = (kv <= q) & kv_valid_bs[:, None, :]
    if sliding_window is not None:
        mask &= q - kv < sliding_window
    return mask


def prefix_windows_attention(q_bthd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, valid_bt: jax.Array,
                             positions_bt: jax.Array, prefix: int, window: int,
                             sliding_window: int | None, kernel: bool = False) -> jax.Array:
    """Attention over rows laid out as a prefix of `prefix` slots followed by windows of `window` slots, each
    window continuing the prefix alone (SAMI's prompt shared by its responses): a prefix token sees the
    earlier prefix tokens, a window token the prefix and the earlier tokens of its own window. Only those
    blocks are computed: [P, P] for the prefix and [n, P + n] per window, instead of the whole row's
    [P + w n]^2 under a mask (about half the scores for SAMI's shapes). valid_bt marks real tokens (padding
    is never seen); sliding windows count RoPE positions, as a window's slots lie after the earlier
    windows'. `kernel`: as `gqa_attention`'s. Returns [b, t, h, d] with t = prefix + w * window.
    """
    b, t, h, d = q_bthd.shape
    p, n = prefix, window
    w = (t - p) // n
    if p + w * n != t:
        raise ValueError(f"{t} slots are not a prefix of {p} and windows of {n}")
    slots = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    out_p = gqa_attention(q_bthd[:, :p], k_bskd[:, :p], v_bskd[:, :p],
                          attention_mask(slots, slots, valid_bt[:, :p], sliding_window), kernel)

    def with_prefix(x):  # [b, t, ...] -> [b * w, p + n, ...]: the prefix, then one window. A copy of the
        # prefix per window: on a CPU this plain attention beat one product of all windows' queries against
        # the shared prefix keys (whose backward XLA fed with strided transposes) by 20%.
        rest = x.shape[2:]
        x_p = jnp.broadcast_to(x[:, None, :p], (b, w, p, *rest))
        return jnp.concatenate([x_p, x[:, p:].reshape(b, w, n, *rest)], axis=2).reshape(b * w, p + n, *rest)

    r = jnp.arange(p + n, dtype=jnp.int32) - p  # key slots: the prefix (< 0), then the window's own
    valid = with_prefix(valid_bt)
    mask = (r[None, None, :] <= r[None, p:, None]) & valid[:, None, :]
    if sliding_window is not None:
        pos = with_prefix(positions_bt)
        mask &= pos[:, p:, None] - pos[:, None, :] < sliding_window
    out_w = gqa_attention(q_bthd[:, p:].reshape(b * w, n, h, d), with_prefix(k_bskd), with_prefix(v_bskd), mask,
                          kernel)
    return jnp.concatenate([out_p, out_w.reshape(b, w * n, h, d)], axis=1)


def fused_attention(q_bthd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, lengths_b: jax.Array,
                    sliding_window: int | None, implementation: str | None = "cudnn") -> jax.Array:
    """Causal attention over right-padded rows of `lengths_b` real tokens through
    `jax.nn.dot_product_attention` (cuDNN flash attention on NVIDIA GPUs: no [t, s] scores in memory).
    Same result as `gqa_attention` with `attention_mask` for every real query token; padded query rows
    differ (they are never scored). Needs bf16/fp16 inputs for cuDNN; implementation="xla" runs anywhere.
    """
    window = None if sliding_window is None else (sliding_window - 1, 0)
    return jax.nn.dot_product_attention(q_bthd, k_bskd, v_bskd, is_causal=True, query_seq_lengths=lengths_b,
                                        key_value_seq_lengths=lengths_b, local_window_size=window,
                                        implementation=implementation)


def fused_attention_left_padded(q_bthd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, valid_bt: jax.Array,
                                sliding_window: int | None, implementation: str | None = "cudnn") -> jax.Array:
    """`fused_attention` for rows whose real tokens come last (left padding, as the sampler's prompts):
    causal among the real tokens of each row, in the sliding window, as `gqa_attention` with
    `attention_mask`. The flash kernels take right padding only (a length per row), so each row is rotated
    to put its real tokens first and the output rotated back; slot differences within a row's real
    tokens are position differences either way. Rows of padding only attend to one padding slot (finite;
    never read). Returns [b, t, h, d]."""
    t = q_bthd.shape[1]
    lengths = jnp.sum(valid_bt, axis=1, dtype=jnp.int32)
    slots = jnp.arange(t, dtype=jnp.int32)[None, :]

    def rotate(x, by):  # x[:, (j + by) % t] for each row
        return jnp.take_along_axis(x, ((slots + by[:, None]) % t)[:, :, None, None], axis=1)

    pads = t - lengths
    out = fused_attention(rotate(q_bthd, pads), rotate(k_bskd, pads), rotate(v_bskd, pads), jnp.maximum(lengths, 1),
                          sliding_window, implementation)
    return rotate(out, -pads)


def _probs(scores_bkgts: jax.Array, mask_bts: jax.Array, head_dim: int, dtype) -> jax.Array:
    """Softmax over keys of float32 scores [b, kv_heads, g, t, s], scaled by 1/sqrt(head_dim), masked."""
    scores = jnp.where(mask_bts[:, None, None, :, :], scores_bkgts * np.float32(1.0 / np.sqrt(head_dim)), _NEG)
    return jax.nn.softmax(scores, axis=-1).astype(dtype)


def gqa_attention(q_bthd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, mask_bts: jax.Array,
                  kernel: bool = False) -> jax.Array:
    """Softmax attention with grouped KV heads; logits and softmax in float32. Returns [b, t, h, d].

    `kernel`: where the program is lowered for a CPU, forward and backward on the CPU kernels (`_kernel_attention`;
    float32, one device, the kernels loaded: see `transformer.training_kernels`); elsewhere XLA's ops as without."""
    def xla(q, k, v, mask):
        return _heads_first(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)

    if not kernel:
        return xla(q_bthd, k_bskd, v_bskd, mask_bts)
    return jax.lax.platform_dependent(q_bthd, k_bskd, v_bskd, mask_bts, cpu=_kernel_attention, default=xla)


@jax.custom_vjp
def _kernel_attention(q_bthd, k_bskd, v_bskd, mask_bts):
    """`gqa_attention` on `cpu_kernels.attention_train`, with its gradients from `cpu_kernels.attention_grad`: each
    (row, KV head) reads only the slots from a chunk of queries' first unmasked one to its last, and no [t, s]
    scores or probabilities go through memory. The output and its log-sum-exp carry the name CPU_DOT, which the
    dot remat policies keep, so the backward pass does not run the forward kernel again."""
    return _kernel_attention_fwd(q_bthd, k_bskd, v_bskd, mask_bts)[0]


def _kernel_attention_fwd(q_bthd, k_bskd, v_bskd, mask_bts):
    b, t, h, d = q_bthd.shape
    kv_heads = k_bskd.shape[2]
    q = q_bthd.reshape(b, t, kv_heads, h // kv_heads, d)
    out, lse = cpu_kernels.attention_train(q, k_bskd, v_bskd, mask_bts)
    out, lse = checkpoint_name(out, cpu_kernels.CPU_DOT), checkpoint_name(lse, cpu_kernels.CPU_DOT)
    return out.reshape(b, t, h, d), (q, k_bskd, v_bskd, mask_bts, out, lse)


def _kernel_attention_bwd(res, g_bthd):
    q, k, v, mask, out, lse = res
    dq, dk, dv = cpu_kernels.attention_grad(q, k, v, mask, out, lse, g_bthd.reshape(q.shape))
    return dq.reshape(g_bthd.shape), dk, dv, None


_kernel_attention.defvjp(_kernel_attention_fwd, _kernel_attention_bwd)


def _heads_first(q_bthd: jax.Array, k_bksd: jax.Array, v_bksd: jax.Array, mask_bts: jax.Array) -> jax.Array:
    """Attention with the heads in front of the positions before the products (q as [b, k, g * t, d]), so
    that both are plain batched matmuls and only the [t, h, d]-sized tensors are transposed: left to choose,
    XLA's CPU backend transposed the [t, s] scores and probabilities instead (a SAMI window's attention,
    forward and backward, 12.6 -> 10.3 ms; a batch-16 prefill's forward 14.7 -> 9.0 ms)."""
    b, t, h, d = q_bthd.shape
    kv_heads = k_bksd.shape[1]
    g = h // kv_heads
    q = q_bthd.reshape(b, t, kv_heads, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, g * t, d)
    scores = jnp.einsum("bkqd,bksd->bkqs", q, k_bksd, preferred_element_type=jnp.float32)
    probs = _probs(scores.reshape(b, kv_heads, g, t, -1), mask_bts, d, v_bksd.dtype)
    out = jnp.einsum("bkqs,bksd->bkqd", probs.reshape(b, kv_heads, g * t, -1), v_bksd)
    return out.reshape(b, kv_heads, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def gqa_attention_bksd(q_bthd: jax.Array, k_bksd: jax.Array, v_bksd: jax.Array, mask_bts: jax.Array) -> jax.Array:
    """`gqa_attention` with keys and values in the KV cache's layout [b, kv_heads, s, d]. Returns [b, t, h, d]."""
    b, t, h, d = q_bthd.shape
    if t > 1:
        return _heads_first(q_bthd, k_bksd, v_bksd, mask_bts)
    q = q_bthd.reshape(b, t, k_bksd.shape[1], h // k_bksd.shape[1], d)
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k_bksd, preferred_element_type=jnp.float32)
    probs = _probs(scores, mask_bts, d, v_bksd.dtype)

    def weighted_sum(probs, v):  # one query per row: a reduction XLA's CPU backend runs 1.1 -> 0.03 ms/layer
        out = jnp.sum(probs[..., None] * v[:, :, None, None], axis=-2, dtype=jnp.float32).astype(v.dtype)
        return out.transpose(0, 3, 1, 2, 4)

    def matmul(probs, v):
        return jnp.einsum("bkgts,bksd->btkgd", probs, v)

    # (a SmolLM2 decode step at batch 16, where XLA had turned the einsum into a slow V^T @ p)
    out = jax.lax.platform_dependent(probs, v_bksd, cpu=weighted_sum, default=matmul)
    return out.reshape(b, t, h, d)


def gqa_attention_cached(q_bthd: jax.Array, k_cache_bksd: jax.Array, v_cache_bksd: jax.Array, cache_mask_bts: jax.Array,
                         k_new_btkd: jax.Array, v_new_btkd: jax.Array, new_mask_btt: jax.Array) -> jax.Array:
    """`gqa_attention` over a layer's cached keys ([b, kv_heads, s, d], the cache layout) followed by the t new
    ones, without writing the new ones into the cache first: one softmax over both score blocks.
    Returns [b, t, h, d]."""
    b, t, h, d = q_bthd.shape
    kv_heads, s = k_cache_bksd.shape[1], k_cache_bksd.shape[2]
    q = q_bthd.reshape(b, t, kv_heads, h // kv_heads, d)
    scores = jnp.concatenate([jnp.einsum("btkgd,bksd->bkgts", q, k_cache_bksd, preferred_element_type=jnp.float32),
                              jnp.einsum("btkgd,bskd->bkgts", q, k_new_btkd, preferred_element_type=jnp.float32)],
                             axis=-1)
    probs = _probs(scores, jnp.concatenate([cache_mask_bts, new_mask_btt], axis=-1), d, v_cache_bksd.dtype)
    out = (jnp.einsum("bkgts,bksd->btkgd", probs[..., :s], v_cache_bksd)
           + jnp.einsum("bkgts,bskd->btkgd", probs[..., s:], v_new_btkd.astype(v_cache_bksd.dtype)))
    return out.reshape(b, t, h, d)
