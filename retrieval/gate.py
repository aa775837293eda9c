"""The digit-or-not gate: a small binary classifier in front of the lookup, so that `unknown` can mean
"this is not a digit" and not only "far from every class".

A DigitGate rides on a Tower as its optional `gate` submodule (`tower.gate`), so it is saved in the checkpoint
(weights under `tower.gate.`, its description under the sidecar's "gate" key), copied into index folders with the
tower and exported as a second output of the ONNX / TorchScript graph (retrieval/export.py). Forms (FORMS):
  cnn        a separate small CNN on the image (about 0.76M multiply-adds: a quarter of one pass of the default
             tower, a thirty-sixth of mnist-robust's nine shifted passes); trained alone, the tower untouched
  trunk      a small head on a frozen copy of the tower's convolutional trunk (its 64 x 7 x 7 map)
  embedding  a small head on the tower's embedding (the same forward as the lookup)
benchmarks/history.md ("The digit-or-not gate") has the figures that chose the form shipped by `retrieval gate train`.

Training (train_gate): positives are digits of the tower's training slice through the robust recipe's
augmentation (affine, then every degradation family of augment.DegradeAugment), negatives the pictures of
retrieval.data.nondigits' training sources through the same augmentation (so no corruption becomes a cue for
"digit"); binary cross-entropy, Adam, a fixed number of steps, every random draw from the seed.

Scores are digit probabilities sigmoid(logit); a query is "not a digit" when its score is below the threshold
(the gate's own, chosen on the selection split when trained, or the one `calibrate` stores in an index).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from retrieval.embed import evaluating
from retrieval.errors import RetrievalError, UsageError
from retrieval.towers import PIXEL_MEAN, PIXEL_STD

logger = logging.getLogger(__name__)

FORMS = ("cnn", "trunk", "embedding")
NOT_A_DIGIT = "not a digit"
FAR_FROM_EVERY_CLASS = "far from every class"
DEFAULT_THRESHOLD = 0.5


class DigitGate(nn.Module):
    """Digit-or-not logits (N,) for images x float (N, 1, 28, 28) in [0, 1]; `embeddings` (N, D): the tower's
    embeddings of the same images (the `embedding` form reads them, the others ignore them).

    classes: 0, one output (digit or not); or the number of digit classes C: C + 1 outputs (each digit, and "no
    digit"), trained on the digits' labels, and the logit is log(sum of the digits' probabilities / that of "no
    digit") (so a picture is a digit when it is one digit in particular)."""

    def __init__(self, form: str = "cnn", width: int = 16, embedding_size: int = 64, trunk: nn.Module | None = None,
                 trunk_features: int = 64 * 7 * 7, threshold: float = DEFAULT_THRESHOLD, classes: int = 0):
        super().__init__()
        if form not in FORMS:
            raise UsageError(f"unknown gate form {form!r}; expected one of: {', '.join(FORMS)}")
        self.form, self.width, self.embedding_size, self.trunk_features = form, int(width), int(embedding_size), \
            int(trunk_features)
        self.threshold = float(threshold)
        self.classes = int(classes)
        w, outputs = self.width, self.classes + 1 if self.classes else 1
        if form == "cnn":
            self.net = nn.Sequential(
                nn.Conv2d(1, w, 5, 2, 2, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),  # 28 -> 14
                nn.Conv2d(w, 2 * w, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True),  # 14 -> 7
                nn.Conv2d(2 * w, 2 * w, 3, 1, 1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True),
                nn.Flatten(), nn.Linear(2 * w * 49, outputs),
            )
        elif form == "trunk":
            if trunk is None:
                raise UsageError("the trunk gate needs the tower's convolutional trunk")
            self.trunk = trunk
            self.net = nn.Sequential(nn.Linear(self.trunk_features, 4 * w), nn.ReLU(inplace=True),
                                     nn.Linear(4 * w, outputs))
        else:
            self.net = nn.Sequential(nn.Linear(self.embedding_size, 4 * w), nn.ReLU(inplace=True),
                                     nn.Linear(4 * w, outputs))

    def outputs(self, x: torch.Tensor, embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """The network's outputs (N, 1), or (N, classes + 1) with `classes`."""
        if self.form == "embedding":
            if embeddings is None:
                raise RetrievalError("the embedding gate needs the tower's embeddings of the images")
            return self.net(embeddings.float())
        z = ((x - PIXEL_MEAN) / PIXEL_STD).float()
        if self.form == "trunk":
            with torch.no_grad():
                z = self.trunk(z)
            return self.net(z.float())
        return self.net(z)

    def forward(self, x: torch.Tensor, embeddings: torch.Tensor | None = None) -> torch.Tensor:
        out = self.outputs(x, embeddings)
        if not self.classes:
            return out.squeeze(1)
        return torch.logsumexp(out[:, :self.classes], dim=1) - out[:, self.classes]

    def trainable(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("trunk.")]

    def describe(self) -> dict:
        return {"form": self.form, "width": self.width, "embedding_size": self.embedding_size,
                "trunk_features": self.trunk_features, "threshold": self.threshold, "classes": self.classes}


def tower_trunk(tower) -> nn.Module:
    """A frozen copy of the tower's backbone up to its last Linear (the flattened convolution map)."""
    layers = list(tower.backbone)
    if not layers or not isinstance(layers[-1], nn.Linear):
        raise UsageError(f"the trunk gate needs a backbone ending in a Linear layer; tower {tower.arch!r} has none")
    trunk = copy.deepcopy(nn.Sequential(*layers[:-1]))
    for p in trunk.parameters():
        p.requires_grad_(False)
    return trunk.eval()


def build_gate(tower, form: str = "cnn", width: int = 16, threshold: float = DEFAULT_THRESHOLD,
               classes: int = 0) -> DigitGate:
    trunk = tower_trunk(tower) if form == "trunk" else None
    n_features = 64 * 7 * 7
    if trunk is not None:
        with torch.no_grad():
            n_features = int(trunk(torch.zeros(1, 1, 28, 28)).shape[1])
    return DigitGate(form, width, tower.embedding_size, trunk, n_features, threshold, classes)


def gate_from_meta(tower, meta: dict) -> DigitGate:
    """The (untrained) gate a checkpoint sidecar's "gate" entry describes, ready for its weights."""
    form = meta.get("form", "cnn")
    if form not in FORMS:
        raise RetrievalError(f"checkpoint metadata names gate form {form!r}; expected one of: {', '.join(FORMS)}")
    return build_gate(tower, form, int(meta.get("width", 16)), float(meta.get("threshold", DEFAULT_THRESHOLD)),
                      int(meta.get("classes", 0)))


def attach_gate(tower, gate: DigitGate | None):
    """Put `gate` on `tower` as its `gate` submodule (None takes it off); returns the tower."""
    if gate is None:
        if "gate" in tower._modules:
            del tower._modules["gate"]
        return tower
    tower.gate = gate.to(next(tower.parameters()).device)
    return tower


def tower_gate(tower) -> DigitGate | None:
    return tower._modules.get("gate") if hasattr(tower, "_modules") else None


@torch.inference_mode()
def digit_scores(tower, images, embeddings: np.ndarray | None = None, batch_size: int = 1024,
                 device="cpu") -> np.ndarray | None:
    """Digit probabilities (n,) of uint8 (n, 28, 28) images from the tower's gate; None when it has none."""
    gate = tower_gate(tower)
    if gate is None:
        return None
    images = torch.as_tensor(images)
    if images.ndim == 2:
        images = images.unsqueeze(0)
    device = torch.device(device)
    out = []
    with evaluating(gate):
        for s in range(0, len(images), batch_size):
            x = images[s:s + batch_size].to(device).float().div_(255).unsqueeze(1)
            emb = None
            if gate.form == "embedding":
                emb = (torch.as_tensor(embeddings[s:s + batch_size], device=device) if embeddings is not None
                       else tower(x).float())
            out.append(torch.sigmoid(gate(x, emb)).float().cpu())
    if not out:
        return np.zeros(0, np.float32)
    return (out[0] if len(out) == 1 else torch.cat(out)).numpy()


# ---------------------------------------------------------------------------------------------- training


@dataclass
class GateRecipe:
    """How a gate is trained. The augmentation is mnist-robust's (retrieval/configs/mnist-robust.toml): affine,
    then each degradation on `degrade_p` of the images, for digits and non-digits alike."""

    form: str = "cnn"
    width: int = 16
    steps: int = 1500
    batch_size: int = 256
    lr: float = 0.003
    seed: int = 0
    degrade_p: float = 0.3
    accept: float = 0.99  # the threshold answers this share of the selection digits
    classes: int = 0  # 0: one digit-or-not output; 10: an output per digit class and one for "no digit"

    def augmentation(self):
        from retrieval.augment import BatchAugment, Chain, DegradeAugment

        return Chain(BatchAugment(10.0, 0.1, (0.9, 1.1), 10.0, group=8),
                     DegradeAugment(lowres=1.0, blur=1.5, stroke=1.5, noise=0.3, contrast=0.6, p=self.degrade_p,
                                    edges=True, bands=8))


def train_gate(tower, positives: np.ndarray, negatives: np.ndarray, recipe: GateRecipe,
               device="cpu", log_every: int = 250, positive_labels: np.ndarray | None = None) -> DigitGate:
    """A gate for `tower` trained on uint8 (n, 28, 28) digit pictures `positives` against `negatives`; the tower's
    own weights are not touched (it runs in eval mode for the embedding form). A recipe with `classes` needs the
    digits' `positive_labels` (0 .. classes - 1)."""
    from retrieval.seeding import make_generator

    if len(positives) == 0 or len(negatives) == 0:
        raise UsageError("the gate needs both digit and non-digit pictures to train on")
    if recipe.classes and (positive_labels is None or len(positive_labels) != len(positives)):
        raise UsageError("a gate with digit classes needs the label of every digit it trains on")
    device = torch.device(device)
    torch.manual_seed(recipe.seed)
    gate = build_gate(tower, recipe.form, recipe.width, classes=recipe.classes).to(device)
    tower_was = tower.training
    tower.eval()
    params = gate.trainable()
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=recipe.steps, pct_start=0.15)
    aug = recipe.augmentation()
    pos = torch.as_tensor(positives)
    pos_classes = torch.as_tensor(positive_labels).long() if recipe.classes else None
    neg = torch.as_tensor(negatives)
    half = recipe.batch_size // 2
    y = torch.cat([torch.ones(half), torch.zeros(recipe.batch_size - half)]).to(device)
    gate.train()
    if gate.form == "trunk":
        gate.trunk.eval()
    start, seen = time.perf_counter(), 0.0
    try:
        for step in range(recipe.steps):
            g = make_generator(recipe.seed, "gate", step)
            pi = torch.randint(0, len(pos), (half,), generator=g)
            ni = torch.randint(0, len(neg), (recipe.batch_size - half,), generator=g)
            x = torch.cat([pos[pi], neg[ni]]).float().div_(255).unsqueeze(1)
            # shuffle so the affine's groups mix digits and non-digits
            order = torch.randperm(len(x), generator=g)
            x = aug(x[order], g).clamp_(0, 1).to(device)
            emb = None
            if gate.form == "embedding":
                with torch.no_grad():
                    emb = tower(x).float()
            if recipe.classes:
                classes = torch.cat([pos_classes[pi],
                                     torch.full((recipe.batch_size - half,), recipe.classes)])
                loss = F.cross_entropy(gate.outputs(x, emb), classes[order].to(device))
            else:
                loss = F.binary_cross_entropy_with_logits(gate(x, emb), y[order.to(device)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen = 0.98 * seen + 0.02 * float(loss.detach()) if step else float(loss.detach())
            if log_every and (step + 1) % log_every == 0:
                logger.info(f"gate step {step + 1}/{recipe.steps}: loss {seen:.4f} "
                            f"({time.perf_counter() - start:.0f}s)")
    finally:
        tower.train(tower_was)
    gate.eval()
    return gate


def acceptance_threshold(scores: np.ndarray, accept: float) -> float:
    """The digit-score threshold that answers `accept` of `scores` (scores of in-distribution digits)."""
    if not 0 < accept <= 1:
        raise UsageError(f"`accept` must be a share in (0, 1], got {accept}")
    scores = np.sort(np.asarray(scores, np.float64))
    if len(scores) == 0:
        raise RetrievalError("no in-distribution queries to set the gate threshold from")
    k = int(np.floor((1 - accept) * len(scores)))
    return float(scores[min(k, len(scores) - 1)]) if k > 0 else float(np.nextafter(scores[0], -np.inf))


def digit_pictures(meta: dict, root=None, n: int = 20000, seed: int = 0,
                   val_n: int = 2000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positives, their labels, validation digits) for a gate on the tower a checkpoint sidecar `meta` describes: `n` digits
    of its training slice of mnist:train (the same split its trainer made), CANVAS_SHARE of them redrawn as the
    web canvas draws them and PHOTO_SHARE as a phone photo (as the non-digits are, so neither path is a cue),
    and `val_n` clean digits of its validation slice (for the threshold). Images uint8 (n, 28, 28), labels int64."""
    from retrieval.data.corrupt import corrupt
    from retrieval.data.nondigits import CANVAS_SHARE, PHOTO_SHARE
    from retrieval.data.specs import load_dataset
    from retrieval.data.splits import run_split

    ds = load_dataset("mnist:train", root=root)
    train_pos, val_pos = run_split(meta, ds.labels)
    rng = np.random.default_rng([seed, 26])
    pick = np.sort(rng.choice(len(train_pos), size=min(n, len(train_pos)), replace=False))
    rows = train_pos[torch.from_numpy(pick)]
    x, labels = ds.images[rows].numpy().copy(), ds.labels[rows].numpy().astype(np.int64)
    order = rng.permutation(len(x))
    k_canvas, k_photo = int(round(CANVAS_SHARE * len(x))), int(round(PHOTO_SHARE * len(x)))
    c_rows, p_rows = np.sort(order[:k_canvas]), np.sort(order[k_canvas:k_canvas + k_photo])
    for rows, name in ((c_rows, "canvas"), (p_rows, "photo")):
        for s in range(0, len(rows), 2000):
            x[rows[s:s + 2000]] = corrupt(x[rows[s:s + 2000]], name, seed=seed + 100 + s // 2000)
    vpick = np.sort(rng.choice(len(val_pos), size=min(val_n, len(val_pos)), replace=False))
    return x, labels, ds.images[val_pos[torch.from_numpy(vpick)]].numpy()


DIGIT_CLASSES = frozenset("0123456789")


def gate_threshold(index, tower) -> float | None:
    """The digit-score threshold a Searcher applies: the one `calibrate` stored in the index; else the gate's own
    when every class of the index is a digit (an index of the user's own classes, letters say, is not refused as
    "not a digit" unless calibrated so); None for a tower without a gate. Either way the Searcher refuses only
    queries its neighbours answer as a digit (or unknown), never one of the index's classes that is no digit."""
    gate = tower_gate(tower)
    if gate is None:
        return None
    stored = ((index.meta.get("calibration") or {}).get("gate") or {}).get("threshold")
    if stored is not None:
        return float(stored)
    return gate.threshold if set(index.classes) <= DIGIT_CLASSES else None


def separating_threshold(digits: np.ndarray, non_digits: np.ndarray) -> float:
    """The digit-score threshold that answers the most digits minus non-digits (Youden's J), the lowest such."""
    digits, non_digits = np.asarray(digits, np.float64), np.asarray(non_digits, np.float64)
    if len(digits) == 0 or len(non_digits) == 0:
        raise RetrievalError("the gate threshold needs digits and non-digits to separate")
    candidates = np.unique(np.r_[digits, non_digits])
    answered = 1 - np.searchsorted(np.sort(digits), candidates, side="left") / len(digits)
    passed = 1 - np.searchsorted(np.sort(non_digits), candidates, side="left") / len(non_digits)
    return float(candidates[int(np.argmax(answered - passed))])
