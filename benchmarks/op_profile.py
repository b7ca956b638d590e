"""Where a jitted program's device time goes: run it under `jax.profiler`, sum the time of every op (GPU
kernels, or XLA CPU thunks) per HLO instruction, and print the largest with what each instruction does.

    ops = op_profile(lambda: step(...), hlo_texts=[compiled.as_text()], title="decode")

Used by the GPU benchmarks, whose device time is too scarce for a second run to look at a trace; the
full table also goes to `out_json` so it can be read afterwards.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable

_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) ")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_NOTABLE = ("dot", "convolution", "custom-call", "reduce", "exponential", "transpose", "dynamic-update-slice",
            "dynamic-slice", "gather", "scatter", "sort", "copy", "concatenate", "all-reduce", "all-gather")


def describe_hlo(text: str) -> dict[tuple[str, str], str]:
    """{(module, instruction name): "opcode result-shape [notable ops inside its fused computation]"} for the
    modules in `text` (one or more compiled HLO modules)."""
    if text.count("HloModule ") > 1:
        out = {}
        for part in re.split(r"\n(?=HloModule )", text):
            out.update(describe_hlo(part))
        return out
    module = re.search(r"HloModule ([\w.\-]+)", text)
    module = module.group(1) if module else ""
    bodies, current = {}, None
    for line in text.splitlines():
        m = _HEADER.match(line)
        if m and line.rstrip().endswith("{"):
            current = bodies.setdefault(m.group(1), [])
        elif current is not None:
            current.append(line)
    out = {}
    for lines in bodies.values():
        for line in lines:
            m = _INSTR.match(line)
            if not m:
                continue
            name, shape, op, rest = m.groups()
            inner = ""
            call = _CALLS.search(rest)
            if call and call.group(1) in bodies:
                ops = collections.Counter(mm.group(3) for mm in map(_INSTR.match, bodies[call.group(1)]) if mm)
                inner = " [" + " ".join(f"{o}x{n}" if n > 1 else o for o, n in sorted(ops.items())
                                        if o in _NOTABLE) + "]"
            target = re.search(r'custom_call_target="([^"]+)"', rest)
            out[module, name] = f"{op} {shape[:60]}{' ' + target.group(1) if target else ''}{inner}"[:160]
    return out


def op_profile(run: Callable[[], object], hlo_texts: Iterable[str] = (), top: int = 25, title: str = "",
               out_json: str | None = None) -> list[dict]:
    """Runs `run()` under the profiler; returns [{"module", "op", "kernel", "ms", "count", "what"}] sorted by
    time, and prints the `top` rows. Device ops are a GPU's stream events or, on a CPU, XLA's thunks."""
    import jax

    with tempfile.TemporaryDirectory() as d:
        try:  # a profiler that cannot start (no CUPTI, say) must not cost the benchmark its other numbers
            jax.profiler.start_trace(d, create_perfetto_trace=True)
            try:
                run()
            finally:
                jax.profiler.stop_trace()
            (path,) = glob.glob(f"{d}/**/perfetto_trace.json.gz", recursive=True)
            with gzip.open(path, "rt") as f:
                trace = json.load(f)
        except Exception as e:
            print(f"-- op profile{': ' + title if title else ''} failed: {type(e).__name__}: {str(e)[:300]}")
            return []
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    descs = {}
    for text in hlo_texts:
        descs.update(describe_hlo(text))
    # XLA ops carry hlo_op: a GPU's kernels and copies on its streams (not the derived per-op lines), else
    # the CPU's thunks on host threads. A device plane without such events (libtpu loaded for an AOT
    # compile, say) does not count.
    ops = [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]
    on_device = [e for e in ops if procs.get(e["pid"], "").startswith("/device:")]
    if on_device:
        on_stream = [e for e in on_device if "stream" in threads.get((e["pid"], e.get("tid")), "").lower()]
        ops = on_stream or on_device

    total, count, kernel = collections.Counter(), collections.Counter(), {}
    span = [float("inf"), 0.0]
    for e in ops:
        key = (e["args"].get("hlo_module", ""), e["args"]["hlo_op"])
        total[key] += e["dur"]
        count[key] += 1
        kernel.setdefault(key, e["name"])
        span = [min(span[0], e["ts"]), max(span[1], e["ts"] + e["dur"])]
    busy = sum(total.values())
    rows = [{"module": m, "op": op, "kernel": kernel[(m, op)][:120], "ms": us / 1e3, "count": count[(m, op)],
             "what": descs.get((m, op), "")} for (m, op), us in total.most_common()]
    wall = (span[1] - span[0]) / 1e3 if rows else 0.0
    print(f"-- op profile{': ' + title if title else ''}: {busy / 1e3:.1f} ms of device ops in a "
          f"{wall:.1f} ms span, {len(rows)} distinct ops")
    for r in rows[:top]:
        print(f"{r['ms']:9.2f} ms {r['ms'] / max(busy / 1e3, 1e-9):6.1%} x{r['count']:<6d} {r['op'][:28]:28s} "
              f"{(r['what'] or r['kernel'])[:110]}")
    if out_json:  # its folder too: a --profile DIR that does not exist yet must not lose the profiled run
        os.makedirs(os.path.dirname(out_json) or ".", exist_ok=True)
        with open(out_json, "w") as f:
            json.dump({"title": title, "busy_ms": busy / 1e3, "span_ms": wall, "rows": rows}, f)
    return rows
