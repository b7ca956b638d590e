"""sami_jax.tokenizer against other implementations: transformers (its GGUF loader and AutoTokenizer on
saved folders) and sentencepiece, on real HH-RLHF dialogues with the real SmolLM2 and Mistral vocabularies."""

import json
import pathlib
import shutil

import pytest

from sami_jax.tokenizer import load_tokenizer, tokenizer_from_gguf

N_TEXTS = 600
# Corners the dialogues rarely hit: runs of spaces and newlines, digits, byte fallback, a leading space.
EXTRA = ["  two  spaces\n\n\n1. three\t\ttabs  ", " leading space", "12345 + 0.5 = 12345.5", "naïve café 日本語 🤖",
         "", "a"]


@pytest.fixture(scope="module")
def texts(hh_texts):
    return hh_texts[:N_TEXTS] + EXTRA


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    return tokenizer_from_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def smol_hf(smollm2_gguf, transformers):
    pytest.importorskip("gguf")
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="module")
def mistral(mistral_tokenizer_model):
    return load_tokenizer(mistral_tokenizer_model)


@pytest.fixture(scope="module")
def mistral_sp(mistral_tokenizer_model):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(mistral_tokenizer_model))


@pytest.fixture(scope="module")
def mistral_hf(mistral_tokenizer_model, transformers, tmp_path_factory):
    # The folder layout documented to make transformers match sentencepiece exactly.
    folder = tmp_path_factory.mktemp("mistral_hf")
    shutil.copy(mistral_tokenizer_model, folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def _hf_ids(hf_tok, texts, **kwargs):
    return hf_tok(texts, **kwargs)["input_ids"]


def _assert_same(ours, theirs, texts):
    assert len(ours) == len(theirs) == len(texts)
    bad = [i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b]
    assert not bad, f"{len(bad)} of {len(texts)} texts differ, first {texts[bad[0]][:200]!r}"


# ------------------------------------------------------------------------------------------- SmolLM2
def test_smollm2_gguf_matches_transformers(smol, smol_hf, smollm2_gguf, texts):
    assert smol.bos_id == 1 and 2 in smol.eos_ids and smol.pad_id == 2
    assert smol.vocab_size == 49152 and smol.add_bos_default is False
    assert smol.chat_template == smol_hf.chat_template and "<|im_start|>" in smol.chat_template
    ours = smol.encode_batch(texts)
    _assert_same(ours, _hf_ids(smol_hf, texts, add_special_tokens=False), texts)
    # transformers' default call adds what the original adds (nothing for SmolLM2)
    _assert_same(smol.encode_batch(texts, add_bos=smol.add_bos_default), _hf_ids(smol_hf, texts), texts)
    assert [smol.decode(ids) for ids in ours] == texts
    # load_tokenizer dispatches on the file, and add_bos prepends bos_id
    via_load = load_tokenizer(smollm2_gguf)
    assert via_load.encode(texts[0], add_bos=True) == [1, *ours[0]]


def test_smollm2_special_tokens_in_text(smol, smol_hf):
    text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = smol.encode(text)
    assert ids == smol_hf(text, add_special_tokens=False)["input_ids"]
    assert ids[:5] == [1, 4093, 198, 6004, 2] and ids.count(1) == 2
    assert smol.token_to_id("<|im_end|>") == 2 and smol.token_to_id("no such token") is None
    assert smol.decode(ids, skip_special_tokens=False) == text
    assert smol.decode(ids) == smol_hf.decode(ids, skip_special_tokens=True) == "user\nhi\nassistant\n"


# ------------------------------------------------------------------------------------------- Mistral
def test_mistral_matches_sentencepiece_and_transformers(mistral, mistral_sp, mistral_hf, texts):
    assert (mistral.bos_id, mistral.eos_ids, mistral.pad_id) == (1, (2,), 2)
    assert mistral.vocab_size == 32000 and mistral.add_bos_default is True
    plain = mistral.encode_batch(texts)
    with_bos = mistral.encode_batch(texts, add_bos=True)
    _assert_same(plain, mistral_sp.encode(texts, out_type=int), texts)
    _assert_same(with_bos, [[1, *ids] for ids in plain], texts)
    _assert_same(with_bos, _hf_ids(mistral_hf, texts), texts)  # transformers adds <s> by default
    _assert_same(plain, _hf_ids(mistral_hf, texts, add_special_tokens=False), texts)
    assert [mistral.decode(ids) for ids in with_bos] == [mistral_sp.decode(ids) for ids in plain]
    assert mistral.decode(with_bos[0]) == texts[0]
    # The one known difference: transformers turns "<s>" written in a text into the BOS id, sentencepiece
    # (and so we, like Mistral's own code) keeps it as text.
    literal = "a <s> b </s>"
    assert mistral.encode(literal) == mistral_sp.encode(literal) and 1 not in mistral.encode(literal)
    assert mistral_hf(literal, add_special_tokens=False)["input_ids"].count(1) == 1


# ---------------------------------------------------------------------------------------------- save
def test_save_smollm2_loads_in_transformers(smol, transformers, texts, tmp_path):
    written = smol.save(tmp_path)
    assert set(written) == {"tokenizer.json", "tokenizer_config.json"}
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ours = smol.encode_batch(texts)
    _assert_same(_hf_ids(hf, texts), ours, texts)
    _assert_same(_hf_ids(hf, texts, add_special_tokens=False), ours, texts)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 2)
    assert hf.chat_template == smol.chat_template
    again = load_tokenizer(tmp_path)
    _assert_same(again.encode_batch(texts), ours, texts)
    assert (again.bos_id, again.eos_ids, again.pad_id, again.add_bos_default, again.chat_template) == (
        smol.bos_id, smol.eos_ids, smol.pad_id, smol.add_bos_default, smol.chat_template)


def test_save_mistral_loads_in_transformers(mistral, transformers, texts, tmp_path):
    assert set(mistral.save(tmp_path)) == {"tokenizer.model", "tokenizer_config.json"}
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    _assert_same(_hf_ids(hf, texts), mistral.encode_batch(texts, add_bos=True), texts)
    again = load_tokenizer(tmp_path)
    _assert_same(again.encode_batch(texts), mistral.encode_batch(texts), texts)
    assert (again.bos_id, again.eos_ids, again.add_bos_default) == (1, (2,), True)


def test_generation_config_eos_list(smol, transformers, tmp_path):
    # Llama-3 style: tokenizer_config names one eos, generation_config lists every id that ends a turn.
    smol.save(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    tok = load_tokenizer(tmp_path)
    assert tok.eos_ids == (0, 2) and tok.pad_id == 2
    assert load_tokenizer(tmp_path / "tokenizer.json").eos_ids == (0, 2)  # side files beside the file count too
    # config.json / the config argument add theirs after generation_config's
    assert load_tokenizer(tmp_path, config={"eos_token_id": 5}).eos_ids == (0, 2, 5)
    # saving keeps both ids (in generation_config.json, since tokenizer_config holds a single eos_token)
    out = tmp_path / "resaved"
    assert "generation_config.json" in tok.save(out)
    assert load_tokenizer(out).eos_ids == (0, 2)
    assert transformers.AutoTokenizer.from_pretrained(str(out)).eos_token_id == 0


# --------------------------------------------------------------------------------------- GGUF variants
def _write_gguf(path, tokenizer_model, tokens, types, **extra):
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_tokenizer_model(tokenizer_model)
    w.add_token_list(tokens)
    w.add_token_types(types)
    for key, value in extra.items():
        getattr(w, f"add_{key}")(value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_llama_gguf_is_sentencepiece(mistral_sp, texts, tmp_path):
    # What llama.cpp's converter stores for a sentencepiece model: pieces, scores and piece types.
    sp = mistral_sp
    n = sp.get_piece_size()
    types = [3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    path = _write_gguf(tmp_path / "mistral.gguf", "llama", [sp.id_to_piece(i) for i in range(n)], types,
                       token_scores=[sp.get_score(i) for i in range(n)], bos_token_id=1, eos_token_id=2,
                       unk_token_id=0, add_bos_token=True, add_space_prefix=True)
    tok = load_tokenizer(path)
    assert (tok.bos_id, tok.eos_ids, tok.add_bos_default, tok.vocab_size) == (1, (2,), True, n)
    _assert_same(tok.encode_batch(texts), sp.encode(texts, out_type=int), texts)


def test_llama3_pre_tokenizer_gguf_matches_transformers(smol, transformers, texts, tmp_path):
    # A byte-level GGUF whose tokenizer.ggml.pre asks for Llama-3's split (here over SmolLM2's merges).
    from sami_jax.checkpoints.gguf import read_gguf_metadata

    meta = read_gguf_metadata(smol.source)
    path = _write_gguf(tmp_path / "llama3.gguf", "gpt2", meta["tokenizer.ggml.tokens"],
                       meta["tokenizer.ggml.token_type"], token_merges=meta["tokenizer.ggml.merges"],
                       tokenizer_pre="llama-bpe", bos_token_id=1, eos_token_id=2, add_bos_token=True)
    tok = load_tokenizer(path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    samples = ["I'M 12345 ok'S\n\n1. fine   \n  x", *texts]
    assert tok.encode(samples[0]) != smol.encode(samples[0])  # the split differs from GPT-2's
    assert tok.add_bos_default is True
    ours = tok.encode_batch(samples, add_bos=True)
    _assert_same(ours, _hf_ids(hf, samples), samples)
    # saved, the BOS default lives in tokenizer.json's post-processor, which is what transformers 5 follows
    tok.save(tmp_path / "saved")
    _assert_same(_hf_ids(transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved")), samples), ours, samples)
    assert load_tokenizer(tmp_path / "saved").add_bos_default is True


@pytest.mark.parametrize("endian", ["LITTLE", "BIG"])
def test_gguf_metadata_reader_matches_gguf_reader(endian, tmp_path):
    # Our header parser against gguf-py's own reader, on every value type and both byte orders.
    gguf = pytest.importorskip("gguf")
    from sami_jax.checkpoints.gguf import read_gguf_metadata

    path = tmp_path / "kv.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama", endianess=getattr(gguf.GGUFEndian, endian))
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -300)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -7)
    w.add_float32("t.f32", 0.5)
    w.add_uint64("t.u64", 2**60)
    w.add_int64("t.i64", -(2**40))
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo <|im_end|>")
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.25, -1.5])
    w.add_array("t.strs", ["a", "", "日本"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = read_gguf_metadata(path)
    # GGUFReader also lists the header as GGUF.* pseudo-keys
    theirs = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("GGUF.")}
    assert ours == theirs
    assert ours["t.strs"] == ["a", "", "日本"] and ours["t.i64"] == -(2**40)


# -------------------------------------------------------------------------------------------- errors
def test_errors(smol, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"empty.*tokenizer\.json, tokenizer\.model"):
        (tmp_path / "empty").mkdir()
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="missing"):
        load_tokenizer(tmp_path / "missing")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "tokenizer.model").write_bytes(b"\x00\x01 definitely not a sentencepiece model \xff" * 10)
    with pytest.raises(ValueError, match=r"garbage/tokenizer\.model"):
        load_tokenizer(garbage)
    (garbage / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"garbage/tokenizer\.json"):
        load_tokenizer(garbage)
    (tmp_path / "cut.gguf").write_bytes(pathlib.Path(smol.source).read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"cut\.gguf"):
        tokenizer_from_gguf(tmp_path / "cut.gguf")
    bert = _write_gguf(tmp_path / "bert.gguf", "bert", ["[UNK]", "a"], [2, 1])
    with pytest.raises(ValueError, match=r"bert\.gguf.*'bert'"):
        tokenizer_from_gguf(bert)
    # A tokenizer without BOS (tokenizer_config names none, no config.json)
    smol.save(tmp_path / "nobos")
    (tmp_path / "nobos" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    nobos = load_tokenizer(tmp_path / "nobos")
    assert nobos.bos_id is None and nobos.eos_ids == (2,)
    assert nobos.encode("hi") == [6004]
    with pytest.raises(ValueError, match="no BOS"):
        nobos.encode("hi", add_bos=True)
