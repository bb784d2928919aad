"""TFRecord framing of TensorBoard event files, verified record by record.

An event file is a sequence of records, each::

    uint64  length              (little endian)
    uint32  masked CRC32C of the 8 length bytes
    bytes   data[length]        (one serialized ``Event`` protocol buffer)
    uint32  masked CRC32C of data

tensorboard's own loader stops silently at the first incomplete record, so a run cut short by a
full disk or a killed writer looks like a shorter, healthy run. :func:`read_records` instead raises
:class:`CorruptEventFile` (naming the file and the byte offset) for a cut record, a checksum
mismatch, or bytes after the last complete record.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

HEADER_BYTES = 12  # uint64 length + uint32 masked crc of the length
FOOTER_BYTES = 4  # uint32 masked crc of the data
#: A record larger than this is taken as a corrupt length field, not as a real event.
MAX_RECORD_BYTES = 1 << 30


class CorruptEventFile(ValueError):
    """An event file whose framing or checksums do not verify."""

    def __init__(self, path: str, offset: int, reason: str) -> None:
        super().__init__(f"{path}: corrupt event file at byte {offset}: {reason}")
        self.path = path
        self.offset = offset
        self.reason = reason


def read_records(path: str) -> Iterator[tuple[int, bytes]]:
    """Yield ``(offset, data)`` for every record of the file at ``path``, checksums verified.

    Raises:
        CorruptEventFile: a truncated record, a CRC mismatch, an absurd length, or trailing bytes.
        OSError: the file cannot be read.
    """
    with open(path, "rb") as fh:
        blob = fh.read()
    yield from iter_records(blob, path)


def iter_records(blob: bytes, path: str = "<bytes>") -> Iterator[tuple[int, bytes]]:
    """:func:`read_records` on bytes already in memory (``path`` is only used in messages)."""
    size = len(blob)
    offset = 0
    view = memoryview(blob)
    while offset < size:
        if size - offset < HEADER_BYTES:
            raise CorruptEventFile(path, offset, f"{size - offset} trailing byte(s) after the last complete record "
                                   f"(a record header needs {HEADER_BYTES}); the file was cut mid-record")
        header = bytes(view[offset:offset + 8])
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", view[offset + 8:offset + 12])
        if masked_crc32c(header) != length_crc:
            raise CorruptEventFile(path, offset, "length checksum mismatch (bad CRC32C in the record header)")
        if length > MAX_RECORD_BYTES:
            raise CorruptEventFile(path, offset, f"record length {length} is implausible")
        end = offset + HEADER_BYTES + length + FOOTER_BYTES
        if end > size:
            raise CorruptEventFile(path, offset, f"record of {length} bytes is truncated: the file ends at byte "
                                   f"{size}, the record needs {end}; the file was cut mid-record")
        data = bytes(view[offset + HEADER_BYTES:offset + HEADER_BYTES + length])
        (data_crc,) = struct.unpack("<I", view[end - FOOTER_BYTES:end])
        if masked_crc32c(data) != data_crc:
            raise CorruptEventFile(path, offset, "data checksum mismatch (bad CRC32C of the record's payload)")
        yield offset, data
        offset = end
