"""Evaluation the paper's way: held-out responses, pairwise judge verdicts in both A/B orders, win rates.

    python -m sami_jax.evaluate respond --model=PATH --task=hh|tldr|diverse --queries=FILE --out=FILE.jsonl
    python -m sami_jax.evaluate judge --candidate=FILE --baseline=FILE --judge=SPEC --task=tldr --out=DIR
    python -m sami_jax.evaluate stats FILE.json... [--json OUT] [--bootstrap N] [--seed S]

`respond` writes greedy responses (the §6 generation prompt, post-processed, at most 350 new tokens) with the
query and constitution; `judge` compares two such files (or the authors' response JSON) with a local model
or any OpenAI-compatible endpoint (sami_jax/judge.py); `stats` reads judgment lists.

A judgment file is what the authors stored (`typo/experiments/*/results_fixed/win_rates/*.json`): a JSON
list with one `[score, len_baseline, len_test]` row per example. `score` is the test model's result
against the baseline: 1 win, 0 loss, 0.5 tie or unparseable verdict; the lengths are token counts of the
two responses. A plain list of scores (no lengths) is accepted too; the balanced rate is then undefined.

Units: every rate this module reports (win rate, SEM, balanced rate, CI bounds) is in **percent**, as the
paper's tables and figures are (e.g. "66 / 77 %"). `order_agreement` is a fraction in [0, 1].

Definitions (sami-method.md sec. 8; checked against the stored values of sec. 9, see
tests/test_evaluate_stats.py):
- win rate: the mean of the scores over the examples.
- SEM: population std (numpy's default, ddof=0) / sqrt(n). The paper says only "error bars are +-SEM over
  the 250"; neither it nor the stored files pin the ddof down, and at n = 250 the two choices differ by
  under 0.01 points. `ddof=1` is available.
- balanced (length-stratified) rate, the paper's main HH metric: split the examples by whether the test
  response is strictly longer than the baseline's (`len_test > len_baseline`) or not (shorter *or equal*
  length), then take the unweighted mean of the two strata's win rates. Equal lengths go to the
  "not longer" stratum; assigning them to the "longer" one does not reproduce the stored values.
  Undefined (None) when lengths are missing or a stratum is empty.
- ci95: a percentile bootstrap of the raw win rate: `bootstrap` resamples of the n examples with
  replacement, drawn from `numpy.random.default_rng(seed)`, and the 2.5th / 97.5th percentiles of their
  means. None when `bootstrap` is 0.
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["build_parser", "load_judgments", "main", "order_agreement", "win_rate_stats"]

RECORD_KEYS = ("file", "n", "win_rate", "sem", "balanced", "ci95")
_BOOTSTRAP_CHUNK = 1000  # resamples drawn per batch (bounds memory); part of what a seed reproduces


# ------------------------------------------------------------------------------------------- checks
def _scores_array(scores: Any, what: str = "scores") -> np.ndarray:
    """A float64 1-D array of finite values in [0, 1], or ValueError."""
    try:
        arr = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}: expected numbers, got {e}") from None
    if arr.ndim != 1:
        raise ValueError(f"{what}: expected a 1-D sequence, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{what}: no examples")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what}: non-finite value at index {int(np.argmin(np.isfinite(arr)))}")
    bad = np.flatnonzero((arr < 0) | (arr > 1))
    if bad.size:
        raise ValueError(f"{what}: values must lie in [0, 1] (1 win, 0.5 tie, 0 loss); "
                         f"index {int(bad[0])} is {arr[bad[0]]!r}")
    return arr


def _lengths_array(lengths: Any, n: int, what: str) -> np.ndarray:
    try:
        arr = np.asarray(lengths, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}: expected numbers, got {e}") from None
    if arr.shape != (n,):
        raise ValueError(f"{what}: expected {n} lengths (one per score), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"{what}: lengths must be finite and non-negative")
    return arr


def _pct(x: float) -> float:
    return 100.0 * float(x)


# ------------------------------------------------------------------------------------------- statistics
def win_rate_stats(scores: Sequence[float] | np.ndarray, len_baseline: Sequence[float] | np.ndarray | None = None,
                   len_test: Sequence[float] | np.ndarray | None = None, *, bootstrap: int = 10000,
                   seed: int = 0, ddof: int = 0) -> dict[str, Any]:
    """Win-rate statistics of one judgment list, all rates in percent (see the module docstring).

    Returns {"n", "win_rate", "sem", "balanced", "ci95", "n_longer", "n_not_longer", "win_rate_longer",
    "win_rate_not_longer"}: `ci95` is [low, high] or None (bootstrap=0); `balanced` and the stratum rates
    are None where undefined (no lengths, or an empty stratum); the stratum counts are None without lengths.
    """
    s = _scores_array(scores)
    n = s.size
    if (len_baseline is None) != (len_test is None):
        raise ValueError("give both len_baseline and len_test, or neither")
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, numbers.Integral) or bootstrap < 0:
        raise ValueError(f"bootstrap must be a non-negative integer, got {bootstrap!r}")

    out: dict[str, Any] = {"n": int(n), "win_rate": _pct(s.mean())}
    out["sem"] = _pct(s.std(ddof=ddof) / math.sqrt(n)) if n > ddof else float("nan")

    out.update(balanced=None, n_longer=None, n_not_longer=None, win_rate_longer=None, win_rate_not_longer=None)
    if len_baseline is not None:
        lb = _lengths_array(len_baseline, n, "len_baseline")
        lt = _lengths_array(len_test, n, "len_test")
        longer = lt > lb  # equal lengths count as "not longer"
        n_longer = int(longer.sum())
        out["n_longer"], out["n_not_longer"] = n_longer, int(n - n_longer)
        if n_longer:
            out["win_rate_longer"] = _pct(s[longer].mean())
        if n - n_longer:
            out["win_rate_not_longer"] = _pct(s[~longer].mean())
        if n_longer and n - n_longer:
            out["balanced"] = 0.5 * (out["win_rate_longer"] + out["win_rate_not_longer"])

    out["ci95"] = None
    if bootstrap:
        rng = np.random.default_rng(seed)
        means = np.empty(int(bootstrap))
        for start in range(0, int(bootstrap), _BOOTSTRAP_CHUNK):
            stop = min(start + _BOOTSTRAP_CHUNK, int(bootstrap))
            means[start:stop] = s[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
        low, high = np.percentile(means, [2.5, 97.5])
        out["ci95"] = [_pct(low), _pct(high)]
    return out


def order_agreement(scores_ab: Sequence[float] | np.ndarray, scores_ba: Sequence[float] | np.ndarray, *,
                    flip_second: bool = True) -> float:
    """Fraction (in [0, 1]) of pairs on which two judge runs with swapped presentation order agree.

    `scores_ab[i]` is the score (1 win, 0.5 tie, 0 loss) of the response shown first in the first run;
    `scores_ba[i]` the score of the response shown first in the second run, i.e. the *other* response.
    With `flip_second` (the default) the second run is flipped (1 - score) so both speak about the same
    response; pass `flip_second=False` when both lists are already about the same response.

    Each score becomes a verdict: win (> 0.5), tie (== 0.5) or loss (< 0.5). A pair agrees when the two
    verdicts are identical: tie and tie agree; a tie against a win or a loss is a disagreement.
    """
    a = _scores_array(scores_ab, "scores_ab")
    b = _scores_array(scores_ba, "scores_ba")
    if a.shape != b.shape:
        raise ValueError(f"scores_ab and scores_ba differ in length: {a.size} vs {b.size}")
    if flip_second:
        b = 1.0 - b
    return float(np.mean(np.sign(a - 0.5) == np.sign(b - 0.5)))


# ------------------------------------------------------------------------------------------- files
def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def load_judgments(path: str | pathlib.Path) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(scores, len_baseline, len_test) as float64 arrays from one stored judgment file.

    The file holds a JSON list of `[score, len_baseline, len_test]` rows (the authors' format), or a plain
    list of scores, in which case both lengths are None. Raises ValueError naming the file on an empty or
    non-JSON file, a wrong shape, a non-numeric entry or a score outside [0, 1]; OSError if unreadable.
    """
    path = pathlib.Path(path)
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{path}: empty file (expected a JSON list of [score, len_baseline, len_test] rows)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of [score, len_baseline, len_test] rows, "
                         f"got a {type(data).__name__}")
    if not data:
        raise ValueError(f"{path}: the list is empty (no judgments)")

    if all(_is_number(x) for x in data):
        return _with_file(path, _scores_array, data), None, None
    rows = []
    for i, row in enumerate(data):
        if not isinstance(row, list) or len(row) != 3:
            got = f"{len(row)} values" if isinstance(row, list) else f"a {type(row).__name__}"
            raise ValueError(f"{path}: row {i} is {got}; expected [score, len_baseline, len_test]")
        if not all(_is_number(x) for x in row):
            raise ValueError(f"{path}: row {i} has a non-numeric entry: {row!r}")
        rows.append(row)
    arr = np.asarray(rows, dtype=np.float64)
    scores = _with_file(path, _scores_array, arr[:, 0])
    len_baseline = _with_file(path, _lengths_array, arr[:, 1], arr.shape[0], "len_baseline")
    len_test = _with_file(path, _lengths_array, arr[:, 2], arr.shape[0], "len_test")
    return scores, len_baseline, len_test


def _with_file(path: pathlib.Path, fn, *args):
    try:
        return fn(*args)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def stats_records(paths: Sequence[str | pathlib.Path], *, bootstrap: int = 10000,
                  seed: int = 0) -> list[dict[str, Any]]:
    """One record {"file", "n", "win_rate", "sem", "balanced", "ci95"} per judgment file (rates in %)."""
    records = []
    for path in paths:
        st = win_rate_stats(*load_judgments(path), bootstrap=bootstrap, seed=seed)
        records.append({"file": str(path), **{k: _json_safe(st[k]) for k in RECORD_KEYS[1:]}})
    return records


def format_table(records: Sequence[dict[str, Any]]) -> str:
    """The records as a fixed-width text table (one decimal for rates, two for the SEM)."""
    def num(x, fmt):
        return "n/a" if x is None else format(x, fmt)

    width = max([len("file"), *(len(r["file"]) for r in records)])
    lines = [f"{'file':<{width}}  {'n':>5}  {'win%':>6}  {'SEM':>5}  {'balanced%':>9}  {'95% CI (bootstrap)':>18}"]
    for r in records:
        ci = "n/a" if r["ci95"] is None else f"[{num(r['ci95'][0], '.1f')}, {num(r['ci95'][1], '.1f')}]"
        lines.append(f"{r['file']:<{width}}  {r['n']:>5}  {num(r['win_rate'], '.1f'):>6}  {num(r['sem'], '.2f'):>5}  "
                     f"{num(r['balanced'], '.1f'):>9}  {ci:>18}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- CLI
def _cmd_stats(args: argparse.Namespace) -> int:
    try:
        records = stats_records(args.files, bootstrap=args.bootstrap, seed=args.seed)
    except (OSError, ValueError) as e:
        print(f"evaluate stats: error: {e}", file=sys.stderr)
        return 1
    print(format_table(records))
    if args.json:
        out = pathlib.Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(records, indent=2) + "\n", encoding="utf-8")
    return 0


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


# task -> (generation task, default constitutions); the diverse experiment samples with the CoT prompt (Table 9).
RESPOND_TASKS = {"hh": ("hh", "hh"), "tldr": ("tldr", "tldr_mistral"), "diverse": ("tldr_cot", None)}


def respond_records(model, task: str, queries: Sequence[str], *, constitutions: str | None = None,
                    held_out: bool = False, chat: bool = False, max_new_tokens: int = 350, batch_size: int = 16,
                    seed: int = 0, progress=None) -> list[dict[str, Any]]:
    """Greedy responses of `model` to `queries` under the task's evaluation constitution (one per query, the
    principles reshuffled by a `random.Random(seed)`): records {"id", "query", "constitution", "prompt",
    "response", "length" (new tokens), "finish_reason", "group"}."""
    import random

    from sami_jax.data.constitutions import load_constitutions
    from sami_jax.data.tasks import chat_task, get_task
    from sami_jax.sampling import Sampler, SamplingParams

    if task not in RESPOND_TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(RESPOND_TASKS)}")
    task_name, default_constitutions = RESPOND_TASKS[task]
    spec = constitutions or default_constitutions
    if spec is None:
        raise ValueError(f"task {task!r} needs --constitutions (the diverse principles file)")
    scheme = load_constitutions(spec)
    gen_task = get_task(task_name)
    if chat:
        gen_task = chat_task(gen_task, model.tokenizer.chat_template)
    rng = random.Random(seed)
    cons = [scheme.eval_constitution(rng, held_out=held_out) for _ in queries]
    prompts = [gen_task.generation_prompt(c, q) for c, q in zip(cons, queries, strict=True)]
    sp = SamplingParams(max_new_tokens=max_new_tokens, stop=gen_task.stop_strings)
    gens = Sampler(model).generate(prompts, sp, batch_size=batch_size, progress=progress)
    return [{"id": str(i), "query": q, "constitution": c, "prompt": p, "response": gen_task.postprocess(g.text),
             "length": g.length, "finish_reason": g.finish_reason,
             "group": ("held_out" if held_out else "learned") if task == "diverse" else None}
            for i, (q, c, p, g) in enumerate(zip(queries, cons, prompts, gens, strict=True))]


def _cmd_respond(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from sami_jax.api import load_model
    from sami_jax.data.queries import load_queries

    try:
        queries = load_queries(args.queries, limit=args.limit or None)
    except (OSError, ValueError) as e:
        print(f"evaluate respond: error: {e}", file=sys.stderr)
        return 1
    model = load_model(args.model)
    if model.tokenizer is None:
        print(f"evaluate respond: error: {args.model} has no tokenizer files", file=sys.stderr)
        return 1
    with tqdm(total=len(queries), unit="query", file=sys.stderr) as bar:
        try:
            records = respond_records(model, args.task, queries, constitutions=args.constitutions,
                                      held_out=args.held_out, chat=args.chat, max_new_tokens=args.max_new_tokens,
                                      batch_size=args.batch_size, seed=args.seed, progress=bar.update)
        except ValueError as e:
            print(f"evaluate respond: error: {e}", file=sys.stderr)
            return 1
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    print(f"{len(records)} responses -> {out}")
    return 0


def _cmd_judge(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from sami_jax import judge as J

    try:
        cands, bases = J.read_responses(args.candidate), J.read_responses(args.baseline)
        if args.limit:
            keep = {r["id"] for r in cands[: args.limit]}
            cands, bases = cands[: args.limit], [r for r in bases if r["id"] in keep]
        if args.tokenizer:  # token counts for the length-balanced rate (the authors: Mistral-7B's, BOS included)
            from sami_jax.tokenizer import load_tokenizer

            tok = load_tokenizer(args.tokenizer)
            for r in (*cands, *bases):
                r["length"] = len(tok.encode(r["response"], add_bos=tok.bos_id is not None))
        pairs = J.pair_up(cands, bases, names=(str(args.candidate), str(args.baseline)))
        judge = J.make_judge(args.judge, **({"batch_size": args.batch_size} if not args.judge.startswith("openai:")
                                            else {"retries": args.retries, "timeout": args.timeout}))
    except (OSError, ValueError) as e:
        print(f"evaluate judge: error: {e}", file=sys.stderr)
        return 1
    try:
        with tqdm(total=2 * len(pairs), unit="answer", file=sys.stderr) as bar:
            summary = J.judge_pairs(pairs, judge, args.task, args.out, seed=args.seed, progress=bar.update)
    except J.JudgeError as e:
        print(f"evaluate judge: error: {e}\nfinished judgments are cached in {args.out}/cache.jsonl; "
              "rerun the same command to resume", file=sys.stderr)
        return 1
    if args.reference:
        try:
            ref_scores = load_judgments(args.reference)[0]
            records = [json.loads(line) for line in (pathlib.Path(args.out) / "judgments.jsonl").open()]
            if args.limit:
                ref_scores = ref_scores[: args.limit]
            summary["reference"] = {"file": str(args.reference), **J.reference_agreement(records, ref_scores)}
        except (OSError, ValueError) as e:
            print(f"evaluate judge: error: --reference: {e}", file=sys.stderr)
            return 1
        (pathlib.Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(format_judge_summary(summary))
    print(f"judgments: {pathlib.Path(args.out) / 'judgments.jsonl'}")
    return 0


def format_judge_summary(summary: dict[str, Any]) -> str:
    """A few lines of text: win rate per order, mean of orders, the paper's order, agreement, parse failures."""
    def line(name, st):
        bal = "" if st["balanced"] is None else f", balanced {st['balanced']:.1f}%"
        ci = "" if st["ci95"] is None else f", 95% CI [{st['ci95'][0]:.1f}, {st['ci95'][1]:.1f}]"
        return f"  {name:<16} {st['win_rate']:5.1f}% +- {st['sem']:.1f}{bal}{ci}"

    lines = [f"{summary['n']} pairs judged by {summary['judge']} in both orders (candidate win rate):"]
    for key in ("mean_of_orders", "candidate_first", "baseline_first", "paper_order"):
        lines.append(line(key.replace("_", " "), summary[key]))
    miss = summary["no_final_response"]
    lines.append(f"  orders agree on {100 * summary['order_agreement']:.1f}% of pairs; slot A picked "
                 f"{summary['slot_a_picked']}, slot B {summary['slot_b_picked']} times; no \"Final Response\" "
                 f"in {miss['candidate_first']} + {miss['baseline_first']} answers (scored 0.5)")
    if "reference" in summary:
        ref = summary["reference"]
        lines.append(f"  against the reference ({ref['reference_win_rate']:.1f}% win rate): same outcome on "
                     + ", ".join(f"{k.replace('_', ' ')} {100 * v['agreement']:.1f}%"
                                 + ("" if v["agreement_decided"] is None else
                                    f" ({100 * v['agreement_decided']:.1f}% of {v['decided']} decided)")
                                 for k, v in ref.items() if isinstance(v, dict)))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The `python -m sami_jax.evaluate` parser; each subcommand sets `func(args) -> exit code`."""
    parser = argparse.ArgumentParser(prog="python -m sami_jax.evaluate", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("stats", help="win rate, SEM, length-balanced rate and bootstrap CI of judgment files",
                       description="Win-rate statistics (in percent) of stored judgment files: one record "
                                   "{file, n, win_rate, sem, balanced, ci95} per file.")
    p.add_argument("files", nargs="+", metavar="FILE.json", help="JSON list of [score, len_baseline, len_test]")
    p.add_argument("--json", metavar="OUT", help="also write the records to this JSON file")
    p.add_argument("--bootstrap", type=_non_negative_int, default=10000, metavar="N",
                   help="bootstrap resamples for the 95%% CI (0: no CI; default 10000)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="bootstrap seed (default 0)")
    p.set_defaults(func=_cmd_stats)

    p = sub.add_parser("respond", help="greedy responses to held-out queries with the paper's generation prompts")
    p.add_argument("--model", required=True, help="HF folder, .gguf file or orbax model folder")
    p.add_argument("--task", required=True, choices=sorted(RESPOND_TASKS))
    p.add_argument("--queries", required=True, help="query file (HH-RLHF jsonl, TL;DR jsonl/JSON, {query} jsonl)")
    p.add_argument("--out", required=True, help="JSONL to write")
    p.add_argument("--constitutions", help="constitution spec (default: the task's bundled set)")
    p.add_argument("--held-out", action="store_true", help="diverse: draw the held-out principles")
    p.add_argument("--chat", action="store_true", help="chat-template prompts (instruct models)")
    p.add_argument("--limit", type=_non_negative_int, default=250, help="first N queries (paper: 250; 0 = all)")
    p.add_argument("--max-new-tokens", type=int, default=350)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="principle-order seed")
    p.set_defaults(func=_cmd_respond)

    p = sub.add_parser("judge", help="judge candidate vs baseline responses in both A/B orders")
    p.add_argument("--candidate", required=True, help="responses (respond jsonl or the authors' JSON)")
    p.add_argument("--baseline", required=True, help="responses to the same queries")
    p.add_argument("--judge", required=True, help="local model path, openai:BASE_URL:MODEL, or verdict:PATH")
    p.add_argument("--task", required=True, choices=["diverse", "hh", "tldr"], help="which judge prompt")
    p.add_argument("--out", required=True, help="output folder (judgments.jsonl, summary.json, cache.jsonl)")
    p.add_argument("--tokenizer", help="count response tokens with this tokenizer (for the balanced rate)")
    p.add_argument("--limit", type=_non_negative_int, default=0, help="first N candidate records (0 = all)")
    p.add_argument("--reference", help="another judge's stored scores for the same pairs, in order (the authors' "
                                       "[score, len_baseline, len_test] list): report agreement with them")
    p.add_argument("--batch-size", type=int, default=16, help="local judge batch")
    p.add_argument("--retries", type=int, default=3, help="openai judge: tries per request")
    p.add_argument("--timeout", type=float, default=120.0, help="openai judge: seconds per request")
    p.add_argument("--seed", type=int, default=1, help="principle shuffle and paper-order seed (authors: 1)")
    p.set_defaults(func=_cmd_judge)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
