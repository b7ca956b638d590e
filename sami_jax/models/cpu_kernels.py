"""The sampler's float32 CPU kernels (`cpu_kernels.cc`): a matmul on weights stored as panels (float32, or
GGUF-quantized weights as 8-bit blocks), attention over the KV cache, top-p's threshold search and argmax.

XLA's CPU GEMM repacks each weight panel before it uses it, so the products of a decode step (16 rows
against a [576, 3072] weight) stream the weights at about a third of the machine's memory rate. The
panel matmul keeps the weights packed once, as panels [ceil(N / 16), K, 16], and reads them straight
from memory; `split_layers(panels=True)` stores the sampler's weights that way. Where the CPU has AMX, products
of more than 16 rows (a prefill's) run on its bf16 tiles with each float32 split exactly into three bf16 pieces,
to float32's accuracy (`amx`; about 1.4x the float32 tile's rate in the model). Attention over the KV
cache (a decode step's one query per row over a few hundred slots, or a prefill's causal prompt) is a
handful of small XLA fusions and transposes per layer; the kernel runs it as one loop per (row, KV head)
that reads only each query's unmasked slots. `forward_cached` uses it where the weights are panels, and
the sampler's top-p then finds its threshold with `top_p_threshold` (a mass histogram over the float bits
and one bucket sorted, where XLA makes 31 passes over the vocabulary) and greedy decoding its tokens with
`argmax` (one pass of 16 lanes, where XLA's variadic reduce took about 1 ms a step at 16 x 49,152).

The kernels are XLA FFI handlers compiled on first use with the machine's C++ compiler ($CXX, else g++ or
c++; `-O3 -march=native`) against the installed jaxlib's FFI headers, and cached under
$SAMI_JAX_CACHE (default ~/.cache/sami_jax) by a hash of the source, the jaxlib version and the CPU.
SAMI_JAX_CPU_KERNELS selects: "auto" (the default) uses them on x86 CPUs with AVX-512, where the matmul
is measured faster than XLA's GEMM at every row count, and for training alone (its products and attention) on x86
CPUs with AVX2 but no AVX-512 (`training`); "1" wherever it builds; "0" never. Without a compiler, or if the build
fails, a warning names the cause and XLA's ops run instead.
Training's products (`dot`, `dot_nt`, `dot_tn`: x W, dy W^T and x^T dy, each operand read as XLA holds it) run on the
same AMX tiles where the CPU has them, and on a packed AVX2 GEMM where it has AVX2 but no AVX-512 (`training`):
`transformer._matmuls_kernel` gives them a custom VJP, and
`logprobs.vocab_logprobs` runs the vocabulary head's products on them. Training's attention has its own pair,
forward and backward (`attention_train`, `attention_grad`: per (row, KV head), each block of queries over the slots
from its first unmasked one to its last; with AVX-512 in register tiles of their own, with AVX2 on the packed GEMM),
behind `attention.gqa_attention(kernel=True)`. The other kernels are forward only.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

TARGET = "sami_panel_matmul"
ATTENTION_TARGET = "sami_attention"
TOP_P_TARGET = "sami_top_p_threshold"
BLOCK_TARGET = "sami_block_matmul"
ARGMAX_TARGET = "sami_argmax"
DENSE_TARGET = "sami_dense_matmul"
ATTENTION_TRAIN_TARGET = "sami_attention_train"
ATTENTION_GRAD_TARGET = "sami_attention_grad"
# The name that training's kernel outputs carry (`checkpoint_name`), which the dot remat policies keep as they keep
# XLA's dots (`transformer.REMAT_POLICIES`).
CPU_DOT = "cpu_dot"
WIDTH = 16  # output columns per panel
ONE_PASS_ROWS = 16  # products of more rows run on AMX tiles where the CPU has them (kOnePass)
BLOCK = 32  # inputs per block of a block-stored panel (`pack_blocks`)
BLOCK_BYTES = 2 * WIDTH * 4 + BLOCK * WIDTH  # its 16 columns' float32 scales and offsets, then int8 [32, 16]
_SOURCE = Path(__file__).with_name("cpu_kernels.cc")
_lib = None  # the loaded library (`load`), for `pack_blocks`


@functools.cache  # (read at every traced training product: `transformer._kernel_applies`)
def _cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return name
    return None


def _cache_dir() -> Path:
    return Path(os.environ.get("SAMI_JAX_CACHE") or Path.home() / ".cache" / "sami_jax") / "kernels"


def _build(cxx: str) -> Path:
    """The compiled library, built into the cache unless a build of the same source, jaxlib and CPU is there."""
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, jaxlib.__version__.encode(), cxx.encode(), platform.machine().encode(),
                                     " ".join(sorted(_cpu_flags())).encode()])).hexdigest()[:16]
    out = _cache_dir() / f"cpu_kernels-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # built aside, then renamed: safe for parallel builds
        part = Path(tmp) / out.name
        cmd = [cxx, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", f"-I{jax.ffi.include_dir()}",
               str(_SOURCE), "-o", str(part)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:  # the error lines first: the FFI headers' warnings can fill the output
            lines = run.stderr.strip().splitlines()
            errors = [line for line in lines if "error" in line.lower()][:20]
            raise RuntimeError(f"{' '.join(cmd)} failed:\n" + "\n".join(errors or lines[-30:]))
        os.replace(part, out)
    return out


@functools.cache
def load() -> bool:
    """Builds (or finds) the kernels and registers them with XLA; False, with a warning, where it cannot."""
    cxx = _compiler()
    if cxx is None:
        warnings.warn("sami_jax: no C++ compiler ($CXX, g++ or c++) to build the CPU kernels; "
                      "XLA's ops run instead (SAMI_JAX_CPU_KERNELS=0 silences this)", stacklevel=2)
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build(cxx)))
        for target in (TARGET, BLOCK_TARGET, DENSE_TARGET, ATTENTION_TARGET, ATTENTION_TRAIN_TARGET,
                       ATTENTION_GRAD_TARGET, TOP_P_TARGET, ARGMAX_TARGET):
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, target)), platform="cpu")
        lib.sami_pack_blocks.restype = lib.sami_amx.restype = lib.sami_fma_gemm.restype = ctypes.c_int
        lib.sami_amx(0 if os.environ.get("SAMI_JAX_AMX", "auto").strip().lower() == "0" else 1)
    except (OSError, RuntimeError, AttributeError) as e:
        warnings.warn(f"sami_jax: the CPU kernels did not build or load, XLA's ops run instead: {e}",
                      stacklevel=2)
        return False
    global _lib
    _lib = lib
    return True


def _mode() -> str:
    mode = os.environ.get("SAMI_JAX_CPU_KERNELS", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"SAMI_JAX_CPU_KERNELS={mode!r}: want auto, 0 or 1")
    return mode


def enabled() -> bool:
    """Whether the sampler should use the kernels on this machine (SAMI_JAX_CPU_KERNELS, see the module doc)."""
    mode = _mode()
    if mode == "0" or (mode == "auto" and "avx512f" not in _cpu_flags()):
        return False
    return load()


def training() -> bool:
    """Whether training runs on the kernels: its dense products (`dot`, `dot_nt`, `dot_tn`, behind
    `transformer._matmuls_kernel` and the vocabulary head) and its attention (`attention_train`, `attention_grad`).
    On AMX tiles where `enabled()` and `amx()` hold; on the packed AVX2 GEMM (`fma::product` and `fma::attend_train`
    in cpu_kernels.cc) where the CPU has AVX2 and FMA but no AVX-512, also under "auto" (on a 2-core AMD EPYC a
    SmolLM2 layer's products took 0.91 the time of XLA's dots, session 36, and a SAMI micro-batch's attention,
    forward and backward, 0.80, session 37). SAMI_JAX_CPU_KERNELS=0 turns both off. Read when training is traced."""
    flags = _cpu_flags()
    if "avx512f" in flags or not {"avx2", "fma"} <= flags:
        return enabled() and amx()
    return _mode() != "0" and load() and bool(_lib.sami_fma_gemm())


def amx(on: bool | None = None) -> bool:
    """Whether products of more than 16 rows run on AMX tiles (see `cpu_kernels.cc`: float32 results from six
    exact bf16 piece products), switched on or off first if `on` is given; False where the CPU, the kernel build
    or the OS has no AMX. On by default where it can be; SAMI_JAX_AMX=0 turns it off. Needs `load()`. Training's
    products (`transformer._matmuls_kernel`) choose AMX when they are traced: a jitted function already traced
    keeps its choice until `jax.clear_caches()`."""
    return bool(_lib.sami_amx(-1 if on is None else int(on)))


def pack(w_nk: jax.Array) -> jax.Array:
    """A weight [N, K] ([out, in]) as panels [ceil(N / 16), K, 16], zero beyond N."""
    n, k = w_nk.shape
    p = -(-n // WIDTH)
    w = jnp.pad(w_nk, ((0, p * WIDTH - n), (0, 0)))
    return w.reshape(p, WIDTH, k).transpose(0, 2, 1)


def matmul(x_rk: jax.Array, panels: jax.Array, n: int) -> jax.Array:
    """x [R, K] float32 times W^T, for the [n, K] weight W that `pack` made `panels` (float32) or `pack_blocks`
    stored as blocks (uint8; the same output bits): [R, n] float32. Needs `load()` to have succeeded; CPU only."""
    target = BLOCK_TARGET if panels.dtype == jnp.uint8 else TARGET
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((x_rk.shape[0], n), jnp.float32))(x_rk, panels)


def _dense(x: jax.Array, w: jax.Array, index, rows: int, cols: int, transpose_x: bool, transpose_w: bool) -> jax.Array:
    index = jnp.asarray(0 if index is None else index, jnp.int32)
    return jax.ffi.ffi_call(DENSE_TARGET, jax.ShapeDtypeStruct((rows, cols), jnp.float32))(
        x, w, index, transpose_x=transpose_x, transpose_w=transpose_w)


def dot(x_rk: jax.Array, w_kn: jax.Array, index: jax.Array | int | None = None) -> jax.Array:
    """x [R, K] @ w [K, N], both float32: [R, N] float32. Training's products, whose weights change at every step:
    on AMX each operand's tiles are formed from it as it is, with no packed copy of w. With `index`, w is a stack
    [L, K, N] and the product is with w[index], read in place (a layer scan's weights, which XLA would copy out of the
    stack for the call). Needs `load()`; CPU only."""
    return _dense(x_rk, w_kn, index, x_rk.shape[0], w_kn.shape[-1], False, False)


def dot_nt(x_rk: jax.Array, w_nk: jax.Array, index: jax.Array | int | None = None) -> jax.Array:
    """x [R, K] @ w [N, K]^T, both float32: [R, N] float32 (`dot` with w read transposed, e.g. dy W^T; with `index`,
    w is a stack [L, N, K])."""
    return _dense(x_rk, w_nk, index, x_rk.shape[0], w_nk.shape[-2], False, True)


def dot_tn(x_dm: jax.Array, y_dn: jax.Array) -> jax.Array:
    """x [D, M]^T @ y [D, N], both float32: [M, N] float32, a weight's gradient x^T dy over D tokens (`dot` with x
    read transposed)."""
    return _dense(x_dm, y_dn, None, x_dm.shape[1], y_dn.shape[1], True, False)


def pack_blocks(panels) -> np.ndarray | None:
    """Float32 panels [P, K, 16] (`pack`) stored as blocks for `matmul`, where every weight is exactly
    (q * d) + m in float32 for an 8-bit integer q and, per column and 32 consecutive inputs, a scale d and an
    offset m: what GGUF's Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 weights dequantize to (a float16 d, and m = 0 or a
    float16 m). uint8 [P, K / 32 * 640] (per block: d [16] and m [16] float32, then q [32, 16] int8), 1.25
    bytes a weight; None if K is not a multiple of 32 or some weight is not of that form (found at the first
    such block: trained weights cost next to nothing). Each block is checked by rebuilding its weights as the
    kernel does, so `matmul` then gives the same bits as with the float32 panels. Needs `load()`."""
    w = np.ascontiguousarray(np.asarray(panels, np.float32))
    p, k, width = w.shape
    if k % BLOCK or width != WIDTH or _lib is None:
        return None
    out = np.empty((p, k // BLOCK * BLOCK_BYTES), np.uint8)
    ok = _lib.sami_pack_blocks(w.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(p), ctypes.c_int64(k),
                               out.ctypes.data_as(ctypes.c_void_p))
    return out if ok else None


def attention(q_bthd: jax.Array, k_bksd: jax.Array, v_bksd: jax.Array, mask_bts: jax.Array) -> jax.Array:
    """`attention.gqa_attention_bksd` in float32 over keys and values in the KV cache's layout: q [b, t, h, d],
    keys and values [b, kv_heads, s, d], mask [b, t, s] (True: attend). Returns [b, t, h, d] float32. Each query
    reads only its unmasked slots; one with none (padding) gets the mean of all s values, as the masked softmax
    gives. Needs `load()` to have succeeded; CPU only."""
    b, t, h, d = q_bthd.shape
    kv_heads = k_bksd.shape[1]
    shape = (b, t, kv_heads, h // kv_heads, d)
    out = jax.ffi.ffi_call(ATTENTION_TARGET, jax.ShapeDtypeStruct(shape, jnp.float32))(
        q_bthd.astype(jnp.float32).reshape(shape), k_bksd, v_bksd, mask_bts.astype(bool))
    return out.reshape(b, t, h, d)


def attention_train(q_btkgd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array,
                    mask_bts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Training's attention (`attention.gqa_attention` in float32) with the keys and values as the projections give
    them: q [b, t, kv_heads, g, d], k and v [b, s, kv_heads, d], mask [b, t, s] (True: attend). Returns the output
    [b, t, kv_heads, g, d] and each query's log-sum-exp of its scaled scores [b, t, kv_heads, g] (0 for a query with
    no unmasked slot, whose output is the mean of all s values), which `attention_grad` takes. Needs `load()`."""
    out = (jax.ShapeDtypeStruct(q_btkgd.shape, jnp.float32), jax.ShapeDtypeStruct(q_btkgd.shape[:4], jnp.float32))
    return jax.ffi.ffi_call(ATTENTION_TRAIN_TARGET, out)(q_btkgd, k_bskd, v_bskd, mask_bts.astype(bool))


def attention_grad(q_btkgd, k_bskd, v_bskd, mask_bts, out_btkgd, lse_btkg, dout_btkgd):
    """The gradients (dq, dk, dv), shaped as q, k and v, of `attention_train`'s output for its inputs, its output
    and log-sum-exp, and the output's gradient dout. Needs `load()`; CPU only."""
    shapes = (jax.ShapeDtypeStruct(q_btkgd.shape, jnp.float32), jax.ShapeDtypeStruct(k_bskd.shape, jnp.float32),
              jax.ShapeDtypeStruct(v_bskd.shape, jnp.float32))
    return jax.ffi.ffi_call(ATTENTION_GRAD_TARGET, shapes)(q_btkgd, k_bskd, v_bskd, mask_bts.astype(bool), out_btkgd,
                                                           lse_btkg, dout_btkgd)


def top_p_threshold(probs_bv: jax.Array, top_p: float) -> jax.Array:
    """Each row's top-p threshold as float32 bits [b, 1] int32 (`sampling._top_p_keep`'s `lo`: the nucleus is
    the probabilities whose bits are >= it) for probabilities [b, v] float32. Needs `load()`; CPU only."""
    return jax.ffi.ffi_call(TOP_P_TARGET, jax.ShapeDtypeStruct((probs_bv.shape[0], 1), jnp.int32))(
        probs_bv.astype(jnp.float32), top_p=np.float32(top_p))


def argmax(x_bv: jax.Array) -> jax.Array:
    """Each row's index of its largest value, [b] int32, for x [b, v] float32: the first one, or the first NaN's
    (as `jnp.argmax`). Needs `load()`; CPU only."""
    return jax.ffi.ffi_call(ARGMAX_TARGET, jax.ShapeDtypeStruct(x_bv.shape[:1], jnp.int32))(x_bv.astype(jnp.float32))
