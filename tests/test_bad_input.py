"""Bad checkpoints give errors that name the file and tensor, expected and found; nothing is
unpickled and no remote code runs."""

import json
import pathlib
import pickle

import pytest
import tiny

import sami_jax
from sami_jax import CheckpointError, ConfigError
from sami_jax.checkpoints.safetensors import SafetensorsFile, write_safetensors


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return pathlib.Path(tiny.save(tiny.hf_model("llama_kv2"), tmp_path_factory.mktemp("good")))


def _copy_with(src, dst, change):
    """Copies an HF folder, rewriting model.safetensors through change(dict of name -> array)."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    st = SafetensorsFile(src / "model.safetensors")
    tensors = {n: st.read(n) for n in st.tensors}
    change(tensors)
    write_safetensors(dst / "model.safetensors",
                      [(n, a.shape, a.dtype, lambda a=a: a) for n, a in tensors.items()])
    return dst


def test_folder_without_config(tmp_path, good):
    (tmp_path / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=f"{tmp_path}.*no config.json"):
        sami_jax.load_model(tmp_path)


def test_unsupported_architecture(tmp_path, good):
    d = _copy_with(good, tmp_path / "gpt2", lambda t: None)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConfigError, match=r"config.json.*GPT2LMHeadModel.*supported"):
        sami_jax.load_model(d)


def test_missing_tensor(tmp_path, good):
    d = _copy_with(good, tmp_path / "m", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model.safetensors: missing tensor "
                                              r"'model.layers.1.mlp.up_proj.weight' \(expected shape \[96, 64\]\)"):
        sami_jax.load_model(d)


def test_missing_tensor_in_indexed_shard(tmp_path, good):
    d = _copy_with(good, tmp_path / "ix", lambda t: t.pop("model.norm.weight"))
    st = SafetensorsFile(d / "model.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {**{n: "model.safetensors" for n in st.tensors}, "model.norm.weight": "model.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"model.safetensors: missing tensor 'model.norm.weight'"):
        sami_jax.load_model(d)


def test_wrong_shape(tmp_path, good):
    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:16]

    d = _copy_with(good, tmp_path / "s", shrink)
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.layers.0.self_attn.k_proj.weight' "
                                              r"has shape \[16, 64\], expected \[32, 64\]"):
        sami_jax.load_model(d)


def test_unexpected_tensor(tmp_path, good):
    d = _copy_with(good, tmp_path / "x", lambda t: t.update(
        {"model.layers.0.self_attn.q_proj.bias": t["model.norm.weight"]}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model.layers.0.self_attn.q_proj.bias'"):
        sami_jax.load_model(d)


def test_truncated_file(tmp_path, good):
    d = _copy_with(good, tmp_path / "t", lambda t: None)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor .* past the end of the file"):
        sami_jax.load_model(d)


class _Boom:
    """Unpickling this would create a file: proof of whether anything was unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("fname", ["pytorch_model.bin", "model.pt"])
def test_pickles_are_never_loaded(tmp_path, good, fname):
    marker = tmp_path / "unpickled"
    d = tmp_path / "pkl"
    d.mkdir()
    (d / "config.json").write_text((good / "config.json").read_text())
    (d / fname).write_bytes(pickle.dumps(_Boom(str(marker))))
    with pytest.raises(CheckpointError, match=f"{fname}.*never loaded"):
        sami_jax.load_model(d)
    with pytest.raises(CheckpointError, match="never loaded"):
        sami_jax.load_model(d / fname)
    assert not marker.exists()


def test_remote_code_config_is_refused(tmp_path, good):
    d = _copy_with(good, tmp_path / "rc", lambda t: None)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(architectures=["EvilForCausalLM"], auto_map={"AutoModelForCausalLM": "evil.EvilForCausalLM"})
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(ConfigError, match="EvilForCausalLM"):
        sami_jax.load_model(d)
