"""Runs to and from HuggingFace diffusers folders (the optional extra ``ddpmkit[diffusers]``).

:func:`export_diffusers` writes a run as a folder ``DDPMPipeline.from_pretrained`` (or ``DDIMPipeline``) loads,
its scheduler configured from the run's betas, prediction target and sampler, with a model card; for a
denoiser diffusers cannot build (ddpmkit's own UNet) it writes the scheduler and the weights and says so.
:func:`load_pretrained` reads such a folder (any ``UNet2DModel`` pipeline, e.g. a DDPM from the Hub) for
``load_run`` to hold as a run, to sample, evaluate or fine-tune it with ddpmkit.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ddpmkit.errors import ConfigError, DataError, DdpmkitError
from ddpmkit.extras import require
from ddpmkit.version import __version__

#: ddpmkit's prediction targets under diffusers' names, and back.
PREDICTION_TYPES = {"epsilon": "epsilon", "x0": "sample", "v": "v_prediction"}
FROM_PREDICTION_TYPES = {v: k for k, v in PREDICTION_TYPES.items()}
DIFFUSERS_UNET = "ddpmkit:diffusers-unet"


def is_diffusers_folder(path: Path) -> bool:
    """A pipeline folder (``model_index.json`` or ``unet/config.json``) or a bare ``UNet2DModel`` folder."""
    path = Path(path)
    if (path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file():
        return True
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("_class_name") == "UNet2DModel"
    except (OSError, ValueError, AttributeError):
        return False


# --- out ----------------------------------------------------------------------------------------


@dataclass
class Exported:
    """What :func:`export_diffusers` wrote: the folder, the pipeline class that loads it (None: diffusers
    cannot build the denoiser), and the files."""

    path: Path
    pipeline: str | None
    files: list[Path] = field(default_factory=list)


def scheduler_for(loaded: Any) -> tuple[Any, str, str | None]:
    """The diffusers scheduler that samples the run's process as its sampler does, the pipeline class that
    drives it, and a note when the run's sampler has no diffusers twin."""
    import diffusers

    cfg, schedule = loaded.config, loaded.components.schedule
    objective = cfg.component("objective").qualified
    if objective == "ddpmkit:flow":
        # Euler steps evenly spaced in t from 1 down to 1/L, the network told t L: the flow objective's own levels
        return (
            diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=loaded.components.objective.num_levels),
            "DDPMPipeline",
            "a flow run: the pipeline drives diffusers' FlowMatchEulerDiscreteScheduler (Euler steps in t); ddpmkit's "
            'ddim with spacing = "linspace" takes the same steps, and draws the same images, when the steps less one '
            "divide the objective's num_levels less one",
        )
    if not cfg.uses_schedule:
        raise ConfigError(
            f"objective {cfg.objective.name}: no diffusers scheduler samples it as ddpmkit does"
            + (
                " (EDMEulerScheduler tells the network c_noise = ln(sigma) / 4, where ddpmkit's edm tells it ln sigma "
                "mapped onto [0, L - 1], so an exported pipeline would call the network at the wrong times)"
                if objective == "ddpmkit:edm"
                else ""
            )
            + "; sample it with ddpmkit (load_run)"
        )
    common = dict(
        num_train_timesteps=schedule.num_timesteps,
        trained_betas=schedule.betas.double().cpu().tolist(),
        prediction_type=PREDICTION_TYPES[loaded.denoiser.prediction],
    )
    name, options = cfg.component("sampler").qualified, cfg.component_options("sampler")
    clip = bool(getattr(options, "clip_denoised", False))
    if name == "ddpmkit:ddim":
        return (
            diffusers.DDIMScheduler(
                **common, clip_sample=clip, set_alpha_to_one=True, steps_offset=0, timestep_spacing=options.spacing
            ),
            "DDIMPipeline",
            None,
        )
    variance = getattr(options, "variance", "beta") if name == "ddpmkit:ddpm" else "beta"
    note = (
        None
        if name == "ddpmkit:ddpm"
        else (
            f"the run samples with {cfg.sampler.name}, which has no diffusers scheduler of its own: the export's "
            "scheduler is DDPM's ancestral sampler over the same betas"
        )
    )
    return (
        diffusers.DDPMScheduler(
            **common, clip_sample=clip, variance_type="fixed_large" if variance == "beta" else "fixed_small"
        ),
        "DDPMPipeline",
        note,
    )


def export_diffusers(
    loaded: Any, out: Path, *, license: str = "other", log: Callable[[str], None] = lambda m: None
) -> Exported:
    """Write ``loaded`` (a :class:`~ddpmkit.sampling.loaded.LoadedRun`, its EMA or raw weights as loaded) to the
    new or empty folder ``out`` for diffusers, with a model card (``README.md``). Written beside ``out`` and renamed
    when complete: a full disk or a kill leaves no half-written folder, and a retry finds ``out`` as it was."""
    from safetensors import SafetensorError

    require("diffusers", "ddpmkit export --format diffusers")
    scheduler_for(loaded)  # a run no diffusers scheduler samples is refused before anything is written
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out}: exists and is not an empty folder; export into a new folder")
    for stale in out.parent.glob(f".{out.name}.export-*") if out.parent.is_dir() else []:
        shutil.rmtree(stale, ignore_errors=True)  # left by an export that was killed
    tmp = out.with_name(f".{out.name}.export-{os.getpid()}")
    try:
        tmp.mkdir(parents=True)
        pipeline = _write_export(loaded, tmp, license)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except (OSError, SafetensorError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        why = getattr(exc, "strerror", None) or exc
        raise DdpmkitError(f"{out}: cannot write the export ({why}); nothing was left behind") from None
    files = sorted(p for p in out.rglob("*") if p.is_file())
    return Exported(out, pipeline, files)


def _write_export(loaded: Any, out: Path, license: str) -> str | None:
    """The export's files in the existing folder ``out``; the diffusers pipeline class that loads it, if any."""
    scheduler, pipeline, note = scheduler_for(loaded)
    denoiser = loaded.denoiser
    if loaded.config.component("denoiser").qualified == DIFFUSERS_UNET:
        import diffusers

        unet = denoiser.unet.to("cpu", torch.float32).eval()
        getattr(diffusers, pipeline)(unet=unet, scheduler=scheduler).save_pretrained(str(out), safe_serialization=True)
        denoiser.unet.to(loaded.device)
    else:
        from safetensors.torch import save_file

        pipeline = None
        scheduler.save_pretrained(str(out / "scheduler"))
        state = {k: v.detach().to("cpu").contiguous() for k, v in denoiser.state_dict().items()}
        save_file(state, str(out / "ddpmkit-denoiser.safetensors"))
        (out / "ddpmkit-denoiser.json").write_text(
            json.dumps(
                {
                    "component": loaded.config.component("denoiser").qualified,
                    "options": loaded.config.denoiser.options,
                    "image_shape": list(denoiser.image_shape),
                    "num_timesteps": denoiser.num_timesteps,
                    "prediction": denoiser.prediction,
                    "classes": loaded.classes,
                    "ddpmkit": __version__,
                },
                indent=2,
            )
            + "\n"
        )
        note = ((note + "; ") if note else "") + (
            f"diffusers cannot build ddpmkit's {loaded.config.denoiser.name} architecture: the folder holds the "
            "scheduler and the network's safetensors state dict with its config, which ddpmkit loads "
            "(`ddpmkit.load_run` on the run) and diffusers does not"
        )
    (out / "README.md").write_text(model_card(loaded, pipeline=pipeline, license=license, note=note))
    return pipeline


def model_card(loaded: Any, *, pipeline: str | None, license: str, note: str | None) -> str:
    """A model card in the Hub's format: YAML metadata, then what was trained, on what, how it samples and how it
    scored."""
    cfg, denoiser = loaded.config, loaded.denoiser
    c, h, w = denoiser.image_shape
    T = denoiser.num_timesteps
    tags = ["ddpmkit", "diffusion", "ddpm", "pytorch"] + (["diffusers"] if pipeline else [])
    meta = [
        "---",
        f"license: {license}",
        *(["library_name: diffusers"] if pipeline else []),
        "pipeline_tag: unconditional-image-generation",
        "tags:",
        *[f"- {t}" for t in tags],
        "---",
    ]
    fingerprint = loaded.manifest.get("data_fingerprint") or loaded.manifest.get("dataset_fingerprint")
    lines = [
        f"# {cfg.run.name}",
        "",
        f"A denoising diffusion model (Ho et al. 2020) trained with [ddpmkit](https://pypi.org/project/ddpmkit/) "
        f"{loaded.manifest.get('ddpmkit', __version__)}: {c}x{h}x{w} images, T = {T} steps, predicting "
        f"{denoiser.prediction}.",
        "",
        "## Training",
        "",
        f"- data: `{cfg.data.dataset}` ({c} channel{'s' if c > 1 else ''}, {h}x{w})"
        + (f", {len(loaded.classes)} classes: {', '.join(loaded.classes)}" if loaded.classes else ""),
        *([f"- data fingerprint (sha256 of the images): `{fingerprint}`"] if fingerprint else []),
        (
            f"- schedule: `{cfg.schedule.name}` {json.dumps(cfg.schedule.options)}"
            if cfg.uses_schedule
            else f"- objective: `{cfg.objective.name}` {json.dumps(cfg.objective.options)}"
        ),
        f"- denoiser: `{cfg.denoiser.name}`, {denoiser.num_parameters():,} parameters",
        f"- {loaded.step:,} optimizer steps of batch {cfg.train.batch_size}, Adam at lr {cfg.train.lr:g}, "
        f"EMA decay {cfg.train.ema_decay:g}; the weights here are the {'EMA' if loaded.weights == 'ema' else 'raw'} "
        "weights",
        f"- conditioning: {cfg.conditioning.kind}",
        "",
        "## Sampling",
        "",
        f"ddpmkit samples it with `{cfg.sampler.name}` {json.dumps(cfg.sampler.options)}"
        + (f", guidance weight {cfg.guidance.weight:g} ({cfg.guidance_method})" if cfg.guidance.enabled else "")
        + ".",
    ]
    if pipeline:
        steps = {"DDPMPipeline": T}.get(pipeline, getattr(cfg.component_options("sampler"), "steps", 50))
        lines += [
            "",
            "```python",
            f"from diffusers import {pipeline}",
            "",
            f'pipe = {pipeline}.from_pretrained("PATH/OR/HUB-ID")',
            f"images = pipe(batch_size=16, num_inference_steps={steps}).images  # PIL images",
            "```",
            "",
            "The scheduler holds the run's betas (`trained_betas`) and prediction target, so it samples the "
            "process the network was trained on.",
        ]
        if cfg.conditioning.enabled:
            lines += [
                "The network is class-conditional (`num_class_embeds`: one row per class and a last one for "
                "no class); diffusers' pipeline does not pass class labels, so it samples the null class: "
                "call the UNet with `class_labels` for a class."
            ]
        if cfg.guidance.enabled:
            lines += ["diffusers' pipeline does not guide: ddpmkit's guided samples are better than its own."]
    if note:
        lines += ["", f"Note: {note}."]
    lines += ["", "## Evaluation", ""]
    lines += _evaluation_lines(loaded.run_dir)
    lines += [
        "",
        "## Upload",
        "",
        "With the Hub's own CLI (huggingface_hub): `hf upload USER/NAME THIS-FOLDER` "
        "(older versions: `huggingface-cli upload USER/NAME THIS-FOLDER`).",
        "",
    ]
    return "\n".join(meta + [""] + lines)


def _evaluation_lines(run_dir: Path) -> list[str]:
    """The run's ``ddpmkit eval`` figures (``eval.json``), or how to get them."""
    path = Path(run_dir) / "eval.json"
    try:
        r = json.loads(path.read_text())
        s, f = r["samples"], r["floor"]
        return [
            f"`ddpmkit eval` on {r['num_samples']:,} samples (MNIST-classifier features; the floor is real "
            "training images):",
            "",
            "| statistic | samples | floor |",
            "| --- | --- | --- |",
            f"| classifier FID | {s['fid']:.2f} | {f['fid']:.2f} |",
            f"| precision / recall | {s['precision']:.3f} / {s['recall']:.3f} | {f['precision']:.3f} / "
            f"{f['recall']:.3f} |",
            f"| confidence > 0.9 | {s['confident_share']:.1%} | {f['confident_share']:.1%} |",
        ]
    except (OSError, ValueError, KeyError, TypeError):
        return [
            "Not evaluated: `ddpmkit eval RUN` writes `RUN/eval.json`, and an export after it shows the figures here."
        ]


# --- in -----------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable JSON config ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: not a JSON object")
    return data


def pretrained_config(folder: Path) -> tuple[dict[str, Any], list[str]]:
    """The ddpmkit config (as a dict) that samples the diffusers folder as its scheduler does, and its classes."""
    folder = Path(folder)
    unet_dir = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
    unet = _read_json(unet_dir / "config.json")
    sched_path = folder / "scheduler" / "scheduler_config.json"
    sched = _read_json(sched_path) if sched_path.is_file() else {}  # a bare UNet: the DDPM paper's process
    T = int(sched.get("num_train_timesteps", 1000))
    if sched.get("trained_betas") is not None:
        schedule = {
            "name": "betas",
            "options": {"num_timesteps": T, "betas": [float(b) for b in sched["trained_betas"]]},
        }
    elif sched.get("beta_schedule", "linear") == "linear":
        schedule = {
            "name": "linear",
            "options": {
                "num_timesteps": T,
                "beta_start": float(sched.get("beta_start", 1e-4)),
                "beta_end": float(sched.get("beta_end", 0.02)),
            },
        }
    elif sched.get("beta_schedule") == "squaredcos_cap_v2":
        schedule = {"name": "cosine", "options": {"num_timesteps": T}}
    else:
        raise ConfigError(
            f"{sched_path}: beta_schedule {sched.get('beta_schedule')!r} has no ddpmkit schedule "
            "(linear, squaredcos_cap_v2 and trained_betas do)"
        )
    prediction = FROM_PREDICTION_TYPES.get(sched.get("prediction_type", "epsilon"))
    if prediction is None:
        raise ConfigError(
            f"{sched_path}: prediction_type {sched.get('prediction_type')!r}: ddpmkit knows "
            f"{', '.join(PREDICTION_TYPES.values())}"
        )
    clip = bool(sched.get("clip_sample", False))
    if sched.get("_class_name") == "DDIMScheduler":
        spacing = sched.get("timestep_spacing", "leading")
        sampler = {
            "name": "ddim",
            "options": {
                "steps": min(50, T),
                "clip_denoised": clip,
                "spacing": spacing if spacing in ("linspace", "leading", "trailing") else "leading",
            },
        }
    else:
        variance = "posterior" if sched.get("variance_type", "fixed_small") == "fixed_small" else "beta"
        sampler = {"name": "ddpm", "options": {"variance": variance, "clip_denoised": clip}}
    size = unet.get("sample_size", 32)
    size = int(size if isinstance(size, int) else size[0])
    embeds = int(unet.get("num_class_embeds") or 0)
    classes = (
        [str(i) for i in range(embeds - 1)] if embeds > 1 else []
    )  # ddpmkit's convention: the last row is no class
    config = {
        "run": {"name": folder.resolve().name or "pretrained", "dir": str(folder.resolve().parent)},
        "data": {
            "dataset": "image-folder",
            "root": str(folder),
            "channels": int(unet.get("in_channels", 3)),
            "image_size": size,
        },
        "schedule": schedule,
        "denoiser": {"name": "diffusers-unet", "options": {"pretrained": str(unet_dir), "prediction": prediction}},
        "sampler": sampler,
        "conditioning": {"kind": "class" if classes else "none"},
    }
    return config, classes


def load_pretrained(
    folder: Path, *, device: str | None = None, sampler: str | None = None, overrides: list[str] | None = None
) -> tuple[Any, Any, list[str]]:
    """A diffusers folder's config, components (its UNet's weights loaded, in eval mode on ``device``) and
    classes, for :func:`ddpmkit.sampling.loaded.load_run` to hold as a run (step 0: the folder says nothing
    of its training)."""
    from ddpmkit.run.components import build_components
    from ddpmkit.run.config import config_from_dict
    from ddpmkit.runtime.device import pick_device

    require("diffusers", f"{folder}: a diffusers folder")
    config, classes = pretrained_config(folder)
    if sampler is not None:
        config["sampler"] = {"name": sampler, "options": {}}
    cfg = config_from_dict(config, overrides=overrides or [])
    built = build_components(cfg, classes or None)
    built.denoiser.to(pick_device(device or cfg.run.device)).eval()
    return cfg, built, classes
