"""Which images an operation reads: dataset specs, the data root and the filters every spec gets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from retrieval.data.specs import ImageDataset, data_root, load_dataset
from retrieval.errors import UsageError

Filter = Sequence[str | int] | str | None


@dataclass(frozen=True)
class Selection:
    """Dataset specs (`mnist:train`, `folder:DIR`, ...) read from `root` (None: the default data root), each
    keeping `classes` / leaving out `exclude` (by name), then a seeded `subset` of its images.

    `load()` reads the images into memory (retrieval.data.specs); `open()` leaves them where they are and reads
    them on demand (retrieval.data.stream), selecting exactly the same items."""

    specs: tuple[str, ...]
    root: Path | None = None
    classes: Filter = None
    exclude: Filter = None
    subset: int | None = None
    seed: int = 0

    def __post_init__(self):
        specs = (self.specs,) if isinstance(self.specs, str) else tuple(self.specs)
        object.__setattr__(self, "specs", specs)
        if self.root is not None:
            object.__setattr__(self, "root", Path(self.root))

    @classmethod
    def of(cls, data: "Selection | str | Sequence[str]", **defaults) -> "Selection":
        """`data` as a Selection: one given is used as it is; a spec or a list of specs gets `defaults`."""
        return data if isinstance(data, Selection) else cls(data, **defaults)

    @property
    def data_root(self) -> Path:
        return data_root(self.root)

    @property
    def spec(self) -> str:
        """The one spec of a single-spec selection (queries, pairs, episodes)."""
        if len(self.specs) != 1:
            raise UsageError(f"expected one dataset spec, got {len(self.specs)}: {', '.join(self.specs)}")
        return self.specs[0]

    def _check(self) -> None:
        if not self.specs:
            raise UsageError("`data`: give at least one dataset spec")

    def load(self) -> list[ImageDataset]:
        """Every spec's images, in memory."""
        self._check()
        return [self.load_spec(spec) for spec in self.specs]

    def load_spec(self, spec: str) -> ImageDataset:
        return load_dataset(spec, root=self.data_root, classes=self.classes, exclude=self.exclude,
                            subset=self.subset, seed=self.seed)

    def load_one(self) -> ImageDataset:
        """The images of a single-spec selection, in memory."""
        return self.load_spec(self.spec)

    def open(self) -> list:
        """Every spec's selection with its images left where they are (retrieval.data.stream.StreamedDataset)."""
        from retrieval.data.stream import open_dataset

        self._check()
        return [open_dataset(spec, root=self.data_root, classes=self.classes, exclude=self.exclude,
                             subset=self.subset, seed=self.seed) for spec in self.specs]


def merge_datasets(datasets: Sequence[ImageDataset]):
    """Concatenate ImageDatasets -> (images uint8 (N,28,28), labels into the union of the classes present (by
    name, in order of first appearance), those classes, sources)."""
    import torch

    classes: list[str] = []
    images, labels, sources = [], [], []
    for ds in datasets:
        present = sorted(set(ds.labels.tolist()))
        for i in present:
            if ds.classes[i] not in classes:
                classes.append(ds.classes[i])
        mapping = torch.full((len(ds.classes),), -1, dtype=torch.int64)
        for i in present:
            mapping[i] = classes.index(ds.classes[i])
        images.append(ds.images)
        labels.append(mapping[ds.labels])
        sources.extend(ds.sources)
    return torch.cat(images), torch.cat(labels).numpy(), classes, sources
