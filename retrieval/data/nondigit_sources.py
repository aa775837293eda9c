"""Where the gate's non-digit marks come from, and which characters may be one (retrieval.data.nondigits makes
the sets): Hershey's stroke fonts, KanjiVG's stroke files, Debian's handwriting fonts and Animal-MNIST's
silhouettes; Debian packages must be installed, PyPI wheels are fetched into DATA_ROOT/nondigits/wheels/ and checked
by their pinned SHA-256.

No digit of any script is ever a negative: characters with a Unicode numeric value are left out, and so are
LOOK_ALIKES (written like a digit) and TINY marks.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrieval.data.svg_paths import svg_outlines, svg_path_points  # noqa: F401  (re-exported: nondigits)
from retrieval.errors import RetrievalError

logger = logging.getLogger(__name__)

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
HANDTEX = Wheel("handtex==1.0.5", "633e55a28f0242c0d7fd216d67baf4aa1d0b6afcc384cb6cac4ee40575a24989")
ANIMAL_MNIST = Wheel("animal-mnist==0.4", "aeebf3d9de4552d6fd2d5701424e1a5b9020f8e5115d68df9db252f2f53ce2ce")


def is_digit_char(ch: str) -> bool:
    """True for any character with a numeric value in any script (0-9, ٣, ३, ๓, 三, 十, 百, Ⅻ, ½, ...)."""
    return unicodedata.numeric(ch, None) is not None or unicodedata.category(ch).startswith("N")


def allowed_char(ch: str) -> bool:
    """A character the gate may be trained to refuse: no digit, no look-alike, no tiny mark, a visible glyph."""
    return (len(ch) == 1 and not is_digit_char(ch) and ch not in LOOK_ALIKES and ch not in TINY
            and unicodedata.category(ch)[0] in "LPS")



# ---------------------------------------------------------------------------------------------- fetching


def fetch_wheel(wheel: Wheel, root: Path) -> Path:
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


@functools.lru_cache(maxsize=4)
def _kanjivg_wheel(root: str) -> Path:
    return fetch_wheel(KANJIVG, Path(root))  # checked once per process


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


def kanjivg_part(root: Path, part: str) -> list[tuple[str, str]]:
    keep = 0 if part == "train" else 1  # by code point: every other character
    return [(ch, name) for ch, name in kanjivg_files(str(root)) if ord(ch) % 2 == keep]


# ---------------------------------------------------------------------------------------------- LaTeX symbols

# LaTeX symbols written like a digit, by their command's name: circles, circled operators and ellipses (0), bars,
# brackets, slashes, primes and the letters of LOOK_ALIKES (1, 0, 6, 8 ...), and the few that hold a digit
# (fractions, superiors, a crossed two). Matched anywhere in the name: a few more are left out than need be.
HANDTEX_LOOK_ALIKES = re.compile(
    r"^\\(big|var)?o(?!mega|pposition|rigof|wns|e$|penJoin)|sun$|diameter|solidus|ring|"
    r"circ|Circle|moon|degree|vert|mid|bar$|paren|brack|brace|group|moustache|angle$|slash|setminus|prime|"
    r"ell$|imath|jmath|eth$|esh$|theta|Theta|delta|beta|zeta|iota|sigma|Sigma|omicron|nothing|emptyset|flat|"
    r"^\\[Oo]$|^\\ss$|half|quarter|superior|crtwo|subtwo|modtwo|oldstyle|numero|ceil|floor|int$|smallint")
HANDTEX_MIN_SIDE = 2.5  # points: smaller outlines are dots, primes and accents
HANDTEX_MAX_ASPECT = 4.0  # longer and thinner outlines are bars, rules and dashes (1 or -)


def allowed_command(command: str) -> bool:
    """A LaTeX symbol the gate may be trained to refuse: no look-alike by name, no letter argument that is a digit
    or a look-alike (\\mathbb{1}, \\mathcal{O})."""
    arg = re.search(r"\{(.*)\}", command)
    if arg and (len(arg.group(1)) != 1 or not allowed_char(arg.group(1))):
        return arg.group(1) == "" and not HANDTEX_LOOK_ALIKES.search(command)  # (\\sqrt{})
    bare = command.lstrip("\\")
    if len(bare) == 1 or not command.startswith("\\"):
        return allowed_char(bare[:1]) and len(bare) == 1
    return not HANDTEX_LOOK_ALIKES.search(command)


@functools.lru_cache(maxsize=4)
def handtex_symbols(root: str) -> tuple[tuple[str, tuple[np.ndarray, ...]], ...]:
    """(command, outlines) of every allowed LaTeX symbol of handtex's symbol set (PyPI wheel handtex: the SVG glyph
    of each symbol of 25 LaTeX packages; a command may have a glyph in several), from the wheel: no look-alike by
    name (allowed_command), no tiny mark, no bar."""
    wheel = fetch_wheel(HANDTEX, Path(root))
    with zipfile.ZipFile(wheel) as zf:
        entries = json.loads(zf.read("handtex/data/symbol_metadata/symbols.json"))
        blob = zf.read("handtex/data/symbols.tar.xz")
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:xz") as tf:  # read in memory, nothing extracted
        svgs = {m.name: tf.extractfile(m).read().decode("utf-8") for m in tf.getmembers() if m.isfile()}
    out = []
    for entry in sorted(entries, key=lambda e: (e["command"], e["filename"])):
        svg = svgs.get(f"{entry['filename']}.svg")
        if svg is None or not allowed_command(entry["command"]):
            continue
        outlines = svg_outlines(svg)
        if not outlines:
            continue
        pts = np.concatenate(outlines)
        w, h = pts.max(0) - pts.min(0)
        if max(w, h) >= HANDTEX_MIN_SIDE and max(w, h) <= HANDTEX_MAX_ASPECT * max(min(w, h), 1e-3):
            out.append((entry["command"], tuple(outlines)))
    return tuple(out)


def handtex_part(root: Path, part: str) -> list[tuple[str, tuple[np.ndarray, ...]]]:
    keep = 0 if part == "train" else 1  # by command: every glyph of a symbol on one side
    return [s for s in handtex_symbols(str(root)) if zlib.crc32(s[0].encode()) % 2 == keep]


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



# ---------------------------------------------------------------------------------------------- silhouettes


def animal_mnist_images(root: Path) -> np.ndarray:
    """Animal-MNIST's 10,000 silhouettes (uint8 28x28, white on black), read from the wheel's data file without
    unpickling it: the file is a pickled numpy array whose raw bytes follow one BINBYTES opcode; the wheel is
    pinned by SHA-256, and the bytes' length and the array's shape are checked."""
    import gzip

    wheel = fetch_wheel(ANIMAL_MNIST, Path(root))
    with zipfile.ZipFile(wheel) as zf:
        raw = gzip.decompress(zf.read("animal_mnist/data/Animal_MNIST/animal_data_version_3.gz"))
    n = 10000 * 28 * 28
    at = raw.find(b"B" + struct.pack("<I", n))
    if at < 0 or b"(K\x01M\x10'K\x1cK\x1c" not in raw[:at] or len(raw) < at + 5 + n:
        raise RetrievalError(f"{wheel}: Animal-MNIST's data file is not the (10000, 28, 28) uint8 array expected")
    return np.frombuffer(raw[at + 5:at + 5 + n], np.uint8).reshape(10000, 28, 28).copy()
