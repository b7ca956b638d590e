"""ModelConfig from and to HF config.json, checked against transformers' own config classes,
and the presets against the published parameter counts."""

import json

import pytest
import transformers

from sami_jax.models.config import PRESETS, ConfigError, ModelConfig
from sami_jax.models.params import num_params

PUBLISHED = {
    "mistral-7b": 7_241_732_096,
    "mixtral-8x7b": 46_702_792_704,
    "llama3-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496,
    "smollm2-135m": 134_515_008,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_counts(name):
    assert num_params(PRESETS[name]) == PUBLISHED[name]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_count_like_transformers(name):
    """transformers builds each preset from our config.json on the meta device and counts the same."""
    import torch

    hf_config = transformers.AutoConfig.for_model(**PRESETS[name].to_hf())
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[name]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_hf_roundtrip_through_transformers(name, tmp_path):
    cfg = PRESETS[name]
    transformers.AutoConfig.for_model(**cfg.to_hf()).save_pretrained(tmp_path)
    again = ModelConfig.from_file(tmp_path / "config.json")
    assert again == cfg
    assert ModelConfig.from_hf(again.to_hf()) == cfg


def test_old_style_rope_scaling_and_extra_fields():
    hf = PRESETS["llama3-8b"].to_hf()
    del hf["rope_parameters"]
    hf["rope_scaling"] = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192}
    hf["initializer_range"] = 0.02
    cfg = ModelConfig.from_hf(hf)
    assert cfg == PRESETS["llama3-8b"]
    assert cfg.to_hf()["initializer_range"] == 0.02  # unmodelled keys survive a round trip


@pytest.mark.parametrize(("change", "message"), [
    ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "yarn"),
    ({"num_key_value_heads": 3}, r"num_heads=32 is not a multiple of num_kv_heads=3"),
])
def test_bad_configs_name_the_file_and_field(tmp_path, change, message):
    hf = {**PRESETS["mistral-7b"].to_hf(), **change}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ConfigError, match=f"{tmp_path / 'config.json'}: .*{message}"):
        ModelConfig.from_file(tmp_path / "config.json")


def test_missing_field(tmp_path):
    hf = PRESETS["mistral-7b"].to_hf()
    del hf["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ConfigError, match=r"config.json: missing field 'hidden_size'"):
        ModelConfig.from_file(tmp_path / "config.json")
