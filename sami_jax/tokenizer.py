"""One tokenizer interface over sentencepiece `tokenizer.model`, HF `tokenizer.json` and GGUF metadata.

Token ids must be exactly the ones the model was trained with, so segmentation is never reimplemented here:
every backend delegates to sentencepiece or HF `tokenizers`, and a GGUF file is turned into one of the two.
This module imports neither torch nor transformers; `gguf` is not needed either (checkpoints/gguf.py parses
the GGUF key/value header in milliseconds where `gguf.GGUFReader` takes seconds on a 49k-token vocabulary).

    tok = load_tokenizer("path/to/hf-folder")          # or a tokenizer.model / tokenizer.json / .gguf file
    ids = tok.encode("Hello", add_bos=tok.add_bos_default)
    tok.save("out/")                                  # transformers.AutoTokenizer loads it with the same ids
"""

from __future__ import annotations

import json
import pathlib
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from sami_jax.checkpoints.gguf import is_gguf, read_gguf_metadata

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
_CONFIG_FILE = "tokenizer_config.json"

# sentencepiece / llama.cpp piece types (the numbering is shared by both)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


class Tokenizer:
    """One interface over sentencepiece tokenizer.model, HF tokenizer.json and GGUF metadata.

    Attributes: bos_id (None when the vocabulary has no BOS), eos_ids (every id that ends generation,
    never empty), pad_id (the pad token, else eos_ids[0]), vocab_size, chat_template (jinja string or
    None) and add_bos_default (whether the original tokenizer prepends BOS by default).
    """

    bos_id: int | None
    eos_ids: tuple[int, ...]
    pad_id: int
    vocab_size: int
    chat_template: str | None
    add_bos_default: bool

    def __init__(self, *, source: str, vocab_size: int, bos_id: int | None, eos_ids: Sequence[int],
                 pad_id: int | None, chat_template: str | None, add_bos_default: bool):
        if not eos_ids:
            raise ValueError(f"{source}: no end-of-sequence token found (looked at generation_config.json, "
                             "config.json, tokenizer_config.json and the tokenizer itself)")
        for name, i in [("bos", bos_id), ("pad", pad_id), *(("eos", e) for e in eos_ids)]:
            if i is not None and not 0 <= i < vocab_size:
                raise ValueError(f"{source}: {name} id {i} is outside the vocabulary (size {vocab_size})")
        self.source = source
        self.vocab_size = vocab_size
        self.bos_id = bos_id
        self.eos_ids = tuple(dict.fromkeys(eos_ids))
        self.pad_id = self.eos_ids[0] if pad_id is None else pad_id
        self.chat_template = chat_template
        # A default that cannot be honoured would make every default-BOS encode fail.
        self.add_bos_default = bool(add_bos_default) and bos_id is not None

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.source!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_ids={self.eos_ids}, pad_id={self.pad_id}, add_bos_default={self.add_bos_default})")

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; never appends EOS. add_bos prepends bos_id (ValueError if there is none)."""
        return self.encode_batch([text], add_bos=add_bos)[0]

    def encode_batch(self, texts: list[str], add_bos: bool = False) -> list[list[int]]:
        """`encode` for each text, in one call to the backend (which may use several threads)."""
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a list of strings; use encode for one string")
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"can only encode str, got {type(t).__name__}")
        if add_bos and self.bos_id is None:
            raise ValueError(f"{self.source}: this tokenizer has no BOS token; encode with add_bos=False")
        ids = self._encode_batch(texts)
        return [[self.bos_id, *x] for x in ids] if add_bos else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of `ids` (a list, numpy or jax array of ints); special/control tokens are dropped unless
        skip_special_tokens=False."""
        ids = _as_id_list(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary (size {self.vocab_size})")
        return self._decode(ids, skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string as written in the vocabulary (e.g. "<|im_end|>"), None when absent."""
        raise NotImplementedError

    def save(self, directory) -> list[str]:
        """Writes files that make `directory` an HF tokenizer folder (transformers.AutoTokenizer gives the
        same ids, and so does load_tokenizer); returns the names written."""
        raise NotImplementedError

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        raise NotImplementedError

    def _id_to_token(self, i: int) -> str:
        raise NotImplementedError

    def _special_token_config(self) -> dict[str, Any]:
        """The bos/eos/pad entries of tokenizer_config.json, as token strings."""
        cfg: dict[str, Any] = {}
        if self.bos_id is not None:
            cfg["bos_token"] = self._id_to_token(self.bos_id)
        cfg["eos_token"] = self._id_to_token(self.eos_ids[0])
        cfg["pad_token"] = self._id_to_token(self.pad_id)
        return cfg

    def _write_generation_config(self, directory: pathlib.Path) -> list[str]:
        # tokenizer_config.json holds a single eos_token, so a second end id (Llama-3's <|eot_id|>) only
        # survives a round trip in generation_config.json. A model export writes its own one first; keep it.
        path = directory / "generation_config.json"
        if len(self.eos_ids) < 2 or path.exists():
            return []
        gen = {"eos_token_id": list(self.eos_ids), "pad_token_id": self.pad_id}
        if self.bos_id is not None:
            gen["bos_token_id"] = self.bos_id
        path.write_text(json.dumps(gen, indent=2) + "\n")
        return [path.name]


def _as_id_list(ids) -> list[int]:
    arr = np.asarray(ids)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"decode takes a 1-D sequence of int ids, got shape {arr.shape} dtype {arr.dtype}")
    return [int(i) for i in arr.tolist()]


# ----------------------------------------------------------------------------------------- sentencepiece
class _SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model (Llama-2, Mistral, Mixtral). Text is segmented by sentencepiece itself, so
    "<s>" written in a text stays text, as in the original Mistral/Llama reference code."""

    def __init__(self, model_proto: bytes, source: str, sp=None, **specials):
        self._proto = bytes(model_proto)
        self._sp = sp = sp if sp is not None else _load_sentencepiece(self._proto, source)
        n = sp.get_piece_size()
        self._special = frozenset(i for i in range(n) if sp.is_control(i) or sp.is_unknown(i))
        self._unk = sp.unk_id()
        super().__init__(source=source, vocab_size=n, **specials)

    def _encode_batch(self, texts):
        return self._sp.encode(texts, out_type=int)

    def _decode(self, ids, skip_special_tokens):
        if skip_special_tokens:
            return self._sp.decode([i for i in ids if i not in self._special])
        # sentencepiece drops control pieces when decoding, so write them out between decoded runs.
        parts, run = [], []
        for i in [*ids, None]:
            if i is not None and i not in self._special:
                run.append(i)
                continue
            if run:
                text = self._sp.decode(run)
                # decode drops the word-initial space of the first piece, which is only right at the start
                if parts and self._sp.id_to_piece(run[0]).startswith("\u2581"):
                    text = " " + text
                parts.append(text)
                run = []
            if i is not None:
                parts.append(self._sp.id_to_piece(i))
        return "".join(parts)

    def token_to_id(self, token):
        i = self._sp.piece_to_id(token)
        # piece_to_id answers unk_id for unknown pieces
        return None if i == self._unk and token != self._sp.id_to_piece(i) else i

    def _id_to_token(self, i):
        return self._sp.id_to_piece(i)

    def save(self, directory):
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "tokenizer.model").write_bytes(self._proto)
        # Exactly these keys: transformers then converts the model to a fast tokenizer with sentencepiece's
        # ids. Naming tokenizer_class LlamaTokenizer instead changes the ids of runs of spaces.
        cfg: dict[str, Any] = {"add_bos_token": self.add_bos_default}
        cfg.update(self._special_token_config())
        del cfg["pad_token"]  # sentencepiece models rarely have one; pad_id falls back to eos either way
        if self._unk >= 0:
            cfg["unk_token"] = self._sp.id_to_piece(self._unk)
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        (directory / _CONFIG_FILE).write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
        return ["tokenizer.model", _CONFIG_FILE, *self._write_generation_config(directory)]


# ------------------------------------------------------------------------------------------ tokenizers
class _HFTokenizer(Tokenizer):
    """An HF `tokenizers.Tokenizer` (tokenizer.json, or one built from GGUF metadata). Special tokens
    written in a text (e.g. "<|im_start|>") are single ids, as in transformers."""

    def __init__(self, tk, source: str, **specials):
        self._tk = tk
        super().__init__(source=source, vocab_size=tk.get_vocab_size(with_added_tokens=True), **specials)

    def _encode_batch(self, texts):
        # add_special_tokens=False: the post-processor must not add BOS/EOS; our add_bos flag decides.
        return [e.ids for e in self._tk.encode_batch(texts, add_special_tokens=False)]

    def _decode(self, ids, skip_special_tokens):
        return self._tk.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token):
        return self._tk.token_to_id(token)

    def _id_to_token(self, i):
        return self._tk.id_to_token(i)

    def save(self, directory):
        from tokenizers import Tokenizer as HFTok
        from tokenizers import processors

        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tk = HFTok.from_str(self._tk.to_str())
        # transformers' default call runs the post-processor, so it must add BOS exactly when we do by
        # default (and nothing else, e.g. no EOS).
        probe = tk.encode("a", add_special_tokens=False).ids
        expected = ([self.bos_id] if self.add_bos_default else []) + probe
        if tk.encode("a", add_special_tokens=True).ids != expected:
            if self.add_bos_default:
                bos = self._id_to_token(self.bos_id)
                tk.post_processor = processors.TemplateProcessing(
                    single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                    special_tokens=[(bos, self.bos_id)])
            else:
                tk.post_processor = processors.TemplateProcessing(
                    single="$A:0", pair="$A:0 $B:1", special_tokens=[])
        tk.save(str(directory / "tokenizer.json"))
        # PreTrainedTokenizerFast is what transformers 4 names this class; transformers 5 maps it to its
        # TokenizersBackend, so both load the tokenizer.json as-is.
        cfg: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos_default,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        }
        cfg.update(self._special_token_config())
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        (directory / _CONFIG_FILE).write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
        return ["tokenizer.json", _CONFIG_FILE, *self._write_generation_config(directory)]


def _load_sentencepiece(proto: bytes, source: str):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(proto)
    except (RuntimeError, OSError) as e:
        raise ValueError(f"{source}: not a readable sentencepiece model ({str(e).strip()})") from e
    return sp


def _post_processor_adds_bos(tk, bos_id: int | None) -> bool:
    """Whether tokenizer.json's post-processor prepends bos_id (how HF encodes by default)."""
    if bos_id is None:
        return False
    plain = tk.encode("a", add_special_tokens=False).ids
    return tk.encode("a", add_special_tokens=True).ids[: len(plain) + 1] == [bos_id, *plain]


# -------------------------------------------------------------------------------------------- loading
def load_tokenizer(path, config: dict | None = None) -> Tokenizer:
    """Loads a tokenizer from an HF folder, a tokenizer.model / tokenizer.json file or a .gguf file.

    In a folder tokenizer.json is preferred over tokenizer.model; tokenizer_config.json,
    special_tokens_map.json, generation_config.json, config.json and chat_template.jinja are read when
    present (also beside a tokenizer.json / tokenizer.model file) for bos/eos/pad, add_bos_token (for
    tokenizer.model; a tokenizer.json's post-processor decides, as in transformers) and the chat template.
    eos_ids is the union, in this order, of generation_config's eos_token_id (int or list), config.json's,
    tokenizer_config's eos_token and the tokenizer's own. `config` (an HF config.json dict) replaces
    config.json as a source of bos/eos/pad ids (for a .gguf file it adds its eos ids to the file's).
    """
    path = pathlib.Path(path)
    if path.is_dir():
        found = [path / name for name in TOKENIZER_FILES if (path / name).is_file()]
        if not found:
            looked = ", ".join(TOKENIZER_FILES)
            raise FileNotFoundError(f"{path}: no tokenizer in this folder (looked for {looked})")
        file, folder = found[0], path
    elif path.is_file():
        file = path
        folder = path.parent if path.name in TOKENIZER_FILES else None
    else:
        raise FileNotFoundError(f"{path}: no such file or folder")

    if is_gguf(file):
        return _tokenizer_from_gguf(file, config)

    meta = _read_hf_metadata(folder) if folder is not None else {}
    if config is not None:
        meta["config.json"] = config
    if file.suffix == ".json":
        try:
            from tokenizers import Tokenizer as HFTok

            tk = HFTok.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
            raise ValueError(f"{file}: not a readable tokenizer.json ({e})") from e
        specials = _resolve_specials(meta, tk.token_to_id, native={})
        # transformers 5 ignores add_bos_token for a tokenizer.json (checked with the generic, Llama and
        # GPT-2 classes): its post-processor alone decides, so it decides here too.
        specials["add_bos_default"] = _post_processor_adds_bos(tk, specials["bos_id"])
        return _HFTokenizer(tk, str(file), **specials)

    proto = file.read_bytes()
    sp = _load_sentencepiece(proto, str(file))
    # sentencepiece says -1 for "none"
    native = {k: (i if i >= 0 else None)
              for k, i in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("pad", sp.pad_id()))}
    specials = _resolve_specials(meta, lambda t: _sp_piece_id(sp, t), native=native)
    if specials["add_bos_default"] is None:
        # Llama's and Mistral's own code prepend BOS. (transformers 5 adds none unless tokenizer_config.json
        # says add_bos_token, which is why save() always writes it.)
        specials["add_bos_default"] = specials["bos_id"] is not None
    return _SentencePieceTokenizer(proto, str(file), sp=sp, **specials)


def _sp_piece_id(sp, token: str) -> int | None:
    i = sp.piece_to_id(token)
    return None if i == sp.unk_id() and sp.id_to_piece(i) != token else i


def _read_json(path: pathlib.Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_hf_metadata(folder: pathlib.Path) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for name in (_CONFIG_FILE, "special_tokens_map.json", "generation_config.json", "config.json"):
        if (folder / name).is_file():
            meta[name] = _read_json(folder / name)
    # transformers >= 4.43 writes the template to its own file rather than into tokenizer_config.json
    if (folder / "chat_template.jinja").is_file():
        meta["chat_template.jinja"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return meta


def _token_string(value) -> str | None:
    # tokenizer_config.json spells a token either as a string or as a serialized AddedToken
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _id_list(value) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    return [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _resolve_specials(meta: dict[str, Any], token_to_id, native: dict[str, Any]) -> dict[str, Any]:
    """bos/eos/pad ids, add_bos_default and chat template from the HF side files (see load_tokenizer),
    falling back to what the tokenizer model itself defines (`native`)."""
    tok_cfg = meta.get(_CONFIG_FILE, {})
    tok_map = meta.get("special_tokens_map.json", {})
    gen = meta.get("generation_config.json", {})
    cfg = meta.get("config.json", {})

    def from_token(key):
        for d in (tok_cfg, tok_map):
            s = _token_string(d.get(key))
            if s is not None and token_to_id(s) is not None:
                return token_to_id(s)
        return None

    def first(*values):
        return next((v for v in values if v is not None), None)

    bos = first(from_token("bos_token"), *_id_list(cfg.get("bos_token_id"))[:1],
                *_id_list(gen.get("bos_token_id"))[:1], native.get("bos"))
    eos_token = from_token("eos_token")
    eos = [*_id_list(gen.get("eos_token_id")), *_id_list(cfg.get("eos_token_id")),
           *([eos_token] if eos_token is not None else []), *_id_list(native.get("eos"))]
    pad = first(from_token("pad_token"), *_id_list(cfg.get("pad_token_id"))[:1],
                *_id_list(gen.get("pad_token_id"))[:1], native.get("pad"))
    add_bos = tok_cfg.get("add_bos_token")
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # some tokenizer_config.json files hold [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    template = first(template if isinstance(template, str) else None, meta.get("chat_template.jinja"),
                     native.get("chat_template"))
    return {"bos_id": bos, "eos_ids": list(dict.fromkeys(eos)), "pad_id": pad,
            "add_bos_default": add_bos if isinstance(add_bos, bool) else native.get("add_bos"),
            "chat_template": template}


# ----------------------------------------------------------------------------------------------- GGUF
# Pre-tokenizer regexes for GGUF `tokenizer.ggml.pre` values whose split differs from GPT-2's; BPE merges
# only reproduce the original ids when the text is split the way they were learned. Others: GPT-2 split.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2 is Llama-3's split with digits one at a time.
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_GGUF_PRE_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3", "dbrx"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
}


def tokenizer_from_gguf(path) -> Tokenizer:
    """The tokenizer stored in a GGUF file's metadata, without torch or gguf.

    tokenizer.ggml.model "gpt2" becomes a byte-level BPE `tokenizers.Tokenizer` (tokens + merges, control
    tokens as special tokens); "llama" becomes the sentencepiece BPE model it was converted from (pieces,
    scores and types). bos/eos/pad come from tokenizer.ggml.*_token_id (eot/eom ids also end generation),
    the chat template from tokenizer.chat_template.
    """
    return _tokenizer_from_gguf(path)


def _tokenizer_from_gguf(path, config: dict | None = None) -> Tokenizer:
    """tokenizer_from_gguf; an HF config.json dict `config` adds its eos ids and overrides bos/pad."""
    path = pathlib.Path(path)
    config = config or {}
    meta = read_gguf_metadata(path)
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if model is None or tokens is None:
        raise ValueError(f"{path}: this GGUF file holds no tokenizer (no tokenizer.ggml.model / tokens)")
    types = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"{path}: {len(tokens)} tokens but {len(types)} token types")

    def token_id(key):
        v = meta.get(f"tokenizer.ggml.{key}_token_id")
        return int(v) if v is not None and 0 <= int(v) < len(tokens) else None

    eos = [i for i in (token_id("eos"), token_id("eot"), token_id("eom")) if i is not None]
    eos += _id_list(config.get("eos_token_id"))
    bos = [*_id_list(config.get("bos_token_id")), token_id("bos")][0]
    pad = [*_id_list(config.get("pad_token_id")), token_id("padding")][0]
    specials = {"bos_id": bos, "eos_ids": eos, "pad_id": pad,
                "chat_template": meta.get("tokenizer.chat_template"),
                "add_bos_default": meta.get("tokenizer.ggml.add_bos_token", model == "llama")}
    if model == "gpt2":
        return _HFTokenizer(_gguf_byte_level_bpe(meta, tokens, types, path), str(path), **specials)
    if model == "llama":
        proto = _gguf_sentencepiece_proto(meta, tokens, types, path, token_id)
        return _SentencePieceTokenizer(proto, str(path), **specials)
    raise ValueError(f"{path}: unsupported GGUF tokenizer model {model!r} (supported: 'gpt2', 'llama')")


def _gguf_byte_level_bpe(meta, tokens, types, path):
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTok

    merges = meta.get("tokenizer.ggml.merges")
    if not merges:
        raise ValueError(f"{path}: GGUF tokenizer model 'gpt2' without tokenizer.ggml.merges")
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a duplicated string keeps its first id
    # Byte-level tokens never hold a literal space, so the first space separates the pair.
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tk = HFTok(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    split = _GGUF_PRE_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is None:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tk.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, <|eot_id|>) are matched whole in text and skipped when decoding;
    # user-defined ones are matched whole but decoded like text.
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, k in zip(tokens, types, strict=True) if k == _CONTROL])
    tk.add_tokens([AddedToken(t, special=False, normalized=False)
                   for t, k in zip(tokens, types, strict=True) if k == _USER_DEFINED])
    if tk.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ValueError(f"{path}: rebuilt vocabulary has {tk.get_vocab_size(with_added_tokens=True)} "
                         f"tokens, the file lists {len(tokens)}")
    return tk


# Minimal protobuf writer for sentencepiece's ModelProto (field numbers from sentencepiece_model.proto),
# so that a "llama" GGUF becomes a real sentencepiece model without needing protobuf installed.
def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32 values are written as 10-byte two's complement
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _pb_int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(int(value))


def _pb_bytes(field: int, value: bytes | str) -> bytes:
    data = value.encode("utf-8") if isinstance(value, str) else value
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _pb_float(field: int, value: float) -> bytes:
    return _varint(field << 3 | 5) + struct.pack("<f", value)


def _gguf_sentencepiece_proto(meta, tokens, types, path, token_id) -> bytes:
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    if len(scores) != len(tokens):
        raise ValueError(f"{path}: {len(tokens)} tokens but {len(scores)} scores")
    unk = token_id("unknown")
    if unk is None:
        unk = next((i for i, k in enumerate(types) if k == _UNKNOWN), None)
    if unk is None:
        raise ValueError(f"{path}: GGUF tokenizer model 'llama' without an unknown token")
    known = (_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE)
    types = [_UNKNOWN if i == unk else (k if k in known else _NORMAL) for i, k in enumerate(types)]
    if types.count(_UNKNOWN) != 1:
        raise ValueError(f"{path}: sentencepiece needs exactly one unknown token, "
                         f"found {types.count(_UNKNOWN)}")

    def control_id(key):  # sentencepiece only accepts control pieces as bos/eos/pad
        i = token_id(key)
        return i if i is not None and types[i] == _CONTROL else -1

    bos, eos, pad = control_id("bos"), control_id("eos"), control_id("padding")
    if pad in (bos, eos):
        pad = -1
    pieces = b"".join(
        _pb_bytes(1, _pb_bytes(1, t) + _pb_float(2, s) + _pb_int(3, k))
        for t, s, k in zip(tokens, scores, types, strict=True))
    # llama.cpp merges by score over the whole text, like sentencepiece BPE with whitespace-only pieces
    # allowed; byte fallback exists exactly when the vocabulary has <0xXX> pieces.
    trainer = (_pb_int(3, 2) + _pb_int(4, len(tokens)) + _pb_int(26, 1)
               + _pb_int(35, int(_BYTE in types))
               + _pb_int(40, unk) + _pb_int(41, bos) + _pb_int(42, eos) + _pb_int(43, pad))
    add_prefix = int(meta.get("tokenizer.ggml.add_space_prefix", True))
    normalizer = _pb_bytes(1, "identity") + _pb_int(3, add_prefix) + _pb_int(4, 0) + _pb_int(5, 1)
    return pieces + _pb_bytes(2, trainer) + _pb_bytes(3, normalizer)


def apply_chat_template(template: str, prompt: str, bos: str = "", eos: str = "", system: str | None = None) -> str:
    """One user turn (after an optional system message) rendered with a jinja chat template, ready for the
    assistant's answer. bos/eos fill templates that write those tokens as text."""
    import jinja2

    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": prompt}]
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, bos_token=bos,
                                            eos_token=eos)
