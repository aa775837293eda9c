"""SVG paths as polylines: the stroke files of KanjiVG and the glyph outlines of handtex's LaTeX symbols (the
non-digit sources of retrieval.data.nondigit_sources). Only what those files use: no arcs, translations only."""

from __future__ import annotations

import re

import numpy as np

_PATH_TOKEN = re.compile(r"[MmCcSsLlHhVvZzQqTt]|-?(?:\d+\.?\d*|\.\d+)(?:[eE]-?\d+)?")


def svg_path_points(d: str, per_curve: int = 8) -> list[np.ndarray]:
    """An SVG path's `d` (the commands KanjiVG uses: M, L, H, V, C, S, Q, T, Z, absolute and relative) ->
    polylines, curves sampled at `per_curve` points."""
    return _PathWalk(_PATH_TOKEN.findall(d), per_curve).polylines()


class _PathWalk:
    """One walk along an SVG path's tokens: the pen's position, its subpath's start, the last control point (the
    smooth S and T curves mirror it) and the polylines drawn so far."""

    def __init__(self, tokens: list[str], per_curve: int):
        self.tokens, self.i = tokens, 0
        self.t = np.linspace(0, 1, per_curve + 1)[1:, None]
        self.strokes: list[list] = []
        self.pos, self.start, self.last_ctrl = np.zeros(2), np.zeros(2), None

    def polylines(self) -> list[np.ndarray]:
        cmd = None
        while self.i < len(self.tokens):
            if self.tokens[self.i].isalpha():
                cmd = self.tokens[self.i]
                self.i += 1
                if cmd in "Zz":
                    self.close()
                    continue
            if cmd is None:
                break
            cmd = self.step(cmd)
        return [np.array(s, np.float32) for s in self.strokes if len(s) > 1]

    def step(self, cmd: str) -> str:
        """One command's arguments drawn; returns the command further arguments continue (after a move: line-to)."""
        rel = cmd.islower()
        base = self.pos if rel else np.zeros(2)
        c = cmd.upper()
        if c == "M":
            self.move(base + self.nums(2))
            return "l" if rel else "L"
        if c in "LHV":
            self.line(c, rel, base)
        elif c in "CS":
            self.cubic(c, base)
        elif c in "QT":
            self.quadratic(c, base)
        else:
            self.i += 1
        return cmd

    def nums(self, k: int) -> list[float]:
        vals = [float(v) for v in self.tokens[self.i:self.i + k]]
        self.i += k
        return vals

    def close(self) -> None:
        if self.strokes and len(self.strokes[-1]):
            self.strokes[-1].append(self.start.copy())
        self.pos = self.start.copy()

    def move(self, to: np.ndarray) -> None:
        self.pos = to
        self.start = self.pos.copy()
        self.strokes.append([self.pos.copy()])
        self.last_ctrl = None

    def line(self, c: str, rel: bool, base: np.ndarray) -> None:
        pos = self.pos
        if c == "L":
            pos = base + self.nums(2)
        elif c == "H":
            pos = np.array([(pos[0] if rel else 0) + self.nums(1)[0], pos[1]])
        else:
            pos = np.array([pos[0], (pos[1] if rel else 0) + self.nums(1)[0]])
        self.pos = pos
        if self.strokes:
            self.strokes[-1].append(pos.copy())
        else:
            self.strokes.append([pos.copy()])
        self.last_ctrl = None

    def cubic(self, c: str, base: np.ndarray) -> None:
        pos, t = self.pos, self.t
        if c == "C":
            v = self.nums(6)
            c1, c2, end = base + v[0:2], base + v[2:4], base + v[4:6]
        else:
            v = self.nums(4)
            c1 = 2 * pos - self.last_ctrl if self.last_ctrl is not None else pos.copy()
            c2, end = base + v[0:2], base + v[2:4]
        self.extend(((1 - t) ** 3) * pos + 3 * ((1 - t) ** 2) * t * c1 + 3 * (1 - t) * t ** 2 * c2 + t ** 3 * end)
        self.pos, self.last_ctrl = end, c2

    def quadratic(self, c: str, base: np.ndarray) -> None:
        pos, t = self.pos, self.t
        if c == "Q":
            v = self.nums(4)
            q, end = base + v[0:2], base + v[2:4]
        else:
            q = 2 * pos - self.last_ctrl if self.last_ctrl is not None else pos.copy()
            end = base + self.nums(2)
        self.extend(((1 - t) ** 2) * pos + 2 * (1 - t) * t * q + t ** 2 * end)
        self.pos, self.last_ctrl = end, q

    def extend(self, points: np.ndarray) -> None:
        """A curve's sampled points after the pen's position (which starts the polyline when none is open)."""
        if not self.strokes:
            self.strokes.append([self.pos.copy()])
        self.strokes[-1].extend(points)


_SVG = "{http://www.w3.org/2000/svg}"
_HREF = "{http://www.w3.org/1999/xlink}href"


def svg_outlines(svg: str) -> list[np.ndarray]:
    """The closed outlines of a glyph SVG as dvisvgm writes them (paths in <defs>, placed by <use x y> inside
    translated groups), in the SVG's coordinates (y down)."""
    import xml.etree.ElementTree as ET

    root = ET.fromstring(svg)
    defs = {el.get("id"): [p.get("d") for p in el.iter(f"{_SVG}path")]
            for d in root.iter(f"{_SVG}defs") for el in d if el.get("id")}
    out: list[np.ndarray] = []

    def walk(el, offset):
        for child in el:
            at = offset
            m = re.match(r"translate\(\s*([-\d.eE]+)[\s,]*([-\d.eE]*)", child.get("transform", ""))
            if m:
                at = at + np.array([float(m.group(1)), float(m.group(2) or 0)])
            if child.tag == f"{_SVG}use":
                at = at + np.array([float(child.get("x", 0)), float(child.get("y", 0))])
                out.extend(o + at for d in defs.get(child.get(_HREF, "").lstrip("#"), []) for o in svg_path_points(d))
            elif child.tag == f"{_SVG}path":
                out.extend(o + at for o in svg_path_points(child.get("d", "")))
            elif child.tag == f"{_SVG}g":
                walk(child, at)

    walk(root, np.zeros(2))
    return [o.astype(np.float32) for o in out if len(o) > 2]
