"""Per-task prompt templates and response handling for SAMI (reference sami-method.md §3.5, §3.6, §6).

A :class:`Task` holds everything that differs between the paper's experiments:

- ``"hh"``: HH-RLHF (Exp. 1). Few-shot generation prompt §6.4; training prompt = the same without the
  "### Example Format" block. Responses are cut at ``"\\n\\nHuman"`` then ``"###"``.
- ``"tldr"``: TL;DR (Exp. 2). Generation prompt §6.1 ends with ``"Summary: The post"``; the model's
  continuation gets ``"The post "`` put back in front (§3.5). Training prompt §6.2.
- ``"tldr_cot"``: the llama3-70b chain-of-thought variant (Exp. 3): generation prompt §6.3, the summary is
  the text after the first ``"Summary:"`` up to the first blank line; training uses §6.2 (no CoT).

Templates are verbatim, including the trailing spaces the authors' prompts have (marked ``⏎`` in
sami-method.md). Queries arrive raw; :meth:`Task.question` adds the ``"Human: "`` / ``"POST: "`` tag.

Training text is ``training_prompt + response`` with **no** separator, as in the reference
(``"Summary:The post ..."``, ``"Assistant:Sure, ..."``); the response is tokenized separately from the
prompt elsewhere (``sami_jax.sami.build_pair_batch``), so nothing here adds a space.

Filters (§3.6) default to the lists of the ``typo`` code that produced the paper's numbers;
:data:`SAMI_TLDR_FILTER` is the public ``sami`` repo's shorter TL;DR list (use ``task.replace(filter_words=...)``).
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Callable, Sequence

# ---------------------------------------------------------------------------------------------- templates
# Each line is written out with its "\n" so trailing spaces stay visible.

TLDR_GENERATION = (
    "System: Summarize the post below according to the principles in the constitution.\n"
    "\n"
    "### Example Format\n"
    "Summarization Constitution: [insert constitution here]\n"
    "\n"
    "POST: [insert query here]\n"
    "\n"
    "Summary: [insert summary here]\n"
    "\n"
    "Human: Thank you for this great summary! I appreciate that you followed the principles in the constitution. \n"
    "\n"
    "### Main Task\n"
    "Summarization Constitution: \n"
    "{constitution}\n"
    "\n"
    "{question}\n"
    "\n"
    "Summary: The post"
)

TLDR_TRAINING = (
    "System: Summarize the post below according to the principles in the constitution.\n"
    "\n"
    "Summarization Constitution: \n"
    "{constitution}\n"
    "\n"
    "{question}\n"
    "\n"
    "Summary:"
)

TLDR_COT_GENERATION = (
    "System: Summarize the post below according to the principles in the constitution.\n"
    "\n"
    "### Format\n"
    "Summarization Constitution: [insert constitution here]\n"
    "\n"
    "POST: [insert post here]\n"
    "\n"
    "Reasoning: [insert reasoning for how to summarize here]\n"
    "\n"
    "Summary: [insert summary here]\n"
    "\n"
    "Human: Thank you for this great summary! I appreciate that you followed the principles in the constitution. \n"
    "\n"
    "### Main Task\n"
    "Summarization Constitution: {constitution}\n"
    "\n"
    "{question}\n"
    "\n"
    "Reasoning: First, I will state my reasoning here, then, on a new line, I will write 'Summary:' and include a "
    "summary of the post that aligns with the principles in the constitution. The constitution states that"
)

HH_GENERATION = (
    "System: Write a response for the assistant that follows the principles in the constitution.\n"
    "\n"
    "### Example Format\n"
    "Assistant Constitution: [insert constitution here]\n"
    "\n"
    "Human: [insert query here]\n"
    "\n"
    "Assistant: [insert response here]\n"
    "\n"
    "Human: [insert response here]\n"
    "\n"
    "### Main Task\n"
    "Assistant Constitution:\n"
    "{constitution}\n"
    "\n"
    "{question}\n"
    "\n"
    "Assistant:"
)

HH_TRAINING = (
    "System: Write a response for the assistant that follows the principles in the constitution.\n"
    "\n"
    "Assistant Constitution:\n"
    "{constitution}\n"
    "\n"
    "{question}\n"
    "\n"
    "Assistant:"
)

# ---------------------------------------------------------------------------------------------- filters (§3.6)
HH_FILTER = ("The assistant", "sorry", "Response", "[insert", "]")
TLDR_FILTER = ("The assistant", "sorry", "Response", "[insert", "[]", "]")  # typo TL;DR (the paper's runs)
SAMI_TLDR_FILTER = ("[insert", "[]", "]", "Response")  # the public sami repo
TLDR_COT_FILTER = (*TLDR_FILTER, "The post", "principles", "constitution", "summarization")  # llama diverse


# ---------------------------------------------------------------------------------------------- post-processing
def _hh_extract(generated: str) -> str:
    # §3.5 HH: everything before the model's next "\n\nHuman" turn, then before any "###" section.
    return generated.split("\n\nHuman")[0].strip().split("###")[0].strip()


def _tldr_extract(generated: str, prefix: str) -> str:
    # §3.5 TL;DR: the text before "Human: " gets the prompt's "The post " back; a "###" then cuts it and
    # the result is stripped. Without "###" nothing is stripped, so an empty continuation stays "The post "
    # with its space (as in the authors' format_responses).
    text = prefix + generated.strip().split("Human: ")[0].strip()
    if "###" in text:
        text = text.split("###")[0].strip()
    return text


def _cot_extract(generated: str) -> str:
    # §3.5 llama CoT: the text after the first "Summary:" (up to a second one), stripped, up to the first
    # blank line; no "Summary:" at all gives "" (the authors' except-branch), which the filters then drop.
    parts = generated.split("Summary:")
    if len(parts) < 2:
        return ""
    return parts[1].strip().split("\n\n")[0].strip()


_EXTRACT: dict[str, Callable[[str, str], str]] = {
    "hh": lambda generated, prefix: prefix + _hh_extract(generated),
    "tldr": _tldr_extract,
    "tldr_cot": lambda generated, prefix: prefix + _cot_extract(generated),
}


def _template_fields(template: str) -> set[str]:
    try:
        return {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError as e:  # a lone "{" or "}"
        raise ValueError(f"template is not a valid format string ({e}): {template[:60]!r}...") from None


@dataclasses.dataclass(frozen=True)
class Task:
    """Templates, post-processing and filters of one experiment; immutable, change it with :meth:`replace`.

    `name` selects the post-processing rule (one of :data:`TASKS`). `stop_strings` may end sampling early
    because cutting the raw output *before* any of them (the sampler's convention) leaves
    :meth:`postprocess` unchanged; see the per-task notes at :data:`TASKS`.
    """

    name: str
    question_prefix: str
    generation_template: str
    training_template: str
    response_prefix: str
    stop_strings: tuple[str, ...]
    filter_words: tuple[str, ...]
    require_period: bool
    require_distinct: bool = False  # keep a pair only if the positive differs from every other response

    def __post_init__(self):
        if self.name not in _EXTRACT:
            raise ValueError(f"task name selects the post-processing rule: one of {sorted(_EXTRACT)}, "
                             f"got {self.name!r}")
        for field in ("stop_strings", "filter_words"):
            value = getattr(self, field)
            if isinstance(value, str):
                raise TypeError(f"{field} must be a sequence of strings, not the string {value!r}")
            value = tuple(value)
            if not all(isinstance(s, str) and s for s in value):
                raise ValueError(f"{field} must hold non-empty strings, got {value!r}")
            object.__setattr__(self, field, value)
        for field in ("generation_template", "training_template"):
            fields = _template_fields(getattr(self, field))
            if fields != {"constitution", "question"}:
                raise ValueError(f"{field} must have exactly the fields {{constitution}} and {{question}}, "
                                 f"got {sorted(fields)}")

    def question(self, query: str) -> str:
        """The query as the prompt shows it: ``"Human: <turn>"`` or ``"POST: <post>"``."""
        return self.question_prefix + query

    def generation_prompt(self, constitution: str, query: str) -> str:
        """The few-shot sampling prompt for a raw query under `constitution` (§6; unshuffled in the paper)."""
        return self.generation_template.format(constitution=constitution, question=self.question(query))

    def training_prompt(self, constitution: str, query: str) -> str:
        """The prompt the SAMI loss scores responses under; the response follows with no separator."""
        return self.training_template.format(constitution=constitution, question=self.question(query))

    def postprocess(self, generated: str) -> str:
        """The response kept from a raw continuation of the generation prompt (§3.5, exactly per task)."""
        return _EXTRACT[self.name](generated, self.response_prefix)

    def filtered(self, response: str) -> bool:
        """True if `response` is empty or contains a filter word, i.e. would be dropped (§3.6)."""
        return not response or any(word in response for word in self.filter_words)

    def keep_pair(self, responses: Sequence[str]) -> bool:
        """Whether one query's post-processed responses (``responses[0]`` = the positive constitution's)
        make a training example: none empty or filtered; then, if required, the positive ends with "."
        and differs from the others (§3.6)."""
        if isinstance(responses, str) or not responses:
            raise ValueError("keep_pair takes the list of a query's responses, the positive first")
        if any(self.filtered(r) for r in responses):
            return False
        positive = responses[0]
        if self.require_period and not positive.endswith("."):
            return False
        return not (self.require_distinct and any(positive == r for r in responses[1:]))

    def replace(self, **changes) -> Task:
        """A copy with `changes` applied (validated like a new Task)."""
        return dataclasses.replace(self, **changes)


TASKS: dict[str, Task] = {
    # "\n\nHuman" and "###" are exactly the strings the HH rule cuts at; everything before the first of them
    # is all it ever keeps, so the cut output post-processes identically.
    "hh": Task(name="hh", question_prefix="Human: ", generation_template=HH_GENERATION, training_template=HH_TRAINING,
               response_prefix="", stop_strings=("\n\nHuman", "###"), filter_words=HH_FILTER,
               require_period=False, require_distinct=False),
    # Stopping before "Human: " or "###" keeps the result except in two degenerate cases:
    # - only whitespace precedes the first "###": the full output gives "The post" (cut, then strip), the
    #   stopped one "The post " (nothing to cut, so no strip). Either fails the "." test as a positive; as
    #   a negative the two differ by one trailing space.
    # - only whitespace follows "Human: " to the end of the output (EOS or the token cap right after it):
    #   the authors' leading .strip() eats that space, their rule then finds no "Human: " and keeps a
    #   trailing "Human:" (such a positive fails the "." test), while the stopped text ends before it.
    #   Tokenizers attach the space to the next word, so "Human: " rarely completes without one.
    "tldr": Task(name="tldr", question_prefix="POST: ", generation_template=TLDR_GENERATION,
                 training_template=TLDR_TRAINING, response_prefix="The post ", stop_strings=("Human: ", "###"),
                 filter_words=TLDR_FILTER, require_period=True, require_distinct=True),
    # No stop strings: the summary starts only after the first "Summary:", and every candidate terminator
    # ("\n\n", "Human:", a second "Summary:") can occur in the reasoning *before* it (the prompt itself asks
    # for "on a new line, ... 'Summary:'"), so stopping there would discard a summary the full output has.
    # No plain string is safe; sampling runs to EOS or max_new_tokens (500 in the paper).
    "tldr_cot": Task(name="tldr_cot", question_prefix="POST: ", generation_template=TLDR_COT_GENERATION,
                     training_template=TLDR_TRAINING, response_prefix="", stop_strings=(),
                     filter_words=TLDR_COT_FILTER, require_period=True, require_distinct=True),
}


def get_task(name: str) -> Task:
    """The task called `name` ("hh", "tldr" or "tldr_cot")."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}") from None


# The paper's instruction line and constitution header per task, as a chat system message (chat_task).
CHAT_SYSTEM = {
    "hh": "Write a response for the assistant that follows the principles in the constitution.\n\n"
          "Assistant Constitution:\n{constitution}",
    "tldr": "Summarize the post below according to the principles in the constitution.\n\n"
            "Summarization Constitution:\n{constitution}",
}


def chat_task(task: Task, chat_template: str) -> Task:
    """`task` for an instruct (chat) model: the system message is the task's instruction line with the
    constitution, the user message the question, and the reply follows the template's assistant header.

    The paper prompted base models with raw few-shot text (§6); an instruct model as small as SmolLM2-135M
    mostly answers such prompts with an empty turn ("\n\nHuman: ..."), so its configs use this format.
    Generation and training share the prompt (there is no few-shot block); there is no response prefix;
    post-processing, stop strings and filters stay the task's. HH drops the "Human: " tag (the chat
    turn says who speaks); TL;DR keeps "POST: ".
    """
    from sami_jax.tokenizer import apply_chat_template

    if task.name not in CHAT_SYSTEM:
        raise ValueError(f"task {task.name!r} has no chat format (only {sorted(CHAT_SYSTEM)}): its post-processing "
                         "expects the raw few-shot prompt")
    if not chat_template:
        raise ValueError("the chat task format needs a tokenizer with a chat template")
    c, q = "\x00constitution\x00", "\x00question\x00"  # sentinels, turned into format fields below
    rendered = apply_chat_template(chat_template, q, system=CHAT_SYSTEM[task.name].format(constitution=c))
    template = rendered.replace("{", "{{").replace("}", "}}").replace(c, "{constitution}").replace(q, "{question}")
    return task.replace(generation_template=template, training_template=template, response_prefix="",
                        question_prefix="" if task.name == "hh" else task.question_prefix)

