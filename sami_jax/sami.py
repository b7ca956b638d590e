"""The SAMI objective: sequences, masks, the log-prob matrix and the symmetric InfoNCE loss.

For each query q with constitutions c_1..c_C and responses y_1..y_C (y_j sampled under c_j):

    M[q, k, j] = mean over response tokens of log p(y_j | c_k, x_q)       (rows: constitutions)
    loss       = mean_q 1/2 (CE over each row + CE over each column), targets on the diagonal

as the authors ran it (../shared/reference/sami-method.md §2): no temperature, no cross-query
negatives, prompt and padding masked, the EOS masked unless asked, log-softmax in float32.
Shapes: q queries, c constitutions (= responses per query), t tokens, v vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sami_jax.models.config import ModelConfig
from sami_jax.models.transformer import stack_layers, token_logprobs, unstack_layers
from sami_jax.optim import OptimConfig, make_optimizer, make_schedule
from sami_jax.sharding import param_shardings


# -------------------------------------------------------------------------------------------- loss
def sami_loss_terms(m_qcc: jax.Array) -> dict[str, jax.Array]:
    """Loss and diagnostics from the matrix [q, c, c] (rows = constitutions, columns = responses).

    row loss: which response came from constitution k (softmax over j); column loss: which
    constitution produced response j (softmax over k). Accuracies: the diagonal wins its row / column.
    """
    m = m_qcc.astype(jnp.float32)
    diag_row = jnp.diagonal(jax.nn.log_softmax(m, axis=-1), axis1=-2, axis2=-1)  # [q, c]
    diag_col = jnp.diagonal(jax.nn.log_softmax(m, axis=-2), axis1=-2, axis2=-1)
    row, col = -jnp.mean(diag_row), -jnp.mean(diag_col)
    c = m.shape[-1]
    eye = jnp.eye(c, dtype=bool)
    diag = jnp.diagonal(m, axis1=-2, axis2=-1)
    return {
        "loss": (row + col) / 2,
        "row_loss": row,
        "col_loss": col,
        "row_accuracy": jnp.mean(jnp.argmax(m, axis=-1) == jnp.arange(c)),
        "col_accuracy": jnp.mean(jnp.argmax(m, axis=-2) == jnp.arange(c)),
        "diag_minus_offdiag": jnp.mean(diag) - jnp.sum(jnp.where(eye, 0.0, m)) / (m.shape[0] * c * (c - 1)),
    }


def sami_loss(m_qcc: jax.Array) -> jax.Array:
    """The scalar SAMI loss of a [queries, C, C] log-prob matrix (rows = constitutions, columns = responses)."""
    return sami_loss_terms(m_qcc)["loss"]


# -------------------------------------------------------------------------------------------- data
@dataclasses.dataclass(frozen=True)
class PairBatch:
    """Every (constitution prompt k, response j) pair of q queries, right-padded to t tokens.

    tokens [q, c, c, t] int32; attention [q, c, c, t] (1 = real token); loss_mask [q, c, c, t]
    (1 on the response tokens whose log-prob counts; position i scores token i from logits at i-1).
    """

    tokens: np.ndarray
    attention: np.ndarray
    loss_mask: np.ndarray


def build_pair_batch(tokenizer, prompts: Sequence[Sequence[str]], responses: Sequence[Sequence[str]],
                     keep_eos: bool = False, pad_to_multiple: int = 8) -> PairBatch:
    """prompts[q][k] is query q under constitution k; responses[q][j] was sampled under constitution j.

    Prompt and response are tokenized separately and concatenated, so the response's tokens are exactly
    its own (the authors' string concatenation relied on a prefix property that not every tokenizer
    has); the prompt gets the tokenizer's usual BOS, the response none. keep_eos appends the EOS and
    scores it (the authors masked it, so by default the model is never trained to stop).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompt rows but {len(responses)} response rows")
    q = len(prompts)
    c = len(prompts[0]) if q else 0
    rows = []
    for i, (ps, rs) in enumerate(zip(prompts, responses, strict=True)):
        if len(ps) != c or len(rs) != c:
            raise ValueError(f"query {i}: {len(ps)} prompts and {len(rs)} responses; every query needs {c} of each")
        p_ids = [tokenizer.encode(p, add_bos=tokenizer.add_bos_default) for p in ps]
        r_ids = [tokenizer.encode(r) + ([tokenizer.eos_ids[0]] if keep_eos else []) for r in rs]
        for j, r in enumerate(r_ids):
            if not r:
                raise ValueError(f"query {i}: response {j} is empty")
        rows.append([[(p, r) for r in r_ids] for p in p_ids])
    t = max(len(p) + len(r) for row in rows for pairs in row for p, r in pairs)
    t = -(-t // pad_to_multiple) * pad_to_multiple
    tokens = np.full((q, c, c, t), tokenizer.pad_id, np.int32)
    attention = np.zeros((q, c, c, t), np.int32)
    loss_mask = np.zeros((q, c, c, t), np.int32)
    for i, row in enumerate(rows):
        for k, pairs in enumerate(row):
            for j, (p, r) in enumerate(pairs):
                n = len(p) + len(r)
                tokens[i, k, j, :n] = p + r
                attention[i, k, j, :n] = 1
                loss_mask[i, k, j, len(p):n] = 1
    return PairBatch(tokens, attention, loss_mask)


# -------------------------------------------------------------------------------------------- log-probs
def _reduce_logprobs(token_lp, mask, reduce: str) -> jax.Array:
    """Token log-probs [..., n] masked, then summed or averaged over n."""
    mask = mask.astype(jnp.float32)
    total = jnp.sum(token_lp * mask, axis=-1)
    if reduce == "sum":
        return total
    if reduce == "mean":
        return total / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
    raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")


def sequence_logprobs(params, config: ModelConfig, tokens_bt, attention_bt, loss_mask_bt, reduce: str = "mean",
                      response_len: int | None = None, **forward_kwargs) -> jax.Array:
    """log p of the masked tokens of each sequence [b]: mean over them ("mean", the authors' training
    choice) or their sum ("sum", the paper's MI estimate). log-softmax in float32.

    response_len: when set, the masked tokens of every row must be contiguous and at most this many
    (`response_window` computes it); the vocab projection then runs on those positions only instead of
    all t, which is most of the step's memory and much of its FLOPs for long prompts and vocabularies.
    """
    b, t = tokens_bt.shape
    if response_len is None:  # position i scores token i + 1
        pred = jnp.broadcast_to(jnp.arange(t - 1), (b, t - 1))
        token_lp = token_logprobs(params, tokens_bt, config, tokens_bt[:, 1:], pred, mask_bt=attention_bt,
                                  **forward_kwargs)
        return _reduce_logprobs(token_lp, loss_mask_bt[:, 1:], reduce)
    first = jnp.argmax(loss_mask_bt, axis=1)  # the first scored token of each row
    target_idx = first[:, None] + jnp.arange(response_len)[None]
    inside = target_idx < t
    target_idx = jnp.minimum(target_idx, t - 1)
    targets = jnp.take_along_axis(tokens_bt, target_idx, axis=1)
    token_lp = token_logprobs(params, tokens_bt, config, targets, target_idx - 1, mask_bt=attention_bt,
                              **forward_kwargs)
    mask = jnp.take_along_axis(loss_mask_bt, target_idx, axis=1) * inside
    return _reduce_logprobs(token_lp, mask, reduce)


def response_window(loss_mask, multiple: int = 8) -> int:
    """The `response_len` for a batch (host side): its longest scored span, rounded up to `multiple`."""
    longest = int(np.asarray(loss_mask).sum(axis=-1).max(initial=1))
    return -(-longest // multiple) * multiple


def prompt_window(loss_mask, multiple: int = 8) -> int:
    """The `prompt_len` for a batch (host side): its longest prompt (the tokens before the first scored
    one), rounded up to `multiple`, at most the sequence length."""
    mask = np.asarray(loss_mask).astype(bool)
    longest = int(np.argmax(mask, axis=-1).max(initial=1))
    return min(-(-longest // multiple) * multiple, mask.shape[-1])


def share_prompts(tokens_qcct, attention_qcct, loss_mask_qcct, prompt_len: int,
                  response_len: int) -> dict[str, jax.Array]:
    """The pair batch packed into one row per (query q, constitution k), so that each prompt's forward runs
    once for its c responses instead of c times: prompt k in the first P = prompt_len slots, then
    responses 0..c-1 in windows of n = response_len slots, each continuing the prompt alone (see
    `attention.prefix_windows_attention`) at the RoPE positions it has after the prompt. Same log-probs as
    the pairs, in (P + c n) / (c t) of the tokens.

    Needs the structure `build_pair_batch` gives: right-padded rows, response j's tokens the same after
    every prompt (read from the pairs (0, j)), each prompt at most P tokens and each response's scored
    tokens contiguous and at most n. Returns tokens, valid (real tokens), positions [q * c, P + c n] and,
    to score response j's token r from the logits at slot pred[., j * n + r]: pred, targets, mask
    [q * c, c * n].
    """
    q, c, _, t = tokens_qcct.shape
    p, n = prompt_len, response_len
    if p > t:
        raise ValueError(f"prompt_len {p} exceeds the pairs' {t} tokens")
    scored = loss_mask_qcct.astype(bool)
    plen = jnp.argmax(scored[:, :, 0], axis=-1).astype(jnp.int32)  # [q, c]: prompt k's length
    rlen = jnp.sum(scored[:, 0], axis=-1, dtype=jnp.int32)  # [q, c]: response j's length
    slot, r = jnp.arange(p, dtype=jnp.int32), jnp.arange(n, dtype=jnp.int32)
    src = jnp.minimum(plen[:, :1, None] + r, t - 1)  # [q, 1, n]: where response j starts in pair (0, j)
    responses = jnp.take_along_axis(tokens_qcct[:, 0], src, axis=-1)  # [q, c, n]

    def per_k(x_qjn):  # the responses' slots are the same in every row of a query
        return jnp.broadcast_to(x_qjn.reshape(q, 1, c * n), (q, c, c * n))

    tokens = jnp.concatenate([tokens_qcct[:, :, 0, :p], per_k(responses)], axis=-1)
    valid = jnp.concatenate([slot < plen[..., None], per_k(r < rlen[..., None])], axis=-1)
    positions = jnp.concatenate([jnp.broadcast_to(slot, (q, c, p)), plen[..., None] + jnp.tile(r, c)[None, None]],
                                axis=-1)
    # response j's token r sits at slot p + j n + r and is scored from the slot before it; its first token
    # from the prompt's last slot
    starts = p + n * jnp.arange(c, dtype=jnp.int32)
    pred = jnp.where(r == 0, plen[:, :, None, None] - 1, starts[None, None, :, None] + r - 1)  # [q, c, c, n]
    flat = {"tokens": tokens, "valid": valid, "positions": positions, "pred": jnp.clip(pred, 0, p + c * n - 1),
            "targets": jnp.broadcast_to(responses[:, None], (q, c, c, n)),
            "mask": jnp.broadcast_to(r < rlen[:, None, :, None], (q, c, c, n))}
    return {k: v.reshape(q * c, -1) for k, v in flat.items()}


def logprob_matrix(params, config: ModelConfig, tokens_qcct, attention_qcct, loss_mask_qcct, reduce: str = "mean",
                   response_len: int | None = None, prompts_shared: bool = False, prompt_len: int | None = None,
                   **forward_kwargs) -> jax.Array:
    """M [q, c, c]: the per-sequence log-prob function mapped over the (constitution k, response j) pairs.

    The map is a vmap done by hand: the q * c * c sequences form one batch (the same computation), which the
    mesh can split across all of them rather than across queries only, and which Mixtral's dropless experts
    (`lax.ragged_dot`, whose batching rule covers only a leading axis) run as they are.
    prompts_shared: run each prompt once for its c responses (`share_prompts`; needs response_len,
    prompt_len and the einsum attention); the same M from fewer tokens.
    """
    q, c1, c2, t = tokens_qcct.shape
    if prompts_shared:
        if response_len is None or prompt_len is None:
            raise ValueError("prompts_shared needs response_len and prompt_len (`response_window`, `prompt_window`)")
        b = share_prompts(tokens_qcct, attention_qcct, loss_mask_qcct, prompt_len, response_len)
        token_lp = token_logprobs(params, b["tokens"], config, b["targets"], b["pred"], mask_bt=b["valid"],
                                  positions_bt=b["positions"], prefix_windows=(prompt_len, response_len),
                                  **forward_kwargs)
        n = response_len
        return _reduce_logprobs(token_lp.reshape(q * c1, c2, n), b["mask"].reshape(q * c1, c2, n),
                                reduce).reshape(q, c1, c2)
    flat = [x.reshape(q * c1 * c2, t) for x in (tokens_qcct, attention_qcct, loss_mask_qcct)]
    return sequence_logprobs(params, config, *flat, reduce, response_len, **forward_kwargs).reshape(q, c1, c2)


# -------------------------------------------------------------------------------------------- step
@flax.struct.dataclass
class TrainState:
    step: jax.Array  # optimizer updates applied so far
    params: Any
    opt_state: Any  # float32, whatever the params' dtype


def init_train_state(params, optim: OptimConfig) -> TrainState:
    """A state that owns a copy of `params`: sami_step donates its state, and SAMI restarts every
    iteration from the base weights, which must survive."""
    params32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    return TrainState(step=jnp.int32(0), params=jax.tree.map(jnp.copy, params),
                      opt_state=make_optimizer(optim).init(params32))


@functools.partial(jax.jit, static_argnames=("config", "optim", "reduce", "remat", "compute_dtype", "sharder",
                                             "response_len", "attention_impl", "prompts_shared", "prompt_len",
                                             "scan_layers"),
                   donate_argnums=0)
def sami_step(state: TrainState, tokens, attention, loss_mask, *, config: ModelConfig, optim: OptimConfig,
              reduce: str = "mean", remat: str = "none", compute_dtype=None, sharder=None,
              response_len: int | None = None, attention_impl: str = "einsum", prompts_shared: bool = False,
              prompt_len: int | None = None, scan_layers: bool = True):
    """One optimizer update from A micro-batches: tokens/attention/loss_mask [A, q, c, c, t].

    response_len: at least the longest response of the batch (`response_window(loss_mask)`); the vocab
    projection then covers only the response tokens (see `sequence_logprobs`). None: every position.
    attention_impl: "einsum" or "cudnn" (flash attention; GPU, bf16 compute), see `models.transformer.forward`.
    prompts_shared: each prompt runs once for its c responses (`share_prompts`: needs response_len,
    prompt_len (`prompt_window(loss_mask)`), the einsum attention and `build_pair_batch`'s structure); the
    same update from fewer FLOPs.
    scan_layers: False runs the layers as an unrolled loop over per-layer weights (`unstack_layers`), the
    same update without the scan's weight copies and stacked activation buffers; compiles longer.

    Gradients are accumulated over the micro-batches (a scan; the mean of their losses, i.e. true
    accumulation, not the authors' zero_grad-per-micro-step) and applied once. compute_dtype (e.g.
    bfloat16) runs the forward in that dtype from float32 master params. Returns (state, metrics):
    loss, row/col loss and accuracy, diag_minus_offdiag (averaged over micro-batches), grad_norm
    (before clipping), lr (of this update).
    """
    params = state.params
    # Cast once for all micro-batches (XLA casts inside the scan every time otherwise). The gradient with
    # respect to the cast copy, in float32, is the gradient with respect to the params: a cast's transpose
    # is the cast back.
    compute_params = params if compute_dtype is None else jax.tree.map(lambda x: x.astype(compute_dtype), params)
    if not scan_layers:  # sliced once per step, after the cast (one fused op a weight); gradients per layer
        compute_params = unstack_layers(compute_params)

    def loss_fn(p, tok, att, lm):
        m = logprob_matrix(p, config, tok, att, lm, reduce, response_len, prompts_shared, prompt_len, remat=remat,
                           sharder=sharder, attention_impl=attention_impl)
        terms = sami_loss_terms(m)
        return terms["loss"], terms

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def micro(acc, xs):
        (_, terms), grads = grad_fn(compute_params, *xs)
        grads = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc[0], grads)
        return (grads, jax.tree.map(jnp.add, acc[1], terms)), None

    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), compute_params)
    zero_terms = jax.tree.map(lambda _: jnp.float32(0), jax.eval_shape(lambda: sami_loss_terms(jnp.zeros((1, 2, 2)))))
    (grads, terms), _ = jax.lax.scan(micro, (zeros, zero_terms), (tokens, attention, loss_mask))
    if not scan_layers:
        grads = stack_layers(grads)
    n = tokens.shape[0]
    grads = jax.tree.map(lambda g: g / n, grads)
    metrics = {k: v / n for k, v in terms.items()}
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["lr"] = make_schedule(optim)(state.step)
    params32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    updates, opt_state = make_optimizer(optim).update(grads, state.opt_state, params32)
    new_params = jax.tree.map(lambda p, u, old: (p + u).astype(old.dtype), params32, updates, params)
    if sharder is not None:  # pin the outputs to the params' declared shardings, so the next step's inputs match
        shardings = param_shardings(config, sharder)
        new_params = jax.lax.with_sharding_constraint(new_params, shardings)
        opt_state = optax.tree_utils.tree_map_params(make_optimizer(optim), jax.lax.with_sharding_constraint,
                                                     opt_state, shardings)
    return TrainState(step=state.step + 1, params=new_params, opt_state=opt_state), metrics
