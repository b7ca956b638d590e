"""The SAMI objective against the paper's loss vectors, a numpy loop, and HF transformers' log-probs."""

import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny
import torch

import sami_jax
from sami_jax.sami import build_pair_batch, logprob_matrix, prompt_window, response_window, sami_loss, sami_loss_terms

# ../shared/reference/sami-method.md §2.1: M (rows = constitutions) -> L_row, L_col, L.
PAPER_VECTORS = [
    ([[0, 0], [0, 0]], 0.693147, 0.693147, 0.693147),
    ([[-0.5, -1.0], [-1.2, -0.7]], 0.474077, 0.478771, 0.476424),
    ([[-1.1552, -4.6220], [-4.4782, -1.0819]], 0.031844, 0.032004, 0.031924),
    ([[-1, -2, -3], [-2.5, -0.5, -1.5], [-0.3, -2.2, -0.9]], 0.648296, 0.676270, 0.662283),
]


@pytest.mark.parametrize(("m", "row", "col", "loss"), PAPER_VECTORS)
def test_loss_matches_the_papers_vectors(m, row, col, loss):
    terms = sami_loss_terms(jnp.asarray([m], jnp.float32))
    np.testing.assert_allclose([terms["row_loss"], terms["col_loss"], terms["loss"]], [row, col, loss], atol=1e-6)


def _numpy_loss(m):
    total = 0.0
    for mq in np.asarray(m, np.float64):
        c = len(mq)
        row = -np.mean([mq[k, k] - np.log(np.sum(np.exp(mq[k]))) for k in range(c)])
        col = -np.mean([mq[j, j] - np.log(np.sum(np.exp(mq[:, j]))) for j in range(c)])
        total += (row + col) / 2
    return total / len(m)


def test_loss_is_the_mean_over_queries_of_the_symmetric_infonce():
    m = np.random.default_rng(0).normal(-3, 1.5, (5, 3, 3))
    np.testing.assert_allclose(sami_loss(jnp.asarray(m, jnp.float32)), _numpy_loss(m), rtol=1e-6)
    terms = sami_loss_terms(jnp.asarray(m, jnp.float32))
    np.testing.assert_allclose(terms["row_accuracy"], np.mean(m.argmax(-1) == np.arange(3)))
    np.testing.assert_allclose(terms["col_accuracy"], np.mean(m.argmax(-2) == np.arange(3)))
    off = m[:, ~np.eye(3, dtype=bool)]
    np.testing.assert_allclose(terms["diag_minus_offdiag"], np.diagonal(m, 0, 1, 2).mean() - off.mean(), rtol=1e-5)


def test_loss_gradient_matches_numpy():
    """d loss / d M, written out in numpy (softmax minus one-hot per row and per column), and central
    finite differences of the numpy loop."""
    m = np.random.default_rng(1).normal(-3, 1.5, (4, 3, 3))
    q, c, _ = m.shape

    def softmax(x, axis):
        e = np.exp(x - x.max(axis=axis, keepdims=True))
        return e / e.sum(axis=axis, keepdims=True)

    eye = np.eye(c)
    analytic = 0.5 * ((softmax(m, -1) - eye) + (softmax(m, -2) - eye)) / (c * q)
    ours = np.asarray(jax.grad(sami_loss)(jnp.asarray(m, jnp.float32)))
    np.testing.assert_allclose(ours, analytic, atol=1e-6)
    eps, numeric = 1e-6, np.zeros_like(m)
    for idx in np.ndindex(m.shape):
        d = np.zeros_like(m)
        d[idx] = eps
        numeric[idx] = (_numpy_loss(m + d) - _numpy_loss(m - d)) / (2 * eps)
    np.testing.assert_allclose(analytic, numeric, atol=1e-6)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    hf = tiny.hf_model("llama_kv2")
    return hf, sami_jax.load_model(tiny.save(hf, tmp_path_factory.mktemp("llama")))


def _pairs_and_hf_logprobs(hf, prompts, responses, t):
    """Pair arrays [q, c, c, t] (prompt k + response j, right-padded) and transformers' mean and summed
    token log-probs of response j after prompt k, one sequence at a time ({"mean", "sum"}: [q, c, c])."""
    q, c = len(prompts), len(prompts[0])
    tokens, attention, loss_mask = (np.zeros((q, c, c, t), np.int32) for _ in range(3))
    ref = {"mean": np.zeros((q, c, c)), "sum": np.zeros((q, c, c))}
    for i, k, j in np.ndindex(q, c, c):
        p, r = prompts[i][k], responses[i][j]
        tokens[i, k, j, :len(p) + len(r)] = p + r
        attention[i, k, j, :len(p) + len(r)] = 1
        loss_mask[i, k, j, len(p):len(p) + len(r)] = 1
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([p + r])).logits[0].double(), -1)
        lp = [logp[len(p) - 1 + n, tok].item() for n, tok in enumerate(r)]
        ref["mean"][i, k, j], ref["sum"][i, k, j] = np.mean(lp), np.sum(lp)
    return tokens, attention, loss_mask, ref


def test_logprob_matrix_matches_hf(llama):
    """M[q, k, j] from our vmapped function == the mean (and sum) of transformers' token log-probs of
    response j after prompt k, one sequence at a time."""
    hf, model = llama
    rng = np.random.default_rng(0)
    q, c, t = 2, 2, 24
    prompts = [[rng.integers(3, 256, rng.integers(4, 9)).tolist() for _ in range(c)] for _ in range(q)]
    responses = [[rng.integers(3, 256, rng.integers(3, 12)).tolist() for _ in range(c)] for _ in range(q)]
    tokens, attention, loss_mask, ref = _pairs_and_hf_logprobs(hf, prompts, responses, t)
    ref_mean, ref_sum = ref["mean"], ref["sum"]
    fn = jax.jit(logprob_matrix, static_argnames=("config", "reduce", "response_len"))
    # Every position projected to the vocabulary, or only a window over the responses (the training path).
    for window in (None, response_window(loss_mask, multiple=1), 16):
        ours = fn(model.params, model.config, tokens, attention, loss_mask, response_len=window)
        np.testing.assert_allclose(ours, ref_mean, atol=1e-5)
        np.testing.assert_allclose(fn(model.params, model.config, tokens, attention, loss_mask, reduce="sum",
                                      response_len=window), ref_sum, atol=1e-4)

    # Gradients flow through every entry (diagonal and off-diagonal) into the params.
    grads = jax.grad(lambda p: sami_loss(logprob_matrix(p, model.config, tokens, attention, loss_mask,
                                                        response_len=response_window(loss_mask))))(model.params)
    norms = [float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and min(norms) > 0


def test_shared_prompts_match_hf_per_sequence():
    """Each prompt run once for its responses (`prompts_shared`) on a sliding-window Mistral with 3
    constitutions: M equals transformers' per-sequence log-probs, also where a pair is longer than the
    window (which then counts positions, not the packed row's slots), and so do the packed rows' parts."""
    from sami_jax.sami import share_prompts

    hf = tiny.hf_model("mistral_window")  # window 12
    with tempfile.TemporaryDirectory() as d:
        model = sami_jax.load_model(tiny.save(hf, pathlib.Path(d)))
    rng = np.random.default_rng(3)
    q, c = 2, 3
    prompts = [[rng.integers(3, 256, rng.integers(3, 11)).tolist() for _ in range(c)] for _ in range(q)]
    responses = [[rng.integers(3, 256, rng.integers(1, 14)).tolist() for _ in range(c)] for _ in range(q)]
    tokens, attention, loss_mask, ref = _pairs_and_hf_logprobs(hf, prompts, responses, t=24)
    assert int(attention.sum(-1).max()) > 12  # some pair is longer than the window
    window, prompt = response_window(loss_mask, multiple=1), prompt_window(loss_mask, multiple=4)
    lens = [len(p) for row in prompts for p in row]
    assert prompt == -(-max(lens) // 4) * 4 and min(lens) < prompt  # rows with padding in the prompt slots
    packed = share_prompts(tokens, attention, loss_mask, prompt, window)
    row = packed["tokens"].reshape(q, c, -1)[1, 2]  # query 1, prompt 2: the prompt, then each response once
    valid = packed["valid"].reshape(q, c, -1)[1, 2]
    assert row.shape == (prompt + c * window,)
    assert row[:prompt][valid[:prompt]].tolist() == prompts[1][2]
    for j in range(c):
        slots = slice(prompt + j * window, prompt + (j + 1) * window)
        assert row[slots][valid[slots]].tolist() == responses[1][j]
    fn = jax.jit(logprob_matrix, static_argnames=("config", "reduce", "response_len", "prompts_shared", "prompt_len"))
    for reduce in ("mean", "sum"):
        ours = fn(model.params, model.config, tokens, attention, loss_mask, reduce, window, prompts_shared=True,
                  prompt_len=prompt)
        np.testing.assert_allclose(ours, ref[reduce], atol=1e-5 if reduce == "mean" else 1e-4)
    with pytest.raises(ValueError, match="prompts_shared needs response_len and prompt_len"):
        logprob_matrix(model.params, model.config, tokens, attention, loss_mask, prompts_shared=True)


def test_pair_batch_masks_response_tokens_only(smollm2_gguf):
    from sami_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_gguf)
    prompts = [["Human: be kind. Summarize: a cat.\n\nAssistant:", "Human: be rude. Summarize: a cat.\n\nAssistant:"]]
    responses = [["A cat sat.", "Whatever, a cat."]]
    batch = build_pair_batch(tok, prompts, responses)
    assert batch.tokens.shape[:3] == (1, 2, 2) and batch.tokens.shape[3] % 8 == 0
    for k in range(2):
        for j in range(2):
            p, r = tok.encode(prompts[0][k]), tok.encode(responses[0][j])
            n = len(p) + len(r)
            assert batch.tokens[0, k, j, :n].tolist() == p + r
            assert batch.loss_mask[0, k, j].tolist() == [0] * len(p) + [1] * len(r) + [0] * (batch.tokens.shape[3] - n)
            assert batch.attention[0, k, j].sum() == n
    with_eos = build_pair_batch(tok, prompts, responses, keep_eos=True)
    r = [*tok.encode(responses[0][1]), tok.eos_ids[0]]
    p = tok.encode(prompts[0][0])
    assert with_eos.tokens[0, 0, 1, len(p):len(p) + len(r)].tolist() == r
    assert with_eos.loss_mask[0, 0, 1].sum() == len(r)
    with pytest.raises(ValueError, match="response 1 is empty"):
        build_pair_batch(tok, prompts, [["fine", ""]])


def test_logprob_matrix_on_smollm2_matches_transformers(smollm2_gguf, smollm2_transformers, hh_texts):
    """2 real HH queries x 2 paper constitutions (training prompt) x 2 real responses on SmolLM2-135M:
    M from our batch (response-window path; pairs, and prompts shared) == transformers' per-sequence
    log-probs (mean and sum)."""
    from sami_jax.data.constitutions import load_constitutions
    from sami_jax.data.queries import first_human_turn
    from sami_jax.data.tasks import get_task

    model = sami_jax.load_model(smollm2_gguf)
    task, scheme = get_task("hh"), load_constitutions("hh")
    positive, negatives = scheme.subset_constitutions("harmless")
    cons = [positive, negatives[0]]
    dialogues = hh_texts[:2]
    queries = [first_human_turn(d) for d in dialogues]
    responses = [[d.split("Assistant:")[1].split("\n\nHuman:")[0].strip()[:200] for d in hh_texts[2:4]]] * 2
    prompts = [[task.training_prompt(c, q) for c in cons] for q in queries]
    batch = build_pair_batch(model.tokenizer, prompts, responses)
    pairs = [(i, k, j) for i in range(2) for k in range(2) for j in range(2)]
    ref_lps = {}  # transformers' log-probs of each response's tokens, once for the four cases below
    for i, k, j in pairs:
        p = model.tokenizer.encode(prompts[i][k], add_bos=model.tokenizer.add_bos_default)
        r = model.tokenizer.encode(responses[i][j])
        with torch.no_grad():
            logp = torch.log_softmax(smollm2_transformers(torch.tensor([p + r])).logits[0].double(), -1)
        ref_lps[i, k, j] = [logp[len(p) - 1 + n, t].item() for n, t in enumerate(r)]
        # the scored positions are exactly the response's tokens
        assert batch.loss_mask[i, k, j].sum() == len(r)
        assert batch.tokens[i, k, j][batch.loss_mask[i, k, j] == 1].tolist() == r
    for reduce, shared in (("mean", False), ("sum", False), ("mean", True), ("sum", True)):
        ours = np.asarray(logprob_matrix(model.params, model.config, batch.tokens, batch.attention, batch.loss_mask,
                                         reduce=reduce, response_len=response_window(batch.loss_mask),
                                         prompts_shared=shared,
                                         prompt_len=prompt_window(batch.loss_mask) if shared else None))
        reduce_fn = np.mean if reduce == "mean" else np.sum
        diffs = [abs(ours[key] - reduce_fn(ref_lps[key])) for key in pairs]
        assert max(diffs) <= 1e-3, (reduce, shared, diffs)
