"""safetensors (de)serialisation and a defensive reader for untrusted files.

A safetensors file is ``<u64 little-endian N><N bytes of JSON header><data>``. The header maps
tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the
data section) plus an optional ``"__metadata__"`` string map. :func:`parse_header` checks every
number in it against the file size *before* anything is allocated from it, so a hostile header
(huge N, offsets past the end, overlapping tensors) costs at most ``MAX_HEADER_BYTES`` to refuse.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from safetensors.numpy import save as _st_save

from fedbucket.protocol.documents import TensorSchema, TensorSpec
from fedbucket.protocol.errors import MalformedPayload

#: Largest header accepted. DistilBERT's is ~15 KB; 16 MiB leaves room for 100k+ tensors.
MAX_HEADER_BYTES = 16 * 1024 * 1024

NUMPY_DTYPES: dict[str, np.dtype] = {
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
    "U32": np.dtype("<u4"),
}
_DTYPE_NAMES = {v: k for k, v in NUMPY_DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie in a file (absolute offsets)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def np_dtype(self) -> np.dtype:
        return NUMPY_DTYPES[self.dtype]


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    data_start: int
    header_bytes: bytes
    metadata: dict[str, str]

    def schema(self) -> TensorSchema:
        return {n: TensorSpec(dtype=t.dtype, shape=list(t.shape)) for n, t in sorted(self.tensors.items())}

    def in_file_order(self) -> list[TensorInfo]:
        return sorted(self.tensors.values(), key=lambda t: t.start)


def dtype_name(array: np.ndarray) -> str:
    try:
        return _DTYPE_NAMES[array.dtype.newbyteorder("<")]
    except KeyError:
        raise MalformedPayload(
            f"dtype {array.dtype} is not allowed; use one of {sorted(NUMPY_DTYPES)} (float16/32/64, int32/64)"
        ) from None


def parse_header(prefix: bytes, file_size: int) -> Header:
    """Parse and check a safetensors header.

    ``prefix`` holds at least the first ``8 + N`` bytes of the file (callers read 8 bytes, call
    :func:`header_length`, then read the rest). Raises :class:`MalformedPayload` on anything odd.
    """
    n = header_length(prefix[:8], file_size)
    if len(prefix) < 8 + n:
        raise MalformedPayload("file ends inside its safetensors header")
    raw = prefix[8 : 8 + n]
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise MalformedPayload("safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise MalformedPayload("safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise MalformedPayload("safetensors __metadata__ must map strings to strings")
    data_start = 8 + n
    data_size = file_size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise MalformedPayload(f"tensor {name!r}: entry must have exactly dtype, shape, data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in NUMPY_DTYPES:
            raise MalformedPayload(f"tensor {name!r}: dtype {dtype!r} not allowed (allowed: {sorted(NUMPY_DTYPES)})")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape
        ):
            raise MalformedPayload(f"tensor {name!r}: shape must be a list of non-negative integers")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_size
        ):
            raise MalformedPayload(
                f"tensor {name!r}: data_offsets {offsets!r} outside the {data_size}-byte data section"
            )
        if offsets[1] - offsets[0] != math.prod(shape) * NUMPY_DTYPES[dtype].itemsize:
            raise MalformedPayload(
                f"tensor {name!r}: {offsets[1] - offsets[0]} bytes do not fit shape {shape} of {dtype}"
            )
        tensors[name] = TensorInfo(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])
    position = data_start
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if info.start != position:
            raise MalformedPayload(
                f"tensor {info.name!r}: overlapping or gapped data (starts at {info.start}, expected {position})"
            )
        position = info.end
    if position != file_size:
        raise MalformedPayload(f"{file_size - position} trailing bytes after the last tensor")
    return Header(tensors, data_start, bytes(prefix[: 8 + n]), dict(metadata))


def header_length(first8: bytes, file_size: int) -> int:
    """The declared header length ``N``, checked against the file size and the limit."""
    if len(first8) < 8 or file_size < 8:
        raise MalformedPayload("file is shorter than the 8-byte safetensors length prefix")
    (n,) = struct.unpack("<Q", first8[:8])
    if n > MAX_HEADER_BYTES or n > file_size - 8:
        raise MalformedPayload(f"declared header length {n} exceeds the file ({file_size} bytes) or the limit")
    if n < 2:
        raise MalformedPayload("safetensors header is empty")
    return n


def read_header(fp: BinaryIO, file_size: int) -> Header:
    """Read and check the header from a reader positioned at the start of the file."""
    first8 = fp.read(8)
    n = header_length(first8, file_size)
    rest = fp.read(n)
    return parse_header(first8 + rest, file_size)


def read_header_file(path: str | os.PathLike[str]) -> Header:
    with open(path, "rb") as f:
        return read_header(f, os.fstat(f.fileno()).st_size)


#: The order safetensors lays tensors out in: by dtype, widest alignment first (the reverse of its
#: ``Dtype`` enum), then by name. Followed so that a payload encoded by :func:`plan_safetensors` is
#: byte for byte what :func:`tensors_to_bytes` makes of the same arrays (tests/test_protocol.py).
_SAFETENSORS_DTYPE_RANK = {"I64": 0, "F64": 1, "F32": 2, "U32": 3, "I32": 4, "F16": 5}


def plan_safetensors(specs: Mapping[str, tuple[str, tuple[int, ...]]]) -> Header:
    """The header and byte layout of a safetensors file of these tensors (``name -> (dtype,
    shape)``), before any data exists, so that a payload can be written piece by piece.

    Invariant: the result equals ``read_header`` of ``tensors_to_bytes(arrays)`` for arrays of these
    dtypes and shapes (same header bytes, same offsets); the file is ``header.data_start +
    sum(sizes)`` bytes long. No metadata (update payloads carry none).
    """
    order = sorted(specs, key=lambda name: (_SAFETENSORS_DTYPE_RANK[specs[name][0]], name.encode()))
    entries: dict[str, dict[str, object]] = {}
    position = 0
    for name in order:
        dtype, shape = specs[name]
        size = math.prod(shape) * NUMPY_DTYPES[dtype].itemsize
        entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [position, position + size]}
        position += size
    # safetensors writes compact JSON (raw UTF-8) padded with spaces to a multiple of 8 bytes.
    raw = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    prefix = struct.pack("<Q", len(raw)) + raw
    return parse_header(prefix, len(prefix) + position)


def tensors_to_bytes(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialise numpy arrays to safetensors bytes (deterministic: same arrays, same bytes)."""
    arrays = {}
    for name, value in tensors.items():
        array = np.asarray(value, order="C")  # not ascontiguousarray: that turns scalars into shape (1,)
        dtype_name(array)
        arrays[name] = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return _st_save(arrays, metadata=dict(metadata) if metadata else None)


def save_tensors(
    tensors: Mapping[str, np.ndarray], path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
) -> None:
    with open(path, "wb") as f:
        f.write(tensors_to_bytes(tensors, metadata))


def load_tensors(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Load a safetensors file as numpy arrays, checking its header first."""
    header = read_header_file(path)
    out: dict[str, np.ndarray] = {}
    with open(path, "rb") as f:
        for info in header.in_file_order():
            f.seek(info.start)
            out[info.name] = np.frombuffer(f.read(info.end - info.start), dtype=info.np_dtype).reshape(info.shape)
    return dict(sorted(out.items()))


def tensors_from_bytes(data: bytes) -> dict[str, np.ndarray]:
    """Arrays from in-memory safetensors bytes, checking the header first."""
    header = parse_header(data[: 8 + header_length(data[:8], len(data))], len(data))
    view = memoryview(data)
    return {
        name: np.frombuffer(view[info.start : info.end], dtype=info.np_dtype).reshape(info.shape)
        for name, info in sorted(header.tensors.items())
    }


def schema_of(tensors: Mapping[str, np.ndarray]) -> TensorSchema:
    """The tensor schema (dtype, shape per name) of a state dict of numpy arrays."""
    return {n: TensorSpec(dtype=dtype_name(np.asarray(a)), shape=list(np.shape(a))) for n, a in sorted(tensors.items())}
