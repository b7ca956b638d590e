"""Batched generation with a KV cache: one jitted prefill, then jitted chunks of `lax.scan` decode steps.

Prompts are left-padded to a length bucket, so a run compiles once per (bucket, batch) rather than once
per batch; every row shares the cache slots, and RoPE positions are counted per row over real tokens.
Between chunks the host looks for stop strings (text-level, so they cannot be matched on device) and
stops as soon as every row is done; the cache and the rest of the state are donated to each chunk.

Sampling follows HF's order: temperature, then top-k, then top-p (HF's TopKLogitsWarper and
TopPLogitsWarper kept sets, up to exact ties at the top-p threshold); temperature 0 is greedy. Weights and
KV cache are per-layer buffers by default (see `Sampler`). Per-token log-probs, on request, are under
the model's own distribution (temperature 1, no truncation), which is what SAMI scores.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from sami_jax.distributed import global_array, host_array
from sami_jax.models import cpu_kernels
from sami_jax.models.config import ModelConfig
from sami_jax.models.transformer import KVCache, forward_cached, positions_from_mask, split_layers, uses_cpu_kernels
from sami_jax.sharding import Sharder

DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 = greedy; top_k 0 = off; top_p 1 = off."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int = 0
    logprobs: bool = False

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")


@dataclasses.dataclass
class Generation:
    """One row's result. token_ids exclude the EOS and anything after a stop string's last token;
    text is cut before the stop string. finish_reason: "eos", "stop" or "length"."""

    prompt: str | None
    text: str
    token_ids: list[int]
    length: int
    finish_reason: str
    logprobs: list[float] | None = None
    prompt_tokens_dropped: int = 0  # left-truncated prompt tokens (truncate=True only)


def process_logits(logits_bv: jax.Array, temperature: float, top_k: int, top_p: float,
                   cpu_kernel: bool = False) -> jax.Array:
    """Tempered logits with the tokens outside top-k / top-p set to -inf (HF's warpers, same order).
    cpu_kernel: find the top-p threshold with `cpu_kernels.top_p_threshold` (loaded; one CPU device)."""
    x = logits_bv.astype(jnp.float32) / temperature
    if top_k > 0:
        kth = jax.lax.top_k(x, min(top_k, x.shape[-1]))[0][..., -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    if top_p < 1.0:
        x = jnp.where(_top_p_keep(x, top_p, cpu_kernel), x, -jnp.inf)
    return x


def _top_p_keep(x_bv: jax.Array, top_p: float, cpu_kernel: bool = False) -> jax.Array:
    """HF's nucleus rule without sorting the vocabulary. A token is kept iff the mass of the tokens more
    likely than it, G(its probability), is < top_p; G only falls as the probability rises, so the kept set
    is every token at or above the smallest probability v with G(v) < top_p. Non-negative float32 values
    order as their bit patterns do, so 31 halvings of [0, 1.0]'s bit range find v exactly, each a masked sum
    over the vocabulary (8 ms at batch 16 x 49,152 on the 2-core AMD CPU; a full sort took 270). Exact ties at
    the threshold are all kept, where HF keeps the ones its sort happens to place last. cpu_kernel: the same
    threshold from a C++ bucket search (`cpu_kernels.top_p_threshold`: 12 -> 2.3 ms at batch 16 x 49,152 with
    the softmax, on the AVX-512 2-core CPU; sums in float64, so a row of thousands of nearly equal
    probabilities can keep one token more or less than the float32 search)."""
    probs = jax.nn.softmax(x_bv, axis=-1)
    bits = jax.lax.bitcast_convert_type(probs, jnp.int32)
    if cpu_kernel:
        return bits >= cpu_kernels.top_p_threshold(probs, top_p)

    def halve(_, bounds):
        lo, hi = bounds  # the answer lies in [lo, hi]; G(hi) < top_p
        mid = lo + (hi - lo) // 2
        # Compared as floats, in the same order as their bits (the search: 13 -> 8 ms on the 2-core CPU). mid stays
        # far above the subnormals (v >= (1 - top_p) / vocab), so flushing them to zero changes nothing.
        above = probs > jax.lax.bitcast_convert_type(mid, jnp.float32)
        below = jnp.sum(jnp.where(above, probs, 0.0), axis=-1, keepdims=True) < top_p
        return jnp.where(below, lo, mid + 1), jnp.where(below, mid, hi)

    b = probs.shape[0]
    one = np.float32(1.0).view(np.int32)
    lo, _ = jax.lax.fori_loop(0, 31, halve, (jnp.zeros((b, 1), jnp.int32), jnp.full((b, 1), one, jnp.int32)))
    return bits >= lo


def _draw(key: jax.Array, x_bv: jax.Array) -> jax.Array:
    """One token per row from softmax(x) by inverting its CDF with one uniform per row (a Gumbel draw needs
    a random number per vocabulary entry: 25 ms a step at batch 16 on the 2-core CPU, against 5)."""
    probs = jax.nn.softmax(x_bv.astype(jnp.float32), axis=-1)
    cdf = jnp.cumsum(probs, axis=-1)
    u = jax.random.uniform(key, (probs.shape[0], 1)) * cdf[:, -1:]
    idx = jnp.sum(cdf <= u, axis=-1)
    # Rounding can put u at the very top of the CDF: stay on the last token that has probability.
    last = probs.shape[-1] - 1 - jnp.argmax(probs[:, ::-1] > 0, axis=-1)
    return jnp.minimum(idx, last).astype(jnp.int32)


def pick_tokens(key: jax.Array, logits_bv: jax.Array, sp: SamplingParams, cpu_kernel: bool = False) -> jax.Array:
    if sp.temperature == 0:
        if cpu_kernel:
            return cpu_kernels.argmax(logits_bv)
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    return _draw(key, process_logits(logits_bv, sp.temperature, sp.top_k, sp.top_p, cpu_kernel))


@flax.struct.dataclass
class _State:
    cache: KVCache
    out: jax.Array  # [b, n] generated tokens
    logprobs: jax.Array  # [b, n] (zeros unless requested)
    done: jax.Array  # [b] bool
    pos: jax.Array  # [b] next RoPE position
    step: jax.Array  # () tokens generated so far
    key: jax.Array


class Sampler:
    """Generates from a model (anything with .params, .config, .tokenizer and optionally .sharder).

        sampler = Sampler(model)
        results = sampler.generate(["Human: hi\\n\\nAssistant:"], SamplingParams(max_new_tokens=64))

    Compile time is kept apart from run time in `self.stats` (seconds, tokens).

    per_layer: run on a copy of the weights and a KV cache with one buffer per layer, looping over the layers
    (models/transformer.split_layers: XLA otherwise copies each layer's weights out of the stacked arrays at
    every decode step), at the cost of that copy's memory while the sampler holds it (`release` drops it)
    and a longer compile. None: on, except on TPUs, where the layer scan stays (XLA's TPU backend can fuse
    the slice into the matmul; not measured here).
    out_in: the per-layer copy also stores the projections and the vocab projection [out, in], with q/k/v
    and gate/up each fused into one weight where unsharded (`split_layers(out_in=True)`): XLA's CPU GEMM
    multiplies the few rows of a decode step faster that way round, and on an H100 the fused weights made
    a 1.1B model's top-p run 3% faster in an A/B run. None: whenever per_layer.
    panels: the out_in weights packed for the CPU panel matmul (`models/cpu_kernels`, `split_layers(panels=True)`),
    which streams a decode step's weights about 1.7x faster than XLA's CPU GEMM at 16 rows and matches it on
    a prefill; weights whose values are exactly GGUF-dequantized ones go as 8-bit blocks (the same output
    bits, 3.2x fewer bytes a step). None: with out_in, on float32 params held by one CPU device, where
    `cpu_kernels.enabled()`. With panels, attention (prefill and decode), top-p's threshold search and greedy's
    argmax run through `cpu_kernels` too.
    prefill_attention: how the prompt tokens attend among themselves (`forward_cached`): "einsum", or flash
    attention, "cudnn" or "xla". None: "cudnn" on a GPU with bf16/fp16 weights (the einsum stores float32
    scores, [256, 32, 256, 256] per layer for 256 prompts of 256 tokens: about 92 of a 305 ms prefill on an
    H100), else "einsum".
    """

    def __init__(self, model, buckets: Sequence[int] = DEFAULT_BUCKETS, chunk: int = 16,
                 per_layer: bool | None = None, out_in: bool | None = None, panels: bool | None = None,
                 prefill_attention: str | None = None):
        self.params = model.params
        self.config: ModelConfig = model.config
        self.tokenizer = model.tokenizer
        self.sharder: Sharder | None = getattr(model, "sharder", None)
        self.buckets = tuple(sorted(buckets))
        self.chunk = chunk
        self.per_layer = jax.default_backend() != "tpu" if per_layer is None else per_layer
        self.out_in = self.per_layer if out_in is None else out_in
        if panels and not self.per_layer:
            raise ValueError("Sampler(panels=True) needs per-layer weights (per_layer=True)")
        self.panels = panels
        self.prefill_attention = prefill_attention
        self._compiled: dict = {}
        self.stats = {"compile_s": 0.0, "run_s": 0.0, "new_tokens": 0, "compiles": 0}

    @property
    def params(self):
        return self._params

    @params.setter
    def params(self, params):
        self._params, self._run_params = params, None

    def release(self) -> None:
        """Drops the per-layer copy of the weights (made again by the next `generate`)."""
        self._run_params = None

    def run_params(self):
        """The params the jitted functions take: `params`, split per layer when `per_layer`."""
        if self._run_params is None:
            self._run_params = self._params
            if self.per_layer:
                self._run_params = split_layers(self._params, out_in=self.out_in, panels=self._use_panels())
        return self._run_params

    def _use_panels(self) -> bool:
        leaves = jax.tree.leaves(self._params)
        devices = {d for a in leaves for d in a.devices()}
        fits = (self.out_in and len(devices) == 1 and next(iter(devices)).platform == "cpu"
                and all(a.dtype == jnp.float32 for a in leaves if jnp.issubdtype(a.dtype, jnp.floating)))
        if self.panels is None:
            return fits and cpu_kernels.enabled()
        if self.panels and not fits:
            raise ValueError("Sampler(panels=True) needs per-layer out_in weights, float32 on one CPU device")
        if self.panels and not cpu_kernels.load():
            raise RuntimeError("Sampler(panels=True): the CPU kernels did not build (see the warning)")
        return self.panels

    # ------------------------------------------------------------------------------------------ compile
    def _fn(self, key: tuple, make: Callable, *args):
        """The executable for `key` (settings and shapes) and the params' layout (args[0]: new `params` may be
        stored otherwise, e.g. float32 panels after 8-bit blocks once training has changed the weights),
        lowered and compiled once and timed apart."""
        key = (*key, jax.tree.structure(args[0]), tuple((a.shape, a.dtype) for a in jax.tree.leaves(args[0])))
        if key not in self._compiled:
            start = time.perf_counter()
            self._compiled[key] = make().lower(*args).compile()
            self.stats["compile_s"] += time.perf_counter() - start
            self.stats["compiles"] += 1
        return self._compiled[key]

    def _prefill_fn(self, sp: SamplingParams, total_len: int):
        config, sharder = self.config, self.sharder

        def prefill(params, tokens, mask, key):
            b, p = tokens.shape
            cache = KVCache.create(config, b, total_len, params["embed_tokens"].dtype, sharder,
                                   per_layer=isinstance(params["layers"], tuple))
            positions = positions_from_mask(mask)
            impl = self.prefill_attention
            if impl is None:
                low = params["embed_tokens"].dtype in (jnp.bfloat16, jnp.float16)
                impl = "cudnn" if low and jax.default_backend() == "gpu" else "einsum"
            logits, cache = forward_cached(params, tokens, config, cache, jnp.int32(0), positions_bt=positions,
                                           mask_bt=mask, sharder=sharder, last_only=True, fresh=True,
                                           prefill_attention=impl)
            key, sub = jax.random.split(key)
            last = logits[:, -1]
            tok = pick_tokens(sub, last, sp, uses_cpu_kernels(params))
            n = total_len - p + 1
            out = jnp.zeros((b, n), jnp.int32).at[:, 0].set(tok)
            lp = jnp.zeros((b, n), jnp.float32)
            if sp.logprobs:
                lp = lp.at[:, 0].set(jnp.take_along_axis(jax.nn.log_softmax(last), tok[:, None], -1)[:, 0])
            done = ~mask.any(axis=1)  # padding rows of a short batch are done from the start
            return _State(cache=cache, out=out, logprobs=lp, done=done, pos=positions[:, -1] + 1,
                          step=jnp.int32(1), key=key)

        return jax.jit(prefill)

    def _chunk_fn(self, sp: SamplingParams, prompt_len: int, eos: tuple[int, ...]):
        config, sharder, chunk = self.config, self.sharder, self.chunk
        eos_arr = np.asarray(eos, np.int32)

        def last_tokens(state: _State) -> jax.Array:  # [b, 1]: the newest token of each row
            return jax.lax.dynamic_slice_in_dim(state.out, state.step - 1, 1, axis=1)

        def run(params, state):
            def one(state: _State, _):
                prev = last_tokens(state)
                logits, cache = forward_cached(
                    params, prev, config, state.cache, prompt_len + state.step - 1, positions_bt=state.pos[:, None],
                    mask_bt=jnp.ones_like(prev, bool), sharder=sharder)
                key, sub = jax.random.split(state.key)
                tok = pick_tokens(sub, logits[:, 0], sp, uses_cpu_kernels(params))
                # A row that is done writes zeros (never read: outputs are cut at the EOS / stop).
                done = state.done | jnp.isin(prev[:, 0], eos_arr)
                out = jax.lax.dynamic_update_slice(state.out, jnp.where(done, 0, tok)[:, None], (0, state.step))
                lp = state.logprobs
                if sp.logprobs:
                    new_lp = jnp.take_along_axis(jax.nn.log_softmax(logits[:, 0]), tok[:, None], -1)
                    lp = jax.lax.dynamic_update_slice(lp, new_lp, (0, state.step))
                return _State(cache=cache, out=out, logprobs=lp, done=done, pos=state.pos + 1,
                              step=state.step + 1, key=key), None

            state, _ = jax.lax.scan(one, state, None, length=chunk)
            # Rows whose newest token is an EOS are done too, so the host can stop as soon as all are.
            return state.replace(done=state.done | jnp.isin(last_tokens(state)[:, 0], eos_arr))

        return jax.jit(run, donate_argnums=1)

    # ------------------------------------------------------------------------------------------ generate
    def encode_prompts(self, prompts, truncate: bool = False, add_bos: bool | None = None):
        """Token ids per prompt (strings are encoded; lists of ids pass through), checked for length."""
        tok = self.tokenizer
        add_bos = tok.add_bos_default if add_bos is None and tok is not None else bool(add_bos)
        rows, dropped = [], []
        limit = min(self.config.max_position_embeddings, self.buckets[-1])
        for i, p in enumerate(prompts):
            ids = list(p) if not isinstance(p, str) else tok.encode(p, add_bos=add_bos)
            if not ids:
                raise ValueError(f"prompt {i} is empty")
            cut = 0
            if len(ids) > limit:
                if not truncate:
                    raise ValueError(f"prompt {i} has {len(ids)} tokens, more than the maximum {limit} "
                                     "(pass truncate=True to keep its last tokens)")
                cut = len(ids) - limit
                ids = ids[cut:]
            rows.append(ids)
            dropped.append(cut)
        return rows, dropped

    def generate(self, prompts, sp: SamplingParams | None = None, batch_size: int | None = None,
                 truncate: bool = False, eos_ids: Sequence[int] | None = None,
                 progress: Callable[[int], None] | None = None) -> list[Generation]:
        """Generations for `prompts` (strings or token-id lists), in input order, batch_size at a time."""
        sp = sp or SamplingParams()
        if self.tokenizer is None and (sp.stop or any(isinstance(p, str) for p in prompts)):
            raise ValueError("this model has no tokenizer: pass prompts as token ids, and no stop strings")
        rows, dropped = self.encode_prompts(prompts, truncate)
        if eos_ids is None:
            eos_ids = self.tokenizer.eos_ids if self.tokenizer is not None else self.config.eos_token_ids
        eos = tuple(int(e) for e in eos_ids)
        batch_size = batch_size or len(rows)
        results: list[Generation] = []
        key = jax.random.key(sp.seed)
        for lo in range(0, len(rows), batch_size):
            key, sub = jax.random.split(key)
            batch = rows[lo:lo + batch_size]
            results += self._generate_batch(batch, batch_size, sp, eos, sub)
            if progress is not None:
                progress(len(batch))
        for r, p, d in zip(results, prompts, dropped, strict=True):
            r.prompt = p if isinstance(p, str) else None
            r.prompt_tokens_dropped = d
        return results

    def _bucket(self, n: int) -> int:
        for b in self.buckets:
            if b >= n:
                return b
        raise ValueError(f"prompt of {n} tokens is longer than the largest bucket {self.buckets[-1]}")

    def _generate_batch(self, rows, batch_size: int, sp: SamplingParams, eos, key) -> list[Generation]:
        p = self._bucket(max(len(r) for r in rows))
        n_steps = -(-(sp.max_new_tokens - 1) // self.chunk) * self.chunk  # decode steps, a whole number of chunks
        total = p + n_steps
        tokens = np.zeros((batch_size, p), np.int32)
        mask = np.zeros((batch_size, p), bool)
        for i, r in enumerate(rows):
            tokens[i, p - len(r):], mask[i, p - len(r):] = r, True
        tokens, mask, key = self._input(tokens), self._input(mask), self._input(key)
        params = self.run_params()
        # Seed and stop strings do not change the compiled program.
        shape_key = (dataclasses.replace(sp, seed=0, stop=()), eos, batch_size, p, total)
        prefill = self._fn(("prefill", *shape_key), functools.partial(self._prefill_fn, sp, total),
                           params, tokens, mask, key)
        start = time.perf_counter()
        state = prefill(params, tokens, mask, key)
        chunk_fn = None
        while True:
            step = int(state.step)
            done = host_array(state.done).copy()
            if sp.stop and step > 1:
                out = host_array(state.out)[:, :step]
                for i in range(len(rows)):
                    if not done[i] and self._stop_index(out[i], sp.stop) is not None:
                        done[i] = True
                state = state.replace(done=global_array(done, state.done.sharding))
            if step >= sp.max_new_tokens or done[: len(rows)].all():
                break
            if chunk_fn is None:
                chunk_fn = self._fn(("chunk", *shape_key), functools.partial(self._chunk_fn, sp, p, eos),
                                    params, state)
            state = chunk_fn(params, state)
        out = host_array(state.out)
        lps = host_array(state.logprobs) if sp.logprobs else None
        self.stats["run_s"] += time.perf_counter() - start
        results = [self._finish(out[i, : min(step, sp.max_new_tokens)], lps, i, sp, eos) for i in range(len(rows))]
        self.stats["new_tokens"] += sum(r.length for r in results)
        return results

    def _input(self, x):
        """Host data (the same on every process) as an input of the jitted functions: replicated on the
        model's mesh, which may span several processes."""
        return jnp.asarray(x) if self.sharder is None else global_array(x, self.sharder.replicated())

    def _stop_index(self, ids, stops) -> int | None:
        text = self.tokenizer.decode(ids)
        hits = [text.find(s) for s in stops if s in text]
        return min(hits) if hits else None

    def _finish(self, ids: np.ndarray, lps, i: int, sp: SamplingParams, eos) -> Generation:
        ids = ids.tolist()
        reason = "length"
        for j, t in enumerate(ids):
            if t in eos:
                ids, reason = ids[:j], "eos"
                break
        text = self.tokenizer.decode(ids) if self.tokenizer is not None else ""
        if sp.stop and self.tokenizer is not None:
            cut = self._stop_index(ids, sp.stop)
            if cut is not None:
                # Keep the tokens up to the one that completes the stop string; the text ends before it.
                k = next(k for k in range(1, len(ids) + 1) if self._stop_index(ids[:k], sp.stop) is not None)
                ids, text, reason = ids[:k], text[:cut], "stop"
        return Generation(prompt=None, text=text, token_ids=ids, length=len(ids), finish_reason=reason,
                          logprobs=lps[i, : len(ids)].tolist() if lps is not None else None)
