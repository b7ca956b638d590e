"""Does a config fit a TPU slice? Compile its SAMI step and its sampler for the slice, on a CPU.

    python -m sami_jax.aot --config=configs/mistral_7b_hh.py --model=mistral-7b --topology=v5p:2x2x2 \\
        [--num-slices=2] [--json=plan.json] [--functions=sami_step,prefill,decode] [--config.train.remat=full]

libtpu (`pip install libtpu==0.0.42.1`, or jax[tpu]) describes the slice's chips without any TPU being
present; every function is lowered with abstract arguments (`jax.ShapeDtypeStruct`s carrying their
shardings on the config's mesh over those chips) and compiled by XLA:TPU, so no weight is allocated.
Compiled, in the config's shapes and dtypes:

  sami_step  one optimizer update (`sami.sami_step`): train.batch_size queries as micro-batches of
             train.micro_batch_size, 2 constitutions x 2 responses each, sequences of
             data.max_prompt_len + sampling.max_new_tokens rounded up to train.seq_multiple (the
             longest a run can meet), the vocab projection on the response window only; remat,
             param / compute dtypes and the optimizer from the config, buffers donated as in train.py.
  prefill    the sampler's prompt pass: sampling.batch_size prompts of the bucket that holds
             data.max_prompt_len tokens; it creates the KV cache.
  decode     one chunk (16 steps) of the sampler's decode loop over that cache (prompt bucket +
             max_new_tokens slots), as `sampling.Sampler` runs it; its state arrives sharded as the
             compiled prefill leaves it, so the prefill is compiled for it too.
The model's shape comes from --model (a `models.config.PRESETS` name or a model path), else from
config.model.path. A config whose mesh does not match the slice, or whose batches do not split over
it, fails as a run would (run_config.run_mesh), before anything compiles.

Per chip it prints the argument, temporary and output bytes (XLA's memory_analysis; donated inputs
that outputs reuse are counted once) against the chip's HBM, whether that fits, the FLOPs, the step
time they imply and the MFU. XLA:TPU refusing a program that overflows HBM counts as "does not fit",
with the bytes it reports.

Time estimate, per chip: max(FLOPs / peak bf16 FLOP/s, bytes accessed / HBM bandwidth), a roofline
that ignores collectives and overlap, so a lower bound. FLOPs and bytes are XLA's cost analysis of the
compiled per-chip program, which counts a while loop's body once; the layer scans, the micro-batch scan
and XLA:TPU's collective-matmul loops run their bodies many times, so each body is costed on its own
(the module re-rooted at it) and counted trip-count times, the trip counts read from the loop
conditions and counter steps in the HLO (`loop_corrected_costs`). Pallas kernels (custom calls, e.g.
`ragged_dot` on TPU) add the cost estimate they carry, as XLA:TPU does. MFU = the model's FLOPs by
`sami_jax.perf` (6 per parameter per token plus attention; for prefill and decode 2 per parameter per
token plus attention) / (chips x peak x estimated time).

Chip table (`CHIPS`): HBM per chip as the project fixed it (v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e
32 GiB); HBM bandwidth and peak bf16 FLOP/s from Google Cloud's TPU pages (cloud.google.com/tpu/docs/
v4, v5e, v5p, v6e): v4 1200 GB/s, 275 TFLOP/s; v5e 819 GB/s, 197 TFLOP/s; v5p 2765 GB/s, 459
TFLOP/s; v6e 1638 GB/s, 918 TFLOP/s (peaks via `perf.PEAK_BF16_FLOPS`).

JSON (--json): a list with one record per compiled function: {"function", "topology", "chips",
"bytes_per_chip", "hbm_bytes_per_chip", "fits", "flops" (per chip), "estimated_step_s", "mfu", ...}.
The exit status is 2 on bad input (the message says what to change), 1 when something does not fit.

libtpu is loaded with TPU_SKIP_MDS_QUERY=1 (no TPU VM metadata server to ask) and
ALLOW_MULTIPLE_LIBTPU_LOAD=1 (another jax process on the machine may hold libtpu's lock file).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import re
import sys
import types

import jax
import jax.numpy as jnp
import optax

from sami_jax.models.config import PRESETS, ModelConfig
from sami_jax.models.params import abstract_params
from sami_jax.optim import OptimConfig, make_optimizer
from sami_jax.perf import forward_flops_per_token, peak_flops, train_flops
from sami_jax.run_config import run_mesh
from sami_jax.sami import init_train_state, sami_step
from sami_jax.sampling import DEFAULT_BUCKETS, Sampler, SamplingParams
from sami_jax.sharding import Sharder, param_shardings

GiB = 1024**3
CONSTITUTIONS = 2  # constitutions (= responses) per query: the paper's C, as train.py pairs them
DECODE_CHUNK = 16  # decode steps per compiled chunk, as train.Runner builds its Sampler


@dataclasses.dataclass(frozen=True)
class Chip:
    hbm_bytes: int
    hbm_bytes_per_s: float
    chip_config: str | None  # libtpu's chip_config_name: "megacore" = one device per chip (2 TensorCores)


CHIPS = {
    "v4": Chip(32 * GiB, 1200e9, "megacore"),
    "v5e": Chip(16 * GiB, 819e9, None),
    "v5p": Chip(95 * GiB, 2765e9, "megacore"),
    "v6e": Chip(32 * GiB, 1638e9, None),
}
TOPOLOGY_FORMS = ("v4:AxBxC, v5e:AxB, v5p:AxBxC or v6e:AxB with the chip grid's sides, e.g. v4:2x2x2, v5e:2x2, "
                  "v5e:16x16, v5p:2x2x1, v5p:4x4x4, v6e:8x8 (a v5p-128 is v5p:4x4x4: 64 chips, 128 cores)")
FUNCTIONS = ("sami_step", "prefill", "decode")


class AOTError(ValueError):
    """Bad input to the planner (topology, config, model); the message says what to change."""


# ------------------------------------------------------------------------------------------------ topology
def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
    """("v5p", (4, 4, 4)) from "v5p:4x4x4"; AOTError naming the known forms otherwise."""
    m = re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+)*)", name.strip())
    dims = tuple(int(x) for x in m.group(2).split("x")) if m else ()
    if not m or len(dims) != (3 if m.group(1) in ("v4", "v5p") else 2) or min(dims) < 1:
        raise AOTError(f"unknown topology {name!r}; known forms: {TOPOLOGY_FORMS}")
    return m.group(1), dims


def topology_devices(name: str, num_slices: int = 1) -> list:
    """The compile-only devices of `num_slices` slices of topology `name` (one per chip), from libtpu."""
    generation, _ = parse_topology(name)
    if num_slices < 1:
        raise AOTError(f"--num-slices must be >= 1, got {num_slices}")
    if importlib.util.find_spec("libtpu") is None:
        raise AOTError("compiling for a TPU topology needs libtpu: pip install libtpu==0.0.42.1 (jax 0.10.x, "
                       "Linux x86_64, Python 3.11), or pip install 'jax[tpu]'")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no TPU VM metadata server to ask
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other jax processes may hold libtpu's lock
    from jax.experimental import topologies  # loads libtpu

    kwargs = {"num_slices": num_slices}
    if CHIPS[generation].chip_config:
        kwargs["chip_config_name"] = CHIPS[generation].chip_config
    try:
        topo = topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs)
    except jax.errors.JaxRuntimeError as e:
        raise AOTError(f"libtpu rejects topology {name!r} ({str(e).splitlines()[0]}); known forms: "
                       f"{TOPOLOGY_FORMS}") from None
    return list(topo.devices)


# ------------------------------------------------------------------------------------------------ model
def model_config_for(config, model: str | None):
    """The ModelConfig to plan for: `model` (a PRESETS name or a path: HF folder, config.json, .gguf,
    orbax model folder), else config.model.path; "random" builds the tiny shape of config.model.random
    with the vocabulary of config.model.tokenizer, as train.load_base_model does."""
    source = model or config.model.path
    if not source:
        raise AOTError(f"no model: pass --model=PRESET (one of {sorted(PRESETS)}) or a path to an HF folder, "
                       "or set --config.model.path")
    if source in PRESETS:
        return PRESETS[source]
    if source == "random":
        from sami_jax.tokenizer import load_tokenizer
        from sami_jax.train import _resolve_path

        tokenizer = load_tokenizer(_resolve_path(config.model.tokenizer))
        r = config.model.random
        return ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=r.hidden_size,
                           intermediate_size=r.intermediate_size, num_layers=r.num_layers, num_heads=r.num_heads,
                           num_kv_heads=r.num_kv_heads, head_dim=r.head_dim,
                           max_position_embeddings=r.max_position_embeddings,
                           tie_word_embeddings=r.tie_word_embeddings, bos_token_id=tokenizer.bos_id,
                           eos_token_ids=tuple(tokenizer.eos_ids), pad_token_id=tokenizer.pad_id)
    path = pathlib.Path(source)
    if path.suffix == ".gguf" and path.is_file():
        from sami_jax.checkpoints.gguf import GGUFSource

        return ModelConfig.from_hf(GGUFSource(path).hf_config(), source=str(path))
    json_path = path / "config.json" if path.is_dir() else path
    if not json_path.is_file():
        raise AOTError(f"{source}: not a preset ({sorted(PRESETS)}) nor an HF / orbax folder, config.json or .gguf")
    return ModelConfig.from_file(json_path)


# ------------------------------------------------------------------------------------------------ inputs
def _with_sharding(x, sharding):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def abstract_train_state(model_config, optim, sharder, dtype):
    """sami.TrainState of ShapeDtypeStructs: params (dtype) and optimizer state (float32) on the rules'
    shardings, step counters replicated. Also a restore target that allocates nothing."""
    shardings = param_shardings(model_config, sharder)
    params = abstract_params(model_config, dtype, shardings)
    state = jax.eval_shape(lambda p: init_train_state(p, optim), params)
    replicated = sharder.replicated()
    opt_state = optax.tree_utils.tree_map_params(make_optimizer(optim), _with_sharding, state.opt_state, shardings,
                                                 transform_non_params=lambda x: _with_sharding(x, replicated))
    return state.replace(step=_with_sharding(state.step, replicated), params=params, opt_state=opt_state)


@dataclasses.dataclass
class Plan:
    """What one config compiles to on one mesh: the shapes train.py and the sampler will use."""

    config: object  # the run config (ml_collections.ConfigDict)
    model: ModelConfig
    sharder: Sharder
    seq_len: int  # tokens per training sequence
    response_len: int  # the vocab projection window of the step
    prompt_window: int  # the step's prompt slots when prompts are shared
    prompt_len: int  # the sampler's prompt bucket
    cache_len: int  # KV-cache slots: prompt bucket + decode steps


def make_plan(config, model_config, devices) -> Plan:
    """The run's mesh over `devices` (checked as a run checks it) and the longest shapes the run can meet."""
    if config.train.batch_size % config.train.micro_batch_size:
        raise AOTError(f"config.train.batch_size ({config.train.batch_size}) must be a multiple of "
                       f"micro_batch_size ({config.train.micro_batch_size})")
    mesh = run_mesh(config, devices)
    eos = int(config.train.keep_eos)
    response = config.sampling.max_new_tokens + eos
    m = config.train.seq_multiple
    seq_len = -(-(config.data.max_prompt_len + response) // m) * m
    prompt_len = next((b for b in DEFAULT_BUCKETS if b >= config.data.max_prompt_len), None)
    if prompt_len is None:
        raise AOTError(f"config.data.max_prompt_len={config.data.max_prompt_len} exceeds the sampler's largest "
                       f"prompt bucket {DEFAULT_BUCKETS[-1]}")
    steps = -(-(config.sampling.max_new_tokens - 1) // DECODE_CHUNK) * DECODE_CHUNK
    return Plan(config, model_config, Sharder.create(mesh), seq_len, -(-response // 16) * 16,
                min(-(-config.data.max_prompt_len // 16) * 16, seq_len), prompt_len, prompt_len + steps)


def _compute_dtype(config):
    compute = config.model.compute_dtype
    return jnp.dtype(compute) if compute and compute != config.model.param_dtype else None


def lower_sami_step(plan: Plan):
    """(lowered sami_step, analytic model FLOPs) for one optimizer update of the plan's shapes; the FLOPs of
    the program as it runs (packed rows when prompts are shared), not of the pairs."""
    cfg = plan.config
    optim = OptimConfig(**dict(cfg.optim))
    state = abstract_train_state(plan.model, optim, plan.sharder, jnp.dtype(cfg.model.param_dtype))
    c = CONSTITUTIONS
    shape = (cfg.train.batch_size // cfg.train.micro_batch_size, cfg.train.micro_batch_size, c, c, plan.seq_len)
    batch = jax.ShapeDtypeStruct(shape, jnp.int32,
                                 sharding=plan.sharder.sharding(shape, (None, "batch", None, None, None)))
    lowered = sami_step.lower(state, batch, batch, batch, config=plan.model, optim=optim, reduce=cfg.train.reduce,
                              remat=cfg.train.remat, compute_dtype=_compute_dtype(cfg), sharder=plan.sharder,
                              response_len=plan.response_len, attention_impl="einsum",
                              prompts_shared=cfg.train.share_prompts,
                              prompt_len=plan.prompt_window if cfg.train.share_prompts else None,
                              scan_layers=cfg.train.scan_layers)
    sequences = math.prod(shape[:-1])
    rows, length = sequences, plan.seq_len
    if cfg.train.share_prompts:  # the program runs packed rows: one per prompt, its c responses after it
        rows, length = sequences // c, plan.prompt_window + c * plan.response_len
    return lowered, train_flops(plan.model, rows * length, length, logit_tokens=sequences * plan.response_len)


def _sampler(plan: Plan):
    cfg = plan.config
    params = abstract_params(plan.model, jnp.dtype(cfg.model.param_dtype), param_shardings(plan.model, plan.sharder))
    model = types.SimpleNamespace(params=params, config=plan.model, tokenizer=None, sharder=plan.sharder)
    sp = SamplingParams(max_new_tokens=cfg.sampling.max_new_tokens, temperature=cfg.sampling.temperature,
                        top_p=cfg.sampling.top_p if cfg.sampling.temperature > 0 else 1.0)
    return Sampler(model, chunk=DECODE_CHUNK, per_layer=False), sp, params  # stacked, as on a TPU


def lower_prefill(plan: Plan):
    """(lowered prefill, analytic FLOPs): sampling.batch_size prompts of the plan's prompt bucket."""
    sampler, sp, params = _sampler(plan)
    b, p = plan.config.sampling.batch_size, plan.prompt_len
    replicated = plan.sharder.replicated()  # the sampler's host inputs are replicated
    tokens = jax.ShapeDtypeStruct((b, p), jnp.int32, sharding=replicated)
    mask = jax.ShapeDtypeStruct((b, p), jnp.bool_, sharding=replicated)
    key = _with_sharding(jax.eval_shape(lambda: jax.random.key(0)), replicated)
    lowered = sampler._prefill_fn(sp, plan.cache_len).lower(params, tokens, mask, key)
    return lowered, train_flops(plan.model, b * p, p, logit_tokens=b) / 3  # forward only, last logits


def lower_decode(plan: Plan, state_shardings):
    """(lowered decode chunk, analytic FLOPs): DECODE_CHUNK steps of sampling.batch_size rows over the
    full cache. state_shardings: the compiled prefill's output shardings, i.e. the state the chunk receives
    at run time."""
    sampler, sp, params = _sampler(plan)
    b, p = plan.config.sampling.batch_size, plan.prompt_len
    args = (jax.ShapeDtypeStruct((b, p), jnp.int32), jax.ShapeDtypeStruct((b, p), jnp.bool_),
            jax.eval_shape(lambda: jax.random.key(0)))
    shapes = jax.eval_shape(sampler._prefill_fn(sp, plan.cache_len), params, *args)
    state = jax.tree.map(_with_sharding, shapes, state_shardings)
    lowered = sampler._chunk_fn(sp, p, tuple(plan.model.eos_token_ids)).lower(params, state)
    return lowered, forward_flops_per_token(plan.model, plan.cache_len) * b * DECODE_CHUNK


# ------------------------------------------------------------------------------------------------ HLO loops
# XLA's cost analysis counts a while loop's body once. To count it trip-count times, the compiled module's
# text is re-parsed with each loop body as its entry (so XLA's own analysis costs the body alone) and the
# trip counts are read from the loop conditions.
_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$")
_INSTR = re.compile(r"^\s*(ROOT )?%?([\w.\-]+) = .*? ([\w\-]+)\((.*)$")


@dataclasses.dataclass
class _Instr:
    op: str
    rest: str  # the text after the opcode's opening parenthesis: operands, then attributes

    @property
    def operands(self) -> list[str]:
        depth = 0
        for i, ch in enumerate(self.rest):  # the operand list ends where the opcode's parenthesis closes
            depth += (ch == "(") - (ch == ")")
            if depth < 0:
                return re.findall(r"%([\w.\-]+)", self.rest[:i])
        return []

    def attr(self, name: str) -> str | None:
        m = re.search(rf"\b{name}=%?([\w.\-]+)", self.rest)
        return m.group(1) if m else None


def _computations(text: str) -> tuple[dict[str, dict[str, _Instr]], dict[str, str], str]:
    """({computation: {instruction: _Instr}}, {computation: its ROOT instruction}, the entry's name)."""
    comps: dict[str, dict] = {}
    roots: dict[str, str] = {}
    entry, current = "", None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(2)
            comps[current] = {}
            entry = current if header.group(1) else entry
        elif current is not None and (m := _INSTR.match(line)):
            comps[current][m.group(2)] = _Instr(m.group(3), m.group(4))
            if m.group(1):
                roots[current] = m.group(2)
    return comps, roots, entry


def _trip_count(comps, roots, consts: dict[str, int], parent: str, loop: _Instr) -> int | None:
    """A while loop's trip count: XLA's annotation when present, else from a `counter < N` condition, the
    counter's start (the loop's initial tuple) and its step (the body's `counter + step`); None if the loop
    has another shape. XLA:TPU's windowed (collective) matmul loops step by 2."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.rest)
    if known:
        return int(known.group(1))
    cond, body = comps.get(loop.attr("condition"), {}), comps.get(loop.attr("body"), {})
    for compare in (i for i in cond.values() if i.op == "compare" and "direction=LT" in i.rest):
        counter, bound = [*compare.operands, "", ""][:2]
        gte = cond.get(counter)
        index = re.search(r"index=(\d+)", gte.rest) if gte is not None and gte.op == "get-tuple-element" else None
        if bound not in consts or index is None:
            continue
        k = int(index.group(1))
        init = comps[parent].get((loop.operands or [""])[0])
        start = consts.get(init.operands[k], 0) if init is not None and init.op == "tuple" else 0
        root = body.get(roots.get(loop.attr("body"), ""))
        update = body.get(root.operands[k]) if root is not None and root.op == "tuple" else None
        steps = [consts[o] for o in update.operands if o in consts] if update is not None and update.op == "add" \
            else []
        step = steps[0] if steps and steps[0] > 0 else 1
        return max(0, -(-(consts[bound] - start) // step))
    return None


def loop_corrected_costs(hlo_text: str) -> tuple[float, float, list[str]]:
    """(FLOPs, bytes accessed) of a compiled module with every while body counted trip-count times, by
    XLA's own cost analysis of the module and of each body; and the bodies whose trip count was not found
    (counted once)."""
    from jax._src.lib import _jax  # hlo_module_cost_analysis: the analysis behind Compiled.cost_analysis
    from jaxlib import _hlo

    comps, roots, entry = _computations(hlo_text)
    consts = {}
    for instrs in comps.values():
        for name, instr in instrs.items():
            value = re.match(r"(-?\d+)\)", instr.rest) if instr.op == "constant" else None
            if value:
                consts[name] = int(value.group(1))
    body_text = hlo_text.split("\n", 1)[1]  # without the HloModule line: its aliasing refers to the entry
    client = jax.devices("cpu")[0].client  # cost analysis is backend-neutral HLO arithmetic

    def called(instr: _Instr) -> list[str]:
        names = [instr.attr(a) for a in ("calls", "to_apply", "body", "condition", "true_computation",
                                         "false_computation")]
        branches = re.search(r"branch_computations=\{([^}]*)\}", instr.rest)
        return [n for n in names if n] + re.findall(r"%([\w.\-]+)", branches.group(1) if branches else "")

    def kernel_cost(root: str) -> tuple[float, float]:
        """Pallas / Mosaic kernels (e.g. ragged_dot on TPU) are custom calls the HLO analysis cannot see
        into; they carry their own estimate, which XLA:TPU's cost_analysis adds too."""
        seen, todo, flops, nbytes = set(), [root], 0.0, 0.0
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            for instr in comps.get(name, {}).values():
                estimate = re.search(r'"cost_estimate":\{"flops":"(\d+)".*?"bytes_accessed":"(\d+)"', instr.rest)
                if instr.op == "custom-call" and estimate:
                    flops, nbytes = flops + float(estimate.group(1)), nbytes + float(estimate.group(2))
                todo += called(instr)
        return flops, nbytes

    def xla_cost(root: str) -> tuple[float, float]:
        text = "HloModule costed\n" + body_text.replace(f"ENTRY %{entry} ", f"%{entry} ", 1)
        text = re.sub(rf"^%{re.escape(root)} ", f"ENTRY %{root} ", text, count=1, flags=re.M)
        cost = _jax.hlo_module_cost_analysis(client, _hlo.hlo_module_from_text(text))
        kernels = kernel_cost(root)
        return float(cost.get("flops", 0.0)) + kernels[0], float(cost.get("bytes accessed", 0.0)) + kernels[1]

    def loops(name: str, seen: set) -> list[tuple[str, _Instr]]:  # (computation, while) nested in `name`
        out = []
        for instr in comps.get(name, {}).values():
            if instr.op == "while":
                out.append((name, instr))
                continue
            for callee in called(instr):
                if callee not in seen:
                    seen.add(callee)
                    out += loops(callee, seen)
        return out

    unknown: list[str] = []

    def true_cost(root: str, once: tuple[float, float]) -> tuple[float, float]:
        flops, nbytes = once
        for parent, loop in loops(root, {root}):
            body, trips = loop.attr("body"), _trip_count(comps, roots, consts, parent, loop)
            if trips is None:
                unknown.append(body)
                continue
            body_once = xla_cost(body)
            body_all = true_cost(body, body_once)
            flops += trips * body_all[0] - body_once[0]
            nbytes += trips * body_all[1] - body_once[1]
        return flops, nbytes

    flops, nbytes = true_cost(entry, xla_cost(entry))
    return flops, nbytes, unknown


# ------------------------------------------------------------------------------------------------ compile
def _hbm_overflow(message: str) -> int | None:
    """Bytes XLA:TPU says a program needs, from its out-of-memory compile error (None if not one)."""
    m = re.search(r"(?:Used |required for HLO temporaries \()([\d.]+)([KMGT]?)", message)
    if not m or "RESOURCE_EXHAUSTED" not in message:
        return None
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " "))


def _record(name: str, topology: str, devices, mesh) -> dict:
    return {"function": name, "topology": topology, "slices": len({getattr(d, "slice_index", 0) for d in devices}),
            "chips": len(devices), "mesh": dict(mesh.shape),
            "hbm_bytes_per_chip": CHIPS[parse_topology(topology)[0]].hbm_bytes}


def compile_record(name: str, lowered, analytic_flops: float, topology: str, devices, mesh) -> tuple[dict, object]:
    """Compiles `lowered`: (its JSON record, the executable or None when XLA refused it for want of HBM)."""
    chip, chips = CHIPS[parse_topology(topology)[0]], len(devices)
    peak = peak_flops(devices[0])
    record = _record(name, topology, devices, mesh)
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        needed = _hbm_overflow(str(e))
        if needed is None:
            raise
        record.update(bytes_per_chip=needed, fits=False, flops=None, estimated_step_s=None, mfu=None,
                      error=str(e).splitlines()[0][:400])
        return record, None
    mem = compiled.memory_analysis()
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
             - mem.alias_size_in_bytes)
    flops, accessed, unknown = loop_corrected_costs(compiled.as_text())
    seconds = max(flops / peak, accessed / chip.hbm_bytes_per_s)
    record.update(bytes_per_chip=total, argument_bytes=mem.argument_size_in_bytes,
                  output_bytes=mem.output_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
                  alias_bytes=mem.alias_size_in_bytes, fits=total <= chip.hbm_bytes, flops=flops,
                  bytes_accessed=accessed, model_flops=analytic_flops, estimated_step_s=seconds,
                  mfu=analytic_flops / (chips * peak * seconds) if seconds > 0 else None)
    if unknown:
        record["loops_without_trip_count"] = unknown
    return record, compiled


def plan_config(config, topology: str, num_slices: int = 1, model: str | None = None,
                functions=FUNCTIONS, log=print) -> list[dict]:
    """Compiles `functions` of the run `config` for `num_slices` slices of `topology`; one record each."""
    unknown = set(functions) - set(FUNCTIONS)
    if unknown:
        raise AOTError(f"unknown functions {sorted(unknown)}; choose from {FUNCTIONS}")
    devices = topology_devices(topology, num_slices)
    plan = make_plan(config, model_config_for(config, model), devices)
    mesh = plan.sharder.mesh
    records, prefill_shardings = [], None
    # The prefill is compiled for the decode too: its output shardings are the decode's input shardings.
    for name in (f for f in FUNCTIONS if f in functions or (f == "prefill" and "decode" in functions)):
        log(f"compiling {name} for {num_slices} x {topology} ({len(devices)} chips), mesh {dict(mesh.shape)} ...")
        if name == "decode" and prefill_shardings is None:  # the prefill did not fit, so there is no cache
            records.append({**_record(name, topology, devices, mesh), "bytes_per_chip": None, "fits": False,
                            "flops": None, "estimated_step_s": None, "mfu": None,
                            "error": "not compiled: the prefill, which creates its input, does not fit"})
            continue
        if name == "sami_step":
            lowered, analytic = lower_sami_step(plan)
        elif name == "prefill":
            lowered, analytic = lower_prefill(plan)
        else:
            lowered, analytic = lower_decode(plan, prefill_shardings)
        record, compiled = compile_record(name, lowered, analytic, topology, devices, mesh)
        if name == "prefill" and compiled is not None:
            prefill_shardings = compiled.output_shardings
        if name in functions:
            records.append(record)
    return records


def format_table(records: list[dict]) -> str:
    """The records as a fixed-width table (GiB per chip)."""
    head = (f"{'function':<10} {'chips':>5} {'args':>8} {'temp':>8} {'out':>8} {'total':>8} {'HBM':>6} {'fits':>4} "
            f"{'TFLOP/chip':>10} {'step s':>9} {'MFU':>6}")
    lines = [head]
    def cell(value, fmt: str, width: int) -> str:
        return format(value, fmt) if value is not None else "-".rjust(width)

    for r in records:
        gib = [cell(None if r.get(k) is None else r[k] / GiB, "8.2f", 8)
               for k in ("argument_bytes", "temp_bytes", "output_bytes", "bytes_per_chip")]
        lines.append(f"{r['function']:<10} {r['chips']:>5} {' '.join(gib)} {r['hbm_bytes_per_chip'] / GiB:6.0f} "
                     f"{'yes' if r['fits'] else 'NO':>4} "
                     f"{cell(None if r['flops'] is None else r['flops'] / 1e12, '10.3f', 10)} "
                     f"{cell(r['estimated_step_s'], '9.4f', 9)} {cell(r['mfu'], '6.1%', 6)}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ CLI
def main(argv) -> None:
    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    functions = tuple(f for f in _FUNCTIONS.value.split(",") if f)
    try:
        records = plan_config(_CONFIG.value, _TOPOLOGY.value, _NUM_SLICES.value, _MODEL.value, functions,
                              log=lambda s: print(s, file=sys.stderr))
    except ValueError as e:  # AOTError, ShardingError, ConfigError: bad input, said plainly
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{_NUM_SLICES.value} x {_TOPOLOGY.value}: {records[0]['chips']} chips, mesh {records[0]['mesh']}, "
          f"HBM {CHIPS[parse_topology(_TOPOLOGY.value)[0]].hbm_bytes / GiB:.0f} GiB per chip")
    print(format_table(records))
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(records, f, indent=1)
    sys.exit(0 if all(r["fits"] for r in records) else 1)


if __name__ == "__main__":
    if "JAX_PLATFORMS" not in os.environ:  # the host computes nothing: libtpu only compiles, no TPU is sought
        jax.config.update("jax_platforms", "cpu")
    from absl import app, flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file("config", None, "config file (configs/*.py)", lock_config=True)
    _TOPOLOGY = flags.DEFINE_string("topology", None, f"TPU slice: {TOPOLOGY_FORMS}")
    _NUM_SLICES = flags.DEFINE_integer("num-slices", 1, "slices joined over DCN (multislice)")
    _MODEL = flags.DEFINE_string("model", None, "a models.config.PRESETS name or a model path (default: "
                                 "config.model.path)")
    _JSON = flags.DEFINE_string("json", None, "write the records to this JSON file")
    _FUNCTIONS = flags.DEFINE_string("functions", ",".join(FUNCTIONS), "comma-separated subset of "
                                     f"{','.join(FUNCTIONS)}")
    flags.mark_flags_as_required(["config", "topology"])
    app.run(main)
