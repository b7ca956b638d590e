"""FLOP counts and chip peaks for tokens/s and MFU figures (training metrics, benchmarks, AOT plans).

Convention (PaLM, appendix B): a training step costs 6 FLOPs per matmul parameter per token (forward 2,
backward 4) plus the attention scores and values, 12 * layers * heads * head_dim * seq_len per token,
counted without the causal halving. Embedding lookups are not matmuls and are left out; a tied vocab
projection is counted once, as a matmul. For mixture-of-experts only the routed experts count.
"""

from __future__ import annotations

from sami_jax.models.config import ModelConfig

# Dense bf16 peak FLOP/s per chip, as published by the vendors (no sparsity).
PEAK_BF16_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
}


def matmul_params_per_token(config: ModelConfig) -> int:
    """Weights one token is multiplied with: attention projections, the (routed) MLP and the vocab head."""
    d, h, k, dh = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    attn = 2 * d * h * dh + 2 * d * k * dh
    mlp = 3 * d * config.intermediate_size
    if config.is_moe:
        mlp = mlp * config.num_experts_per_tok + d * config.num_experts  # experts used + router
    return config.num_layers * (attn + mlp) + config.vocab_size * d


def forward_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    attention = 4.0 * config.num_layers * config.num_heads * config.head_dim * seq_len  # scores and values
    return 2.0 * matmul_params_per_token(config) + attention


def train_flops(config: ModelConfig, tokens: int, seq_len: int, logit_tokens: int | None = None) -> float:
    """FLOPs of a forward and backward pass over `tokens` tokens in sequences of seq_len, of which only
    `logit_tokens` (default: all) need the vocabulary projection: SAMI scores the response tokens only,
    so the prompt's projection is not useful work and is not counted (for us or for a reference)."""
    logit_tokens = tokens if logit_tokens is None else logit_tokens
    head = 2.0 * config.vocab_size * config.hidden_size
    return 3.0 * (forward_flops_per_token(config, seq_len) * tokens - head * (tokens - logit_tokens))


def peak_flops(device) -> float | None:
    """bf16 peak of a jax device by its device_kind (longest matching name), None when unknown (CPUs)."""
    kind = getattr(device, "device_kind", "")
    hits = [name for name in PEAK_BF16_FLOPS if name.lower() in kind.lower()]
    return PEAK_BF16_FLOPS[max(hits, key=len)] if hits else None
