"""Seeded randomness: every random choice is drawn from a generator whose seed is a pure function of (seed, purpose,
position), so a run is reproducible from its config alone and resumable from any step."""

from __future__ import annotations

import hashlib
from typing import Any

import torch


def derive_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed that is a pure function of (seed, parts): independent streams per purpose/epoch/step."""
    digest = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def make_generator(seed: int, *parts: Any) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *parts))
