"""`evaluate stats` and its helpers against the authors' stored GPT-4 judgments (sami-method.md sec. 8-9)."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from conftest import SHARED

from sami_jax.evaluate import load_judgments, main, order_agreement, win_rate_stats

SAMI = SHARED / "data" / "sami"
HH = SAMI / "janphilippfranken_typo" / "experiments" / "hh-rlhf" / "results_fixed" / "win_rates"
TLDR = SAMI / "janphilippfranken_typo" / "experiments" / "tldr" / "results_fixed" / "win_rates"
LLAMA = SAMI / "janphilippfranken_typo" / "experiments" / "tldr" / "results_fixed" / "win_rates_llama_70b"


def _stored(directory, name):
    path = directory / name
    if not path.exists():
        pytest.skip(f"needs the authors' stored judgments at {path} (../shared/data/sami is absent on this machine)")
    return path


def _close(ours, expected):
    """Equal to the 0.1-point precision the tables print (ties in rounding allowed)."""
    return abs(ours - expected) <= 0.05 + 1e-9


# sami-method.md sec. 9.1 (HH-RLHF, Exp. 1; mistral-7b, opus principles), "stored raw" and "stored balanced"
# rows, cells helpful / harmless. file -> (raw %, balanced %).
HH_EXPECTED = {
    # row "vs base, stored raw" / "vs base, stored balanced", it 1..3
    "1-vs-base-epoch-0.12-helpful.json": (67.0, 63.8),
    "1-vs-base-epoch-0.12-harmless.json": (62.2, 62.0),
    "2-vs-base-epoch-0.25-helpful.json": (84.4, 75.3),
    "2-vs-base-epoch-0.25-harmless.json": (81.0, 68.2),
    "3-vs-base-epoch-0.38-helpful.json": (80.6, 66.9),
    "3-vs-base-epoch-0.38-harmless.json": (90.4, 77.8),
    # row "vs instruct, stored raw" / "vs instruct, stored balanced", it 0..3
    "0-vs-instruct-helpful.json": (20.8, 34.0),
    "0-vs-instruct-harmless.json": (12.8, 24.3),
    "1-vs-instruct-epoch-0.12-helpful.json": (27.8, 44.5),
    "1-vs-instruct-epoch-0.12-harmless.json": (17.6, 34.7),
    "2-vs-instruct-epoch-0.25-helpful.json": (58.4, 57.6),
    "2-vs-instruct-epoch-0.25-harmless.json": (53.4, 51.4),
    "3-vs-instruct-epoch-0.38-helpful.json": (59.2, 55.0),
    "3-vs-instruct-epoch-0.38-harmless.json": (62.0, 57.9),
}

# sami-method.md sec. 8 "Judge noise": raw rates of two GPT-4 runs on identical HH iteration-2 responses.
HH_JUDGE_NOISE_RAW = {
    "2-vs-base-epoch-0.25-sanity-check-old-results-harmless.json": 87.4,
    "2-vs-base-epoch-0.25-sanity-check-old-results-helpful.json": 87.2,
}

# sami-method.md sec. 9.2 (TL;DR, Exp. 2; raw win rates, paper Tables 4-7): the stored value, i.e. the
# bracketed one where the table gives one, else the paper's. Row / iteration named per file.
_T = "-constitution-temperature-0.0.json"
TLDR_EXPECTED = {
    # row "weak | mistral-7b | vs base" (Table 4), it 1, 2, 3: [44.8] [65.4] [71.4]
    f"1-vs-base-epoch-0.12-mistral-mistral{_T}": 44.8,
    f"2-vs-base-epoch-0.25-from-epoch-0.12-mistral-mistral{_T}": 65.4,
    f"3-vs-base-epoch-0.38-from-epoch-0.25-mistral-mistral{_T}": 71.4,
    # row "weak | mixtral-8x7b | vs base", it 1, 2, 3: [60.4] [67.0] [64.2]
    f"1-vs-base-epoch-0.12-mixtral-mistral{_T}": 60.4,
    f"2-vs-base-epoch-0.25-from-epoch-0.12-mixtral-mistral{_T}": 67.0,
    f"3-vs-base-epoch-0.38-from-epoch-0.25-mixtral-mistral{_T}": 64.2,
    # row "weak | mistral-7b | vs mistral-7b-instruct", it 0..3: [25.0] [24.2] [47.4] 47.2
    f"0-vs-instruct-mistral-mistral{_T}": 25.0,
    f"1-vs-instruct-epoch-0.12-mistral-mistral{_T}": 24.2,
    f"2-vs-instruct-epoch-0.25-from-epoch-0.12-mistral-mistral{_T}": 47.4,
    f"3-vs-instruct-epoch-0.38-from-epoch-0.25-mistral-mistral{_T}": 47.2,
    # row "weak | mixtral-8x7b | vs mistral-7b-instruct", it 0..3: stored 51.6, 58.4, 62.8, [65.0]
    f"0-vs-instruct-mixtral-mistral{_T}": 51.6,
    f"1-vs-instruct-epoch-0.12-mixtral-mistral{_T}": 58.4,
    f"2-vs-instruct-epoch-0.25-from-epoch-0.12-mixtral-mistral{_T}": 62.8,
    f"3-vs-instruct-epoch-0.38-from-epoch-0.25-mixtral-mistral{_T}": 65.0,
    # row "strong | mistral-7b | vs base", it 1, 2, 3: [61.8] 75.6 70.0
    f"1-vs-base-mistral-opus{_T}": 61.8,
    f"2-vs-base-mistral-opus{_T}": 75.6,
    f"3-vs-base-mistral-opus{_T}": 70.0,
    # row "strong | mixtral-8x7b | vs base", it 1, 2, 3: [55.2] [58.8] [62.4]
    f"1-vs-base-epoch-0.12-mixtral-opus{_T}": 55.2,
    f"2-vs-base-epoch-0.25-from-epoch-0.12-mixtral-opus{_T}": 58.8,
    f"3-vs-base-epoch-0.38-from-epoch-0.25-mixtral-opus{_T}": 62.4,
    # row "strong | mistral-7b | vs instruct", it 0..3: 25.2 42.0 53.6 44.0
    f"0-vs-instruct-mistral-opus{_T}": 25.2,
    f"1-vs-instruct-mistral-opus{_T}": 42.0,
    f"2-vs-instruct-mistral-opus{_T}": 53.6,
    f"3-vs-instruct-mistral-opus{_T}": 44.0,
    # row "strong | mixtral-8x7b | vs instruct", it 0..3: 58.0 [59.0] 65.6 68.8
    f"0-vs-instruct-mixtral-opus{_T}": 58.0,
    f"1-vs-instruct-epoch-0.12-mixtral-opus{_T}": 59.0,
    f"2-vs-instruct-epoch-0.25-from-epoch-0.12-mixtral-opus{_T}": 65.6,
    f"3-vs-instruct-epoch-0.38-from-epoch-0.25-mixtral-opus{_T}": 68.8,
}

# sami-method.md sec. 9.3 (llama3-70b, Exp. 3): Table 9 (CoT) rows ID / OOD, it 1..3, and Table 8 it 1 (ID).
LLAMA_EXPECTED = {
    "1vs0.json": 67.6, "2vs0from0.25.json": 63.6, "3vs0from0.51.json": 68.8,  # Table 9, in-distribution
    "1vs0from0OOD.json": 56.2, "2vs0from0.25OOD.json": 71.6, "3vs0from0.51OOD.json": 67.0,  # Table 9, OOD
    "1vs0from0.json": 54.0,  # Table 8 (no CoT), in-distribution, it 1
}


@pytest.mark.parametrize("name", sorted(HH_EXPECTED))
def test_hh_raw_and_balanced_reproduce_stored(name):
    raw, balanced = HH_EXPECTED[name]
    st = win_rate_stats(*load_judgments(_stored(HH, name)), bootstrap=0)
    assert st["n"] == 250
    assert _close(st["win_rate"], raw), (name, st["win_rate"], raw)
    assert _close(st["balanced"], balanced), (name, st["balanced"], balanced)


@pytest.mark.parametrize("name", sorted(HH_JUDGE_NOISE_RAW))
def test_hh_judge_noise_runs_reproduce(name):
    st = win_rate_stats(*load_judgments(_stored(HH, name)), bootstrap=0)
    assert _close(st["win_rate"], HH_JUDGE_NOISE_RAW[name])


def test_hh_paper_main_text_balanced_is_the_stored_value_truncated():
    """Main text (sec. 9.1 rows "paper main text (balanced)"): it 3 vs base 66 / 77, vs instruct 54 / 57 --
    the stored balanced rates 66.9 / 77.8 and 55.0 / 57.9 cut (not rounded) to whole percent."""
    main_text = {"3-vs-base-epoch-0.38-helpful.json": 66, "3-vs-base-epoch-0.38-harmless.json": 77,
                 "3-vs-instruct-epoch-0.38-helpful.json": 54, "3-vs-instruct-epoch-0.38-harmless.json": 57}
    for name, expected in main_text.items():
        st = win_rate_stats(*load_judgments(_stored(HH, name)), bootstrap=0)
        assert math.floor(st["balanced"]) == expected, (name, st["balanced"])


def test_length_tie_rule_matters_and_ties_go_to_not_longer():
    """On 1-vs-base-epoch-0.12-harmless (45 equal-length pairs) only "equal -> not longer" gives the stored
    62.0 (sec. 9.1); sending the ties to the "longer" stratum would give 54.0."""
    scores, lb, lt = load_judgments(_stored(HH, "1-vs-base-epoch-0.12-harmless.json"))
    assert int(np.sum(lb == lt)) == 45
    st = win_rate_stats(scores, lb, lt, bootstrap=0)
    assert _close(st["balanced"], 62.0)
    assert st["n_longer"] == int(np.sum(lt > lb)) and st["n_not_longer"] == int(np.sum(lt <= lb))
    ties_to_longer = 50 * (scores[lt >= lb].mean() + scores[lt < lb].mean())
    assert abs(ties_to_longer - 62.0) > 5


@pytest.mark.parametrize("name", sorted(TLDR_EXPECTED))
def test_tldr_raw_reproduces_stored(name):
    st = win_rate_stats(*load_judgments(_stored(TLDR, name)), bootstrap=0)
    assert st["n"] == 250
    assert _close(st["win_rate"], TLDR_EXPECTED[name]), (name, st["win_rate"])


@pytest.mark.parametrize("name", sorted(LLAMA_EXPECTED))
def test_llama_raw_reproduces_tables_8_9(name):
    st = win_rate_stats(*load_judgments(_stored(LLAMA, name)), bootstrap=0)
    assert _close(st["win_rate"], LLAMA_EXPECTED[name]), (name, st["win_rate"])


def test_stats_cli_on_stored_files(tmp_path, capsys):
    hh = [_stored(HH, n) for n in ("3-vs-base-epoch-0.38-helpful.json", "3-vs-base-epoch-0.38-harmless.json",
                                   "3-vs-instruct-epoch-0.38-harmless.json")]
    tldr = [_stored(TLDR, n) for n in (f"3-vs-base-mistral-opus{_T}",
                                       f"3-vs-instruct-epoch-0.38-from-epoch-0.25-mixtral-mistral{_T}",
                                       f"2-vs-base-epoch-0.25-from-epoch-0.12-mixtral-opus{_T}")]
    out = tmp_path / "sub" / "stats.json"
    rc = main(["stats", *map(str, hh + tldr), "--json", str(out), "--bootstrap", "2000", "--seed", "3"])
    assert rc == 0
    records = json.loads(out.read_text())
    assert [r["file"] for r in records] == [str(p) for p in hh + tldr]
    assert all(set(r) == {"file", "n", "win_rate", "sem", "balanced", "ci95"} for r in records)
    expected = [(80.6, 66.9), (90.4, 77.8), (62.0, 57.9), (70.0, None), (65.0, None), (58.8, None)]
    for r, (raw, balanced) in zip(records, expected, strict=True):
        assert r["n"] == 250
        assert _close(r["win_rate"], raw), r
        if balanced is not None:
            assert _close(r["balanced"], balanced), r
        low, high = r["ci95"]
        assert low < r["win_rate"] < high
        # a 95% interval of a mean of 250 scores spans about +-1.96 SEM
        assert 2.5 * r["sem"] < high - low < 5.5 * r["sem"]
    table = capsys.readouterr().out
    assert "80.6" in table and "66.9" in table and "65.0" in table
    assert len(table.strip().splitlines()) == 1 + len(records)


def test_bootstrap_reproducible_with_seed():
    args = load_judgments(_stored(HH, "2-vs-base-epoch-0.25-helpful.json"))
    a = win_rate_stats(*args, bootstrap=3000, seed=7)
    b = win_rate_stats(*args, bootstrap=3000, seed=7)
    c = win_rate_stats(*args, bootstrap=3000, seed=8)
    assert a["ci95"] == b["ci95"]
    assert a["ci95"] != c["ci95"]
    assert a["ci95"][0] < a["win_rate"] < a["ci95"][1]
    assert win_rate_stats(*args, bootstrap=0)["ci95"] is None


def test_sem_is_population_std_over_sqrt_n():
    scores = [1, 0, 1, 1]  # mean 0.75, population std sqrt(0.1875)
    st = win_rate_stats(scores, bootstrap=0)
    assert st["win_rate"] == pytest.approx(75.0)
    assert st["sem"] == pytest.approx(100 * math.sqrt(0.1875) / 2)
    assert win_rate_stats(scores, bootstrap=0, ddof=1)["sem"] == pytest.approx(100 * math.sqrt(0.25) / 2)
    # on a stored file ddof 0 and 1 differ by well under the tables' 0.1-point precision
    stored = load_judgments(_stored(HH, "3-vs-base-epoch-0.38-helpful.json"))
    s0, s1 = (win_rate_stats(*stored, bootstrap=0, ddof=d)["sem"] for d in (0, 1))
    assert s0 == pytest.approx(100 * np.std(stored[0]) / math.sqrt(250)) and 0 < s1 - s0 < 0.01


def test_balanced_rate_on_hand_made_example():
    # test longer on pairs 0-2 (scores 1, 1, 0 -> 66.67 %); not longer on 3-5 (shorter, equal, equal:
    # scores 0, 0.5, 0 -> 16.67 %); balanced = (66.67 + 16.67) / 2 = 41.67 % (equal strata, so raw too)
    scores = [1, 1, 0, 0, 0.5, 0]
    len_base = [10, 10, 10, 10, 10, 10]
    len_test = [11, 20, 30, 5, 10, 10]
    st = win_rate_stats(scores, len_base, len_test, bootstrap=0)
    assert st["n_longer"] == 3 and st["n_not_longer"] == 3
    assert st["win_rate_longer"] == pytest.approx(200 / 3)
    assert st["win_rate_not_longer"] == pytest.approx(50 / 3)
    assert st["balanced"] == pytest.approx(125 / 3)
    # unequal strata: the balanced rate weighs them equally, the raw rate does not
    st2 = win_rate_stats([1, 1, 1, 0], [1, 1, 1, 1], [2, 2, 2, 1], bootstrap=0)
    assert st2["win_rate"] == pytest.approx(75.0) and st2["balanced"] == pytest.approx(50.0)
    # an empty stratum (or no lengths) leaves the balanced rate undefined
    assert win_rate_stats([1, 0], [1, 1], [2, 3], bootstrap=0)["balanced"] is None
    assert win_rate_stats([1, 0], bootstrap=0)["balanced"] is None


def test_order_agreement_hand_made():
    # first run: score of response X shown first; second run: score of response Y shown first
    ab = [1, 1, 0, 0.5, 0.5, 1, 0]
    ba = [0, 1, 1, 0.5, 0, 0.5, 1]
    # flipped second (about X): [1, 0, 0, 0.5, 1, 0.5, 0]
    # agree:                     y  n  y  y    n  n    y   -> 4 / 7
    assert order_agreement(ab, ba) == pytest.approx(4 / 7)
    assert order_agreement(ab, [1 - x for x in ba], flip_second=False) == pytest.approx(4 / 7)
    assert order_agreement([1, 0], [0, 1]) == 1.0  # a judge that always prefers the same response
    assert order_agreement([1, 1], [1, 1]) == 0.0  # a judge that always prefers slot A
    with pytest.raises(ValueError, match="differ in length"):
        order_agreement([1, 0], [1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        order_agreement([2], [1])


@pytest.mark.parametrize("content, message", [
    ("", "empty file"),
    ("  \n", "empty file"),
    ("[", "not valid JSON"),
    ("[]", "list is empty"),
    ('{"a": 1}', "expected a JSON list"),
    ("[[1, 2]]", "row 0 is 2 values"),
    ("[[1, 2, 3], [0, 4, 5, 6]]", "row 1 is 4 values"),
    ('[[1, 2, 3], "x"]', "row 1 is a str"),
    ('[[1, "long", 3]]', "row 0 has a non-numeric entry"),
    ("[[true, 2, 3]]", "row 0 has a non-numeric entry"),
    ("[[2, 10, 12]]", r"in \[0, 1\]"),
    ("[[1, -1, 12]]", "non-negative"),
])
def test_load_judgments_bad_input_names_file(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        load_judgments(path)
    assert str(path) in str(info.value)


def test_load_judgments_formats(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text("[[1, 10, 12], [0.5, 7, 7], [0, 3, 1]]")
    scores, lb, lt = load_judgments(path)
    np.testing.assert_array_equal(scores, [1, 0.5, 0])
    np.testing.assert_array_equal(lb, [10, 7, 3])
    np.testing.assert_array_equal(lt, [12, 7, 1])
    path.write_text("[1, 0, 0.5, 1]")  # scores only: no lengths, no balanced rate
    scores, lb, lt = load_judgments(path)
    assert lb is None and lt is None
    assert win_rate_stats(scores, lb, lt, bootstrap=0)["win_rate"] == pytest.approx(62.5)


def test_stats_cli_bad_file_fails_cleanly(tmp_path, capsys):
    empty = tmp_path / "empty.json"
    empty.write_text("")
    out = tmp_path / "out.json"
    assert main(["stats", str(empty), "--json", str(out)]) == 1
    err = capsys.readouterr().err
    assert "empty file" in err and str(empty) in err
    assert not out.exists()
    assert main(["stats", str(tmp_path / "missing.json")]) == 1
    assert "missing.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["stats", str(empty), "--bootstrap", "-1"])
    with pytest.raises(SystemExit):
        main([])


def test_win_rate_stats_rejects_bad_arguments():
    with pytest.raises(ValueError, match="no examples"):
        win_rate_stats([])
    with pytest.raises(ValueError, match="both"):
        win_rate_stats([1, 0], [1, 2])
    with pytest.raises(ValueError, match="expected 2 lengths"):
        win_rate_stats([1, 0], [1, 2, 3], [1, 2, 3])
    with pytest.raises(ValueError, match="non-finite"):
        win_rate_stats([1, float("nan")])
    with pytest.raises(ValueError, match="bootstrap"):
        win_rate_stats([1, 0], bootstrap=-5)


def test_module_runs_as_script(tmp_path):
    path = tmp_path / "j.json"
    path.write_text(json.dumps([[1, 5, 9], [0, 5, 3], [1, 5, 5], [0.5, 5, 6]]))
    out = tmp_path / "o.json"
    proc = subprocess.run([sys.executable, "-m", "sami_jax.evaluate", "stats", str(path), "--json", str(out),
                           "--bootstrap", "200"], capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (record,) = json.loads(out.read_text())
    assert record["n"] == 4 and record["win_rate"] == pytest.approx(62.5)
    # longer: scores 1, 0.5 -> 75 %; not longer (shorter, equal): 0, 1 -> 50 %; balanced 62.5 %
    assert record["balanced"] == pytest.approx(62.5)
    assert str(path) in proc.stdout
