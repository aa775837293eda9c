"""`retrieval quickstart --tiny` runs every step end to end and a re-run reuses what it wrote."""

from __future__ import annotations

import subprocess
import sys


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
    summary = first.stdout
    for needle in ("quickstart summary", "recall@1", "recall@8", "precision@1", "MAP@R", "1-shot", "5-shot",
                   "mnist:test[0]", str(out / "indexes" / "mnist-default-train")):
        assert needle in summary, needle

    weights = (out / "runs/mnist-default/best.safetensors").stat().st_mtime_ns
    second = subprocess.run(cmd + ["--no-fewshot"], capture_output=True, text=True, timeout=900,
                            stdin=subprocess.DEVNULL)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "reusing the finished run" in second.stderr and "reusing" in second.stderr.split("[index]")[1]
    assert (out / "runs/mnist-default/best.safetensors").stat().st_mtime_ns == weights
    assert "retrieval fewshot --checkpoint" in second.stderr  # says how to run the skipped few-shot step
