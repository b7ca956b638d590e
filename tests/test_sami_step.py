"""The optimizers against torch (the authors' AdamW / RMSprop + clipping + HF linear schedule), and
sami_step's gradient accumulation and learning."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny
import torch
import transformers
from jax.sharding import PartitionSpec as P

import sami_jax
from sami_jax.optim import OptimConfig, make_optimizer, make_schedule
from sami_jax.sami import init_train_state, logprob_matrix, sami_step
from sami_jax.sharding import make_mesh


def test_linear_schedule_is_hfs_with_one_warmup_step():
    cfg = OptimConfig(learning_rate=5e-7, schedule="linear", warmup_steps=1, total_steps=15)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-7)
    sched = transformers.get_scheduler("linear", opt, num_warmup_steps=1, num_training_steps=15)
    for step in range(17):
        np.testing.assert_allclose(float(make_schedule(cfg)(step)), sched.get_last_lr()[0], rtol=1e-5, atol=1e-15)
        opt.step()
        sched.step()
    assert float(make_schedule(cfg)(0)) == 0.0  # the authors' first update ran at lr 0


@pytest.mark.parametrize("cfg", [
    OptimConfig(name="adamw", learning_rate=1e-2, weight_decay=0.01, clip_norm=1.0, schedule="linear",
                warmup_steps=1, total_steps=6),
    OptimConfig(name="rmsprop", learning_rate=1e-3, weight_decay=0.0, clip_norm=0.5, schedule="constant"),
])
def test_optimizers_match_torch(cfg):
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(4, 3)).astype(np.float32)
    grads = [rng.normal(scale=2, size=(4, 3)).astype(np.float32) for _ in range(5)]

    p = torch.nn.Parameter(torch.tensor(w0))
    if cfg.name == "adamw":
        opt = torch.optim.AdamW([p], lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.RMSprop([p], lr=cfg.learning_rate, alpha=cfg.rms_decay, eps=cfg.eps)
    sched = (transformers.get_scheduler("linear", opt, num_warmup_steps=cfg.warmup_steps,
                                        num_training_steps=cfg.total_steps) if cfg.schedule == "linear" else None)
    ours, tx = jnp.asarray(w0), make_optimizer(cfg)
    state = tx.init(ours)
    for g in grads:
        p.grad = torch.tensor(g)
        torch.nn.utils.clip_grad_norm_([p], cfg.clip_norm)
        opt.step()
        if sched is not None:
            sched.step()
        updates, state = tx.update(jnp.asarray(g), state, ours)
        ours = ours + updates
    np.testing.assert_allclose(np.asarray(ours), p.detach().numpy(), atol=1e-6)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return sami_jax.load_model(tiny.save(tiny.hf_model("llama_kv2"), tmp_path_factory.mktemp("m")))


def _batch(q, seed=0, c=2, t=16):
    """q queries of random prompt/response pairs, [q, c, c, t] arrays (response j scored after prompt k)."""
    rng = np.random.default_rng(seed)
    tokens = np.zeros((q, c, c, t), np.int32)
    att, lm = np.zeros_like(tokens), np.zeros_like(tokens)
    for i in range(q):
        ps = [rng.integers(3, 256, 6).tolist() for _ in range(c)]
        rs = [rng.integers(3, 256, 5 + j).tolist() for j in range(c)]
        for k in range(c):
            for j in range(c):
                n = len(ps[k]) + len(rs[j])
                tokens[i, k, j, :n], att[i, k, j, :n], lm[i, k, j, len(ps[k]):n] = ps[k] + rs[j], 1, 1
    return tokens, att, lm


def _torch_sami_loss(hf, tokens, att, lm, autocast: bool = False):
    """The authors' SAMI loss in torch through transformers' model (under torch.autocast(bfloat16) when
    asked): each pair's mean response-token log-prob (log-softmax in float64), the [q, c, c] matrix, the
    symmetric cross-entropy against the diagonal."""
    q, c, _, t = tokens.shape
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = hf(torch.as_tensor(tokens.reshape(-1, t), dtype=torch.long),
                    attention_mask=torch.as_tensor(att.reshape(-1, t))).logits
    logp = torch.log_softmax(logits[:, :-1].double(), -1).gather(
        -1, torch.as_tensor(tokens.reshape(-1, t)[:, 1:, None], dtype=torch.long))[..., 0]
    mask = torch.as_tensor(lm.reshape(-1, t)[:, 1:], dtype=torch.float64)
    m = ((logp * mask).sum(-1) / mask.sum(-1)).reshape(q, c, c)
    target = torch.arange(c).expand(q, c)
    return 0.5 * (torch.nn.functional.cross_entropy(m, target)
                  + torch.nn.functional.cross_entropy(m.transpose(1, 2), target))


@pytest.mark.parametrize("shared,scan", [(False, True), (True, True), (False, False), (True, False)],
                         ids=["pairs", "prompts_shared", "pairs_unrolled", "prompts_shared_unrolled"])
def test_gradients_match_torch(tmp_path, shared, scan, training_on_kernels):
    """d SAMI loss / d every weight (the CPU's custom matmul backward, with and without shared prompts, the
    layers scanned or unrolled over per-layer weights, the weight products and the attention on XLA's ops or on
    the CPU kernels: AMX tiles, or the AVX2 GEMM) equals torch autograd through transformers' model on the same
    pairs, tensor by tensor."""
    from sami_jax.checkpoints.hf import at_path, tensor_table
    from sami_jax.models.transformer import stack_layers, unstack_layers
    from sami_jax.sami import prompt_window, response_window, sami_loss

    hf = tiny.hf_model("llama_kv2")
    model = sami_jax.load_model(tiny.save(hf, tmp_path))
    tokens, att, lm = _batch(3, seed=4, c=2, t=16)
    loss = _torch_sami_loss(hf, tokens, att, lm)
    loss.backward()
    ref = {name: p.grad.numpy() for name, p in hf.named_parameters()}

    def ours_loss(params):
        return sami_loss(logprob_matrix(params, model.config, tokens, att, lm, response_len=response_window(lm),
                                        prompts_shared=shared, prompt_len=prompt_window(lm) if shared else None))

    params = model.params if scan else unstack_layers(model.params)
    step = jax.jit(jax.value_and_grad(ours_loss))
    text = step.lower(params).as_text()
    assert ("sami_dense_matmul" in text) == ("sami_attention_train" in text) == training_on_kernels
    value, grads = step(params)
    if not scan:
        assert isinstance(grads["layers"], tuple)
        grads = stack_layers(grads)
    np.testing.assert_allclose(float(value), loss.item(), rtol=1e-5)
    for e in tensor_table(model.config):
        ours = e.to_hf(np.asarray(at_path(grads, e.path)[e.index]))
        np.testing.assert_allclose(ours, ref[e.hf_name], atol=2e-6, rtol=1e-4, err_msg=e.hf_name)


@pytest.mark.parametrize("remat,calls", [("dots_no_batch", 14), ("full", 20)])
def test_kernels_follow_the_remat_policy(model, training_on_kernels, remat, calls):
    """On the CPU kernels the step's 7 weight products of a layer (x W) and their input gradients (dy W^T) are kernel
    calls; `dots_no_batch` keeps their outputs as it keeps XLA's dots (no forward products again in the
    backward pass), `full` recomputes them (all but the down projection's, whose output the layer's backward
    pass does not read). The vocabulary head adds 2 (its chunk logits, kept for the backward pass at this size, and
    the rows' gradient).
    The weight gradients (x^T dy, x read transposed) are 7 more and the head's 1. The attention runs on its kernels
    too, forward and backward (`training_kernels`)."""
    optim = OptimConfig(name="adamw", learning_rate=1e-3, schedule="constant")
    tokens, att, lm = (x.reshape(2, 2, *x.shape[1:]) for x in _batch(4))
    text = sami_step.lower(init_train_state(model.params, optim), tokens, att, lm, config=model.config,
                           optim=optim, remat=remat).compile().as_text()
    assert text.count('custom_call_target="sami_dense_matmul"') == (calls + 2 + 7 + 1 if training_on_kernels else 0)
    assert text.count("transpose_x = true") == (7 + 1 if training_on_kernels else 0)
    # the attention's kernel: its output kept by `dots_no_batch` (no forward again in the backward pass)
    assert text.count('custom_call_target="sami_attention_train"') == ((1 if remat == "dots_no_batch" else 2)
                                                                      if training_on_kernels else 0)
    assert text.count('custom_call_target="sami_attention_grad"') == (1 if training_on_kernels else 0)


def test_bf16_compute_step_matches_torch_autocast(tmp_path):
    """compute_dtype=bfloat16 (float32 master params, cast once per step for all micro-batches) against
    torch.autocast(bfloat16) through transformers, the authors' mixed precision: loss and gradient norm
    agree to bfloat16 rounding, and differ from the float32 step's (so the cast took effect)."""
    from sami_jax.sami import response_window

    hf = tiny.hf_model("llama_kv2")
    model = sami_jax.load_model(tiny.save(hf, tmp_path))
    tokens, att, lm = _batch(4, seed=5, c=2, t=16)
    loss = _torch_sami_loss(hf, tokens, att, lm, autocast=True)
    loss.backward()
    ref_norm = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in hf.parameters())))

    optim = OptimConfig(name="adamw", learning_rate=1e-3, schedule="constant")
    arrays = [x.reshape(2, 2, *x.shape[1:]) for x in (tokens, att, lm)]  # 2 micro-batches of 2 queries
    kwargs = dict(config=model.config, optim=optim, response_len=response_window(lm))
    _, bf16 = sami_step(init_train_state(model.params, optim), *arrays, compute_dtype=jnp.bfloat16, **kwargs)
    _, f32 = sami_step(init_train_state(model.params, optim), *arrays, **kwargs)
    np.testing.assert_allclose(float(bf16["loss"]), loss.item(), rtol=1e-2)
    np.testing.assert_allclose(float(bf16["grad_norm"]), ref_norm, rtol=2e-2)
    assert float(bf16["loss"]) != float(f32["loss"])


def test_accumulation_equals_one_big_batch(model):
    """4 accumulated micro-batches of 1 query == 1 batch of 4 queries."""
    # A large eps keeps Adam's first update linear in tiny gradients, so float noise cannot flip it.
    optim = OptimConfig(name="adamw", learning_rate=1e-3, schedule="constant", eps=1e-3)
    tokens, att, lm = _batch(4)
    four = sami_step(init_train_state(model.params, optim),
                     *(x.reshape(4, 1, *x.shape[1:]) for x in (tokens, att, lm)), config=model.config, optim=optim)
    one = sami_step(init_train_state(model.params, optim), tokens[None], att[None], lm[None],
                    config=model.config, optim=optim)
    np.testing.assert_allclose(four[1]["grad_norm"], one[1]["grad_norm"], rtol=1e-5)
    np.testing.assert_allclose(four[1]["loss"], one[1]["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(four[0].params), jax.tree.leaves(one[0].params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("shared,scan", [(False, True), (True, True), (True, False)],
                         ids=["pairs", "prompts_shared", "prompts_shared_unrolled"])
def test_sharded_step_equals_single_device(model, tmp_path_factory, shared, scan):
    """The step on a 2 (fsdp) x 4 (tensor) mesh of 8 CPU devices, batch sharded, equals one device; with
    each prompt run once for its responses (`prompts_shared`) too, and with the layers unrolled
    (`scan_layers=False`, remat `dots_no_batch`), against the single-device pair step."""
    optim = OptimConfig(name="adamw", learning_rate=1e-3, schedule="constant", clip_norm=1.0)
    tokens, att, lm = (x.reshape(2, 2, *x.shape[1:]) for x in _batch(4, seed=2))
    single, single_metrics = sami_step(init_train_state(model.params, optim), tokens, att, lm,
                                       config=model.config, optim=optim)
    mesh = make_mesh({"fsdp": 2, "tensor": 4})
    sharded_model = sami_jax.load_model(tiny.save(tiny.hf_model("llama_kv2"), tmp_path_factory.mktemp("s")), mesh=mesh)
    sharder = sharded_model.sharder
    assert sharded_model.params["layers"]["self_attn"]["q_proj"].sharding.spec == P(None, "fsdp", "tensor", None)
    batch_sharding = sharder.sharding(tokens.shape, (None, "batch", None, None, None))
    arrays = [jax.device_put(x, batch_sharding) for x in (tokens, att, lm)]
    extra = dict(prompts_shared=True, prompt_len=8, response_len=16) if shared else {}
    if not scan:
        extra.update(scan_layers=False, remat="dots_no_batch")
    state, metrics = sami_step(init_train_state(sharded_model.params, optim), *arrays, config=model.config,
                               optim=optim, sharder=sharder, **extra)
    q_proj = state.params["layers"]["self_attn"]["q_proj"]
    assert q_proj.sharding.is_equivalent_to(sharded_model.params["layers"]["self_attn"]["q_proj"].sharding, 4)
    np.testing.assert_allclose(metrics["loss"], single_metrics["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(single.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_steps_raise_mutual_information(model):
    """A few AdamW steps on one batch separate the diagonal from the off-diagonal entries."""
    optim = OptimConfig(name="adamw", learning_rate=3e-3, schedule="constant", clip_norm=1.0)
    tokens, att, lm = (x[None] for x in _batch(4, seed=1))
    state = init_train_state(model.params, optim)
    history = []
    for _ in range(6):
        state, metrics = sami_step(state, tokens, att, lm, config=model.config, optim=optim, remat="full")
        history.append({k: float(v) for k, v in metrics.items()})
    assert set(history[0]) == {"loss", "row_loss", "col_loss", "row_accuracy", "col_accuracy", "diag_minus_offdiag",
                               "grad_norm", "lr"}
    assert history[0]["lr"] == pytest.approx(3e-3) and history[0]["grad_norm"] > 0
    assert history[-1]["loss"] < history[0]["loss"] - 0.05
    assert history[-1]["diag_minus_offdiag"] > history[0]["diag_minus_offdiag"]
    assert int(state.step) == 6


def test_mixtral_step_and_logprob_matrix_vs_transformers(tmp_path):
    """Mixtral's dropless experts through the SAMI step: M [q, c, c] equals transformers' summed token
    log-probs of every (prompt k, response j) sequence, one step runs to finite values, and the same step
    with the layers unrolled (`scan_layers=False`) gives the same update."""
    hf = tiny.hf_model("mixtral_4x2")
    mixtral = sami_jax.load_model(tiny.save(hf, tmp_path / "mixtral"))
    tokens, att, lm = _batch(2, seed=3)
    m = np.asarray(logprob_matrix(mixtral.params, mixtral.config, tokens, att, lm, reduce="sum"))
    with torch.no_grad():
        logits = hf(torch.as_tensor(tokens.reshape(-1, 16), dtype=torch.long),
                    attention_mask=torch.as_tensor(att.reshape(-1, 16))).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, torch.as_tensor(tokens.reshape(-1, 16)[:, 1:, None],
                                                                            dtype=torch.long))[..., 0].numpy()
    ref = (logp * lm.reshape(-1, 16)[:, 1:]).sum(-1).reshape(2, 2, 2)
    np.testing.assert_allclose(m, ref, atol=1e-4)
    optim = OptimConfig(name="adamw", learning_rate=1e-3, schedule="constant")
    scanned, metrics = sami_step(init_train_state(mixtral.params, optim), tokens[None], att[None], lm[None],
                                 config=mixtral.config, optim=optim)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    unrolled, unrolled_metrics = sami_step(init_train_state(mixtral.params, optim), tokens[None], att[None],
                                           lm[None], config=mixtral.config, optim=optim, scan_layers=False)
    np.testing.assert_allclose(float(unrolled_metrics["grad_norm"]), float(metrics["grad_norm"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(unrolled.params), jax.tree.leaves(scanned.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
