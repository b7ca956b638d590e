"""The safetensors file format, read one tensor at a time and written as a stream.

Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets},
"__metadata__": {...}}, then the raw little-endian tensor bytes. Our own reader rather than the
`safetensors` package so bfloat16 loads through ml_dtypes without torch, and so every error names
the file and the tensor. Nothing here can execute code from a file.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable

import ml_dtypes
import numpy as np

from sami_jax.checkpoints import CheckpointError

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """Header of one .safetensors file; `read(name)` loads exactly one tensor."""

    def __init__(self, path):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{self.path}: not a safetensors file (only {len(raw)} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(_MAX_HEADER, size - 8):
                raise CheckpointError(f"{self.path}: not a safetensors file (header length {n} invalid)")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from e
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self.tensors: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            dtype = DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
            shape = tuple(int(s) for s in info["shape"])
            start, end = (int(o) for o in info["data_offsets"])
            if end - start != math.prod(shape) * dtype.itemsize or self._data_start + end > size:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} data [{start}, {end}) does not fit shape {list(shape)} "
                    f"{info['dtype']} or lies past the end of the file ({size} bytes)")
            self.tensors[name] = (dtype, shape, start, end)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self.tensors[name][0]

    def read(self, name: str) -> np.ndarray:
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: no tensor {name!r}")
        dtype, shape, start, end = self.tensors[name]
        out = np.empty(shape, dtype)
        with open(self.path, "rb") as f:
            f.seek(self._data_start + start)
            if f.readinto(out.reshape(-1).view(np.uint8)) != end - start:
                raise CheckpointError(f"{self.path}: tensor {name!r} is truncated")
        return out


def write_safetensors(path, entries: Iterable[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]],
                      metadata: dict[str, str] | None = None) -> int:
    """Writes (name, shape, dtype, produce) entries, calling each `produce()` only when its bytes
    are due, so one tensor at a time is on the host. Returns the bytes of tensor data written."""
    entries = list(entries)
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, shape, dtype, _ in entries:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned, as the reference writer does
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype, produce in entries:
            arr = np.ascontiguousarray(produce())
            if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
                raise ValueError(f"{path}: tensor {name!r} produced {arr.shape} {arr.dtype}, "
                                 f"declared {tuple(shape)} {np.dtype(dtype)}")
            f.write(arr.reshape(-1).view(np.uint8).data)
    os.replace(tmp, path)  # a crash mid-write never leaves a half file under the real name
    return offset
