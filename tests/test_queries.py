"""Query loading: HH first human turns and TL;DR posts from the real shared data, generic jsonl,
seeded splits, file:line errors, and the bundled demo sets."""

import gzip
import json

import pytest
from conftest import HH_TEST, SHARED, _require

from sami_jax.data.queries import (
    QueryDataError,
    bundled_queries,
    load_queries,
    load_queries_counted,
    split_queries,
)

RESPONSES = SHARED / "data" / "sami" / "janphilippfranken_sami" / "experiments" / "tldr" / "results" / "responses"


def _independent_first_turn(dialogue):
    # Written differently from the module: index arithmetic instead of partition.
    start = dialogue.index("Human: ") + len("Human: ")
    end = dialogue.find("Assistant: ", start)
    return (dialogue[start:] if end < 0 else dialogue[start:end]).strip()


def test_hh_first_ten_match_independent_parse(hh_texts):
    expected = list(dict.fromkeys(_independent_first_turn(t) for t in hh_texts))[:10]
    assert load_queries(HH_TEST, limit=10) == expected
    assert load_queries(HH_TEST, kind="hh", limit=10) == expected
    assert not any(q.startswith("Human:") or "\n\nAssistant" in q for q in expected)


def test_hh_all_lines_load(hh_texts):
    assert len(hh_texts) == 2312
    queries = load_queries(HH_TEST)
    every = [_independent_first_turn(t) for t in hh_texts]
    assert all(every) and all(queries)
    assert queries == list(dict.fromkeys(every))  # all 2,312 lines parsed, repeats dropped in order
    assert len(queries) == len(set(every)) < 2312


def test_hh_shuffle_and_limit(hh_texts):
    full = load_queries(HH_TEST)
    a = load_queries(HH_TEST, shuffle_seed=3, limit=50)
    assert a == load_queries(HH_TEST, shuffle_seed=3, limit=50) and len(a) == 50
    assert a != full[:50] and set(a) <= set(full)


def test_tldr_response_file():
    files = sorted(_require(RESPONSES).glob("*.json"))
    assert len(files) == 18
    posts = load_queries(files[0])
    assert len(posts) == 250 and posts == load_queries(files[0], kind="tldr")
    assert all(p and not p.startswith("POST:") and p == p.strip() for p in posts)
    questions = json.loads(files[0].read_text())["question"]
    assert posts[0] == questions["0"].removeprefix("POST: ").strip()
    assert posts[249] == questions["249"].removeprefix("POST: ").strip()
    assert load_queries(files[-1]) == posts  # every model saw the same 250 posts


def test_tldr_jsonl_and_generic_jsonl_round_trip(tmp_path):
    rows = ["What is 2+2?", "  Tell me about otters. ", "Line one\nline two", "What is 2+2?", "é ü 日本"]
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps({"query": q, "id": i}) for i, q in enumerate(rows)) + "\n\n")
    expected = ["What is 2+2?", "Tell me about otters.", "Line one\nline two", "é ü 日本"]
    assert load_queries(path) == expected == load_queries(str(path), kind="jsonl")
    gz = tmp_path / "posts.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"post": q, "title": "t"}) + "\n" for q in rows)
    assert load_queries(gz) == expected == load_queries(gz, kind="tldr")


def test_split_deterministic_and_disjoint():
    queries = [f"query {i}" for i in range(100)]
    train, held = split_queries(queries, held_out=10, seed=7)
    assert (train, held) == split_queries(list(queries), held_out=10, seed=7)
    assert len(held) == 10 and len(train) == 90
    assert set(train).isdisjoint(held) and sorted(train + held) == sorted(queries)
    assert split_queries(queries, held_out=10, seed=8)[1] != held
    # Pinned: numpy's PCG64 permutation stream is the same on every platform and numpy >= 1.17.
    assert held[:5] == ["query 88", "query 42", "query 26", "query 50", "query 54"]
    with pytest.raises(ValueError):
        split_queries(queries, held_out=101, seed=0)


def _hh(text):
    return json.dumps({"chosen": text, "rejected": text})


@pytest.mark.parametrize("lines, kind, message", [
    ([_hh("\n\nHuman: hi\n\nAssistant: hello")] * 16 + ["{not json"], "hh", ":17: not valid JSON"),
    ([_hh("\n\nHuman: a\n\nAssistant: b"), _hh("\n\nHuman: c\n\nAssistant: d"), json.dumps({"rejected": "x"})],
     "hh", ':3: no "chosen" field'),
    ([_hh(f"\n\nHuman: q{i}\n\nAssistant: a") for i in range(4)] + [_hh("\n\nAssistant: no human here")],
     "auto", ':5: no "Human: " turn'),
    ([json.dumps({"query": "fine"}), json.dumps({"query": 3})], "jsonl", ':2: "query" is int'),
    ([json.dumps({"text": "x"})], "auto", ":1: cannot tell the kind"),
    ([json.dumps({"query": "fine"}), json.dumps({"query": " \n\t "})], "jsonl", ":2: empty query"),
    ([json.dumps({"post": "a post"})] * 2 + [json.dumps({"post": ""})], "tldr", ":3: empty query"),
    ([_hh("\n\nHuman:   \n\nAssistant: hello")], "hh", ":1: empty query"),
    (["[1, 2]"], "jsonl", ":1: expected a JSON object, got list"),
])
def test_errors_name_file_and_line(tmp_path, lines, kind, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(QueryDataError) as e:
        load_queries(path, kind=kind)
    assert str(e.value).startswith(f"{path}{message}")


def test_errors_empty_and_missing_files(tmp_path):
    for name, content in [("empty.jsonl", ""), ("blank.jsonl", "\n \n"), ("empty.json", "")]:
        (tmp_path / name).write_text(content)
        with pytest.raises(QueryDataError, match=f"{tmp_path / name}: empty file"):
            load_queries(tmp_path / name)
    with pytest.raises(QueryDataError, match="no such file"):
        load_queries(tmp_path / "missing.jsonl")
    bad = tmp_path / "resp.json"
    bad.write_text(json.dumps({"question": {"0": "no prefix"}}))
    with pytest.raises(QueryDataError, match=r'resp.json: question\[0\] does not start with "POST: "'):
        load_queries(bad)
    with pytest.raises(ValueError, match="kind must be one of"):
        load_queries(bad, kind="reddit")


def test_bundled_sets():
    dialogue, post = bundled_queries("dialogue"), bundled_queries("post")
    assert len(dialogue) >= 40 and len(post) >= 12
    for items in (dialogue, post):
        assert all(isinstance(q, str) and q.strip() == q and q for q in items)
        assert len(set(items)) == len(items)
    assert not any(q.startswith(("Human:", "POST:")) for q in dialogue + post)
    with pytest.raises(ValueError, match="dialogue"):
        bundled_queries("tweets")


def _mixed_lines():
    """Four good queries (one repeated) among five malformed lines of every kind."""
    return [
        json.dumps({"query": "first"}),
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"query": "second"}),
        json.dumps({"query": 3}),
        json.dumps({"query": "   "}),
        json.dumps({"other": "no query field"}),
        json.dumps({"query": "first"}),
        "",
        json.dumps({"query": " third "}),
    ]


def test_skip_bad_lines_skips_and_counts(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(_mixed_lines()) + "\n")
    with pytest.raises(QueryDataError, match=":2: not valid JSON"):
        load_queries(path, kind="jsonl")  # default: the first bad line stops the load
    assert load_queries(path, kind="jsonl", skip_bad_lines=True) == ["first", "second", "third"]
    # 5 malformed lines; the repeat and the blank line are not malformed.
    assert load_queries_counted(path, kind="jsonl", skip_bad_lines=True) == (["first", "second", "third"], 5)
    assert load_queries_counted(path, kind="jsonl", skip_bad_lines=True, limit=1) == (["first"], 5)
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"query": "only"}) + "\n")
    assert load_queries_counted(good) == (["only"], 0)


def test_skip_bad_lines_hh_and_detection(tmp_path):
    lines = ["garbage", json.dumps({"text": "unknown fields"}), _hh("\n\nHuman: q1\n\nAssistant: a"),
             _hh("\n\nAssistant: no human turn"), json.dumps({"rejected": "no chosen"}),
             _hh("\n\nHuman: \n\nAssistant: empty turn"), _hh("\n\nHuman: q2\n\nAssistant: b")]
    path = tmp_path / "hh.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(QueryDataError, match=":1: not valid JSON"):
        load_queries(path)
    # Auto-detection looks past the malformed first lines to the first row with a known field ("chosen").
    assert load_queries_counted(path, skip_bad_lines=True) == (["q1", "q2"], 5)


def test_skip_bad_lines_response_file_entries(tmp_path):
    path = tmp_path / "responses.json"
    path.write_text(json.dumps({"question": {"1": "POST: b", "0": "POST: a", "2": "no prefix", "3": "POST:   ",
                                             "4": 5}}))
    with pytest.raises(QueryDataError, match=r'question\[2\] does not start with "POST: "'):
        load_queries(path)
    assert load_queries_counted(path, skip_bad_lines=True) == (["a", "b"], 3)
    path.write_text(json.dumps({"question": "not an object"}))  # whole-file problems still raise
    with pytest.raises(QueryDataError, match='no "question" object'):
        load_queries(path, skip_bad_lines=True)


def test_skip_bad_lines_all_bad_is_still_an_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("{nope\n" + json.dumps({"query": ""}) + "\n")
    with pytest.raises(QueryDataError, match=r"no queries \(2 malformed skipped, first: .*bad.jsonl:1: not valid"):
        load_queries(path, kind="jsonl", skip_bad_lines=True)
    path.write_text("{nope\n" + json.dumps({"text": "no known field"}) + "\n")
    with pytest.raises(QueryDataError, match="cannot tell the kind: no line has"):
        load_queries(path, skip_bad_lines=True)
