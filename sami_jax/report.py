"""Run metrics (JSON lines + TensorBoard) and the Markdown report with PNG plots.

`MetricsWriter` appends one JSON object per `write` to `<workdir>/metrics.jsonl`, the durable record:
it is flushed on every write, so a killed run keeps every finished line, and a resumed run drops a
half-written last line before appending. Non-finite values (NaN, +-inf) are written as JSON `null`, so the
file is strict JSON that any reader accepts; TensorBoard gets the raw float, NaN included. The TensorBoard
copy (`<workdir>/tensorboard/`) is for browsing: tensorboardX writes it from a background thread, flushed
every `flush_secs` and on `close()`, and replaces characters TensorBoard disallows in tags (e.g. spaces)
with `_`.

`write_report` turns the per-iteration evaluations and those metric rows into `<workdir>/report/report.md`
with `loss.png`, `mi.png` and `lengths.png` beside it. It draws on `matplotlib.figure.Figure` with an
Agg canvas, so it never touches pyplot's global backend.
"""

from __future__ import annotations

import html
import json
import math
import os
import pathlib
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

METRICS_FILE = "metrics.jsonl"
_RESERVED = ("step", "time")


# ------------------------------------------------------------------------------------------- metrics
def _scalar(key: str, value: Any) -> int | float:
    """A Python int or float from a number or a one-element numpy/jax array (bools become 0/1)."""
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"metric {key!r}: expected a scalar, got shape {arr.shape}")
    item = arr.reshape(()).item()
    if isinstance(item, bool):
        return int(item)
    if not isinstance(item, int | float):
        raise TypeError(f"metric {key!r}: expected a number, got {type(value).__name__} {value!r}")
    return item


def _json_value(value: Any) -> Any:
    """numpy/jax scalars to Python; non-finite floats to None (JSON null)."""
    if isinstance(value, np.generic) or (hasattr(value, "item") and np.ndim(value) == 0):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _repair_tail(path: pathlib.Path) -> None:
    """Makes `path` end at a line boundary: a complete last object gets its newline, a partial one is cut."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    try:
        json.loads(data[cut:])
    except ValueError:
        with open(path, "r+b") as f:
            f.truncate(cut)
    else:
        with open(path, "ab") as f:
            f.write(b"\n")


class MetricsWriter:
    """Appends metric rows to `<workdir>/metrics.jsonl` and TensorBoard scalars to `<workdir>/tensorboard/`.

    With `enabled=False` (every process but the primary one) nothing is created and every method is a
    no-op. Each `write(step, metrics, **context)` appends `{"step", "time", **context, **metrics}`; metric
    values must be scalars (Python, numpy or jax); ints stay ints, NaN/inf become `null`. Context values
    (e.g. `iteration=t`) go to the JSON line only, not to TensorBoard.
    """

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True, flush_secs: int = 10):
        self.enabled = enabled
        self.path = pathlib.Path(workdir) / METRICS_FILE
        self._file = self._tb = None
        if not enabled:
            return
        from tensorboardX import SummaryWriter  # imported here: the report alone does not need it

        self.path.parent.mkdir(parents=True, exist_ok=True)
        _repair_tail(self.path)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 -- held open until close()
        self._tb = SummaryWriter(str(self.path.parent / "tensorboard"), flush_secs=flush_secs)

    def write(self, step: int, metrics: Mapping[str, Any], **context: Any) -> None:
        if not self.enabled:
            return
        if self._file is None:
            raise RuntimeError(f"{self.path}: MetricsWriter is closed")
        clash = (set(_RESERVED) & (metrics.keys() | context.keys())) | (metrics.keys() & context.keys())
        if clash:
            raise ValueError(f"reserved or duplicate keys in a metrics row: {sorted(clash)}")
        step, now = int(step), time.time()
        values = {k: _scalar(k, v) for k, v in metrics.items()}
        row = {"step": step, "time": now, **{k: _json_value(v) for k, v in context.items()},
               **{k: _json_value(v) for k, v in values.items()}}
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
        self._file.flush()
        for k, v in values.items():  # TensorBoard tags allow [\w./-]; labels like "not helpful+harmless" don't
            self._tb.add_scalar(re.sub(r"[^\w./-]", "_", k), float(v), global_step=step, walltime=now)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._tb.close()
            self._file = self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a metrics.jsonl (or of `<path>/metrics.jsonl` for a directory), in order.

    A last line without its newline that does not parse (a run killed mid-write) is ignored; any other
    malformed line raises ValueError. `null` values (non-finite when written) are returned as None.
    """
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    lines = path.read_text(encoding="utf-8").split("\n")
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as e:
            if i == len(lines) - 1:  # no newline after it: the write was cut short
                break
            raise ValueError(f"{path}:{i + 1}: malformed metrics line: {e}") from None
    return rows


# -------------------------------------------------------------------------------------------- report
def _num(x: Any) -> float:
    """A float, or NaN for None / missing / non-numeric."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _fmt(x: Any, digits: int, sem: Any = None) -> str:
    v = _num(x)
    if not math.isfinite(v):
        return "n/a"
    s = f"{v:.{digits}f}"
    if sem is not None and math.isfinite(_num(sem)):
        s += f" ± {_num(sem):.{digits}f}"
    return s


def _cell(value: Any, max_chars: int | None = None) -> str:
    """Text for one Markdown table cell (or a one-line paragraph), shown literally.

    Cut to `max_chars` with an ellipsis; backslashes and backticks are backslash-escaped, HTML
    special characters become entities, `|` becomes `\\|` and line breaks become `<br>`.
    """
    text = "—" if value is None else value if isinstance(value, str) else str(value)
    if max_chars is not None and len(text) > max_chars:
        text = text[: max_chars - 1].rstrip() + "…"
    text = text.replace("\\", "\\\\").replace("`", "\\`")
    text = html.escape(text, quote=False).replace("|", "\\|")
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "<br>")
    return text.strip() or " "


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    def line(cells):
        return "| " + " | ".join(_cell(c) if not isinstance(c, _Raw) else c for c in cells) + " |"

    out = [line(header), "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        assert len(r) == len(header), (r, header)
        out.append(line(r))
    return out


class _Raw(str):
    """A table cell that is already escaped Markdown."""


def _run_info_value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, default=str) if isinstance(v, Mapping | list | tuple) else str(v)


def _labels(iterations: Sequence[Mapping]) -> list[str]:
    seen: dict[str, None] = {}
    for it in iterations:
        seen.update(dict.fromkeys(it.get("lengths") or {}))
    return list(seen)


def _train_rows(metrics: Sequence[Mapping]) -> dict[Any, list[Mapping]]:
    """Train rows per iteration, sorted by step; a step logged twice (a resumed run) keeps its last row."""
    by_it: dict[Any, dict[int, Mapping]] = {}
    for r in metrics:
        if isinstance(r.get("train/loss"), int | float) and r.get("step") is not None:
            by_it.setdefault(r.get("iteration"), {})[r["step"]] = r
    return {it: [rows[s] for s in sorted(rows)] for it, rows in by_it.items()}


def _new_figure(nrows: int = 1, height: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, 1, sharex=True, squeeze=False)[:, 0]
    return fig, axes


def _colour(i: int):
    from matplotlib import colormaps

    return colormaps["tab10"](i % 10)


def _plot_loss(path: pathlib.Path, train: dict[Any, list[Mapping]]) -> None:
    acc_keys = sorted({k for rows in train.values() for r in rows for k in r
                       if k.startswith("train/") and "acc" in k.split("/", 1)[1] and isinstance(r[k], int | float)},
                      key=lambda k: ("row" not in k, k))  # row accuracy solid, column accuracy dashed
    fig, axes = _new_figure(2 if acc_keys else 1)
    styles = ["-", "--", ":", "-."]
    for i, (it, rows) in enumerate(sorted(train.items(), key=lambda kv: _num(kv[0]))):
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["train/loss"] for r in rows], color=_colour(i), label=f"iteration {it}")
        for j, k in enumerate(acc_keys):
            axes[1].plot(steps, [_num(r.get(k)) for r in rows], styles[j % len(styles)], color=_colour(i),
                         label=f"{k.split('/', 1)[1]} (iteration {it})")
    axes[0].set(ylabel="contrastive loss", title="SAMI training loss")
    axes[0].legend(fontsize="small")
    if acc_keys:
        axes[1].set(ylabel="accuracy", ylim=(-0.02, 1.02))
        axes[1].legend(fontsize="small", ncols=2)
    axes[-1].set_xlabel("global step")
    fig.savefig(path, dpi=110)


def _plot_mi(path: pathlib.Path, its: Sequence[Mapping]) -> None:
    fig, (ax,) = _new_figure()
    x = [it["iteration"] for it in its]
    ax.errorbar(x, [_num(it.get("mi")) for it in its], yerr=[_num(it.get("mi_sem")) for it in its],
                marker="o", capsize=4)
    ax.set(xlabel="iteration (0 = base model)", ylabel="MI estimate (nats)", title="Mutual information",
           xticks=x)
    fig.savefig(path, dpi=110)


def _plot_lengths(path: pathlib.Path, its: Sequence[Mapping], labels: Sequence[str]) -> None:
    fig, (ax,) = _new_figure()
    x = np.array([it["iteration"] for it in its], float)
    for j, lab in enumerate(labels):
        dx = 0.06 * (j - (len(labels) - 1) / 2)  # keeps the error bars apart
        ax.errorbar(x + dx, [_num((it.get("lengths") or {}).get(lab)) for it in its],
                    yerr=[_num((it.get("length_sems") or {}).get(lab)) for it in its],
                    marker="o", capsize=4, color=_colour(j), label=lab)
    ax.set(xlabel="iteration (0 = base model)", ylabel="mean response length (tokens)",
           title="Response length per constitution", xticks=x)
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=110)


_JUDGED = {"base": "vs base model", "baseline": "vs judge baseline"}


def _judge_rows(its: Sequence[Mapping]) -> list[list[Any]]:
    """One row per (iteration, baseline) with a judge summary (sami_jax.judge.judge_pairs)."""
    rows = []
    for it in its:
        for name, s in (it.get("judge") or {}).items():
            miss = s.get("no_final_response") or {}
            rows.append([it["iteration"], _JUDGED.get(name, name),
                         _fmt(s["mean_of_orders"]["win_rate"], 1, s["mean_of_orders"]["sem"]),
                         _fmt(s["candidate_first"]["win_rate"], 1), _fmt(s["baseline_first"]["win_rate"], 1),
                         _fmt(s["mean_of_orders"].get("balanced"), 1), _fmt(100 * s["order_agreement"], 1),
                         sum(miss.values()), s["n"]])
    return rows


def _plot_win_rates(path: pathlib.Path, its: Sequence[Mapping]) -> None:
    fig, (ax,) = _new_figure()
    for j, name in enumerate(_JUDGED):
        pts = [(it["iteration"], it["judge"][name]["mean_of_orders"]) for it in its
               if name in (it.get("judge") or {})]
        if pts:
            ax.errorbar([x + 0.05 * j for x, _ in pts], [st["win_rate"] for _, st in pts],
                        yerr=[st["sem"] for _, st in pts], marker="o", capsize=4, color=_colour(j),
                        label=_JUDGED[name])
    ax.axhline(50, color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="iteration (0 = base model)", ylabel="win rate (%), mean of both A/B orders",
           title="Judge win rate", xticks=[it["iteration"] for it in its])
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=110)


def _mi_sentence(its: Sequence[Mapping]) -> str:
    if not its:
        return "No model was evaluated."
    first, last = its[0], its[-1]
    a, b = _num(first.get("mi")), _num(last.get("mi"))
    before = f"{_fmt(a, 3, first.get('mi_sem'))} (iteration {first['iteration']}, the base model)" \
        if first["iteration"] == 0 else f"{_fmt(a, 3, first.get('mi_sem'))} (iteration {first['iteration']})"
    if len(its) == 1:
        return f"Only one model was evaluated: MI = {before}; there is no trained iteration to compare yet."
    after = f"{_fmt(b, 3, last.get('mi_sem'))} after iteration {last['iteration']}"
    if not (math.isfinite(a) and math.isfinite(b)):
        return f"MI went from {before} to {after}."
    verb = "rose" if b > a else "fell" if b < a else "stayed"
    return f"MI {verb} from {before} to {after} (change {b - a:+.3f})."


def _examples(its: Sequence[Mapping], n_queries: int, max_chars: int) -> list[str]:
    first, last = its[0], its[-1]
    cols = [first] if first is last else [first, last]
    by_col = [{(e.get("query"), e.get("constitution_label")): e.get("response") for e in it.get("examples") or []}
              for it in cols]
    queries: dict[str, None] = {}
    labels: dict[str, None] = {}
    for it in cols:
        for e in it.get("examples") or []:
            queries.setdefault(e.get("query"))
            labels.setdefault(e.get("constitution_label"))
    if not queries:
        return ["_No example responses were recorded._"]
    names = [("base model (iteration 0)" if it["iteration"] == 0 else f"iteration {it['iteration']}") for it in cols]
    out = []
    for n, q in enumerate(list(queries)[:n_queries], 1):
        out += [f"### Query {n}", "", f"> {_cell(q, max_chars)}", ""]
        rows = [[lab, *(_Raw("*(empty)*") if col.get((q, lab)) == "" else _Raw(_cell(col.get((q, lab)), max_chars))
                        for col in by_col)]
                for lab in labels if any((q, lab) in col for col in by_col)]
        out += [*_table(["constitution", *names], rows), ""]
    return out


def write_report(workdir: str | os.PathLike, *, title: str, run_info: Mapping[str, Any],
                 iterations: Sequence[Mapping], metrics: Sequence[Mapping], n_examples: int = 3,
                 max_chars: int = 400) -> pathlib.Path:
    """Writes `<workdir>/report/report.md` and its PNG plots; returns the report's path.

    run_info: {name: value} shown as a table (non-string values as JSON).
    iterations: one dict per evaluated model, iteration 0 being the base model before training:
        {"iteration": int, "mi": float, "mi_sem": float, "lengths": {label: mean tokens},
         "length_sems": {label: sem}, "n_eval": int, "kept": int | None, "dropped": int | None,
         "steps": int | None, "examples": [{"query": str, "constitution_label": str, "response": str}],
         "judge": {"base" | "baseline": judge summary} (optional; sami_jax.judge.judge_pairs)}
        Missing keys and None show as "—"/"n/a".
    metrics: rows as returned by `read_metrics`; the train rows (those with a numeric "train/loss", a
        "step" and an "iteration") feed loss.png and the "final loss" column; "train/*acc*" keys, when
        present, get a second panel.
    n_examples, max_chars: the Examples section shows the first `n_examples` queries, the base and the last
        iteration's response per constitution label, each cut to `max_chars` characters.
    A plot without data is not drawn (a stale PNG of that name is removed) and the report says so.
    """
    out = pathlib.Path(workdir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    its = sorted(iterations, key=lambda it: it["iteration"])
    labels = _labels(its)
    train = _train_rows(metrics)
    final_loss = {it: rows[-1]["train/loss"] for it, rows in train.items()}

    md = [f"# {_cell(title)}", "", f"_Written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}._", "", "## Run", ""]
    md += _table(["setting", "value"], [[k, _run_info_value(v)] for k, v in run_info.items()])
    md += ["", "## Results", ""]
    if its:
        header = ["iteration", "MI ± sem", *(f"length: {lab}" for lab in labels), "n eval", "kept", "dropped",
                  "steps", "final loss"]
        rows = [[it["iteration"], _fmt(it.get("mi"), 3, it.get("mi_sem")),
                 *(_fmt((it.get("lengths") or {}).get(lab), 1, (it.get("length_sems") or {}).get(lab))
                   for lab in labels),
                 it.get("n_eval"), it.get("kept"), it.get("dropped"), it.get("steps"),
                 _fmt(final_loss.get(it["iteration"]), 4)] for it in its]
        md += [*_table(header, rows), ""]
        md += ["Lengths are mean response tokens ± standard error over the held-out queries; kept/dropped count "
               "the sampled training pairs that passed/failed the filters.", ""]
    md += [_mi_sentence(its), ""]
    judged = _judge_rows(its)
    if judged:
        md += ["### Judge win rates", ""]
        md += _table(["iteration", "against", "win % ± sem (mean of orders)", "candidate in A", "candidate in B",
                      "balanced %", "orders agree %", "no verdict", "n"], judged)
        md += ["", "Every pair is judged twice, the candidate once in slot A and once in slot B; ties and answers "
               "without \"Final Response\" score 0.5 (sami_jax/judge.py).", ""]
    md += ["## Plots", ""]

    plots = [
        ("loss.png", "Training loss", bool(train), lambda p: _plot_loss(p, train),
         "no training steps were logged"),
        ("mi.png", "MI per iteration", any(math.isfinite(_num(it.get("mi"))) for it in its),
         lambda p: _plot_mi(p, its), "no MI evaluation was recorded"),
        ("lengths.png", "Mean response length", bool(labels), lambda p: _plot_lengths(p, its, labels),
         "no response lengths were recorded"),
    ]
    if judged:  # optional: a run without a judge shows no placeholder for it
        plots.append(("win_rate.png", "Judge win rate", True, lambda p: _plot_win_rates(p, its), ""))
    for name, caption, has_data, draw, why in plots:
        path = out / name
        if has_data:
            draw(path)
            md += [f"![{caption}]({name})", ""]
        else:
            path.unlink(missing_ok=True)
            md += [f"_{caption} ({name}) skipped: {why}._", ""]

    md += ["## Examples", ""]
    md += _examples(its, n_examples, max_chars) if its else ["_No model was evaluated._"]
    report = out / "report.md"
    tmp = report.with_suffix(".md.tmp")
    tmp.write_text("\n".join(md).rstrip() + "\n", encoding="utf-8")
    tmp.replace(report)  # a reader never sees half a report
    return report
