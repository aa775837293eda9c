"""The items of an index (per id: a label and a source) in a form that scales to millions: numpy arrays in one
`.npz` file, sources as a compact table.

A source is where an item came from: `mnist:train[12]`, `idx:/data/forms[7]`, a file path, `prototype:7 (12 images)`.
Sources of the form `<prefix>[<position>]` (every item of a dataset spec) are stored as (prefix number, position):
12 bytes per item, whatever the prefix; other sources (file paths, ...) as UTF-8 text in one byte blob with offsets.
`SourceTable` is the in-memory form, a read-only sequence of strings that decodes a row when it is asked for.

    items-<token>.npz   ids int64 (n,), labels int32 (n,), source_kind int32 (n,) (prefix number, or -1: text),
                        source_pos int64 (n,) (position, or the row of the text), source_prefixes (JSON, uint8),
                        source_blob uint8, source_offsets int64 (texts + 1)

Index folders written before this format hold `items-<token>.json` (retrieval.index_legacy); `read_items` reads
both.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from retrieval.errors import RetrievalError
from retrieval.fsutil import atomic_path
from retrieval.index_legacy import JSON_ITEMS_SUFFIX, read_json_items

_INDEXED = re.compile(r"^(?P<prefix>.+)\[(?P<pos>0|[1-9][0-9]{0,17})\]$", re.DOTALL)
ARRAYS = ("ids", "labels", "source_kind", "source_pos", "source_prefixes", "source_blob", "source_offsets")


class _Texts:
    """Strings stored as one UTF-8 blob with offsets (what was loaded), plus the ones appended since."""

    def __init__(self, blob: np.ndarray | None = None, offsets: np.ndarray | None = None):
        self.blob = np.zeros(0, np.uint8) if blob is None else blob
        self.offsets = np.zeros(1, np.int64) if offsets is None else offsets
        self.pending: list[str] = []

    def __len__(self) -> int:
        return len(self.offsets) - 1 + len(self.pending)

    def __getitem__(self, i: int) -> str:
        stored = len(self.offsets) - 1
        if i < stored:
            return self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8")
        return self.pending[i - stored]

    def append(self, text: str) -> int:
        self.pending.append(text)
        return len(self) - 1

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.pending:
            return self.blob, self.offsets
        encoded = [t.encode("utf-8") for t in self.pending]
        lengths = np.fromiter((len(b) for b in encoded), np.int64, len(encoded))
        blob = np.concatenate([self.blob, np.frombuffer(b"".join(encoded), np.uint8)])
        offsets = np.concatenate([self.offsets, self.offsets[-1] + np.cumsum(lengths)])
        return blob, offsets


class SourceTable(Sequence):
    """The sources of an index's items, one per row (the rows of EmbeddingIndex.ids/.labels), stored compactly.

    Behaves as a read-only sequence of strings (len, [i], iteration, == a list); grows with `extend`."""

    def __init__(self, prefixes: list[str] | None = None, kind: np.ndarray | None = None,
                 pos: np.ndarray | None = None, texts: _Texts | None = None):
        self.prefixes = list(prefixes or [])
        self.kind = np.zeros(0, np.int32) if kind is None else np.asarray(kind, np.int32)
        self.pos = np.zeros(0, np.int64) if pos is None else np.asarray(pos, np.int64)
        self.texts = texts or _Texts()
        self._pending_kind: list[np.ndarray] = []
        self._pending_pos: list[np.ndarray] = []

    # -- construction ----------------------------------------------------------------------------------------
    @classmethod
    def from_strings(cls, sources: Iterable[str]) -> "SourceTable":
        table = cls()
        table.extend(sources)
        return table

    @classmethod
    def indexed(cls, prefix: str, positions) -> "SourceTable":
        """The sources `prefix[p]` for each p of `positions` (a dataset spec's items), without making strings."""
        table = cls()
        table.extend_indexed(prefix, positions)
        return table

    def _prefix_number(self, prefix: str) -> int:
        try:
            return self.prefixes.index(prefix)
        except ValueError:
            self.prefixes.append(prefix)
            return len(self.prefixes) - 1

    def extend_indexed(self, prefix: str, positions) -> None:
        positions = np.asarray(positions, np.int64)
        self._pending_kind.append(np.full(len(positions), self._prefix_number(prefix), np.int32))
        self._pending_pos.append(positions.copy())

    def extend(self, sources: Iterable[str]) -> None:
        kinds, positions = [], []
        for s in sources:
            s = str(s)
            m = _INDEXED.match(s)
            if m:
                kinds.append(self._prefix_number(m.group("prefix")))
                positions.append(int(m.group("pos")))
            else:
                kinds.append(-1)
                positions.append(self.texts.append(s))
        self._pending_kind.append(np.asarray(kinds, np.int32))
        self._pending_pos.append(np.asarray(positions, np.int64))

    def extend_table(self, other: "SourceTable") -> None:
        """Append another table's rows."""
        other._settle()
        mapping = np.array([self._prefix_number(p) for p in other.prefixes] + [-1], np.int32)
        kind = mapping[other.kind]  # -1 (text) maps to the last entry, -1
        pos = other.pos.copy()
        text_rows = np.flatnonzero(other.kind < 0)
        for row in text_rows:
            pos[row] = self.texts.append(other.texts[int(other.pos[row])])
        self._pending_kind.append(kind)
        self._pending_pos.append(pos)

    def _settle(self) -> None:
        if self._pending_kind:
            self.kind = np.concatenate([self.kind, *self._pending_kind])
            self.pos = np.concatenate([self.pos, *self._pending_pos])
            self._pending_kind, self._pending_pos = [], []

    # -- reading ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.kind) + sum(len(k) for k in self._pending_kind)

    def _row(self, i: int) -> str:
        kind, pos = int(self.kind[i]), int(self.pos[i])
        return f"{self.prefixes[kind]}[{pos}]" if kind >= 0 else self.texts[pos]

    def __getitem__(self, i):
        self._settle()
        if isinstance(i, slice):
            return [self._row(j) for j in range(*i.indices(len(self)))]
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"source row {i} out of range ({len(self)} rows)")
        return self._row(i)

    def __iter__(self) -> Iterator[str]:
        self._settle()
        for i in range(len(self)):
            yield self._row(i)

    def __eq__(self, other) -> bool:
        if isinstance(other, (SourceTable, list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __repr__(self) -> str:
        return f"SourceTable({len(self)} rows, {len(self.prefixes)} prefixes, {len(self.texts)} texts)"

    def rows_of(self, sources: Sequence[str], key: Callable[[str], str] | None = None) -> np.ndarray:
        """The row holding each of `sources` (-1 where none does; the last row when several do). `key` normalises
        text sources (e.g. os.path.realpath for file paths) on both sides; `<prefix>[<pos>]` sources match as is."""
        self._settle()
        out = np.full(len(sources), -1, np.int64)
        if not len(sources) or not len(self):
            return out
        indexed = self.kind >= 0
        codes = self.kind.astype(np.int64) * (1 << 44) + self.pos
        rows = np.flatnonzero(indexed)
        order = np.argsort(codes[rows], kind="stable")
        sorted_codes, sorted_rows = codes[rows][order], rows[order]
        text_rows = np.flatnonzero(~indexed)
        by_text = {}
        if len(text_rows):
            norm = key or (lambda s: s)
            by_text = {norm(self.texts[int(self.pos[r])]): int(r) for r in text_rows}
        for i, s in enumerate(sources):
            m = _INDEXED.match(s)
            if m and m.group("prefix") in self.prefixes:
                code = self.prefixes.index(m.group("prefix")) * (1 << 44) + int(m.group("pos"))
                hi = np.searchsorted(sorted_codes, code, side="right")
                if hi > 0 and sorted_codes[hi - 1] == code:
                    out[i] = sorted_rows[hi - 1]
                    continue
            if by_text:
                out[i] = by_text.get((key or (lambda t: t))(s), -1)
        return out

    # -- storage ---------------------------------------------------------------------------------------------
    def arrays(self) -> dict[str, np.ndarray]:
        self._settle()
        blob, offsets = self.texts.arrays()
        return {
            "source_kind": self.kind,
            "source_pos": self.pos,
            "source_prefixes": np.frombuffer(json.dumps(self.prefixes).encode("utf-8"), np.uint8),
            "source_blob": blob,
            "source_offsets": offsets,
        }

    @classmethod
    def from_arrays(cls, arrays: dict, what: str) -> "SourceTable":
        try:
            prefixes = json.loads(arrays["source_prefixes"].tobytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise RetrievalError(f"{what}: its source prefixes are not JSON ({e})") from None
        if not isinstance(prefixes, list) or not all(isinstance(p, str) for p in prefixes):
            raise RetrievalError(f"{what}: its source prefixes are not a list of strings")
        kind, pos = arrays["source_kind"], arrays["source_pos"]
        blob, offsets = arrays["source_blob"], arrays["source_offsets"]
        texts = len(offsets) - 1
        bad = (len(kind) != len(pos) or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(blob)
               or (len(offsets) > 1 and (np.diff(offsets) < 0).any())
               or (len(kind) and (kind.min() < -1 or kind.max() >= len(prefixes)))
               or ((kind >= 0) & (pos < 0)).any() or ((kind < 0) & ((pos < 0) | (pos >= texts))).any())
        if bad:
            raise RetrievalError(f"{what}: its source table is inconsistent (rows, prefixes and texts disagree)")
        return cls(prefixes, kind, pos, _Texts(blob, offsets))


def write_items(path: str | os.PathLike, ids: np.ndarray, labels: np.ndarray, sources: SourceTable) -> None:
    """Write the items file atomically (uncompressed .npz: each array stored as it is in memory)."""
    arrays = {"ids": np.asarray(ids, np.int64), "labels": np.asarray(labels, np.int32), **sources.arrays()}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def read_items(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, SourceTable]:
    """(ids int64, labels int64, sources) from an items file: `.npz` (this format) or `.json` (earlier versions)."""
    path = Path(path)
    if path.suffix == JSON_ITEMS_SUFFIX:
        ids, labels, sources = read_json_items(path)
        return ids, labels, SourceTable.from_strings(sources)
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [name for name in ARRAYS if name not in z.files]
            if missing:
                raise RetrievalError(f"{path} is not an index items file (missing {', '.join(missing)})")
            arrays = {name: z[name] for name in ARRAYS}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise RetrievalError(f"{path} is not a readable index items file ({e})") from None
    ids, labels = arrays["ids"], arrays["labels"]
    if ids.ndim != 1 or labels.ndim != 1 or ids.dtype != np.int64 or labels.dtype.kind != "i":
        raise RetrievalError(f"{path} is not an index items file (ids/labels are not 1-d integer arrays)")
    sources = SourceTable.from_arrays(arrays, str(path))
    return ids, labels.astype(np.int64), sources
