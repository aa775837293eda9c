"""Device-side batch augmentation and class expansion, each random draw from the step's seeded generator.

BatchTransform: (x, generator) -> x, a float (N, 1, H, W) batch on its device, the same shape back (BatchAugment's
affine, ElasticAugment's warp); given `rows` (one process's share of a distributed batch) it transforms those rows
exactly as it would inside the whole batch. ClassExpansion: (x, y, generator) -> (x, y), images and labels of new classes made
from the sampled ones (CompositeClasses, DihedralClasses); they act on the sampler's class slots of `group`
consecutive images.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    """What scans, photos and drawing tools do to a digit, on a float batch on its device: each image
    independently, with probability `p` for each kind, is replaced by its outline (`edges`: Canny's edges or a
    1 px contour of its ink, as edge detectors and outline fonts draw a digit), gets its stroke width
    changed (thinner by up to 1 px or thicker by up to `stroke` px), its resolution lost (area-downsampled to
    7..14 px and upscaled bilinearly), a Gaussian blur (sigma up to `blur` px), its contrast changed (background
    lifted by up to `contrast` with a linear gradient across the image, ink dimmed by up to `contrast` / 2), bands
    at two opposite sides inverted (`bands`: each up to that many pixels wide, columns or rows, as a scanner's
    dark margins or a photo's shadowed edges) and noise added (Gaussian with std up to `noise`, salt and pepper on
    up to 0.6 * `noise` of the pixels), in that order; 0 turns a kind off. All draws are made for the whole batch
    from the step's generator (then cut to `rows`), so runs are reproducible; edges and bands draw after the
    others, so a recipe without them draws the same images whether or not they exist."""

    DRAWS = 16

    def __init__(self, lowres: float = 0.0, blur: float = 0.0, stroke: float = 0.0, noise: float = 0.0,
                 contrast: float = 0.0, p: float = 0.5, edges: bool = False, bands: float = 0.0):
        self.lowres, self.blur, self.stroke = float(lowres), float(blur), float(stroke)
        self.noise, self.contrast, self.p = float(noise), float(contrast), float(p)
        self.edges, self.bands = bool(edges), float(bands)

    @property
    def enabled(self) -> bool:
        return bool(self.lowres or self.blur or self.stroke or self.noise or self.contrast or self.edges
                    or self.bands)

    def describe(self) -> dict:
        return {"lowres": self.lowres, "blur": self.blur, "stroke": self.stroke, "noise": self.noise,
                "contrast": self.contrast, "p": self.p,
                **({"edges": self.edges} if self.edges else {}), **({"bands": self.bands} if self.bands else {})}

    def __call__(self, x: torch.Tensor, generator: torch.Generator, rows: Rows | None = None) -> torch.Tensor:
        if not self.enabled:
            return x
        n, _, h, w = x.shape
        start, stop, total = rows if rows is not None else (0, n, n)
        u = torch.rand(total, self.DRAWS, generator=generator)[start:stop].to(x.device)
        on = u[:, :5] < self.p  # stroke, lowres, blur, contrast, noise
        pix = torch.rand(total, 2, h, w, generator=generator)[start:stop].to(x.device) if self.noise else None
        gauss = torch.randn(total, 1, h, w, generator=generator)[start:stop].to(x.device) if self.noise else None
        more = torch.rand(total, 6, generator=generator)[start:stop].to(x.device) if self.edges or self.bands else None
        if self.edges:
            x = self._only(self._edges, x, more[:, 0] < self.p, more[:, 1])
        if self.stroke:
            x = self._only(self._stroke, x, on[:, 0], u[:, 5])
        if self.lowres:
            x = self._lowres(x, on[:, 1], u[:, 6])
        if self.blur:
            x = self._only(self._blur, x, on[:, 2], u[:, 7])
        if self.contrast:
            x = self._contrast(x, on[:, 3], u[:, 8:12])
        if self.bands:
            x = self._bands(x, more[:, 2] < self.p, more[:, 3], more[:, 4:6])
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

    @staticmethod
    def _edges(x, on, u):
        # as an edge detector draws a digit: half the images (draw < 0.5) get Canny's edges (Gaussian sigma 1,
        # Sobel, non-maximum suppression across the edge, hysteresis with a low threshold of 0.05..0.3 of full
        # scale and a high one twice that, grown 3 px along weak edges); the others the 1 px contour of the ink
        # (x > 0.3..0.6) just outside it, just inside it or both
        canny = DegradeAugment._canny(x, (0.05 + 0.5 * u).clamp(max=0.3))
        v = (u * 2 - 1).clamp(0, 1)  # the contour's own draw, from the upper half
        pool = torch.nn.functional.max_pool2d
        part = (v * 3).floor().clamp(max=2).view(-1, 1, 1, 1)
        ink = (x > (0.3 + 0.3 * (v * 3 - part.flatten())).view(-1, 1, 1, 1)).to(x.dtype)
        outer = pool(ink, 3, 1, 1) - ink
        inner = ink + pool(-ink, 3, 1, 1)
        contour = torch.where(part == 0, outer, torch.where(part == 1, inner, (outer + inner).clamp(max=1)))
        return torch.where((u < 0.5).view(-1, 1, 1, 1), canny, contour)

    @staticmethod
    def _canny(x, low):
        f = torch.nn.functional
        t = torch.arange(-4, 5, device=x.device, dtype=x.dtype)
        k = torch.exp(-t ** 2 / 2)
        k = k / k.sum()
        s = f.conv2d(f.conv2d(x, k.view(1, 1, 1, -1), padding=(0, 4)), k.view(1, 1, -1, 1), padding=(4, 0))
        d = torch.tensor([-1.0, 0.0, 1.0], device=x.device, dtype=x.dtype)
        b = torch.tensor([1.0, 2.0, 1.0], device=x.device, dtype=x.dtype)
        gx = f.conv2d(s, (b.view(3, 1) * d.view(1, 3)).view(1, 1, 3, 3), padding=1)
        gy = f.conv2d(s, (d.view(3, 1) * b.view(1, 3)).view(1, 1, 3, 3), padding=1)
        mag = torch.hypot(gx, gy)
        angle = torch.rad2deg(torch.atan2(gy, gx)) % 180
        sector = torch.bucketize(angle, torch.tensor([22.5, 67.5, 112.5, 157.5], device=x.device)) % 4
        pad = f.pad(mag, (1, 1, 1, 1))
        h, w = x.shape[-2:]
        keep = torch.zeros_like(mag, dtype=torch.bool)
        for sec, (dy, dx) in enumerate(((0, 1), (1, 1), (1, 0), (1, -1))):
            a = pad[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
            b2 = pad[..., 1 - dy:1 - dy + h, 1 - dx:1 - dx + w]
            keep |= (sector == sec) & (mag >= a) & (mag >= b2)
        low = low.view(-1, 1, 1, 1)
        weak = keep & (mag >= low)
        edges = keep & (mag >= 2 * low)
        for _ in range(3):  # hysteresis: weak edge pixels touching a strong one, a few pixels far
            edges = weak & (f.max_pool2d(edges.to(x.dtype), 3, 1, 1) > 0)
        return edges.to(x.dtype)

    def _bands(self, x, on, u_axis, widths):
        # two opposite bands (left and right columns, or top and bottom rows), each 1..bands px wide, inverted
        n, _, h, w = x.shape
        columns = (u_axis < 0.5).view(-1, 1, 1)
        pos = torch.where(columns, torch.arange(w, device=x.device).view(1, 1, w).expand(n, h, w),
                          torch.arange(h, device=x.device).view(1, h, 1).expand(n, h, w))
        size = torch.where(columns, w, h)
        lo, hi = (1 + (widths * self.bands).floor().long()).unbind(1)
        band = (pos < lo.view(-1, 1, 1)) | (pos >= size - hi.view(-1, 1, 1))
        return torch.where((band & on.view(-1, 1, 1)).unsqueeze(1), 1 - x, x)

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


NON_DIGIT_LABEL = -1  # the one class all synthetic non-digits share (no dataset label is negative)


def draw_non_digits(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """n synthetic images that are not digits, (n, 1, size, size) float in [0, 1], bright ink on black and framed
    as the query preprocessing frames marks (largest side 20/28 of the image, centred): random pen scribbles
    (random walks of 4-11 points), ellipse, rectangle and triangle outlines, crossing straight lines, speckle
    and noise pages, and blank pages, one kind per image, in equal shares. Strokes are 1-3 px wide and drawn
    anti-aliased from their distance to each segment. All draws come from `generator` (CPU)."""
    g, k_max = generator, 24
    kind = torch.randint(0, 7, (n,), generator=g)
    walk = torch.cumsum(torch.randn(n, k_max, 2, generator=g), dim=1)
    walk_len = torch.randint(4, 12, (n,), generator=g)
    angle = torch.rand(n, 1, generator=g) * 2 * torch.pi
    aspect = 0.3 + 0.7 * torch.rand(n, 1, generator=g)
    corners = torch.randint(3, 5, (n,), generator=g)  # triangle or rectangle
    crossing = torch.rand(n, k_max, 2, generator=g)
    crossing_len = torch.randint(2, 5, (n,), generator=g)
    width = 0.5 + torch.rand(n, generator=g)  # half-width in px
    density = torch.rand(n, 1, 1, generator=g)
    page = torch.rand(n, size, size, generator=g)
    level = torch.rand(n, 1, 1, generator=g)

    t = torch.arange(k_max + 1, dtype=torch.float32)
    points = torch.zeros(n, k_max + 1, 2)
    used = torch.zeros(n, k_max, dtype=torch.bool)  # which segments (point i -> i + 1) are drawn
    for i in range(n):
        k = int(kind[i])
        if k == 0:  # scribble
            m = int(walk_len[i])
            points[i, :m] = walk[i, :m]
            used[i, :m - 1] = True
        elif k in (1, 2):  # ellipse (24 segments) or polygon, rotated, closed
            m = k_max if k == 1 else int(corners[i])
            phase = t[:m + 1] * 2 * torch.pi / m + (torch.pi / 4 if m == 4 else torch.pi / 2)
            xy = torch.stack([phase.cos(), phase.sin() * aspect[i]], dim=1)
            c, s_ = angle[i].cos(), angle[i].sin()
            points[i, :m + 1] = xy @ torch.stack([torch.cat([c, -s_]), torch.cat([s_, c])]).T
            used[i, :m] = True
        elif k == 3:  # crossing straight lines: pairs of points, every other segment drawn
            m = 2 * int(crossing_len[i])
            points[i, :m] = crossing[i, :m]
            used[i, 0:m - 1:2] = True
    # frame every drawing like the query preprocessing: largest side to 20 px, centred
    lo = torch.where(used.any(1).view(-1, 1), points.masked_fill(~_point_mask(used), float("inf")).amin(1), 0)
    hi = torch.where(used.any(1).view(-1, 1), points.masked_fill(~_point_mask(used), -float("inf")).amax(1), 1)
    scale = (20 / 28) * size / (hi - lo).amax(1, keepdim=True).clamp_min(1e-3)
    points = (points - (lo + hi).unsqueeze(1) / 2) * scale.unsqueeze(1) + size / 2
    centres = torch.arange(size, dtype=torch.float32) + 0.5
    grid = torch.stack(torch.meshgrid(centres, centres, indexing="xy"), -1).view(1, 1, -1, 2)
    a, b = points[:, :-1].unsqueeze(2), points[:, 1:].unsqueeze(2)
    ab = b - a
    along = (((grid - a) * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-6)).clamp(0, 1)
    dist = (grid - (a + along.unsqueeze(-1) * ab)).norm(dim=-1).masked_fill(~used.unsqueeze(-1), float("inf"))
    ink = (width.view(-1, 1) + 0.5 - dist.amin(1)).clamp(0, 1).view(n, size, size)
    specks = (page < 0.3 * density).float()  # kind 4
    noise = page * (0.3 + 0.7 * density)  # kind 5
    blank = torch.zeros_like(page)  # kind 6, or a faint uniform level
    blank = torch.where(level < 0.5, blank, 0.1 * level)
    pages = torch.where((kind == 4).view(-1, 1, 1), specks, torch.where((kind == 5).view(-1, 1, 1), noise, blank))
    out = torch.where((kind <= 3).view(-1, 1, 1), ink, pages)
    return out.unsqueeze(1)


def _point_mask(used: torch.Tensor) -> torch.Tensor:
    """(n, k + 1, 1): the points that end or start a drawn segment."""
    pts = torch.zeros(used.shape[0], used.shape[1] + 1, dtype=torch.bool)
    pts[:, :-1] |= used
    pts[:, 1:] |= used
    return pts.unsqueeze(-1)


class NonDigitExposure:
    """Outlier exposure (Hendrycks et al., 2019) with synthetic non-digits: the last `slots` class slots of each
    batch (`group` images each; the sampler orders slots at random) are replaced by draw_non_digits images that
    share one label, NON_DIGIT_LABEL. A pair-based loss then pulls them into one cluster of their own and
    pushes every digit away from it, so marks that are not digits land far from every indexed digit and a
    distance threshold (calibrate) answers them `unknown`. The images then go through the batch's augmentation
    like any other.

    Near misses made from the batch's own digits can share the slots (equal shares with the synthetic ones):
    left-right mirror images of the classes in `mirror_labels` (a mirrored 3 is no digit) and `overlays`, two
    digits of different classes drawn over each other. They carry the digits' own handwriting, so the tower
    has to tell digits from other marks by shape rather than by pen style."""

    def __init__(self, slots: int, group: int, mirror_labels: Sequence[int] = (), overlays: bool = False):
        self.slots, self.group = int(slots), max(1, int(group))
        self.mirror_labels = torch.tensor(sorted(set(int(v) for v in mirror_labels)), dtype=torch.long)
        self.overlays = bool(overlays)

    def __call__(self, x: torch.Tensor, y: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        n = min(len(x), self.slots * self.group)
        if n == 0:
            return x, y
        keep = len(x) - n
        fake = draw_non_digits(n, x.shape[-1], generator).to(x.device, x.dtype)
        kinds = ["synthetic"] + ["mirror"] * bool(len(self.mirror_labels)) + ["overlay"] * self.overlays
        if len(kinds) > 1 and keep:
            source = torch.randint(0, len(kinds), (n,), generator=generator)
            u = torch.rand(n, 2, generator=generator)
            labels = y[:keep].cpu()
            mirrorable = torch.nonzero(torch.isin(labels, self.mirror_labels)).flatten()
            for i in range(n):
                kind = kinds[int(source[i])]
                if kind == "mirror" and len(mirrorable):
                    row = int(mirrorable[int(u[i, 0] * len(mirrorable))])
                    fake[i] = torch.flip(x[row], dims=(-1,))
                elif kind == "overlay":
                    a = int(u[i, 0] * keep)
                    others = torch.nonzero(labels != labels[a]).flatten()
                    if len(others):
                        fake[i] = torch.maximum(x[a], x[int(others[int(u[i, 1] * len(others))])])
        return (torch.cat([x[:keep], fake]),
                torch.cat([y[:keep], torch.full((n,), NON_DIGIT_LABEL, dtype=y.dtype, device=y.device)]))


def build_class_expansions(composite_classes: float, dihedral_classes: bool, num_classes: int,
                           group: int, non_digit_slots: int = 0, non_digit_mirrors: Sequence[int] = (),
                           non_digit_overlays: bool = False) -> list[ClassExpansion]:
    """augment.composite_classes, then augment.dihedral_classes (the symmetries turn composites as well), then
    augment.non_digit_slots (outlier exposure)."""
    out: list[ClassExpansion] = []
    if composite_classes:
        out.append(CompositeClasses(composite_classes, num_classes, group))
    if dihedral_classes:
        out.append(DihedralClasses(group))
    if non_digit_slots:
        out.append(NonDigitExposure(non_digit_slots, group, non_digit_mirrors, non_digit_overlays))
    return out
