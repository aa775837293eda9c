"""benchmarks/robustness.py measures what it says (issue 24): its figures equal the product's own measurement of
the same index and queries (workflows.evaluate, calibrate, query), in each mode, with an untrained seeded tower and
a few hundred references (seconds, not a training)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from repo_scripts import load_script
from retrieval.workflows import Compute, Selection

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks" / "robustness.py"
NAMES = ["stripe", "brightness", "lowres-8", "dotted_line"]  # cheap to make for the whole test split (cached)

pytestmark = pytest.mark.usefixtures("one_thread")  # as the subprocess runs (OMP_NUM_THREADS=1): same floats


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/robustness.py", "robustness_bench")


def _cells(stdout: str) -> dict[str, list[str]]:
    rows = [line.split("|")[1:-1] for line in stdout.splitlines() if line.startswith("| ")]
    return {r[0].strip(): [c.strip() for c in r[1:]] for r in rows[1:]}


def test_test_mode_rows_are_workflows_evaluate_on_the_same_index_and_subset(untrained_run, tmp_path):
    from retrieval.index import load_index
    from retrieval.workflows import evaluate

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(BENCH), "--runs", str(untrained_run), "--corruptions", ",".join(NAMES),
                           "--subset", "40", "--references", "300", "--index-dir", str(tmp_path / "ix"),
                           "--json", str(tmp_path / "figures.json")],
                          capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    figures = json.loads((tmp_path / "figures.json").read_text())[untrained_run.name]
    index = tmp_path / "ix" / untrained_run.name
    assert len(load_index(index)) == 300
    cells = _cells(proc.stdout)
    for name in ["clean", *NAMES]:
        spec = "mnist:test" if name == "clean" else f"mnist-c:test/{name}"
        ev = evaluate(index, Selection(spec, subset=40, seed=0), ks=(1,), compute=Compute(device="cpu"))
        assert figures[name]["precision@1"] == ev.metrics.precision[1], name
        assert figures[name]["map@r"] == ev.metrics.map_at_r, name
        assert cells[name][1] == f"{ev.metrics.precision[1]:.4f} / {ev.metrics.map_at_r:.4f}"
    assert [n for n in cells if not n.startswith("**")] == ["clean", *NAMES]
    family = {n: cells[n][0] for n in NAMES}
    assert family["dotted_line"] == "occlusion (held out)" and family["stripe"] == "occlusion"  # augment.bands
    assert family["brightness"] == "contrast" and family["lowres-8"] == "low resolution"


def _root_without_mnist_test(tmp_path, data_root) -> Path:
    """A data root whose MNIST test files are empty: reading mnist:test fails there."""
    root = tmp_path / "root"
    (root / "mnist").mkdir(parents=True)
    for f in (Path(data_root) / "mnist").iterdir():
        if f.name.startswith("t10k"):
            (root / "mnist" / f.name).write_bytes(b"")
        else:
            (root / "mnist" / f.name).symlink_to(f)
    return root


def test_selection_mode_is_the_held_out_slice_against_the_training_slice_and_reads_no_test(
        bench, untrained_run, tmp_path, data_root):
    from retrieval.data.corrupt import corrupt
    from retrieval.data.idx import write_idx
    from retrieval.data.specs import load_dataset
    from retrieval.data.splits import split_validation
    from retrieval.workflows import build_index, evaluate

    root = _root_without_mnist_test(tmp_path, data_root)
    with pytest.raises(Exception):
        load_dataset("mnist:test", root=root)
    out = tmp_path / "figures.json"
    assert bench.main(["--selection", "--runs", str(untrained_run), "--corruptions", "stripe,impulse_noise", "--subset",
                       "40", "--references", "300", "--root", str(root), "--json", str(out)]) == 0
    figures = json.loads(out.read_text())[untrained_run.name]

    # queries from the slice the trainer held out (5,000, seed 0 for a run that says nothing else); references
    # from the rest
    _, ds, refs, queries = bench.selection_split(untrained_run, 40, root, 300)
    held_train, held_out = split_validation(ds.labels, 5000, 0)
    assert len(queries) == 40 and set(queries.tolist()) <= set(held_out.tolist())
    assert len(refs) == 300 and set(refs.tolist()) <= set(held_train.tolist())

    def folder(name, images, labels):
        write_idx(tmp_path / name / "images-idx3-ubyte", images)
        write_idx(tmp_path / name / "labels-idx1-ubyte", labels)
        return f"idx:{tmp_path / name}"

    labels = ds.labels.numpy()
    index = tmp_path / "ix"
    build_index(untrained_run, [folder("refs", ds.images[refs].numpy(), labels[refs])], index,
                compute=Compute(device="cpu"))
    clean = ds.images[queries].numpy()
    for name in ("clean", "stripe", "impulse_noise"):  # impulse noise is seeded: the seed is checked
        images = clean if name == "clean" else corrupt(clean, name, seed=1)  # seed 1: the test sets use seed 0
        ev = evaluate(index, folder(f"q-{name}", images, labels[queries]), ks=(1,), compute=Compute(device="cpu"))
        assert figures[name]["precision@1"] == pytest.approx(ev.metrics.precision[1], abs=1e-9), name
        assert figures[name]["map@r"] == pytest.approx(ev.metrics.map_at_r, abs=1e-9), name

    # the unknown-input measure on the selection split reads no test image either
    out = tmp_path / "unknown.json"
    assert bench.main(["--unknown", "--selection", "--runs", str(untrained_run), "--corruptions", "stripe",
                       "--subset", "40", "--references", "300", "--non-digits", "8", "--root", str(root),
                       "--json", str(out)]) == 0
    record = json.loads(out.read_text())[untrained_run.name]
    assert {"threshold", "stripe answered", "letters rejected", "blank rejected"} <= set(record)


def test_unknown_mode_thresholds_are_calibrate_and_answers_are_what_query_answers(bench, untrained_run, tmp_path):
    from retrieval.data.specs import load_dataset
    from retrieval.workflows import calibrate, query

    out = tmp_path / "figures.json"
    assert bench.main(["--unknown", "--runs", str(untrained_run), "--corruptions", "stripe", "--subset", "40",
                       "--references", "300", "--non-digits", "8", "--accept", "0.9,0.99",
                       "--index-dir", str(tmp_path / "ix"), "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    index = tmp_path / "ix" / untrained_run.name
    assert list(figures) == [f"{untrained_run.name}, accept 0.9", f"{untrained_run.name}, accept 0.99"]
    for accept in (0.9, 0.99):
        fig = figures[f"{untrained_run.name}, accept {accept:g}"]
        cal, _ = calibrate(index, Selection("mnist:test", subset=40, seed=0), store=False, accept=accept,
                           compute=Compute(device="cpu"))
        assert fig["threshold"] == cal.max_distance
        for key, spec in (("clean mnist:test answered", "mnist:test"), ("stripe answered", "mnist-c:test/stripe")):
            items = load_dataset(spec, subset=40, seed=1).sources  # other test images than the calibration's
            answers = query(index, items, k=1, max_distance=cal.max_distance, compute=Compute(device="cpu"))
            answered = np.mean([r.label != "unknown" for r in answers.results])
            assert fig[key] == answered, key
        for kind in bench.NON_DIGITS:
            assert 0.0 <= fig[f"{kind} rejected"] <= 1.0
    assert figures[f"{untrained_run.name}, accept 0.9"]["clean mnist:test answered"] <= \
        figures[f"{untrained_run.name}, accept 0.99"]["clean mnist:test answered"]


def test_pictures_mode_reads_the_families_files_as_folder_specs_do_beside_their_arrays(bench, untrained_run, tmp_path):
    from retrieval.data.corrupt import corrupt
    from retrieval.data.idx import write_idx
    from retrieval.data.pictures import ARRAY_COUNTERPART, render
    from retrieval.workflows import build_index, evaluate

    families = ["scan-14", "canvas-mouse", "mnistc-impulse_noise"]
    out = tmp_path / "figures.json"
    assert bench.main(["--pictures", "--selection", "--runs", str(untrained_run), "--families", ",".join(families),
                       "--subset", "12", "--references", "300", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())[untrained_run.name]

    _, ds, refs, queries = bench.selection_split(untrained_run, 12, None, 300)
    labels = ds.labels.numpy()
    write_idx(tmp_path / "refs" / "images-idx3-ubyte", ds.images[refs].numpy())
    write_idx(tmp_path / "refs" / "labels-idx1-ubyte", labels[refs])
    index = tmp_path / "ix"
    build_index(untrained_run, [f"idx:{tmp_path / 'refs'}"], index, compute=Compute(device="cpu"))
    clean = ds.images[queries].numpy()
    for family in families:
        # the same picture files in a folder spec: read by the product's folder loader, scored by evaluate
        for i, pos in enumerate(queries.tolist()):
            name = ds.classes[labels[pos]]
            pic = render(clean[i], family, bench.picture_seed(pos, selection=True), label=name)
            (tmp_path / family / name).mkdir(parents=True, exist_ok=True)
            (tmp_path / family / name / f"{i}{pic.suffix}").write_bytes(pic.data)
        assert figures[family]["refused"] == 0 and figures[family]["n"] == 12
        ev = evaluate(index, f"folder:{tmp_path / family}", ks=(1,), compute=Compute(device="cpu"))
        assert figures[family]["pictures"]["precision@1"] == pytest.approx(ev.metrics.precision[1], abs=1e-9)
        assert figures[family]["pictures"]["map@r"] == pytest.approx(ev.metrics.map_at_r, abs=1e-9)
        arrays = corrupt(clean, ARRAY_COUNTERPART[family], seed=1)  # seed 1: selection, as the corrupted sets
        write_idx(tmp_path / f"a-{family}" / "images-idx3-ubyte", arrays)
        write_idx(tmp_path / f"a-{family}" / "labels-idx1-ubyte", labels[queries])
        ev = evaluate(index, f"idx:{tmp_path / f'a-{family}'}", ks=(1,), compute=Compute(device="cpu"))
        assert figures[family]["arrays"]["precision@1"] == pytest.approx(ev.metrics.precision[1], abs=1e-9)
        assert figures[family]["arrays"]["map@r"] == pytest.approx(ev.metrics.map_at_r, abs=1e-9)
