"""A trained run loaded once and sampled many times: :func:`load_run` and :class:`LoadedRun`.

``ddpmkit sample``, ``eval``, ``sweep`` and the end of ``ddpmkit run`` all draw through it, so a sweep
over ten samplers verifies and builds its checkpoint once::

    run = ddpmkit.load_run("runs/mnist-cpu")
    images = run.sample(16, sampler="ddim", steps=50, seed=0)   # uint8 [16, H, W, C]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ddpmkit.errors import ConfigError, DdpmkitError
from ddpmkit.guidance import ClassConditioned, GuidedDenoiser, guided_at
from ddpmkit.interfaces import Denoiser, Sampler
from ddpmkit.registry import discovery
from ddpmkit.registry.blame import blame
from ddpmkit.registry.build import construct
from ddpmkit.run.checkpoint import Checkpoint, find_checkpoint, latest_checkpoint
from ddpmkit.run.components import Components, build_components
from ddpmkit.run.config import ALL_CLASSES, Override, RunConfig, config_from_dict
from ddpmkit.run.data import to_uint8
from ddpmkit.run.guide import guide_dir
from ddpmkit.runtime.device import pick_device
from ddpmkit.runtime.limits import check_fits
from ddpmkit.runtime.speed import SpeedModes
from ddpmkit.sampling.diffusers_io import is_diffusers_folder, load_pretrained
from ddpmkit.sampling.draw import NonFiniteSamples, ProgressFn, generate
from ddpmkit.sampling.images import to_pil

#: The [train] keys that also decide how sampling runs, and so may change when sampling from a checkpoint.
SAMPLING_SPEED_KEYS = ("train.precision", "train.channels_last", "train.compile")
#: Keys outside [sampler], [sample] and [run] that sampling from a checkpoint may change.
SAMPLING_KEYS = (*SAMPLING_SPEED_KEYS, "guidance.weight", "guidance.interval", "guidance.method")
Weights = Literal["ema", "model"]
#: Which classes to draw: "all", one class, or several (each an index or a class name); None: the config's.
Classes = str | int | Sequence[int | str] | None


@dataclass(frozen=True)
class SamplingPlan:
    """What one draw runs: the config it follows, the sampler built from it, and the steps it takes."""

    config: RunConfig
    sampler: Sampler
    components: Components
    timesteps: list[int]
    #: the images the draw is for, when the plan was asked for a count
    images: int | None = None

    @property
    def guided(self) -> bool:
        return self.config.guidance.enabled

    @property
    def evaluations(self) -> int:
        """Network evaluations per image: the sampler's denoiser calls (``Sampler.num_evaluations``), and for a
        guided step (in the guidance interval) as many of D_0."""
        calls = self.sampler.num_evaluations(self.components.schedule)
        if not self.guided:
            return calls
        guided = guided_at(torch.tensor(self.timesteps), self.config.guidance.interval)
        return calls + round(calls * float(guided.double().mean()))

    @property
    def total_evaluations(self) -> int | None:
        """Network evaluations of the whole draw (``images`` x ``evaluations``); None without a count."""
        return None if self.images is None else self.images * self.evaluations


class LoadedRun:
    """A trained run's weights, verified and loaded once, that draws images as often as asked.

    ``config`` is the run's validated config (with any sampling overrides), ``components`` its schedule,
    sampler and denoiser (holding the loaded weights, in eval mode on ``device``), ``step`` the step the
    weights were saved at, ``checkpoint`` the checkpoint they came from (None for weights still in memory
    at the end of ``ddpmkit run``), ``classes`` the class names of a class-conditional run (empty otherwise).
    """

    def __init__(
        self,
        config: RunConfig,
        components: Components,
        *,
        run_dir: Path,
        step: int,
        weights: Weights = "ema",
        checkpoint: Checkpoint | None = None,
        classes: list[str] | None = None,
    ) -> None:
        self.config, self.components = config, components
        self.run_dir, self.step, self.weights, self.checkpoint = Path(run_dir), step, weights, checkpoint
        self.classes = list(classes or [])
        self._guide: Denoiser | None = None

    @property
    def conditional(self) -> bool:
        """Whether the run was trained on class labels (and so can be asked for classes)."""
        return self.config.conditioning.enabled

    def labels(self, num: int, classes: Classes = None) -> torch.Tensor:
        """The class of each of ``num`` images: ``classes`` ("all", a class, or a list of classes, each an index
        or a name; default ``sample.classes``) in equal contiguous groups, in the order given. ConfigError for an
        unconditional run or a class it does not have."""
        self._refuse_unless_conditional()
        wanted = self.config.sample.classes if classes is None else classes
        indices = (
            list(range(len(self.classes)))
            if wanted == ALL_CLASSES
            else [self._class_index(c) for c in (wanted if isinstance(wanted, (list, tuple)) else [wanted])]
        )
        if not indices:
            raise ConfigError("no classes asked for")
        per, extra = divmod(num, len(indices))
        sizes = [per + (1 if i < extra else 0) for i in range(len(indices))]
        return torch.tensor([c for c, size in zip(indices, sizes) for _ in range(size)], dtype=torch.int64)

    def _refuse_unless_conditional(self) -> None:
        if not self.conditional:
            raise ConfigError(
                f"{self.source} was trained without class labels: it cannot be asked for a class "
                '(conditioning.kind = "class" trains a run that can)'
            )

    def _class_index(self, c: int | str) -> int:
        names = ", ".join(f"{i} ({name})" if name != str(i) else name for i, name in enumerate(self.classes))
        if isinstance(c, str) and c in self.classes:
            return self.classes.index(c)
        try:
            index = int(c)
        except (TypeError, ValueError):
            index = -1
        if not 0 <= index < len(self.classes) or isinstance(c, bool):
            raise ConfigError(f"class {c!r}: {self.source} knows classes {names}")
        return index

    @property
    def denoiser(self) -> Denoiser:
        return self.components.denoiser

    def load_weights(self, source: str | Path) -> None:
        """Replace the network's weights, in place, by the EMA weights of another checkpoint folder of the same
        run (``RUN/posthoc-ema/sigma-S``, an older checkpoint): components, guide and compiled code are kept.
        ConfigError for a checkpoint of another model, process or data."""
        ckpt = find_checkpoint(Path(source))
        mine = self.checkpoint.schema.identity_sha256 if self.checkpoint is not None else None
        if mine is not None and ckpt.schema.identity_sha256 != mine:
            raise ConfigError(
                f"{ckpt.path} is a checkpoint of another run than {self.source} (its model, process "
                "or data differ): load it with ddpmkit.load_run"
            )
        with blame(self.components.refs["denoiser"], "to load the checkpoint's weights"):
            self.denoiser.load_state_dict(ckpt.weights("ema"))
        self.checkpoint, self.step, self.weights = ckpt, ckpt.step, "ema"

    @property
    def device(self) -> torch.device:
        return self.components.denoiser.device

    @property
    def manifest(self) -> dict[str, Any]:
        """Versions, plugins and the dataset fingerprint the weights were trained with (empty in memory)."""
        return self.checkpoint.schema.manifest if self.checkpoint is not None else {}

    @property
    def source(self) -> Path:
        """The checkpoint folder the weights came from, or the run folder."""
        return self.checkpoint.path if self.checkpoint is not None else self.run_dir

    def plan(
        self,
        num: int | None = None,
        *,
        sampler: str | None = None,
        steps: int | None = None,
        options: dict[str, Any] | None = None,
        guidance: float | None = None,
    ) -> SamplingPlan:
        """The run's own sampling, or another sampler, step count (``sampler.options.steps``), sampler options
        or guidance weight, validated as a config would be; ``num``: the images a draw is for (the plan then
        counts the network evaluations of the whole draw, ``total_evaluations``)."""
        if num is not None and (isinstance(num, bool) or not isinstance(num, int) or num < 1):
            raise ConfigError(f"plan({num!r}): the number of images, a positive integer")
        cfg, built = self.config, self.components
        if sampler is not None or steps is not None or options or guidance is not None:
            data = cfg.model_dump(mode="json")
            if sampler is not None and not _same_component("sampler", sampler, data["sampler"]["name"]):
                data["sampler"] = {"name": sampler, "options": {}}
            data["sampler"]["options"].update(options or {})
            if steps is not None:
                data["sampler"]["options"]["steps"] = steps
            if guidance is not None:
                data["guidance"]["weight"] = guidance
            cfg = config_from_dict(data)
            comp = cfg.component("sampler")
            built = Components(
                built.schedule,
                built.denoiser,
                construct(comp, cfg.component_options("sampler")),
                {**built.refs, "sampler": comp},
                built.objective,
            )
        return SamplingPlan(cfg, built.sampler, built, built.timesteps(), num)

    def draw(
        self,
        num: int,
        *,
        plan: SamplingPlan | None = None,
        seed: int = 0,
        batch_size: int = 64,
        progress: ProgressFn | None = None,
        capture_steps: list[int] | None = None,
        labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """``num`` images in [-1, 1] (float, NCHW, on the CPU) and the states at ``capture_steps``; a conditional
        run draws image i as class ``labels[i]`` (default: :meth:`labels` of ``sample.classes``)."""
        plan = plan or self.plan()
        c, h, w = plan.config.image_shape
        check_fits(num * c * h * w * 5, f"--num {num:,}", "ask for fewer images, or sample several times with --seed")
        return self._generate(
            num, plan, seed=seed, batch_size=batch_size, progress=progress, capture_steps=capture_steps, labels=labels
        )

    def edit(
        self,
        images: torch.Tensor,
        *,
        strength: float | None = None,
        mask: torch.Tensor | None = None,
        plan: SamplingPlan | None = None,
        seed: int = 0,
        batch_size: int = 64,
        labels: torch.Tensor | None = None,
        jump_length: int = 10,
        resample: int = 1,
        progress: ProgressFn | None = None,
    ) -> torch.Tensor:
        """``images`` (uint8 [N, C, H, W] or float in [-1, 1]) edited, as float NCHW in [-1, 1] on the CPU: SDEdit
        noises them to ``strength`` x T and samples back (default 0.5; 0 returns them); with a ``mask`` (white /
        True where pixels are generated; default strength 1) the other pixels are kept exactly (RePaint, with
        ``resample`` walks of every ``jump_length`` steps). Any sampler that ``supports_start``; the run's
        guidance and (conditional) ``labels`` as for :meth:`draw`."""
        from ddpmkit.diffusion import start_step
        from ddpmkit.sampling.edit import Edit, as_keep_mask, as_model_scale, check_sampler

        plan = plan or self.plan()
        check_sampler(plan.sampler, plan.config.sampler.name, resample if mask is not None else 1)
        shape = plan.config.image_shape
        x = as_model_scale(images, shape)
        keep = as_keep_mask(mask, len(x), shape) if mask is not None else None
        strength = (1.0 if keep is not None else 0.5) if strength is None else float(strength)
        if jump_length < 1 or resample < 1:
            raise ConfigError(f"jump_length {jump_length} and resample {resample} must be at least 1")
        schedule = plan.components.schedule
        if start_step(plan.sampler.timesteps(schedule), strength, schedule.num_timesteps) is None:
            return x.clone()  # strength 0 (or below the sampler's first step): the input is the answer
        return self._generate(
            len(x),
            plan,
            seed=seed,
            batch_size=batch_size,
            progress=progress,
            labels=labels,
            edit=Edit(x.cpu(), strength, keep, jump_length, resample),
        )[0]

    def _generate(
        self,
        num: int,
        plan: SamplingPlan,
        *,
        seed: int,
        batch_size: int,
        progress: ProgressFn | None,
        labels: torch.Tensor | None,
        capture_steps: list[int] | None = None,
        edit: Any = None,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """:func:`generate` with the plan's network (guided as it says) and the class of each image."""
        if labels is not None and len(labels) != num:
            raise ConfigError(f"{len(labels)} labels for {num} images")
        if labels is not None:
            self._refuse_unless_conditional()
        elif self.conditional:
            labels = self.labels(num)
        network = self._network(plan)
        g = plan.config.guidance
        cfg_weight = g.weight if plan.config.guidance_method == "classifier-free" else 1.0

        def conditioned(net: Denoiser, batch_labels: torch.Tensor) -> Denoiser:
            return ClassConditioned(net, batch_labels, cfg_weight, g.interval)

        try:
            return generate(
                network,
                plan.components.schedule,
                plan.sampler,
                num,
                batch_size=batch_size,
                seed=seed,
                image_shape=plan.config.image_shape,
                modes=SpeedModes.for_run(plan.config.train, self.device),
                capture_steps=capture_steps,
                progress=progress,
                sampler_component=plan.components.refs["sampler"],
                labels=labels,
                conditioned=conditioned if labels is not None else None,
                edit=edit,
            )
        except NonFiniteSamples as exc:
            if not plan.guided:
                raise
            raise ConfigError(  # the weight, not the sampler, is what a user changes
                f"guidance.weight = {g.weight:g} drove the draw to non-finite values ({exc}): guidance extrapolates "
                "by w, and weights past about 10 rarely help"
            ) from exc

    def sample(
        self,
        num: int,
        *,
        sampler: str | None = None,
        steps: int | None = None,
        options: dict[str, Any] | None = None,
        guidance: float | None = None,
        classes: Classes = None,
        seed: int = 0,
        batch_size: int = 64,
        output: Literal["uint8", "float", "pil"] = "uint8",
        progress: ProgressFn | None = None,
    ) -> Any:
        """``num`` images: uint8 NHWC (``output="uint8"``, as files hold them), float NCHW in [-1, 1], or a list of
        PIL images (``"pil"``); a conditional run draws ``classes`` ("all", a class or a list: see :meth:`labels`).
        ``ddpmkit.save_images(images, "grid.png")`` writes any of them."""
        if output not in ("uint8", "float", "pil"):
            raise ConfigError(f"output = {output!r}: expected 'uint8', 'float' or 'pil'")
        labels = self.labels(num, classes) if classes is not None or self.conditional else None
        plan = self.plan(sampler=sampler, steps=steps, options=options, guidance=guidance)
        images, _ = self.draw(num, plan=plan, seed=seed, batch_size=batch_size, progress=progress, labels=labels)
        if output == "float":
            return images
        u8 = to_uint8(images).permute(0, 2, 3, 1).contiguous()
        return to_pil(u8) if output == "pil" else u8

    def _network(self, plan: SamplingPlan) -> Denoiser:
        """The main network, or (autoguidance) the main network guided by the run's guide, as samplers call them
        (through the run's objective)."""
        network = self.components.network
        if not plan.guided or plan.config.guidance_method != "autoguidance":
            return network()
        if self._guide is None:  # loaded once, for every weight
            self._guide = _load_guide(self.run_dir, plan.config.guidance.weight, self.weights, self.device)
        return GuidedDenoiser(
            network(),
            network(self._guide),
            plan.config.guidance.weight,
            plan.components.schedule,
            plan.config.guidance.interval,
        )


def load_run(
    source: str | Path,
    *,
    weights: Weights = "ema",
    device: str | None = None,
    sampler: str | None = None,
    overrides: list[Override] | None = None,
    warn: Callable[[str], None] | None = None,
) -> LoadedRun:
    """Verify and load a run's latest checkpoint (or the checkpoint folder ``source``, or a diffusers folder:
    see :func:`ddpmkit.sampling.diffusers_io.load_pretrained`) once.

    ``sampler`` and ``overrides`` (``KEY.PATH=VALUE``) may change how it samples ([sampler], [sample],
    [run], ``guidance.weight`` and the sampling speed modes), never what the weights were trained with.
    Broken newer checkpoints are skipped, each reported through ``warn``.
    """
    if weights not in ("ema", "model"):
        raise ConfigError(f"weights = {weights!r}: expected 'ema' or 'model'")
    if is_diffusers_folder(Path(source)):  # a diffusers pipeline or UNet2DModel folder, e.g. a DDPM from the Hub
        _refuse_process_changes(overrides or [])
        cfg, built, classes = load_pretrained(Path(source), device=device, sampler=sampler, overrides=overrides)
        return LoadedRun(cfg, built, run_dir=Path(source), step=0, weights="ema", classes=classes)
    ckpt = find_checkpoint(Path(source), warn=warn)
    saved = ckpt.config_for_sampling()
    if sampler is not None and not _same_component("sampler", sampler, saved["sampler"]["name"]):
        saved["sampler"] = {"name": sampler, "options": {}}
    _refuse_process_changes(overrides or [])
    cfg = config_from_dict(saved, overrides=overrides or [])
    dev = pick_device(device or cfg.run.device)
    torch.manual_seed(0)  # the initialisation the loaded weights replace
    classes = ckpt.schema.classes
    if cfg.conditioning.enabled and not classes:
        raise ConfigError(f"{ckpt.path}: the config is class-conditional but the checkpoint records no classes")
    built = build_components(cfg, classes if cfg.conditioning.enabled else None)
    _check_prediction(ckpt.schema.prediction, built, ckpt.path)
    with blame(built.refs["denoiser"], "to load the checkpoint's weights"):
        built.denoiser.load_state_dict(ckpt.weights(weights))
    built.denoiser.to(dev).eval()
    return LoadedRun(
        cfg, built, run_dir=ckpt.path.parent.parent, step=ckpt.step, weights=weights, checkpoint=ckpt, classes=classes
    )


def _load_guide(run_dir: Path, weight: float, weights: Weights, device: torch.device) -> Denoiser:
    """The trained guide of the run in ``run_dir`` (its latest checkpoint), on ``device``, in eval mode."""
    folder = guide_dir(run_dir).resolve()
    if latest_checkpoint(folder) is None:
        raise ConfigError(
            f"guidance.weight = {weight:g} needs the run's guide, and {folder} holds none: `ddpmkit run` on the "
            "run's config trains it, or --set guidance.weight=1 samples without guidance"
        )
    return load_run(folder, weights=weights, device=str(device)).denoiser


def _same_component(kind: str, a: str, b: str) -> bool:
    """Whether two names (plain or qualified) resolve to one installed component."""
    try:
        return discovery.find(kind, a) is discovery.find(kind, b)
    except DdpmkitError:
        return a == b


def _refuse_process_changes(overrides: list[Override]) -> None:
    """Sampling with another process, model or data shape than the weights were trained with gives wrong images."""
    for given in overrides:
        item = given if isinstance(given, str) else given[0]
        key = item.partition("=")[0].strip()
        if key.split(".")[0] not in ("sampler", "sample", "run") and key not in SAMPLING_KEYS:
            raise ConfigError(
                f"--set {item}: the weights were trained with the checkpoint's {key.split('.')[0]}; sampling may "
                "change only [sampler], [sample], [run], guidance.weight/method/interval and "
                "train.precision/channels_last/compile"
            )


def _check_prediction(saved: str, built: Components, path: Path) -> None:
    if built.denoiser.prediction != saved:
        raise ConfigError(
            f"{path}: trained to predict {saved!r} but {built.refs['denoiser'].label} now predicts "
            f"{built.denoiser.prediction!r}; install the plugin version that trained it"
        )
