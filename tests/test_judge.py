"""Judging (sami_jax/judge.py, `evaluate judge`): both A/B orders, the paper's parse, its seeded draws, the cache
and resume, the OpenAI-compatible client against a stub endpoint, and bad input."""

import json
import random

import numpy as np
import pytest
from openai_stub import Stub, slot_of

from sami_jax import evaluate
from sami_jax import judge as J

CONSTITUTION = "1. Be brief.\n2. Be thorough.\n3. Be kind."


def _pairs(n=6):
    return [J.Pair(id=str(i), query=f"POST: story number {i}", constitution=CONSTITUTION,
                   candidate=f"short {i}", baseline=f"a much longer summary {i} " * 2, len_candidate=3,
                   len_baseline=10 + i) for i in range(n)]


class FakeJudge:
    """Answers with `rule(user_prompt)`; records every prompt it was asked."""

    def __init__(self, rule, fail_after=None):
        self.spec, self.settings = "fake", {"max_tokens": 200}
        self.rule, self.fail_after, self.asked = rule, fail_after, []

    def complete(self, messages):
        if self.fail_after is not None and len(self.asked) + len(messages) > self.fail_after:
            raise J.JudgeError("endpoint went away")
        self.asked += [u for _, u in messages]
        return [self.rule(u) for _, u in messages]


@pytest.mark.parametrize("text, verdict", [
    ("Comparison: ...\nFinal Response: A", "A"), ("Final Response: B", "B"), ("Final Response: A or B", "both"),
    ("Final Response: neither", "neither"), ("Comparison: A is better. B is worse.", None),
    ("Final Response: Summary B is better", "B")])  # "Summary" holds no capital A or B
def test_parse_verdict_is_the_papers(text, verdict):
    assert J.parse_verdict(text) == verdict
    assert J.candidate_score(verdict, "A") == {"A": 1.0, "B": 0.0}.get(verdict, 0.5)


def test_both_orders_position_bias_and_paper_draws(tmp_path):
    pairs = _pairs()
    always_a = FakeJudge(lambda u: "Comparison: first.\nFinal Response: A")
    s = J.judge_pairs(pairs, always_a, "tldr", tmp_path)
    assert len(always_a.asked) == 2 * len(pairs)
    # A judge that always picks slot A: the candidate wins every "candidate first" and loses every other.
    assert s["candidate_first"]["win_rate"] == 100.0 and s["baseline_first"]["win_rate"] == 0.0
    assert s["mean_of_orders"]["win_rate"] == 50.0 and s["order_agreement"] == 0.0
    assert (s["slot_a_picked"], s["slot_b_picked"]) == (2 * len(pairs), 0)
    records = [json.loads(line) for line in (tmp_path / "judgments.jsonl").read_text().splitlines()]
    # The paper's single order: np.random.seed(1); one randint(2) per example (1 = baseline in slot A).
    np.random.seed(1)
    draws = [np.random.randint(2) for _ in pairs]
    assert [r["paper_order"] for r in records] == ["baseline_first" if d else "candidate_first" for d in draws]
    assert s["paper_order"]["win_rate"] == pytest.approx(100.0 * (1 - np.mean(draws)))
    # The shown constitution: one random.Random(1) stream, one shuffle per pair, shared by both orders.
    rng = random.Random(1)
    for r in records:
        principles = ["Be brief.", "Be thorough.", "Be kind."]
        rng.shuffle(principles)
        assert r["constitution"] == "\n".join(f"{i}. {p}" for i, p in enumerate(principles, 1))
    for r, (ab, ba) in zip(records, zip(always_a.asked[::2], always_a.asked[1::2], strict=True), strict=True):
        assert f"### SUMMARIZATION PRINCIPLES\n{r['constitution']}\n" in ab and r["constitution"] in ba
    # win_rates.json is the authors' format, readable by `evaluate stats`.
    scores, _, lt = evaluate.load_judgments(tmp_path / "win_rates.json")
    assert scores.tolist() == [0.5] * len(pairs) and lt.tolist() == [3] * len(pairs)


def test_consistent_judge_agrees_and_unparsed_answers_count(tmp_path):
    pairs = _pairs()

    def prefers_short(user):  # picks the candidate ("short i") wherever it is; no verdict for pair 0
        if "story number 0" in user:
            return "I cannot decide."
        return f"Final Response: {slot_of(user, 'short')}"

    s = J.judge_pairs(pairs, FakeJudge(prefers_short), "tldr", tmp_path)
    assert s["order_agreement"] == 1.0
    assert s["mean_of_orders"]["win_rate"] == pytest.approx(100 * (5 + 0.5) / 6)
    assert s["no_final_response"] == {"candidate_first": 1, "baseline_first": 1}
    assert "no \"Final Response\" in 1 + 1 answers" in evaluate.format_judge_summary(s)


def test_interrupted_run_resumes_from_the_cache(tmp_path):
    pairs = _pairs(8)
    answer = lambda u: f"Final Response: {slot_of(u, 'short')}"
    with pytest.raises(J.JudgeError):
        J.judge_pairs(pairs, FakeJudge(answer, fail_after=7), "tldr", tmp_path, chunk=4)
    assert len((tmp_path / "cache.jsonl").read_text().splitlines()) == 4  # the first chunk was kept
    again = FakeJudge(answer)
    s = J.judge_pairs(pairs, again, "tldr", tmp_path, chunk=4)
    assert len(again.asked) == 12 and s["mean_of_orders"]["win_rate"] == 100.0
    third = FakeJudge(answer)
    J.judge_pairs(pairs, third, "tldr", tmp_path)
    assert third.asked == []


# ------------------------------------------------------------------------------------------- OpenAI client
def test_openai_judge_request_and_retries(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    stub = Stub(good=6)
    try:
        judge = J.make_judge(f"openai:{stub.url}:gpt-4", retries=2, sleep=lambda s: None, concurrency=2)
        s = J.judge_pairs(_pairs(3), judge, "tldr", tmp_path / "a")
        assert s["mean_of_orders"]["win_rate"] == 100.0
        path, headers, body = stub.requests[0]
        assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sk-test"
        assert (body["model"], body["temperature"], body["top_p"], body["max_tokens"]) == ("gpt-4", 0.0, 0.9, 200)
        assert body["messages"][0] == {"role": "system", "content": J.TLDR_SYSTEM}
        # Now the endpoint fails: 2 tries per request, then a clear error; earlier answers stay cached.
        with pytest.raises(J.JudgeError, match="failed after 2 tries: HTTP 503"):
            J.judge_pairs(_pairs(4), judge, "tldr", tmp_path / "a", chunk=2)
        assert len((tmp_path / "a" / "cache.jsonl").read_text().splitlines()) == 6
    finally:
        stub.close()


def test_unreachable_endpoint(tmp_path):
    stub = Stub()
    url = stub.url
    stub.close()  # nothing listens there any more
    judge = J.make_judge(f"openai:{url}:m", retries=3, timeout=5, sleep=lambda s: None)
    with pytest.raises(J.JudgeError, match=r"failed after 3 tries: URLError"):
        J.judge_pairs(_pairs(1), judge, "tldr", tmp_path)


# ------------------------------------------------------------------------------------------- files and CLI
def _write_authors(path, queries, responses):
    path.write_text(json.dumps({"constitution": {str(i): CONSTITUTION for i in range(len(queries))},
                                "question": {str(i): q for i, q in enumerate(queries)},
                                "response": {str(i): r for i, r in enumerate(responses)}}))


def test_cli_judges_authors_files_and_rejects_bad_input(tmp_path, capsys):
    queries = [f"POST: post {i}" for i in range(4)]
    _write_authors(tmp_path / "cand.json", queries, [f"short {i}" for i in range(4)])
    _write_authors(tmp_path / "base.json", queries, [f"long long long {i}" for i in range(4)])
    stub = Stub()
    try:
        rc = evaluate.main(["judge", f"--candidate={tmp_path / 'cand.json'}", f"--baseline={tmp_path / 'base.json'}",
                            f"--judge=openai:{stub.url}:m", "--task=tldr", f"--out={tmp_path / 'out'}"])
        assert rc == 0 and len(stub.requests) == 8
        summary = json.loads((tmp_path / "out" / "summary.json").read_text())
        assert summary["n"] == 4 and summary["mean_of_orders"]["win_rate"] == 100.0
        assert "orders agree on 100.0% of pairs" in capsys.readouterr().out

        _write_authors(tmp_path / "other.json", [*queries[:3], "POST: a different post"], ["x"] * 4)
        rc = evaluate.main(["judge", f"--candidate={tmp_path / 'cand.json'}", f"--baseline={tmp_path / 'other.json'}",
                            f"--judge=openai:{stub.url}:m", "--task=tldr", f"--out={tmp_path / 'out2'}"])
        assert rc == 1 and "query 3 differs" in capsys.readouterr().err
        _write_authors(tmp_path / "short.json", queries[:3], ["x"] * 3)
        rc = evaluate.main(["judge", f"--candidate={tmp_path / 'cand.json'}", f"--baseline={tmp_path / 'short.json'}",
                            f"--judge=openai:{stub.url}:m", "--task=tldr", f"--out={tmp_path / 'out3'}"])
        assert rc == 1 and "cover different queries: 1 only in the" in capsys.readouterr().err
        (tmp_path / "empty.jsonl").write_text("")
        rc = evaluate.main(["judge", f"--candidate={tmp_path / 'empty.jsonl'}", f"--baseline={tmp_path / 'base.json'}",
                            f"--judge=openai:{stub.url}:m", "--task=tldr", f"--out={tmp_path / 'out4'}"])
        assert rc == 1 and "empty.jsonl: empty file" in capsys.readouterr().err
        assert len(stub.requests) == 8  # no bad input reached the judge
    finally:
        stub.close()


def test_bad_judge_specs(tmp_path):
    with pytest.raises(ValueError, match="expected openai:BASE_URL:MODEL"):
        J.make_judge("openai:http://127.0.0.1:8000/v1")
    with pytest.raises(ValueError, match="expected openai:BASE_URL:MODEL"):
        J.make_judge("openai:127.0.0.1:8000/v1:m")
    with pytest.raises(ValueError, match="no such model path"):
        J.make_judge(str(tmp_path / "nope"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "response": "r"}\n{"query": "q2"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected a string \"response\""):
        J.read_responses(bad)
