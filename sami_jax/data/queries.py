"""Queries for SAMI generation (arXiv 2404.14313, reference §3 point 1).

Every loader returns the *raw* query text: the HH first human turn without its ``"Human: "`` speaker
tag, the TL;DR post without its ``"POST: "`` prefix. The prompt templates add ``"Human: "`` /
``"POST: "`` later, so nothing here is template-specific.

Sources (``kind``):

- ``"hh"``: jsonl or jsonl.gz of HH-RLHF rows ``{"chosen", "rejected"}``. The query is the first human
  turn of ``chosen``: the text after the first ``"Human: "`` and before the first following
  ``"Assistant: "`` (the reference's exact rule), stripped of surrounding whitespace.
- ``"tldr"``: jsonl(.gz) rows with a ``post`` field (the text, stripped), or the paper's response-file
  JSON ``{"question": {i: "POST: ..."}, ...}``, read in ``int(i)`` order with the ``"POST: "`` prefix removed.
- ``"jsonl"``: generic jsonl(.gz) rows ``{"query": str}``.
- ``"auto"``: ``.json`` files are TL;DR response files; for jsonl the first row's fields decide
  (``chosen`` -> hh, ``post`` -> tldr, ``query`` -> jsonl).

Paths may be local or ``gs://...`` (read through ``etils.epath``, imported only for URLs). Exact repeats
are dropped, keeping the first occurrence. Malformed input raises :class:`QueryDataError` naming the
file and, for line formats, the 1-based line number (``path:17: not valid JSON``). An empty query (blank
after stripping) is malformed too.

With ``skip_bad_lines=True`` a malformed line (not JSON, not an object, a missing, non-string or empty
field, no ``"Human: "`` turn) or response-file entry is skipped instead; :func:`load_queries_counted`
returns how many were skipped, :func:`load_queries` just the queries. Whole-file problems (missing,
empty, not UTF-8, an unreadable response file, no query left) always raise.
"""

from __future__ import annotations

import gzip
import importlib.resources
import io
import json
import logging
import os
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

KINDS = ("auto", "hh", "tldr", "jsonl")
HUMAN, ASSISTANT, POST = "Human: ", "Assistant: ", "POST: "

log = logging.getLogger(__name__)


class QueryDataError(ValueError):
    """A query file is missing, empty or malformed; the message names the file (and line)."""


def _path(path: str | os.PathLike) -> Any:
    if "://" in str(path):
        from etils import epath  # lazy: only remote paths need it (and GCS access).

        return epath.Path(path)
    return pathlib.Path(path)


def _read_text(path: Any) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise QueryDataError(f"{path}: no such file") from None
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the suffix.
        raw = gzip.decompress(raw)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise QueryDataError(f"{path}: not UTF-8 text ({e})") from None


class _Bad:
    """Where a malformed line goes: raised (`skipped` None) or appended to `skipped` and logged."""

    def __init__(self, skip: bool):
        self.skipped: list[str] | None = [] if skip else None

    def __call__(self, message: str) -> None:
        if self.skipped is None:
            raise QueryDataError(message)
        log.debug("skipping %s", message)
        self.skipped.append(message)

    @property
    def count(self) -> int:
        return len(self.skipped or ())


def _rows(path: Any, text: str, bad: _Bad | None = None) -> Iterator[tuple[int, dict]]:
    bad = bad or _Bad(skip=False)
    for lineno, line in enumerate(io.StringIO(text), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            bad(f"{path}:{lineno}: not valid JSON ({e.msg})")
            continue
        if not isinstance(row, dict):
            bad(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            continue
        yield lineno, row


def jsonl_rows(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(1-based line number, object) for each non-blank line of a jsonl(.gz) file, local or gs://;
    errors name the file and line."""
    p = _path(path)
    return _rows(p, _read_text(p))


def _field(path: Any, lineno: int, row: dict, name: str) -> str:
    if name not in row:
        raise QueryDataError(f'{path}:{lineno}: no "{name}" field')
    value = row[name]
    if not isinstance(value, str):
        raise QueryDataError(f'{path}:{lineno}: "{name}" is {type(value).__name__}, not a string')
    return value


def first_human_turn(dialogue: str) -> str | None:
    """The text after the first "Human: " and before the next "Assistant: ", stripped; None if no
    "Human: " turn. Without a following "Assistant: " the rest of the dialogue is the turn."""
    _, found, rest = dialogue.partition(HUMAN)
    if not found:
        return None
    return rest.partition(ASSISTANT)[0].strip()


def _line_query(path: Any, lineno: int, row: dict, kind: str) -> str:
    if kind == "hh":
        query = first_human_turn(_field(path, lineno, row, "chosen"))
        if query is None:
            raise QueryDataError(f'{path}:{lineno}: no "{HUMAN}" turn in "chosen"')
    elif kind == "tldr":
        query = _field(path, lineno, row, "post").strip()
    else:
        query = _field(path, lineno, row, "query").strip()
    if not query:
        raise QueryDataError(f"{path}:{lineno}: empty query")
    return query


def _line_queries(path: Any, text: str, kind: str, bad: _Bad) -> Iterator[str]:
    for lineno, row in _rows(path, text, bad):
        try:
            query = _line_query(path, lineno, row, kind)
        except QueryDataError as e:
            bad(str(e))
            continue
        yield query


def _response_file_queries(path: Any, text: str, bad: _Bad) -> Iterator[str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise QueryDataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    questions = data.get("question") if isinstance(data, dict) else None
    if not isinstance(questions, dict):
        raise QueryDataError(f'{path}: no "question" object (expected {{"question": {{i: "POST: ..."}}}})')
    try:
        keys = sorted(questions, key=int)
    except ValueError:
        raise QueryDataError(f'{path}: "question" keys must be integers') from None
    for key in keys:
        value = questions[key]
        if not isinstance(value, str) or not value.startswith(POST):
            bad(f'{path}: question[{key}] does not start with "{POST}"')
            continue
        query = value[len(POST):].strip()
        if not query:
            bad(f"{path}: question[{key}] is an empty post")
            continue
        yield query


def _detect(path: Any, text: str, skip_bad_lines: bool) -> str:
    """The kind from the first row's fields; when skipping bad lines, from the first row that has one."""
    name = path.name.lower()
    if name.endswith(".json"):
        return "tldr"
    for lineno, row in _rows(path, text, _Bad(skip_bad_lines)):
        for field, kind in (("chosen", "hh"), ("post", "tldr"), ("query", "jsonl")):
            if field in row:
                return kind
        if not skip_bad_lines:
            raise QueryDataError(f'{path}:{lineno}: cannot tell the kind: no "chosen", "post" or "query" field')
    if skip_bad_lines and text.strip():
        raise QueryDataError(f'{path}: cannot tell the kind: no line has a "chosen", "post" or "query" field')
    raise QueryDataError(f"{path}: empty file, no queries")


def load_queries_counted(path: str | os.PathLike, kind: str = "auto", limit: int | None = None,
                         shuffle_seed: int | None = None, skip_bad_lines: bool = False) -> tuple[list[str], int]:
    """(queries, skipped): :func:`load_queries`' result and the number of malformed lines (or
    response-file entries) skipped, always 0 unless `skip_bad_lines`."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    p = _path(path)
    text = _read_text(p)
    if not text.strip():
        raise QueryDataError(f"{p}: empty file, no queries")
    if kind == "auto":
        kind = _detect(p, text, skip_bad_lines)
    bad = _Bad(skip_bad_lines)
    if kind == "tldr" and p.name.lower().endswith(".json"):
        queries = _response_file_queries(p, text, bad)
    else:
        queries = _line_queries(p, text, kind, bad)
    out = list(dict.fromkeys(queries))
    if not out:
        raise QueryDataError(f"{p}: no queries" + (f" ({bad.count} malformed skipped, first: {bad.skipped[0]})"
                                                   if bad.count else ""))
    if shuffle_seed is not None:
        out = [out[i] for i in np.random.default_rng(shuffle_seed).permutation(len(out))]
    return (out if limit is None else out[:limit]), bad.count


def load_queries(path: str | os.PathLike, kind: str = "auto", limit: int | None = None,
                 shuffle_seed: int | None = None, skip_bad_lines: bool = False) -> list[str]:
    """Raw query texts from `path` (local or gs://), deduplicated in first-occurrence order.

    With `shuffle_seed` the deduplicated list is permuted by ``np.random.default_rng(seed)``; `limit`
    then keeps the first `limit` queries. The whole file is always parsed and validated. With
    `skip_bad_lines` malformed lines are skipped instead of raising; :func:`load_queries_counted` also
    returns how many."""
    return load_queries_counted(path, kind, limit, shuffle_seed, skip_bad_lines)[0]


def split_queries(queries: Sequence[str], held_out: int, seed: int) -> tuple[list[str], list[str]]:
    """(train, held_out): a ``default_rng(seed).permutation`` shuffle, first `held_out` held out.
    Deterministic across runs and machines (numpy's PCG64 stream is platform independent)."""
    if not 0 <= held_out <= len(queries):
        raise ValueError(f"held_out must be in [0, {len(queries)}], got {held_out}")
    order = np.random.default_rng(seed).permutation(len(queries))
    shuffled = [queries[i] for i in order]
    return shuffled[held_out:], shuffled[:held_out]


def bundled_queries(kind: str) -> list[str]:
    """The small example sets shipped for the demo: "dialogue" (user requests, harmless to mildly
    edgy) or "post" (short first-person Reddit-style posts). Raw text, no "Human: "/"POST: " tag."""
    resource = importlib.resources.files("sami_jax.data").joinpath("example_queries.json")
    sets = json.loads(resource.read_text(encoding="utf-8"))
    if kind not in sets:
        raise ValueError(f"bundled query kind must be one of {sorted(sets)}, got {kind!r}")
    return list(sets[kind])
