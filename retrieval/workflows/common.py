"""What several workflows share: timestamps and the data root."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

from retrieval.data.specs import default_data_root


def now() -> str:
    """The current UTC time to the second, as metadata records it."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def data_root(root) -> Path:
    return Path(root) if root is not None else default_data_root()
