"""Checkpoints: atomic save, validated load, "latest" with fall-back, keep-last-K.

A checkpoint is a directory ``<run>/checkpoints/step-<N>/`` holding

- ``model.safetensors`` and ``ema.safetensors`` (weights),
- ``optimizer.pt`` (loads with ``torch.load(weights_only=True)``),
- ``state.json`` (step, epoch, config identity, manifest, and the size and sha256 of every file).

It is written under a temporary name and renamed only when complete, so a kill at any moment
leaves either the complete new checkpoint or none; the previous one is never touched before.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import CheckpointError

FORMAT_VERSION = 1
CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "state.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class Checkpoint:
    """A validated checkpoint directory."""

    path: Path
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def weights(self, which: str = "ema") -> dict[str, torch.Tensor]:
        """The model's (``"model"``) or the EMA's (``"ema"``) state dict."""
        name = {"model": MODEL_FILE, "ema": EMA_FILE}[which]
        try:
            return st_load((self.path / name).read_bytes())
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{self.path / name}: cannot read weights ({exc})") from None

    def optimizer_state(self) -> dict[str, Any]:
        path = self.path / OPTIMIZER_FILE
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot read optimizer state ({type(exc).__name__}: {exc})") from None


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def step_dirs(run_dir: Path) -> list[Path]:
    """Complete-looking checkpoint directories (by name), oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _write_file(path: Path, data: bytes) -> dict[str, Any]:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    ema_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint ``step`` atomically, then delete all but the newest ``keep``; returns its path."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    for stale in root.glob(".tmp-*"):  # left by a process killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    tmp.mkdir()
    files = {
        MODEL_FILE: _write_file(tmp / MODEL_FILE, st_save(_contiguous(model_state))),
        EMA_FILE: _write_file(tmp / EMA_FILE, st_save(_contiguous(ema_state))),
    }
    buf = io.BytesIO()
    torch.save(optimizer_state, buf)
    files[OPTIMIZER_FILE] = _write_file(tmp / OPTIMIZER_FILE, buf.getvalue())
    full_state = {"format": FORMAT_VERSION, **state, "step": step, "files": files}
    _write_file(tmp / STATE_FILE, json.dumps(full_state, indent=2, sort_keys=True).encode())
    _fsync_dir(tmp)
    if final.exists():  # the same step written again (e.g. a finished run re-run): replace it
        old = root / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_dir(root)
    for old in step_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> Checkpoint:
    """Read and validate a checkpoint directory; CheckpointError names the file at fault."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    state_path = path / STATE_FILE
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{state_path}: missing (incomplete checkpoint)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{state_path}: unreadable ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION or "files" not in state:
        raise CheckpointError(f"{state_path}: not a ddpmkit checkpoint of format {FORMAT_VERSION}")
    for name, meta in state["files"].items():
        file = path / name
        try:
            data = file.read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"{file}: missing (incomplete checkpoint)") from None
        except OSError as exc:
            raise CheckpointError(f"{file}: unreadable ({exc})") from None
        if len(data) != meta["bytes"]:
            raise CheckpointError(f"{file}: truncated or wrong size ({len(data)} bytes, expected {meta['bytes']})")
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise CheckpointError(f"{file}: corrupt (checksum mismatch)")
    return Checkpoint(path, state)


def latest_checkpoint(run_dir: Path, warn: Callable[[str], None] | None = None) -> Checkpoint | None:
    """The newest checkpoint that validates; broken newer ones are reported through ``warn`` and skipped."""
    for path in reversed(step_dirs(run_dir)):
        try:
            return load_checkpoint(path)
        except CheckpointError as exc:
            if warn is not None:
                warn(f"skipping broken checkpoint: {exc}")
    return None


def find_checkpoint(source: Path, warn: Callable[[str], None] | None = None) -> Checkpoint:
    """A checkpoint directory itself, or the latest checkpoint of a run directory."""
    source = Path(source)
    if (source / STATE_FILE).exists() or _STEP_DIR.match(source.name):
        return load_checkpoint(source)
    if not source.is_dir():
        raise CheckpointError(f"{source}: no such run or checkpoint directory")
    ckpt = latest_checkpoint(source, warn)
    if ckpt is None:
        raise CheckpointError(f"{source}: no complete checkpoint in {checkpoints_dir(source)} (train it first)")
    return ckpt
