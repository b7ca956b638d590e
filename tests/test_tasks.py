"""Task templates, post-processing, filters and stop strings against the rules of sami-method.md §3.5,
§3.6 and the verbatim prompts of §6 (parsed out of the note itself)."""

import dataclasses
import json
import random
import re

import pytest
from conftest import SHARED

from sami_jax.data.tasks import SAMI_TLDR_FILTER, TASKS, Task, get_task

METHOD = SHARED / "reference" / "sami-method.md"
HH, TLDR, COT = TASKS["hh"], TASKS["tldr"], TASKS["tldr_cot"]


@pytest.fixture(scope="module")
def method_text() -> str:
    if not METHOD.exists():
        pytest.skip(f"needs the method note at {METHOD} (../shared/reference is absent on this machine)")
    return METHOD.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def blocks(method_text) -> dict[str, list[str]]:
    """Fenced code blocks per "### n.m" section (headings inside fences are prompt text, not sections),
    with the note's ⏎ marker turned back into the trailing space it stands for."""
    out: dict[str, list[str]] = {}
    section, fence = None, None
    for line in method_text.splitlines():
        if line.startswith("```"):
            if fence is None:
                fence = []
            else:
                out.setdefault(section, []).append("\n".join(fence).replace("⏎", " "))
                fence = None
        elif fence is not None:
            fence.append(line)
        elif m := re.match(r"### (\d+\.\d+) ", line):
            section = m.group(1)
    return out


# ------------------------------------------------------------------------------------------------ templates
def test_templates_are_verbatim(blocks, method_text):
    assert "⏎" in method_text  # the trailing-space markers were there to replace
    assert blocks["6.1"][0] == TLDR.generation_template
    assert blocks["6.2"][0] == TLDR.training_template == COT.training_template
    assert blocks["6.3"][0] == COT.generation_template
    assert blocks["6.4"][0] == HH.generation_template
    assert blocks["6.4"][1] == HH.training_template
    # The trailing spaces the ⏎ marks stand for are in the templates.
    assert "in the constitution. \n\n### Main Task\nSummarization Constitution: \n{constitution}" in \
        TLDR.generation_template
    assert TLDR.training_template.endswith("Summary:") and HH.training_template.endswith("Assistant:")
    assert TLDR.generation_template.endswith("Summary: The post")


def test_prompts_fill_constitution_and_tagged_question(blocks):
    constitution, post = "1. Be brief.\n2. Be complete.", "I lost my keys at the park today."
    expected = blocks["6.1"][0].replace("{constitution}", constitution).replace("{question}", "POST: " + post)
    assert TLDR.generation_prompt(constitution, post) == expected
    expected = blocks["6.2"][0].replace("{constitution}", constitution).replace("{question}", "POST: " + post)
    assert TLDR.training_prompt(constitution, post) == expected
    turn = "How do I bake bread?"
    assert HH.question(turn) == "Human: How do I bake bread?" and TLDR.question(post) == "POST: " + post
    assert HH.generation_prompt(constitution, turn).endswith(
        "### Main Task\nAssistant Constitution:\n1. Be brief.\n2. Be complete.\n\nHuman: How do I bake bread?\n\n"
        "Assistant:")
    assert HH.training_prompt(constitution, turn) == blocks["6.4"][1].replace(
        "{constitution}", constitution).replace("{question}", "Human: " + turn)
    # Braces in user text are data, not fields: no second substitution, no KeyError.
    odd = "What does {constitution} or {0} mean in {question}?"
    prompt = HH.training_prompt("1. {question}", odd)
    assert prompt.endswith("Assistant Constitution:\n1. {question}\n\nHuman: " + odd + "\n\nAssistant:")


def test_training_text_is_prompt_plus_response_without_space():
    # §6.2: the target follows "Summary:" directly; the template adds no separator of its own.
    prompt = TLDR.training_prompt("1. a", "post")
    summary = TLDR.postprocess(" is about a lost key.")
    assert (prompt + summary).endswith("Summary:The post is about a lost key.")


# ------------------------------------------------------------------------------------------------ post-processing
@pytest.mark.parametrize("raw, expected", [
    ("Sure, here is how.\n\nHuman: thanks\n\nAssistant: you're welcome", "Sure, here is how."),
    ("  I can help with that. ### Example Format\nAssistant Constitution: ...", "I can help with that."),
    ("First line.\nSecond line.\n\nHumans are great\n\nAssistant: x", "First line.\nSecond line."),  # a prefix
    ("Human: not a new turn without the blank line", "Human: not a new turn without the blank line"),
    ("###", ""),
    ("", ""),
    ("\n\nHuman: hi", ""),
    ("Answer ## not three\n\nHuman", "Answer ## not three"),
])
def test_hh_postprocess(raw, expected):
    assert HH.postprocess(raw) == expected


@pytest.mark.parametrize("raw, expected", [
    (" is about a man who lost his keys.\n\nHuman: Thank you!", "The post is about a man who lost his keys."),
    (" describes X. ### Main Task\nSummarization Constitution:", "The post describes X."),
    ("  \n is about Y.  \n", "The post is about Y."),
    ("", "The post "),  # nothing to cut at "###", so nothing strips the prefix's space
    ("###", "The post"),  # cut at "###", then stripped
    ("Human: hello", "The post "),
    (" is about Z.\n\nHuman:", "The post is about Z.\n\nHuman:"),  # "Human:" without its space does not cut
    (" is about Q. Human: more ### tail", "The post is about Q."),
    (" covers ### then Human: x", "The post covers"),
])
def test_tldr_postprocess(raw, expected):
    assert TLDR.postprocess(raw) == expected


@pytest.mark.parametrize("raw, expected", [
    (" brevity matters.\n\nSummary: A man loses his keys.\n\nHuman: thanks", "A man loses his keys."),
    (" brevity matters. No summary line at all.", ""),
    (" x.\nSummary:\n\nThe post is about keys.\n\nMore text", "The post is about keys."),
    ("Summary: first one. Summary: second one.", "first one."),
    (" a\n\nb\n\nSummary: One line.\nSecond line.", "One line.\nSecond line."),
])
def test_cot_postprocess(raw, expected):
    assert COT.postprocess(raw) == expected


# ------------------------------------------------------------------------------------------------ filters (§3.6)
def _listed(method_text, before):
    match = re.search(re.escape(before) + r"\s*`(\[[^`]*\])`", method_text)
    assert match, f"no list after {before!r} in the note"
    return json.loads(match.group(1))


def test_filter_lists_match_the_note(method_text):
    sami_tldr = _listed(method_text, "drop a response if it contains any of")
    assert set(SAMI_TLDR_FILTER) == set(sami_tldr)
    assert set(HH.filter_words) == set(_listed(method_text, "HH drops"))
    # typo TL;DR = the sami list plus "The assistant" and "sorry"; llama diverse adds four more.
    assert set(TLDR.filter_words) == {*sami_tldr, "The assistant", "sorry"}
    assert set(COT.filter_words) == {*sami_tldr, "The assistant", "sorry", "The post", "principles", "constitution",
                                     "summarization"}


def test_keep_pair_hh():
    assert HH.keep_pair(["Here is a detailed answer", "Vague answer"])  # no "." test in HH
    assert HH.keep_pair(["Same text.", "Same text."])  # nor a "must differ" test
    assert not HH.keep_pair(["Fine.", ""])
    assert not HH.keep_pair(["", "Fine."])
    for word in HH.filter_words:
        assert not HH.keep_pair([f"A reply with {word} in it.", "ok"])
        assert not HH.keep_pair(["ok", f"A reply with {word} in it."])
    assert not HH.keep_pair(["I'm sorry, I can't help.", "Sure."])
    assert HH.keep_pair(["[ brackets that open only are fine", "ok"])
    with pytest.raises(ValueError):
        HH.keep_pair([])
    with pytest.raises(ValueError):
        HH.keep_pair("not a list")


def test_keep_pair_tldr():
    assert TLDR.keep_pair(["The post is about keys.", "The post is about keys and a park"])
    assert not TLDR.keep_pair(["The post is about keys", "The post is long."])  # positive must end with "."
    assert not TLDR.keep_pair(["The post is about keys.", "The post is about keys."])  # and differ
    assert not TLDR.keep_pair(["The post ", "The post is long."])
    assert TLDR.keep_pair(["The post is about keys.", "The post "])  # the degenerate negative is kept
    assert not TLDR.keep_pair(["The post [insert summary here].", "The post x."])
    assert not TLDR.keep_pair(["The post is sorry.", "The post x."])
    assert not TLDR.keep_pair(["The post x.", "The assistant says no."])
    sami = TLDR.replace(filter_words=SAMI_TLDR_FILTER)
    assert sami.keep_pair(["The post is sorry.", "The post x."]) and TLDR.filter_words != sami.filter_words
    assert not COT.keep_pair(["The post is about keys.", "Keys lost."])  # "The post" is filtered for CoT
    assert COT.keep_pair(["Keys were lost.", "A lengthy tale of keys"])


# ------------------------------------------------------------------------------------------------ stop strings
_PIECES = ["a", "b", "word", " ", "  ", "\n", "\n\n", ".", "#", "##", "###", "Human", "Human:", "Human: ", "\n\nHuman",
           ":", "Summary:", "The post", "[", "]", "x y z."]


def _random_text(rng, n_max=10):
    return "".join(rng.choice(_PIECES) for _ in range(rng.randint(0, n_max)))


def _stopped(task, full):
    """What the sampler returns when `full` is the unstopped output: the text before the first stop."""
    hits = [full.find(s) for s in task.stop_strings if s in full]
    return full[:min(hits)] if hits else full


def _cases(seed, n=4000):
    rng = random.Random(seed)
    for _ in range(n):
        stop = rng.choice(["\n\nHuman", "###", "Human: "])
        yield _random_text(rng) + stop + _random_text(rng)  # at least one stop string, then more text


def test_hh_stop_strings_are_exact():
    assert HH.stop_strings == ("\n\nHuman", "###")
    checked = 0
    for full in _cases(0):
        hits = [(full.find(s), s) for s in HH.stop_strings if s in full]
        if not hits:
            continue
        at, stop = min(hits)
        assert HH.postprocess(full[:at]) == HH.postprocess(full), full  # the sampler's cut (before the stop)
        assert HH.postprocess(full[:at + len(stop)]) == HH.postprocess(full), full  # cut after it
        checked += 1
    assert checked > 2000


def test_tldr_stop_strings_exact_outside_two_degenerate_cases():
    assert TLDR.stop_strings == ("Human: ", "###")
    checked = exceptions = 0
    for full in _cases(1):
        hits = [(full.find(s), s) for s in TLDR.stop_strings if s in full]
        if not hits:
            continue
        at, stop = min(hits)
        got, want = TLDR.postprocess(_stopped(TLDR, full)), TLDR.postprocess(full)
        only_space_before_hashes = stop == "###" and not full[:at].strip()
        only_space_after_human = stop == "Human: " and not full[at + len(stop):].strip()
        if only_space_before_hashes:
            assert (got, want) == ("The post ", "The post"), full
            exceptions += 1
        elif only_space_after_human:
            assert want.endswith("Human:") and got != want, full
            exceptions += 1
        else:
            assert got == want, full
            checked += 1
    assert checked > 2000 and exceptions > 0


def test_tldr_documented_exceptions():
    assert TLDR.postprocess("  ###\nrest") == "The post" != TLDR.postprocess("  ")
    full = " is about keys.\n\nHuman: "
    assert TLDR.postprocess(full) == "The post is about keys.\n\nHuman:"
    assert TLDR.postprocess(_stopped(TLDR, full)) == "The post is about keys."


def test_cot_has_no_safe_stop_string():
    assert COT.stop_strings == ()
    # Each candidate terminator can precede the first "Summary:" (the prompt asks for a new line before it),
    # so cutting there loses the summary the full output has.
    full = " brevity matters.\n\nHuman: nothing\n\nSummary: A man loses keys.\n\nSummary: again"
    assert COT.postprocess(full) == "A man loses keys."
    for candidate in ("\n\n", "Human:", "Summary:"):
        assert COT.postprocess(full[:full.find(candidate)]) == "", candidate


# ------------------------------------------------------------------------------------------------ the Task API
def test_get_task_and_replace():
    assert get_task("hh") is HH and get_task("tldr_cot") is COT
    with pytest.raises(ValueError, match=r"unknown task 'summarize'.*\['hh', 'tldr', 'tldr_cot'\]"):
        get_task("summarize")
    changed = TLDR.replace(stop_strings=["Human: "], require_period=False)
    assert changed.stop_strings == ("Human: ",) and not changed.require_period and TLDR.require_period
    assert changed.keep_pair(["The post no period", "The post other"])
    with pytest.raises(ValueError, match="post-processing rule"):
        TLDR.replace(name="reddit")
    with pytest.raises(ValueError, match=r"\{constitution\} and \{question\}"):
        TLDR.replace(generation_template="Summarize {question}:")
    with pytest.raises(ValueError, match="format string"):
        HH.replace(training_template="{constitution} {question} {")
    with pytest.raises(TypeError, match="sequence of strings"):
        HH.replace(filter_words="sorry")
    with pytest.raises(ValueError, match="non-empty"):
        HH.replace(stop_strings=("",))
    with pytest.raises(dataclasses.FrozenInstanceError):
        HH.name = "tldr"
    assert isinstance(HH, Task) and hash(HH) == hash(HH.replace())
