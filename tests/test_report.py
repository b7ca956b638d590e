"""MetricsWriter (JSON lines + TensorBoard events), read_metrics and the Markdown/PNG report."""

import html
import json
import math
import re
import struct
import sys
import time

import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

from sami_jax.report import MetricsWriter, read_metrics, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tensorboard_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from the event files in `logdir`: tensorboard's own reader when it is
    installed, else the TFRecord framing (length, masked CRC-32C, Event proto, masked CRC-32C) by hand."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        EventAccumulator = None
    if EventAccumulator is not None:
        acc = EventAccumulator(str(logdir))
        acc.Reload()
        return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}

    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c

    out: dict[str, list[tuple[int, float]]] = {}
    files = sorted(logdir.glob("events.out.tfevents.*"))
    assert files, f"no event file in {logdir}"
    for path in files:
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            header = data[pos:pos + 8]
            (n,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == masked_crc32c(header)
            body = data[pos + 12:pos + 12 + n]
            assert struct.unpack("<I", data[pos + 12 + n:pos + 16 + n])[0] == masked_crc32c(body)
            pos += 16 + n
            event = Event.FromString(body)
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def same(a, b) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6)


# --------------------------------------------------------------------------------------------- metrics
def test_metrics_jsonl_and_tensorboard_agree(tmp_path):
    written = [
        (1, {"train/loss": np.float32(2.5), "train/row_acc": jnp.float32(0.25), "train/lr": 1e-5}, 1),
        (2, {"train/loss": jnp.asarray(1.75), "train/grad_norm": float("nan"), "train/lr": 2e-5}, 1),
        (3, {"eval/mi": 0.125, "eval/length/harmless": np.float64(81.5), "sample/kept": np.int64(7),
             "sample/dropped": 3, "train/mfu": float("inf")}, np.int64(1)),
    ]
    t0 = time.time()
    with MetricsWriter(tmp_path) as w:
        for step, metrics, it in written:
            w.write(step, metrics, iteration=it)
        # flushed per write: another reader sees every finished row while the writer is still open
        assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]

    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["iteration"] == 1 for r in rows)
    assert all(t0 <= r["time"] <= time.time() for r in rows)
    assert rows[0]["train/loss"] == 2.5 and rows[0]["train/row_acc"] == 0.25 and rows[0]["train/lr"] == 1e-5
    assert rows[1]["train/loss"] == 1.75 and rows[1]["train/grad_norm"] is None  # NaN -> null
    assert rows[2]["train/mfu"] is None  # inf -> null
    assert rows[2]["sample/kept"] == 7 and isinstance(rows[2]["sample/kept"], int) and rows[2]["sample/dropped"] == 3
    assert rows[2]["eval/length/harmless"] == 81.5
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():  # strict JSON: no NaN/Infinity tokens
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert list(rows[0])[:3] == ["step", "time", "iteration"]

    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    expected: dict[str, list[tuple[int, float]]] = {}
    for step, metrics, _ in written:
        for k, v in metrics.items():
            expected.setdefault(k, []).append((step, float(np.asarray(v))))
    assert sorted(scalars) == sorted(expected)
    for tag, points in expected.items():
        got = scalars[tag]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        assert all(same(a, b) for (_, a), (_, b) in zip(got, points, strict=True)), (tag, got, points)


def test_disabled_writer_creates_nothing(tmp_path):
    w = MetricsWriter(tmp_path / "run", enabled=False)
    w.write(1, {"train/loss": 1.0}, iteration=1)
    w.flush()
    w.close()
    with MetricsWriter(tmp_path / "run", enabled=False) as w2:
        w2.write(2, {"train/loss": 2.0})
    assert not (tmp_path / "run").exists()


def test_write_rejects_bad_rows(tmp_path):
    with MetricsWriter(tmp_path) as w:
        with pytest.raises(ValueError, match="reserved"):
            w.write(1, {"step": 1.0})
        with pytest.raises(ValueError, match="reserved"):
            w.write(1, {"train/loss": 1.0}, time=3)
        with pytest.raises(ValueError, match="scalar"):
            w.write(1, {"train/loss": np.ones(3)})
        with pytest.raises(TypeError, match="number"):
            w.write(1, {"train/loss": "low"})
        w.write(1, {"train/loss": 1.0})
    assert len(read_metrics(tmp_path)) == 1  # the rejected rows left nothing behind
    with pytest.raises(RuntimeError, match="closed"):
        w.write(2, {"train/loss": 1.0})


def test_truncated_last_line_is_ignored_and_repaired_on_resume(tmp_path):
    with MetricsWriter(tmp_path) as w:
        w.write(1, {"train/loss": 3.0}, iteration=1)
        w.write(2, {"train/loss": 2.0}, iteration=1)
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:  # a run killed in the middle of a write
        f.write('{"step": 3, "time": 17.5, "iteration": 1, "train/lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]

    with MetricsWriter(tmp_path) as w:  # the resumed run drops the fragment, then appends
        w.write(3, {"train/loss": 1.0}, iteration=1)
    rows = read_metrics(path)
    assert [(r["step"], r["train/loss"]) for r in rows] == [(1, 3.0), (2, 2.0), (3, 1.0)]

    # a complete last row whose newline was lost is kept, by the reader and by a resumed writer
    path.write_text(path.read_text().rstrip("\n"))
    assert len(read_metrics(path)) == 3
    with MetricsWriter(tmp_path) as w:
        w.write(4, {"train/loss": 0.5})
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]

    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "{garbage", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_metrics(path)


# ---------------------------------------------------------------------------------------------- report
def split_row(line: str) -> list[str]:
    """The cells of a GFM table row: `|` splits unless backslash-escaped."""
    assert line.startswith("|") and line.endswith("|"), line
    cells, cur, i = [], "", 1
    while i < len(line):
        ch = line[i]
        if ch == "\\" and i + 1 < len(line):
            cur += line[i:i + 2]
            i += 2
            continue
        if ch == "|":
            cells.append(cur.strip())
            cur = ""
        else:
            cur += ch
        i += 1
    return cells


def tables(md: str) -> list[list[list[str]]]:
    """Every table (runs of lines starting with `|`) as rows of cells; asserts equal column counts."""
    out, cur = [], []
    for line in [*md.split("\n"), ""]:
        if line.startswith("|"):
            cur.append(split_row(line))
        elif cur:
            out.append(cur)
            cur = []
    for t in out:
        assert len(t) >= 2 and set(t[1]) == {"---"}, t[:2]
        assert {len(r) for r in t} == {len(t[0])}, [len(r) for r in t]
    return out


def unescape(cell: str) -> str:
    text = re.sub(r"\\(.)", r"\1", cell.replace("<br>", "\n"))
    return html.unescape(text)


TRICKY = "A | B\nnew line with `code` and a back\\slash before a pipe \\| and <b>html</b> & more"
LONG = "word " * 200


def synthetic_run():
    labels = ["harmless", "helpful"]
    responses = {
        0: {"harmless": "Base harmless answer.", "helpful": TRICKY},
        1: {"harmless": "Iteration one, harmless.", "helpful": "Iteration one, helpful."},
        2: {"harmless": LONG, "helpful": ""},
    }
    queries = ["How do I pick a lock?", "Line one | pipe\nline two"]
    stats = {0: (0.12, 0.01, (85.2, 3.14), (90.0, 2.0)), 1: (0.31, 0.015, (70.0, 2.5), (95.5, 1.25)),
             2: (0.45, 0.02, (64.75, 2.0), (101.0, 3.0))}
    iterations = []
    for t, (mi, mi_sem, (l0, s0), (l1, s1)) in stats.items():
        iterations.append({
            "iteration": t, "mi": mi, "mi_sem": mi_sem, "lengths": {"harmless": l0, "helpful": l1},
            "length_sems": {"harmless": s0, "helpful": s1}, "n_eval": 40,
            "kept": None if t == 0 else 60 + t, "dropped": None if t == 0 else 4 - t, "steps": None if t == 0 else 4,
            "examples": [{"query": q, "constitution_label": lab, "response": responses[t][lab]}
                         for q in queries for lab in labels],
        })
    return iterations, labels, queries


def write_metrics(workdir, with_training: bool):
    with MetricsWriter(workdir) as w:
        w.write(0, {"eval/mi": 0.12}, iteration=0)
        if with_training:
            for t in (1, 2):
                w.write(4 * (t - 1), {"sample/kept": 60 + t, "sample/dropped": 4 - t}, iteration=t)
                for s in range(1, 5):
                    g = 4 * (t - 1) + s
                    w.write(g, {"train/loss": 2.0 / s + t, "train/row_accuracy": 0.2 * s, "train/col_accuracy": 0.1 * s,
                                "train/lr": 1e-5}, iteration=t)
                w.write(4 * t, {"eval/mi": 0.1 * t}, iteration=t)
            w.write(8, {"train/loss": 0.9876, "train/row_accuracy": 1.0}, iteration=2)  # a resumed run's repeat
    return read_metrics(workdir / "metrics.jsonl")


def check_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100 and img.shape[2] in (3, 4)
    assert img[..., :3].std() > 0  # not a blank canvas


def test_report_of_a_synthetic_run(tmp_path):
    pyplot_loaded = "matplotlib.pyplot" in sys.modules
    iterations, labels, queries = synthetic_run()
    metrics = write_metrics(tmp_path, with_training=True)
    info = {"config": "configs/smollm2_hh.py", "model": "smollm2 | 135M", "task": "hh", "iterations": 2,
            "constitutions": {"harmless": "be harmless", "helpful": "be helpful"}, "device": "cpu x 2"}
    path = write_report(tmp_path, title="SAMI run: test", run_info=info, iterations=iterations, metrics=metrics)
    assert path == tmp_path / "report" / "report.md"
    md = path.read_text()
    if not pyplot_loaded:
        assert "matplotlib.pyplot" not in sys.modules  # drew without pyplot's global state

    assert md.startswith("# SAMI run: test\n")
    run_table, results, *example_tables = tables(md)
    constitutions = html.escape(json.dumps(info["constitutions"]), quote=False)
    assert dict(run_table[2:]) == {"config": "configs/smollm2_hh.py", "model": "smollm2 \\| 135M", "task": "hh",
                                   "iterations": "2", "constitutions": constitutions, "device": "cpu x 2"}
    assert results[0] == ["iteration", "MI ± sem", "length: harmless", "length: helpful", "n eval", "kept",
                          "dropped", "steps", "final loss"]
    assert results[2] == ["0", "0.120 ± 0.010", "85.2 ± 3.1", "90.0 ± 2.0", "40", "—", "—", "—", "n/a"]
    assert results[3] == ["1", "0.310 ± 0.015", "70.0 ± 2.5", "95.5 ± 1.2", "40", "61", "3", "4", "1.5000"]
    # iteration 2's step 8 was logged twice: the last row counts
    assert results[4] == ["2", "0.450 ± 0.020", "64.8 ± 2.0", "101.0 ± 3.0", "40", "62", "2", "4", "0.9876"]
    assert ("MI rose from 0.120 ± 0.010 (iteration 0, the base model) to 0.450 ± 0.020 after iteration 2 "
            "(change +0.330).") in md

    for name in ("loss.png", "mi.png", "lengths.png"):
        assert f"]({name})" in md
        check_png(tmp_path / "report" / name)
    assert "skipped" not in md

    # examples: one table per query, the base and the last iteration side by side per label
    assert len(example_tables) == len(queries)
    for t in example_tables:
        assert t[0] == ["constitution", "base model (iteration 0)", "iteration 2"]
        assert [r[0] for r in t[2:]] == labels
    helpful = example_tables[0][3]
    assert unescape(helpful[1]) == TRICKY and helpful[2] == "*(empty)*"
    long_cell = example_tables[0][2][2]
    assert long_cell.endswith("…") and len(long_cell) <= 400 and LONG.strip() not in md
    assert "> Line one \\| pipe<br>line two" in md  # the query line stays one line
    assert "<b>" not in md  # raw HTML from a response is shown, not rendered


def test_report_without_training(tmp_path):
    iterations, _, _ = synthetic_run()
    metrics = write_metrics(tmp_path, with_training=False)  # killed after evaluating the base model
    path = write_report(tmp_path, title="killed run", run_info={"task": "hh"}, iterations=iterations[:1],
                        metrics=metrics)
    md = path.read_text()
    assert "_Training loss (loss.png) skipped: no training steps were logged._" in md
    assert not (tmp_path / "report" / "loss.png").exists()
    check_png(tmp_path / "report" / "mi.png")
    check_png(tmp_path / "report" / "lengths.png")
    assert "Only one model was evaluated: MI = 0.120 ± 0.010 (iteration 0, the base model)" in md
    _, results, *examples = tables(md)
    assert len(results) == 3 and results[2][-1] == "n/a"
    assert examples and all(t[0] == ["constitution", "base model (iteration 0)"] for t in examples)

    # a run that evaluated nothing at all still gets a report, and a stale plot is removed
    (tmp_path / "report" / "loss.png").write_bytes(PNG_MAGIC)
    md = write_report(tmp_path, title="empty", run_info={}, iterations=[], metrics=[]).read_text()
    assert md.count("skipped") == 3 and "No model was evaluated." in md
    assert not list((tmp_path / "report").glob("*.png"))
    assert len(tables(md)) == 1  # the (empty) run table only
