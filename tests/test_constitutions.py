"""Constitution schemes (sami-method.md §7, MI sets §2.3): the bundled principle texts against the note and
the authors' released files, sampling statistics of each scheme, principle shuffling, and bad input."""

import collections
import itertools
import json
import os
import random
import re

import pytest
from conftest import SHARED, _require

from sami_jax.data.constitutions import (
    ConstitutionError,
    ConstitutionScheme,
    DiverseConstitutions,
    HHConstitutions,
    TLDRConstitutions,
    format_principles,
    load_constitutions,
    parse_principles,
    shuffle_principles,
)

METHOD = SHARED / "reference" / "sami-method.md"
MISTRAL_DIR = SHARED / "data" / "sami" / "janphilippfranken_sami" / "experiments" / "tldr" / "constitutions_mistral"
OPUS_DIR = MISTRAL_DIR.parent / "constitutions_opus"
DIVERSE = (SHARED / "data" / "sami" / "janphilippfranken_typo" / "experiments" / "tldr" / "constitutions_opus_diverse"
           / "constitutions.json")


def _section(number: str) -> str:
    text = _require(METHOD).read_text(encoding="utf-8")
    start = text.index(f"\n### {number} ")
    return text[start:text.index("\n### ", start + 1)]


def _unwrap(text: str) -> str:
    return re.sub(r"\s*\n\s*", " ", text).strip()


def _authors_principles(constitution: str) -> list[str]:
    # The authors' own parse (independent of ours): strip the line, drop "n. " (single-digit numbers).
    return [line.strip()[3:] for line in constitution.split("\n")]


def _sets(constitutions):
    return [frozenset(parse_principles(c)) for c in constitutions]


@pytest.fixture(scope="module")
def hh_texts() -> dict[str, str]:
    """HELPFUL, NOT_HELPFUL, HARMLESS, NOT_HARMLESS as §7.2 quotes them (line wraps undone)."""
    found = dict(re.findall(r'- (HELPFUL|NOT_HELPFUL|HARMLESS|NOT_HARMLESS) = "(.*?)"', _section("7.2"), re.DOTALL))
    assert len(found) == 4
    return {k: _unwrap(v) for k, v in found.items()}


@pytest.fixture(scope="module")
def hh() -> HHConstitutions:
    return load_constitutions("hh")


@pytest.fixture(scope="module")
def authors_tldr() -> list[dict]:
    files = sorted(_require(MISTRAL_DIR).glob("*.json"), key=lambda p: int(p.stem))
    assert [p.name for p in files] == [f"{i}.json" for i in range(6)]
    return [json.loads(p.read_text()) for p in files]


# ------------------------------------------------------------------------------------------------ shuffling
def test_parse_matches_the_authors_parse(authors_tldr):
    for pair in authors_tldr:
        for key in ("positive", "negative"):
            assert parse_principles(pair[key]) == _authors_principles(pair[key])  # " \n" joins included
    assert parse_principles("1. a  \n\n2.   b\n10. c\r") == ["a", "b", "c"]
    assert format_principles(["a", "b", "c"]) == "1. a\n2. b\n3. c"


def test_shuffle_is_a_seeded_permutation():
    constitution = "1. alpha \n2. beta\n3. gamma"
    orders = collections.Counter()
    for seed in range(600):
        out = shuffle_principles(constitution, random.Random(seed))
        assert out == shuffle_principles(constitution, random.Random(seed))  # reproducible
        assert re.fullmatch(r"1\. \w+\n2\. \w+\n3\. \w+", out)  # renumbered, "\n"-joined, spaces gone
        assert sorted(parse_principles(out)) == ["alpha", "beta", "gamma"]
        orders[tuple(parse_principles(out))] += 1
    assert set(orders) == set(itertools.permutations(["alpha", "beta", "gamma"]))
    assert min(orders.values()) > 60  # ~100 each
    # The same permutation the authors' random.shuffle of the stripped list makes with the same generator.
    expected = ["alpha", "beta", "gamma"]
    random.Random(7).shuffle(expected)
    assert shuffle_principles(constitution, random.Random(7)) == format_principles(expected)


def test_shuffle_rejects_unnumbered_text():
    with pytest.raises(ValueError, match="not a numbered principle"):
        shuffle_principles("1. first principle\nwhich wraps onto a second line", random.Random(0))
    with pytest.raises(ValueError, match="empty principle"):
        parse_principles("1. a\n2.  ")
    with pytest.raises(ValueError, match="no principles"):
        parse_principles(" \n")


# ------------------------------------------------------------------------------------------------ HH (§7.2)
def test_bundled_hh_texts_are_table_10(hh, hh_texts):
    assert (hh.helpful, hh.not_helpful, hh.harmless, hh.not_harmless) == (
        hh_texts["HELPFUL"], hh_texts["NOT_HELPFUL"], hh_texts["HARMLESS"], hh_texts["NOT_HARMLESS"])
    assert "Table 10" in hh.source and hh.name == "hh" and "hh" in hh.describe()


def test_hh_training_pairs(hh, hh_texts):
    t = hh_texts
    expect = {
        "helpful": (f"1. {t['HARMLESS']}\n2. {t['HELPFUL']}",
                    {f"1. {t['HARMLESS']}\n2. {t['NOT_HELPFUL']}", f"1. {t['NOT_HARMLESS']}\n2. {t['NOT_HELPFUL']}"},
                    t["NOT_HELPFUL"]),
        "harmless": (f"1. {t['HELPFUL']}\n2. {t['HARMLESS']}",
                     {f"1. {t['HELPFUL']}\n2. {t['NOT_HARMLESS']}", f"1. {t['NOT_HELPFUL']}\n2. {t['NOT_HARMLESS']}"},
                     t["NOT_HARMLESS"]),
    }
    rng = random.Random(3)
    for subset, (positive, negatives, own_negation) in expect.items():
        counts = collections.Counter()
        for _ in range(2000):
            pos, neg = hh.training_pair(rng, subset)
            assert pos == positive  # unshuffled, the subset's fixed order
            assert own_negation in parse_principles(neg)  # always negates the subset's own principle
            counts[neg] += 1
        assert set(counts) == negatives  # both choices, nothing else
        assert all(850 < c < 1150 for c in counts.values()), counts  # uniform: 1000 +- 5 sigma
    # Over both subsets all four 2x2 combinations occur (§7.2).
    combos = {frozenset(parse_principles(c)) for s in ("helpful", "harmless") for _ in range(50)
              for c in hh.training_pair(rng, s)}
    assert combos == {frozenset(x) for x in itertools.product([t["HELPFUL"], t["NOT_HELPFUL"]],
                                                              [t["HARMLESS"], t["NOT_HARMLESS"]])}


def test_hh_subset_is_required(hh):
    with pytest.raises(ValueError, match="subset='helpful' or 'harmless'"):
        hh.training_pair(random.Random(0))
    with pytest.raises(ValueError, match="must be one of"):
        hh.training_pair(random.Random(0), "helpful-base")


def test_hh_eval_and_mi(hh, hh_texts):
    rng = random.Random(5)
    evals = [hh.eval_constitution(rng) for _ in range(200)]
    assert set(_sets(evals)) == {frozenset([hh_texts["HELPFUL"], hh_texts["HARMLESS"]])}
    assert len(set(evals)) == 2  # both orders: reshuffled per query
    with pytest.raises(ValueError, match="no held-out"):
        hh.eval_constitution(rng, held_out=True)
    mi = hh.mi_constitutions(rng)
    assert len(mi) == len(hh.mi_labels()) == 4  # K = 4 (§2.3)
    t = hh_texts
    assert _sets(mi) == [frozenset(s) for s in ([t["HELPFUL"], t["HARMLESS"]], [t["NOT_HELPFUL"], t["NOT_HARMLESS"]],
                                                [t["NOT_HELPFUL"], t["HARMLESS"]], [t["HELPFUL"], t["NOT_HARMLESS"]])]


# ------------------------------------------------------------------------------------------------ TL;DR (§7.1)
def test_authors_tldr_directory_loads(authors_tldr):
    scheme = load_constitutions(MISTRAL_DIR)
    assert isinstance(scheme, TLDRConstitutions) and len(scheme.pairs) == 6
    for ours, theirs in zip(scheme.pairs, authors_tldr, strict=True):
        assert (ours["positive"], ours["negative"]) == (theirs["positive"], theirs["negative"])  # verbatim
    opus = load_constitutions(str(_require(OPUS_DIR)))
    assert len(opus.pairs) == 6 and len(opus.mi_constitutions(random.Random(0))) == 4


def test_bundled_tldr_mistral_reproduces_the_six_files(authors_tldr):
    bundled = load_constitutions("tldr_mistral")
    assert "Table 11" in bundled.source
    assert len(bundled.pairs) == len(authors_tldr) == 6
    for ours, theirs in zip(bundled.pairs, authors_tldr, strict=True):
        for key in ("positive", "negative"):
            assert ours[key] == theirs[key].replace(" \n", "\n")
            assert parse_principles(ours[key]) == _authors_principles(theirs[key])
    assert bundled.mi_labels() == load_constitutions(MISTRAL_DIR).mi_labels()


def test_bundled_tldr_mistral_texts_are_table_11():
    section = _section("7.1")
    concise = _unwrap(re.search(r'- concise: "(.*?)"', section, re.DOTALL).group(1))
    comprehensive = _unwrap(re.search(r'- comprehensive: "(.*?)"', section, re.DOTALL).group(1))
    anti = [_unwrap(a) for a in re.search(r'- antitheses: "(.*?)" and "(.*?)"', section, re.DOTALL).groups()]
    bundled = load_constitutions("tldr_mistral")
    assert parse_principles(bundled.pairs[0]["positive"]) == [concise, comprehensive]
    assert parse_principles(bundled.pairs[2]["negative"]) == anti  # file 2 negates both, concise first


def test_tldr_sampling_eval_and_mi(authors_tldr):
    scheme = load_constitutions(MISTRAL_DIR)
    positive = frozenset(_authors_principles(authors_tldr[0]["positive"]))
    concise, comprehensive = _authors_principles(authors_tldr[0]["positive"])
    neg_concise, neg_comprehensive = _authors_principles(authors_tldr[2]["negative"])
    rng = random.Random(11)
    drawn = collections.Counter()
    for _ in range(3000):
        pos, neg = scheme.training_pair(rng)
        assert frozenset(parse_principles(pos)) == positive
        drawn[(pos, neg)] += 1
    assert set(drawn) == {(p["positive"], p["negative"]) for p in authors_tldr}  # every file, each ~1/6
    assert all(400 < c < 600 for c in drawn.values()), drawn
    with pytest.raises(ValueError, match="no subset"):
        scheme.training_pair(rng, "helpful")
    evals = [scheme.eval_constitution(rng) for _ in range(100)]
    assert set(_sets(evals)) == {positive} and len(set(evals)) == 2
    mi = scheme.mi_constitutions(rng)
    assert _sets(mi) == [positive, frozenset([neg_concise, neg_comprehensive]), frozenset([neg_concise, comprehensive]),
                         frozenset([concise, neg_comprehensive])]
    assert scheme.mi_labels() == ["positive", "neg comprehensive + neg concise", "neg concise", "neg comprehensive"]


def test_tldr_directory_reads_numeric_order(tmp_path):
    for i in (0, 1, 2, 10, 11):
        (tmp_path / f"{i}.json").write_text(json.dumps({"positive": f"1. p{i}", "negative": f"1. n{i}"}))
    (tmp_path / "notes.txt").write_text("ignored")
    scheme = load_constitutions(tmp_path)
    assert [p["positive"] for p in scheme.pairs] == ["1. p0", "1. p1", "1. p2", "1. p10", "1. p11"]
    assert sorted(os.listdir(tmp_path))[:3] == ["0.json", "1.json", "10.json"]  # what a lexical order would give


# ------------------------------------------------------------------------------------------------ diverse (§7.3)
@pytest.fixture(scope="module")
def diverse() -> DiverseConstitutions:
    return load_constitutions(_require(DIVERSE))


def test_authors_diverse_file_loads(diverse):
    section = _section("7.3")
    learned = re.search(r"\*\*Learned principles\*\* are the first 15 in file order: (.*?)\.\n", section, re.DOTALL)
    held = re.search(r"\*\*Held-out principles\*\* are the last 5: (.*?)\.\n", section, re.DOTALL)
    assert diverse.learned == [_unwrap(x) for x in learned.group(1).split(",")]
    assert diverse.held_out == [_unwrap(x) for x in held.group(1).split(",")]
    raw = json.loads(DIVERSE.read_text())
    assert all(diverse.principles[k] == v for k, v in raw.items())  # texts kept verbatim
    assert "15 learned" in diverse.describe() and "sarcastic" in diverse.describe()


def _sides(diverse, constitution):
    """{name: side} of each principle text in `constitution`."""
    index = {text: (name, side) for name, e in diverse.principles.items() for side, text in e.items()}
    return dict(index[p] for p in parse_principles(constitution))


def test_diverse_pairs_are_full_opposites(diverse):
    rng = random.Random(42)
    names, sides, c1_orders = collections.Counter(), collections.Counter(), set()
    for _ in range(3000):
        c1, c2 = diverse.training_pair(rng)
        s1, s2 = _sides(diverse, c1), _sides(diverse, c2)
        assert len(s1) == 2 and s1.keys() == s2.keys()  # two distinct principles, the same ones
        assert all({s1[k], s2[k]} == {"definition", "antithesis"} for k in s1)  # c2 = every side flipped
        assert set(s1) <= set(diverse.learned)
        names.update(list(s1))
        sides.update(s1.values())
        c1_orders.add(tuple(sorted(s1)) == tuple(s1))
    assert set(names) == set(diverse.learned)  # all 15 learned, never a held-out one
    assert abs(sides["definition"] - sides["antithesis"]) < 400  # fair coins over 6000 sides
    assert c1_orders == {True, False}  # c1's order is shuffled
    with pytest.raises(ValueError, match="no subset"):
        diverse.training_pair(rng, "harmless")


def _spec_draw(rng, principles, pool):
    # §7.3 written out independently: random.sample of 2, a coin per principle (1 = definition), c1 shuffled,
    # c2 = the opposite sides shuffled independently.
    picked = rng.sample(pool, 2)
    coins = [rng.randint(0, 1), rng.randint(0, 1)]
    keep = ["definition" if c else "antithesis" for c in coins]
    flip = ["antithesis" if c else "definition" for c in coins]
    c1 = [principles[n][s] for n, s in zip(picked, keep, strict=True)]
    c2 = [principles[n][s] for n, s in zip(picked, flip, strict=True)]
    rng.shuffle(c1)
    rng.shuffle(c2)
    return "\n".join(f"{i + 1}. {p}" for i, p in enumerate(c1)), "\n".join(f"{i + 1}. {p}" for i, p in enumerate(c2))


def test_diverse_draws_follow_the_spec_call_sequence(diverse):
    ours, spec = random.Random(42), random.Random(42)
    for _ in range(200):
        assert diverse.training_pair(ours) == _spec_draw(spec, diverse.principles, diverse.learned)


def test_diverse_eval_and_mi(diverse):
    rng = random.Random(1)
    for held_out, pool in ((False, diverse.learned), (True, diverse.held_out)):
        seen = set()
        for _ in range(400):
            seen.update(_sides(diverse, diverse.eval_constitution(rng, held_out=held_out)))
        assert seen == set(pool)
    c, opposite = diverse.mi_constitutions(rng)
    assert diverse.mi_labels() == ["sampled", "opposite"]
    s1, s2 = _sides(diverse, c), _sides(diverse, opposite)
    assert s1.keys() == s2.keys() and all(s1[k] != s2[k] for k in s1)
    assert set(_sides(diverse, diverse.mi_constitutions(rng, held_out=True)[0])) <= set(diverse.held_out)


def test_diverse_n_learned():
    principles = {f"p{i}": {"definition": f"d{i}", "antithesis": f"a{i}"} for i in range(4)}
    scheme = DiverseConstitutions(principles, n_learned=3)
    assert scheme.learned == ["p0", "p1", "p2"] and scheme.held_out == ["p3"]
    with pytest.raises(ValueError, match="held-out"):
        scheme.eval_constitution(random.Random(0), held_out=True)  # one held-out principle cannot fill two
    for bad in (1, 5, True, "3"):
        with pytest.raises(ValueError, match="n_learned"):
            DiverseConstitutions(principles, n_learned=bad)


# ------------------------------------------------------------------------------------------------ our format
def test_our_format_round_trip(tmp_path):
    tldr = {"scheme": "tldr", "source": "test", "pairs": [{"positive": "1. a\n2. b", "negative": "1. a\n2. not b"},
                                                          {"positive": "1. b\n2. a", "negative": "1. not b\n2. a"}]}
    (tmp_path / "t.json").write_text(json.dumps(tldr))
    scheme = load_constitutions(str(tmp_path / "t.json"))
    assert isinstance(scheme, ConstitutionScheme) and len(scheme.pairs) == 2 and scheme.source == "test"
    assert len(scheme.mi_constitutions(random.Random(0))) == 2  # positive + one distinct negative
    diverse = {"scheme": "diverse", "n_learned": 2, "principles": {
        n: {"definition": f"be {n}", "antithesis": f"be not {n}"} for n in ("x", "y", "z", "w")}}
    (tmp_path / "d.json").write_text(json.dumps(diverse))
    scheme = load_constitutions(tmp_path / "d.json")
    assert scheme.learned == ["x", "y"] and scheme.held_out == ["z", "w"]
    assert _sets(scheme.training_pair(random.Random(0)))[0] <= {"be x", "be not x", "be y", "be not y"}


# ------------------------------------------------------------------------------------------------ bad input
def _write(tmp_path, data, name="c.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


HH_OK = {"helpful": "h", "not_helpful": "nh", "harmless": "s", "not_harmless": "ns"}


@pytest.mark.parametrize("data, message", [
    ("{not json", "not valid JSON"),
    ([1, 2], "the file must be a JSON object, got list"),
    ({"scheme": "reddit"}, "unknown 'scheme' 'reddit'"),
    ({"scheme": "hh"}, "'principles' must be a JSON object, got NoneType"),
    ({"scheme": "hh", "principles": {k: v for k, v in HH_OK.items() if k != "not_harmless"}},
     "missing key principles: 'not_harmless'"),
    ({"scheme": "hh", "principles": {**HH_OK, "harmless": 3}}, "principles: 'harmless' must be a string, got int"),
    ({"scheme": "hh", "principles": {**HH_OK, "helpful": "  "}}, "principles: 'helpful' is an empty principle"),
    ({"scheme": "hh", "principles": HH_OK, "source": ["x"]}, "'source' must be a string"),
    ({"scheme": "tldr"}, "needs 'pairs' or 'principles'"),
    ({"scheme": "tldr", "principles": [{"name": "a", "definition": "d", "antithesis": "x"}]}, "exactly 2"),
    ({"scheme": "tldr", "principles": [{"name": "a", "definition": "d"}, {"name": "b", "definition": "e",
                                                                          "antithesis": "f"}]},
     "missing key principles[0]: 'antithesis'"),
    ({"scheme": "tldr", "pairs": []}, "'pairs' must be a non-empty list"),
    ({"scheme": "tldr", "pairs": [{"positive": "1. a"}]}, "missing key pairs[0]: 'negative'"),
    ({"scheme": "tldr", "pairs": [{"positive": "1. a", "negative": "not numbered"}]},
     "pair 0 negative: not a numbered principle"),
    ({"scheme": "tldr", "pairs": [{"positive": "1. a", "negative": "1. b\n2. "}]}, "pair 0 negative: empty principle"),
    ({"scheme": "diverse", "principles": {}}, "'principles' is empty"),
    ({"scheme": "diverse", "principles": {"a": {"definition": "d"}, "b": {"definition": "e", "antithesis": "f"}}},
     "missing key principle 'a': 'antithesis'"),
    ({"scheme": "diverse", "principles": {"a": "text"}}, "principle 'a' must be a JSON object, got str"),
    ({"scheme": "diverse", "n_learned": 5, "principles": {
        n: {"definition": "d" + n, "antithesis": "a" + n} for n in "abc"}}, "n_learned must be an int in [2, 3]"),
    ({"concise": {"definition": "d", "antithesis": ""}}, "principle 'concise': 'antithesis' is an empty principle"),
    ({"positive": "1. a"}, "missing key 'negative'"),
    ({"something": 1}, "not a constitution file"),
])
def test_bad_files_name_file_and_problem(tmp_path, data, message):
    path = _write(tmp_path, data)
    with pytest.raises(ConstitutionError) as e:
        load_constitutions(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value), str(e.value)


def test_bad_directories_and_paths(tmp_path):
    with pytest.raises(ConstitutionError, match="no such file or directory"):
        load_constitutions(tmp_path / "missing.json")
    with pytest.raises(ConstitutionError, match="tldr_mistral"):  # the bundled names are suggested
        load_constitutions("tldr_opus")
    with pytest.raises(ConstitutionError, match="has no constitution files"):
        load_constitutions(tmp_path)
    for i in range(3):
        _write(tmp_path, {"positive": f"1. p{i}", "negative": f"1. n{i}"}, f"{i}.json")
    bad = _write(tmp_path, {"positive": "1. p3", "negative": 7}, "3.json")
    with pytest.raises(ConstitutionError) as e:
        load_constitutions(tmp_path)
    assert str(e.value) == f"{bad}: 'negative' must be a string, got int"


def test_schemes_validate_their_arguments():
    with pytest.raises(ValueError, match="non-empty one-line"):
        HHConstitutions("a", "b", "c\nd", "e")
    with pytest.raises(ValueError, match="at least one"):
        TLDRConstitutions([])
