"""The run config: pydantic models, TOML loading, ``--set`` overrides, and errors that point at file:line.

Validation happens in two stages: the tables themselves, then each component's ``options`` table
with the Options model of the plugin it names (so ``denoiser.options.channels`` is checked by the
denoiser's own rules).
"""

from __future__ import annotations

import copy
import json
import os
import re
import tomllib
import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from ddpmkit.errors import ConfigError, DdpmkitWarning, PluginError
from ddpmkit.kinds import KINDS
from ddpmkit.validation import AUTO, StrictNumbers, problems

#: Bounds a run can reach (a billion steps is weeks at a thousand steps a second).
MAX_EPOCHS, MAX_STEPS = 10**9, 10**9
TUTORIAL_TRAJECTORY_STEPS = [0, 15, 50, 100, 200, 300, 400, 550, 700, 999]


class Section(StrictNumbers):
    model_config = ConfigDict(extra="forbid")


class RunSection(Section):
    name: str = Field("default", description="run directory name under run.dir")
    dir: str = Field("runs", description="parent folder of run directories (relative to the current directory)")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="seed of every random stream of the run")
    device: str = Field("auto", description="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError("use letters, digits, '.', '_' and '-' only, starting with a letter or digit")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v):
            raise ValueError("must be auto, cpu, cuda, cuda:N or mps")
        return v


#: The datasets ``[data] dataset`` can name (see ``ddpmkit describe DATASET``, ``ddpmkit.run.data.DATASETS``).
DATASET_NAMES = ("mnist", "fashion-mnist", "cifar10", "image-folder", "hf", "synthetic")
#: (channels, image_size) that ``auto`` means for the datasets whose shape is known without reading them
#: (MNIST and FashionMNIST: 28 zero-padded to 32, as in the tutorial).
NATIVE_SHAPES = {"mnist": (1, 32), "fashion-mnist": (1, 32), "cifar10": (3, 32), "synthetic": (1, 32)}


class DataSection(Section):
    dataset: Literal["mnist", "fashion-mnist", "cifar10", "image-folder", "hf", "synthetic"] = Field(
        "mnist", description="what to train on (`ddpmkit describe NAME` says what each reads and which keys apply)"
    )
    root: str = Field(
        "data",
        description="where the dataset lives: the folder holding MNIST/raw, FashionMNIST/raw "
        "or cifar-10-batches-bin, or the image folder itself; --data-root sets it, and a config that names none "
        "takes $DDPMKIT_DATA_ROOT (else ./data)",
    )
    download: bool = Field(
        True, description="download MNIST, FashionMNIST, CIFAR-10 or a Hub dataset when it is not there"
    )
    image_size: int | Literal["auto"] = Field(
        "auto",
        description="side of the square images the model sees; auto: 32 for MNIST, FashionMNIST (28 zero-padded "
        "to 32, as in the tutorial) and CIFAR-10, 32 for synthetic, the files' own size for an image folder or hf "
        "dataset (which must then all be the same square size)",
    )
    channels: int | str = Field(
        "auto",
        description="1 (grayscale) or 3 (RGB); auto: the dataset's own (an image folder or hf dataset: 3 when "
        "any image is in colour)",
    )
    crop: Literal["center", "none"] = Field(
        "center",
        description="an image that is not image_size square: resize its shorter side to image_size and "
        "keep the centre square (center), or resize it to the square whatever its aspect ratio (none)",
    )
    hflip: bool = Field(
        False,
        description="flip each training image left-right with probability 1/2 (augmentation; "
        "right for CIFAR-10 and photos, wrong for digits)",
    )
    num_samples: int = Field(256, ge=1, description="synthetic dataset only: number of images")
    limit: int | None = Field(None, ge=1, description="use only the first N training images")
    path: str | None = Field(
        None,
        description="hf only: a HuggingFace dataset's name on the Hub, a folder written "
        "by save_to_disk, or a folder of images (loaded as datasets' imagefolder)",
    )
    split: str = Field("train", description="hf only: the split to train on")
    image_column: str = Field("image", description="hf only: the column holding the images")
    label_column: str | None = Field(
        None, description="hf only: the column of class labels (unset: 'label' when the dataset has one)"
    )

    @field_validator("image_size", mode="before")
    @classmethod
    def _size(cls, v: Any) -> Any:
        if v == AUTO or (isinstance(v, int) and not isinstance(v, bool) and v >= 4):
            return v
        raise ValueError(f'must be a whole number of pixels, at least 4, or "auto"; got {v!r}')

    @field_validator("channels", mode="before")
    @classmethod
    def _channels(cls, v: Any) -> Any:
        if v == AUTO or (v in (1, 3) and not isinstance(v, bool)):
            return v
        raise ValueError(f'must be 1 (grayscale), 3 (RGB) or "auto"; got {v!r}')

    @model_validator(mode="after")
    def _hf_needs_path(self) -> DataSection:
        if self.dataset == "hf" and not self.path:
            raise ValueError(
                'dataset = "hf" needs data.path: a dataset\'s name on the Hub, a save_to_disk folder '
                "or a folder of images"
            )
        return self

    @property
    def settled(self) -> bool:
        """Whether image_size and channels are numbers (``auto`` is settled from the data, see
        :func:`ddpmkit.run.data.settle`)."""
        return self.image_size != AUTO and self.channels != AUTO

    def with_native_shape(self) -> DataSection:
        """This section with ``auto`` replaced where the dataset's shape is known without its files."""
        if self.settled or self.dataset not in NATIVE_SHAPES:
            return self
        channels, size = NATIVE_SHAPES[self.dataset]
        return self.model_copy(
            update={
                "channels": channels if self.channels == AUTO else self.channels,
                "image_size": size if self.image_size == AUTO else self.image_size,
            }
        )


class ComponentSection(Section):
    name: str = Field(description="the component's name, or DISTRIBUTION:NAME to pick one plugin's")
    options: dict[str, Any] = Field(
        default_factory=dict, description="the component's options, validated by its own model (ddpmkit describe NAME)"
    )
    # filled in by validation: the registry entry the name resolved to and the validated options
    _component: Any = PrivateAttr(default=None)
    _options: Any = PrivateAttr(default=None)


#: The widest power-function EMA profile (gamma = -0.38) has sigma_rel 0.3003 (Karras et al. 2024, eq. 3).
MAX_SIGMA_REL = 0.3
#: The narrowest width ddpmkit tracks or rebuilds: each profile is stored and named by its width to three decimals
#: (``sigma-0.050``), so narrower ones (and two that round alike) could not be told apart.
MIN_SIGMA_REL = 0.001


def sigma_rel_problem(values: list[float]) -> str | None:
    """What makes these EMA widths unusable (outside [MIN_SIGMA_REL, MAX_SIGMA_REL], or two of one name), or None."""
    bad = [v for v in values if not MIN_SIGMA_REL <= v <= MAX_SIGMA_REL]
    if bad:
        return (
            f"sigma_rel {', '.join(f'{v:g}' for v in bad)}: expected widths of at least {MIN_SIGMA_REL} (profiles "
            f"are named to three decimals) and at most {MAX_SIGMA_REL} (the widest power-function profile)"
        )
    names: dict[str, float] = {}
    for v in values:
        if (name := f"{v:.3f}") in names and names[name] != v:
            return f"sigma_rel {names[name]:g} and {v:g} are both stored as sigma-{name}: choose widths 0.001 apart"
        names[name] = v
    return None


class PosthocEmaSection(Section):
    """Power-function EMAs tracked during training, with snapshots from which ``ddpmkit ema`` rebuilds the EMA
    of any length afterwards (Karras et al. 2024, section 3)."""

    enabled: bool = Field(False, description="track the profiles and store their snapshots")
    sigma_rels: list[float] = Field(
        [0.05, 0.10],
        min_length=1,
        max_length=8,
        description="the relative widths (sigma_rel) of the profiles tracked; two are enough to rebuild others",
    )
    every: int | None = Field(
        None,
        ge=1,
        description="steps between snapshots (unset: train.checkpoint_every); one is always taken at the last step",
    )

    @field_validator("sigma_rels")
    @classmethod
    def _widths(cls, v: list[float]) -> list[float]:
        if problem := sigma_rel_problem(v):
            raise ValueError(problem)
        if len(set(v)) != len(v):
            raise ValueError(f"{v}: each profile once")
        return v


class SmallerModel(Section):
    """A smaller model that a time budget falls back on where it buys too few steps of the configured one."""

    denoiser_options: dict[str, Any] = Field(
        default_factory=dict, description="over [denoiser.options] (e.g. fewer channels)"
    )
    guide_options: dict[str, Any] = Field(
        default_factory=dict, description="over [guidance] denoiser_options, for the guide of this model"
    )
    max_steps: int | None = Field(
        None,
        ge=1,
        le=MAX_STEPS,
        description="over train.max_steps: a faster model may need a higher cap to fill the budget",
    )


class TrainSection(Section):
    epochs: int = Field(
        75,
        ge=1,
        le=MAX_EPOCHS,
        description="passes over the dataset (at least one: an untrained network has nothing to sample)",
    )
    max_steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="stop after this many optimizer steps in all")
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-5, gt=0, allow_inf_nan=False, description="peak learning rate (Adam)")
    lr_warmup_steps: int = Field(
        0, ge=0, description="ramp the learning rate linearly from lr / N up to lr over N steps"
    )
    lr_decay: Literal["none", "cosine"] = Field(
        "none", description="after warm-up: keep lr, or a cosine decay to lr_min at the last step"
    )
    lr_min: float = Field(0.0, ge=0, allow_inf_nan=False, description="the learning rate a cosine decay ends at")
    loss_weighting: Literal["uniform", "min_snr"] = Field(
        "uniform",
        description="the ddpm objective's weighting: uniform over t (Ho et al. 2020, eq. 14) or min-SNR-gamma "
        "(Hang et al. 2023); other objectives weigh their own loss",
    )
    min_snr_gamma: float = Field(
        5.0, gt=0, allow_inf_nan=False, description="gamma of min_snr weighting (the ddpm objective's)"
    )
    ema_decay: float = Field(0.9999, ge=0, lt=1)
    ema_warmup: bool = Field(False, description="ramp the EMA decay up from 0 (timm's warm-up), for short runs")
    grad_clip: float | None = Field(None, gt=0, description="clip the gradient norm to this value")
    nonfinite: Literal["halt", "skip"] = Field(
        "halt",
        description="a step whose loss or gradients are not finite: halt before it updates the weights, "
        "or skip it (at most max_nonfinite_skips in a row)",
    )
    max_nonfinite_skips: int = Field(10, ge=1, description="with nonfinite = 'skip': halt after this many in a row")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto (the fastest of fp32 and, where it is native, bf16, measured for this model "
        "before training), fp32, bf16 (fast where native: AVX-512 BF16/AMX CPUs, recent GPUs) or fp16 with a "
        "loss scaler (GPUs without bf16)",
    )
    channels_last: bool | Literal["auto"] = Field(
        "auto", description="channels-last memory format (faster convolutions on some CPUs); auto: measured"
    )
    compile: bool | Literal["auto"] = Field(
        False,
        description="torch.compile the denoiser for training and sampling (a minute of set-up); auto: "
        "measured on the fastest uncompiled mode, taken when at least 5 % faster",
    )
    cuda_graphs: bool = Field(
        False,
        description="on a CUDA GPU, when the denoiser is compiled (compile = true, or chosen by auto): "
        "capture its training step's forward and backward in CUDA graphs (torch.compile's reduce-overhead mode), "
        "for small batches bound by launching kernels; single-process runs only, sampling unaffected",
    )
    fused_adam: bool | None = Field(None, description="fused Adam; unset: on where it measured faster (CUDA)")
    tf32: bool = Field(True, description="TF32 matmuls and convolutions on CUDA GPUs (no effect elsewhere)")
    time_budget: float | None = Field(
        None,
        gt=0,
        le=366 * 86400,
        description='train for this long, e.g. "15m", "1h30m", "900s" or seconds: '
        "max_steps is planned from the images/s measured before training (the guide's time included, sampling "
        "not), fixed at the first start and kept on resume; max_steps, if set, stays an upper bound; "
        '"off": no budget (epochs and max_steps say how long)',
    )
    budget_min_steps: int | None = Field(
        None,
        ge=1,
        le=MAX_STEPS,
        description="with a time budget and smaller_models: where the budget buys fewer "
        "steps than this of the configured model, the first of smaller_models that it buys this many steps of is "
        "trained instead (the last if none); chosen at the first start from the measured images/s, kept on resume",
    )
    smaller_models: list[SmallerModel] = Field(
        default_factory=list,
        max_length=8,
        description="[[train.smaller_models]]: the fallbacks of budget_min_steps, largest first",
    )
    checkpoint_every: int = Field(
        1000, ge=1, description="steps between checkpoints (one is always written at the end)"
    )

    @field_validator("channels_last", "compile", mode="before")
    @classmethod
    def _switch(cls, v: Any) -> Any:
        if v is True or v is False or v == AUTO:
            return v
        raise ValueError(f'expected true, false or "auto", got {v!r}')

    @field_validator("time_budget", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().lower() in NO_BUDGET:
            return None  # a config's budget turned off: --set train.time_budget=off
        return parse_duration(v)

    keep_checkpoints: int = Field(3, ge=1)
    posthoc_ema: PosthocEmaSection = Field(default_factory=PosthocEmaSection)

    @model_validator(mode="after")
    def _graphs_need_compile(self) -> TrainSection:
        if self.cuda_graphs and self.compile is False:
            raise ValueError('cuda_graphs = true replays the compiled step: set compile = true (or "auto")')
        return self

    @property
    def snapshot_every(self) -> int:
        """Steps between post-hoc EMA snapshots."""
        return self.posthoc_ema.every or self.checkpoint_every


#: What ``train.time_budget`` may say for no budget (a config's own turned off with ``--set``).
NO_BUDGET = ("off", "none")


def parse_duration(value: Any) -> Any:
    """``"15m"``, ``"1h30m"``, ``"90s"``, ``"2h"`` or a number of seconds -> seconds (other values unchanged,
    for the field's own validation to report)."""
    if not isinstance(value, str):
        return value
    text = value.strip().lower().replace(" ", "")
    m = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?:in)?)?(?:(\d+(?:\.\d+)?)s)?", text)
    if not text or not m or not any(m.groups()):
        raise ValueError(f"expected a duration such as 15m, 1h30m or 900s, got {value!r}")
    h, mins, secs = (float(g) if g else 0.0 for g in m.groups())
    return h * 3600 + mins * 60 + secs


#: What ``sample.classes`` (and ``--class``) may say besides a list of class indices.
ALL_CLASSES = "all"


class SampleSection(Section):
    num_images: int = Field(64, ge=0, description="images written to samples.png/.npz after training")
    classes: Literal["all"] | list[int] = Field(
        ALL_CLASSES,
        description='a conditional run\'s classes to draw: "all" (as many of each, a row per class) '
        "or a list of class indices (drawn in turn)",
    )
    batch_size: int = Field(64, ge=1)
    seed: int = Field(0, ge=0, le=2**63 - 1)
    use_ema: bool = True
    trajectory_images: int = Field(4, ge=0, description="rows of trajectory.png")
    trajectory_steps: list[int] = Field(default_factory=lambda: list(TUTORIAL_TRAJECTORY_STEPS))

    @field_validator("trajectory_steps")
    @classmethod
    def _steps(cls, v: list[int]) -> list[int]:
        if any(s < 0 for s in v):
            raise ValueError("steps must be >= 0")
        return v

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: Any) -> Any:
        if isinstance(v, list) and (not v or any(c < 0 for c in v)):
            raise ValueError('must be "all" or a non-empty list of class indices (0, 1, ...)')
        return v


class ConditioningSection(Section):
    """What the denoiser is trained on besides the images: the dataset's class labels, or nothing."""

    kind: Literal["none", "class"] = Field(
        "none",
        description="class: condition on the dataset's class labels (classifier-free guidance then applies); "
        "none: unconditional",
    )
    label_dropout: float = Field(
        0.1,
        ge=0,
        lt=1,
        allow_inf_nan=False,
        description="share of training labels replaced by the null class, so the network also learns the "
        "unconditional model classifier-free guidance needs (Ho & Salimans 2022: 0.1-0.2)",
    )

    @property
    def enabled(self) -> bool:
        return self.kind != "none"


#: The guidance methods: D_0 in D_0 + w (D - D_0) is the unconditional model or a guide network.
GUIDANCE_METHODS = ("classifier-free", "autoguidance")


class GuidanceSection(Section):
    """Guidance, D_0 + w (D - D_0) with w > 1: classifier-free (Ho & Salimans 2022; D_0 is the same network
    asked for no class) or autoguidance (Karras et al. 2024; D_0 is a smaller, briefly trained denoiser of
    the same run, conditional when the run is)."""

    weight: float = Field(
        1.0,
        allow_inf_nan=False,
        description="w in D_0 + w (D - D_0): 1 is off (no guide is trained), above 1 guides",
    )
    method: Literal["auto", "classifier-free", "autoguidance"] = Field(
        "auto",
        description="auto: classifier-free for a class-conditional run, else autoguidance",
    )
    interval: list[int] | None = Field(
        None,
        description="[t_low, t_high]: guide only at steps t_low <= t <= t_high, elsewhere w = 1 "
        "(Kynkäänniemi et al. 2024: guiding only the middle noise levels keeps diversity); unset: every step",
    )
    steps: int = Field(400, ge=1, description="training steps of the guide (trained before the main network)")
    denoiser_options: dict[str, Any] = Field(
        default_factory=dict,
        description="the guide's [denoiser.options], over the main network's (e.g. fewer channels)",
    )

    @field_validator("weight")
    @classmethod
    def _at_least_one(cls, v: float) -> float:
        # w < 1 interpolates towards the guide (w = 0 samples from the guide alone, the worst network of the run)
        if v < 1:
            raise ValueError(
                f"must be at least 1, got {v:g}: 1 turns guidance off, above 1 guides "
                "(below 1 would move towards the small guide network, 0 samples from it alone)"
            )
        return v

    @field_validator("interval")
    @classmethod
    def _interval(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(v) != 2 or v[0] < 0 or v[0] > v[1]):
            raise ValueError("must be [t_low, t_high] with 0 <= t_low <= t_high")
        return v

    @property
    def enabled(self) -> bool:
        return self.weight != 1.0


class LogSection(Section):
    """Deprecated: the switches moved to ``[plugins.metrics] enabled`` and ``[plugins.tensorboard] enabled``."""

    metrics: bool = Field(True, description="deprecated: use [plugins.metrics] enabled")
    tensorboard: bool = Field(False, description="deprecated: use [plugins.tensorboard] enabled")


class RunConfig(Section):
    run: RunSection = Field(default_factory=RunSection)
    data: DataSection = Field(default_factory=DataSection)
    schedule: ComponentSection = Field(default_factory=lambda: ComponentSection(name="linear"))
    denoiser: ComponentSection = Field(default_factory=lambda: ComponentSection(name="unet"))
    sampler: ComponentSection = Field(default_factory=lambda: ComponentSection(name="ddpm"))
    objective: ComponentSection = Field(default_factory=lambda: ComponentSection(name="ddpm"))
    train: TrainSection = Field(default_factory=TrainSection)
    sample: SampleSection = Field(default_factory=SampleSection)
    conditioning: ConditioningSection = Field(default_factory=ConditioningSection)
    guidance: GuidanceSection = Field(default_factory=GuidanceSection)
    log: LogSection = Field(default_factory=LogSection, exclude=True)
    plugins: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="[plugins.<name>]: each plugin's own options, validated by its Options model"
    )
    _plugin_options: dict[str, Any] = PrivateAttr(default_factory=dict)

    @property
    def uses_schedule(self) -> bool:
        """Whether the objective's noise levels are the ``[schedule]``'s (``ddpm``); flow and EDM define their own."""
        from ddpmkit.registry import discovery

        return bool(getattr(discovery.load(self.component("objective")), "uses_schedule", False))

    @property
    def num_timesteps(self) -> int:
        """T: the schedule's steps under the ddpm objective, the objective's own noise levels under another."""
        if self.uses_schedule:
            return int(self.schedule.options.get("num_timesteps", 1000))
        return int(self.objective.options.get("num_levels", 1000))

    def component(self, kind: str):
        """The registry entry (:class:`ddpmkit.registry.discovery.Component`) that ``[kind] name`` resolved to."""
        section: ComponentSection = getattr(self, kind)
        if section._component is None:
            from ddpmkit.registry import discovery as plugins

            section._component = plugins.find(kind, section.name)
        return section._component

    def check_extras(self) -> None:
        """MissingExtra for the first thing this config uses whose optional extra is not installed (the run
        would fail on it later): the hf dataset, a component or an enabled event plugin of ddpmkit's own."""
        from ddpmkit.extras import NEEDED_BY, require

        if self.data.dataset == "hf":
            require("hf", 'data.dataset = "hf"')
        for kind in KINDS:
            extra = NEEDED_BY.get(self.component(kind).qualified)
            if extra:
                require(extra, f"{kind}.name = {getattr(self, kind).name!r}")
        for name, table in self.plugins.items():
            extra = NEEDED_BY.get(f"ddpmkit:{name}")
            if extra and isinstance(table, dict) and table.get("enabled"):
                require(extra, f"[plugins.{name}] enabled = true")

    def component_options(self, kind: str):
        """The validated Options instance of ``[kind]``."""
        section: ComponentSection = getattr(self, kind)
        if section._options is None:
            from ddpmkit.registry.build import validate_options

            section._options = validate_options(self.component(kind), section.options)
        return section._options

    def plugin_options(self, plugin) -> Any:
        """The validated ``[plugins.<name>]`` options of an event plugin (its defaults when absent), or None."""
        if plugin.qualified not in self._plugin_options:
            model = plugin.options_model
            self._plugin_options[plugin.qualified] = model() if model is not None else None
        return self._plugin_options[plugin.qualified]

    @property
    def guidance_method(self) -> str:
        """``guidance.method`` with ``auto`` resolved: classifier-free for a class-conditional run."""
        if self.guidance.method != "auto":
            return self.guidance.method
        return "classifier-free" if self.conditioning.enabled else "autoguidance"

    @property
    def trains_guide(self) -> bool:
        """Whether the run trains a guide network first (autoguidance with w != 1)."""
        return self.guidance.enabled and self.guidance_method == "autoguidance"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images; the config's data section must be settled (:func:`ddpmkit.run.data.settle`)."""
        data = self.data.with_native_shape()
        if not data.settled:
            raise ValueError(
                "data.image_size / data.channels are still auto: settle the config with "
                "ddpmkit.run.data.settle(cfg) first"
            )
        return (int(data.channels), int(data.image_size), int(data.image_size))

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) / self.run.name

    def with_smaller_model(self, index: int) -> RunConfig:
        """This run training ``train.smaller_models[index - 1]`` in place of its own model (``index`` 0: this
        run), with no fallbacks of its own (a time budget chose it: :func:`ddpmkit.training.budget.choose_model`)."""
        if index == 0:
            return self
        m = self.train.smaller_models[index - 1]
        data = self.model_dump(mode="json")
        data["denoiser"]["options"] = {**data["denoiser"]["options"], **m.denoiser_options}
        data["guidance"]["denoiser_options"] = {**data["guidance"]["denoiser_options"], **m.guide_options}
        data["train"].update(smaller_models=[], budget_min_steps=None)
        if m.max_steps is not None:
            data["train"]["max_steps"] = m.max_steps
        try:
            smaller = config_from_dict(data)  # the guide's options over it are checked too
        except ConfigError as exc:
            detail = str(exc).removeprefix("config: ")
            raise ConfigError(f"train.smaller_models[{index - 1}]: {detail}") from None
        return smaller

    def identity(self) -> dict[str, Any]:
        """The flattened keys that define the model and the process; a resume must match them.

        Component names are qualified (``ddpmkit:unet``): installing another plugin cannot change them.
        """
        d = self.model_dump()
        d["data"] = self.data.with_native_shape().model_dump()  # "auto" and 32 are the same MNIST run
        for kind in ("schedule", "denoiser"):
            d[kind]["name"] = self.component(kind).qualified
        keep = {
            "schedule": d["schedule"],
            "denoiser": d["denoiser"],
            "data": {
                k: d["data"][k]
                for k in ("dataset", "image_size", "channels", "num_samples", "limit")
                + (("hflip",) if self.data.hflip else ())
            },
            "train": {k: d["train"][k] for k in ("batch_size", "precision")},
            "run": {"seed": d["run"]["seed"]},
        }
        if not self.uses_schedule:  # only then: checkpoints from before objectives (0.14) keep matching
            keep["objective"] = {**d["objective"], "name": self.component("objective").qualified}
        if self.conditioning.enabled:  # only then: unconditional checkpoints from before 0.6 keep matching
            keep["conditioning"] = {"kind": d["conditioning"]["kind"]}
        if self.train.posthoc_ema.enabled:  # the profiles a checkpoint's tracked EMAs follow
            keep["train"]["posthoc_ema"] = {
                "sigma_rels": d["train"]["posthoc_ema"]["sigma_rels"],
                "every": self.train.snapshot_every,
            }
        return flatten(keep)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# --- locating keys in the TOML text -----------------------------------------------------------

_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_.\-\"' ]+?)\s*=")


def _key_lines(text: str) -> dict[str, int]:
    """Map each dotted key path (and each table) to the 1-based line where it is written."""
    lines: dict[str, int] = {}
    table = ""
    for number, line in enumerate(text.splitlines(), start=1):
        if m := _HEADER.match(line):
            table = ".".join(p.strip().strip("\"'") for p in m.group(1).split("."))
            lines.setdefault(table, number)
            continue
        if m := _KEY.match(line):
            key = ".".join(p.strip().strip("\"'") for p in m.group(1).split("."))
            lines.setdefault(f"{table}.{key}" if table else key, number)
    return lines


class _Source:
    """Where each key of a config came from: a file's lines or a --set override."""

    def __init__(self, path: Path | None, text: str, overrides: dict[str, str]):
        self.path = path
        self.lines = _key_lines(text)
        self.overrides = overrides

    def where(self, key: str) -> str:
        probe = key
        while probe:
            if probe in self.overrides:
                return self.overrides[probe]
            # an error about a whole table (a validator across its keys) that an override changed: the
            # override is the likelier cause; a table that only an override creates has no line at all
            below = [k for k in self.overrides if k.startswith(probe + ".")]
            in_file = probe in self.lines and self.path is not None
            if below:
                return self.overrides[below[0]] + (f" (over {self.path}:{self.lines[probe]})" if in_file else "")
            if in_file:
                return f"{self.path}:{self.lines[probe]}"
            probe = probe.rpartition(".")[0]
        return str(self.path) if self.path is not None else "config"


def _messages(exc: ValidationError, model: type[BaseModel], prefix: tuple, source: _Source) -> list[str]:
    return [f"{source.where(key)}: {key}: {msg}" for key, msg in problems(exc, model, prefix)]


# --- overrides --------------------------------------------------------------------------------


def parse_override(item: str) -> tuple[str, Any, str]:
    """'train.lr=1e-4' -> ('train.lr', 1e-4, '1e-4'); a value that is not TOML is taken as a string."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or not re.fullmatch(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*", key):
        raise ConfigError(f"--set {item}: expected KEY.PATH=VALUE, e.g. --set train.batch_size=128")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    except RecursionError:
        raise ConfigError(f"--set {key}: the value is nested too deeply to be a setting") from None
    return key, value, raw


#: ``"key.path=value"`` as given with --set, or (``"key.path=value"``, how the user gave it: ``"--device cuda:1"``)
Override = str | tuple[str, str]


def apply_overrides(data: dict[str, Any], overrides: list[Override]) -> dict[str, str]:
    """Set each ``key.path=value`` in ``data``; returns {key: how it was given} for error locations."""
    seen: dict[str, str] = {}
    for given in overrides:
        item, label = given if isinstance(given, tuple) else (given, None)
        key, value, raw = parse_override(item)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item}: '{part}' is not a table")
            node = child
        old = node.get(parts[-1])
        # an inline table sets the keys it names and keeps the rest (``--set "train={lr=0.5}"``
        # must not reset every other [train] key to its default)
        node[parts[-1]] = _merged(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
        seen[key] = label or f"--set {key}={raw}"
    return seen


def _merged(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merged(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


# --- loading ----------------------------------------------------------------------------------


#: No real run config comes near this; a larger file is a mistake (or an attack on memory).
MAX_CONFIG_BYTES = 1 << 20


def read_toml(path: Path) -> tuple[dict[str, Any], str]:
    try:
        if path.is_file() and path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {path.stat().st_size:,} bytes is too large for a config (at most 1 MiB)")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from None
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        where = f"{path}:{m.group(1)}" if m else str(path)
        reason = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        raise ConfigError(f"{where}: invalid TOML: {reason}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid TOML: nested too deeply") from None


def config_from_dict(
    data: dict[str, Any], *, path: Path | None = None, text: str = "", overrides: list[Override] | None = None
) -> RunConfig:
    """Validate a config given as a dict (plus overrides); ConfigError lists every problem."""
    data = copy.deepcopy(data)
    source = _Source(path, text, apply_overrides(data, overrides or []))
    _default_data_root(data)
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as exc:
        # every mistake at once: the components' options are checked too, from the tables as written
        problems = _messages(exc, RunConfig, (), source) + _component_problems(data, source)
        raise ConfigError("\n".join(problems)) from None
    _validate_components(cfg, source)
    _move_log_switches(cfg, source)
    _validate_plugin_tables(cfg, source)
    _validate_cross(cfg, source)
    return cfg


def load_config(path: str | Path, overrides: list[Override] | None = None) -> RunConfig:
    """Read ``path`` (TOML), apply ``--set`` overrides and validate everything, plugin options included."""
    path = Path(path)
    data, text = read_toml(path)
    return config_from_dict(data, path=path, text=text, overrides=overrides)


#: the environment variable a config that names no data.root takes its root from
DATA_ROOT_ENV = "DDPMKIT_DATA_ROOT"


def data_root_override(root: str | Path, given_as: str) -> Override:
    """``data.root`` set to ``root`` as an override, named in errors as the user gave it (``--data-root PATH``)."""
    return (f"data.root={json.dumps(str(root))}", given_as)


def _default_data_root(data: dict[str, Any]) -> None:
    """A config that names no ``data.root`` (neither in its file nor by --data-root) takes $DDPMKIT_DATA_ROOT, written
    into it once so that every copy of the config (the guide's, a checkpoint's) reads the same folder; what a config
    names explicitly wins over the variable."""
    env = os.environ.get(DATA_ROOT_ENV)
    table = data.get("data")
    if env and (table is None or (isinstance(table, dict) and "root" not in table)):
        data["data"] = {**(table or {}), "root": env}


def _component_problems(data: dict[str, Any], source: _Source) -> list[str]:
    """The mistakes in each component's name and options, from the config's tables as written (for a config whose
    other sections did not validate: its mistakes are reported all at once)."""
    problems: list[str] = []
    for kind in KINDS:
        table = data.get(kind, {})
        default = RunConfig.model_fields[kind].get_default(call_default_factory=True)
        name = table.get("name", default.name) if isinstance(table, dict) else None
        options = table.get("options", {}) if isinstance(table, dict) else None
        if isinstance(name, str) and isinstance(options, dict):  # else the section's own error says it
            _check_component(kind, name, options, source, problems)
    return problems


def _check_component(
    kind: str, name: str, options: dict[str, Any], source: _Source, problems: list[str]
) -> tuple[Any, BaseModel] | None:
    """(the registry entry, the validated options) of component ``name``; None, with what is wrong in ``problems``."""
    from ddpmkit.registry import discovery as plugins

    try:
        component = plugins.find(kind, name)
        model = plugins.load(component).Options
    except PluginError as exc:
        problems.append(f"{source.where(f'{kind}.name')}: {kind}.name: {exc}")
        return None
    try:
        return component, model.model_validate(options)
    except ValidationError as exc:
        problems.extend(_messages(exc, model, (kind, "options"), source))
        return None


#: The ``[train]`` keys that are the ddpm objective's options under their older names.
DDPM_TRAIN_KEYS = ("loss_weighting", "min_snr_gamma")


def _objective_problems(cfg: RunConfig, source: _Source) -> list[str]:
    """Fold ``train.loss_weighting`` / ``min_snr_gamma`` into an objective that takes them (``ddpm``), and name
    the settings another objective would silently ignore: those two, and a denoiser's own prediction target."""
    from ddpmkit.registry import discovery as plugins

    try:
        objective = plugins.load(plugins.find("objective", cfg.objective.name))
    except PluginError:
        return []  # the objective's own check says it
    fields = objective.Options.model_fields
    for key in DDPM_TRAIN_KEYS:
        if key in fields and key not in cfg.objective.options and key in cfg.train.model_fields_set:
            cfg.objective.options = {**cfg.objective.options, key: getattr(cfg.train, key)}
    problems = []
    if "loss_weighting" not in fields and cfg.train.loss_weighting != "uniform":
        problems.append(
            f"{source.where('train.loss_weighting')}: train.loss_weighting = {cfg.train.loss_weighting!r}: the ddpm "
            f"objective's weighting; objective {cfg.objective.name!r} weighs its own loss"
        )
    if not getattr(objective, "uses_schedule", False):
        prediction = cfg.denoiser.options.get("prediction")
        if prediction not in (None, "epsilon"):
            problems.append(
                f"{source.where('denoiser.options.prediction')}: denoiser.options.prediction = {prediction!r}: "
                f"the ddpm objective's choice; objective {cfg.objective.name!r} sets what the network predicts"
            )
    return problems


def _check_time(cfg: RunConfig, source: _Source) -> list[str]:
    """An objective with continuous noise levels needs a denoiser that takes a float t."""
    from ddpmkit.registry import discovery as plugins

    objective = plugins.load(cfg.objective._component)
    denoiser = plugins.load(cfg.denoiser._component)
    if getattr(objective, "continuous_time", False) and not getattr(denoiser, "continuous_time", False):
        return [
            f"{source.where('objective.name')}: objective {cfg.objective.name!r} calls the network at continuous "
            f"times, and denoiser {cfg.denoiser._component.label} declares no continuous_time (plugin API 4); choose "
            'one that does, such as unet, or objective.name = "ddpm"'
        ]
    return []


def _validate_components(cfg: RunConfig, source: _Source) -> None:
    problems: list[str] = _objective_problems(cfg, source)
    for kind in KINDS:
        section: ComponentSection = getattr(cfg, kind)
        checked = _check_component(kind, section.name, section.options, source, problems)
        if checked is None:
            continue
        section._component, section._options = checked
        section.options = section._options.model_dump(mode="json")
        if kind == "denoiser" and cfg.guidance.denoiser_options:
            model = type(section._options)
            try:  # the guide is the same denoiser with these options over the main one's
                model.model_validate({**section.options, **cfg.guidance.denoiser_options})
            except ValidationError as exc:
                problems.extend(_messages(exc, model, ("guidance", "denoiser_options"), source))
    if not problems:
        problems = _check_time(cfg, source)
    if problems:
        raise ConfigError("\n".join(problems))


def _move_log_switches(cfg: RunConfig, source: _Source) -> None:
    """``[log] metrics/tensorboard`` (deprecated) become ``[plugins.metrics/tensorboard] enabled``."""
    for key in sorted(cfg.log.model_fields_set):
        table = cfg.plugins.setdefault(key, {})
        if "enabled" in table:
            raise ConfigError(
                f"{source.where(f'log.{key}')}: log.{key}: also set as plugins.{key}.enabled; keep only the latter"
            )
        table["enabled"] = getattr(cfg.log, key)
        warnings.warn(
            f"{source.where(f'log.{key}')}: log.{key} is deprecated; write [plugins.{key}] enabled = "
            f"{str(getattr(cfg.log, key)).lower()}",
            DdpmkitWarning,
            stacklevel=2,
        )
    cfg.log = LogSection()


def _validate_plugin_tables(cfg: RunConfig, source: _Source) -> None:
    """Each ``[plugins.<name>]`` table, validated by that plugin's ``Options`` model."""
    from ddpmkit.registry import discovery as plugins

    problems = []
    for name, table in cfg.plugins.items():
        key = f"plugins.{name}"
        try:
            plugin = plugins.find_plugin(name)
        except PluginError as exc:
            problems.append(f"{source.where(key)}: {key}: {exc}")
            continue
        model = plugin.options_model
        if not isinstance(table, dict):
            problems.append(f"{source.where(key)}: {key}: must be a table")
            continue
        if model is None:
            if table:
                problems.append(f"{source.where(key)}: {key}: plugin {plugin.label} takes no options")
            continue
        try:
            validated = model.model_validate(table)
        except ValidationError as exc:
            problems.extend(_messages(exc, model, ("plugins", name), source))
            continue
        cfg.plugins[name] = validated.model_dump(mode="json")
        cfg._plugin_options[plugin.qualified] = validated
    if problems:
        raise ConfigError("\n".join(problems))


def default_trajectory_steps(num_timesteps: int) -> list[int]:
    """The tutorial's strip (t = 0 ... 999 of T = 1000) at the same fractions of another T."""
    last = max(1, TUTORIAL_TRAJECTORY_STEPS[-1])
    return sorted({round(s * (num_timesteps - 1) / last) for s in TUTORIAL_TRAJECTORY_STEPS})


def _validate_cross(cfg: RunConfig, source: _Source) -> None:
    T = cfg.num_timesteps
    if "trajectory_steps" not in cfg.sample.model_fields_set:  # the default follows T
        cfg.sample.trajectory_steps = default_trajectory_steps(T)
    bad = [s for s in cfg.sample.trajectory_steps if s >= T]
    if bad:
        key = "sample.trajectory_steps"
        raise ConfigError(f"{source.where(key)}: {key}: steps {bad} are not below T = {T}")
    if cfg.guidance.method == "classifier-free" and not cfg.conditioning.enabled:
        key = "guidance.method"
        raise ConfigError(
            f"{source.where(key)}: {key}: classifier-free guidance needs a conditional run "
            '(conditioning.kind = "class"); an unconditional run is guided by autoguidance'
        )
    if cfg.train.smaller_models and cfg.train.budget_min_steps is None:
        key = "train.smaller_models"
        raise ConfigError(
            f"{source.where(key)}: {key}: needs train.budget_min_steps, the steps below which a "
            "time budget takes a smaller model"
        )
    for index in range(1, len(cfg.train.smaller_models) + 1):
        try:
            cfg.with_smaller_model(index)  # each fallback builds a valid run: said when the config loads
        except ConfigError as exc:
            raise ConfigError(f"{source.where('train.smaller_models')}: {exc}") from None
    if cfg.guidance.interval is not None and cfg.guidance.interval[1] >= T:
        key = "guidance.interval"
        raise ConfigError(
            f"{source.where(key)}: {key}: {cfg.guidance.interval} reaches beyond the last step (T - 1 = {T - 1})"
        )
