"""The example pictures README.md and docs/ use are in examples/, are what examples/draw.py draws, and go through the
picture path (a README command copied as written finds its file and gets an answer, not an error)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from repo_scripts import REPO, load_script
from retrieval.data.preprocess import load_image_file



def test_every_picture_readme_names_is_there_and_drawn_by_the_script():
    texts = [(REPO / "README.md").read_text("utf-8")] + [p.read_text("utf-8") for p in (REPO / "docs").glob("*.md")]
    named = sorted({name for text in texts for name in re.findall(r"examples/([\w.-]+\.png)", text)})
    assert {"seven.png", "star1.png"} <= set(named), f"README.md and docs/ name only {named}"
    draw = load_script("examples/draw.py", "examples_draw")
    assert set(named) <= set(draw.DRAWINGS), f"README names pictures examples/draw.py does not draw: {named}"
    for name in draw.DRAWINGS:
        path = REPO / "examples" / name
        assert path.is_file(), f"{path} missing: run python examples/draw.py"
        with Image.open(path) as img:
            assert np.array_equal(np.asarray(img.convert("RGB")), np.asarray(draw.draw(name))), name
        image = load_image_file(path)
        assert image.shape == (28, 28) and int(image.max()) == 255, name


@pytest.mark.parametrize("name", ["seven.png", "digit.png"])
def test_the_digits_look_like_mnist_after_preprocessing(name):
    """Ink white on black (not inverted: little of the picture is ink), centred by mass (the MNIST recipe)."""
    image = load_image_file(REPO / "examples" / name).numpy().astype(np.float64)
    assert 0.05 < float((image > 127).mean()) < 0.35
    ys, xs = np.mgrid[:28, :28]
    centre = ((ys * image).sum() / image.sum(), (xs * image).sum() / image.sum())
    assert np.allclose(centre, 13.5, atol=1.0), centre
