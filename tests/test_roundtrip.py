"""HF -> ours -> HF: tensors bit-identical (read back with the `safetensors` package) and
transformers' logits on the exported folder equal the original's; plus orbax and sharded files."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import tiny
import torch
import transformers

import sami_jax
from sami_jax.checkpoints.hf import save_hf


def _tensors(folder) -> dict:
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            out.update(safetensors.torch.load_file(os.path.join(folder, f)))
    return out


@pytest.mark.parametrize(("name", "dtype"), [("llama_kv2", torch.float32), ("llama_tied", torch.bfloat16),
                                             ("mixtral_4x2", torch.float32), ("mistral_window", torch.bfloat16)])
def test_hf_roundtrip_is_bit_identical(tmp_path, name, dtype):
    hf = tiny.hf_model(name).to(dtype)
    src = tiny.save(hf, tmp_path / "src")
    model = sami_jax.load_model(src)
    assert str(next(iter(model.params.values())).dtype) == str(dtype).removeprefix("torch.")
    sami_jax.save_model(model, tmp_path / "dst")
    a, b = _tensors(src), _tensors(tmp_path / "dst")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k

    # Both folders loaded the same way (a model cast in memory keeps a bf16 RoPE buffer, a loaded one not).
    orig, back = (transformers.AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype).eval()
                  for p in (src, tmp_path / "dst"))
    toks = torch.as_tensor(tiny.tokens(2, 24))
    with torch.no_grad():
        assert torch.equal(orig(toks).logits, back(toks).logits)


def test_sharded_export_with_and_without_index(tmp_path):
    hf = tiny.hf_model("mixtral_4x2")
    model = sami_jax.load_model(tiny.save(hf, tmp_path / "src"))
    written = save_hf(model.params, model.config, tmp_path / "dst", max_shard_bytes=200_000)
    shards = [f for f in written if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in written
    index = json.loads((tmp_path / "dst" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    toks = tiny.tokens(2, 24)
    expected = tiny.hf_logits(hf, toks)
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "dst")).eval()
    np.testing.assert_array_equal(tiny.hf_logits(back, toks), expected)
    # Our import reads the sharded folder through the index, and without it by scanning the shards.
    np.testing.assert_allclose(sami_jax.load_model(tmp_path / "dst").logits(toks), expected, atol=1e-4)
    os.remove(tmp_path / "dst" / "model.safetensors.index.json")
    np.testing.assert_allclose(sami_jax.load_model(tmp_path / "dst").logits(toks), expected, atol=1e-4)


def test_orbax_roundtrip_and_dtype_cast(tmp_path):
    hf = tiny.hf_model("llama_kv2")
    model = sami_jax.load_model(tiny.save(hf, tmp_path / "src"))
    sami_jax.save_model(model, tmp_path / "orbax", format="orbax")
    again = sami_jax.load_model(tmp_path / "orbax")
    assert again.config == model.config
    for a, b in zip(jax_leaves(model.params), jax_leaves(again.params), strict=True):
        np.testing.assert_array_equal(a, b)
    half = sami_jax.load_model(tmp_path / "orbax", dtype=jnp.bfloat16)
    assert {x.dtype for x in jax_leaves(half.params)} == {jnp.dtype(jnp.bfloat16)}
    with pytest.raises(sami_jax.CheckpointError, match="already exists"):
        sami_jax.save_model(model, tmp_path / "orbax", format="orbax")


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_convert_cli_hf_to_orbax_and_back(tmp_path):
    from sami_jax.convert import main

    hf = tiny.hf_model("mistral_window")
    src = tiny.save(hf, tmp_path / "src")
    assert main([f"--src={src}", f"--dst={tmp_path / 'orbax'}", "--format=orbax"]) == 0
    assert main([f"--src={tmp_path / 'orbax'}", f"--dst={tmp_path / 'hf'}", "--format=hf", "--dtype=bfloat16"]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert back.dtype == torch.bfloat16
    for name, a in _tensors(src).items():
        assert torch.equal(a.to(torch.bfloat16), _tensors(tmp_path / "hf")[name]), name
    with pytest.raises(SystemExit):  # refuses to write over a model
        main([f"--src={src}", f"--dst={tmp_path / 'hf'}", "--format=hf"])
