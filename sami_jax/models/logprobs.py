"""Token log-probs of a vocabulary projection, log_softmax(x W^T)[target], without the [n, v] logits in memory.

The head of a scored step multiplies every scored position by the whole vocabulary: for SmolLM2 at the CPU
benchmark's shapes a [2560, 49152] float32 matrix (503 MB) that XLA writes, reads back for the
log-softmax, keeps for the backward pass and reads again there, each pass at main-memory speed (about
7.7 GB/s on session 15's 2-core machine, against 40 GB/s for a working set that stays in cache). Here the
vocabulary is cut into chunks of columns: the forward pass keeps a running max and sum of exponentials
per row over the chunks (an online logsumexp) and picks each target's logit from its chunk; the backward
pass recomputes one chunk's logits at a time, turns them into the gradient of the log-probs in cache, and
contracts it at once into the rows' gradient (accumulated) and the chunk's rows of the weight gradient.
One more matmul of the head's size than autodiff's, and no pass over a matrix of logits in memory.

Where the logits take at most KEEP_LOGITS_BYTES, the forward pass keeps each chunk's instead (written once, read
once), and the backward pass reads them rather than recomputing them: SmolLM2's 640 rows of a micro-batch over
49,152 words are 126 MB, and a chunk's product costs more than writing and reading its logits (the SAMI step on
SmolLM2, 2 cores: paired 0.988 of the time with them recomputed, session 32).

With `kernel`, each chunk's logits, the rows' gradient and the chunk's weight gradient are products on
`cpu_kernels.dot_nt`, `dot` and `dot_tn` (AMX tiles at float32 accuracy, or the AVX2 GEMM where there is no
AVX-512; see `transformer._matmuls_kernel`). SmolLM2's
head at the CPU benchmark's shapes (640 rows, forward and backward, 2 cores): 0.63 s against 0.76 s with the
first two on the kernel; the chunk of 1,024 rows was the fastest of 512-4,096 both ways. The weight
gradient through `dot` (transposed copies of both operands) was no faster; `dot_tn`'s is 0.58x XLA's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sami_jax.models import cpu_kernels

KEEP_LOGITS_BYTES = 256 << 20  # the most logits the forward pass keeps for the backward pass (see the module doc)


def _chunked(w_vd, chunk: int):
    """w [v, d] as [chunks, chunk, d], zero rows appended where v is not a multiple of chunk."""
    v, d = w_vd.shape
    pad = -v % chunk
    if pad:
        w_vd = jnp.pad(w_vd, ((0, pad), (0, 0)))
    return w_vd.reshape(-1, chunk, d)


def _chunk_logits(x_nd, w_chunks, i, chunk: int, v: int, kernel: bool):
    """float32 logits [n, chunk] of chunk i of w_chunks [chunks, chunk, d] (read in place by the kernel); columns
    past the vocabulary (padding) at -inf."""
    if kernel:
        logits = cpu_kernels.dot_nt(x_nd, w_chunks, i)
    else:
        logits = jnp.einsum("nd,cd->nc", x_nd, w_chunks[i], preferred_element_type=jnp.float32)
    if v % chunk:
        logits = jnp.where(i * chunk + jnp.arange(chunk) < v, logits, -jnp.inf)
    return logits


def _forward(x_nd, w_vd, targets_n, chunk: int, kernel: bool, keep: bool):
    """(log-probs [n], log-sum-exps [n], each chunk's logits [chunks, n, chunk] if keep, else None)."""
    v = w_vd.shape[0]
    n = x_nd.shape[0]

    def body(carry, i):
        running_max, running_sum, target_logit = carry
        logits = _chunk_logits(x_nd, w_chunks, i, chunk, v, kernel)
        new_max = jnp.maximum(running_max, jnp.max(logits, axis=-1))
        running_sum = (running_sum * jnp.exp(running_max - new_max)
                       + jnp.sum(jnp.exp(logits - new_max[:, None]), axis=-1))
        local = targets_n - i * chunk
        hit = (local >= 0) & (local < chunk)
        picked = jnp.take_along_axis(logits, jnp.clip(local, 0, chunk - 1)[:, None], axis=-1)[:, 0]
        return (new_max, running_sum, target_logit + jnp.where(hit, picked, 0.0)), logits if keep else None

    w_chunks = _chunked(w_vd, chunk)
    init = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32))
    (running_max, running_sum, target_logit), kept = jax.lax.scan(body, init, jnp.arange(w_chunks.shape[0]))
    lse = running_max + jnp.log(running_sum)
    return target_logit - lse, lse, kept


def _keeps_logits(x_nd, w_vd, chunk: int, keep_logits: bool | None) -> bool:
    if keep_logits is not None:
        return keep_logits
    return x_nd.shape[0] * -(-w_vd.shape[0] // chunk) * chunk * 4 <= KEEP_LOGITS_BYTES


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def vocab_logprobs(x_nd: jax.Array, w_vd: jax.Array, targets_n: jax.Array, chunk: int = 1024,
                   kernel: bool = False, keep_logits: bool | None = None) -> jax.Array:
    """float32 [n]: log_softmax(x [n, d] @ w [v, d]^T)[i, targets[i]], computed `chunk` vocabulary rows at a
    time (see the module docstring). w is the head as [v, d]: a tied embedding table as it is. `kernel`: the
    products on `cpu_kernels.dot_nt`, `dot` and `dot_tn` (float32 x and w on a CPU, the kernels loaded).
    keep_logits: whether the backward pass reads the forward pass's logits (True) or recomputes them (False);
    None: kept where they take at most KEEP_LOGITS_BYTES."""
    return _forward(x_nd, w_vd, targets_n, chunk, kernel, False)[0]


def _vocab_logprobs_fwd(x_nd, w_vd, targets_n, chunk, kernel, keep_logits):
    lp, lse, kept = _forward(x_nd, w_vd, targets_n, chunk, kernel, _keeps_logits(x_nd, w_vd, chunk, keep_logits))
    return lp, (x_nd, w_vd, targets_n, lse, kept)


def _vocab_logprobs_bwd(chunk, kernel, keep_logits, res, g_n):
    x_nd, w_vd, targets_n, lse, kept = res
    v = w_vd.shape[0]

    def body(dx_nd, xs):
        i, logits = xs
        if logits is None:
            logits = _chunk_logits(x_nd, w_chunks, i, chunk, v, kernel)
        # d lp / d logits = onehot(target) - softmax
        onehot = (targets_n - i * chunk)[:, None] == jnp.arange(chunk)
        dlogits = g_n[:, None] * (onehot.astype(jnp.float32) - jnp.exp(logits - lse[:, None]))
        dlogits = dlogits.astype(x_nd.dtype)
        if kernel:
            dx_nd = dx_nd + cpu_kernels.dot(dlogits, w_chunks, i)
            dw_cd = cpu_kernels.dot_tn(dlogits, x_nd)
        else:
            dx_nd = dx_nd + jnp.einsum("nc,cd->nd", dlogits, w_chunks[i], preferred_element_type=jnp.float32)
            dw_cd = jnp.einsum("nc,nd->cd", dlogits, x_nd, preferred_element_type=jnp.float32)
        return dx_nd, dw_cd.astype(w_vd.dtype)

    w_chunks = _chunked(w_vd, chunk)
    dx_nd, dw = jax.lax.scan(body, jnp.zeros(x_nd.shape, jnp.float32), (jnp.arange(w_chunks.shape[0]), kept))
    return dx_nd.astype(x_nd.dtype), dw.reshape(-1, w_vd.shape[1])[:v], None


vocab_logprobs.defvjp(_vocab_logprobs_fwd, _vocab_logprobs_bwd)
