"""Read (and, for tests and benchmarks, write) the authors' JAX params stream without JAX: msgpack + numpy only.

The released LAPA-7B `params` file is what tux's `StreamingCheckpointer` writes: a plain concatenation of msgpack
objects, each a 2-array

    [key_path (array of str), value (bin)]

with no header and no index. `value` is `flax.serialization.to_bytes(array)`, itself a msgpack document:

    ExtType(code=1, data=msgpack([shape (array of int), dtype name (str), raw C-order bytes (bin)]))

Every float tensor is stored as "bfloat16" (the checkpointer's default float dtype); numpy has no bfloat16, so the
raw bytes are read as uint16 and either widened exactly to float32 (bf16 is the upper half of a float32) or handed
to torch as a `torch.bfloat16` tensor without any rounding.

A 7B stream is 13.6 GB and its largest tensor (the 32 stacked `w1` kernels) 2.9 GB, so this reader never loads a
value through `msgpack.unpackb` (which would hold the bytes three or four times). `scan_stream` decodes only the
small headers of each entry, with msgpack, and seeks over the tensor bytes, giving an index of `StreamTensor`s
(key, shape, dtype, byte offset). Each one reads its data, or one slice along axis 0 (one layer of a stacked
kernel), straight from the file into a fresh array: memory holds what the caller asked for and nothing else.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import msgpack
import numpy as np

# flax.serialization's msgpack extension codes: 1 = ndarray, 2 = native complex, 3 = numpy scalar.
_FLAX_EXT_NDARRAY = 1
_BF16 = "bfloat16"

# msgpack markers of the container types whose length prefix we read by hand (the spec's bin and ext families).
_BIN_LENGTH_BYTES = {0xC4: 1, 0xC5: 2, 0xC6: 4}
_EXT_LENGTH_BYTES = {0xC7: 1, 0xC8: 2, 0xC9: 4}
_FIXEXT_LENGTH = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}
_UINT = {1: ">B", 2: ">H", 4: ">I"}


class StreamFormatError(ValueError):
    """The file is not a tux/flax streaming msgpack params stream (or uses an encoding we do not read)."""


def storage_dtype(dtype_name: str) -> np.dtype:
    """numpy dtype holding the raw bytes of a stream dtype (bfloat16 -> uint16, others as named)."""
    if dtype_name == _BF16:
        return np.dtype("<u2")
    try:
        return np.dtype(dtype_name).newbyteorder("<")
    except TypeError as error:
        raise StreamFormatError(f"unknown dtype {dtype_name!r} in the params stream") from error


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen raw bfloat16 bits (uint16) to float32, exactly (bf16 is the high half of an IEEE float32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


@dataclass(frozen=True)
class StreamTensor:
    """One entry of a params stream, located but not read.

    Attributes:
        path: the stream file.
        key: the flax key path, e.g. ("transformer", "h", "scan_decoder", "attention", "wq", "kernel").
        shape: the array shape.
        dtype: the dtype name stored in the file ("bfloat16", "float32", ...).
        offset: byte offset of the raw C-order data in the file.
        nbytes: size of the raw data.
    """

    path: str
    key: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    offset: int
    nbytes: int

    @property
    def name(self) -> str:
        return "/".join(self.key)

    def read_raw(self, index: int | None = None) -> np.ndarray:
        """The raw stored values (uint16 bits for bfloat16), the whole tensor or its `index`-th slice along axis 0
        (one layer of a stacked kernel), read from the file into a new array."""
        dtype = storage_dtype(self.dtype)
        shape, offset = self.shape, self.offset
        if index is not None:
            if not shape or not 0 <= index < shape[0]:
                raise IndexError(f"{self.name}: slice {index} out of range for shape {shape}")
            shape = shape[1:]
            offset += index * int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        count = int(np.prod(shape, dtype=np.int64))
        with open(self.path, "rb") as f:
            data = np.fromfile(f, dtype=dtype, count=count, offset=offset)
        if data.size != count:
            raise StreamFormatError(f"{self.name}: the file ends inside the tensor data (truncated download?)")
        return data.reshape(shape)

    def numpy(self, index: int | None = None) -> np.ndarray:
        """The values as numpy; bfloat16 is widened exactly to float32."""
        raw = self.read_raw(index)
        return bf16_bits_to_float32(raw) if self.dtype == _BF16 else raw

    def torch(self, index: int | None = None):
        """The values as a torch tensor in the stored precision (bfloat16 stays bfloat16, bit for bit)."""
        import torch

        raw = self.read_raw(index)
        if self.dtype == _BF16:
            return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(raw)


def _read_length(head: bytes, at: int, width: int) -> int:
    if at + width > len(head):
        raise msgpack.OutOfData
    return struct.unpack_from(_UINT[width], head, at)[0]


def _parse_entry_header(head: bytes):
    """Parse the header of one stream entry from the bytes `head` (which start at the entry).

    Returns (key, shape, dtype, data_start, data_nbytes, entry_end) with positions relative to the entry start, or
    (key, value, None, None, None, entry_end) for a value that is not an ndarray (decoded in full; such values are
    small). Raises msgpack.OutOfData when `head` is too short to hold the header."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(head)
    if unpacker.read_array_header() != 2:
        raise StreamFormatError("a stream entry is not a [key_path, value] pair")
    key = unpacker.unpack()
    if not (isinstance(key, (list, tuple)) and all(isinstance(part, str) for part in key)):
        raise StreamFormatError(f"a stream key is not a list of strings: {key!r}")
    key = tuple(key)
    # value: a msgpack bin holding flax's to_bytes document.
    at = unpacker.tell()
    if at >= len(head):
        raise msgpack.OutOfData
    marker = head[at]
    if marker not in _BIN_LENGTH_BYTES:
        raise StreamFormatError(f"{'/'.join(key)}: the value is not msgpack bin (marker 0x{marker:02x})")
    width = _BIN_LENGTH_BYTES[marker]
    value_length = _read_length(head, at + 1, width)
    value_start = at + 1 + width
    entry_end = value_start + value_length
    if value_start >= len(head):
        raise msgpack.OutOfData
    marker = head[value_start]
    if marker in _EXT_LENGTH_BYTES:
        width = _EXT_LENGTH_BYTES[marker]
        ext_length = _read_length(head, value_start + 1, width)
        code_at = value_start + 1 + width
    elif marker in _FIXEXT_LENGTH:
        ext_length, code_at = _FIXEXT_LENGTH[marker], value_start + 1
    else:
        # Not an extension: a plain msgpack value (a python scalar, a list...). Small: decode it whole.
        if entry_end > len(head):
            raise msgpack.OutOfData
        return key, msgpack.unpackb(head[value_start:entry_end], raw=False), None, None, None, entry_end
    if code_at >= len(head):
        raise msgpack.OutOfData
    code = struct.unpack_from(">b", head, code_at)[0]
    ext_start = code_at + 1
    if ext_start + ext_length != entry_end:
        raise StreamFormatError(f"{'/'.join(key)}: extension length does not match the value length")
    if code != _FLAX_EXT_NDARRAY:
        raise StreamFormatError(
            f"{'/'.join(key)}: msgpack extension code {code}; only flax's ndarray encoding (code 1) is supported"
        )
    inner = msgpack.Unpacker(raw=False)
    inner.feed(head[ext_start:])
    if inner.read_array_header() != 3:
        raise StreamFormatError(f"{'/'.join(key)}: the ndarray encoding is not [shape, dtype, bytes]")
    shape = inner.unpack()
    dtype = inner.unpack()
    if not (isinstance(shape, (list, tuple)) and all(isinstance(n, int) and n >= 0 for n in shape)):
        raise StreamFormatError(f"{'/'.join(key)}: bad shape {shape!r}")
    if not isinstance(dtype, str):
        raise StreamFormatError(f"{'/'.join(key)}: bad dtype {dtype!r}")
    at = ext_start + inner.tell()
    if at >= len(head):
        raise msgpack.OutOfData
    marker = head[at]
    if marker not in _BIN_LENGTH_BYTES:
        raise StreamFormatError(f"{'/'.join(key)}: the array bytes are not msgpack bin")
    width = _BIN_LENGTH_BYTES[marker]
    nbytes = _read_length(head, at + 1, width)
    data_start = at + 1 + width
    if data_start + nbytes != entry_end:
        raise StreamFormatError(f"{'/'.join(key)}: the array bytes do not end with the entry")
    expected = int(np.prod(shape, dtype=np.int64)) * storage_dtype(dtype).itemsize
    if nbytes != expected:
        raise StreamFormatError(f"{'/'.join(key)}: {nbytes} data bytes for shape {tuple(shape)} {dtype}")
    return key, tuple(shape), dtype, data_start, nbytes, entry_end


def scan_stream(path: str | os.PathLike) -> Iterator[StreamTensor]:
    """Index a params stream: yield a `StreamTensor` per entry, in file order, reading only the headers.

    Raises `StreamFormatError` for anything that is not an ndarray entry of the flax encoding."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    position = 0
    with open(path, "rb") as f:
        while position < size:
            window = 4096
            while True:
                f.seek(position)
                head = f.read(window)
                try:
                    key, shape, dtype, data_start, nbytes, entry_end = _parse_entry_header(head)
                    break
                except msgpack.OutOfData as error:
                    if len(head) < window:  # the file ends inside the header
                        raise StreamFormatError(f"{path}: truncated entry at byte {position}") from error
                    if window >= 1 << 26:
                        raise StreamFormatError(f"{path}: unreadable entry header at byte {position}") from error
                    window *= 8
            if dtype is None:
                raise StreamFormatError(
                    f"{path}: entry {'/'.join(key)} holds a plain value ({shape!r}), not an array; a params stream "
                    "holds arrays only"
                )
            if position + entry_end > size:
                raise StreamFormatError(f"{path}: {'/'.join(key)} is truncated (file ends at byte {size})")
            yield StreamTensor(path, key, shape, dtype, position + data_start, nbytes)
            position += entry_end


def iter_stream(path: str | os.PathLike) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """Yield (key_path, numpy array) for every entry, one tensor in memory at a time; bfloat16 widened to float32."""
    for tensor in scan_stream(path):
        yield tensor.key, tensor.numpy()


# -- writing (tests, benchmarks): the same bytes as flax.serialization.to_bytes + tux's StreamingCheckpointer ------
def _bin_header(length: int) -> bytes:
    if length < 1 << 8:
        return bytes([0xC4, length])
    if length < 1 << 16:
        return b"\xc5" + struct.pack(">H", length)
    return b"\xc6" + struct.pack(">I", length)


def _ext_header(length: int, code: int) -> bytes:
    # flax's packb never emits fixext for arrays (the document always exceeds 16 bytes); neither do we.
    if length < 1 << 8:
        return bytes([0xC7, length]) + struct.pack(">b", code)
    if length < 1 << 16:
        return b"\xc8" + struct.pack(">H", length) + struct.pack(">b", code)
    return b"\xc9" + struct.pack(">I", length) + struct.pack(">b", code)


def write_stream(path: str | os.PathLike, entries: Iterable[tuple[Iterable[str], object]]) -> None:
    """Write a params stream in the authors' format from (key_path, array) pairs, one at a time.

    An array is a numpy array, a torch tensor (torch.bfloat16 is stored as "bfloat16"), or `(uint16 bits,
    "bfloat16")` for bfloat16 data held in numpy. Large arrays are written in chunks (no extra copy)."""
    with open(path, "wb") as f:
        for key, value in entries:
            dtype_name = None
            if isinstance(value, tuple):
                value, dtype_name = value
            if not isinstance(value, np.ndarray):  # torch
                import torch

                if value.dtype == torch.bfloat16:
                    value, dtype_name = value.contiguous().view(torch.int16).numpy().view(np.uint16), _BF16
                else:
                    value = value.contiguous().numpy()
            value = np.ascontiguousarray(value)
            dtype_name = dtype_name or value.dtype.name
            if dtype_name == _BF16 and value.dtype != np.uint16:
                raise ValueError("bfloat16 data must be given as uint16 bits")
            shape_and_dtype = msgpack.packb([list(value.shape), dtype_name])[1:]  # drop the 2-array marker
            document_head = b"\x93" + shape_and_dtype + _bin_header(value.nbytes)
            document_length = len(document_head) + value.nbytes
            ext_head = _ext_header(document_length, _FLAX_EXT_NDARRAY)
            value_length = len(ext_head) + document_length
            f.write(b"\x92" + msgpack.packb(list(key)) + _bin_header(value_length) + ext_head + document_head)
            flat = value.reshape(-1).view(np.uint8)
            step = 1 << 26
            for start in range(0, value.nbytes, step):
                f.write(memoryview(flat[start:start + step]))


__all__ = [
    "StreamFormatError",
    "StreamTensor",
    "bf16_bits_to_float32",
    "iter_stream",
    "scan_stream",
    "storage_dtype",
    "write_stream",
]
