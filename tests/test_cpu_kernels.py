"""The CPU kernels (`models/cpu_kernels`, `cpu_kernels.cc`): the panel matmul (float32 panels, and GGUF-quantized
weights stored as blocks), training's dense products, the attention, the top-p threshold and argmax, against numpy
(float64 where it sums); their switch and their fallback when they cannot build."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sami_jax.models import cpu_kernels

needs_kernel = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                                  reason="no C++ compiler (g++ or c++) to build the CPU panel matmul")


@needs_kernel
@pytest.mark.parametrize("rows,k,n", [(1, 576, 3072), (3, 37, 50), (12, 64, 1000), (13, 64, 17), (16, 576, 3072),
                                      (17, 40, 33), (40, 128, 300), (300, 96, 96), (0, 8, 8), (150, 600, 70)])
def test_panel_matmul_equals_numpy(rows, k, n, amx):
    """Row counts on either side of each tile size (1, 2, 4, 12, 16; AMX's 16 and 32 and its slab of 128) and
    output widths that leave part of a panel, or an odd panel, over; K not a multiple of 32; zero rows."""
    rng = np.random.default_rng(rows * 7 + n)
    x = rng.standard_normal((rows, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32)  # [out, in]
    panels = jax.jit(cpu_kernels.pack)(jnp.asarray(w))
    assert panels.shape == (-(-n // 16), k, 16)
    y = jax.jit(cpu_kernels.matmul, static_argnums=2)(jnp.asarray(x), panels, n)
    assert y.shape == (rows, n)
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=0, atol=2e-6 * k ** 0.5 * 16)


@needs_kernel
@pytest.mark.parametrize("layout", ["nn", "nt", "tn"])
@pytest.mark.parametrize("m,k,n", [(20, 37, 33), (17, 64, 16), (40, 31, 300), (576, 130, 192), (48, 300, 1024),
                                   (3, 5, 2), (20, 0, 33), (130, 600, 70)])
def test_dense_matmul_equals_numpy(layout, m, k, n, amx):
    """Training's products x W (nn), dy W^T (nt) and x^T dy (tn), each operand as XLA holds it: inner sizes that
    leave part of a tile pair over (32 on AMX), output rows on either side of one pass (16) and past a slab
    (128), columns past a panel or an odd panel, an empty inner dimension (zeros)."""
    assert cpu_kernels.load()
    rng = np.random.default_rng(m * 5 + k)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((k, n), dtype=np.float32)
    fn, a, b = {"nn": (cpu_kernels.dot, x, w), "nt": (cpu_kernels.dot_nt, x, w.T.copy()),
                "tn": (cpu_kernels.dot_tn, x.T.copy(), w)}[layout]
    y = jax.jit(fn)(jnp.asarray(a), jnp.asarray(b))
    assert y.shape == (m, n)
    ref = x.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=0, atol=2e-6 * max(k, 1) ** 0.5 * 16)


@needs_kernel
@pytest.mark.parametrize("m", [40, 8])  # AMX tiles, and the float32 tiles of a few rows
def test_dense_matmul_reads_a_stacked_weight_in_place(m, amx):
    """With an index, w is a stack [L, K, N] (or [L, N, K] read transposed) and each product uses w[index]."""
    assert cpu_kernels.load()
    rng = np.random.default_rng(m)
    x = rng.standard_normal((m, 70), dtype=np.float32)
    stack = rng.standard_normal((3, 70, 50), dtype=np.float32)
    dot, dot_nt = jax.jit(cpu_kernels.dot), jax.jit(cpu_kernels.dot_nt)
    for i in range(3):
        ref = x.astype(np.float64) @ stack[i].astype(np.float64)
        np.testing.assert_allclose(np.asarray(dot(x, stack, jnp.int32(i))), ref, rtol=0, atol=2e-6 * 70 ** 0.5 * 16)
        nt = np.asarray(dot_nt(x, stack.transpose(0, 2, 1).copy(), jnp.int32(i)))
        np.testing.assert_allclose(nt, ref, rtol=0, atol=2e-6 * 70 ** 0.5 * 16)


@needs_kernel
def test_dense_matmul_rejects_mismatched_shapes():
    """The error names the target and both operands' shapes."""
    assert cpu_kernels.load()
    want = r"sami_dense_matmul: want x .* got x \[4, 8\], w \[5, 8\], index 0, y \[8, 8\] with transpose_x"
    with pytest.raises(Exception, match=want):
        jax.block_until_ready(cpu_kernels.dot_tn(jnp.ones((4, 8)), jnp.ones((5, 8))))  # 4 tokens against 5
    want = r"got x \[20, 8\], w \[3, 8, 5\], index 3, y \[20, 5\]"
    with pytest.raises(Exception, match=want):  # a stack of 3 weights has no index 3
        jax.block_until_ready(cpu_kernels.dot(jnp.ones((20, 8)), jnp.ones((3, 8, 5)), 3))


@needs_kernel
def test_panel_matmul_rejects_mismatched_shapes():
    assert cpu_kernels.load()
    x, panels = jnp.ones((2, 8)), jnp.ones((1, 9, 16))  # K 8 against panels of K 9
    with pytest.raises(Exception, match="sami_panel_matmul: want x"):
        jax.block_until_ready(cpu_kernels.matmul(x, panels, 16))


def _gguf_weights(qtype_name: str, n: int, k: int, seed: int) -> np.ndarray:
    """An [n, k] float32 weight as GGUF's reference quantizer and dequantizer (`gguf.quants`) leave it."""
    gguf = pytest.importorskip("gguf", reason="the `gguf` package (test extra) quantizes the weights")
    qtype = gguf.GGMLQuantizationType[qtype_name]
    w = np.random.default_rng(seed).standard_normal((n, k), dtype=np.float32) * 0.05
    return gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).reshape(n, k).astype(np.float32)


@needs_kernel
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
@pytest.mark.parametrize("rows,k,n", [(1, 64, 50), (3, 96, 1000), (13, 32, 17), (16, 576, 300), (17, 64, 33),
                                      (300, 96, 96)])
def test_block_matmul_equals_numpy_and_panels(qtype, rows, k, n, amx):
    """GGUF-quantized weights stored as 8-bit blocks: found by pack_blocks for each quantized type, a product
    within float32 rounding of float64 numpy, and bit for bit the float32 panels' product (the same sums in the
    same order), for a decode step's rows (one tile), a partial tile and a prefill's (blocks rebuilt)."""
    w = _gguf_weights(qtype, n, k, seed=rows + n)
    x = np.random.default_rng(rows).standard_normal((rows, k), dtype=np.float32)
    panels = jax.jit(cpu_kernels.pack)(jnp.asarray(w))
    blocks = cpu_kernels.pack_blocks(panels)
    assert blocks is not None and blocks.dtype == np.uint8
    assert blocks.nbytes == panels.shape[0] * k * 16 * 5 // 4  # 1.25 bytes a weight
    mm = jax.jit(cpu_kernels.matmul, static_argnums=2)
    y = np.asarray(mm(jnp.asarray(x), jnp.asarray(blocks), n))
    np.testing.assert_allclose(y, x.astype(np.float64) @ w.T.astype(np.float64), rtol=0, atol=2e-6 * k ** 0.5 * 4)
    np.testing.assert_array_equal(y.view(np.uint32), np.asarray(mm(jnp.asarray(x), panels, n)).view(np.uint32))


@needs_kernel
def test_pack_blocks_refuses_weights_not_of_a_quantized_form():
    assert cpu_kernels.load()
    pack = jax.jit(cpu_kernels.pack)
    rng = np.random.default_rng(0)
    assert cpu_kernels.pack_blocks(pack(jnp.asarray(rng.standard_normal((40, 64), dtype=np.float32)))) is None
    w = _gguf_weights("Q4_1", 40, 64, seed=1)
    assert cpu_kernels.pack_blocks(pack(jnp.asarray(w))) is not None
    for bad in (np.nextafter(w[7, 33], np.float32(1)), np.nan, np.inf):  # one weight off by an ulp, NaN, inf
        v = w.copy()
        v[7, 33] = bad
        assert cpu_kernels.pack_blocks(pack(jnp.asarray(v))) is None
    assert cpu_kernels.pack_blocks(pack(jnp.asarray(w[:, :48]))) is None  # K not a multiple of 32


@needs_kernel
def test_block_matmul_rejects_mismatched_shapes():
    assert cpu_kernels.load()
    x, blocks = jnp.ones((2, 64)), jnp.zeros((1, 640), jnp.uint8)  # K 64 needs 2 blocks of 640 bytes a panel
    with pytest.raises(Exception, match="sami_block_matmul: want x"):
        jax.block_until_ready(cpu_kernels.matmul(x, blocks, 16))


@needs_kernel
@pytest.mark.parametrize("v", [1, 7, 16, 49152 + 5])
def test_argmax_equals_numpy(v):
    """Rows of random values, ties (the first index wins), all -inf, NaNs (the first NaN wins, as jnp.argmax),
    against numpy's argmax, whose answers for ties and NaN are the same."""
    assert cpu_kernels.load()
    rng = np.random.default_rng(v)
    x = rng.standard_normal((6, v), dtype=np.float32)
    x[1] = np.float32(3.0) * (rng.random(v) < 0.5)  # many ties at the top
    x[2] = -np.inf
    x[3, [v // 2, v - 1]] = np.nan
    x[4, [v - 1, v // 3]] = [np.float32(9.0), np.float32(9.0)]
    x[5] = 0.0
    got = np.asarray(jax.jit(cpu_kernels.argmax)(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.argmax(x, axis=1))


def test_switch(monkeypatch):
    monkeypatch.setenv("SAMI_JAX_CPU_KERNELS", "0")
    assert cpu_kernels.enabled() is False
    monkeypatch.setenv("SAMI_JAX_CPU_KERNELS", "yes")
    with pytest.raises(ValueError, match="SAMI_JAX_CPU_KERNELS='yes': want auto, 0 or 1"):
        cpu_kernels.enabled()


def test_failed_build_warns_and_falls_back(monkeypatch, tmp_path):
    """A compiler that fails: `load` warns with the command and returns False, and builds nothing."""
    monkeypatch.setenv("SAMI_JAX_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")
    cpu_kernels.load.cache_clear()
    try:
        with pytest.warns(UserWarning, match=r"did not build or load.*false -O3"):
            assert cpu_kernels.load() is False
        assert not list(tmp_path.rglob("*.so"))
    finally:
        cpu_kernels.load.cache_clear()  # the next test builds (or finds) the real one again


def _attention_numpy(q, k, v, mask):
    """Plain float64 softmax attention: q [b, t, h, d], k and v [b, kv, s, d], mask [b, t, s]; a query with no
    unmasked slot averages all its values (what a softmax over equal scores gives)."""
    b, t, h, d = q.shape
    kv = k.shape[1]
    out = np.zeros((b, t, h, d))
    for i in range(b):
        for j in range(h):
            kk, vv = k[i, j // (h // kv)].astype(np.float64), v[i, j // (h // kv)].astype(np.float64)
            for u in range(t):
                s = kk @ q[i, u, j].astype(np.float64) / np.sqrt(d)
                s = np.where(mask[i, u], s, -np.inf) if mask[i, u].any() else np.zeros_like(s)
                p = np.exp(s - s.max())
                out[i, u, j] = p @ vv / p.sum()
    return out


@needs_kernel
@pytest.mark.parametrize("b,t,h,kv,d,s", [(16, 1, 9, 3, 64, 192), (3, 1, 4, 4, 16, 37), (2, 1, 8, 2, 20, 5),
                                          (1, 1, 2, 1, 128, 300), (3, 24, 9, 3, 64, 40), (2, 7, 4, 2, 20, 7)])
def test_attention_equals_numpy(b, t, h, kv, d, s):
    """One query token per row (a decode step) and several (a prefill, causal over the first t slots, left
    padding); head dims that are and are not a multiple of 16; masks with a prefix of padding, a sliding window's
    gap in the middle, a single slot, and none at all (a padding row)."""
    assert cpu_kernels.load()
    rng = np.random.default_rng(b * 100 + s + t)
    q = rng.standard_normal((b, t, h, d), dtype=np.float32) * 2
    k, v = (rng.standard_normal((b, kv, s, d), dtype=np.float32) for _ in range(2))
    mask = rng.random((b, t, s)) < 0.8
    if t > 1:  # causal over the first t slots, the first rows left-padded by 0, 2, 4, ... tokens
        mask &= np.arange(s)[None, None, :] <= np.arange(t)[None, :, None]
        mask &= np.arange(s)[None, None, :] >= 2 * np.arange(b)[:, None, None]
    mask[0, :, : s // 3] = False
    if b > 1:
        mask[1] = False
        mask[1, :, s // 2] = True
    if b > 2:
        mask[2, 0] = False
    out = jax.jit(cpu_kernels.attention)(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask))
    assert out.shape == (b, t, h, d)
    np.testing.assert_allclose(np.asarray(out), _attention_numpy(q, k, v, mask), rtol=0, atol=1e-5)


def _training_attention_numpy(q, k, v, mask, g):
    """Float64 softmax attention and its gradients by the chain rule, loop by loop: q [b, t, h, d], k and v
    [b, s, kv, d], mask [b, t, s], the output's gradient g like q. Returns out, lse [b, t, h] (0 for a query with
    no unmasked slot, which averages all values), dq, dk, dv."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    q, k, v, g = (a.astype(np.float64) for a in (q, k, v, g))
    out, dq, lse = np.zeros_like(q), np.zeros_like(q), np.zeros((b, t, h))
    dk, dv = np.zeros_like(k), np.zeros_like(v)
    for i in range(b):
        for j in range(h):
            kk, vv = k[i, :, j // (h // kv)], v[i, :, j // (h // kv)]
            for u in range(t):
                m = mask[i, u]
                if m.any():
                    x = np.where(m, kk @ q[i, u, j] / np.sqrt(d), -np.inf)
                    lse[i, u, j] = x.max() + np.log(np.exp(x - x.max()).sum())
                    p = np.exp(x - lse[i, u, j])
                else:
                    p = np.full(len(m), 1 / len(m))
                out[i, u, j] = p @ vv
                dv[i, :, j // (h // kv)] += np.outer(p, g[i, u, j])
                if m.any():  # d out / d scores, through the softmax; the empty row's scores are constants
                    dx = p * (vv @ g[i, u, j] - p @ (vv @ g[i, u, j])) / np.sqrt(d)
                    dq[i, u, j] = dx @ kk
                    dk[i, :, j // (h // kv)] += np.outer(dx, q[i, u, j])
    return out, lse, dq, dk, dv


@needs_kernel
@pytest.mark.parametrize("b,t,s,kv,g,d", [(2, 37, 37, 3, 3, 64), (1, 40, 72, 3, 3, 64), (3, 5, 9, 2, 2, 8),
                                          (2, 20, 20, 1, 4, 24), (1, 1, 7, 2, 1, 16)])
def test_training_attention_and_gradients_equal_numpy(b, t, s, kv, g, d):
    """Training's attention kernels (`attention.gqa_attention(kernel=True)`: `cpu_kernels.attention_train` and
    `attention_grad`) against float64 loops: output, log-sum-exp and the gradients of q, k and v, for causal masks
    over a prefix of keys (a window after SAMI's shared prompt) with random holes, a query with no unmasked slot,
    grouped and ungrouped heads, head dims that are and are not a multiple of 16, one query."""
    from sami_jax.models import attention

    assert cpu_kernels.load()
    rng = np.random.default_rng(b * 7 + t + s)
    q = rng.standard_normal((b, t, kv * g, d), dtype=np.float32)
    k, v = (rng.standard_normal((b, s, kv, d), dtype=np.float32) for _ in range(2))
    mask = (rng.random((b, t, s)) < 0.7) & (np.arange(s)[None, None, :] <= np.arange(t)[None, :, None] + s - t)
    mask[0, 0] = False
    cot = rng.standard_normal(q.shape, dtype=np.float32)
    ref = _training_attention_numpy(q, k, v, mask, cot)
    _, lse = cpu_kernels.attention_train(jnp.asarray(q).reshape(b, t, kv, g, d), k, v, jnp.asarray(mask))
    out, vjp = jax.vjp(lambda q, k, v: attention.gqa_attention(q, k, v, jnp.asarray(mask), kernel=True), q, k, v)
    for name, ours, want in zip(["out", "lse", "dq", "dk", "dv"], [out, lse.reshape(b, t, kv * g), *vjp(cot)], ref,
                                strict=True):
        np.testing.assert_allclose(np.asarray(ours), want, rtol=0, atol=2e-5 * max(1.0, np.abs(want).max()),
                                   err_msg=name)


@needs_kernel
def test_training_attention_rejects_mismatched_shapes():
    """The error names the target and every operand's shape."""
    assert cpu_kernels.load()
    q, k, mask = jnp.ones((1, 4, 2, 3, 8)), jnp.ones((1, 5, 3, 8)), jnp.ones((1, 4, 5), bool)  # 3 KV heads, not 2
    want = r"sami_attention_train: want q .* got q \[1, 4, 2, 3, 8\], k \[1, 5, 3, 8\], v \[1, 5, 3, 8\], mask"
    with pytest.raises(Exception, match=want):
        jax.block_until_ready(cpu_kernels.attention_train(q, k, k, mask))


def _top_p_threshold_numpy(p, top_p):
    """The smallest probability whose larger ones sum (in float64, in sorted order) below top_p, with its own
    it reaches top_p; 0 if the whole row stays below."""
    out = []
    for row in p:
        srt = np.sort(row.astype(np.float64))[::-1]
        reached = np.nonzero(np.cumsum(srt) >= top_p)[0]
        out.append(np.float32(srt[reached[0]]) if len(reached) else np.float32(0))
    return np.asarray(out, np.float32)


@needs_kernel
@pytest.mark.parametrize("v", [8, 300, 49152])
@pytest.mark.parametrize("top_p", [1e-3, 0.5, 0.9, 0.999])
def test_top_p_threshold_equals_numpy(v, top_p):
    """Peaked, flat and uniform rows, a one-hot row and a row of exact ties."""
    assert cpu_kernels.load()
    rng = np.random.default_rng(v)
    logits = np.concatenate([rng.normal(0, s, (3, v)) for s in (0.05, 2.0, 8.0)] + [np.zeros((1, v))])
    p = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1))
    p = np.concatenate([p, np.eye(1, v, 3, dtype=np.float32), np.full((1, v), 1.0 / v, np.float32)])
    bits = jax.jit(cpu_kernels.top_p_threshold, static_argnums=1)(jnp.asarray(p), top_p)
    assert bits.shape == (len(p), 1) and bits.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(bits)[:, 0].view(np.float32), _top_p_threshold_numpy(p, top_p))


@needs_kernel
def test_top_p_threshold_skips_nan():
    """A NaN probability (from NaN logits) is left out of the sums and the sort instead of corrupting them."""
    assert cpu_kernels.load()
    p = np.array(jax.nn.softmax(jnp.asarray(np.random.default_rng(0).normal(0, 2, (2, 300)), jnp.float32)))
    p[0, 7] = np.nan
    p[1, :] = np.nan
    bits = np.asarray(jax.jit(cpu_kernels.top_p_threshold, static_argnums=1)(jnp.asarray(p), 0.9))[:, 0]
    assert bits.view(np.float32)[0] == _top_p_threshold_numpy(np.nan_to_num(p[:1], nan=0.0), 0.9)[0]
    assert bits.view(np.float32)[1] == 0.0  # nothing but NaN: nothing reaches top_p, so all are kept
