"""Checksums computed the way S3 writes them, independently of deltareg's own code."""

from __future__ import annotations

import base64
import zlib


def part_crc32s(data: bytes, part_size: int) -> list[str]:
    """Each ``part_size`` part's CRC32 (base64 of the 4 big-endian bytes); one part for empty data."""
    parts = [data[i : i + part_size] for i in range(0, max(len(data), 1), part_size)]
    return [base64.b64encode(zlib.crc32(part).to_bytes(4, "big")).decode() for part in parts]
