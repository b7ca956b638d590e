"""The public entry points: `load_model`, `save_model` and the `Model` they pass around."""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any

import jax
import jax.numpy as jnp

from sami_jax.checkpoints import CheckpointError
from sami_jax.checkpoints.hf import PICKLE_SUFFIXES, HFSource, load_params, save_hf
from sami_jax.checkpoints.orbax import is_orbax_model_dir, load_orbax, save_orbax
from sami_jax.models.config import ModelConfig
from sami_jax.models.transformer import forward
from sami_jax.sharding import Sharder, param_shardings
from sami_jax.tokenizer import TOKENIZER_FILES, load_tokenizer


@functools.partial(jax.jit, static_argnames=("config", "sharder"))
def _logits(params, tokens_bt, mask_bt, config, sharder):
    return forward(params, tokens_bt, config, mask_bt=mask_bt, sharder=sharder)


@dataclasses.dataclass
class Model:
    """A loaded model: its config, params tree (see models/params.py), tokenizer and mesh rules."""

    config: ModelConfig
    params: Any
    tokenizer: Any = None  # sami_jax.tokenizer.Tokenizer, or None when the checkpoint has none
    sharder: Sharder | None = None

    def logits(self, token_ids, mask=None) -> jax.Array:
        """int [batch, seq] token ids (and optional 0/1 padding mask) -> float32 [batch, seq, vocab]."""
        tokens = jnp.asarray(token_ids, jnp.int32)
        if tokens.ndim != 2:
            raise ValueError(f"token_ids must be [batch, seq], got shape {tokens.shape}")
        mask = jnp.ones(tokens.shape, bool) if mask is None else jnp.asarray(mask, bool)
        return _logits(self.params, tokens, mask, self.config, self.sharder)


def load_model(path, dtype=None, mesh: jax.sharding.Mesh | None = None, rules=None) -> Model:
    """Loads an HF folder (config.json + safetensors), a .gguf file or an orbax model folder.

    dtype: params dtype (e.g. jnp.bfloat16); None keeps the checkpoint's (float32 for GGUF).
    mesh: parameters are created directly with their shardings on this mesh (rules: logical axis ->
    mesh axes, default sharding.DEFAULT_RULES); None loads onto the default device.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: pickle weights are never loaded (they can run code); use safetensors, "
                              "GGUF or orbax")
    sharder = Sharder.create(mesh, rules) if mesh is not None else None

    def shardings(config):
        return param_shardings(config, sharder) if sharder is not None else None

    if path.is_file() and path.suffix == ".gguf":
        from sami_jax.checkpoints.gguf import GGUFSource

        source = GGUFSource(path)
        hf_config = source.hf_config()
        config = ModelConfig.from_hf(hf_config, source=str(path))
        params = load_params(source, config, dtype, shardings(config))
        # (a file without tokenizer metadata loads without a tokenizer, as an HF folder without tokenizer files)
        tokenizer = load_tokenizer(path, config=hf_config) if source.metadata("tokenizer.ggml.model") else None
        return Model(config, params, tokenizer, sharder)
    if path.is_file():
        raise CheckpointError(f"{path}: not a model; expected an HF folder, a .gguf file or an orbax model folder")

    tokenizer = load_tokenizer(path) if any((path / f).is_file() for f in TOKENIZER_FILES) else None
    if is_orbax_model_dir(path):
        config = ModelConfig.from_file(path / "config.json")
        return Model(config, load_orbax(path, config, dtype, shardings(config)), tokenizer, sharder)
    source = HFSource(path)
    config = ModelConfig.from_hf(source.hf_config(), source=str(path / "config.json"))
    return Model(config, load_params(source, config, dtype, shardings(config)), tokenizer, sharder)


def save_model(model: Model, directory, format: str = "hf", dtype=None) -> list[str]:
    """Writes `model` to `directory` as an HF folder (format="hf": safetensors shards, index,
    config.json, tokenizer files; loads in transformers) or an orbax model folder ("orbax").
    Returns the names written."""
    if format == "hf":
        return save_hf(model.params, model.config, directory, dtype=dtype, tokenizer=model.tokenizer)
    if format == "orbax":
        params = model.params if dtype is None else jax.tree.map(lambda x: x.astype(dtype), model.params)
        return save_orbax(params, model.config, directory, tokenizer=model.tokenizer)
    raise ValueError(f"unknown format {format!r}; choose 'hf' or 'orbax'")

