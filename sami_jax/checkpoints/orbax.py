"""A model folder in orbax format: config.json, tokenizer files, and params/ (an orbax checkpoint).

Restore reads each array straight into its target sharding on the current mesh, so a folder
saved on one mesh loads on any other.
"""

from __future__ import annotations

import json
import pathlib

import jax

from sami_jax.checkpoints import CheckpointError
from sami_jax.models.config import ModelConfig
from sami_jax.models.params import abstract_params

PARAMS_DIR = "params"


def is_orbax_model_dir(path) -> bool:
    path = pathlib.Path(path)
    return path.is_dir() and (path / PARAMS_DIR).is_dir() and (path / "config.json").is_file()


def save_orbax(params, config: ModelConfig, directory, tokenizer=None) -> list[str]:
    """Writes config.json, the tokenizer files and params/ (orbax, synchronous). Returns what it wrote."""
    import orbax.checkpoint as ocp

    directory = pathlib.Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / PARAMS_DIR).exists():
        raise CheckpointError(f"{directory / PARAMS_DIR}: already exists; refusing to overwrite a checkpoint")
    hf = config.to_hf()
    hf["dtype"] = str(jax.tree.leaves(params)[0].dtype)
    (directory / "config.json").write_text(json.dumps(hf, indent=2))
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(directory / PARAMS_DIR, params)
    ckptr.wait_until_finished()
    written = ["config.json", PARAMS_DIR]
    if tokenizer is not None:
        written += tokenizer.save(directory)
    return written


def load_orbax(directory, config: ModelConfig, dtype=None, shardings=None):
    """Params restored from directory/params onto `shardings` (default: the default device),
    cast to `dtype` when given."""
    import orbax.checkpoint as ocp

    directory = pathlib.Path(directory).absolute()
    stored = jax.numpy.dtype(json.loads((directory / "config.json").read_text()).get("dtype", "float32"))
    if shardings is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: one, abstract_params(config))
    target = abstract_params(config, stored, shardings)
    try:
        params = ocp.StandardCheckpointer().restore(directory / PARAMS_DIR, target)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CheckpointError(f"{directory / PARAMS_DIR}: cannot restore params for this config.json ({e})") from e
    if dtype is not None and jax.numpy.dtype(dtype) != stored:
        params = jax.tree.map(lambda x: x.astype(dtype), params)
    return params
