"""llama.cpp GGUF files as a source of HF-named tensors, without torch.

`GGUFSource` answers the same questions as the HF safetensors reader (config dict, tensor names, shapes,
arrays in HF layout), so the common loader can import a GGUF file exactly like an HF folder. It undoes what
llama.cpp's converter changes: tensor names, the row order of q/k projections (permuted for llama.cpp's
RoPE), and Llama-3 RoPE scaling stored as per-frequency divisors (`rope_freqs.weight`). Tensors are
dequantized one at a time with `gguf.quants`, never the whole file at once.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import mmap
import os
import pathlib
import re
import struct
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
# Llama-3.1/3.2 files: llama.cpp's per-frequency RoPE divisors in place of HF's rope_scaling parameters
_ROPE_FREQS = "rope_freqs.weight"


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


# GGUF value type -> struct code (7 is bool, 8 string, 9 array)
_GGUF_MAGIC = b"GGUF"
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file: shape in numpy order (GGUF's dims reversed), GGML type id, and
    the absolute byte offset of its data."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int


def is_gguf(path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == _GGUF_MAGIC
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e})") from e


def read_gguf_metadata(path) -> dict[str, Any]:
    """The key/value header of a GGUF file (v2/v3, either byte order) as Python values (arrays as
    lists, strings as str); tensor data is never touched."""
    return read_gguf_header(path, with_tensors=False)[0]


def read_gguf_header(path, with_tensors: bool = True) -> tuple[dict[str, Any], list[TensorInfo], str]:
    """(metadata, tensor infos, byte order "<" or ">") of a GGUF file. Our own parser: it needs no
    `gguf` package and reads a 50k-token vocabulary in a fraction of a second."""
    path = pathlib.Path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse_header(buf, path, with_tensors)
    except (OSError, ValueError, struct.error, UnicodeDecodeError, IndexError) as e:
        if isinstance(e, ValueError) and str(path) in str(e):
            raise
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from e


def _parse_header(buf, path: pathlib.Path, with_tensors: bool):
    if buf[:4] != _GGUF_MAGIC:
        raise ValueError(f"{path}: not a GGUF file (bad magic {bytes(buf[:4])!r})")
    # The version is small, so whichever byte order reads it as 2 or 3 is the file's.
    order = "<" if struct.unpack_from("<I", buf, 4)[0] in (2, 3) else ">"
    version = struct.unpack_from(order + "I", buf, 4)[0]
    if version not in (2, 3):
        raise ValueError(f"{path}: unsupported GGUF version {version} (2 and 3 are supported)")
    n_tensors, n_kv = struct.unpack_from(order + "QQ", buf, 8)
    pos = 24

    def read_string(pos):
        (n,) = struct.unpack_from(order + "Q", buf, pos)
        end = pos + 8 + n
        if end > len(buf):
            raise ValueError(f"{path}: truncated GGUF header")
        return bytes(buf[pos + 8:end]).decode("utf-8"), end

    def read_value(vtype, pos):
        if vtype == _STRING:
            return read_string(pos)
        if vtype in _SCALARS:
            code = order + _SCALARS[vtype]
            return struct.unpack_from(code, buf, pos)[0], pos + struct.calcsize(code)
        if vtype == _ARRAY:
            etype, count = struct.unpack_from(order + "IQ", buf, pos)
            pos += 12
            if etype in _SCALARS and etype != 7:
                dtype = np.dtype(_SCALARS[etype]).newbyteorder(order)
                end = pos + count * dtype.itemsize
                if end > len(buf):
                    raise ValueError(f"{path}: truncated GGUF header")
                return np.frombuffer(buf, dtype, count, pos).tolist(), end
            items = []
            for _ in range(count):
                item, pos = read_value(etype, pos)
                items.append(item)
            return items, pos
        raise ValueError(f"{path}: unknown GGUF value type {vtype}")

    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key, pos = read_string(pos)
        (vtype,) = struct.unpack_from(order + "I", buf, pos)
        meta[key], pos = read_value(vtype, pos + 4)
    if not with_tensors:
        return meta, [], order
    raw = []
    for _ in range(n_tensors):
        name, pos = read_string(pos)
        (n_dims,) = struct.unpack_from(order + "I", buf, pos)
        dims = struct.unpack_from(order + "Q" * n_dims, buf, pos + 4)
        ggml_type, offset = struct.unpack_from(order + "IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        raw.append((name, tuple(int(d) for d in reversed(dims)), ggml_type, offset))
    align = int(meta.get("general.alignment", 32))
    data_start = pos + (-pos % align)
    return meta, [TensorInfo(n, s, t, data_start + o) for n, s, t, o in raw], order


def _as_decimal(x: float) -> float:
    """float32 metadata (eps 1e-5 is stored as 9.99999974e-06) as the shortest decimal that rounds to it,
    which is what the original config.json said."""
    return float(str(np.float32(x)))


def _unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf's `permute`): per head, llama.cpp interleaves
    the two rotary halves (rows 0, d/2, 1, d/2+1, ...); HF keeps them as two contiguous halves."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_scaling_from_factors(factors: np.ndarray, theta: float, head_dim: int, original: int = 8192,
                                where: str = "rope factors") -> dict | None:
    """HF's llama3 `rope_scaling` whose frequencies equal llama.cpp's: inv_freq / factors.

    llama.cpp's converter stores Llama-3.1/3.2 RoPE scaling as divisors of the base inverse frequencies
    ([head_dim / 2], `rope_freqs.weight`): 1 for short wavelengths, `factor` for long ones, 1 / ((1 - s) /
    factor + s) between, with s linear in 1 / wavelength. Here s = (x - u) / (v - u) for x = 1 / wavelength,
    u = low_freq_factor / original and v = high_freq_factor / original, so `original` only sets the scale
    (the file's original context length, else Llama-3's 8192). u and v come from a line through the
    blended frequencies, or, with fewer than two of them, from the gaps between the bands (some other pair
    then gives the same frequencies). The result is checked: its frequencies must equal the file's within
    1e-5, or the file is refused. None where every factor is 1."""
    f = np.asarray(factors, np.float64).reshape(-1)
    if f.size != head_dim // 2 or not np.all(np.isfinite(f)) or np.any(f <= 0):
        raise CheckpointError(f"{where}: expected {head_dim // 2} positive finite RoPE frequency factors "
                              f"(head_dim {head_dim}), got {f.size} values in [{f.min():.6g}, {f.max():.6g}]")
    if np.all(np.abs(f - 1) <= 1e-6):
        return None
    from sami_jax.models.attention import inv_freq
    from sami_jax.models.config import RopeScaling

    factor, base = f.max(), inv_freq(head_dim, theta)
    x = base.astype(np.float64) / (2 * np.pi)
    high, low = np.abs(f - 1) <= 1e-5, np.abs(f - factor) <= 1e-5 * factor
    mid = ~(high | low)
    lo = x[low].max() if low.any() else 0.0  # long wavelengths (small x) are divided by factor
    hi = x[high].min() if high.any() else 2 * x.max()
    if mid.sum() >= 2:
        s = (1 / f[mid] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(x[mid], s, 1)
        u = -intercept / slope
        v = u + 1 / slope
    elif mid.any():  # one blended frequency x1: any line through it whose band edges keep the others apart
        x1 = x[mid][0]
        s1 = (1 / f[mid][0] - 1 / factor) / (1 - 1 / factor)
        u = (lo + x1) / 2
        for _ in range(64):
            v = u + (x1 - u) / s1
            if v < hi:
                break
            u = (u + x1) / 2
    else:
        u, v = lo + (hi - lo) / 3, lo + 2 * (hi - lo) / 3
    want, err = base / f.astype(np.float32), np.inf
    for digits in (6, 17):  # round numbers where they reproduce the frequencies as well
        scaling = RopeScaling(factor=float(f"{factor:.{digits}g}"), low_freq_factor=float(f"{u * original:.{digits}g}"),
                              high_freq_factor=float(f"{v * original:.{digits}g}"),
                              original_max_position_embeddings=int(original))
        if not 0 < scaling.low_freq_factor < scaling.high_freq_factor:
            break
        err = min(err, float(np.max(np.abs(inv_freq(head_dim, theta, scaling) / want - 1))))
        if err <= 1e-5:
            return {"rope_type": "llama3", **dataclasses.asdict(scaling)}
    raise CheckpointError(f"{where}: these RoPE frequency factors are no Llama-3 scaling that HF's rope_scaling can "
                          "express" + (f" (the closest differs by {err:.3g})" if np.isfinite(err) else ""))


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
            self._meta, infos, order = read_gguf_header(self.path)
        except ValueError as e:  # bad magic/version, truncated header
            raise CheckpointError(str(e)) from e
        if order != "<":
            # gguf.quants decodes host-order blocks only; big-endian GGUF files are practically nonexistent
            raise CheckpointError(f"{self.path}: byte-swapped (big-endian) GGUF files are not supported")
        arch = self.metadata("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(
                f"{self.path}: GGUF architecture {arch!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        self._arch = arch
        self._tensors = {t.name: t for t in infos}
        self._types = {}
        for t in infos:
            try:
                self._types[t.name] = gguf.GGMLQuantizationType(t.ggml_type)
            except ValueError:
                raise CheckpointError(
                    f"{self.path}: tensor {t.name!r} has unknown GGML type id {t.ggml_type}") from None
        self._file = np.memmap(self.path, np.uint8, mode="r")  # tensors are read lazily, one at a time
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
        return self._meta.get(key, default)

    def _arch_meta(self, key: str, default: Any = ...) -> Any:
        """`{arch}.key`, floats as their shortest float32 decimal; missing without a default is an error."""
        full = f"{self._arch}.{key}"
        if full not in self._meta:
            if default is ...:
                raise CheckpointError(f"{self.path}: GGUF metadata {full!r} is missing")
            return default
        value = self._meta[full]
        # llama.cpp writes these floats as float32 (eps 1e-5 is stored as 9.99999974e-06).
        return _as_decimal(value) if isinstance(value, float) else value

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
            "vocab_size": int(self._tensors["token_embd.weight"].shape[0]),
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
        if _ROPE_FREQS in self._tensors:
            if "rope_scaling" in cfg:
                raise CheckpointError(f"{self.path}: both {_ROPE_FREQS} and rope.scaling.type {rope_type!r}; "
                                      "which one scales RoPE is ambiguous")
            t = self._tensors[_ROPE_FREQS]
            scaling = llama3_scaling_from_factors(
                self._read(_Entry(t), tuple(t.shape)), cfg["rope_theta"], cfg["head_dim"],
                int(self._arch_meta("rope.scaling.original_context_length", 8192)), f"{self.path}: {_ROPE_FREQS}")
            if scaling is not None:
                cfg["rope_scaling"] = scaling
        return cfg

    # ---- tensors --------------------------------------------------------------------------------------

    def _map_names(self) -> dict[str, _Entry]:
        entries: dict[str, _Entry] = {}
        unknown = []
        for t in self._tensors.values():
            stem = t.name.removesuffix(".weight")
            if stem in _GLOBAL_NAMES and t.name.endswith(".weight"):
                entries[f"{_GLOBAL_NAMES[stem]}.weight"] = _Entry(t)
            elif m := _STACKED_EXPERTS_RE.fullmatch(t.name):
                n_experts = t.shape[0]  # [E, out, in]
                for e in range(n_experts):
                    hf = f"model.layers.{m[1]}.block_sparse_moe.experts.{e}.{_EXPERT_NAMES[m[2]]}.weight"
                    entries[hf] = _Entry(t, expert=e)
            elif m := _SPLIT_EXPERT_RE.fullmatch(t.name):
                hf = f"model.layers.{m[1]}.block_sparse_moe.experts.{m[3]}.{_EXPERT_NAMES[m[2]]}.weight"
                entries[hf] = _Entry(t)
            elif (m := _LAYER_RE.fullmatch(t.name)) and m[2] in _LAYER_NAMES:
                entries[f"model.layers.{m[1]}.{_LAYER_NAMES[m[2]]}.weight"] = _Entry(t)
            elif t.name != _ROPE_FREQS:  # (read into the config's rope_scaling)
                # e.g. biases: dropping them would silently change the model, so refuse the file instead.
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
        for t in self._tensors.values():
            if self._types[t.name] not in supported:
                hf = hf_names.get(t.name, [t.name])
                hf_desc = hf[0] if len(hf) == 1 else f"{hf[0]} .. {hf[-1]}"
                ok = ", ".join(sorted(q.name for q in supported))
                raise CheckpointError(
                    f"{self.path}: tensor {t.name!r} (HF {hf_desc}) has GGML type {self._types[t.name].name}, "
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
        return entry.tensor.shape if entry.expert is None else entry.tensor.shape[1:]

    def read(self, name: str) -> np.ndarray:
        """One tensor in HF layout: float32 for quantized types, else the stored float16/bfloat16/float32."""
        return self._read(self._entry(name), self.shape(name))

    def _read(self, entry: _Entry, shape: tuple[int, ...]) -> np.ndarray:
        gguf = _gguf()
        t, qtype = entry.tensor, self._types[entry.tensor.name]
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        row_bytes = t.shape[-1] // block * type_size
        nbytes = math.prod(t.shape[:-1]) * row_bytes
        if t.offset + nbytes > self._file.size:
            raise CheckpointError(f"{self.path}: tensor {t.name!r} lies past the end of the file (truncated?)")
        rows = self._file[t.offset:t.offset + nbytes].reshape(*t.shape[:-1], row_bytes)
        if entry.expert is not None:
            rows = rows[entry.expert]  # slice before dequantizing
        T = gguf.GGMLQuantizationType
        plain = {T.F32: np.float32, T.F16: np.float16}
        if qtype in plain:
            w = np.array(rows).view(plain[qtype])  # copy: never hand out views of the read-only map
        elif qtype == T.BF16:
            import ml_dtypes

            w = np.array(rows).view(ml_dtypes.bfloat16)
        else:
            w = gguf.quants.dequantize(rows, qtype)
        w = w.reshape(shape)
        if entry.unpermute_heads is not None:
            w = _unpermute_rows(w, entry.unpermute_heads)
        return w
