"""The safetensors file format at byte level: read a header, write one, copy byte ranges file to file.

We parse headers ourselves for the data offsets rather than read through ``safe_open``: its memory map
keeps every page it touched resident until the file is closed, so reading a shard through it grows the
process's RSS to the shard's size.  Copies go through ``os.sendfile``, so tensor bytes never pass
through Python.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ReapError

MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
COPY_CHUNK = 64 << 20  # bytes per sendfile call: keeps the progress bar moving on multi-GB tensors


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of a safetensors file: dtype, shape and absolute byte span in the file."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    def slabs(self, count: int) -> list[tuple[int, int]]:
        """The byte spans of the ``count`` equal slabs along dim 0 (one per expert)."""
        step = self.nbytes // count
        return [(self.begin + i * step, self.begin + (i + 1) * step) for i in range(count)]


@dataclass(frozen=True)
class ShardHeader:
    metadata: dict[str, str] | None
    tensors: dict[str, SourceTensor]  # in file order


def read_header(path: Path) -> ShardHeader:
    """Parse a safetensors header (8-byte little-endian length, JSON) into absolute byte spans."""
    with open(path, "rb") as handle:
        raw_len = handle.read(8)
        if len(raw_len) != 8:
            raise ReapError(f"{path} is not a safetensors file (too short); re-download the shard")
        (length,) = struct.unpack("<Q", raw_len)
        if length > MAX_HEADER:
            raise ReapError(f"{path} is not a safetensors file (header length {length}); re-download the shard")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ReapError(f"{path} has a corrupt safetensors header; re-download the shard") from None
    base = 8 + length
    metadata = header.pop("__metadata__", None) if isinstance(header, dict) else None
    try:
        tensors = {}
        for key, spec in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = spec["data_offsets"]
            tensors[key] = SourceTensor(key, spec["dtype"], tuple(spec["shape"]), base + begin, base + end)
    except (AttributeError, KeyError, TypeError, ValueError):
        raise ReapError(f"{path} has a malformed safetensors header; re-download the shard") from None
    size, data_end = path.stat().st_size, max((t.end for t in tensors.values()), default=base)
    if data_end > size:
        raise ReapError(f"{path} is truncated ({size} bytes, its header says {data_end}); re-download the shard")
    if data_end < size:
        raise ReapError(f"{path} has {size - data_end} bytes its header does not cover (a corrupt or foreign file); "
                        "re-download the shard")
    return ShardHeader(metadata, tensors)


def header_bytes(metadata: dict[str, str] | None, entries: list[tuple[str, str, tuple[int, ...], int]]) -> bytes:
    """A safetensors header for (key, dtype, shape, nbytes) laid out in order, padded to 8 bytes
    with spaces as the reference writer does."""
    header: dict = {"__metadata__": metadata} if metadata is not None else {}
    offset = 0
    for key, dtype, shape, nbytes in entries:
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def copy_range(source_fd: int, out_fd: int, begin: int, end: int, advance: Callable[[int], None]) -> None:
    """Append source bytes [begin, end) to ``out_fd`` without passing them through Python."""
    offset = begin
    while offset < end:
        count = min(COPY_CHUNK, end - offset)
        try:
            sent = os.sendfile(out_fd, source_fd, offset, count)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            sent = _read_write(source_fd, out_fd, offset, count)  # no file-to-file sendfile on this filesystem
        if sent <= 0:
            raise ReapError(f"unexpected end of a source shard at byte {offset}; did the file change while pruning?")
        offset += sent
        advance(sent)


def _read_write(source_fd: int, out_fd: int, offset: int, count: int) -> int:
    data = memoryview(os.pread(source_fd, count, offset))
    written = 0
    while written < len(data):
        written += os.write(out_fd, data[written:])
    return written


def write_from_spans(source: Path, out: Path, header: bytes, spans: Iterable[tuple[int, int]],
                     advance: Callable[[int], None]) -> int:
    """Write ``out`` as ``header`` followed by the bytes of ``source`` at ``spans``, in order; return its size."""
    try:
        with open(source, "rb") as src, open(out, "wb") as dst:
            dst.write(header)
            dst.flush()
            for begin, end in spans:
                copy_range(src.fileno(), dst.fileno(), begin, end, advance)
            os.fsync(dst.fileno())  # callers publish the file (or its folder) only once the data is on disk
    except OSError as exc:
        raise ReapError(f"writing {out.name} failed: {exc.strerror or exc}; check the disk and rerun") from None
    return out.stat().st_size
