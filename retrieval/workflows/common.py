"""What several workflows share: timestamps."""

from __future__ import annotations

import datetime as _dt


def now() -> str:
    """The current UTC time to the second, as metadata records it."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()

