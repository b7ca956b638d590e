"""The KV-cache sampler against the full forward pass, HF `generate`, HF's logits warpers and exact
distributions."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny
import torch
from transformers.generation import logits_process

import sami_jax
from sami_jax.models import cpu_kernels
from sami_jax.models.transformer import (
    KVCache,
    OutIn,
    _matmuls_out_in,
    forward,
    forward_cached,
    positions_from_mask,
    split_layers,
)
from sami_jax.sampling import Sampler, SamplingParams, pick_tokens, process_logits

FAMILIES = ["llama_kv2", "mistral_window", "mixtral_4x2"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cache = {}

    def get(name, **overrides):
        key = (name, tuple(sorted(overrides.items())))
        if key not in cache:
            hf = tiny.hf_model(name, **overrides)
            cache[key] = hf, sami_jax.load_model(tiny.save(hf, tmp_path_factory.mktemp(name)))
        return cache[key]

    return get


def _left_pad(rows, width):
    tokens = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        tokens[i, width - len(r):], mask[i, width - len(r):] = r, True
    return tokens, mask


@pytest.mark.parametrize("layout", ["stacked", "per_layer", "per_layer_out_in", "per_layer_panels"])
@pytest.mark.parametrize("name", FAMILIES)
def test_cached_decode_equals_full_forward(saved, name, layout):
    """Prefill 8 slots (left-padded), then decode 20 tokens one at a time: each step's logits equal the
    full-sequence forward at that position (past Mistral's window of 12). Stacked params and cache (layer
    scan), per-layer ones (layer loop), per-layer with the projections stored [out, in], and those packed
    for the CPU panel matmul."""
    if layout == "per_layer_panels" and not cpu_kernels.load():
        pytest.skip("the CPU kernels did not build here (no C++ compiler, or see the warning)")
    _, model = saved(name)
    per_layer = layout != "stacked"
    params = split_layers(model.params, out_in=layout == "per_layer_out_in",
                          panels=layout == "per_layer_panels") if per_layer else model.params
    if layout in ("per_layer_out_in", "per_layer_panels"):  # one device: q/k/v fused into one OutIn
        qkv = params["layers"][0]["self_attn"]
        assert set(qkv) == {"q_proj+k_proj+v_proj", "o_proj"}
        assert qkv["o_proj"].panels == (layout == "per_layer_panels")
    rows = [tiny.tokens(1, n, seed=i)[0] for i, n in enumerate([8, 5])]
    cont = tiny.tokens(2, 20, seed=9)
    prompt, pmask = _left_pad(rows, 8)
    full_tokens = np.concatenate([prompt, cont], 1)
    full_mask = np.concatenate([pmask, np.ones_like(cont, bool)], 1)
    fwd = jax.jit(forward, static_argnames="config")
    full = np.asarray(fwd(model.params, jnp.asarray(full_tokens), model.config, mask_bt=jnp.asarray(full_mask)))
    step = jax.jit(forward_cached, static_argnames="config")
    cache = KVCache.create(model.config, 2, 28, jnp.float32, per_layer=per_layer)
    positions = positions_from_mask(jnp.asarray(full_mask))
    logits, cache = step(params, jnp.asarray(prompt), model.config, cache, jnp.int32(0),
                         positions_bt=positions[:, :8], mask_bt=jnp.asarray(pmask))
    np.testing.assert_allclose(np.asarray(logits)[pmask], full[:, :8][pmask], atol=1e-5, rtol=0)
    for t in range(20):
        logits, cache = step(params, jnp.asarray(cont[:, t:t + 1]), model.config, cache, jnp.int32(8 + t),
                             positions_bt=positions[:, 8 + t:9 + t], mask_bt=jnp.ones((2, 1), bool))
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, 8 + t], atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["stacked", "per_layer"])
@pytest.mark.parametrize("name", ["llama_kv2", "mistral_window"])
def test_flash_prefill_equals_einsum_prefill(saved, name, layout):
    """The prefill through flash attention (`fused_attention_left_padded`, here jax's portable "xla"
    implementation of the call that runs cuDNN on a GPU) gives the einsum prefill's logits at every real
    position and the same cache, for left-padded rows of 20, 13 and 0 real tokens (past Mistral's window
    of 12), a row of padding only included."""
    _, model = saved(name)
    params = split_layers(model.params) if layout == "per_layer" else model.params
    tokens, mask = _left_pad([tiny.tokens(1, n, seed=i)[0] for i, n in enumerate([20, 13])] + [[]], 20)
    positions = positions_from_mask(jnp.asarray(mask))
    step = jax.jit(forward_cached, static_argnames=("config", "fresh", "prefill_attention"))
    out = {}
    for impl in ("einsum", "xla"):
        cache = KVCache.create(model.config, 3, 24, jnp.float32, per_layer=layout == "per_layer")
        out[impl] = step(params, jnp.asarray(tokens), model.config, cache, jnp.int32(0), positions_bt=positions,
                         mask_bt=jnp.asarray(mask), fresh=True, prefill_attention=impl)
    (ref, ref_cache), (got, got_cache) = out["einsum"], out["xla"]
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(np.asarray(got)[mask], np.asarray(ref)[mask], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(got_cache.valid), np.asarray(ref_cache.valid))
    real = np.asarray(ref_cache.valid)  # [b, s]; padding slots (never read) hold whatever padding computed
    for a, b in zip(jax.tree.leaves((got_cache.k, got_cache.v)), jax.tree.leaves((ref_cache.k, ref_cache.v)),
                    strict=True):  # [(layers,) b, kv, s, d]
        a, b = np.moveaxis(np.asarray(a), -2, -3), np.moveaxis(np.asarray(b), -2, -3)  # [..., b, s, kv, d]
        np.testing.assert_allclose(a[..., real, :, :], b[..., real, :, :], atol=1e-5, rtol=0)


@pytest.mark.parametrize("rows", [16, 100], ids=["few_rows", "many_rows"])
@pytest.mark.parametrize("n_in", [1, 2])
def test_matmuls_out_in_equal_numpy(rows, n_in):
    """Weights stored [*out, *in]: both ways of forming the product (few rows: (W x^T)^T; many: x W^T)
    equal numpy's x @ W with W in the params' [*in, *out] layout; with n_in 1, also two weights fused
    into one `OutIn` (split back into their outputs)."""
    rng = np.random.default_rng(0)
    in_dims, out_dims = [(48,), (4, 12)][n_in - 1], [(40,), (6,)][n_in - 1]
    x = rng.standard_normal((rows // 4, 4, *in_dims), dtype=np.float32)
    w = rng.standard_normal((*in_dims, *out_dims), dtype=np.float32)
    w_out_in = np.moveaxis(w, list(range(n_in)), list(range(w.ndim - n_in, w.ndim)))
    run = jax.jit(_matmuls_out_in, static_argnums=2)
    (y,) = run(jnp.asarray(x), [OutIn(jnp.asarray(w_out_in))], n_in)
    np.testing.assert_allclose(np.asarray(y), np.tensordot(x, w, axes=n_in), rtol=1e-5, atol=1e-4)
    if n_in == 1:
        w2 = rng.standard_normal((48, 3, 8), dtype=np.float32)
        fused = OutIn(jnp.concatenate([jnp.asarray(w.T), jnp.asarray(w2.reshape(48, 24).T)]), outs=((40,), (3, 8)))
        y1, y2 = run(jnp.asarray(x), [fused], 1)
        np.testing.assert_allclose(np.asarray(y1), x @ w, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(np.asarray(y2), np.tensordot(x, w2, axes=1), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("panels", [False, True], ids=["xla_gemm", "panels"])
@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_equals_hf_generate(saved, name, panels):
    """Greedy tokens equal HF's, with the CPU sampler's weights multiplied by XLA and by the panel matmul."""
    if panels and not cpu_kernels.load():
        pytest.skip("the CPU kernels did not build here (no C++ compiler, or see the warning)")
    hf, model = saved(name)
    rows = [tiny.tokens(1, n, seed=i)[0].tolist() for i, n in enumerate([5, 11, 16, 3])]
    sampler = Sampler(model, buckets=(16,), panels=panels)
    results = sampler.generate(rows, SamplingParams(max_new_tokens=24), eos_ids=[])
    assert sampler.run_params()["lm_head"].panels == panels
    for r, row in zip(results, rows, strict=True):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([row]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(row):].tolist()
        assert r.token_ids == ref
        assert (r.length, r.finish_reason) == (24, "length")


@pytest.mark.parametrize("panels", [False, True], ids=["xla", "cpu_kernels"])
def test_top_p_tokens_lie_in_hf_nucleus(saved, panels):
    """Every token the sampler draws at top-p 0.3 is in HF's TopPLogitsWarper set for the model's own logits
    at that position (transformers' full forward over the prompt and the tokens before it), with the
    threshold found by XLA's bisection and by the CPU kernel. The tiny model's flat distributions put about
    a third of the vocabulary in each nucleus, so a sampler that ignored top-p would leave it within a few
    tokens."""
    _kernel_or_skip(panels)
    hf, model = saved("llama_kv2")
    rows = [tiny.tokens(1, n, seed=i)[0].tolist() for i, n in enumerate([5, 11, 16, 3])]
    sampler = Sampler(model, buckets=(16,), panels=panels)
    results = sampler.generate(rows, SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.3, seed=1),
                               eos_ids=[])
    assert sampler.run_params()["lm_head"].panels == panels
    warper = logits_process.TopPLogitsWarper(0.3)
    for r, row in zip(results, rows, strict=True):
        with torch.no_grad():
            logits = hf(torch.tensor([row + r.token_ids])).logits[0, len(row) - 1:-1]
        kept = torch.isfinite(warper(None, logits)).numpy()
        assert kept.sum(1).max() < 0.5 * kept.shape[1]
        assert kept[np.arange(len(r.token_ids)), r.token_ids].all()


def test_eos_stops_only_its_row(saved):
    _, model = saved("llama_kv2")
    rows = [tiny.tokens(1, 6, seed=i)[0].tolist() for i in range(3)]
    sampler = Sampler(model, buckets=(8,), chunk=4)
    free = sampler.generate(rows, SamplingParams(max_new_tokens=12), eos_ids=[])
    # An EOS id that row 0 emits at step 3 (first time) and the other rows never emit.
    eos = free[0].token_ids[3]
    assert eos not in free[0].token_ids[:3] and all(eos not in r.token_ids for r in free[1:])
    stopped = sampler.generate(rows, SamplingParams(max_new_tokens=12), eos_ids=[eos])
    assert (stopped[0].token_ids, stopped[0].finish_reason, stopped[0].length) == (free[0].token_ids[:3], "eos", 3)
    for a, b in zip(stopped[1:], free[1:], strict=True):
        assert (a.token_ids, a.finish_reason, a.length) == (b.token_ids, "length", 12)


def test_logprobs_are_the_models_own(saved):
    _, model = saved("llama_kv2")
    row = tiny.tokens(1, 7)[0].tolist()
    r = Sampler(model, buckets=(8,)).generate([row], SamplingParams(max_new_tokens=6, temperature=0.7, top_k=5,
                                                                   logprobs=True), eos_ids=[])[0]
    full = np.asarray(jax.nn.log_softmax(model.logits([row + r.token_ids])[0]))
    expected = [full[len(row) - 1 + i, t] for i, t in enumerate(r.token_ids)]
    np.testing.assert_allclose(r.logprobs, expected, atol=1e-5)


# ------------------------------------------------------------------------------------ distributions
def _exact(logits, temperature, top_k, top_p):
    """The tempered, top-k then top-p truncated distribution, by a plain numpy loop."""
    x = np.asarray(logits, np.float64) / temperature
    keep = np.ones_like(x, bool)
    if top_k:
        keep &= x >= np.sort(x)[-top_k]
    p = np.where(keep, np.exp(x - x[keep].max()), 0)
    p /= p.sum()
    if top_p < 1:
        order = np.argsort(p)  # ascending: drop the least likely while their total stays <= 1 - top_p
        total = 0.0
        for i in order[:-1]:
            if total + p[i] > 1 - top_p + 1e-12:
                break
            total += p[i]
            keep[i] = False
        p = np.where(keep, p, 0)
        p /= p.sum()
    return p


def _kernel_or_skip(cpu_kernel):
    if cpu_kernel and not cpu_kernels.load():
        pytest.skip("the CPU kernels did not build here (no C++ compiler, or see the warning)")


# (cpu_kernel: the top-p threshold from `cpu_kernels.top_p_threshold` instead of the bisection)
@pytest.mark.parametrize(("temperature", "top_k", "top_p", "cpu_kernel"),
                         [(1.0, 0, 1.0, False), (0.7, 0, 1.0, False), (1.3, 4, 1.0, False), (0.9, 0, 0.8, False),
                          (1.0, 5, 0.7, False), (0.9, 0, 0.8, True), (1.0, 5, 0.7, True)])
def test_draws_match_the_exact_distribution(temperature, top_k, top_p, cpu_kernel):
    _kernel_or_skip(cpu_kernel)
    logits = np.asarray([1.2, 0.3, -0.5, 2.0, 0.0, -1.5, 0.9, 1.6], np.float32)
    n = 20_000
    sp = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    draws = np.asarray(jax.jit(lambda k: pick_tokens(k, jnp.broadcast_to(jnp.asarray(logits), (n, 8)), sp,
                                                     cpu_kernel))(jax.random.key(0)))
    freq = np.bincount(draws, minlength=8) / n
    expected = _exact(logits, temperature, top_k, top_p)
    assert np.abs(freq - expected).max() <= 0.01
    assert (freq[expected == 0] == 0).all()


@pytest.mark.parametrize("cpu_kernel", [False, True])
@pytest.mark.parametrize("top_p", [0.3, 0.75, 0.9, 0.99])
@pytest.mark.parametrize("top_k", [0, 1, 7, 50])
def test_kept_set_equals_hf_warpers(top_k, top_p, cpu_kernel):
    _kernel_or_skip(cpu_kernel)
    logits = np.random.default_rng(top_k).normal(0, 2, (16, 200)).astype(np.float32)
    ours = np.isfinite(np.asarray(process_logits(jnp.asarray(logits), 1.0, top_k, top_p, cpu_kernel)))
    scores = torch.tensor(logits)
    if top_k:
        scores = logits_process.TopKLogitsWarper(top_k)(None, scores)
    scores = logits_process.TopPLogitsWarper(top_p)(None, scores)
    np.testing.assert_array_equal(ours, np.isfinite(scores.numpy()))


@pytest.mark.parametrize("cpu_kernel", [False, True])
def test_top_p_on_flat_rows_and_ties(cpu_kernel):
    """Rows whose nucleus spans most of the vocabulary, or a few tokens, equal HF's set. On exact ties at the
    threshold we keep every tied token, where HF keeps those its sort happens to place last: ours is HF's
    set plus ties."""
    from sami_jax.sampling import _top_p_keep

    _kernel_or_skip(cpu_kernel)
    rng = np.random.default_rng(3)
    for scale, top_p in [(0.05, 0.5), (0.05, 0.9), (0.05, 0.999), (2.0, 0.3), (2.0, 0.9), (8.0, 0.99)]:
        flat = rng.normal(0, scale, (8, 300)).astype(np.float32)
        hf = logits_process.TopPLogitsWarper(top_p)(None, torch.tensor(flat)).numpy()
        np.testing.assert_array_equal(np.asarray(_top_p_keep(jnp.asarray(flat), top_p, cpu_kernel)), np.isfinite(hf))
    ties = np.asarray([[3.0, 2.0, 2.0, 2.0, 1.0, 0.0]], np.float32)
    probs = np.exp(ties[0]) / np.exp(ties[0]).sum()  # 0.44, 0.16 x 3, ...: 0.5 needs one of the 2.0s
    assert probs[0] < 0.5 < probs[0] + probs[1]
    hf = np.isfinite(logits_process.TopPLogitsWarper(0.5)(None, torch.tensor(ties)).numpy())[0]
    assert hf.sum() == 2 and hf[0]
    np.testing.assert_array_equal(np.asarray(_top_p_keep(jnp.asarray(ties), 0.5, cpu_kernel))[0], [1, 1, 1, 1, 0, 0])


# ------------------------------------------------------------------------------------ sharding, errors
@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 fake CPU devices (conftest sets XLA_FLAGS)")
def test_sharded_greedy_equals_single_device(saved, tmp_path):
    hf, single = saved("llama_kv4", num_attention_heads=8, num_key_value_heads=4)
    path = tiny.save(hf, tmp_path)
    sharded = sami_jax.load_model(path, mesh=sami_jax.make_mesh({"fsdp": 2, "tensor": 4}))
    rows = [tiny.tokens(1, n, seed=i)[0].tolist() for i, n in enumerate([4, 9, 13, 7])]
    sp = SamplingParams(max_new_tokens=16)
    sampler = Sampler(sharded, buckets=(16,))  # per-layer weights and cache (the CPU default), sharded
    a = sampler.generate(rows, sp, eos_ids=[])
    b = Sampler(single, buckets=(16,), per_layer=False).generate(rows, sp, eos_ids=[])
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    def spec(a):  # padded to one entry per dim
        return (*a.sharding.spec, *(None,) * (a.ndim - len(a.sharding.spec)))

    d, heads, head_dim = spec(sharded.params["layers"]["self_attn"]["q_proj"])[1:]
    assert heads is not None  # sharded, so the check below means something
    for layer in sampler.run_params()["layers"]:  # q_proj [heads, head_dim, d] on a CPU (OutIn)
        assert spec(layer["self_attn"]["q_proj"].w) == (heads, head_dim, d)


def test_bad_input(saved):
    _, model = saved("llama_kv2")
    sampler = Sampler(model, buckets=(8, 16))
    with pytest.raises(ValueError, match="no tokenizer"):
        sampler.generate(["text needs a tokenizer"])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sampler.generate([[5, 6], []])
    with pytest.raises(ValueError, match="prompt 0 has 20 tokens, more than the maximum 16"):
        sampler.generate([list(range(3, 23))])
    r = sampler.generate([list(range(3, 23))], SamplingParams(max_new_tokens=2), truncate=True, eos_ids=[])[0]
    assert r.prompt_tokens_dropped == 4
    for kwargs, msg in [({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top_p"),
                        ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"), ({"max_new_tokens": 0}, "max_new")]:
        with pytest.raises(ValueError, match=msg):
            SamplingParams(**kwargs)
    with pytest.raises(ValueError, match=r"panels=True.*per_layer=True"):
        Sampler(model, per_layer=False, panels=True)
    bf16 = dataclasses.replace(model, params=jax.tree.map(lambda a: a.astype(jnp.bfloat16), model.params))
    with pytest.raises(ValueError, match=r"panels=True.*float32 on one CPU device"):
        Sampler(bf16, per_layer=True, panels=True).run_params()
