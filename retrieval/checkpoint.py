"""Checkpoints: weights in safetensors plus a JSON sidecar that says what they are.

A checkpoint NAME is two files in a run folder: NAME.safetensors (tower weights under `tower.`, pair head
weights under `head.` when the objective has one) and NAME.json (tower, embedding size, objective, data spec,
classes seen, preprocessing, SHA-256 fingerprint of the tower weights, ...). Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from retrieval.errors import RetrievalError
from retrieval.fsutil import atomic_path, atomic_write_json, read_json
from retrieval.run_folder import BEST, LAST, RunFolder
from retrieval.towers import Tower, build_tower

FORMAT = "retrieval-checkpoint/1"


def fingerprint_state(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over tensor names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-d: BN counters
    return h.hexdigest()


def tower_fingerprint(tower: Tower) -> str:
    return fingerprint_state(tower.state_dict())


@dataclass
class Checkpoint:
    tower: Tower
    head: torch.nn.Module | None
    meta: dict
    path: Path  # the .safetensors file

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]


def save_checkpoint(path: str | os.PathLike, tower: Tower, head: torch.nn.Module | None = None, **meta) -> dict:
    """Write PATH.safetensors and PATH.json atomically (weights first, so a sidecar never names missing weights)."""
    path = Path(path)
    base = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    state = {f"tower.{k}": v.detach().to("cpu").contiguous() for k, v in tower.state_dict().items()}
    if head is not None:
        state.update({f"head.{k}": v.detach().to("cpu").contiguous() for k, v in head.state_dict().items()})
    sidecar = {
        "format": FORMAT,
        **tower.describe(),
        "fingerprint": tower_fingerprint(tower),
        "has_pair_head": head is not None,
        **meta,
    }
    gate = tower._modules.get("gate")
    if gate is not None:  # the digit-or-not gate (retrieval.gate): its weights are the tower's under `gate.`
        sidecar["gate"] = {**(meta.get("gate") or {}), **gate.describe()}
    with atomic_path(base.with_name(base.name + ".safetensors")) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT})
    atomic_write_json(base.with_name(base.name + ".json"), sidecar)
    return sidecar


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run folder (-> best, else last), a NAME.safetensors / NAME.json file, or NAME -> the .safetensors path."""
    p = Path(path)
    if p.is_dir():
        weights = RunFolder(p).preferred_weights()
        if weights is None:
            raise RetrievalError(f"checkpoint folder {p} has neither {BEST}.safetensors nor {LAST}.safetensors")
        return weights
    if p.suffix == ".json":
        p = p.with_suffix(".safetensors")
    elif p.suffix != ".safetensors":
        if p.is_file():  # e.g. a pickled .pt/.pth: never unpickled, since loading a pickle can run code
            raise RetrievalError(f"{path} is not a retrieval checkpoint: expected NAME.safetensors with NAME.json "
                                 "beside it (pickled checkpoints are refused, never loaded)")
        p = p.with_name(p.name + ".safetensors")
    if not p.is_file():
        raise RetrievalError(f"checkpoint not found: {path}")
    return p


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> Checkpoint:
    """Load tower (+ pair head) from safetensors, checking the sidecar and the weights' fingerprint."""
    weights = resolve_checkpoint(path)
    meta = read_json(weights.with_suffix(".json"), "checkpoint metadata")
    if meta.get("format") != FORMAT or "tower" not in meta:
        raise RetrievalError(f"{weights.with_suffix('.json')} is not retrieval checkpoint metadata")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise RetrievalError(f"{weights} is not a valid safetensors file ({e})") from None
    tower = build_tower(meta["tower"], meta.get("embedding_size"), bool(meta.get("deskew", False)),
                        int(meta.get("test_shifts", 0)))
    tower_state = {k[len("tower."):]: v for k, v in state.items() if k.startswith("tower.")}
    if isinstance(meta.get("gate"), dict):  # built before its weights are loaded (retrieval.gate)
        from retrieval.gate import attach_gate, gate_from_meta

        attach_gate(tower, gate_from_meta(tower, meta["gate"]))
    try:
        tower.load_state_dict(tower_state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise RetrievalError(f"{weights} does not hold weights of a {meta['tower']} tower ({first})") from None
    if tower_fingerprint(tower) != meta.get("fingerprint"):
        raise RetrievalError(f"{weights}: weights do not match the fingerprint in its sidecar (file changed or corrupt)")
    head = None
    head_state = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
    if head_state:
        from retrieval.objectives import PairHead  # the head is part of the pair objective (PML comes with it)

        head = PairHead(tower.embedding_size)
        head.load_state_dict(head_state)
        head.to(device).eval()
    tower.to(device).eval()
    return Checkpoint(tower=tower, head=head, meta=meta, path=weights)
