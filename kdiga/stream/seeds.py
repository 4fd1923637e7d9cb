"""The seeds of the streamed data's random choices (write order, shard order, buffers, crops)."""

from __future__ import annotations

import hashlib
from typing import Any


def mix(*parts: Any) -> int:
    """A 64-bit seed from ``parts``, the same in every process and on every run."""
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")
