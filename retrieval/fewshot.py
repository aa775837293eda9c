"""Few-shot classification of (possibly unseen) classes by the standard episodic protocol.

An episode draws `ways` classes, then `shots` support and `queries` query images of each (all distinct); each
query is classified against that episode's support set alone, either by the nearest class prototype (mean of
the class's support embeddings, re-normalised to unit length) or by k-NN over the support embeddings. A run of
`episodes` episodes reports the mean per-episode accuracy and its 95% confidence interval,
1.96 * std / sqrt(episodes) (std over episodes, ddof=0, as in the few-shot literature).

Embeddings are computed once (retrieval.embed.embed_images, or `pixel_embeddings` for the raw-pixel baseline);
episodes are then index arithmetic plus batched matrix products, so thousands take well under a second.
Sampling depends only on the labels, the seed and (ways, shots, queries): the same seed gives the very same
episodes to every tower and to the pixel baseline, so their accuracies are a paired comparison.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch

from retrieval.errors import UsageError
from retrieval.towers import PIXEL_MEAN, PIXEL_STD

METHODS = ("prototype", "knn")

# Episodes are scored in chunks so that the gathered (chunk, ways * queries, dim) arrays stay around this many
# floats, whatever the embedding size (784 for pixels).
_CHUNK_FLOATS = 8_000_000


@dataclass(frozen=True)
class FewShotResult:
    """Accuracy of one (ways, shots) setting over `episodes` episodes."""

    ways: int
    shots: int
    queries: int
    episodes: int
    method: str
    accuracy: float  # mean of the per-episode accuracies
    ci95: float  # half-width of the 95% confidence interval of `accuracy`
    std: float  # standard deviation of the per-episode accuracies

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Episodes:
    """Dataset positions of each episode's images: support (E, ways, shots) and query (E, ways, queries).

    Way w of episode e is class `classes[e, w]` (a label value); a query's true answer is its way index w.
    """

    classes: np.ndarray
    support: np.ndarray
    query: np.ndarray


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def pixel_embeddings(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """The raw-pixel baseline: uint8 images flattened, normalised as a tower normalises its input
    ((x / 255 - MNIST mean) / MNIST std) and L2-normalised: float32 (N, H*W).

    With unit vectors, nearest by cosine similarity is nearest by Euclidean distance, as for tower embeddings.
    """
    x = torch.as_tensor(images).reshape(len(images), -1).float().div_(255.0)
    return _normalise((x - PIXEL_MEAN) / PIXEL_STD).numpy()


def _sample_distinct(rng: np.random.Generator, n: np.ndarray, size: int) -> np.ndarray:
    """For each row r, `size` distinct integers uniform in [0, n[r]), in random order: (len(n), size).

    Sequential sampling without replacement, vectorised over rows: step j draws the r-th of the n - j values not
    yet taken, found by walking past the taken ones in ascending order. O(rows * size^2), no (rows, n) arrays.
    """
    n = np.asarray(n, dtype=np.int64)
    out = np.empty((len(n), size), dtype=np.int64)
    for j in range(size):
        r = rng.integers(0, n - j)
        taken = np.sort(out[:, :j], axis=1)
        for col in range(j):
            r += taken[:, col] <= r
        out[:, j] = r
    return out


def _class_members(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(class values present, their counts, a (classes, max count) table of dataset positions, padded with -1)."""
    values, counts = np.unique(labels, return_counts=True)
    order = np.argsort(labels, kind="stable")
    table = np.full((len(values), int(counts.max())), -1, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    for i, (start, count) in enumerate(zip(starts, counts)):
        table[i, :count] = order[start : start + count]
    return values, counts, table


def check_episode_setting(
    labels: np.ndarray, ways: int, shots: int, queries: int, episodes: int, class_names: Sequence[str] | None = None,
) -> None:
    """Raise UsageError when the episodes cannot be drawn from these labels (names the offending option/class)."""
    for option, value, least in (("ways", ways, 2), ("shots", shots, 1), ("queries", queries, 1),
                                 ("episodes", episodes, 1)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
            raise UsageError(f"`{option}` must be an integer >= {least}, got {value!r}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0:
        raise UsageError("few-shot evaluation needs a non-empty 1-D array of labels")
    values, counts = np.unique(labels, return_counts=True)

    def name(v) -> str:
        return str(class_names[int(v)]) if class_names is not None else str(int(v))

    if ways > len(values):
        raise UsageError(
            f"`ways` {ways} is more than the {len(values)} class(es) available ({', '.join(name(v) for v in values)})"
        )
    short = [(name(v), int(c)) for v, c in zip(values, counts) if c < shots + queries]
    if short:
        listed = ", ".join(f"{n!r} has {c}" for n, c in short)
        raise UsageError(
            f"every class needs at least shots + queries = {shots} + {queries} = {shots + queries} images; {listed}"
        )


def check_method(method: str, k: int, ways: int, shot_counts: Sequence[int]) -> None:
    """Raise UsageError for an unknown method, or a knn k that the support sets cannot fill."""
    if method not in METHODS:
        raise UsageError(f"`method` must be one of {', '.join(METHODS)}, got {method!r}")
    if not shot_counts:
        raise UsageError("`shots` needs at least one shot count")
    for s in shot_counts:
        if method == "knn" and not 1 <= k <= ways * s:
            raise UsageError(f"`k` must be between 1 and ways * shots = {ways * s} for {s}-shot, got {k}")


def check_fewshot_settings(labels: np.ndarray, ways: int, shot_counts: Sequence[int], queries: int, episodes: int,
                           method: str, k: int, class_names: Sequence[str] | None = None) -> None:
    """Every check of a few-shot run, before any time is spent on embeddings or episodes."""
    check_method(method, k, ways, shot_counts)
    for s in shot_counts:
        check_episode_setting(labels, ways, s, queries, episodes, class_names)


def sample_episodes(labels: np.ndarray, ways: int, shots: int, queries: int, episodes: int, seed: int = 0) -> Episodes:
    """Draw `episodes` episodes from integer labels with numpy's PCG64 seeded by `seed` (deterministic)."""
    labels = np.asarray(labels)
    check_episode_setting(labels, ways, shots, queries, episodes)
    values, counts, table = _class_members(labels)
    rng = np.random.default_rng(seed)
    chosen = _sample_distinct(rng, np.full(episodes, len(values)), ways)  # (E, ways) indices into `values`
    flat = chosen.reshape(-1)
    picks = _sample_distinct(rng, counts[flat], shots + queries)  # (E * ways, shots + queries) ranks in class
    positions = table[flat[:, None], picks].reshape(episodes, ways, shots + queries)
    return Episodes(classes=values[chosen], support=positions[:, :, :shots], query=positions[:, :, shots:])


def classify_episodes(
    embeddings: np.ndarray, episodes: Episodes, method: str = "prototype", k: int = 1,
) -> np.ndarray:
    """Per-episode accuracy (float64, E) of classifying each episode's queries against its own support set.

    Embeddings are compared by cosine similarity (rows are L2-normalised here; tower outputs already are).

    prototype: nearest re-normalised class mean by cosine similarity (= Euclidean distance for unit vectors).
    knn: majority vote of the k most similar support images; equal votes go to the class with the larger summed
    similarity among those k (so k=1 is plain nearest neighbour).
    """
    n_episodes, ways, shots = episodes.support.shape
    queries = episodes.query.shape[2]
    check_method(method, k, ways, [shots])
    emb = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
    if emb.ndim != 2:
        raise UsageError(f"embeddings must be a 2-D array (images, dimensions), got shape {tuple(emb.shape)}")
    emb = _normalise(emb)  # cosine similarity throughout (a no-op for tower embeddings, already unit-norm)
    dim = emb.shape[1]
    truth = torch.arange(ways).repeat_interleave(queries)  # (ways * queries,) true way of each query
    chunk = max(1, _CHUNK_FLOATS // (ways * (shots + queries) * dim))
    accuracy = np.empty(n_episodes, dtype=np.float64)
    with torch.inference_mode():
        for start in range(0, n_episodes, chunk):
            stop = min(start + chunk, n_episodes)
            support = emb[torch.from_numpy(episodes.support[start:stop])]  # (e, ways, shots, dim)
            query = emb[torch.from_numpy(episodes.query[start:stop].reshape(stop - start, -1))]  # (e, ways*Q, dim)
            if method == "prototype":
                prototypes = _normalise(support.mean(dim=2))  # (e, ways, dim)
                predicted = torch.bmm(query, prototypes.transpose(1, 2)).argmax(dim=2)
            else:
                support = support.reshape(stop - start, ways * shots, dim)
                sims = torch.bmm(query, support.transpose(1, 2))  # (e, ways*Q, ways*shots)
                top_sims, top = sims.topk(k, dim=2)
                top_ways = top // shots  # support is laid out way by way
                votes = torch.zeros(*top.shape[:2], ways, dtype=torch.float64)
                votes.scatter_add_(2, top_ways, torch.ones_like(top_ways, dtype=torch.float64))
                # summed similarity lies in [-k, k]; scaled into (-0.5, 0.5) it only breaks ties between vote counts
                votes.scatter_add_(2, top_ways, top_sims.double() / (2 * k + 1))
                predicted = votes.argmax(dim=2)
            accuracy[start:stop] = (predicted == truth).double().mean(dim=1).numpy()
    return accuracy


def summarise(accuracies: np.ndarray, ways: int, shots: int, queries: int, method: str) -> FewShotResult:
    acc = np.asarray(accuracies, dtype=np.float64)
    std = float(acc.std())
    return FewShotResult(
        ways=ways, shots=shots, queries=queries, episodes=len(acc), method=method,
        accuracy=float(acc.mean()), ci95=1.96 * std / math.sqrt(len(acc)), std=std,
    )


def evaluate_fewshot(
    embeddings: np.ndarray,
    labels: np.ndarray | torch.Tensor,
    ways: int,
    shots: int | Sequence[int],
    queries: int = 15,
    episodes: int = 1000,
    method: str = "prototype",
    seed: int = 0,
    k: int = 1,
    class_names: Sequence[str] | None = None,
) -> list[FewShotResult]:
    """Mean accuracy and 95% CI of `episodes` N-way K-shot episodes, one result per shot count.

    embeddings: (N, D) float array, one row per image (unit-norm rows for towers and pixel_embeddings);
    labels: (N,) integers (class_names[label] names a class in error messages). Every shot count samples with
    a fresh generator seeded by `seed`, so results do not depend on which other shot counts are asked for.
    """
    labels = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    embeddings = np.asarray(embeddings)
    if len(embeddings) != len(labels):
        raise UsageError(f"{len(embeddings)} embeddings but {len(labels)} labels")
    shot_counts = [shots] if isinstance(shots, (int, np.integer)) else list(shots)
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UsageError(f"`seed` must be a non-negative integer, got {seed!r}")
    check_fewshot_settings(labels, ways, shot_counts, queries, episodes, method, k, class_names)
    results = []
    for s in shot_counts:
        drawn = sample_episodes(labels, ways, s, queries, episodes, seed=seed)
        acc = classify_episodes(embeddings, drawn, method=method, k=k)
        results.append(summarise(acc, ways, s, queries, method))
    return results
