"""A run's components: the schedule, denoiser, sampler and objective its config names, built once and smoke-tested.

:func:`build_components` is the one place a run, ``sample``, ``validate`` and ``bench`` get them from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ddpmkit.errors import ConfigError, PluginCodeError
from ddpmkit.kinds import KINDS
from ddpmkit.registry.blame import blame
from ddpmkit.registry.build import construct
from ddpmkit.runtime.limits import check_fits

if TYPE_CHECKING:
    from ddpmkit.interfaces import Denoiser, NoiseSchedule, Objective, Sampler
    from ddpmkit.registry.discovery import Component
    from ddpmkit.run.config import RunConfig


@dataclass
class Components:
    """What a run config builds, with the registry entry each came from. ``schedule`` is what samplers step on: the
    run's ``[schedule]`` under the ddpm objective, the objective's own levels as a schedule under another
    (:meth:`ddpmkit.interfaces.Objective.sampling_schedule`); ``objective`` None means ddpm's."""

    schedule: NoiseSchedule
    denoiser: Denoiser
    sampler: Sampler
    refs: dict[str, Component]
    objective: Objective | None = None
    _networks: dict[int, Denoiser] = field(default_factory=dict, repr=False)

    def network(self, denoiser: Denoiser | None = None) -> Denoiser:
        """``denoiser`` (default: this run's) as samplers call it on :attr:`schedule` (itself under ddpm); built once
        per network, so that every draw calls (and a compiled draw compiles) the same module."""
        denoiser = self.denoiser if denoiser is None else denoiser
        if self.objective is None:
            return denoiser
        if id(denoiser) not in self._networks:
            self._networks[id(denoiser)] = self.objective.sampling_network(denoiser)
        return self._networks[id(denoiser)]

    def timesteps(self) -> list[int]:
        """The t the sampler visits under this schedule, checked to lie in [0, T)."""
        comp = self.refs["sampler"]
        with blame(comp, "to list its steps"):
            steps = [int(t) for t in self.sampler.timesteps(self.schedule)]
        T = self.schedule.num_timesteps
        if not steps or any(not 0 <= t < T for t in steps):
            raise PluginCodeError(f"{comp.label} lists steps outside [0, {T}): {steps[:5]}...")
        return steps


def build_components(cfg: RunConfig, classes: list[str] | None = None) -> Components:
    """The schedule, denoiser (freshly initialised, on the CPU) and sampler a validated run config names.

    A class-conditional run's denoiser is built for ``classes`` (the dataset's, or a checkpoint's; by
    default those :func:`ddpmkit.run.data.dataset_classes` names without loading the data).
    """
    refs = {kind: cfg.component(kind) for kind in KINDS}
    # the schedule's derived tables: about 16 float64 arrays of length T
    check_fits(
        cfg.num_timesteps * 16 * 8,
        f"schedule.options.num_timesteps = {cfg.num_timesteps:,}",
        "DDPMs use about 1,000 steps",
    )
    c, h, w = cfg.image_shape  # a forward pass holds many activations the size of the image: 64 is a floor
    check_fits(c * h * w * 4 * 64, f"data.image_size = {cfg.data.image_size}", "choose a smaller data.image_size")
    schedule = construct(refs["schedule"], cfg.component_options("schedule"))
    conditional = {"num_classes": _num_classes(cfg, refs["denoiser"], classes)} if cfg.conditioning.enabled else {}
    denoiser = construct(
        refs["denoiser"],
        cfg.component_options("denoiser"),
        image_shape=cfg.image_shape,
        num_timesteps=cfg.num_timesteps,
        **conditional,
    )
    sampler = construct(refs["sampler"], cfg.component_options("sampler"))
    objective = build_objective(cfg, schedule, denoiser.prediction)
    with blame(refs["objective"], "to give its noise levels"):
        sampling = objective.sampling_schedule()
    return Components(sampling, denoiser, sampler, refs, objective)


def build_objective(cfg: RunConfig, schedule: NoiseSchedule, prediction: str) -> Objective:
    """The objective ``[objective]`` names, for the run's ``schedule`` and a denoiser predicting ``prediction``."""
    return construct(
        cfg.component("objective"), cfg.component_options("objective"), schedule=schedule, prediction=prediction
    )


def _num_classes(cfg: RunConfig, component: Component, classes: list[str] | None) -> int:
    """How many classes a conditional run's denoiser is built for; ConfigError when it cannot condition, or
    the data has fewer than two classes."""
    from ddpmkit.registry import discovery

    takes = getattr(discovery.load(component), "conditions", frozenset())
    if cfg.conditioning.kind not in takes:
        raise ConfigError(
            f'conditioning.kind = "{cfg.conditioning.kind}": denoiser {component.label} cannot be conditioned on '
            f"{cfg.conditioning.kind} labels (it declares conditions = {set(takes) or '{}'}); choose one that "
            'declares them, such as unet, or conditioning.kind = "none"'
        )
    if classes is None:
        from ddpmkit.run.data import dataset_classes

        classes = dataset_classes(cfg.data)
    if len(classes) < 2:
        raise ConfigError(
            f'conditioning.kind = "class": {cfg.data.dataset} data under {cfg.data.root} has '
            f"{len(classes)} classes; class conditioning needs at least two (one sub-folder per class)"
        )
    asked = cfg.sample.classes
    missing = [c for c in asked if not 0 <= c < len(classes)] if asked != "all" else []
    if missing:  # said before training, not after it when the samples are drawn
        shown = ", ".join(f"{i} {name}" for i, name in enumerate(classes[:12])) + (", ..." if len(classes) > 12 else "")
        raise ConfigError(
            f"sample.classes = {asked}: the data has {len(classes)} classes ({shown}); {missing} are not among them"
        )
    return len(classes)


def build_checked(cfg: RunConfig, classes: list[str] | None = None) -> Components:
    """Build every component (the denoiser initialised from ``run.seed``) and run :func:`smoke_test`, so that
    errors in a plugin's code surface as one line naming it, before any training."""
    import torch

    torch.manual_seed(cfg.run.seed)
    built = build_components(cfg, classes)
    smoke_test(built, cfg.image_shape)
    return built


def smoke_test(built: Components, image_shape: tuple[int, int, int]) -> None:
    """One tiny forward pass of the denoiser on the CPU (two images, the first and last t) and the
    sampler's step list, so that shape, NaN and plugin errors show before any training."""
    import torch

    from ddpmkit.diffusion import NULL_CLASS, denoise

    built.timesteps()
    denoiser, comp = built.network(), built.refs["denoiser"]
    T = built.schedule.num_timesteps
    x = torch.randn((2, *image_shape), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([T - 1, 0])
    was_training = denoiser.training
    denoiser.eval()
    try:
        with torch.no_grad(), blame(comp, "a forward pass"):
            cond = (
                {"class": torch.tensor([0, NULL_CLASS], device=denoiser.device)}
                if getattr(denoiser, "num_classes", 0)
                else None
            )
            out = denoise(denoiser, x.to(denoiser.device), t.to(denoiser.device), cond)
            if not torch.isfinite(out).all():
                raise ValueError("forward returned non-finite values for finite input")
    finally:
        denoiser.train(was_training)
