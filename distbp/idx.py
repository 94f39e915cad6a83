"""IDX files (the format of MNIST and Fashion-MNIST), gzip-compressed or raw, read as a stream.

    with IdxReader("train-images-idx3-ubyte.gz") as images:    # header parsed and checked
        images.dims, images.dtype                             # (60000, 28, 28), uint8
        for block in images.blocks(4096): ...                 # (<=4096, 28, 28) native-endian
        images.md5                                            # of the uncompressed stream

Layout (big-endian): two zero bytes, a type code, the number of dimensions d, then d uint32
sizes, then prod(sizes) values of the type. Every malformed file (bad magic, unknown type,
truncated data, trailing bytes, a corrupt gzip stream) raises a one-line `DataError` naming the
file. Reading streams block by block, so memory is bounded by the block, not by the file.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from distbp.errors import DataError, one_line

__all__ = ["IDX_TYPES", "IdxReader"]

# type code -> big-endian dtype (the IDX specification's table)
IDX_TYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
             0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_GZIP_MAGIC = b"\x1f\x8b"
_MAX_DIMS = 8  # MNIST-like files have 1 (labels) or 3 (images); more is surely not IDX


class IdxReader:
    """One IDX file opened for streaming; `dims`, `dtype` (native byte order) after opening.

    `blocks(rows)` yields arrays of shape (<= rows, *dims[1:]) in file order, then checks that
    the stream ends exactly there; afterwards `md5` is the hex MD5 of the uncompressed bytes
    (header included), which is what published checksums of the uncompressed files cover.
    """

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.compressed = _is_gzip(self.path)
        try:
            self._fh: BinaryIO = (gzip.open(self.path, "rb") if self.compressed
                                  else open(self.path, "rb"))
        except OSError as err:
            raise self._error(f"cannot open ({err.strerror or one_line(err)})") from None
        self._md5 = hashlib.md5()
        self._done = False
        try:
            self.dims, self.dtype = self._header()
        except BaseException:
            self._fh.close()
            raise

    # ------------------------------------------------------------------ header and stream

    def _error(self, problem: str) -> DataError:
        return DataError(f"IDX file {self.path!r}: {problem}")

    def _read(self, size: int) -> bytes:
        """Exactly `size` uncompressed bytes (fewer only at the end of the stream)."""
        try:
            chunk = self._fh.read(size)
        except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
            raise self._error(f"corrupt gzip stream ({one_line(err)})") from None
        self._md5.update(chunk)
        return chunk

    def _header(self) -> tuple[tuple[int, ...], np.dtype]:
        magic = self._read(4)
        if len(magic) < 4:
            raise self._error(f"truncated header: {len(magic)} bytes, an IDX file starts "
                              f"with a 4-byte magic number")
        if magic[:2] != b"\0\0" or magic[2] not in IDX_TYPES or not 1 <= magic[3] <= _MAX_DIMS:
            raise self._error(f"bad magic number 0x{magic.hex()} (expected 0x0000TTDD: type "
                              f"code TT in {_codes()}, DD = 1..{_MAX_DIMS} dimensions)")
        ndim = magic[3]
        raw = self._read(4 * ndim)
        if len(raw) < 4 * ndim:
            raise self._error(f"truncated header: the magic number announces {ndim} "
                              f"dimension sizes, the file ends after {len(raw) // 4}")
        dims = struct.unpack(f">{ndim}I", raw)
        return dims, IDX_TYPES[magic[2]].newbyteorder("=")

    @property
    def item_size(self) -> int:
        """Bytes of one row (one item along the first dimension)."""
        return math.prod(self.dims[1:]) * self.dtype.itemsize

    def blocks(self, rows: int = 4096) -> Iterator[np.ndarray]:
        """Arrays of up to `rows` items each, in order; DataError if the data is short or long."""
        if self._done:
            raise RuntimeError(f"{self.path}: blocks() can be iterated once")
        n, shape = self.dims[0], self.dims[1:]
        for lo in range(0, n, rows):
            count = min(rows, n - lo)
            raw = self._read(count * self.item_size)
            if len(raw) < count * self.item_size:
                got = lo * self.item_size + len(raw)
                raise self._error(f"truncated: the header announces dims {self.dims} "
                                  f"({n * self.item_size} data bytes), the file holds {got}")
            block = np.frombuffer(raw, self.dtype.newbyteorder(">"), count * math.prod(shape))
            yield block.astype(self.dtype).reshape(count, *shape)
        extra = len(self._read(1 << 16))
        if extra:
            raise self._error(f"{'at least ' if extra == 1 << 16 else ''}{extra} bytes after "
                              f"the {n * self.item_size} data bytes that dims {self.dims} "
                              f"announce (wrong counts in the header?)")
        self._done = True

    @property
    def md5(self) -> str:
        """Hex MD5 of the uncompressed stream; valid after `blocks()` ran to the end."""
        if not self._done:
            raise RuntimeError(f"{self.path}: md5 is known only after reading every block")
        return self._md5.hexdigest()

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> IdxReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_gzip(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(2) == _GZIP_MAGIC
    except FileNotFoundError:
        raise DataError(f"IDX file {path!r}: not found") from None
    except IsADirectoryError:
        raise DataError(f"IDX file {path!r}: is a directory, not an IDX file") from None
    except OSError as err:
        why = err.strerror or one_line(err)
        raise DataError(f"IDX file {path!r}: not readable ({why})") from None


def _codes() -> str:
    return "{" + ", ".join(f"{c:02x}" for c in IDX_TYPES) + "}"

