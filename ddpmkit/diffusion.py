"""The diffusion maths, written once against NoiseSchedule: every sampler and the training loss call it.

Notation of Ho et al. (2020): abar_t = prod_{s<=t} (1 - beta_s); x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
(eq. 4). A denoiser predicts one of three targets (``Denoiser.prediction``):

- ``epsilon``: the noise eps (Ho et al. 2020, eq. 14);
- ``x0``: the clean image x_0;
- ``v``: v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022, section 4).

Any one of them, with x_t, gives the other two. ``t`` is an integer tensor [B] (one step per image)
or a Python int (the same step for the whole batch); a step of -1 means "before the first step",
where abar = 1 (the end of a reverse chain).

Conditioning (plugin API 3): a denoiser may be called ``denoiser(x_t, t, cond=cond)`` with ``cond`` a
:data:`Cond`, a dict from a kind of condition to one entry per image. The one kind so far is
``"class"``: an integer tensor [B] of class indices, where :data:`NULL_CLASS` means "no class" (the
unconditional model of classifier-free guidance, Ho & Salimans 2022). ``cond=None`` is never passed: an
unconditional call is ``denoiser(x_t, t)``, as in API 2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from ddpmkit.errors import ConfigError

__all__ = [
    "CONDITIONS",
    "Cond",
    "NULL_CLASS",
    "Network",
    "PREDICTIONS",
    "ReverseStep",
    "SamplerCallback",
    "ScheduleTables",
    "Start",
    "Step",
    "StepHook",
    "alpha_bar",
    "ancestral_steps",
    "check_prediction",
    "ddim_sigma",
    "denoise",
    "draw_training_batch_noise",
    "edm_preconditioning",
    "flow_split",
    "karras_sigmas",
    "karras_timesteps",
    "loss_weight",
    "vp_coefficients",
    "eps_from_x0",
    "forward_jump",
    "gaussian_reverse_moments",
    "gaussian_solver_moments",
    "ode_sigma",
    "per_image",
    "predict_x0_eps",
    "q_posterior_mean_variance",
    "q_sample",
    "reverse_step",
    "run_reverse_steps",
    "split_prediction",
    "start_step",
    "takes_x0",
    "training_loss",
    "training_target",
    "v_from_x0_eps",
    "x0_eps_from_v",
    "x0_from_eps",
]


# The maths is written against what it reads, so that it sits below the interfaces that use it:
# ddpmkit.interfaces.NoiseSchedule and Denoiser provide these members.
class ScheduleTables(Protocol):
    """The tables of a noise schedule the maths reads (see :class:`ddpmkit.interfaces.NoiseSchedule`)."""

    num_timesteps: int
    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor

    def to(self, device: torch.device | str) -> ScheduleTables: ...

    def snr(self) -> torch.Tensor: ...


class Network(Protocol):
    """A network the maths calls (see :class:`ddpmkit.interfaces.Denoiser`)."""

    prediction: str

    @property
    def device(self) -> torch.device: ...

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...


#: What a conditional denoiser is asked for, per image: ``{"class": int64 [B]}`` (see the module docstring).
Cond = dict[str, torch.Tensor]
#: The class index meaning "no class": the unconditional model a conditional denoiser also learns.
NULL_CLASS = -1
#: The kinds of condition ddpmkit knows (a denoiser declares the ones it takes in ``conditions``).
CONDITIONS: tuple[str, ...] = ("class",)


#: Called by a sampler after every reverse step with (step index, t, current x).
SamplerCallback = Callable[[int, int, torch.Tensor], None]
#: ``hook(index, t_prev, x) -> x``: called after every reverse step with the new state (at ``t_prev``; -1 after
#: the last step); what it returns replaces the state (inpainting pastes the known pixels in).
StepHook = Callable[[int, int, torch.Tensor], torch.Tensor]

#: The prediction targets a denoiser may declare.
PREDICTIONS: tuple[str, ...] = ("epsilon", "x0", "v")
#: A schedule whose x_T still holds more signal than this is not close enough to pure noise.
MAX_FINAL_SNR = 0.01

Step = int | torch.Tensor


def _at(values: torch.Tensor, t: Step, like: torch.Tensor) -> torch.Tensor:
    """``values[t]`` shaped to broadcast against ``like`` ([B, ...]); an int t gives one scalar."""
    if isinstance(t, int):
        return values[t]
    return values[t].view(-1, *([1] * (like.ndim - 1)))


def per_image(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """One value per image ([B]) as float32 on ``like``'s device, shaped to broadcast against ``like`` ([B, ...])."""
    return values.to(device=like.device, dtype=torch.float32).view(-1, *([1] * (like.ndim - 1)))


def alpha_bar(schedule: ScheduleTables, t: int) -> float:
    """abar_t as a Python float, with abar_{-1} = 1 (nothing noised yet)."""
    return 1.0 if t < 0 else float(schedule.alphas_cumprod[t])


def check_prediction(prediction: str) -> str:
    """``prediction`` itself, or ConfigError naming the targets ddpmkit knows."""
    if prediction not in PREDICTIONS:
        raise ConfigError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")
    return prediction


# --- the forward process ---------------------------------------------------------------------------


def q_sample(schedule: ScheduleTables, x0: torch.Tensor, t: Step, noise: torch.Tensor) -> torch.Tensor:
    """eq. 4: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
    return _at(schedule.sqrt_alphas_cumprod, t, x0) * x0 + _at(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise


def q_posterior_mean_variance(
    schedule: ScheduleTables, x0: torch.Tensor, x_t: torch.Tensor, t: Step
) -> tuple[torch.Tensor, torch.Tensor]:
    """eq. 7: the mean mu-tilde_t(x_t, x_0) and variance beta-tilde_t of q(x_{t-1} | x_t, x_0)."""
    mean = _at(schedule.posterior_mean_coef1, t, x_t) * x0 + _at(schedule.posterior_mean_coef2, t, x_t) * x_t
    return mean, _at(schedule.posterior_variance, t, x_t)


# --- conversions between prediction targets ----------------------------------------------------------


def x0_from_eps(schedule: ScheduleTables, x_t: torch.Tensor, t: Step, eps: torch.Tensor) -> torch.Tensor:
    """eq. 4 solved for x_0: (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    return (x_t - _at(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * eps) / _at(schedule.sqrt_alphas_cumprod, t, x_t)


def eps_from_x0(schedule: ScheduleTables, x_t: torch.Tensor, t: Step, x0: torch.Tensor) -> torch.Tensor:
    """eq. 4 solved for eps: (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)."""
    return (x_t - _at(schedule.sqrt_alphas_cumprod, t, x_t) * x0) / _at(schedule.sqrt_one_minus_alphas_cumprod, t, x_t)


def v_from_x0_eps(schedule: ScheduleTables, t: Step, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Salimans & Ho (2022): v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0."""
    return _at(schedule.sqrt_alphas_cumprod, t, x0) * eps - _at(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * x0


def x0_eps_from_v(
    schedule: ScheduleTables, x_t: torch.Tensor, t: Step, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Salimans & Ho (2022): x_0 = sqrt(abar) x_t - sqrt(1 - abar) v and eps = sqrt(1 - abar) x_t + sqrt(abar) v."""
    a, b = _at(schedule.sqrt_alphas_cumprod, t, x_t), _at(schedule.sqrt_one_minus_alphas_cumprod, t, x_t)
    return a * x_t - b * v, b * x_t + a * v


def split_prediction(
    schedule: ScheduleTables, x_t: torch.Tensor, t: Step, output: torch.Tensor, prediction: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_0, eps) implied by a denoiser's ``output`` for its declared ``prediction`` target."""
    if prediction == "epsilon":
        return x0_from_eps(schedule, x_t, t, output), output
    if prediction == "x0":
        return output, eps_from_x0(schedule, x_t, t, output)
    if prediction == "v":
        return x0_eps_from_v(schedule, x_t, t, output)
    raise ConfigError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")


def training_target(
    schedule: ScheduleTables, x0: torch.Tensor, noise: torch.Tensor, t: Step, prediction: str
) -> torch.Tensor:
    """What a denoiser with target ``prediction`` should output for x_t = q_sample(x0, t, noise)."""
    if prediction == "epsilon":
        return noise
    if prediction == "x0":
        return x0
    if prediction == "v":
        return v_from_x0_eps(schedule, t, x0, noise)
    raise ConfigError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")


# --- calling a denoiser ---------------------------------------------------------------------------------


def denoise(denoiser: Network, x_t: torch.Tensor, t: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
    """``denoiser(x_t, t)`` (``denoiser(x_t, t, cond=cond)`` when ``cond`` is given), checked: a tensor shaped
    like ``x_t``, else ValueError saying what came back."""
    out = denoiser(x_t, t) if cond is None else denoiser(x_t, t, cond=cond)
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"forward returned {type(out).__name__}, expected a tensor shaped like x_t")
    if out.shape != x_t.shape:
        raise ValueError(f"forward returned shape {tuple(out.shape)} for input {tuple(x_t.shape)}; they must match")
    return out


def predict_x0_eps(
    denoiser: Network,
    schedule: ScheduleTables,
    x_t: torch.Tensor,
    t: int,
    *,
    clip_denoised: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The denoiser's estimate of (x_0, eps) at step ``t`` for the whole batch, in float32.

    With ``clip_denoised`` x_0 is clipped to [-1, 1] and eps recomputed from it, so both stay consistent.
    """
    t_batch = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
    output = denoise(denoiser, x_t, t_batch).float()
    x0, eps = split_prediction(schedule, x_t, t, output, denoiser.prediction)
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
        eps = eps_from_x0(schedule, x_t, t, x0)
    return x0, eps


# --- the training objective --------------------------------------------------------------------------


#: How the per-step losses are weighted: ``uniform`` (Ho et al. 2020, eq. 14) or ``min_snr`` (Hang et al. 2023).
LOSS_WEIGHTINGS: tuple[str, ...] = ("uniform", "min_snr")


def loss_weight(
    schedule: ScheduleTables, t: torch.Tensor, prediction: str, weighting: str, gamma: float = 5.0
) -> torch.Tensor:
    """Per-image weight of the squared error at steps ``t``.

    ``min_snr`` (Hang et al. 2023) weights the x0 error by min(SNR_t, gamma). For estimates consistent with
    x_t, ||eps error||^2 = SNR ||x0 error||^2 and ||v error||^2 = (SNR + 1) ||x0 error||^2, so the same
    weighting is min(SNR, gamma) / SNR on the epsilon loss and min(SNR, gamma) / (SNR + 1) on the v loss.
    """
    if weighting == "uniform":
        return torch.ones(t.shape, device=t.device)
    if weighting != "min_snr":
        raise ConfigError(f"loss weighting must be one of {', '.join(LOSS_WEIGHTINGS)}, got {weighting!r}")
    snr = schedule.snr()[t].float()
    clipped = snr.clamp(max=gamma)
    return {"epsilon": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}[check_prediction(prediction)]


def training_loss(
    denoiser: Network,
    schedule: ScheduleTables,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    *,
    weighting: str = "uniform",
    gamma: float = 5.0,
    cond: Cond | None = None,
) -> torch.Tensor:
    """eq. 14, the simplified objective, for the denoiser's target: || target - output ||^2 averaged over
    pixels, then over the batch with :func:`loss_weight` (all 1 for ``uniform``); ``cond`` is what each
    image is conditioned on (classifier-free training drops some of it to :data:`NULL_CLASS` first)."""
    output = denoise(denoiser, q_sample(schedule, x0, t, noise), t, cond)
    target = training_target(schedule, x0, noise, t, denoiser.prediction)
    if weighting == "uniform":
        return F.mse_loss(output.float(), target)
    per_image = (output.float() - target).square().flatten(1).mean(dim=1)
    return (loss_weight(schedule, t, denoiser.prediction, weighting, gamma) * per_image).mean()


def draw_training_batch_noise(
    batch_size: int, shape: tuple[int, ...], num_timesteps: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """t uniform in [0, T) and eps ~ N(0, I) for one batch, both from ``generator`` (on its device)."""
    t = torch.randint(0, num_timesteps, (batch_size,), generator=generator, device=generator.device)
    noise = torch.randn((batch_size, *shape), generator=generator, device=generator.device)
    return t, noise


# --- other forward processes: flow matching and EDM, and their variance-preserving view --------------------
#
# Any forward process x = a(tau) x_0 + b(tau) eps is the variance-preserving one of eq. 4 rescaled: x / s with
# s = sqrt(a^2 + b^2) has abar = a^2 / s^2 (Kingma et al. 2021, "Variational Diffusion Models", appendix; Karras et
# al. 2022, section 2 and eq. 4). So a sampler written for eq. 4 samples any of them on the abar of their levels,
# with x scaled by s on the way into the network: DDIM is then exactly the Euler step of rectified flow and of EDM.


def vp_coefficients(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sqrt(abar), sqrt(1 - abar)) of the variance-preserving process equal to x = a x_0 + b eps up to the scale
    s = sqrt(a^2 + b^2): (a / s, b / s)."""
    s = (a.square() + b.square()).sqrt()
    return a / s, b / s


def flow_split(x_t: torch.Tensor, t: torch.Tensor, velocity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rectified flow (Liu et al. 2023; Lipman et al. 2023, eq. 23 with sigma_min = 0): x_t = (1 - t) x_0 + t eps and
    the velocity v = eps - x_0 give x_0 = x_t - t v and eps = x_t + (1 - t) v."""
    return x_t - t * velocity, x_t + (1 - t) * velocity


def edm_preconditioning(sigma: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Karras et al. (2022), table 1: (c_skip, c_out, c_in) at noise level sigma, for D(x) = c_skip x + c_out
    F(c_in x, c_noise), chosen so that F's input and its training target both have unit variance (eqs. 7-8)."""
    total = sigma.square() + sigma_data**2
    return sigma_data**2 / total, sigma * sigma_data / total.sqrt(), 1 / total.sqrt()


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022), eq. 5: n noise levels from sigma_min up to sigma_max (float64), spaced evenly in
    sigma^(1/rho), so that steps are short near the data."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    low, high = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (low + ramp * (high - low)) ** rho


# --- reverse steps --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReverseStep:
    """One step x_t -> x_{t_prev} of the generalised reverse process of Song et al. (2021), eq. 12.

    x_{t_prev} = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev - c^2) eps + sigma z, z ~ N(0, I), with (x_0, eps)
    the denoiser's estimate at t. DDIM uses c = sigma (eq. 16); DDPM's ancestral step (Ho et al. 2020,
    eq. 11) is c^2 = beta-tilde_t, the posterior variance, with sigma^2 = beta_t or beta-tilde_t.
    ``t_prev = -1`` ends the chain (abar = 1).
    """

    t: int
    t_prev: int
    c: float
    sigma: float


def ddim_sigma(schedule: ScheduleTables, t: int, t_prev: int, eta: float) -> float:
    """Song et al. (2021), eq. 16: sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)."""
    ab, ab_prev = alpha_bar(schedule, t), alpha_bar(schedule, t_prev)
    return eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)) ** 0.5


def ancestral_steps(schedule: ScheduleTables, variance: str = "beta") -> list[ReverseStep]:
    """The T steps of DDPM ancestral sampling (Ho et al. 2020, Algorithm 2), sigma^2 = beta_t or beta-tilde_t."""
    steps = []
    for t in reversed(range(schedule.num_timesteps)):
        posterior = float(schedule.posterior_variance[t])
        sigma2 = 0.0 if t == 0 else float(schedule.betas[t]) if variance == "beta" else posterior
        steps.append(ReverseStep(t, t - 1, posterior**0.5, sigma2**0.5))
    return steps


def reverse_step(
    schedule: ScheduleTables,
    step: ReverseStep,
    x0: torch.Tensor,
    eps: torch.Tensor,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Song et al. (2021), eq. 12: x_{t_prev} from the estimate (x_0, eps); ``noise`` is z (needed when sigma > 0)."""
    ab_prev = alpha_bar(schedule, step.t_prev)
    direction = max(1.0 - ab_prev - step.c**2, 0.0) ** 0.5
    x = ab_prev**0.5 * x0 + direction * eps
    if step.sigma > 0:
        if noise is None:
            raise ValueError(f"step at t = {step.t} has sigma = {step.sigma:g} but no noise was given")
        x = x + step.sigma * noise
    return x


@dataclass(frozen=True)
class Start:
    """A reverse chain that begins at step ``t`` from the noisy images ``x`` (at that noise level) instead of at
    T from pure noise: the steps above ``t`` are skipped (SDEdit, Meng et al. 2022, section 3)."""

    x: torch.Tensor
    t: int


def start_step(timesteps: list[int], strength: float, num_timesteps: int) -> int | None:
    """The step a chain over ``timesteps`` (noisiest first) begins at for SDEdit's ``strength`` in [0, 1]: the
    largest of them at or below strength * T - 1; None for strength 0 (nothing to do: the input is the answer)."""
    if not 0.0 <= strength <= 1.0:
        raise ConfigError(f"strength {strength:g}: must lie in [0, 1] (0 keeps the input, 1 draws from pure noise)")
    target = round(strength * num_timesteps) - 1
    below = [t for t in timesteps if t <= target]
    return max(below) if below else None


def forward_jump(
    schedule: ScheduleTables, x: torch.Tensor, t_from: int, t_to: int, noise: torch.Tensor
) -> torch.Tensor:
    """A draw of x_{t_to} ~ q(x_{t_to} | x_{t_from}) for t_to > t_from: sqrt(abar_to / abar_from) x plus
    sqrt(1 - abar_to / abar_from) noise (Ho et al. 2020, eq. 4, composed; RePaint's jump back, Lugmayr et al.
    2022, section 4.2). ``t_from = -1`` is x_0."""
    ratio = alpha_bar(schedule, t_to) / alpha_bar(schedule, t_from)
    return ratio**0.5 * x + (1.0 - ratio) ** 0.5 * noise


def run_reverse_steps(
    steps: list[ReverseStep],
    denoiser: Network,
    schedule: ScheduleTables,
    shape: tuple[int, ...],
    *,
    generator: torch.Generator,
    clip_denoised: bool = False,
    callback: SamplerCallback | None = None,
    start: Start | None = None,
    hook: StepHook | None = None,
    jump_length: int = 1,
    resample: int = 1,
) -> torch.Tensor:
    """x_T ~ N(0, I) (or ``start``: its x, from its step on), then each step of eq. 12 (Song et al. 2021) on
    ``denoiser.device``; every draw from ``generator``; ``callback(index, t, x)`` after each step
    (``callback(index, t, x, x0=...)`` when it takes ``x0``: see :func:`takes_x0`); ``hook`` may replace the
    state after each step. With ``resample`` r > 1, every ``jump_length`` steps are walked r times, noised
    back up between the walks (RePaint, Lugmayr et al. 2022, Algorithm 1). Returns the last x clipped to [-1, 1]."""
    device = denoiser.device
    s = schedule.to(device)
    if start is not None:
        steps = [step for step in steps if step.t <= start.t]
        if not steps or steps[0].t != start.t:
            raise ValueError(f"start at t = {start.t} is not one of the sampler's steps")
        x = start.x.to(device)
    else:
        x = torch.randn(shape, generator=generator, device=generator.device).to(device)
    with_x0 = callback is not None and takes_x0(callback)
    index = 0
    for first in range(0, len(steps), max(1, jump_length)):
        block = steps[first : first + max(1, jump_length)]
        for walk in range(max(1, resample)):
            if walk:  # back up to the block's first noise level, then walk it again
                z = torch.randn(shape, generator=generator, device=generator.device).to(device)
                x = forward_jump(s, x, block[-1].t_prev, block[0].t, z)
            for step in block:
                x0, eps = predict_x0_eps(denoiser, s, x, step.t, clip_denoised=clip_denoised)
                z = (
                    torch.randn(shape, generator=generator, device=generator.device).to(device)
                    if step.sigma > 0
                    else None
                )
                x = reverse_step(s, step, x0, eps, z)
                if hook is not None:
                    x = hook(index, step.t_prev, x)
                if with_x0:
                    callback(index, step.t, x, x0=x0)
                elif callback is not None:
                    callback(index, step.t, x)
                index += 1
    return x.clamp(-1.0, 1.0)


def takes_x0(callback: SamplerCallback) -> bool:
    """Whether ``callback`` accepts the keyword ``x0`` (the step's clean-image estimate, k-diffusion's
    ``denoised``); callbacks written as ``callback(index, t, x)`` keep being called that way."""
    import inspect

    try:
        params = inspect.signature(callback).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "x0" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _posterior_mean_coefficients(ab: float, mu: float, s: float) -> tuple[float, float]:
    """E[x0 | x_t] = a x_t + b for x0 ~ N(mu, s^2): mu + sqrt(ab) s^2 / (ab s^2 + 1 - ab) (x_t - sqrt(ab) mu)."""
    gain = ab**0.5 * s**2 / (ab * s**2 + 1 - ab)
    return gain, mu - gain * ab**0.5 * mu


def gaussian_reverse_moments(
    schedule: ScheduleTables,
    steps: list[ReverseStep],
    mu: float,
    s: float,
    *,
    guided_by: tuple[float, float] | None = None,
    weight: float = 1.0,
    interval: tuple[int, int] | None = None,
) -> tuple[float, float]:
    """The exact mean and std of the output of ``steps`` from x_T ~ N(0, 1), with the exact predictor of
    data N(mu, s^2) (computed in float64, no clipping); ``guided_by=(mu_0, s_0)``: guided by the exact
    predictor of N(mu_0, s_0^2) with ``weight`` w, x0_hat = x0_0 + w (x0 - x0_0), at the steps in ``interval``.

    With these predictors every step is affine in x plus independent Gaussian noise, so x stays Gaussian:
    x0_hat = a0 x + b0, eps_hat = (x - sqrt(abar) x0_hat) / sqrt(1 - abar), and eq. 12 gives
    x_prev = A x + B + sigma z. This is how far a sampler's own discretisation is from N(mu, s^2) (or, guided,
    the closed-form answer guidance has for it).
    """
    abar = schedule.alphas_cumprod.double()
    mean, var = 0.0, 1.0
    for step in steps:
        ab = float(abar[step.t])
        ab_prev = 1.0 if step.t_prev < 0 else float(abar[step.t_prev])
        a0, b0 = _posterior_mean_coefficients(ab, mu, s)
        if guided_by is not None and (interval is None or interval[0] <= step.t <= interval[1]):
            a_ref, b_ref = _posterior_mean_coefficients(ab, *guided_by)
            a0, b0 = a_ref + weight * (a0 - a_ref), b_ref + weight * (b0 - b_ref)
        a_eps, b_eps = (1 - ab**0.5 * a0) / (1 - ab) ** 0.5, -(ab**0.5) * b0 / (1 - ab) ** 0.5
        direction = max(1.0 - ab_prev - step.c**2, 0.0) ** 0.5
        A = ab_prev**0.5 * a0 + direction * a_eps
        B = ab_prev**0.5 * b0 + direction * b_eps
        mean, var = A * mean + B, A * A * var + step.sigma**2
    return mean, var**0.5


# --- probability-flow ODE solvers on a schedule ------------------------------------------------------------------
#
# With sigma = sqrt((1 - abar) / abar) and y = x / sqrt(abar), eq. 4 is y = x_0 + sigma eps, and the probability-flow
# ODE is dy / dsigma = eps (Karras et al. 2022, eq. 4 with s = 1 after the rescaling of their section 2); lambda =
# -log(sigma) is the half log-SNR of DPM-Solver (Lu et al. 2022). The solvers below take steps between levels t of a
# schedule; t = -1 is the data (sigma = 0).


def ode_sigma(schedule: ScheduleTables, t: int) -> float:
    """sigma_t = sqrt((1 - abar_t) / abar_t), with sigma_{-1} = 0 (the data)."""
    ab = alpha_bar(schedule, t)
    return ((1.0 - ab) / ab) ** 0.5


def karras_timesteps(schedule: ScheduleTables, steps: int) -> list[int]:
    """``steps`` levels of ``schedule``, noisiest first, whose sigma (:func:`ode_sigma`) lie nearest, in log sigma, to
    Karras et al.'s (2022, eq. 5, rho = 7) from sigma_{T-1} down to sigma_0 (fewer when two round to one level)."""
    abar = schedule.alphas_cumprod.double()
    if steps == 1:
        return [len(abar) - 1]
    log_sigma = ((1 - abar) / abar).log() / 2
    wanted = karras_sigmas(steps, float(log_sigma[0].exp()), float(log_sigma[-1].exp())).log()
    nearest = (log_sigma[None, :] - wanted[:, None]).abs().argmin(dim=1)
    return sorted({int(t) for t in nearest}, reverse=True)


def gaussian_solver_moments(
    schedule: ScheduleTables, timesteps: list[int], mu: float, s: float, solver: str
) -> tuple[float, float]:
    """The exact mean and std of ``solver`` (``"heun"``: Karras et al. 2022, Algorithm 1, deterministic;
    ``"dpmpp-2m"``: Lu et al. 2022b, Algorithm 2) over ``timesteps`` (noisiest first, then the data) from x_T ~
    N(0, 1), with the exact predictor of data N(mu, s^2), in float64, no clipping.

    A deterministic solver with an affine predictor is affine in x_T: every state is c z + d for z = x_T, so its
    answer is (d, |c|). This is written apart from the samplers' own loops, as the recursion the kit holds them to.
    """
    abar = schedule.alphas_cumprod.double()

    def ab(t: int) -> float:
        return 1.0 if t < 0 else float(abar[t])

    def x0_of(c: float, d: float, t: int) -> tuple[float, float]:
        gain, offset = _posterior_mean_coefficients(ab(t), mu, s)
        return gain * c, gain * d + offset

    c, d = 1.0, 0.0  # x = c z + d
    previous: tuple[float, float] | None = None
    ts = [*timesteps, -1]
    for t, t_next in zip(ts, ts[1:]):
        a_t, a_next = ab(t) ** 0.5, ab(t_next) ** 0.5
        sig, sig_next = ((1 - ab(t)) / ab(t)) ** 0.5, ((1 - ab(t_next)) / ab(t_next)) ** 0.5
        x0c, x0d = x0_of(c, d, t)
        if solver == "heun":
            # y = x / a; dy/dsigma = eps = (y - x0) / sigma
            yc, yd = c / a_t, d / a_t
            ec, ed = (yc - x0c) / sig, (yd - x0d) / sig
            nyc, nyd = yc + (sig_next - sig) * ec, yd + (sig_next - sig) * ed
            if t_next >= 0:
                x1c, x1d = x0_of(nyc * a_next, nyd * a_next, t_next)
                e1c, e1d = (nyc - x1c) / sig_next, (nyd - x1d) / sig_next
                nyc, nyd = yc + (sig_next - sig) * (ec + e1c) / 2, yd + (sig_next - sig) * (ed + e1d) / 2
            c, d = nyc * a_next, nyd * a_next
        elif solver == "dpmpp-2m":
            if t_next < 0:
                c, d = x0c, x0d
            else:
                s_t, s_next = (1 - ab(t)) ** 0.5, (1 - ab(t_next)) ** 0.5
                h = math.log(a_next / s_next) - math.log(a_t / s_t)
                dc, dd = x0c, x0d
                if previous is not None:
                    r = previous[2] / h
                    dc = (1 + 1 / (2 * r)) * x0c - previous[0] / (2 * r)
                    dd = (1 + 1 / (2 * r)) * x0d - previous[1] / (2 * r)
                factor = -a_next * math.expm1(-h)
                c, d = s_next / s_t * c + factor * dc, s_next / s_t * d + factor * dd
                previous = (x0c, x0d, h)
        else:
            raise ValueError(f"solver must be 'heun' or 'dpmpp-2m', got {solver!r}")
    return d, abs(c)
