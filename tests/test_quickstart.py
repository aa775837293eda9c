"""`retrieval quickstart --tiny` runs every step end to end, its figures make sense, and a re-run reuses what it
wrote."""

from __future__ import annotations

import json
import re
import subprocess
import sys


BAR = re.compile(r"\d+%\||\r|it/s|query/s|img/s\]")  # what a tqdm progress bar writes


def _summary_figures(stdout: str) -> dict[str, float]:
    """'  precision@1  0.9950' and '  1-shot       0.9503 +- 0.0032' lines of the printed summary."""
    return {m[1]: float(m[2]) for m in re.finditer(r"^  (\S+)\s+([01]\.\d{4})", stdout, re.MULTILINE)}


def test_quickstart_tiny_writes_every_artifact_and_reuses_them(tmp_path, data_root):
    out = tmp_path / "qs"
    cmd = [sys.executable, "-m", "retrieval", "quickstart", "--tiny", "--out", str(out), "--root", str(data_root),
           "--device", "cpu"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert first.returncode == 0, first.stderr[-3000:]
    for path in ["runs/mnist-default/best.safetensors", "runs/mnist-default/best.json", "runs/mnist-default/last.json",
                 "runs/mnist-default/metrics.jsonl", "runs/mnist-default/config.json",
                 "runs/mnist-fewshot/best.safetensors", "indexes/mnist-default-train/meta.json",
                 "reports/mnist-default-test/metrics.json", "reports/mnist-default-test/summary.md",
                 "reports/mnist-default-test/recall_at_k.png", "reports/mnist-default-test/confusion_matrix.png"]:
        assert (out / path).is_file(), path
    assert str(out / "indexes" / "mnist-default-train") in first.stdout
    # stderr is a pipe, not a terminal: the steps' messages, and no progress bar (README: bars only on a terminal)
    assert "[evaluate]" in first.stderr and not BAR.search(first.stderr), first.stderr[-3000:]

    # The figures of even one short epoch on 800 images are far above chance (0.1 for ten digits, 0.25 for a
    # 4-way episode), ordered as their definitions require, and the summary prints the report's numbers.
    metrics = json.loads((out / "reports/mnist-default-test/metrics.json").read_text())
    assert metrics["n_queries"] == 300 and metrics["n_references"] == 800
    assert metrics["precision@1"] > 0.6 and metrics["map@r"] > 0.2
    recalls = [metrics[f"recall@{k}"] for k in (1, 2, 4, 8, 16)]
    assert recalls == sorted(recalls) and recalls[0] == metrics["precision@1"]
    printed = _summary_figures(first.stdout)
    for name, key in (("recall@1", "recall@1"), ("recall@8", "recall@8"), ("precision@1", "precision@1"),
                      ("MAP@R", "map@r")):
        assert abs(printed[name] - metrics[key]) < 5e-5, name
    assert 0.4 < printed["1-shot"] <= printed["5-shot"] + 0.05 and printed["5-shot"] > 0.5
    answers = re.findall(r"mnist:test\[\d\]\s+-> (\S+) \(true (\S+)\)", first.stdout)
    assert len(answers) == 6 and sum(label == true for label, true in answers) >= 4, answers

    # A second run reuses the finished training and the index (files untouched) and gives the same figures.
    kept = {p: (out / p).stat().st_mtime_ns for p in ("runs/mnist-default/best.safetensors",
                                                    "indexes/mnist-default-train/meta.json")}
    second = subprocess.run(cmd + ["--no-fewshot"], capture_output=True, text=True, timeout=900,
                            stdin=subprocess.DEVNULL)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "[train] reusing the finished run" in second.stderr and "[index] reusing" in second.stderr
    assert "[train] training" not in second.stderr and "embedded" not in second.stderr.split("[evaluate]")[0]
    assert {p: (out / p).stat().st_mtime_ns for p in kept} == kept
    again = json.loads((out / "reports/mnist-default-test/metrics.json").read_text())
    assert {k: again[k] for k in ("precision@1", "map@r")} == {k: metrics[k] for k in ("precision@1", "map@r")}
    assert "retrieval fewshot --checkpoint" in second.stderr  # says how to run the skipped few-shot step

    # --force redoes every step it runs over what --out holds (the few-shot run, not run now, is kept as it is);
    # --quiet leaves stderr empty: no step messages, no bars
    kept = {p: ((out / p).stat().st_mtime_ns, (out / p).read_bytes())
            for p in ("runs/mnist-default/best.safetensors", "runs/mnist-default/metrics.jsonl",
                      "indexes/mnist-default-train/meta.json", "reports/mnist-default-test/metrics.json",
                      "runs/mnist-fewshot/best.safetensors")}
    forced = subprocess.run([sys.executable, "-m", "retrieval", "--quiet", *cmd[3:], "--force", "--no-fewshot"],
                            capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert forced.returncode == 0 and forced.stderr == "", forced.stderr[-3000:]
    redone = {p: (out / p).stat().st_mtime_ns != kept[p][0] for p in kept}
    assert redone == {p: not p.startswith("runs/mnist-fewshot") for p in kept}, redone
    records = [json.loads(line) for line in (out / "runs/mnist-default/metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1]  # a fresh run's history, not appended to the old one
    assert json.loads((out / "reports/mnist-default-test/metrics.json").read_text())["n_queries"] == 300
