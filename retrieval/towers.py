"""Towers: one shared-weight network mapping a 28x28 image to an L2-normalised embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from retrieval.errors import UsageError

# MNIST pixel statistics; the tower normalises its own input so callers pass images scaled to [0, 1].
PIXEL_MEAN, PIXEL_STD = 0.1307, 0.3081
# The most rows (images x shifted views) that go through the backbone in one pass of the shift-averaged
# embedding: a service's micro-batch; an embedding batch (256 on a CPU) takes one view at a time, as before, since
# passes of a thousand rows and more run slower per image there (benchmarks/README.md).
VIEW_ROWS = 512


def deskew(x: torch.Tensor) -> torch.Tensor:
    """Undo each image's slant: shear it horizontally about its centre of mass so that its ink's second moments
    have no x-y covariance (the classic MNIST normalisation; x: float (N, 1, H, W) of non-negative ink)."""
    n, _, h, w = x.shape
    ys = torch.arange(h, dtype=x.dtype, device=x.device).view(1, h, 1)
    xs = torch.arange(w, dtype=x.dtype, device=x.device).view(1, 1, w)
    ink = x[:, 0]
    mass = ink.sum((1, 2)).clamp_min(1e-6)
    cy = (ink * ys).sum((1, 2)) / mass
    cx = (ink * xs).sum((1, 2)) / mass
    dy, dx = ys - cy.view(n, 1, 1), xs - cx.view(n, 1, 1)
    slant = (ink * dy * dx).sum((1, 2)) / (ink * dy * dy).sum((1, 2)).clamp_min(1e-6)
    # output pixel (y, x) reads the input at (y, x + slant * (y - cy)); grid_sample wants [-1, 1] pixel centres
    src_x = (xs + slant.view(n, 1, 1) * dy + 0.5) * (2.0 / w) - 1.0
    src_y = ((ys + 0.5) * (2.0 / h) - 1.0).expand(n, h, w)
    grid = torch.stack([src_x.expand(n, h, w), src_y], dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class Tower(nn.Module):
    """Backbone + L2 normalisation. Records its architecture name, embedding size and input normalisation for
    compatibility checks.

    deskew: in eval mode (embedding, indexing, querying, validation) each input is deskewed first; training
    still sees the raw slants. Slant is how a writer holds the pen, not which character it is: taking it out
    at inference puts a query and the few examples of its class closer, while the raw slants in training are
    real variety the network learns to absorb (benchmarks/README.md compares deskewing at inference only, in
    training as well, and never).

    test_shifts: in eval mode the embedding is the mean over the image shifted by up to r pixels each way,
    (2r+1)^2 views (r=1: 9x the embedding work; its effect on few-shot accuracy is in benchmarks/README.md).
    """

    def __init__(self, arch: str, backbone: nn.Module, embedding_size: int, deskew: bool = False,
                 test_shifts: int = 0):
        super().__init__()
        self.arch = arch
        self.embedding_size = embedding_size
        self.deskew = bool(deskew)
        self.test_shifts = int(test_shifts)
        self.backbone = backbone

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone((x - PIXEL_MEAN) / PIXEL_STD).float(), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: float (N, 1, 28, 28) in [0, 1] -> (N, embedding_size), unit L2 norm."""
        if self.training:
            return self._embed(x)
        if self.deskew:
            x = deskew(x.float()).contiguous(memory_format=torch.channels_last)
        if not self.test_shifts:
            return self._embed(x)
        return self._shift_averaged(x)

    def _shift_averaged(self, x: torch.Tensor) -> torch.Tensor:
        """Test-time augmentation: the mean embedding of the image shifted by up to r pixels each way. The border
        is repeated rather than zero-filled: on a grey or hazy background a black strip would be a mark of its own
        (identical for black backgrounds). A few images (up to VIEW_ROWS rows of views) go through in one pass, all
        their views together (a lone query: one pass instead of nine); a batch one view at a time. The views are
        summed in the same order either way, and a pass embeds each image on its own: the same embeddings."""
        r, (h, w) = self.test_shifts, x.shape[-2:]
        padded = F.pad(x, (r, r, r, r), mode="replicate")
        views = [padded[..., r + dy:r + dy + h, r + dx:r + dx + w] for dy in range(-r, r + 1) for dx in range(-r, r + 1)]
        if len(x) * len(views) <= VIEW_ROWS and not torch.jit.is_tracing():  # (a traced graph keeps the batch's size)
            embedded = self._embed(torch.cat(views).contiguous(memory_format=torch.channels_last))
            embedded = embedded.unflatten(0, (len(views), -1))
        else:
            embedded = [self._embed(view.contiguous(memory_format=torch.channels_last)) for view in views]
        total = embedded[0]
        for view in embedded[1:]:
            total = total + view
        return F.normalize(total, dim=1)

    def describe(self) -> dict:
        return {"tower": self.arch, "embedding_size": self.embedding_size, "deskew": self.deskew,
                "test_shifts": self.test_shifts}


def seed_backbone() -> nn.Module:
    """The classic tower of the original Siamese MNIST write-up, layer for layer (512-d output)."""
    return nn.Sequential(
        nn.Conv2d(1, 64, 7), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 5), nn.ReLU(inplace=True),
        nn.Conv2d(128, 256, 5), nn.ReLU(inplace=True),
        nn.Flatten(), nn.Linear(2304, 512), nn.ReLU(inplace=True),
    )


def _conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def default_backbone(embedding_size: int) -> nn.Module:
    """A small batch-norm CNN built for CPU speed: strided convolutions instead of pooling and no 28x28 feature
    maps (the stem goes straight to 14x14), so memory-bound work stays small; the flattened 7x7 map keeps where
    strokes are, which matters for digits. About 3.1M multiply-adds per image (the PML example network: 12M)."""
    return nn.Sequential(
        *_conv_bn(1, 32, kernel=5, stride=2),  # 28 -> 14
        *_conv_bn(32, 64, stride=2),  # 14 -> 7
        *_conv_bn(64, 64),  # 7 -> 7
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, embedding_size),
    )


def hires_backbone(embedding_size: int) -> nn.Module:
    """The default backbone with a full-resolution stem: a stride-1 5x5 convolution on the 28x28 image before
    two strided steps down to 7x7: finer stroke detail for more compute (its training time and few-shot accuracy
    against the default's are in benchmarks/README.md)."""
    return nn.Sequential(
        *_conv_bn(1, 32, kernel=5),  # 28 -> 28
        *_conv_bn(32, 64, stride=2),  # 28 -> 14
        *_conv_bn(64, 64, stride=2),  # 14 -> 7
        *_conv_bn(64, 64),  # 7 -> 7
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, embedding_size),
    )


BACKBONES = {"default": default_backbone, "hires": hires_backbone}
TOWERS = ("seed", *BACKBONES)


def build_tower(name: str, embedding_size: int | None = None, deskew: bool = False, test_shifts: int = 0) -> Tower:
    """A tower by name, its convolution weights channels-last: oneDNN (CPU, fp32 and bf16) and cuDNN convolve
    fastest in that layout (benchmarks/README.md, "Precision"); loading weights into it keeps the layout."""
    if name == "seed":
        if embedding_size not in (None, 512):
            raise UsageError(f"tower 'seed' has a fixed 512-d embedding, got embedding_size={embedding_size}")
        tower = Tower("seed", seed_backbone(), 512, deskew, test_shifts)
    elif name in BACKBONES:
        size = 64 if embedding_size is None else int(embedding_size)
        if size <= 0:
            raise UsageError(f"embedding_size must be positive, got {size}")
        tower = Tower(name, BACKBONES[name](size), size, deskew, test_shifts)
    else:
        raise UsageError(f"unknown tower {name!r}; expected one of: {', '.join(TOWERS)}")
    return tower.to(memory_format=torch.channels_last)
