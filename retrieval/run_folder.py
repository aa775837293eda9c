"""The run folder of a training: its layout, and what it holds read back (history, summary, finished?).

    config.json                      the resolved config (Config.to_dict())
    metrics.jsonl                    one record per finished epoch (loss, lr, images/s, validation figures)
    best.*, last.*                   checkpoints (retrieval.checkpoint: NAME.safetensors + its NAME.json sidecar);
                                     best by validation MAP@R
    state.json + state-*.safetensors the training state a resume continues from
    card.md                          the model card (retrieval.cards)

Everything that names one of these files asks a RunFolder; nothing here imports torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

CONFIG = "config.json"
METRICS = "metrics.jsonl"
STATE = "state.json"
CARD = "card.md"
BEST, LAST = "best", "last"
CHECKPOINTS = (BEST, LAST)  # in the order a folder given as a checkpoint is read: best, else last
RECORD_FILES = (CONFIG, METRICS, CARD)  # the run's own record, copied along with a tower made from its checkpoint


class RunFolder:
    """One run folder: the paths of its files, its history (metrics.jsonl) and summaries of what it holds."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # -- layout ----------------------------------------------------------------------------------------------
    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def state(self) -> Path:
        return self.path / STATE

    @property
    def card(self) -> Path:
        return self.path / CARD

    def checkpoint(self, name: str) -> Path:
        """The checkpoint NAME (best or last) as retrieval.checkpoint names it: the path without a suffix."""
        return self.path / name

    def weights(self, name: str) -> Path:
        return self.path / f"{name}.safetensors"

    def sidecar(self, name: str) -> Path:
        return self.path / f"{name}.json"

    @property
    def best(self) -> Path:
        return self.checkpoint(BEST)

    @property
    def last(self) -> Path:
        return self.checkpoint(LAST)

    def preferred_weights(self) -> Path | None:
        """best.safetensors, else last.safetensors, else None: the checkpoint a run folder stands for."""
        return next((self.weights(n) for n in CHECKPOINTS if self.weights(n).is_file()), None)

    def state_tensors(self, epoch: int, step: int) -> Path:
        """The tensors of the training state saved at `epoch`, `step` (state.json names the current one)."""
        return self.path / f"state-e{epoch:04d}-s{step:06d}.safetensors"

    def state_tensor_files(self) -> list[Path]:
        return list(self.path.glob("state-*.safetensors"))

    def holds_run(self) -> bool:
        """Whether a training has written here (a state or a `last` checkpoint)."""
        return self.state.is_file() or self.weights(LAST).is_file()

    def clear_run(self) -> None:
        """Remove what a training wrote (the state, checkpoints, history and card), keeping config.json."""
        for old in [*self.path.glob("state*"), *self.path.glob(f"{LAST}.*"), *self.path.glob(f"{BEST}.*"),
                    self.metrics, self.card]:
            old.unlink(missing_ok=True)

    # -- the history (metrics.jsonl) ---------------------------------------------------------------------------
    def history(self, *, lenient: bool = False) -> list[dict]:
        """The per-epoch records of metrics.jsonl, oldest first ([] before the first epoch ends).

        lenient: an unreadable file reads as no history and lines that are not JSON objects are skipped (the
        model card is written whatever state the folder is in); otherwise they raise."""
        if lenient:
            try:
                text = self.metrics.read_text("utf-8")
            except OSError:
                return []
        elif self.metrics.is_file():
            text = self.metrics.read_text("utf-8")
        else:
            return []
        records = []
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                if lenient:
                    continue
                raise
            if isinstance(record, dict) or not lenient:
                records.append(record)
        return records

    def history_text(self, records: list[dict]) -> str:
        """metrics.jsonl's text for `records` (the trainer writes it whole, atomically, after each epoch)."""
        return "".join(json.dumps(r) + "\n" for r in records)

    # -- what the folder amounts to -----------------------------------------------------------------------------
    def finished(self, epochs: int) -> bool:
        """Whether `last` is from the final epoch (`epochs`) of an uninterrupted run, with a `best` beside it."""
        meta_path = self.sidecar(LAST)
        if not (meta_path.is_file() and self.weights(BEST).is_file()):
            return False
        try:
            meta = json.loads(meta_path.read_text("utf-8"))
        except (ValueError, OSError):
            return False
        return meta.get("epoch") == epochs and not meta.get("interrupted")

    def checkpoint_summary(self, name: str) -> dict | None:
        """The checkpoint NAME's epoch, validation figures, fingerprint and weights path (None: not written)."""
        path = self.sidecar(name)
        if not path.is_file():
            return None
        meta = json.loads(path.read_text("utf-8"))
        val = meta.get("val") or {}
        return {"epoch": meta.get("epoch"), "val_precision_at_1": val.get("precision_at_1"),
                "val_map_at_r": val.get("map_at_r"), "fingerprint": meta.get("fingerprint"),
                "checkpoint": str(self.weights(name)), "interrupted": bool(meta.get("interrupted"))}

    def summary(self, seconds: float | None = None) -> dict:
        """What a finished (or interrupted) run amounts to, as `retrieval train --json` prints it: the best epoch
        and its validation figures, the last epoch's, the files written and the times (`seconds`: the caller's
        wall time, when it measured one)."""
        history = self.history()
        state = json.loads(self.state.read_text("utf-8")) if self.state.is_file() else {}
        last = self.checkpoint_summary(LAST)
        config = json.loads(self.config.read_text("utf-8")) if self.config.is_file() else {}
        return {
            "run": str(self.path),
            "config": config.get("name"),
            "epochs": (config.get("train") or {}).get("epochs"),
            "epochs_done": len(history),
            "finished": bool(state.get("finished")),
            "best": self.checkpoint_summary(BEST),
            "last": last,
            "validation": [{k: r.get(k) for k in ("epoch", "loss", "val_precision_at_1", "val_map_at_r")}
                           for r in history],
            "times": {
                "train_seconds": state.get("train_seconds",
                                           sum(float(r.get("epoch_seconds") or 0) for r in history)),
                "validation_seconds": sum(float(r.get("val_seconds") or 0) for r in history),
                "images_per_s_last_epoch": history[-1].get("images_per_s") if history else None,
                **({"wall_seconds": seconds} if seconds is not None else {}),
            },
            "files": {name: str(self.path / name) for name in (CONFIG, METRICS, CARD, STATE)
                      if (self.path / name).is_file()},
        }


def newest_checkpoint(runs: str | os.PathLike) -> Path | None:
    """The newest best.safetensors among the run folders in `runs` (else the newest last.safetensors), or None."""
    runs = Path(runs)
    for name in CHECKPOINTS:
        found = sorted(runs.glob(f"*/{name}.safetensors"), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1]
    return None
