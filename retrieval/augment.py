"""Device-side batch augmentation and class expansion, each random draw from the step's seeded generator.

BatchTransform: (x, generator) -> x, a float (N, 1, H, W) batch on its device, the same shape back (BatchAugment's
affine, ElasticAugment's warp); given `rows` (one process's share of a distributed batch) it transforms those rows
exactly as it would inside the whole batch. ClassExpansion: (x, y, generator) -> (x, y), images and labels of new classes made
from the sampled ones (CompositeClasses, DihedralClasses); they act on the sampler's class slots of `group`
consecutive images.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
import torchvision.transforms.v2.functional as TF


class Rows(NamedTuple):
    """Rows [start, stop) of a batch of `total` images: one process's share of a batch in a distributed run. A
    transform given them draws its random numbers for the whole batch (the same draws as one process makes) and
    applies those of these rows, so the shares of all processes together are the single-process result."""

    start: int
    stop: int
    total: int


class BatchTransform(Protocol):
    def __call__(self, x: torch.Tensor, generator: torch.Generator, rows: Rows | None = None) -> torch.Tensor: ...


class ClassExpansion(Protocol):
    def __call__(self, x: torch.Tensor, y: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]: ...


class BatchAugment:
    """Small random affine (rotation, translation, zoom, shear) on a float batch on its device, through
    torchvision.transforms.v2.functional.affine. One random transform per group of `group` images: the v2 kernel
    takes one set of parameters per call, and groups keep the number of calls per batch small."""

    def __init__(self, degrees: float = 10.0, translate: float = 0.1, scale: tuple[float, float] = (0.9, 1.1),
                 shear: float = 0.0, group: int = 8):
        self.degrees, self.translate, self.scale, self.shear, self.group = degrees, translate, tuple(scale), shear, group

    @property
    def enabled(self) -> bool:
        return bool(self.degrees or self.translate or self.shear or self.scale != (1.0, 1.0))

    def __call__(self, x: torch.Tensor, generator: torch.Generator, rows: Rows | None = None) -> torch.Tensor:
        if not self.enabled:
            return x
        start, stop, total = rows if rows is not None else (0, len(x), len(x))
        g = self.group
        u = torch.rand(-(-total // g), 5, generator=generator, dtype=torch.float64).mul_(2).sub_(1).tolist()
        h, w = x.shape[-2:]
        lo, hi = self.scale
        out = []
        for c in range(start // g, -(-stop // g)):  # the groups these rows touch, cut to these rows
            a, tx, ty, s, sh = u[c]
            out.append(TF.affine(
                x[max(c * g, start) - start:min((c + 1) * g, stop) - start],
                angle=a * self.degrees, translate=[tx * self.translate * w, ty * self.translate * h],
                scale=lo + (s + 1) / 2 * (hi - lo), shear=[sh * self.shear, 0.0],
                interpolation=TF.InterpolationMode.BILINEAR,  # uncovered pixels are 0 (background)
            ))
        return torch.cat(out)

    def describe(self) -> dict:
        return {"degrees": self.degrees, "translate": self.translate, "scale": list(self.scale),
                "shear": self.shear, "group": self.group, "kernel": "torchvision.transforms.v2.functional.affine"}


class ElasticAugment:
    """Elastic distortion (Simard et al., 2003): every image is warped by its own smooth random displacement
    field, drawn on a coarse 4x4 grid and upsampled bicubically, moving pixels by at most `pixels` pixels. It
    imitates handwriting's wobble, which affine transforms cannot, and teaches invariances that hold for any
    digit (useful for classes never seen in training)."""

    def __init__(self, pixels: float = 0.0):
        self.pixels = float(pixels)

    def __call__(self, x: torch.Tensor, generator: torch.Generator, rows: Rows | None = None) -> torch.Tensor:
        if not self.pixels:
            return x
        n, _, h, w = x.shape
        start, stop, total = rows if rows is not None else (0, n, n)
        coarse = torch.rand(total, 2, 4, 4, generator=generator)[start:stop].mul_(2).sub_(1).to(x.device)
        field = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)
        field = field.clamp_(-1, 1).permute(0, 2, 3, 1) * torch.tensor([2 * self.pixels / w, 2 * self.pixels / h],
                                                                           device=x.device)
        ys = torch.linspace(-1 + 1 / h, 1 - 1 / h, h, device=x.device)
        xs = torch.linspace(-1 + 1 / w, 1 - 1 / w, w, device=x.device)
        identity = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (h, w, 2) as (x, y)
        return torch.nn.functional.grid_sample(x, identity + field, mode="bilinear", padding_mode="zeros",
                                               align_corners=False)


class DegradeAugment:
    """What scans, photos and drawing tools do to a digit, on a float batch on its device (issue 15): each image
    independently, with probability `p` for each kind, gets its stroke width changed (thinner by up to 1 px or
    thicker by up to `stroke` px), its resolution lost (area-downsampled to 7..14 px and upscaled bilinearly),
    a Gaussian blur (sigma up to `blur` px), its contrast changed (background lifted by up to `contrast` with a
    linear gradient across the image, ink dimmed by up to `contrast` / 2) and noise added (Gaussian with std up to
    `noise`, salt and pepper on up to 0.6 * `noise` of the pixels), in that order; 0 turns a kind off. All draws
    are made for the whole batch from the step's generator (then cut to `rows`), so runs are reproducible."""

    DRAWS = 16

    def __init__(self, lowres: float = 0.0, blur: float = 0.0, stroke: float = 0.0, noise: float = 0.0,
                 contrast: float = 0.0, p: float = 0.5):
        self.lowres, self.blur, self.stroke = float(lowres), float(blur), float(stroke)
        self.noise, self.contrast, self.p = float(noise), float(contrast), float(p)

    @property
    def enabled(self) -> bool:
        return bool(self.lowres or self.blur or self.stroke or self.noise or self.contrast)

    def describe(self) -> dict:
        return {"lowres": self.lowres, "blur": self.blur, "stroke": self.stroke, "noise": self.noise,
                "contrast": self.contrast, "p": self.p}

    def __call__(self, x: torch.Tensor, generator: torch.Generator, rows: Rows | None = None) -> torch.Tensor:
        if not self.enabled:
            return x
        n, _, h, w = x.shape
        start, stop, total = rows if rows is not None else (0, n, n)
        u = torch.rand(total, self.DRAWS, generator=generator)[start:stop].to(x.device)
        on = u[:, :5] < self.p  # stroke, lowres, blur, contrast, noise
        pix = torch.rand(total, 2, h, w, generator=generator)[start:stop].to(x.device) if self.noise else None
        gauss = torch.randn(total, 1, h, w, generator=generator)[start:stop].to(x.device) if self.noise else None
        if self.stroke:
            x = self._only(self._stroke, x, on[:, 0], u[:, 5])
        if self.lowres:
            x = self._lowres(x, on[:, 1], u[:, 6])
        if self.blur:
            x = self._only(self._blur, x, on[:, 2], u[:, 7])
        if self.contrast:
            x = self._contrast(x, on[:, 3], u[:, 8:12])
        if self.noise:
            std = (u[:, 12] * self.noise * on[:, 4]).view(-1, 1, 1, 1)
            frac = (u[:, 13] * 0.6 * self.noise * on[:, 4]).view(-1, 1, 1, 1)
            x = (x + std * gauss).clamp_(0, 1)
            hit = pix[:, :1] < frac
            x = torch.where(hit, (pix[:, 1:] < 0.5).to(x.dtype), x)
        return x

    @staticmethod
    def _only(op, x, on, u):
        """op on the images it is drawn for (each image's result depends on that image alone), the others kept."""
        rows = torch.nonzero(on).flatten()
        if len(rows) == 0:
            return x
        out = x.clone()
        out[rows] = op(x[rows], on[rows], u[rows])
        return out

    def _stroke(self, x, on, u):
        # amount in [-1, stroke] px: thinner (erosion at twice the resolution, 0.5 px a side) or thicker (3x3 grey
        # dilations, one per pixel), fractional amounts blended linearly
        amount = (u * (self.stroke + 1.0) - 1.0) * on
        pool = torch.nn.functional.max_pool2d
        h, w = x.shape[-2:]
        up = torch.nn.functional.interpolate(x, size=(2 * h, 2 * w), mode="bilinear", align_corners=False)
        thin = torch.nn.functional.avg_pool2d(-pool(-up, 3, 1, 1), 2)
        peak = x.amax(dim=(-2, -1), keepdim=True)
        thin = thin * (peak / thin.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-6))
        out = x + amount.clamp(max=0).abs().view(-1, 1, 1, 1) * (thin - x)
        grown, level = x, 0
        while level < self.stroke:
            nxt = pool(grown, 3, 1, 1)
            frac = (amount - level).clamp(0, 1).view(-1, 1, 1, 1)
            out = torch.where((amount > level).view(-1, 1, 1, 1), grown + frac * (nxt - grown), out)
            grown, level = nxt, level + 1
        return out

    def _lowres(self, x, on, u):
        h, w = x.shape[-2:]
        sizes = (7 + (u * 8).floor().clamp(max=7)).long()  # 7..14 px
        out = x.clone()
        for s in sizes[on].unique().tolist():
            pick = torch.nonzero(on & (sizes == s)).flatten()
            small = torch.nn.functional.adaptive_avg_pool2d(x[pick], s)
            out[pick] = torch.nn.functional.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
        return out

    def _blur(self, x, on, u):
        sigma = (0.3 + u * (self.blur - 0.3)).clamp_min(0.3)
        radius = max(1, int(2 * self.blur + 0.999))
        t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
        k = torch.exp(-t.view(1, -1) ** 2 / (2 * sigma.view(-1, 1) ** 2))
        k = k / k.sum(dim=1, keepdim=True)
        n = len(x)
        y = x.transpose(0, 1)  # (1, N, H, W): one group per image
        y = torch.nn.functional.conv2d(y, k.view(n, 1, 1, -1), padding=(0, radius), groups=n)
        y = torch.nn.functional.conv2d(y, k.view(n, 1, -1, 1), padding=(radius, 0), groups=n).transpose(0, 1)
        return torch.where(on.view(-1, 1, 1, 1), y, x)

    def _contrast(self, x, on, u):
        h, w = x.shape[-2:]
        lift = u[:, 0] * self.contrast
        dim = u[:, 1] * self.contrast / 2
        angle = u[:, 2] * 2 * torch.pi
        slope = u[:, 3] * self.contrast / 2
        ys = torch.linspace(-0.5, 0.5, h, device=x.device).view(1, h, 1)
        xs = torch.linspace(-0.5, 0.5, w, device=x.device).view(1, 1, w)
        ramp = torch.cos(angle).view(-1, 1, 1) * xs + torch.sin(angle).view(-1, 1, 1) * ys
        background = (lift.view(-1, 1, 1) + slope.view(-1, 1, 1) * ramp).clamp(0, 0.8).unsqueeze(1)
        ink = (1 - dim).view(-1, 1, 1, 1)
        y = (background + (ink - background).clamp_min(0.15) * x).clamp(0, 1)
        return torch.where(on.view(-1, 1, 1, 1), y, x)


class Chain:
    """BatchTransforms applied one after the other (each drawing from the same generator, in order)."""

    def __init__(self, *transforms: BatchTransform):
        self.transforms = [t for t in transforms if t is not None]

    def __call__(self, x: torch.Tensor, generator: torch.Generator, rows: Rows | None = None) -> torch.Tensor:
        for t in self.transforms:
            x = t(x, generator) if rows is None else t(x, generator, rows)
        return x


class CompositeClasses:
    """Class expansion by composition: with probability `p`, the `group` images of a class slot (class a) are
    cut in half, top/bottom or left/right, and completed by the other halves of another slot's images
    (class b); the triple (a, b, cut) counts as a class of its own, num_classes + (cut * num_classes + a) *
    num_classes + b. Six digits give 60 such classes of strokes in new arrangements (the top of a 9 on the
    bottom of a 6 is a double loop no training digit has): more to tell apart, so features carry over better
    to classes never seen. Halves of two slots of the same class keep that class's label."""

    CUTS = ("top/bottom", "left/right")

    def __init__(self, p: float, num_classes: int, group: int = 1):
        self.p, self.num_classes, self.group = float(p), int(num_classes), max(1, int(group))

    def __call__(self, x: torch.Tensor, y: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        m, n_groups = self.group, len(x) // self.group
        if not self.p or n_groups < 2:
            return x, y
        chosen = torch.rand(n_groups, generator=generator) < self.p
        partner = torch.randint(0, n_groups - 1, (n_groups,), generator=generator)
        partner += partner >= torch.arange(n_groups)  # any slot but itself
        cut = torch.randint(0, len(self.CUTS), (n_groups,), generator=generator)
        chosen, partner, cut = chosen.to(x.device), partner.to(x.device), cut.to(x.device)
        n = n_groups * m
        xg, yg = x[:n].unflatten(0, (n_groups, m)), y[:n].view(n_groups, m)
        h, w = x.shape[-2:]
        lower = (torch.arange(h, device=x.device) >= h // 2).view(h, 1).expand(h, w)
        right = (torch.arange(w, device=x.device) >= w // 2).view(1, w).expand(h, w)
        from_partner = torch.where(cut.view(-1, 1, 1) == 0, lower, right) & chosen.view(-1, 1, 1)  # (G, H, W)
        out = torch.where(from_partner[:, None, None], xg[partner], xg).flatten(0, 1)
        a, b, k = yg[:, 0], yg[partner, 0], self.num_classes
        relabel = chosen & (a != b)
        labels = torch.where(relabel.view(-1, 1), (k + (cut * k + a) * k + b).view(-1, 1), yg).flatten()
        return torch.cat([out, x[n:]]), torch.cat([labels, y[n:]])


class DihedralClasses:
    """Class expansion: each group of `group` consecutive images (one class slot of the m-per-class sampler)
    is turned by one of the 8 symmetries of the square (rotation by 0, 90, 180 or 270 degrees, mirrored or not)
    and the pair (class, symmetry) counts as a class of its own, label * 8 + symmetry. Six digits become 48
    classes of strokes in new arrangements: features learnt to tell those apart carry over to classes never
    seen (as rotated classes do for Omniglot in Prototypical Networks)."""

    def __init__(self, group: int = 1):
        self.group = max(1, int(group))

    def __call__(self, x: torch.Tensor, y: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        n_groups = -(-len(x) // self.group)
        sym = torch.randint(0, 8, (n_groups,), generator=generator).repeat_interleave(self.group)[: len(x)]
        sym = sym.to(x.device)
        out = x.clone()
        for s in range(8):
            rows = torch.nonzero(sym == s).flatten()
            if len(rows):
                out[rows] = self.apply(x[rows], s)
        return out, y * 8 + sym

    @staticmethod
    def apply(x: torch.Tensor, symmetry: int) -> torch.Tensor:
        """Symmetry s of the square on (..., H, W) images: mirror left-right when s >= 4, then rotate by
        (s mod 4) quarter turns counter-clockwise."""
        if symmetry >= 4:
            x = torch.flip(x, dims=(-1,))
        return torch.rot90(x, symmetry % 4, dims=(-2, -1)) if symmetry % 4 else x


def build_class_expansions(composite_classes: float, dihedral_classes: bool, num_classes: int,
                           group: int) -> list[ClassExpansion]:
    """augment.composite_classes, then augment.dihedral_classes (the symmetries turn composites as well)."""
    out: list[ClassExpansion] = []
    if composite_classes:
        out.append(CompositeClasses(composite_classes, num_classes, group))
    if dihedral_classes:
        out.append(DihedralClasses(group))
    return out
