"""Where a Parquet file's page payloads lie, read from its page headers, so a corruption test can flip bytes that the
page CRCs cover wherever the compressed layout puts them (a header is not covered: flipping one may pass unnoticed).

Page headers are Thrift compact-protocol structs (parquet-format `PageHeader`: 1 type, 2 uncompressed_page_size,
3 compressed_page_size, 4 crc, ...); this reads the three fields it needs and skips the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

DATA_PAGE, DICTIONARY_PAGE, DATA_PAGE_V2 = 0, 2, 3


@dataclass(frozen=True)
class Page:
    column: str
    type: int  # DATA_PAGE, DICTIONARY_PAGE, DATA_PAGE_V2, ...
    payload: int  # file offset of the (compressed) payload, right after the header
    size: int  # compressed payload bytes
    crc: int | None  # None: the writer stored no checksum for this page


def pages(path: Path) -> list[Page]:
    """Every page of every column chunk of every row group, in file order."""
    data, meta = Path(path).read_bytes(), pq.ParquetFile(path).metadata
    out = []
    for rg in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            col = meta.row_group(rg).column(c)
            start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
            pos, end = start, start + col.total_compressed_size
            while pos < end:
                header, pos = _struct(data, pos)
                size = header[3]
                out.append(Page(col.path_in_schema, header[1], pos, size, header.get(4)))
                pos += size
    return out


def data_pages(path: Path) -> list[Page]:
    """The data pages (v1 and v2) that carry a CRC."""
    return [p for p in pages(path) if p.type in (DATA_PAGE, DATA_PAGE_V2) and p.crc is not None]


# Thrift compact protocol --------------------------------------------------------------------------------------------
_STOP, _TRUE, _FALSE, _I8, _I16, _I32, _I64, _DOUBLE, _BINARY, _LIST, _SET, _MAP, _STRUCT = range(13)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _zigzag(data: bytes, pos: int) -> tuple[int, int]:
    v, pos = _varint(data, pos)
    return (v >> 1) ^ -(v & 1), pos


def _struct(data: bytes, pos: int) -> tuple[dict[int, object], int]:
    """A struct's integer fields by id (nested values are skipped, stored as None)."""
    fields, fid = {}, 0
    while True:
        byte = data[pos]
        pos += 1
        kind = byte & 0x0F
        if kind == _STOP:
            return fields, pos
        delta = byte >> 4
        if delta:
            fid += delta
        else:
            fid, pos = _zigzag(data, pos)
        fields[fid], pos = _value(data, pos, kind)


def _value(data: bytes, pos: int, kind: int) -> tuple[object, int]:
    if kind in (_TRUE, _FALSE):
        return kind == _TRUE, pos
    if kind == _I8:
        return data[pos], pos + 1
    if kind in (_I16, _I32, _I64):
        return _zigzag(data, pos)
    if kind == _DOUBLE:
        return None, pos + 8
    if kind == _BINARY:
        n, pos = _varint(data, pos)
        return None, pos + n
    if kind in (_LIST, _SET):
        head = data[pos]
        pos += 1
        n, elem = head >> 4, head & 0x0F
        if n == 15:
            n, pos = _varint(data, pos)
        for _ in range(n):
            _, pos = _value(data, pos, elem)
        return None, pos
    if kind == _MAP:
        n, pos = _varint(data, pos)
        if n:
            types = data[pos]
            pos += 1
            for _ in range(n):
                _, pos = _value(data, pos, types >> 4)
                _, pos = _value(data, pos, types & 0x0F)
        return None, pos
    if kind == _STRUCT:
        _, pos = _struct(data, pos)
        return None, pos
    raise ValueError(f"unknown Thrift compact type {kind} at offset {pos}")
