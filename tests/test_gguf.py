"""GGUFSource: the real SmolLM2 Q4_1 GGUF against transformers' own GGUF loader, and tiny synthetic GGUF
files for the q/k un-permutation, stored dtypes, experts, rope metadata and the error messages."""

import pathlib

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from sami_jax.checkpoints import CheckpointError  # noqa: E402
from sami_jax.checkpoints import gguf as gguf_ckpt  # noqa: E402
from sami_jax.checkpoints.gguf import GGUFSource  # noqa: E402

T = gguf.GGMLQuantizationType


# ---- real SmolLM2-135M-Instruct (Q4_1 linears, Q8_0 embeddings, F32 norms) ----------------------------


@pytest.fixture(scope="module")
def smollm2_source(smollm2_gguf) -> GGUFSource:
    return GGUFSource(smollm2_gguf)


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_transformers):
    """transformers' own dequantization of the same file: {name: float32 array}."""
    return {k: v.numpy() for k, v in smollm2_transformers.state_dict().items()}


def test_smollm2_config(smollm2_source):
    cfg = smollm2_source.hf_config()
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    expected = {
        "num_hidden_layers": 30,
        "hidden_size": 576,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "rope_theta": 1e5,
        "rms_norm_eps": 1e-5,  # stored as float32 9.99999974e-06, given back as the decimal it came from
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    }
    assert {k: cfg[k] for k in expected} == expected
    assert "rope_scaling" not in cfg and "num_local_experts" not in cfg and "sliding_window" not in cfg
    # the dict is usable as a config.json by transformers
    transformers = pytest.importorskip("transformers")
    rebuilt = transformers.AutoConfig.for_model(**cfg)
    assert rebuilt.num_key_value_heads == 3 and rebuilt.rope_parameters["rope_theta"] == 1e5
    assert smollm2_source.metadata("tokenizer.ggml.model") == "gpt2"
    assert len(smollm2_source.metadata("tokenizer.ggml.tokens")) == 49152
    assert smollm2_source.metadata("no.such.key", "absent") == "absent"


def test_smollm2_tensors_equal_transformers(smollm2_source, hf_smollm2):
    hf = hf_smollm2
    names = smollm2_source.names()
    assert len(names) == len(set(names)) == 272
    # transformers materialises the tied lm_head; the GGUF (and so our source) has no output.weight
    assert set(names) == set(hf) - {"lm_head.weight"}
    for name in names:
        ours = smollm2_source.read(name)
        assert ours.dtype == np.float32, name  # Q4_1/Q8_0 dequantized, norms stored as F32
        assert ours.shape == smollm2_source.shape(name) == hf[name].shape, name
        np.testing.assert_array_equal(ours, hf[name], err_msg=name)  # bit-identical, q/k included


def test_unknown_name(smollm2_source):
    with pytest.raises(CheckpointError) as e:
        smollm2_source.read("lm_head.weight")
    assert smollm2_source.path in str(e.value) and "lm_head.weight" in str(e.value)
    with pytest.raises(CheckpointError):
        smollm2_source.shape("model.layers.30.mlp.up_proj.weight")


# ---- synthetic files ------------------------------------------------------------------------------------

HEADS, KV_HEADS, HEAD_DIM, VOCAB, FFN = 4, 2, 8, 10, 64
D = HEADS * HEAD_DIM  # 32: one Q8_0 block per row


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's q/k row permutation (HF layout -> GGUF layout)."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _write(path: pathlib.Path, tensors: dict, arch: str = "llama", meta=None, *, layers=1, context=128, hidden=D,
           ffn=FFN, heads=HEADS, kv_heads=KV_HEADS, eps=1e-6) -> pathlib.Path:
    """A GGUF file with llama metadata; tensors maps GGUF name -> array or (raw bytes, GGML type)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(context)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(eps)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for add in meta or ():
        add(w)
    for name, value in tensors.items():
        if isinstance(value, tuple):
            w.add_tensor(name, value[0], raw_dtype=value[1])
        else:
            w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _rand(*shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed + sum(shape)).standard_normal(shape).astype(np.float32)


def _dense_model(**override) -> dict:
    tensors = {
        "token_embd.weight": _rand(VOCAB, D),
        "output_norm.weight": _rand(D),
        "blk.0.attn_norm.weight": _rand(D),
        "blk.0.ffn_norm.weight": _rand(D, seed=1),
        "blk.0.attn_q.weight": _rand(D, D),
        "blk.0.attn_k.weight": _rand(KV_HEADS * HEAD_DIM, D),
        "blk.0.attn_v.weight": _rand(KV_HEADS * HEAD_DIM, D, seed=1),
        "blk.0.attn_output.weight": _rand(D, D, seed=1),
        "blk.0.ffn_gate.weight": _rand(FFN, D),
        "blk.0.ffn_up.weight": _rand(FFN, D, seed=1),
        "blk.0.ffn_down.weight": _rand(D, FFN),
    }
    tensors.update(override)
    return tensors


def test_synthetic_permutation_dtypes_and_config(tmp_path):
    import ml_dtypes

    q_hf, k_hf = _rand(D, D, seed=5), _rand(KV_HEADS * HEAD_DIM, D, seed=6)
    v16 = _rand(KV_HEADS * HEAD_DIM, D, seed=7).astype(np.float16)
    o32 = _rand(D, D, seed=8)
    up32 = _rand(FFN, D, seed=9)
    lm_head = _rand(VOCAB, D, seed=10)
    path = _write(
        tmp_path / "tiny.gguf",
        _dense_model(**{
            "blk.0.attn_q.weight": _permute(q_hf, HEADS),
            "blk.0.attn_k.weight": _permute(k_hf, KV_HEADS),
            "blk.0.attn_v.weight": v16,
            "blk.0.attn_output.weight": (gguf.quants.quantize(o32, T.BF16), T.BF16),
            "blk.0.ffn_up.weight": (gguf.quants.quantize(up32, T.Q8_0), T.Q8_0),
            "output.weight": lm_head,
        }),
        meta=[
            lambda w: w.add_rope_freq_base(5e5),
            lambda w: w.add_sliding_window(64),
            lambda w: w.add_pad_token_id(0),
            lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR),
            lambda w: w.add_rope_scaling_factor(2.0),
            lambda w: w.add_rope_scaling_orig_ctx_len(64),
        ],
    )
    src = GGUFSource(path)
    assert src.path == str(path)

    # q and k rows come back in HF order exactly (q with 4 heads, k with its 2 KV heads)
    np.testing.assert_array_equal(src.read("model.layers.0.self_attn.q_proj.weight"), q_hf)
    np.testing.assert_array_equal(src.read("model.layers.0.self_attn.k_proj.weight"), k_hf)
    assert not np.array_equal(_permute(q_hf, HEADS), q_hf)  # the test would be vacuous otherwise

    # stored F16/BF16 keep their dtype; quantized types come back as float32
    v = src.read("model.layers.0.self_attn.v_proj.weight")
    assert v.dtype == np.float16
    np.testing.assert_array_equal(v, v16)
    o = src.read("model.layers.0.self_attn.o_proj.weight")
    assert o.dtype == ml_dtypes.bfloat16 and o.shape == (D, D)
    np.testing.assert_array_equal(o, o32.astype(ml_dtypes.bfloat16))
    up = src.read("model.layers.0.mlp.up_proj.weight")
    assert up.dtype == np.float32 and up.shape == (FFN, D)
    np.testing.assert_array_equal(up, gguf.quants.dequantize(gguf.quants.quantize(up32, T.Q8_0), T.Q8_0))
    np.testing.assert_allclose(up, up32, atol=0.05)
    np.testing.assert_array_equal(src.read("lm_head.weight"), lm_head)
    assert src.shape("model.layers.0.mlp.down_proj.weight") == (D, FFN)
    assert src.read("model.layers.0.mlp.down_proj.weight").shape == (D, FFN)

    assert set(src.names()) == {
        "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
        "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
        *(f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkvo"),
        *(f"model.layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
    }
    cfg = src.hf_config()
    assert cfg == {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": D,
        "intermediate_size": FFN,
        "num_hidden_layers": 1, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM, "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 5e5,
        "max_position_embeddings": 128, "vocab_size": VOCAB, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "sliding_window": 64,
        "rope_scaling": {"rope_type": "linear", "factor": 2.0, "original_max_position_embeddings": 64},
    }
    cfg["hidden_size"] = 0
    assert src.hf_config()["hidden_size"] == D  # callers get a copy


@pytest.mark.parametrize("layout", ["stacked", "split"])
def test_synthetic_experts(tmp_path, layout):
    n_exp = 2
    gate, up = _rand(n_exp, FFN, D, seed=11), _rand(n_exp, FFN, D, seed=12)
    down = _rand(n_exp, D, FFN, seed=13)
    router = _rand(n_exp, D, seed=14)
    dense = _dense_model()
    for stem in ("ffn_gate", "ffn_up", "ffn_down"):
        del dense[f"blk.0.{stem}.weight"]
    if layout == "stacked":  # current llama.cpp: one [E, out, in] tensor per projection, here Q8_0 for gate
        experts = {
            "blk.0.ffn_gate_exps.weight": (gguf.quants.quantize(gate, T.Q8_0), T.Q8_0),
            "blk.0.ffn_up_exps.weight": up,
            "blk.0.ffn_down_exps.weight": down,
        }
    else:  # files converted before the stacked layout existed
        experts = {f"blk.0.{stem}.{e}.weight": w[e] for stem, w in
                   (("ffn_gate", gate), ("ffn_up", up), ("ffn_down", down)) for e in range(n_exp)}
    path = _write(
        tmp_path / "moe.gguf",
        dense | experts | {"blk.0.ffn_gate_inp.weight": router},
        meta=[lambda w: w.add_expert_count(n_exp), lambda w: w.add_expert_used_count(1)],
    )
    src = GGUFSource(path)
    cfg = src.hf_config()
    assert cfg["architectures"] == ["MixtralForCausalLM"] and cfg["model_type"] == "mixtral"
    assert cfg["num_local_experts"] == 2 and cfg["num_experts_per_tok"] == 1
    prefix = "model.layers.0.block_sparse_moe"
    names = set(src.names())
    assert f"{prefix}.gate.weight" in names and not any(".mlp." in n for n in names)
    np.testing.assert_array_equal(src.read(f"{prefix}.gate.weight"), router)
    gate_ref = gate
    if layout == "stacked":
        gate_ref = gguf.quants.dequantize(gguf.quants.quantize(gate, T.Q8_0), T.Q8_0)
    for e in range(n_exp):
        for w, ref, shape in (("w1", gate_ref, (FFN, D)), ("w3", up, (FFN, D)), ("w2", down, (D, FFN))):
            name = f"{prefix}.experts.{e}.{w}.weight"
            assert name in names and src.shape(name) == shape
            out = src.read(name)
            assert out.dtype == np.float32 and out.shape == shape
            np.testing.assert_array_equal(out, ref[e], err_msg=name)
    assert f"{prefix}.experts.2.w1.weight" not in names


# ---- errors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_type", [T.I32, T.Q8_1])
def test_unsupported_tensor_type(tmp_path, bad_type):
    assert bad_type not in gguf_ckpt.SUPPORTED_TYPES
    assert {T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q8_0, T.Q4_K, T.Q6_K} <= gguf_ckpt.SUPPORTED_TYPES
    if bad_type == T.I32:
        bad = np.arange(D, dtype=np.int32)  # the writer types int32 arrays as I32
    else:
        block, size = gguf.GGML_QUANT_SIZES[bad_type]
        bad = (np.zeros((1, D // block * size), np.uint8), bad_type)
    path = _write(tmp_path / "bad.gguf", _dense_model(**{"blk.0.ffn_norm.weight": bad}))
    with pytest.raises(CheckpointError) as e:
        GGUFSource(path)
    msg = str(e.value)
    for part in (str(path), "blk.0.ffn_norm.weight", "model.layers.0.post_attention_layernorm.weight",
                 bad_type.name, "Q4_K"):
        assert part in msg, (part, msg)


def test_unsupported_architecture(tmp_path):
    path = _write(tmp_path / "gpt2.gguf", {"token_embd.weight": _rand(VOCAB, D)}, arch="gpt2")
    with pytest.raises(CheckpointError) as e:
        GGUFSource(path).hf_config()
    assert str(path) in str(e.value) and "gpt2" in str(e.value) and "llama" in str(e.value)


def test_unmapped_tensor_is_refused(tmp_path):
    # a bias (llama.cpp writes Qwen-style q/k/v biases under the same names): dropping it would change the model
    path = _write(tmp_path / "extra.gguf", _dense_model(**{"blk.0.attn_q.bias": _rand(D)}))
    with pytest.raises(CheckpointError, match=r"blk\.0\.attn_q\.bias"):
        GGUFSource(path)


# ---- Llama-3.1/3.2 RoPE scaling as llama.cpp stores it (rope_freqs.weight) ---------------------------------


def _llamacpp_rope_factors(theta, dim, factor, low, high, original) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's LlamaModel rope_freqs for rope_type llama3, as a plain loop."""
    out = []
    for freq in 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)):
        wavelen = 2 * np.pi / freq
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


@pytest.mark.parametrize("name,theta,dim,factor,low,high,original", [
    ("Llama-3.1-8B", 5e5, 128, 8.0, 1.0, 4.0, 8192),
    ("Llama-3.2-1B", 5e5, 64, 32.0, 1.0, 4.0, 8192),
    ("other bands", 1e4, 32, 4.0, 2.0, 8.0, 256),
])
def test_rope_factors_give_back_hf_scaling(name, theta, dim, factor, low, high, original):
    """The published Llama-3 settings come back as the HF rope_scaling they were converted from."""
    f = _llamacpp_rope_factors(theta, dim, factor, low, high, original)
    assert gguf_ckpt.llama3_scaling_from_factors(f, theta, dim, original) == {
        "rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
        "original_max_position_embeddings": original}
    assert gguf_ckpt.llama3_scaling_from_factors(np.ones(dim // 2, np.float32), theta, dim) is None


@pytest.mark.parametrize("factors", ["random", "wrong_length"])
def test_rope_factors_no_scaling_can_express_are_refused(tmp_path, factors):
    f = np.random.default_rng(0).uniform(1, 3, HEAD_DIM // 2).astype(np.float32)
    if factors == "wrong_length":
        f = np.ones(HEAD_DIM, np.float32)
    path = _write(tmp_path / "bad_rope.gguf", _dense_model(**{"rope_freqs.weight": f}))
    with pytest.raises(CheckpointError) as e:
        GGUFSource(path)
    assert str(path) in str(e.value) and "rope_freqs.weight" in str(e.value)


def _gguf_from_hf(hf, path: pathlib.Path, rope_freqs: np.ndarray | None) -> pathlib.Path:
    """An HF Llama written as llama.cpp's converter writes it: GGUF names, q/k rows permuted, F32 tensors."""
    c = hf.config
    layer_stems = {hf_name: stem for stem, hf_name in gguf_ckpt._LAYER_NAMES.items()}
    tensors = {}
    for name, p in hf.state_dict().items():
        w = p.detach().numpy().astype(np.float32)
        if name.startswith("model.layers."):
            i, module = name.removeprefix("model.layers.").removesuffix(".weight").split(".", 1)
            if module == "self_attn.q_proj":
                w = _permute(w, c.num_attention_heads)
            elif module == "self_attn.k_proj":
                w = _permute(w, c.num_key_value_heads)
            tensors[f"blk.{i}.{layer_stems[module]}.weight"] = w
        else:
            stem = {v: k for k, v in gguf_ckpt._GLOBAL_NAMES.items()}[name.removesuffix(".weight")]
            tensors[f"{stem}.weight"] = w
    if rope_freqs is not None:
        tensors["rope_freqs.weight"] = rope_freqs
    return _write(path, tensors, meta=[lambda w: w.add_rope_freq_base(c.rope_parameters["rope_theta"])],
                  layers=c.num_hidden_layers, context=c.max_position_embeddings, hidden=c.hidden_size,
                  ffn=c.intermediate_size, heads=c.num_attention_heads, kv_heads=c.num_key_value_heads,
                  eps=c.rms_norm_eps)


@pytest.mark.parametrize("head_dim", [16, 64], ids=["one_blended_frequency", "three_blended_frequencies"])
def test_llama3_rope_gguf_logits_match_transformers(tmp_path, head_dim):
    """A Llama-3-scaled HF model written as llama.cpp writes it (rope_freqs.weight, no rope metadata) loads
    with logits equal to transformers' on the HF model over 96 positions; without its rope_freqs the same
    weights give other logits (the scaling matters here)."""
    tiny = pytest.importorskip("tiny")
    import sami_jax

    hf = tiny.hf_model("llama3_rope", hidden_size=4 * head_dim)
    rope = hf.config.rope_parameters
    factors = _llamacpp_rope_factors(rope["rope_theta"], head_dim, rope["factor"], rope["low_freq_factor"],
                                     rope["high_freq_factor"], rope["original_max_position_embeddings"])
    assert np.sum((factors > 1) & (factors < rope["factor"])) == (1 if head_dim == 16 else 3)
    tokens = tiny.tokens(2, 96)
    ref = tiny.hf_logits(hf, tokens)
    model = sami_jax.load_model(_gguf_from_hf(hf, tmp_path / "llama3.gguf", factors))
    assert model.config.rope_scaling is not None
    np.testing.assert_allclose(np.asarray(model.logits(tokens)), ref, atol=1e-4)
    unscaled = sami_jax.load_model(_gguf_from_hf(hf, tmp_path / "unscaled.gguf", None))
    assert np.max(np.abs(np.asarray(unscaled.logits(tokens)) - ref)) > 1e-2


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"GGML" + bytes(60))
    with pytest.raises(CheckpointError) as e:
        GGUFSource(path)
    assert str(path) in str(e.value)


def test_missing_gguf_package(monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)  # makes `import gguf` fail
    with pytest.raises(ImportError, match="pip install gguf"):
        GGUFSource(tmp_path / "any.gguf")
