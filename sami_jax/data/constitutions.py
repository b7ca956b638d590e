"""Constitutions for SAMI: the paper's three sampling schemes (reference sami-method.md §7, MI sets §2.3).

A constitution is a numbered list of principles, one per line (``"1. ...\\n2. ..."``). Every query gets
C = 2 constitutions from a :class:`ConstitutionScheme`; generation sees them as drawn, and the trainer
permutes each one's principles with :func:`shuffle_principles` for the training prompt (§3.7).

Schemes:

- :class:`HHConstitutions` (Exp. 1, §7.2): helpful / harmless principles and their negations; the pair
  depends on the query's HH-RLHF subset.
- :class:`TLDRConstitutions` (Exp. 2, §7.1): a list of ``{"positive", "negative"}`` pairs, one drawn per query.
- :class:`DiverseConstitutions` (Exp. 3, §7.3): named ``{definition, antithesis}`` principles; two drawn per
  query with random sides, against their full opposite; the last ones are held out for evaluation.

All randomness comes from the ``random.Random`` passed in, so a seeded caller gets reproducible draws. The
call sequence mirrors the authors' scripts (``choice`` over the TL;DR files; ``sample``, two ``randint``
coins and two ``shuffle`` for the diverse scheme), so ``random.Random(42)`` reproduces their draws given
the same list order.

:func:`load_constitutions` reads our JSON format (``{"scheme": "hh" | "tldr" | "diverse", ...}``), the
authors' TL;DR directories (``0.json``..``5.json``) and diverse ``constitutions.json``, or a bundled name
(:data:`BUNDLED`). Malformed input raises :class:`ConstitutionError` naming the file and the problem.
"""

from __future__ import annotations

import abc
import importlib.resources
import json
import os
import pathlib
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

BUNDLED = ("hh", "tldr_mistral")  # sami_jax/data/constitution_files/<name>.json
SCHEMES = ("hh", "tldr", "diverse")
HH_SUBSETS = ("helpful", "harmless")

_NUMBERED = re.compile(r"\s*\d+\.\s*(.*?)\s*")


class ConstitutionError(ValueError):
    """A constitution file or text is malformed; the message names the file and what is wrong."""


# ---------------------------------------------------------------------------------------------- principle lists
def parse_principles(constitution: str) -> list[str]:
    """The principle texts of a numbered constitution, numbers and surrounding whitespace removed.

    Lines are ``"<n>. text"``; trailing spaces (the authors' ``" \\n"`` joins) and blank lines are
    tolerated. A line without a number, or a number without text, raises ``ValueError``: a principle
    that spans lines would otherwise be shuffled apart."""
    principles = []
    for line in constitution.split("\n"):
        if not line.strip():
            continue
        match = _NUMBERED.fullmatch(line)
        if match is None:
            raise ValueError(f"not a numbered principle line ('1. ...'): {line.strip()[:80]!r}")
        if not match.group(1):
            raise ValueError(f"empty principle: {line.strip()!r}")
        principles.append(match.group(1))
    if not principles:
        raise ValueError("constitution has no principles")
    return principles


def format_principles(principles: Sequence[str]) -> str:
    """``"1. a\\n2. b"``: the numbered-list text of `principles`, in order."""
    return "\n".join(f"{i}. {p}" for i, p in enumerate(principles, start=1))


def shuffle_principles(constitution: str, rng: random.Random) -> str:
    """`constitution` with its principles permuted by `rng` and renumbered ``"1. "``, ``"2. "``...,
    joined by ``"\\n"`` (the reference's per-query shuffle for training prompts)."""
    principles = parse_principles(constitution)
    rng.shuffle(principles)
    return format_principles(principles)


def _same_principles(a: str, b: str) -> bool:
    return sorted(parse_principles(a)) == sorted(parse_principles(b))


# ---------------------------------------------------------------------------------------------- schemes
class ConstitutionScheme(abc.ABC):
    """How a scheme draws constitutions: C = 2 per training query, one per evaluation query, and the K
    constitutions of the paper's MI estimate (§2.3)."""

    name: str
    source: str

    @abc.abstractmethod
    def training_pair(self, rng: random.Random, subset: str | None = None) -> tuple[str, str]:
        """The C = 2 constitutions for one training query, the positive (or first) one first, unshuffled.
        `subset` is the query's HH-RLHF subset; only :class:`HHConstitutions` uses (and requires) it."""

    @abc.abstractmethod
    def eval_constitution(self, rng: random.Random, held_out: bool = False) -> str:
        """One constitution for an evaluation query; `held_out` draws unseen principles (diverse only)."""

    @abc.abstractmethod
    def mi_constitutions(self, rng: random.Random, held_out: bool = False) -> list[str]:
        """The K constitutions of one query's MI estimate, in the order of :meth:`mi_labels`."""

    @abc.abstractmethod
    def mi_labels(self) -> list[str]:
        """Short names of the K MI constitutions, for reports."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One line for reports: the scheme and its principles."""

    def _no_subset(self, subset: str | None) -> None:
        if subset is not None:
            raise ValueError(f"{self.name} constitutions take no subset (only HH does), got subset={subset!r}")

    def _no_held_out(self, held_out: bool) -> None:
        if held_out:
            raise ValueError(f"{self.name} constitutions have no held-out principles (only the diverse scheme)")


class HHConstitutions(ConstitutionScheme):
    """HH-RLHF, Exp. 1 (§7.2). helpful-base queries: positive ``1. HARMLESS 2. HELPFUL`` against
    ``1. HARMLESS 2. NOT_HELPFUL`` or ``1. NOT_HARMLESS 2. NOT_HELPFUL``; harmless-base: positive
    ``1. HELPFUL 2. HARMLESS`` against ``1. HELPFUL 2. NOT_HARMLESS`` or ``1. NOT_HELPFUL 2. NOT_HARMLESS``.
    The negative always negates the subset's own principle; the two choices are equally likely."""

    name = "hh"

    def __init__(self, helpful: str, not_helpful: str, harmless: str, not_harmless: str, source: str = ""):
        for key, text in (("helpful", helpful), ("not_helpful", not_helpful), ("harmless", harmless),
                          ("not_harmless", not_harmless)):
            if not isinstance(text, str) or not text.strip() or "\n" in text.strip():
                raise ValueError(f"HH principle {key!r} must be a non-empty one-line string, got {text!r}")
        self.helpful, self.not_helpful = helpful.strip(), not_helpful.strip()
        self.harmless, self.not_harmless = harmless.strip(), not_harmless.strip()
        self.source = source

    def subset_constitutions(self, subset: str | None) -> tuple[str, list[str]]:
        """(positive, [the two negatives]) of an HH-RLHF subset, as §7.2 lists them."""
        if subset is None:
            raise ValueError("HH constitutions depend on the query's HH-RLHF subset: pass subset='helpful' or "
                             "'harmless' (set `subset` on the data source)")
        if subset == "helpful":
            return (format_principles([self.harmless, self.helpful]),
                    [format_principles([self.harmless, self.not_helpful]),
                     format_principles([self.not_harmless, self.not_helpful])])
        if subset == "harmless":
            return (format_principles([self.helpful, self.harmless]),
                    [format_principles([self.helpful, self.not_harmless]),
                     format_principles([self.not_helpful, self.not_harmless])])
        raise ValueError(f"HH subset must be one of {HH_SUBSETS}, got {subset!r}")

    def training_pair(self, rng: random.Random, subset: str | None = None) -> tuple[str, str]:
        positive, negatives = self.subset_constitutions(subset)
        return positive, rng.choice(negatives)

    def eval_constitution(self, rng: random.Random, held_out: bool = False) -> str:
        """The positive constitution (helpful and harmless) in a fresh random order, for either subset."""
        self._no_held_out(held_out)
        return shuffle_principles(format_principles([self.helpful, self.harmless]), rng)

    def mi_constitutions(self, rng: random.Random, held_out: bool = False) -> list[str]:
        """K = 4: both positive, both negative, not-helpful, not-harmless; each in a fresh random order
        (the authors reshuffled the principles of every MI prompt)."""
        self._no_held_out(held_out)
        sets = [[self.helpful, self.harmless], [self.not_helpful, self.not_harmless],
                [self.not_helpful, self.harmless], [self.helpful, self.not_harmless]]
        return [shuffle_principles(format_principles(s), rng) for s in sets]

    def mi_labels(self) -> list[str]:
        return ["helpful+harmless", "not helpful+not harmless", "not helpful+harmless", "helpful+not harmless"]

    def describe(self) -> str:
        return f"hh: helpful/harmless principles and negations (§7.2){_source(self.source)}"


class TLDRConstitutions(ConstitutionScheme):
    """TL;DR, Exp. 2 (§7.1): one ``{"positive", "negative"}`` pair drawn per query with ``rng.choice``.
    Evaluation uses the first pair's positive, reshuffled per query. The MI set (K = 1 + the number of
    distinct negatives, 4 for the authors' files) is the positive, then the negatives that share the
    fewest principles with it first (both negated, then one negated, in pair order), each reshuffled."""

    name = "tldr"

    def __init__(self, pairs: Sequence[Mapping[str, Any]], source: str = ""):
        if not pairs:
            raise ValueError("TL;DR constitutions need at least one {positive, negative} pair")
        self.pairs = []
        for i, pair in enumerate(pairs):
            texts = {}
            for key in ("positive", "negative"):
                text = pair.get(key)
                if not isinstance(text, str):
                    raise ValueError(f"pair {i}: {key!r} must be a string, got {type(text).__name__}")
                try:
                    parse_principles(text)
                except ValueError as e:
                    raise ValueError(f"pair {i} {key}: {e}") from None
                texts[key] = text
            ids = pair.get("identifiers")
            ids = ids.get("negative") if isinstance(ids, Mapping) else None
            negated = [x for x in ids if isinstance(x, str) and x.startswith("neg")] if isinstance(ids, list) else []
            self.pairs.append({**texts, "negated": negated})
        self.source = source
        self._mi = self._mi_sets()

    def _mi_sets(self) -> list[tuple[str, str]]:
        positive = self.pairs[0]["positive"]
        kept: list[tuple[int, int, str, str]] = []
        for i, pair in enumerate(self.pairs):
            negative = pair["negative"]
            if any(_same_principles(negative, k[3]) for k in kept):
                continue
            shared = len(set(parse_principles(negative)) & set(parse_principles(positive)))
            label = " + ".join(sorted(pair["negated"])) if pair["negated"] else f"negative of pair {i}"
            kept.append((shared, i, label, negative))
        kept.sort()
        return [("positive", positive)] + [(label, text) for _, _, label, text in kept]

    def training_pair(self, rng: random.Random, subset: str | None = None) -> tuple[str, str]:
        self._no_subset(subset)
        pair = rng.choice(self.pairs)
        return pair["positive"], pair["negative"]

    def eval_constitution(self, rng: random.Random, held_out: bool = False) -> str:
        self._no_held_out(held_out)
        return shuffle_principles(self.pairs[0]["positive"], rng)

    def mi_constitutions(self, rng: random.Random, held_out: bool = False) -> list[str]:
        self._no_held_out(held_out)
        return [shuffle_principles(text, rng) for _, text in self._mi]

    def mi_labels(self) -> list[str]:
        return [label for label, _ in self._mi]

    def describe(self) -> str:
        return (f"tldr: {len(self.pairs)} positive/negative pairs, positive = "
                f"{' | '.join(parse_principles(self.pairs[0]['positive']))} (§7.1){_source(self.source)}")


class DiverseConstitutions(ConstitutionScheme):
    """Diverse principles, Exp. 3 (§7.3). The first `n_learned` principles (file order) are used for
    training and in-distribution evaluation, the rest are held out. Per query: two distinct principles,
    a fair coin per principle picks its definition or antithesis; c1 = the picked sides in shuffled order,
    c2 = the opposite sides of both in independently shuffled order. Neither is "the positive"."""

    name = "diverse"

    def __init__(self, principles: Mapping[str, Mapping[str, str]], n_learned: int = 15, source: str = ""):
        self.principles: dict[str, dict[str, str]] = {}
        for key, entry in principles.items():
            if not isinstance(entry, Mapping):
                raise ValueError(f"principle {key!r} must be an object with definition and antithesis")
            sides = {}
            for side in ("definition", "antithesis"):
                text = entry.get(side)
                if not isinstance(text, str) or not text.strip():
                    raise ValueError(f"principle {key!r}: {side!r} must be a non-empty string, got {text!r}")
                if "\n" in text.strip():
                    raise ValueError(f"principle {key!r}: {side!r} must be one line")
                sides[side] = text.strip()
            self.principles[key] = sides
        if isinstance(n_learned, bool) or not isinstance(n_learned, int) or not 2 <= n_learned <= len(self.principles):
            raise ValueError(f"n_learned must be an int in [2, {len(self.principles)}] (two principles per "
                             f"constitution), got {n_learned!r}")
        names = list(self.principles)
        self.learned, self.held_out = names[:n_learned], names[n_learned:]
        self.source = source

    def draw(self, rng: random.Random, held_out: bool = False) -> tuple[str, str]:
        """(c1, c2): two sampled principles with random sides, and their full opposite (§7.3)."""
        pool = self.held_out if held_out else self.learned
        if len(pool) < 2:
            raise ValueError(f"diverse constitutions need >= 2 {'held-out' if held_out else 'learned'} "
                             f"principles, have {len(pool)}")
        first, second = (self.principles[k] for k in rng.sample(pool, 2))
        chosen, opposite = [], []
        for entry in (first, second):
            if rng.randint(0, 1):
                chosen.append(entry["definition"])
                opposite.append(entry["antithesis"])
            else:
                chosen.append(entry["antithesis"])
                opposite.append(entry["definition"])
        rng.shuffle(chosen)
        rng.shuffle(opposite)
        return format_principles(chosen), format_principles(opposite)

    def training_pair(self, rng: random.Random, subset: str | None = None) -> tuple[str, str]:
        self._no_subset(subset)
        return self.draw(rng)

    def eval_constitution(self, rng: random.Random, held_out: bool = False) -> str:
        return self.draw(rng, held_out)[0]

    def mi_constitutions(self, rng: random.Random, held_out: bool = False) -> list[str]:
        """K = 2: a sampled constitution and its opposite."""
        return list(self.draw(rng, held_out))

    def mi_labels(self) -> list[str]:
        return ["sampled", "opposite"]

    def describe(self) -> str:
        return (f"diverse: {len(self.learned)} learned ({', '.join(self.learned)}), {len(self.held_out)} held out "
                f"({', '.join(self.held_out) or 'none'}) (§7.3){_source(self.source)}")


def _source(source: str) -> str:
    return f"; source: {source}" if source else ""


def tldr_pairs_from_principles(principles: Sequence[Mapping[str, str]]) -> list[dict]:
    """The six §7.1 pairs from two ``{"name", "definition", "antithesis"}`` principles A, B, in the order
    of the authors' files 0..5: positive A, B in 0-2 and B, A in 3-5; the negative flips the first (0, 3),
    the second (1, 4) or both (2, 5) positions. With A = concise that is neg-concise in 0 and 4,
    neg-comprehensive in 1 and 3. Identifiers follow the authors' ``"pos <name>"``/``"neg <name>"``."""
    if len(principles) != 2:
        raise ValueError(f"the §7.1 construction takes exactly 2 principles, got {len(principles)}")
    pairs = []
    for order in (principles, principles[::-1]):
        for flipped in ({0}, {1}, {0, 1}):  # positions that get their antithesis
            sides = [("neg", p["antithesis"]) if i in flipped else ("pos", p["definition"])
                     for i, p in enumerate(order)]
            pairs.append({
                "positive": format_principles([p["definition"] for p in order]),
                "negative": format_principles([text for _, text in sides]),
                "identifiers": {"positive": [f"pos {p['name']}" for p in order],
                                "negative": [f"{sign} {p['name']}" for (sign, _), p in zip(sides, order, strict=True)]},
            })
    return pairs


# ---------------------------------------------------------------------------------------------- loading
def _fail(where: Any, message: str) -> ConstitutionError:
    return ConstitutionError(f"{where}: {message}")


def _read_json(path: pathlib.Path, where: Any = None) -> Any:
    where = where or path
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _fail(where, "no such file") from None
    except json.JSONDecodeError as e:
        raise _fail(where, f"not valid JSON (line {e.lineno}: {e.msg})") from None
    except UnicodeDecodeError as e:
        raise _fail(where, f"not UTF-8 text ({e})") from None


def _text(where: Any, obj: Mapping, key: str, context: str = "") -> str:
    label = f"{context}{key!r}"
    if key not in obj:
        raise _fail(where, f"missing key {label}")
    value = obj[key]
    if not isinstance(value, str):
        raise _fail(where, f"{label} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _fail(where, f"{label} is an empty principle")
    return value


def _object(where: Any, value: Any, what: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise _fail(where, f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _build(where: Any, factory, *args, **kwargs) -> ConstitutionScheme:
    try:
        return factory(*args, **kwargs)
    except ValueError as e:  # the classes validate too; name the file
        raise _fail(where, str(e)) from None


def _tldr_pair(where: Any, obj: Any, context: str) -> dict:
    obj = _object(where, obj, context.rstrip(": ") or "the file")
    pair = {key: _text(where, obj, key, context) for key in ("positive", "negative")}
    if isinstance(obj.get("identifiers"), Mapping):
        pair["identifiers"] = dict(obj["identifiers"])
    return pair


def _diverse_principles(where: Any, obj: Any, what: str) -> dict[str, dict[str, str]]:
    obj = _object(where, obj, what)
    if not obj:
        raise _fail(where, f"{what} is empty")
    out = {}
    for name, entry in obj.items():
        entry = _object(where, entry, f"principle {name!r}")
        out[name] = {side: _text(where, entry, side, f"principle {name!r}: ") for side in ("definition", "antithesis")}
    return out


def _from_ours(where: Any, data: Mapping) -> ConstitutionScheme:
    scheme = data["scheme"]
    source = data.get("source", "")
    if not isinstance(source, str):
        raise _fail(where, f"'source' must be a string, got {type(source).__name__}")
    if scheme == "hh":
        principles = _object(where, data.get("principles"), "'principles'")
        texts = {k: _text(where, principles, k, "principles: ") for k in ("helpful", "not_helpful", "harmless",
                                                                           "not_harmless")}
        return _build(where, HHConstitutions, **texts, source=source)
    if scheme == "tldr":
        if "pairs" in data:
            pairs = data["pairs"]
            if not isinstance(pairs, list) or not pairs:
                raise _fail(where, "'pairs' must be a non-empty list of {positive, negative} objects")
            return _build(where, TLDRConstitutions, [_tldr_pair(where, p, f"pairs[{i}]: ")
                                                     for i, p in enumerate(pairs)], source=source)
        principles = data.get("principles")
        if not isinstance(principles, list) or len(principles) != 2:
            raise _fail(where, "a tldr file needs 'pairs' or 'principles': a list of exactly 2 "
                               "{name, definition, antithesis} objects (§7.1)")
        entries = []
        for i, p in enumerate(principles):
            p = _object(where, p, f"principles[{i}]")
            entries.append({k: _text(where, p, k, f"principles[{i}]: ") for k in ("name", "definition",
                                                                                  "antithesis")})
        return _build(where, TLDRConstitutions, tldr_pairs_from_principles(entries), source=source)
    if scheme == "diverse":
        principles = _diverse_principles(where, data.get("principles"), "'principles'")
        n_learned = data.get("n_learned", 15)
        return _build(where, DiverseConstitutions, principles, n_learned=n_learned, source=source)
    raise _fail(where, f"unknown 'scheme' {scheme!r}; expected one of {SCHEMES}")


def _from_directory(path: pathlib.Path) -> ConstitutionScheme:
    numbered = sorted((p for p in path.iterdir() if re.fullmatch(r"\d+\.json", p.name)), key=lambda p: int(p.stem))
    if numbered:  # the authors' TL;DR layout; numeric order, not os.listdir's
        pairs = [_tldr_pair(p, _read_json(p), "") for p in numbered]
        return _build(path, TLDRConstitutions, pairs, source=str(path))
    if (path / "constitutions.json").is_file():
        return _from_file(path / "constitutions.json")
    raise _fail(path, "directory has no constitution files (expected 0.json, 1.json, ... or constitutions.json)")


def _from_file(path: pathlib.Path, where: Any = None) -> ConstitutionScheme:
    where = where or path
    data = _object(where, _read_json(path, where), "the file")
    if "scheme" in data:
        return _from_ours(where, data)
    if "positive" in data or "negative" in data:  # one of the authors' TL;DR files on its own
        return _build(where, TLDRConstitutions, [_tldr_pair(where, data, "")], source=str(path))
    if data and all(isinstance(v, Mapping) for v in data.values()):  # the authors' diverse constitutions.json
        return _build(where, DiverseConstitutions, _diverse_principles(where, data, "the file"), source=str(path))
    raise _fail(where, "not a constitution file: expected {\"scheme\": ...} (ours), {\"positive\", \"negative\"} "
                       "(an authors' TL;DR file) or {name: {\"definition\", \"antithesis\"}} (authors' diverse)")


def load_constitutions(spec: str | os.PathLike) -> ConstitutionScheme:
    """The scheme described by `spec`: a bundled name (:data:`BUNDLED`, which takes precedence over a
    same-named path), a JSON file in our format or the authors' (one TL;DR pair file or a diverse
    ``constitutions.json``), or a directory of the authors' ``<n>.json`` TL;DR files (or one holding a
    ``constitutions.json``)."""
    if isinstance(spec, str) and spec in BUNDLED:
        resource = importlib.resources.files("sami_jax.data").joinpath("constitution_files", f"{spec}.json")
        with importlib.resources.as_file(resource) as path:
            return _from_file(pathlib.Path(path), where=f"bundled constitutions {spec!r} ({path})")
    path = pathlib.Path(spec)
    if path.is_dir():
        return _from_directory(path)
    if not path.exists():
        raise _fail(path, f"no such file or directory (bundled names: {', '.join(BUNDLED)})")
    return _from_file(path)
