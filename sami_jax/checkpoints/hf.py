"""HF folders (config.json + safetensors) in and out, and the HF-name table shared with GGUF import.

Import reads one tensor at a time from any *source* (an HF folder here, a GGUF file in gguf.py):
an object with `path`, `hf_config() -> dict`, `names()`, `shape(name)` and `read(name) -> ndarray`
in HF layout. Each stacked parameter is allocated once with its target sharding and filled layer by
layer with a donated in-place update, so the host holds about one tensor beyond the result.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from sami_jax.checkpoints import CheckpointError
from sami_jax.checkpoints.safetensors import SafetensorsFile, write_safetensors
from sami_jax.models.config import ModelConfig
from sami_jax.models.params import is_spec, param_specs

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
INDEX_FILE = "model.safetensors.index.json"
# Tensors some checkpoints carry that the model recomputes or shares; skipped on import.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One HF tensor and where it lives in our params: ours = hf.T.reshape(shape) when transposed."""

    hf_name: str
    path: tuple[str, ...]  # keys into the params tree
    index: tuple[int, ...]  # leading stacked indices (layer, or layer and expert)
    shape: tuple[int, ...]  # our shape of this slice
    n_in: int  # how many leading dims of `shape` are the matmul input (HF's last dim)
    transpose: bool

    @property
    def hf_shape(self) -> tuple[int, ...]:
        if not self.transpose:
            return self.shape
        return math.prod(self.shape[self.n_in:]), math.prod(self.shape[:self.n_in])

    def to_ours(self, hf: np.ndarray) -> np.ndarray:
        return hf.T.reshape(self.shape) if self.transpose else hf

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        if not self.transpose:
            return ours
        return ours.reshape(math.prod(self.shape[:self.n_in]), -1).T


def at_path(tree, path: tuple[str, ...]):
    """The subtree (or leaf) of nested dicts `tree` at the keys `path`, e.g. a TensorEntry's path."""
    return functools.reduce(lambda t, k: t[k], path, tree)


def tensor_table(config: ModelConfig) -> list[TensorEntry]:
    """All HF tensors of `config`, in HF's on-disk order (Mixtral experts by their on-disk names)."""
    specs = param_specs(config)

    def entry(hf_name, path, index=(), n_in=1, transpose=True):
        spec = at_path(specs, path)
        return TensorEntry(hf_name, path, index, spec.shape[len(index):], n_in, transpose)

    out = [entry("model.embed_tokens.weight", ("embed_tokens",), transpose=False)]
    for i in range(config.num_layers):
        pre = f"model.layers.{i}."
        lay = ("layers",)
        out.append(entry(pre + "input_layernorm.weight", (*lay, "input_layernorm"), (i,), transpose=False))
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out.append(entry(f"{pre}self_attn.{name}.weight", (*lay, "self_attn", name), (i,),
                             n_in=2 if name == "o_proj" else 1))
        out.append(entry(pre + "post_attention_layernorm.weight", (*lay, "post_attention_layernorm"), (i,),
                         transpose=False))
        if config.is_moe:
            moe = (*lay, "block_sparse_moe")
            out.append(entry(pre + "block_sparse_moe.gate.weight", (*moe, "gate"), (i,)))
            for e in range(config.num_experts):
                for w in ("w1", "w2", "w3"):
                    out.append(entry(f"{pre}block_sparse_moe.experts.{e}.{w}.weight", (*moe, w), (i, e)))
        else:
            for name in ("gate_proj", "up_proj", "down_proj"):
                out.append(entry(f"{pre}mlp.{name}.weight", (*lay, "mlp", name), (i,)))
    out.append(entry("model.norm.weight", ("norm",), transpose=False))
    if not config.tie_word_embeddings:
        out.append(entry("lm_head.weight", ("lm_head",)))
    return out


# ---------------------------------------------------------------------------------------- source
class HFSource:
    """An HF model folder: config.json plus one or many *.safetensors (with or without the index)."""

    def __init__(self, path):
        self.path = str(path)
        folder = pathlib.Path(path)
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: not a model folder")
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{folder}: no config.json (an HF model folder needs config.json + *.safetensors)")
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        index = folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from e
            for name, fname in weight_map.items():
                self._where[name] = str(folder / fname)
            files = sorted(set(self._where.values()))
        else:
            files = sorted(str(p) for p in folder.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
            found = f"found only pickle files {pickles}, which are never loaded (they can run code); " * bool(pickles)
            raise CheckpointError(f"{folder}: no *.safetensors weights; {found}convert them to safetensors first")
        for fname in files:
            if not os.path.isfile(fname):
                raise CheckpointError(f"{index}: names shard {pathlib.Path(fname).name}, which is not in {folder}")
            st = self._files[fname] = SafetensorsFile(fname)
            for name in st.tensors:
                self._where.setdefault(name, fname)

    def hf_config(self) -> dict:
        cfg = pathlib.Path(self.path) / "config.json"
        try:
            return json.loads(cfg.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg}: not valid JSON ({e})") from e

    def names(self) -> list[str]:
        return [n for n, f in self._where.items() if n in self._files[f].tensors]

    def file_of(self, name: str) -> str:
        """The file that holds (or, by the index, should hold) `name`; else the files searched."""
        if name in self._where:
            return self._where[name]
        files = sorted(self._files)
        return files[0] if len(files) == 1 else f"{self.path} (searched {[os.path.basename(f) for f in files]})"

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self._file(name).dtype(name)

    def read(self, name: str) -> np.ndarray:
        return self._file(name).read(name)

    def _file(self, name: str) -> SafetensorsFile:
        f = self._files.get(self._where.get(name, ""))
        if f is None or name not in f.tensors:
            raise CheckpointError(f"{self.file_of(name)}: missing tensor {name!r}")
        return f


# ---------------------------------------------------------------------------------------- import
def check_source(source, config: ModelConfig) -> list[TensorEntry]:
    """Every tensor present with the right shape, and no tensor we would silently drop."""
    table = tensor_table(config)
    names = set(source.names())
    file_of = getattr(source, "file_of", lambda _: source.path)
    for e in table:
        if e.hf_name not in names:
            raise CheckpointError(f"{file_of(e.hf_name)}: missing tensor {e.hf_name!r} "
                                  f"(expected shape {list(e.hf_shape)})")
        found = tuple(source.shape(e.hf_name))
        if found != e.hf_shape:
            raise CheckpointError(f"{file_of(e.hf_name)}: tensor {e.hf_name!r} has shape {list(found)}, "
                                  f"expected {list(e.hf_shape)} for this config.json")
    expected = {e.hf_name for e in table}
    ignorable = {"lm_head.weight"} if config.tie_word_embeddings else set()
    extra = sorted(n for n in names - expected - ignorable if not n.endswith(_IGNORED_SUFFIXES))
    if extra:
        raise CheckpointError(f"{file_of(extra[0])}: unexpected tensor {extra[0]!r} ({len(extra)} unexpected in all) "
                              f"for a {config.architecture}; the config does not describe these weights")
    return table


@functools.partial(jax.jit, donate_argnums=0)
def _write_slice(stacked, value, index):
    # In place (donated): stacked[index...] = value.
    starts = tuple(index) + (0,) * value.ndim
    return jax.lax.dynamic_update_slice(stacked, value.reshape((1,) * len(index) + value.shape), starts)


def load_params(source, config: ModelConfig, dtype=None, shardings=None):
    """Params tree from a tensor source, each leaf created directly with its target sharding.

    dtype: the params' dtype; None keeps the checkpoint's floating dtype (float32 if mixed or quantized).
    shardings: NamedSharding tree (sharding.param_shardings); None puts everything on the default device.
    """
    table = check_source(source, config)
    if dtype is None:
        dtypes = {np.dtype(source.dtype(e.hf_name)) for e in table} if hasattr(source, "dtype") else set()
        dtype = dtypes.pop() if len(dtypes) == 1 else np.float32
    dtype = jnp.dtype(dtype)
    specs = param_specs(config)
    by_path: dict[tuple[str, ...], list[TensorEntry]] = {}
    for e in table:
        by_path.setdefault(e.path, []).append(e)

    def build(path, spec):
        sharding = at_path(shardings, path) if shardings is not None else None
        entries = by_path[path]
        if not entries[0].index:  # a whole tensor: embeddings, final norm, lm_head
            host = entries[0].to_ours(source.read(entries[0].hf_name)).astype(dtype)
            return jax.device_put(host, sharding) if sharding is not None else jnp.asarray(host)
        out = jax.jit(lambda: jnp.zeros(spec.shape, dtype), out_shardings=sharding)()
        for e in entries:
            value = e.to_ours(source.read(e.hf_name)).astype(dtype)
            out = _write_slice(out, value, np.asarray(e.index, np.int32))
        return out

    leaves_with_paths = jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)[0]
    built = {tuple(k.key for k in kp): build(tuple(k.key for k in kp), spec) for kp, spec in leaves_with_paths}
    return jax.tree_util.tree_map_with_path(lambda kp, _: built[tuple(k.key for k in kp)], specs, is_leaf=is_spec)


# ---------------------------------------------------------------------------------------- export
def save_hf(params, config: ModelConfig, directory, dtype=None, max_shard_bytes: int = 2 * 1024**3,
            tokenizer=None) -> list[str]:
    """Writes an HF folder: sharded safetensors (+ index when more than one), config.json,
    generation_config.json and the tokenizer files. One tensor at a time reaches the host.
    Returns the files written."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    table = tensor_table(config)
    leaf_dtype = jnp.dtype(jax.tree.leaves(params)[0].dtype)
    dtype = np.dtype(dtype or leaf_dtype)

    def produce(e: TensorEntry):
        leaf = at_path(params, e.path)
        # Index on device first so only this slice is copied to the host.
        return lambda: e.to_hf(np.asarray(jax.device_get(leaf[e.index] if e.index else leaf))).astype(dtype)

    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for e in table:
        nbytes = math.prod(e.hf_shape) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1
             else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    for fname, shard in zip(names, shards, strict=True):
        total += write_safetensors(directory / fname,
                                   [(e.hf_name, e.hf_shape, dtype, produce(e)) for e in shard])
        weight_map.update({e.hf_name: fname for e in shard})
    written = list(names)
    if len(shards) > 1:
        (directory / INDEX_FILE).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        written.append(INDEX_FILE)
    hf = config.to_hf()
    hf["dtype"] = hf["torch_dtype"] = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}[dtype.name]
    (directory / "config.json").write_text(json.dumps(hf, indent=2))
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": hf["eos_token_id"], "pad_token_id": config.pad_token_id}
    (directory / "generation_config.json").write_text(json.dumps(gen, indent=2))
    written += ["config.json", "generation_config.json"]
    if tokenizer is not None:
        written += tokenizer.save(directory)
    return written
