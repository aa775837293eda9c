"""Draw the example pictures README.md uses (python examples/draw.py): black strokes on white paper, as a user's
drawing or scan would come, deterministic (no randomness), so the files in this folder can be checked against it.

    seven.png        a 7 on a 200x240 RGB canvas
    digit.png        a 4 on a 240x240 RGB canvas
    star1.png        an asterisk (a class MNIST lacks, for `index add` / POST /items)
    star2.png        another asterisk, turned and thicker
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent

# name -> (canvas size, pen width, strokes as point lists)
DRAWINGS = {
    "seven.png": ((200, 240), 16, [[(45, 45), (155, 45), (85, 200)]]),
    "digit.png": ((240, 240), 18, [[(150, 200), (150, 40), (60, 150), (185, 150)]]),
    "star1.png": ((200, 200), 14, [[(100, 30), (100, 170)], [(40, 65), (160, 135)], [(40, 135), (160, 65)]]),
    "star2.png": ((220, 220), 18, [[(40, 110), (180, 110)], [(75, 45), (145, 175)], [(75, 175), (145, 45)]]),
}


def draw(name: str) -> Image.Image:
    size, width, strokes = DRAWINGS[name]
    img = Image.new("RGB", size, "white")
    pen = ImageDraw.Draw(img)
    for line in strokes:
        pen.line(line, fill="black", width=width, joint="curve")
    return img


def main(out: Path = HERE) -> None:
    for name in DRAWINGS:
        draw(name).save(out / name, optimize=False)
        print(out / name)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
