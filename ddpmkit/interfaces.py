"""The four kinds of component: NoiseSchedule, Denoiser, Sampler and (plugin API 4) Objective.

Each component declares its constructor options as a nested pydantic ``Options`` model
(``extra="forbid"``); a plugin subclasses the model to add its own fields.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import torch
from pydantic import ConfigDict, Field
from torch import nn

from ddpmkit.diffusion import (
    CONDITIONS,
    Cond,
    ReverseStep,
    SamplerCallback,
    Start,
    StepHook,
    denoise,
    per_image,
    run_reverse_steps,
    vp_coefficients,
)
from ddpmkit.errors import ConfigError
from ddpmkit.validation import StrictNumbers

__all__ = [
    "CONDITIONS",
    "ComponentOptions",
    "Cond",
    "Denoiser",
    "LevelsSchedule",
    "NoiseSchedule",
    "Objective",
    "ObjectiveNetwork",
    "ReverseStepSampler",
    "Sampler",
    "SamplerCallback",
    "Start",
    "StepHook",
    "check_betas",
]


class ComponentOptions(StrictNumbers):
    """Base of every component's options: unknown keys are errors, and so is a boolean given for a number."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoiseSchedule(abc.ABC):
    """A variance schedule beta_1..beta_T and the quantities of Ho et al. (2020) derived from it.

    Subclasses implement :meth:`make_betas`; everything else is derived here, once, in float64,
    and exposed as float32 tensors (move them with :meth:`to`); :meth:`float64` gives any of them as computed.
    """

    class Options(ComponentOptions):
        num_timesteps: int = Field(1000, ge=1, description="number of diffusion steps T")

    def __init__(self, options: NoiseSchedule.Options | None = None) -> None:
        self.options = options if options is not None else type(self).Options()
        betas = self.make_betas().to(torch.float64)
        check_betas(betas, self.options.num_timesteps)
        self._derive(betas)

    @abc.abstractmethod
    def make_betas(self) -> torch.Tensor:
        """Return beta_t for t = 0..T-1 as a 1-D tensor (computed in float64)."""

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    def _derive(self, betas: torch.Tensor) -> None:
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        derived = {
            "betas": betas,
            "alphas": alphas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            # eq. 7: beta-tilde_t = (1 - abar_{t-1}) / (1 - abar_t) * beta_t  (0 at the first step)
            "posterior_variance": betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            # eq. 7: mu-tilde_t(x_t, x_0) = coef1 * x_0 + coef2 * x_t
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
        }
        self._tensor_names = tuple(derived)
        self._float64 = derived
        for name, value in derived.items():
            setattr(self, name, value.to(torch.float32))

    def float64(self, name: str) -> torch.Tensor:
        """The table ``name`` (``"alphas_cumprod"``, ``"betas"``, ...) as computed, in float64, on this schedule's
        device: for samplers that derive more from it (sigma = sqrt((1 - abar) / abar) loses up to 0.3 % near
        sigma_min from the float32 table)."""
        if name not in self._float64:
            raise KeyError(f"no table {name!r}; the tables are {', '.join(self._tensor_names)}")
        return self._float64[name].to(self.device)

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """Move every derived tensor to ``device``; returns self."""
        for name in self._tensor_names:
            setattr(self, name, getattr(self, name).to(device))
        return self

    @property
    def device(self) -> torch.device:
        return self.betas.device

    def snr(self) -> torch.Tensor:
        """Signal-to-noise ratio abar_t / (1 - abar_t) at every step."""
        return self.alphas_cumprod / (1.0 - self.alphas_cumprod)


def check_betas(betas: torch.Tensor, num_timesteps: int) -> None:
    """Raise ConfigError unless ``betas`` is a finite 1-D tensor of T values in (0, 1)."""
    if betas.ndim != 1 or betas.shape[0] != num_timesteps:
        raise ConfigError(f"schedule gave betas of shape {tuple(betas.shape)}, expected ({num_timesteps},)")
    if not torch.isfinite(betas).all():
        raise ConfigError("schedule gave non-finite betas")
    if not ((betas > 0) & (betas < 1)).all():
        raise ConfigError(
            f"schedule betas must lie in (0, 1); got min {betas.min().item():.3g}, max {betas.max().item():.3g}"
        )


class Denoiser(nn.Module, abc.ABC):
    """A network called as ``denoiser(x_t, t)`` that returns a tensor shaped like ``x_t``.

    ``x_t`` is [B, C, H, W] in the model's scale, ``t`` an integer tensor [B] with 0 <= t < T (one step
    per image). What the output estimates is ``prediction``: ``"epsilon"`` (the noise), ``"x0"`` (the
    clean image) or ``"v"`` (Salimans & Ho 2022); :mod:`ddpmkit.diffusion` converts between them. A
    class sets it as a class attribute, or declares an option named ``prediction`` to let users choose.

    Conditioning (plugin API 3): a class that lists ``"class"`` in :attr:`conditions` is built with
    ``num_classes=K`` for a class-conditional run and called ``denoiser(x_t, t, cond={"class": labels})``,
    labels an integer tensor [B] in 0..K-1 or :data:`~ddpmkit.diffusion.NULL_CLASS` (no class: it must
    learn the unconditional model too). Unconditional runs build it without ``num_classes`` and call it
    without ``cond``; a denoiser that declares no conditions (every API-2 one) is only used that way.
    """

    #: What the output estimates: "epsilon", "x0" or "v" (an option named ``prediction`` overrides it).
    prediction: str = "epsilon"
    #: The kinds of condition this class can be trained on (of ``ddpmkit.diffusion.CONDITIONS``).
    conditions: ClassVar[frozenset[str]] = frozenset()
    #: Whether ``t`` may be a float tensor of times in [0, T) (plugin API 4): objectives other than ``ddpm``
    #: (flow matching, EDM) call the network at continuous noise levels and need a denoiser that declares it.
    continuous_time: ClassVar[bool] = False

    class Options(ComponentOptions):
        pass

    def __init__(
        self,
        options: Denoiser.Options | None = None,
        *,
        image_shape: tuple[int, int, int],
        num_timesteps: int,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        self.options = options if options is not None else type(self).Options()
        self.image_shape = tuple(int(v) for v in image_shape)
        self.num_timesteps = int(num_timesteps)
        #: classes of a class-conditional model (0: unconditional)
        self.num_classes = int(num_classes)
        chosen = getattr(self.options, "prediction", None)
        if isinstance(chosen, str):
            self.prediction = chosen
        # an empty buffer that follows .to(): answers `device` for a model without parameters
        self.register_buffer("_ddpmkit_device", torch.empty(0), persistent=False)

    @abc.abstractmethod
    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        """Predict ``self.prediction`` for the noisy images ``x_t`` at steps ``t`` (given ``cond``, if conditional)."""

    @property
    def device(self) -> torch.device:
        """Where this model lives (and where samplers put their tensors)."""
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class Sampler(abc.ABC):
    """Runs the reverse process from pure noise to images in [-1, 1].

    A sampler says which steps it takes (:meth:`timesteps`: the t of each step, in order, as its callback
    reports them), so progress bars, ETAs and the denoising strip follow it; what a batch costs is
    :meth:`num_evaluations`, the denoiser calls (more than the steps for a multi-call solver). A sampler built from the
    generalised reverse steps of :mod:`ddpmkit.diffusion` returns them from :meth:`reverse_steps`; the
    conformance kit then knows the exact answer for its own discretisation on Gaussian data. Any
    other sampler is held to the ideal answer within :attr:`oracle_tolerance`.
    """

    #: How far from the ideal mean and std on the kit's Gaussian data this sampler's discretisation may
    #: land (beyond sampling error); used only when neither :meth:`reverse_steps` nor :meth:`gaussian_answer`
    #: gives the exact answer. A solver's error depends on its step count: prefer stating the answer.
    oracle_tolerance: ClassVar[float] = 0.005
    #: Whether :meth:`sample` takes ``start`` (begin at a step from given noisy images: SDEdit), ``hook``
    #: (replace part of the state after each step: inpainting) and ``jump_length`` / ``resample`` (RePaint's
    #: resampling); ``ddpmkit edit`` uses only samplers that do, and the kit checks them.
    supports_start: ClassVar[bool] = False
    #: The order of accuracy of the solver (1: Euler and DDIM; 2: Heun, DPM-Solver++(2M)), or None. A sampler with a
    #: ``steps`` option that declares it is checked by the kit: its error on Gaussian data must fall by about 2^order
    #: when the steps double (plugin API 4).
    order: ClassVar[int | None] = None

    class Options(ComponentOptions):
        pass

    def __init__(self, options: Sampler.Options | None = None) -> None:
        self.options = options if options is not None else type(self).Options()

    def reverse_steps(self, schedule: NoiseSchedule) -> list[ReverseStep] | None:
        """The generalised reverse steps this sampler takes under ``schedule``, or None if it is not of that family."""
        return None

    def gaussian_answer(self, schedule: NoiseSchedule, mu: float, s: float) -> tuple[float, float] | None:
        """The exact (mean, std) this sampler's own discretisation gives for data N(mu, s^2) with the exact
        predictor, or None. With the exact predictor a linear solver stays Gaussian, so its answer is a short
        recursion in floats (:func:`ddpmkit.diffusion.gaussian_reverse_moments` is the one for reverse steps);
        the conformance kit then holds the sampler to it instead of to :attr:`oracle_tolerance`."""
        return None

    def timesteps(self, schedule: NoiseSchedule) -> list[int]:
        """The t at which this sampler evaluates the denoiser, in order (default: T-1 down to 0)."""
        steps = self.reverse_steps(schedule)
        if steps is not None:
            return [step.t for step in steps]
        return list(reversed(range(schedule.num_timesteps)))

    def num_steps(self, schedule: NoiseSchedule) -> int:
        """How many steps (callbacks) one batch takes under ``schedule``: ``len(timesteps(schedule))``."""
        return len(self.timesteps(schedule))

    def num_evaluations(self, schedule: NoiseSchedule) -> int:
        """What one batch costs: how many times :meth:`sample` calls the denoiser under ``schedule`` (default: once
        per step; a second-order sampler such as Heun's calls it twice in most steps and says so here). Sweeps,
        ``validate`` and the plans report this, and the conformance kit counts the calls it observes."""
        return self.num_steps(schedule)

    @abc.abstractmethod
    def sample(
        self,
        denoiser: Denoiser,
        schedule: NoiseSchedule,
        shape: tuple[int, ...],
        *,
        generator: torch.Generator,
        callback: SamplerCallback | None = None,
    ) -> torch.Tensor:
        """Draw ``shape[0]`` images on ``denoiser.device``; every random draw uses ``generator``.

        Calls ``callback(index, t, x)`` after each step, with t from :meth:`timesteps`; a sampler that has an
        estimate of the clean image passes it as ``x0=`` to a callback that takes it
        (:func:`ddpmkit.diffusion.takes_x0`), as :class:`ReverseStepSampler` does.
        """


class ReverseStepSampler(Sampler):
    """A sampler that is fully described by its :meth:`reverse_steps`: it draws x_T ~ N(0, I) and takes each
    step with :func:`ddpmkit.diffusion.run_reverse_steps` (an option named ``clip_denoised`` is honoured).
    ``ddpm`` and ``ddim`` are written this way; a subclass implements ``reverse_steps`` only, and can start
    from given images and take a per-step hook (:attr:`Sampler.supports_start`) for free."""

    supports_start: ClassVar[bool] = True

    @abc.abstractmethod
    def reverse_steps(self, schedule: NoiseSchedule) -> list[ReverseStep]:
        """The generalised reverse steps this sampler takes under ``schedule``."""

    @torch.no_grad()
    def sample(
        self,
        denoiser: Denoiser,
        schedule: NoiseSchedule,
        shape: tuple[int, ...],
        *,
        generator: torch.Generator,
        callback: SamplerCallback | None = None,
        start: Start | None = None,
        hook: StepHook | None = None,
        jump_length: int = 1,
        resample: int = 1,
    ) -> torch.Tensor:
        clip = bool(getattr(self.options, "clip_denoised", False))
        return run_reverse_steps(
            self.reverse_steps(schedule),
            denoiser,
            schedule,
            shape,
            generator=generator,
            clip_denoised=clip,
            callback=callback,
            start=start,
            hook=hook,
            jump_length=jump_length,
            resample=resample,
        )


#: The smallest abar a sampling schedule holds: the end of a flow (t = 1, no signal left) becomes abar = 2^-24,
#: as diffusers' zero-terminal-SNR rescaling does, so that every sampler's x_0 = (x - sqrt(1 - abar) eps) / sqrt(abar)
#: stays finite.
MIN_ALPHA_BAR = 2.0**-24


class LevelsSchedule(NoiseSchedule):
    """A discrete variance-preserving schedule given by its abar_t (one per level, least noisy first): how samplers
    see an objective's own noise levels (:meth:`Objective.sampling_schedule`)."""

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        self._abar = alphas_cumprod.to(torch.float64).clamp(min=MIN_ALPHA_BAR)
        super().__init__(NoiseSchedule.Options(num_timesteps=len(self._abar)))

    def make_betas(self) -> torch.Tensor:
        previous = torch.cat([self._abar.new_ones(1), self._abar[:-1]])
        return 1.0 - self._abar / previous


class Objective(abc.ABC):
    """How a denoiser is trained and what its output means (plugin API 4): DDPM, flow matching, EDM, or a third
    party's.

    An objective has a noise variable tau of its own (an integer step for ``ddpm``, the time t in [0, 1] for
    ``flow``, sigma for ``edm``) and owns:

    - the forward corruption x = a(tau) x_0 + b(tau) eps (:meth:`coefficients`);
    - how training draws tau (:meth:`draw_levels`) and what time the network is told (:meth:`network_time`);
    - the parameterisation: the network sees ``input_scale(tau) * x`` and is trained towards :meth:`target`, with
      per-image :meth:`weight`; :meth:`split` turns its output back into the estimates (x_0, eps);
    - the noise levels samplers walk (:meth:`levels`), which they see as the variance-preserving schedule with the
      same abar (:meth:`sampling_schedule`) and a network that predicts that schedule's v
      (:meth:`sampling_network`). Every sampler, guidance, editing and evaluation then works unchanged.

    The methods take tau as a tensor [B] and images [B, C, H, W]; return values broadcast against the images.
    """

    #: Whether the objective's noise levels come from the run's ``[schedule]`` (``ddpm``); others define their own.
    uses_schedule: ClassVar[bool] = False
    #: Whether the network is called with non-integer times (the denoiser must declare ``continuous_time``).
    continuous_time: ClassVar[bool] = True

    class Options(ComponentOptions):
        num_levels: int = Field(
            1000, ge=2, le=100_000, description="noise levels samplers choose their steps from (a schedule's T)"
        )

    def __init__(
        self,
        options: Objective.Options | None = None,
        *,
        schedule: NoiseSchedule | None = None,
        prediction: str = "epsilon",
    ) -> None:
        self.options = options if options is not None else type(self).Options()
        #: the run's schedule (read only by an objective that ``uses_schedule``)
        self.schedule = schedule
        #: the denoiser's declared target (read only by an objective that lets the denoiser choose it)
        self.prediction = prediction
        self._view: NoiseSchedule | None = None

    @property
    def num_levels(self) -> int:
        """How many noise levels samplers choose from (the T of :meth:`sampling_schedule` and of the denoiser)."""
        return int(getattr(self.options, "num_levels", 1000))

    # --- what an objective defines ---------------------------------------------------------------------------

    @abc.abstractmethod
    def levels(self) -> torch.Tensor:
        """The tau of each of :attr:`num_levels` noise levels, least noisy first (float64 or int64, on the CPU)."""

    @abc.abstractmethod
    def coefficients(self, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) of x = a x_0 + b eps at each tau."""

    @abc.abstractmethod
    def draw_levels(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n training noise levels tau, drawn from ``generator`` on its device."""

    @abc.abstractmethod
    def network_time(self, tau: torch.Tensor) -> torch.Tensor:
        """The ``t`` the denoiser is called with at each tau: in [0, num_levels] for the levels themselves."""

    @abc.abstractmethod
    def split(self, x_t: torch.Tensor, tau: torch.Tensor, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The estimates (x_0, eps) that the network's ``output`` at (x_t, tau) stands for."""

    @abc.abstractmethod
    def target(self, x0: torch.Tensor, eps: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """What the network should output for x_t = a x_0 + b eps: :meth:`split` of it gives back (x_0, eps)."""

    def input_scale(self, tau: torch.Tensor) -> torch.Tensor:
        """The factor on x_t before the network sees it (EDM's c_in); 1 by default."""
        return torch.ones(tau.shape, dtype=torch.float32, device=tau.device)

    def weight(self, tau: torch.Tensor) -> torch.Tensor:
        """Per-image weight of the squared error against :meth:`target`; 1 by default."""
        return torch.ones(tau.shape, dtype=torch.float32, device=tau.device)

    def couple(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The noise each image of a training batch is paired with (default: as drawn, independently). An
        objective may pair them, e.g. minibatch optimal-transport flow matching (Tong et al. 2024) reorders the
        batch's noise to the nearest images; it must return ``noise`` reordered or transformed to the same shape,
        deterministically (resumed runs repeat it). Under torchrun it sees this process's slice of the batch."""
        return noise

    # --- what follows from it ----------------------------------------------------------------------------------

    def corrupt(self, x0: torch.Tensor, eps: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """x = a(tau) x_0 + b(tau) eps."""
        a, b = self.coefficients(tau)
        return per_image(a, x0) * x0 + per_image(b, x0) * eps

    def draw_training(
        self, batch: int, shape: tuple[int, ...], generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch's noise levels and noise eps ~ N(0, I), in that order from ``generator``."""
        tau = self.draw_levels(batch, generator)
        noise = torch.randn((batch, *shape), generator=generator, device=generator.device)
        return tau, noise

    def output(
        self, denoiser: nn.Module, x_t: torch.Tensor, tau: torch.Tensor, cond: Cond | None = None
    ) -> torch.Tensor:
        """The network's raw output at (x_t, tau), checked to be shaped like x_t, in float32."""
        scaled = per_image(self.input_scale(tau), x_t) * x_t
        return denoise(denoiser, scaled, self.network_time(tau), cond).float()  # type: ignore[arg-type]

    def training_loss(
        self,
        denoiser: nn.Module,
        x0: torch.Tensor,
        tau: torch.Tensor,
        noise: torch.Tensor,
        cond: Cond | None = None,
    ) -> torch.Tensor:
        """The batch's loss: the mean over images of weight(tau) times the mean squared error against the target."""
        x_t = self.corrupt(x0, noise, tau)
        error = (self.output(denoiser, x_t, tau, cond) - self.target(x0, noise, tau).float()).square()
        return (self.weight(tau).to(error.device, torch.float32) * error.flatten(1).mean(dim=1)).mean()

    def predict(
        self, denoiser: nn.Module, x_t: torch.Tensor, tau: torch.Tensor, cond: Cond | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The denoiser's (x_0, eps) estimates at (x_t, tau)."""
        return self.split(x_t.float(), tau, self.output(denoiser, x_t, tau, cond))

    def sampling_schedule(self) -> NoiseSchedule:
        """The variance-preserving schedule with this objective's levels' abar = a^2 / (a^2 + b^2): what samplers
        take steps on."""
        if self._view is None:
            a, b = self.coefficients(self.levels())
            sqrt_abar, _ = vp_coefficients(a.double(), b.double())
            self._view = LevelsSchedule(sqrt_abar.square())
        return self._view

    def sampling_network(self, denoiser: Denoiser) -> Denoiser:
        """``denoiser`` as samplers call it on :meth:`sampling_schedule`: at level index t, with x scaled to this
        objective's x, predicting that schedule's v."""
        return ObjectiveNetwork(self, denoiser)


class ObjectiveNetwork(Denoiser):
    """A denoiser trained under an objective, called as samplers call any denoiser: ``(x, t)`` with t the index of
    one of the objective's levels and x on the variance-preserving scale of :meth:`Objective.sampling_schedule`.
    It scales x up to the objective's (by s = sqrt(a^2 + b^2)), asks the network, and answers the schedule's
    v = sqrt(abar) eps - sqrt(1 - abar) x_0, which every sampler converts back (the v target is finite where abar
    is 0, at the end of a flow)."""

    prediction = "v"
    continuous_time = False

    def __init__(self, objective: Objective, inner: Denoiser) -> None:
        super().__init__(
            image_shape=inner.image_shape,
            num_timesteps=objective.num_levels,
            num_classes=getattr(inner, "num_classes", 0),
        )
        self.objective, self.inner = objective, inner
        self.conditions = getattr(inner, "conditions", frozenset())
        levels = objective.levels()
        a, b = objective.coefficients(levels)
        view = objective.sampling_schedule()
        # float32 tables, kept with the model (they follow .to(device)); tau kept in its own dtype
        self.register_buffer("levels", levels, persistent=False)
        self.register_buffer("scale", (a.double().square() + b.double().square()).sqrt().float(), persistent=False)
        self.register_buffer("alpha", view.sqrt_alphas_cumprod.clone(), persistent=False)
        self.register_buffer("sigma", view.sqrt_one_minus_alphas_cumprod.clone(), persistent=False)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        t = t.long()
        tau = self.levels[t]
        x = per_image(self.scale[t], x_t) * x_t.float()
        x0, eps = self.objective.predict(self.inner, x, tau, cond)
        return per_image(self.alpha[t], x_t) * eps - per_image(self.sigma[t], x_t) * x0
