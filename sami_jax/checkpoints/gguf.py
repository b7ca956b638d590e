"""llama.cpp GGUF files as a source of HF-named tensors, without torch.

`GGUFSource` answers the same questions as the HF safetensors reader (config dict, tensor names, shapes,
arrays in HF layout), so the common loader can import a GGUF file exactly like an HF folder. It undoes the
two things llama.cpp's converter changes: tensor names, and the row order of q/k projections (permuted for
llama.cpp's RoPE). Tensors are dequantized one at a time with `gguf.quants`, never the whole file at once.
"""

from __future__ import annotations

import copy
import functools
import os
import re
from typing import Any

import numpy as np

from sami_jax.checkpoints import CheckpointError

SUPPORTED_ARCHITECTURES = ("llama",)  # llama.cpp also writes Mistral and Mixtral files as "llama"

# GGUF per-layer tensor stem -> HF module path under model.layers.N
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate_inp": "block_sparse_moe.gate",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# Mixtral's expert linears: w1 = gate, w3 = up, w2 = down (HF on-disk names)
_EXPERT_NAMES = {"ffn_gate": "w1", "ffn_up": "w3", "ffn_down": "w2"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
_STACKED_EXPERTS_RE = re.compile(r"blk\.(\d+)\.(ffn_gate|ffn_up|ffn_down)_exps\.weight")
# pre-2024 Mixtral files store one tensor per expert instead of a stacked one
_SPLIT_EXPERT_RE = re.compile(r"blk\.(\d+)\.(ffn_gate|ffn_up|ffn_down)\.(\d+)\.weight")


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError(
            "reading GGUF files needs the `gguf` package: `pip install gguf` (or sami_jax's `gguf` extra)"
        ) from e
    return gguf


@functools.cache
def _supported_types() -> frozenset:
    """F32/F16/BF16 plus every type the installed `gguf.quants` can dequantize (probed on one zero block)."""
    gguf = _gguf()
    T = gguf.GGMLQuantizationType
    supported = {T.F32, T.F16, T.BF16}
    for qtype, (_, type_size) in gguf.GGML_QUANT_SIZES.items():
        if qtype in supported:
            continue
        try:
            gguf.quants.dequantize(np.zeros((1, type_size), np.uint8), qtype)
        except Exception:  # NotImplementedError for I8..I64/F64/Q8_1/...; anything else is not trustworthy
            continue
        supported.add(qtype)
    return frozenset(supported)


def __getattr__(name: str) -> Any:
    # SUPPORTED_TYPES holds gguf enum members, so it is built on first access: importing this module
    # must not require `gguf`.
    if name == "SUPPORTED_TYPES":
        return _supported_types()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _reader_class():
    """gguf.GGUFReader parsing a plain-ndarray view of its memmap.

    Header parsing slices the map once per string (~300k times for a 50k-token vocabulary), and np.memmap's
    python-level __getitem__/__array_finalize__ make that ~3x slower (SmolLM2: 6.3 s -> 2.3 s). The view
    shares the mapping, so tensors are still read lazily from the file.
    """
    gguf = _gguf()

    class _Reader(gguf.GGUFReader):
        @property
        def data(self):
            return self._plain_data

        @data.setter
        def data(self, value):
            self._plain_data = value.view(np.ndarray)

    return _Reader


def _as_decimal(x: float) -> float:
    """float32 metadata (eps 1e-5 is stored as 9.99999974e-06) as the shortest decimal that rounds to it,
    which is what the original config.json said."""
    return float(str(np.float32(x)))


def _unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf's `permute`): per head, llama.cpp interleaves
    the two rotary halves (rows 0, d/2, 1, d/2+1, ...); HF keeps them as two contiguous halves."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class _Entry:
    """Where one HF tensor lives: a GGUF tensor, optionally one expert of a stacked expert tensor."""

    __slots__ = ("expert", "tensor", "unpermute_heads")

    def __init__(self, tensor, expert: int | None = None):
        self.tensor = tensor
        self.expert = expert
        self.unpermute_heads: int | None = None


class GGUFSource:
    """A GGUF file seen as HF-named tensors in HF layout ([out, in] for linear weights)."""

    def __init__(self, path: str | os.PathLike[str]):
        gguf = _gguf()
        self.path = str(path)
        try:
            try:
                self._reader = _reader_class()(self.path)
            except AttributeError:  # a gguf release that no longer keeps its map in `.data`
                self._reader = gguf.GGUFReader(self.path)
        except (ValueError, KeyError) as e:  # bad magic/version, unknown tensor type, duplicate names
            raise CheckpointError(f"{self.path}: not a readable GGUF file: {e}") from e
        if self._reader.byte_order != "I":
            # gguf.quants decodes host-order blocks only; big-endian GGUF files are practically nonexistent
            raise CheckpointError(f"{self.path}: byte-swapped (big-endian) GGUF files are not supported")
        arch = self.metadata("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(
                f"{self.path}: GGUF architecture {arch!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        self._arch = arch
        self._tensors = {t.name: t for t in self._reader.tensors}
        self._entries = self._map_names()
        self._validate_types()
        self._config = self._build_config()
        for name, entry in self._entries.items():
            if name.endswith("self_attn.q_proj.weight"):
                entry.unpermute_heads = self._config["num_attention_heads"]
            elif name.endswith("self_attn.k_proj.weight"):
                entry.unpermute_heads = self._config["num_key_value_heads"]

    # ---- metadata -------------------------------------------------------------------------------------

    def metadata(self, key: str, default: Any = None) -> Any:
        """A metadata value as python (str, int, float, bool or list of those); `default` if absent."""
        field = self._reader.get_field(key)
        return default if field is None else field.contents()

    def _arch_meta(self, key: str, default: Any = ...) -> Any:
        """`{arch}.key`, float32 values as their shortest decimal; missing without a default is an error."""
        full = f"{self._arch}.{key}"
        field = self._reader.get_field(full)
        if field is None:
            if default is ...:
                raise CheckpointError(f"{self.path}: GGUF metadata {full!r} is missing")
            return default
        value = field.contents()
        if field.types == [_gguf().GGUFValueType.FLOAT32]:
            value = _as_decimal(value)
        return value

    def hf_config(self) -> dict:
        """An HF config.json dict (LlamaForCausalLM, or MixtralForCausalLM when the file has experts)."""
        return copy.deepcopy(self._config)

    def _build_config(self) -> dict:
        hidden = int(self._arch_meta("embedding_length"))
        heads = int(self._arch_meta("attention.head_count"))
        experts = int(self._arch_meta("expert_count", 0))
        cfg: dict[str, Any] = {
            "architectures": ["MixtralForCausalLM" if experts else "LlamaForCausalLM"],
            "model_type": "mixtral" if experts else "llama",
            "hidden_size": hidden,
            "intermediate_size": int(self._arch_meta("feed_forward_length")),
            "num_hidden_layers": int(self._arch_meta("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self._arch_meta("attention.head_count_kv", heads)),
            "head_dim": int(self._arch_meta("attention.key_length", hidden // heads)),
            "hidden_act": "silu",
            "rms_norm_eps": float(self._arch_meta("attention.layer_norm_rms_epsilon")),
            "rope_theta": float(self._arch_meta("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(self._arch_meta("context_length")),
            # GGUF shape is reversed: ne[1] of token_embd is the number of rows
            "vocab_size": int(self._tensors["token_embd.weight"].shape[-1]),
            "tie_word_embeddings": "output.weight" not in self._tensors,
        }
        for hf_key, gguf_key in (
            ("bos_token_id", "bos_token_id"),
            ("eos_token_id", "eos_token_id"),
            ("pad_token_id", "padding_token_id"),
        ):
            value = self.metadata(f"tokenizer.ggml.{gguf_key}")
            if value is not None:
                cfg[hf_key] = int(value)
        window = self._arch_meta("attention.sliding_window", None)
        if window is not None:
            cfg["sliding_window"] = int(window)
        if experts:
            cfg["num_local_experts"] = experts
            cfg["num_experts_per_tok"] = int(self._arch_meta("expert_used_count"))
        rope_type = self._arch_meta("rope.scaling.type", None)
        if rope_type not in (None, "none"):
            factor = float(self._arch_meta("rope.scaling.factor"))
            scaling: dict[str, Any] = {"rope_type": rope_type, "factor": factor}
            original = self._arch_meta("rope.scaling.original_context_length", None)
            if original is not None:
                scaling["original_max_position_embeddings"] = int(original)
            attn_factor = self._arch_meta("rope.scaling.attn_factor", None)
            if attn_factor is not None:
                scaling["attention_factor"] = float(attn_factor)
            cfg["rope_scaling"] = scaling
        return cfg

    # ---- tensors --------------------------------------------------------------------------------------

    def _map_names(self) -> dict[str, _Entry]:
        entries: dict[str, _Entry] = {}
        unknown = []
        for t in self._reader.tensors:
            stem = t.name.removesuffix(".weight")
            if stem in _GLOBAL_NAMES and t.name.endswith(".weight"):
                entries[f"{_GLOBAL_NAMES[stem]}.weight"] = _Entry(t)
            elif m := _STACKED_EXPERTS_RE.fullmatch(t.name):
                n_experts = int(t.shape[-1])  # numpy layout [E, out, in]
                for e in range(n_experts):
                    hf = f"model.layers.{m[1]}.block_sparse_moe.experts.{e}.{_EXPERT_NAMES[m[2]]}.weight"
                    entries[hf] = _Entry(t, expert=e)
            elif m := _SPLIT_EXPERT_RE.fullmatch(t.name):
                hf = f"model.layers.{m[1]}.block_sparse_moe.experts.{m[3]}.{_EXPERT_NAMES[m[2]]}.weight"
                entries[hf] = _Entry(t)
            elif (m := _LAYER_RE.fullmatch(t.name)) and m[2] in _LAYER_NAMES:
                entries[f"model.layers.{m[1]}.{_LAYER_NAMES[m[2]]}.weight"] = _Entry(t)
            else:
                # e.g. biases, or rope_freqs (Llama-3.1 RoPE scaling): dropping them would silently change
                # the model, so refuse the file instead.
                unknown.append(t.name)
        if unknown:
            raise CheckpointError(
                f"{self.path}: GGUF tensors with no HF {self._arch} equivalent: {', '.join(unknown[:10])}"
                + (f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else "")
            )
        if "token_embd.weight" not in self._tensors:
            raise CheckpointError(f"{self.path}: GGUF file has no token_embd.weight")
        return entries

    def _validate_types(self) -> None:
        supported = _supported_types()
        hf_names: dict[str, list[str]] = {}
        for hf, entry in self._entries.items():
            hf_names.setdefault(entry.tensor.name, []).append(hf)
        for t in self._reader.tensors:
            if t.tensor_type not in supported:
                hf = hf_names[t.name]
                hf_desc = hf[0] if len(hf) == 1 else f"{hf[0]} .. {hf[-1]}"
                ok = ", ".join(sorted(q.name for q in supported))
                raise CheckpointError(
                    f"{self.path}: tensor {t.name!r} (HF {hf_desc}) has GGML type {t.tensor_type.name}, "
                    f"which cannot be dequantized; supported types: {ok}"
                )

    def names(self) -> list[str]:
        """HF tensor names in file order (lm_head.weight only when the file has its own output matrix)."""
        return list(self._entries)

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor {name!r} in this GGUF file") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """HF-layout shape of `name`, from the header only."""
        entry = self._entry(name)
        shape = tuple(int(d) for d in reversed(entry.tensor.shape.tolist()))
        return shape if entry.expert is None else shape[1:]

    def read(self, name: str) -> np.ndarray:
        """One tensor in HF layout: float32 for quantized types, else the stored float16/bfloat16/float32."""
        entry = self._entry(name)
        t = entry.tensor
        data = t.data if entry.expert is None else t.data[entry.expert]  # slice before dequantizing
        T = _gguf().GGMLQuantizationType
        if t.tensor_type == T.F32:
            w = np.array(data, dtype=np.float32)  # copy: never hand out views of the read-only memmap
        elif t.tensor_type == T.F16:
            w = np.array(data, dtype=np.float16)
        elif t.tensor_type == T.BF16:
            import ml_dtypes

            # the reader exposes BF16 as raw bytes: copy them out and reinterpret (no widening to float32)
            w = np.array(data, dtype=np.uint8).view(ml_dtypes.bfloat16)
        else:
            w = _gguf().quants.dequantize(data, t.tensor_type)
        w = w.reshape(self.shape(name))
        if entry.unpermute_heads is not None:
            w = _unpermute_rows(w, entry.unpermute_heads)
        return w
