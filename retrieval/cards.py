"""Model cards: a short Markdown page saying what a trained tower is, what it saw, how good it is and where it is weak.

Every run folder gets `card.md` when training ends (or is interrupted), and an index folder carries its tower's
card beside the copied weights (retrieval.index). The card is rendered from what the run folder already holds:
the checkpoint sidecars (best.json, last.json), config.json, metrics.jsonl and state.json; test figures appear
when the caller measured them (`quickstart` does, on mnist:test).

    write_run_card(run_dir, test=None)   -> run_dir/card.md (atomically), or None when the run has no checkpoint
    checkpoint_card(weights_path)        -> the card text for a checkpoint: its run's card.md, else one rendered
                                            from the checkpoint's sidecar alone
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from retrieval.fsutil import atomic_write_text
from retrieval.run_folder import BEST, CONFIG, LAST, RunFolder

ARCHITECTURES = {
    "default": "a small batch-norm CNN (strided convolutions, 28 -> 14 -> 7, then a linear layer)",
    "hires": "the default CNN with a full-resolution stem (a stride-1 5x5 convolution on the 28x28 image)",
    "seed": "the tower of the original Siamese MNIST write-up (three convolutions, a 512-unit layer)",
}
# Pictures from users go through this before the tower sees them (retrieval.data.preprocess.PREPROCESSING).
USER_PICTURES = ("any mode to grayscale, inverted when the background is light, cropped to the ink, fitted into "
                 "20x20 and centred by centre of mass in 28x28")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _fmt(value, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def _plain(value) -> str:
    """A config value or filter dict as text: {'subset': 800, 'seed': 0} -> "subset 800, seed 0"."""
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {_plain(v)}" for k, v in value.items())
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_plain(v) for v in value) + "]"
    return str(value)


def _classes(names) -> str:
    names = [str(c) for c in names or []]
    return ", ".join(names) if len(names) <= 20 else ", ".join(names[:20]) + f", ... ({len(names)} in all)"


@dataclass(frozen=True)
class _Tower:
    """What the sections of a card say about the tower, read once from its sidecar (and the run's config)."""

    arch: str
    dim: Any
    name: str
    fingerprint: str
    objective: Mapping
    deskew: bool
    shifts: int
    classes_seen: list
    classes_unseen: list

    @classmethod
    def read(cls, sidecar: Mapping, config: Mapping) -> "_Tower":
        objective = sidecar.get("objective") or {}
        if not isinstance(objective, Mapping):
            objective = {"name": str(objective)}
        classes_all = list(sidecar.get("classes") or [])
        seen = list(sidecar.get("classes_seen") or classes_all)
        return cls(arch=str(sidecar.get("tower", "?")), dim=sidecar.get("embedding_size", "?"),
                   name=str(sidecar.get("config") or config.get("name") or "tower"),
                   fingerprint=str(sidecar.get("fingerprint", "")), objective=objective,
                   deskew=bool(sidecar.get("deskew")), shifts=int(sidecar.get("test_shifts") or 0),
                   classes_seen=seen, classes_unseen=[c for c in classes_all if c not in seen])


def render_card(sidecar: Mapping, *, config: Mapping | None = None, history: list[dict] | None = None,
                best: Mapping | None = None, last: Mapping | None = None, state: Mapping | None = None,
                test: Mapping | None = None, where: str | None = None) -> str:
    """The Markdown card of a tower described by its checkpoint sidecar (and, when known, its run's config,
    per-epoch history, best/last sidecars, training state and test figures)."""
    cfg = config or {}
    tower = _Tower.read(sidecar, cfg)
    lines = _title(tower, best, last, where)
    lines += _what_it_is(tower, sidecar)
    lines += _data_section(tower, sidecar)
    lines += _config_section(tower, sidecar, cfg)
    lines += _figures(sidecar, best, last, test)
    lines += _training_notes(sidecar, history, last, state)
    lines += _intended_use(tower)
    lines += _limitations(tower, cfg.get("augment") or {}, test)
    return "\n".join(lines)


def _title(tower: _Tower, best: Mapping | None, last: Mapping | None, where: str | None) -> list[str]:
    lines = [f"# Model card: {tower.name}", ""]
    lines += [f"A `{tower.arch}` tower with {tower.dim}-d embeddings, fingerprint `{tower.fingerprint}` (SHA-256 of "
              "its weights)." + (f" Run folder: `{where}`." if where else ""), ""]
    ckpts = [(label, m) for label, m in ((BEST, best), (LAST, last)) if m]
    if ckpts:
        lines += ["Checkpoints: " + "; ".join(
            f"`{label}` (" + (f"epoch {m['epoch']}, " if m.get("epoch") is not None else "")
            + f"fingerprint `{str(m.get('fingerprint', ''))[:16]}`)"
            for label, m in ckpts) + ".", ""]
    return lines


def _what_it_is(tower: _Tower, sidecar: Mapping) -> list[str]:
    lines = ["## What it is", ""]
    arch = ARCHITECTURES.get(tower.arch, f"the `{tower.arch}` network")
    lines.append(f"One shared-weight network, {arch}, mapping a 28x28 grayscale image to an L2-normalised "
                 f"{tower.dim}-d embedding: images of one class lie close together (Euclidean distance between unit "
                 "vectors, 0 to 2), so nearest neighbours in a Faiss index give retrieval and k-NN classification.")
    objective = tower.objective
    if objective:
        loss = objective.get("loss") or objective.get("name")
        miner = objective.get("miner")
        lines.append("")
        lines.append(f"Trained with the `{objective.get('name', '?')}` objective ({loss}"
                     + (f", miner {miner}" if miner else "") + ")"
                     + ("; it also has a pair head scoring P(same) for two embeddings" if sidecar.get("has_pair_head")
                        else "") + ".")
    lines.append("")
    shifts = tower.shifts
    lines.append("At inference: " + ("each image is deskewed (its slant taken out)" if tower.deskew else "no deskewing")
                 + "; " + (f"the embedding is the mean over the image shifted by up to {shifts} pixel(s) each way "
                           f"({(2 * shifts + 1) ** 2} passes)" if shifts else "one pass per image") + ".")
    lines.append("")
    return lines


def _data_section(tower: _Tower, sidecar: Mapping) -> list[str]:
    lines = ["## Data", ""]
    data = sidecar.get("data") or {}
    spec = data.get("spec") if isinstance(data, Mapping) else data
    filters = data.get("filters") if isinstance(data, Mapping) else None
    if spec:
        lines.append(f"- training data: `{spec}`" + (f" ({_plain(filters)})" if filters else "")
                     + (f": {data['train_images']:,} images for training, {data.get('val_images', 0):,} held out "
                        f"for validation (seeded split, seed {data.get('val_seed', sidecar.get('seed', 0))})"
                        if isinstance(data, Mapping) and isinstance(data.get("train_images"), int) else ""))
    else:
        lines.append("- training data: not recorded in the checkpoint's sidecar")
    seen, unseen = tower.classes_seen, tower.classes_unseen
    if seen:
        lines.append(f"- classes seen in training ({len(seen)}): {_classes(seen)}")
    if unseen:
        lines.append(f"- classes of the dataset never seen in training ({len(unseen)}): {_classes(unseen)} "
                     "(kept for few-shot evaluation)")
    if sidecar.get("preprocessing"):
        lines.append(f"- training images: {sidecar['preprocessing']}")
    lines.append(f"- pictures from users (queries, folder datasets): {USER_PICTURES}")
    lines.append("")
    return lines


def _config_section(tower: _Tower, sidecar: Mapping, cfg: Mapping) -> list[str]:
    lines = ["## Config", ""]
    t, o, s, tr, op, a = (cfg.get(k) or {} for k in ("tower", "objective", "sampler", "train", "optimizer", "augment"))
    if cfg:
        rows = [
            ("tower", f"{t.get('name', tower.arch)}, embedding {tower.dim}, deskew {str(tower.deskew).lower()}, "
                      f"test_shifts {tower.shifts}"),
            ("objective", f"{o.get('name', tower.objective.get('name', '?'))}"
                          + (f", miner {o['miner']}" if o.get("miner") else "")
                          + (f", loss args {_plain(o['loss_args'])}" if o.get("loss_args") else "")),
            ("sampler", f"{s.get('name', '?')}, m {s.get('m', '?')}, batch {tr.get('batch_size', '?')}"),
            ("training", f"{tr.get('epochs', '?')} epoch{'' if tr.get('epochs') == 1 else 's'}, "
                         f"{op.get('name', '?')} lr {op.get('lr', '?')}, "
                         f"{op.get('schedule', '?')} schedule, weight decay {op.get('weight_decay', '?')}"),
            ("augmentation", _plain(a)),
            ("seed", str(cfg.get("seed", sidecar.get("seed", "?")))),
        ]
    else:
        rows = [("objective", str(tower.objective.get("name", "?"))), ("epochs", str(sidecar.get("epochs", "?"))),
                ("seed", str(sidecar.get("seed", "?")))]
    lines += ["| setting | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    if cfg:
        lines += ["", f"The whole resolved config is `{CONFIG}` in the run folder."]
    lines.append("")
    return lines


def _val_row(label: str, v: Mapping) -> str:
    return f"| {label} | {v.get('epoch', '?')} | {_fmt(v.get('precision_at_1'))} | {_fmt(v.get('map_at_r'))} |"


def _figures(sidecar: Mapping, best: Mapping | None, last: Mapping | None, test: Mapping | None) -> list[str]:
    lines = ["## Figures", ""]
    val_rows = []
    for label, meta in ((BEST, best), (LAST, last)):
        v = (meta or {}).get("val") if meta else None
        if v:
            val_rows.append(_val_row(label, v))
    if not val_rows and sidecar.get("val"):
        val_rows.append(_val_row("this checkpoint", sidecar["val"]))
    if val_rows:
        lines += ["Validation (the held-out slice of the training data; each image queried against the others of "
                  "the slice):", "", "| checkpoint | epoch | precision@1 | MAP@R |", "|---|---|---|---|", *val_rows, ""]
    else:
        lines += ["Validation: none recorded.", ""]
    if test:
        lines.append(f"Test ({test.get('queries', '?')} queried against {test.get('references', 'the index')}, "
                     f"measured once):")
        lines += ["", "| recall@1 | precision@1 | MAP@R | R-precision |", "|---|---|---|---|",
                  f"| {_fmt(test.get('recall@1'))} | {_fmt(test.get('precision@1'))} | {_fmt(test.get('map@r'))} | "
                  f"{_fmt(test.get('r_precision'))} |", ""]
    else:
        lines += ["Test: not measured by training. `retrieval index build --checkpoint RUN --data mnist:train` then "
                  "`retrieval evaluate --index INDEX --queries mnist:test` measures it (`retrieval quickstart` "
                  "writes it here).", ""]
    return lines


def _training_notes(sidecar: Mapping, history: list[dict] | None, last: Mapping | None,
                    state: Mapping | None) -> list[str]:
    lines = []
    if history:
        done = history[-1]
        seconds = sum(float(r.get("epoch_seconds") or 0) for r in history)
        device = ""
        sessions = (state or {}).get("sessions") or []
        if sessions:
            s0 = sessions[-1]
            device = f" on {s0.get('device', '?')}" + (f" ({s0['threads']} threads)" if s0.get("threads") else "")
        lines += [f"Training: {done.get('epoch', len(history))} of {sidecar.get('epochs', '?')} epochs, "
                  f"{seconds:,.0f} s of training steps{device}, {_fmt(done.get('images_per_s'), 0)} images/s in "
                  "the last epoch.", ""]
    if (last or sidecar).get("interrupted"):
        m = last or sidecar
        lines += [f"**Interrupted** at epoch {m.get('epoch', 0) + 1}, step {m.get('step_in_epoch', '?')}: "
                  "`retrieval train --resume --out RUN` continues it.", ""]
    return lines


def _intended_use(tower: _Tower) -> list[str]:
    return ["## Intended use", "",
            "Finding similar images and classifying by nearest neighbours (`retrieval index build`, `query`, "
            "`serve`) for images like the training data: handwritten digits"
            + (" and, from a few examples each, classes it never saw (few-shot)" if tower.classes_unseen else "")
            + ". A research and teaching tool: not for decisions about people, security or money.", ""]


def _limitations(tower: _Tower, augment: Mapping, test: Mapping | None) -> list[str]:
    lines = ["## Limitations", ""]
    lines.append("- Inputs are 28x28 grayscale digit-like images, light ink on a dark background after the "
                 "MNIST-style preprocessing; colour pictures, natural photos, letters, symbols and several digits "
                 "in one picture are outside what it learned, and still get a nearest neighbour.")
    weak = ["very thin, faint or broken strokes", "digits cut off at the picture's edge or touching another mark"]
    if augment:
        weak.append(f"rotations beyond about {augment.get('degrees', '?')} degrees (the training augmentation's range)")
    else:
        weak.append("strongly rotated digits")
    if not tower.deskew:
        weak.append("unusually slanted writing")
    weak.append("classes it never saw, which land near the seen class they resemble: calibrate a distance "
                "threshold (`retrieval calibrate`) so such queries are answered `unknown`")
    lines.append("- Known weak inputs: " + "; ".join(weak) + ".")
    per_class = (test or {}).get("per_class") or {}
    scored = [(c, v.get("map@r")) for c, v in per_class.items() if isinstance(v, dict)
              and isinstance(v.get("map@r"), (int, float))]
    if scored:
        worst = sorted(scored, key=lambda x: x[1])[:3]
        lines.append("- Weakest classes on the test figures (MAP@R): "
                     + ", ".join(f"{c} ({_fmt(v)})" for c, v in worst) + ".")
    lines.append("- The figures above are on MNIST; other handwriting, scanners or drawing tools score lower.")
    lines.append("")
    return lines


def _run_parts(run: Path) -> dict:
    folder = RunFolder(run)
    best, last = _read_json(folder.sidecar(BEST)), _read_json(folder.sidecar(LAST))
    return {"best": best if isinstance(best, dict) else None, "last": last if isinstance(last, dict) else None,
            "config": _read_json(folder.config), "history": folder.history(lenient=True),
            "state": _read_json(folder.state)}


def write_run_card(run: str | os.PathLike, test: Mapping | None = None) -> Path | None:
    """Write RUN/card.md (atomically) from what the run folder holds; None when it holds no checkpoint yet."""
    run = Path(run)
    parts = _run_parts(run)
    sidecar = parts["best"] or parts["last"]
    if sidecar is None:
        return None
    config = parts["config"] if isinstance(parts["config"], dict) else None
    state = parts["state"] if isinstance(parts["state"], dict) else None
    text = render_card(sidecar, config=config, history=parts["history"], best=parts["best"], last=parts["last"],
                       state=state, test=test, where=str(run))
    text += f"\n_Written {_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()}._\n"
    atomic_write_text(RunFolder(run).card, text)
    return RunFolder(run).card


def checkpoint_card(weights: str | os.PathLike) -> str:
    """The card of the checkpoint whose weights are `weights` (NAME.safetensors): its run folder's card.md when that
    card names this checkpoint's fingerprint, else one rendered from NAME.json and what its folder holds."""
    weights = Path(weights)
    sidecar = _read_json(weights.with_suffix(".json"))
    if not isinstance(sidecar, dict):
        sidecar = {}
    fingerprint = str(sidecar.get("fingerprint", ""))
    try:
        text = RunFolder(weights.parent).card.read_text("utf-8")
    except (OSError, UnicodeDecodeError):
        text = ""
    if text and fingerprint and fingerprint in text:
        return text
    parts = _run_parts(weights.parent)
    same_run = [m for m in (parts["best"], parts["last"]) if m and m.get("config") == sidecar.get("config")]
    if not same_run:  # a checkpoint on its own (or beside unrelated files): its sidecar alone
        return render_card(sidecar)
    config = parts["config"] if isinstance(parts["config"], dict) else None
    state = parts["state"] if isinstance(parts["state"], dict) else None
    return render_card(sidecar, config=config, history=parts["history"], best=parts["best"], last=parts["last"],
                       state=state, where=str(weights.parent))
