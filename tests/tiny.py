"""Tiny random HF (PyTorch) reference models, saved with transformers' own save_pretrained."""

from __future__ import annotations

import numpy as np
import torch
import transformers

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=512, initializer_range=0.1, rms_norm_eps=1e-5)

# name -> (config class, overrides). Sequences in the tests are 24 tokens: twice Mistral's window of 12.
CASES = {
    "llama_kv1": (transformers.LlamaConfig, dict(num_key_value_heads=1)),
    "llama_kv2": (transformers.LlamaConfig, dict(num_key_value_heads=2)),
    "llama_kv4": (transformers.LlamaConfig, dict(num_key_value_heads=4)),
    "llama3_rope": (transformers.LlamaConfig, dict(
        num_key_value_heads=2, bos_token_id=0, eos_token_id=[1, 2],
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=64))),
    "llama_tied": (transformers.LlamaConfig, dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "mistral_window": (transformers.MistralConfig, dict(num_key_value_heads=2, sliding_window=12)),
    "mixtral_4x2": (transformers.MixtralConfig, dict(num_key_value_heads=2, num_local_experts=4,
                                                     num_experts_per_tok=2)),
}


def hf_model(name: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A random float32 model of case `name`; norm weights are perturbed so they matter."""
    cls, extra = CASES[name]
    config = cls(**{**BASE, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.add_(0.2 * torch.randn_like(p))
    return model


def save(model, directory, **kwargs) -> str:
    model.save_pretrained(str(directory), **kwargs)
    return str(directory)


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def tokens(batch: int, length: int, vocab: int = 256, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, (batch, length), dtype=np.int64)
