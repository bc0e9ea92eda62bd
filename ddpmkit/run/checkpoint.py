"""Checkpoints: atomic save, validated load, "latest" with fall-back, keep-last-K.

A checkpoint is a directory ``<run>/checkpoints/step-<N>/`` holding

- ``model.safetensors`` and ``ema.safetensors`` (weights),
- ``optimizer.pt`` (loads with ``torch.load(weights_only=True)``),
- ``state.json`` (:class:`CheckpointState`: step, epoch, config, identity, manifest, the qualified
  names of the components and the denoiser's prediction target, and the size and sha256 of every file).

It is written under a temporary name and renamed only when complete, so a kill at any moment
leaves either the complete new checkpoint or none; the previous one is never touched before.
This module owns the format: :func:`describe_run` assembles the state, :func:`save_checkpoint`
writes it, :func:`load_checkpoint` reads and validates it, :func:`check_compatible` compares it
with a config. What a run's first start decided (:class:`StartRecord`) is carried in every checkpoint and,
until the first one, in ``<run>/start.json``: :func:`save_start` writes it, :func:`kept_start` reads it back.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ddpmkit.errors import CheckpointError, DdpmkitWarning
from ddpmkit.kinds import KINDS

if TYPE_CHECKING:
    from ddpmkit.run.components import Components
    from ddpmkit.run.config import RunConfig

FORMAT_VERSION = 1
CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "state.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")
#: what a run's first start decided, before its first checkpoint carries it (see StartRecord)
START_FILE = "start.json"
#: the model choice of runs from ddpmkit 0.10 to 0.12 (read, never written)
LEGACY_MODEL_FILE = "budget-model.json"
#: Post-hoc EMA: ``<run>/posthoc-ema/snapshots/step-<N>/`` (one safetensors file per tracked profile) and the
#: EMAs ``ddpmkit ema`` rebuilds, ``<run>/posthoc-ema/sigma-<S>/`` (checkpoint folders holding EMA weights only)
POSTHOC_DIR = "posthoc-ema"
#: the tracked post-hoc EMAs inside a checkpoint (so a resumed run continues them exactly)
TRACKED_FILE = "posthoc-ema.safetensors"


class FileEntry(BaseModel):
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class CheckpointState(BaseModel):
    """The schema of ``state.json``. Fields added since format 1 have defaults, so older checkpoints still load."""

    model_config = ConfigDict(extra="allow")

    format: int
    step: int = Field(ge=0)
    epoch: float = 0.0
    config: dict[str, Any] = Field(default_factory=dict)
    identity: dict[str, Any] = Field(default_factory=dict)
    identity_sha256: str = ""
    manifest: dict[str, Any] = Field(default_factory=dict)
    #: kind -> DISTRIBUTION:NAME of the component that trained (empty before plugin API 2)
    components: dict[str, str] = Field(default_factory=dict)
    #: what the denoiser's output estimates (checkpoints before plugin API 2 are all epsilon)
    prediction: str = "epsilon"
    #: the class names of a class-conditional run, in label order (empty: unconditional)
    classes: list[str] = Field(default_factory=list)
    #: the fp16 loss scaler's state (train.precision = "fp16"), so a resumed run scales as before
    grad_scaler: dict[str, Any] | None = None
    files: dict[str, FileEntry]

    def qualified_name(self, kind: str) -> str | None:
        """The component of ``kind`` that trained, as DISTRIBUTION:NAME (from the manifest for older checkpoints)."""
        if kind in self.components:
            return self.components[kind]
        used = self.manifest.get("plugins", {}).get(kind)
        if isinstance(used, dict) and used.get("distribution") and used.get("name"):
            return f"{used['distribution']}:{used['name']}"
        return None


class StartRecord(BaseModel):
    """What the first start of a run decided, so that a resume decides nothing again and stays exact.

    Each field is the record of the part of ddpmkit that decides it (a dict, so this format owns no training
    code); in ``state.json`` the fields stand at the top level, where they have stood since they were added.
    """

    model_config = ConfigDict(extra="forbid")

    #: which of train.smaller_models a time budget trains (0: the configured model), with the steps estimated
    #: for each model tried and what it was chosen for (smaller_models, budget_s, min_steps)
    budget_model: dict[str, Any] | None = None
    #: the speed modes ``auto`` chose and the figures it chose from
    speed: dict[str, Any] | None = None
    #: a time budget's plan: the steps, the rate they were planned at, and the one re-plan from the loop's rate
    time_plan: dict[str, Any] | None = None
    #: the step the cosine learning-rate decay ends at (the plan of the first start, or of its re-plan)
    lr_decay_end: int | None = None

    def decisions(self) -> dict[str, Any]:
        """The decisions a start announces with its first metrics record (all but the decay's end)."""
        return {k: v for k, v in self.model_dump(exclude={"lr_decay_end"}).items() if v is not None}


@dataclass
class Checkpoint:
    """A validated checkpoint directory."""

    path: Path
    schema: CheckpointState

    @property
    def state(self) -> dict[str, Any]:
        """``state.json`` as a dict."""
        return self.schema.model_dump(mode="json")

    @property
    def step(self) -> int:
        return self.schema.step

    @property
    def start(self) -> StartRecord:
        """What the run's first start decided, as this checkpoint carries it."""
        state = self.schema.model_dump()
        try:
            return StartRecord.model_validate({k: state.get(k) for k in StartRecord.model_fields})
        except ValidationError as exc:
            raise CheckpointError(
                f"{self.path / STATE_FILE}: invalid record of the run's start ({exc.errors()[0]['msg']})"
            ) from None

    def config_for_sampling(self) -> dict[str, Any]:
        """The run's config with each component pinned to the qualified name that trained it, so that
        plugins installed since cannot take its place; training-only tables are left out."""
        config = {k: v for k, v in self.schema.config.items() if k not in ("log", "plugins")}
        for kind in KINDS:
            qualified = self.schema.qualified_name(kind)
            if qualified and isinstance(config.get(kind), dict):
                config[kind] = {**config[kind], "name": qualified}
        return config

    def weights(self, which: str = "ema") -> dict[str, torch.Tensor]:
        """The model's (``"model"``) or the EMA's (``"ema"``) state dict, or those of another safetensors file of
        the checkpoint (by file name)."""
        name = {"model": MODEL_FILE, "ema": EMA_FILE}.get(which, which)
        if name not in self.schema.files:
            what = "the training weights" if which == "model" else name
            raise CheckpointError(f"{self.path}: holds no {what} (it has {', '.join(sorted(self.schema.files))})")
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
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically, then delete all but the newest ``keep``; returns its path.
    ``extra``: more safetensors files (name -> state dict), e.g. the tracked post-hoc EMAs.

    A failed write (a full disk, a read-only folder) removes its partial folder and raises a
    CheckpointError saying that the previous checkpoints are intact.
    """
    root = checkpoints_dir(run_dir)
    try:
        return _save(run_dir, step, model_state, ema_state, optimizer_state, state, keep, extra)
    except OSError as exc:  # write_folder has removed its partial folder
        previous = [p.name for p in root.glob("step-*")] if root.is_dir() else []
        kept = (
            f"the last complete checkpoint, {max(previous)}, is intact" if previous else "no earlier checkpoint exists"
        )
        raise CheckpointError(
            f"could not write checkpoint step {step} in {root}: {exc.strerror or exc}; {kept}. "
            "Free space (or fix the folder) and run the same command again to resume"
        ) from None


def _save(
    run_dir: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    ema_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
    keep: int,
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    root = checkpoints_dir(run_dir)
    buf = io.BytesIO()
    torch.save(optimizer_state, buf)
    blobs = {
        MODEL_FILE: st_save(_contiguous(model_state)),
        EMA_FILE: st_save(_contiguous(ema_state)),
        OPTIMIZER_FILE: buf.getvalue(),
    }
    blobs.update({name: st_save(_contiguous(tensors)) for name, tensors in (extra or {}).items()})
    final = write_folder(root / f"step-{step:08d}", blobs, {**state, "step": step})
    _VERIFIED.add(_verified_key(final))
    _rotate(run_dir, keep)
    return final


def write_folder(final: Path, blobs: dict[str, bytes], state: dict[str, Any]) -> Path:
    """Write ``blobs`` (file name -> bytes) and a ``state.json`` of ``state`` with the size and sha256 of each
    file into the folder ``final``, atomically: under a temporary name, fsynced, then renamed (replacing an
    existing ``final``). Checkpoints, post-hoc EMA snapshots and rebuilt EMAs are all such folders."""
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    for stale in [*root.glob(".tmp-*"), *root.glob(".old-*")]:  # left by a process killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    try:
        files = {name: _write_file(tmp / name, data) for name, data in blobs.items()}
        full_state = CheckpointState.model_validate({**state, "format": FORMAT_VERSION, "files": files})
        _write_file(tmp / STATE_FILE, json.dumps(full_state.model_dump(mode="json"), indent=2, sort_keys=True).encode())
        _fsync_dir(tmp)
    except BaseException:  # a full disk, or a second Ctrl-C mid-write: nothing half-written stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # the same step written again (e.g. a finished run re-run): replace it
        old = root / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_dir(root)
    return final


#: (folder, state.json's mtime) of the checkpoints this process wrote or verified: rotation hashes each once
_VERIFIED: set[tuple[Path, int]] = set()
_REPORTED: set[Path] = set()


def _verified_key(path: Path) -> tuple[Path, int]:
    try:
        return path.resolve(), (path / STATE_FILE).stat().st_mtime_ns
    except OSError:
        return path.resolve(), -1


def _rotate(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints that verify. A broken one is not counted and is left in
    place (reported once): rotation must never delete a good checkpoint to keep a broken one."""
    good = 0
    for path in reversed(step_dirs(run_dir)):
        if _verified_key(path) not in _VERIFIED:
            try:
                load_checkpoint(path)
            except CheckpointError as exc:
                if path not in _REPORTED:
                    _REPORTED.add(path)
                    warnings.warn(
                        f"{exc}: not counted as one of the {keep} checkpoints kept, and left in place "
                        "(delete it or move it away)",
                        DdpmkitWarning,
                        stacklevel=3,
                    )
                continue
        good += 1
        if good > keep:
            shutil.rmtree(path, ignore_errors=True)


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
    try:
        schema = CheckpointState.model_validate(state)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise CheckpointError(f"{state_path}: invalid {where}: {first['msg']}") from None
    m = _STEP_DIR.match(path.name)
    if m and int(m.group(1)) != schema.step:
        raise CheckpointError(f"{state_path}: says step {schema.step} but the folder is {path.name}")
    for name, meta in schema.files.items():
        file = path / name
        try:
            data = file.read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"{file}: missing (incomplete checkpoint)") from None
        except OSError as exc:
            raise CheckpointError(f"{file}: unreadable ({exc})") from None
        if len(data) != meta.bytes:
            raise CheckpointError(f"{file}: truncated or wrong size ({len(data)} bytes, expected {meta.bytes})")
        if hashlib.sha256(data).hexdigest() != meta.sha256:
            raise CheckpointError(f"{file}: corrupt (checksum mismatch)")
    _VERIFIED.add(_verified_key(path))
    return Checkpoint(path, schema)


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
    if (source / STATE_FILE).exists() or (_STEP_DIR.match(source.name) and not checkpoints_dir(source).is_dir()):
        return load_checkpoint(source)
    if not source.is_dir():
        raise CheckpointError(f"{source}: no such run or checkpoint directory")
    ckpt = latest_checkpoint(source, warn)
    if ckpt is None:
        raise CheckpointError(f"{source}: no complete checkpoint in {checkpoints_dir(source)} (train it first)")
    return ckpt


# --- post-hoc EMA snapshots and rebuilt EMAs ------------------------------------------------------------


def profile_file(sigma_rel: float) -> str:
    """The file of one profile's weights in a snapshot folder, and the folder name of a rebuilt EMA's stem."""
    return f"sigma-{sigma_rel:.3f}.safetensors"


def snapshots_dir(run_dir: Path) -> Path:
    return Path(run_dir) / POSTHOC_DIR / "snapshots"


def rebuilt_dir(run_dir: Path, sigma_rel: float) -> Path:
    """Where ``ddpmkit ema`` writes the EMA of ``sigma_rel`` (a checkpoint folder that samples like one)."""
    return Path(run_dir) / POSTHOC_DIR / profile_file(sigma_rel).removesuffix(".safetensors")


def save_snapshot(
    run_dir: Path, step: int, profiles: dict[float, dict[str, torch.Tensor]], gammas: dict[float, float]
) -> Path:
    """Write the snapshot of every tracked profile (sigma_rel -> state dict) at ``step``, atomically; a snapshot
    of the same step (a resumed run replaying it) is replaced by the identical one."""
    blobs = {profile_file(s): st_save(_contiguous(w)) for s, w in profiles.items()}
    info = {"sigma_rels": list(profiles), "gammas": [gammas[s] for s in profiles]}
    try:
        return write_folder(snapshots_dir(run_dir) / f"step-{step:08d}", blobs, {"step": step, "posthoc_ema": info})
    except OSError as exc:
        raise CheckpointError(
            f"could not write the post-hoc EMA snapshot of step {step} in {snapshots_dir(run_dir)}: "
            f"{exc.strerror or exc}. Free space and run the same command again to resume"
        ) from None


def load_snapshots(run_dir: Path, up_to: int | None = None) -> list[Checkpoint]:
    """The run's post-hoc EMA snapshots (each verified), oldest first; only those of steps <= ``up_to``."""
    root = snapshots_dir(run_dir)
    found = (
        sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))) if root.is_dir() else []
    )
    return [load_checkpoint(p) for step, p in found if up_to is None or step <= up_to]


def save_rebuilt(
    run_dir: Path, sigma_rel: float, weights: dict[str, torch.Tensor], source: Checkpoint, info: dict[str, Any]
) -> Path:
    """Write a rebuilt EMA as a checkpoint folder: ``source``'s state (config, components, classes) with these
    weights as its EMA and ``info`` (how it was rebuilt) under ``posthoc_ema``."""
    state = {k: v for k, v in source.state.items() if k not in ("files", "format", "grad_scaler")}
    return write_folder(
        rebuilt_dir(run_dir, sigma_rel),
        {EMA_FILE: st_save(_contiguous(weights))},
        {**state, "step": info["step"], "posthoc_ema": info},
    )


# --- what a run's first start decided ---------------------------------------------------------------------


def save_start(run_dir: Path, record: StartRecord) -> None:
    """Write ``record`` as the run's ``start.json``, replaced whole (a kill leaves the previous record or none)."""
    path = run_dir / START_FILE
    tmp = path.with_name(f".{START_FILE}.tmp")
    tmp.write_text(json.dumps(record.model_dump(mode="json", exclude_none=True), indent=2, sort_keys=True))
    os.replace(tmp, path)


def kept_start(run_dir: Path, resume: Checkpoint | None) -> StartRecord:
    """What the run's first start decided: as the checkpoint it resumes from carries it, with the model choice
    of ``start.json`` (made before anything trained: the guide trains the chosen model too), or of the
    ``budget-model.json`` of runs from ddpmkit 0.10 to 0.12. Nothing readable is an empty record."""
    record = resume.start if resume is not None else StartRecord()
    saved = _json_dict(run_dir / START_FILE)
    if saved is None:
        legacy = _json_dict(run_dir / LEGACY_MODEL_FILE)
        saved = {"budget_model": legacy} if legacy is not None else {}
    model = saved.get("budget_model")
    return record.model_copy(update={"budget_model": model if isinstance(model, dict) else None})


def forget_start(run_dir: Path) -> None:
    """Remove the run's record of its first start (--fresh, or a start refused before anything trained)."""
    for name in (START_FILE, LEGACY_MODEL_FILE):
        (run_dir / name).unlink(missing_ok=True)


def _json_dict(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# --- what a checkpoint says about its run ----------------------------------------------------------------


def describe_run(
    cfg: RunConfig, built: Components, fingerprint: str, version: str, classes: list[str] | None = None
) -> dict[str, Any]:
    """The part of ``state.json`` that is the same for every checkpoint of a run (all but step and files);
    ``classes``: a conditional run's class names."""
    identity = cfg.identity()
    used = {
        kind: {
            "name": c.name,
            "plugin": c.plugin.name,
            "distribution": c.plugin.distribution,
            "version": c.plugin.version,
        }
        for kind, c in built.refs.items()
    }
    return {
        "config": cfg.model_dump(mode="json"),
        "identity": identity,
        "identity_sha256": hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest(),
        "components": {kind: c.qualified for kind, c in built.refs.items()},
        "prediction": built.denoiser.prediction,
        "classes": list(classes or []),
        "manifest": {
            "ddpmkit": version,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "plugins": used,
            "seed": cfg.run.seed,
            "dataset_fingerprint": fingerprint,
            "classes": len(classes or []),
        },
        "rng": "every stream is derived from run.seed and the step (see ddpmkit.training.loop.derive_seed)",
    }


_MISSING = object()


def _option_default(cfg: RunConfig, key: str) -> Any:
    """The default of a component option named by a flattened identity key (``denoiser.options.prediction``)."""
    kind, _, rest = key.partition(".options.")
    if not rest or kind not in KINDS:
        return _MISSING
    field = type(cfg.component_options(kind)).model_fields.get(rest.split(".")[0])
    return _MISSING if field is None or "." in rest else field.get_default(call_default_factory=True)


def check_compatible(ckpt: Checkpoint, cfg: RunConfig, fingerprint: str) -> None:
    """Refuse to resume from a checkpoint whose model, process or data differ from ``cfg``.

    Names are compared qualified (a checkpoint from before qualified names counts as the plugin its
    manifest records); an option that is new since the checkpoint was written matches at its default.
    """
    saved = dict(ckpt.schema.identity)
    for kind in KINDS:
        key, qualified = f"{kind}.name", ckpt.schema.qualified_name(kind)
        if key in saved and ":" not in str(saved[key]) and qualified:
            saved[key] = qualified
    now = cfg.identity()
    keys = sorted(
        k
        for k in set(saved) | set(now)
        if saved.get(k, _MISSING) != now.get(k, _MISSING)
        and not (k not in saved and now.get(k) == _option_default(cfg, k))
    )
    details = [f"{k} (checkpoint: {saved.get(k)!r}, config: {now.get(k)!r})" for k in keys]
    saved_fp = ckpt.schema.manifest.get("dataset_fingerprint")
    if saved_fp is not None and saved_fp != fingerprint:
        details.append("the training data (its fingerprint differs)")
    if details:
        raise CheckpointError(
            f"cannot resume {ckpt.path}: the config differs in "
            + "; ".join(details)
            + " — use --fresh to start over, or another run.name"
        )
