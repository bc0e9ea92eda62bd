"""The conformance kit: checks every schedule, denoiser and sampler must pass.

Run them from the command line (``ddpmkit check-plugins``) or from a plugin's own test suite::

    from ddpmkit.testing import assert_conforms

    def test_my_schedule():
        assert_conforms("schedule", "cosine", num_timesteps=100)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ddpmkit.diffusion import MAX_FINAL_SNR, PREDICTIONS, gaussian_reverse_moments
from ddpmkit.errors import ConfigError, DdpmkitError
from ddpmkit.interfaces import Denoiser
from ddpmkit.registry.blame import one_line
from ddpmkit.registry.build import create_denoiser, create_sampler, create_schedule

__all__ = [
    "CHECKS",
    "KITS",
    "METRIC_KEYS",
    "CheckResult",
    "Checks",
    "DenoiserChecks",
    "EventPluginChecks",
    "GaussianDataChecks",
    "GaussianOracle",
    "ObjectiveChecks",
    "ObjectiveOracle",
    "ideal_output",
    "SamplerChecks",
    "ScheduleChecks",
    "Skip",
    "assert_conforms",
    "check_component",
    "check_denoiser",
    "check_event_plugin",
    "check_objective",
    "check_sampler",
    "check_schedule",
]


@dataclass
class CheckResult:
    """One check of one component: passed or not, with what was measured."""

    kind: str
    name: str
    check: str
    passed: bool
    detail: str = ""
    #: DISTRIBUTION:NAME of the component checked
    qualified_name: str = ""
    #: the check did not apply (``detail`` says why): neither a pass nor a failure
    skipped: bool = False

    @property
    def verdict(self) -> str:
        """``pass``, ``FAIL`` or ``skip``."""
        return "skip" if self.skipped else "pass" if self.passed else "FAIL"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Skip(Exception):  # noqa: N818 (a check's outcome, not an error)
    """Raised by a check that does not apply to the component; its message says why."""


class Checks:
    """The conformance checks of one component: one method per check, the state they share on the instance.

    ``CHECKS`` lists (check, method) in the order they run, after the first check (``builds``), which the others
    need. ``run(only=...)`` runs some of them alone (by check or method name), as ``ddpmkit check-plugins NAME
    --only CHECK`` does; from pytest, ``SamplerChecks("mine").run(only=["seeds reproduce"])``.
    """

    kind = ""
    BUILD = "builds"
    CHECKS: tuple[tuple[str, str], ...] = ()

    def __init__(self, name: str) -> None:
        from ddpmkit.kinds import KINDS
        from ddpmkit.registry.discovery import find

        self.name, self.results = name.rpartition(":")[2], []
        self.full_name = name
        try:
            self.qualified = find(self.kind, name).qualified if self.kind in KINDS else name
        except DdpmkitError:  # reported by the "builds" check
            self.qualified = name

    @classmethod
    def names(cls) -> list[str]:
        """The checks, in the order they run (after ``builds``)."""
        return [check for check, _ in cls.CHECKS]

    @classmethod
    def select(cls, only: Collection[str] | None) -> list[tuple[str, str]]:
        """The (check, method) pairs ``only`` names (by check or method name); ConfigError for a name it lacks."""
        if not only:
            return list(cls.CHECKS)
        unknown = [o for o in only if not any(o in pair for pair in cls.CHECKS)]
        if unknown:
            raise ConfigError(
                f"no {cls.kind} check is named {', '.join(map(repr, unknown))}; the checks: {', '.join(cls.names())}"
            )
        return [pair for pair in cls.CHECKS if pair[0] in only or pair[1] in only]

    def build(self) -> str | None:
        raise NotImplementedError

    def run(self, only: Collection[str] | None = None) -> list[CheckResult]:
        """``builds``, then every check (or those ``only`` names); a check that raises fails with its message."""
        chosen = self.select(only)
        self.results = []
        if not self.attempt(self.BUILD, self.build):
            return self.results
        for check, method in chosen:
            self.attempt(check, getattr(self, method))
        return self.results

    def attempt(self, check: str, fn: Callable[[], str | None]) -> bool:
        """Run one check; an AssertionError or any exception is a failure with its message. Whether it passed."""
        try:
            detail = fn() or ""
            self.results.append(CheckResult(self.kind, self.name, check, True, detail, self.qualified))
            return True
        except Skip as exc:
            self.results.append(CheckResult(self.kind, self.name, check, True, str(exc), self.qualified, skipped=True))
            return True
        except Exception as exc:
            msg = str(exc) if isinstance(exc, AssertionError) else f"{type(exc).__name__}: {exc}"
            self.results.append(CheckResult(self.kind, self.name, check, False, msg, self.qualified))
            return False


# --- schedules ------------------------------------------------------------------------------------


class ScheduleChecks(Checks):
    """T >= 1; betas finite, in (0, 1) (also as float32); abar strictly decreasing; small final SNR; device/dtype."""

    kind = "schedule"
    CHECKS = (
        ("T >= 1", "steps"),
        ("make_betas is float64", "float64"),
        ("betas in (0, 1)", "betas"),
        ("abar decreasing", "decreasing"),
        ("final SNR", "final_snr"),
        ("float32 on device", "on_device"),
    )

    def __init__(self, name: str, options: dict[str, Any] | None = None, *, device: str = "cpu") -> None:
        super().__init__(name)
        self.options, self.device = dict(options or {}), device

    def build(self) -> str:
        self.s = create_schedule(self.full_name, **self.options)
        return f"T = {self.s.num_timesteps}"

    def steps(self) -> None:
        assert self.s.num_timesteps >= 1, f"T = {self.s.num_timesteps}"

    def betas(self) -> str:
        b = self.s.betas
        assert torch.isfinite(b).all(), "betas are not all finite"
        assert ((b > 0) & (b < 1)).all(), f"betas (float32) outside (0, 1): min {b.min():.3g}, max {b.max():.3g}"
        return f"beta in [{b.min():.3g}, {b.max():.3g}]"

    def decreasing(self) -> None:
        ab = self.s.alphas_cumprod
        if len(ab) > 1:
            bad = int((ab[1:] >= ab[:-1]).sum())
            assert bad == 0, f"alphas_cumprod fails to decrease at {bad} steps (float32)"
        assert (ab > 0).all(), "alphas_cumprod reaches 0: x_0 cannot be predicted at the last steps"

    def float64(self) -> str:
        b = self.s.make_betas()
        assert isinstance(b, torch.Tensor) and b.dtype == torch.float64, (
            f"make_betas() returned {getattr(b, 'dtype', type(b).__name__)}; compute it in float64 "
            "(float32 betas lose the small products of alphas_cumprod)"
        )
        return "float64"

    def final_snr(self) -> str:
        snr = float(self.s.snr()[-1])
        assert snr < MAX_FINAL_SNR, f"final SNR {snr:.3g} >= {MAX_FINAL_SNR}: x_T is not close to pure noise"
        return f"final SNR {snr:.3g}"

    def on_device(self) -> str:
        device = self.device
        self.s.to(device)
        for attr in ("betas", "alphas_cumprod", "posterior_variance", "posterior_mean_coef1"):
            t = getattr(self.s, attr)
            assert t.dtype == torch.float32, f"{attr} is {t.dtype}"
            assert t.device.type == torch.device(device).type, f"{attr} on {t.device}"
        return f"float32 on {device}"


def check_schedule(
    name: str, options: dict[str, Any] | None = None, *, device: str = "cpu", only: Collection[str] | None = None
) -> list[CheckResult]:
    """T >= 1; betas finite, in (0, 1) (also as float32); abar strictly decreasing; small final SNR; device/dtype."""
    return ScheduleChecks(name, options, device=device).run(only)


# --- denoisers ------------------------------------------------------------------------------------


class DenoiserChecks(Checks):
    """A known prediction target; shape in == shape out (several batch sizes, mixed t); the output depends on t,
    per image; other image shapes honoured or refused with ConfigError; eval deterministic; gradients reach
    every parameter; state_dict round trip; a class-conditional denoiser uses its label, per image."""

    kind = "denoiser"
    CHECKS = (
        ("prediction target", "predicts"),
        ("shape in == out", "shapes"),
        ("uses t per image", "uses_t"),
        ("other image shapes", "other_shapes"),
        ("eval deterministic", "deterministic"),
        ("gradients reach all parameters", "gradients"),
        ("state_dict round trip", "round_trip"),
        ("conditions on the class", "conditions"),
        ("forward time", "speed"),
    )

    def __init__(
        self,
        name: str,
        options: dict[str, Any] | None = None,
        *,
        image_shape: tuple[int, int, int] = (1, 32, 32),
        num_timesteps: int = 1000,
        device: str = "cpu",
    ) -> None:
        super().__init__(name)
        self.options, self.device = dict(options or {}), device
        self.image_shape: tuple[int, int, int] = tuple(image_shape)  # type: ignore[assignment]
        self.num_timesteps = num_timesteps
        self.g = torch.Generator().manual_seed(0)

    def make(self, seed: int, shape: tuple[int, int, int] | None = None, num_classes: int = 0) -> Denoiser:
        torch.manual_seed(seed)
        return create_denoiser(
            self.full_name,
            image_shape=shape or self.image_shape,
            num_timesteps=self.num_timesteps,
            num_classes=num_classes,
            **self.options,
        ).to(self.device)

    def build(self) -> str:
        self.m = self.make(0)
        # the dependence checks (on t, on the class, gradients) run on a copy with every weight nudged: a layer
        # initialised to zero (DiT's output layer, adaLN-Zero) hides them at initialisation, not after training
        self.nudged = _nudged(self.m)
        return f"{self.m.num_parameters():,} parameters"

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` noisy images and their t, the first at T - 1 and the second at 0."""
        x = torch.randn((n, *self.image_shape), generator=self.g).to(self.device)
        t = torch.randint(0, self.num_timesteps, (n,), generator=self.g)
        t[0] = self.num_timesteps - 1
        if n > 1:
            t[1] = 0
        return x, t.to(self.device)

    def predicts(self) -> str:
        p = getattr(self.m, "prediction", None)
        assert p in PREDICTIONS, f"prediction = {p!r}, not one of {', '.join(PREDICTIONS)}"
        return str(p)

    def uses_t(self) -> str:
        nudged, device, T = self.nudged, self.device, self.num_timesteps
        nudged.eval()
        x, _ = self.batch(2)
        x = x[:1].expand(2, *self.image_shape).contiguous()
        t = torch.tensor([T - 1, 0], device=device)
        with torch.no_grad():
            together = nudged(x, t)
            alone = [nudged(x[i : i + 1], t[i : i + 1]) for i in range(2)]
        for i in range(2):
            assert torch.allclose(together[i], alone[i][0], rtol=1e-4, atol=1e-5), (
                f"image {i} of a batch with t = {t.tolist()} differs from the same image alone: "
                "t must be used per image (not t[0] for the whole batch)"
            )
        assert T == 1 or not torch.allclose(together[0], together[1]), (
            "the same image at t = 0 and t = T-1 gives the same output: t is ignored"
        )
        return "per-image t"

    def other_shapes(self) -> str:
        channels, height, width = self.image_shape
        tried = []
        for shape in {
            (channels, height // 2, width // 2),
            (4 - channels if channels in (1, 3) else 1, height, width),
            (channels, height + 1, width + 1),
        }:
            if min(shape[1:]) < 1:
                continue
            try:
                other = self.make(2, shape)
            except ConfigError:
                tried.append(f"{shape} refused")
                continue
            other.eval()
            x = torch.randn((2, *shape), generator=self.g).to(self.device)
            try:
                with torch.no_grad():
                    y = other(x, torch.tensor([0, self.num_timesteps - 1], device=self.device))
            except Exception as exc:
                raise AssertionError(
                    f"built for image_shape {shape} without complaint, but forward failed ({one_line(exc)}); "
                    "raise ddpmkit.ConfigError when built for a shape the options cannot handle"
                ) from None
            assert tuple(y.shape) == tuple(x.shape), (
                f"built for image_shape {shape} without complaint, but returns {tuple(y.shape)} for {tuple(x.shape)}; "
                "raise ddpmkit.ConfigError for a shape the options cannot handle"
            )
            tried.append(f"{shape} ok")
        return "; ".join(sorted(tried))

    def shapes(self) -> str:
        self.m.eval()
        with torch.no_grad():
            for n in (1, 3):
                x, t = self.batch(n)
                y = self.m(x, t)
                assert y.shape == x.shape, f"batch {n}: output {tuple(y.shape)} != input {tuple(x.shape)}"
                assert torch.isfinite(y).all(), f"batch {n}: non-finite output"
        return "batches 1 and 3, t from 0 to T-1"

    def deterministic(self) -> None:
        self.m.eval()
        x, t = self.batch(2)
        with torch.no_grad():
            assert torch.equal(self.m(x, t), self.m(x, t)), "two eval-mode calls differ"

    def gradients(self) -> str:
        m, nudged = self.m, self.nudged
        for model in (m, nudged):
            model.train()
            model.zero_grad(set_to_none=True)
            x, t = self.batch(2)
            model(x, t).square().mean().backward()
        missing = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, f"no gradient reaches {len(missing)} parameters, e.g. {missing[:3]}"
        bad = [n for n, p in m.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        assert not bad, f"non-finite gradients in {bad[:3]}"
        # with the weights nudged off any zero initialisation, every tensor must get some gradient
        zero = [n for n, p in nudged.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
        total = sum(1 for p in m.parameters() if p.requires_grad)
        assert not zero, f"{len(zero)} of {total} parameter tensors get exactly zero gradient, e.g. {zero[:3]}"
        at_init = sum(1 for p in m.parameters() if p.requires_grad and not p.grad.any())
        for model in (m, nudged):
            model.zero_grad(set_to_none=True)
            model.eval()
        return f"{total} tensors" + (f" ({at_init} reached only past a zero initialisation)" if at_init else "")

    def round_trip(self) -> None:
        other = self.make(1)
        other.load_state_dict(self.m.state_dict())
        other.eval()
        self.m.eval()
        x, t = self.batch(2)
        with torch.no_grad():
            assert torch.equal(self.m(x, t), other(x, t)), "a copy loaded from state_dict() computes differently"

    def speed(self) -> str:
        self.m.eval()
        x, t = self.batch(8)
        with torch.no_grad():
            self.m(x, t)
            start = time.perf_counter()
            self.m(x, t)
            if torch.device(self.device).type == "cuda":
                torch.cuda.synchronize()
        return f"{(time.perf_counter() - start) * 1000 / 8:.2f} ms per image forward on {self.device}"

    def conditions(self) -> str:
        """A denoiser that declares "class": its output changes with the label, per image, and takes the null class."""
        from ddpmkit.diffusion import NULL_CLASS

        declared = set(getattr(type(self.m), "conditions", frozenset()))
        if "class" not in declared:
            raise Skip("declares no conditions: trained unconditionally only")
        k, device = 3, self.device
        conditional = _nudged(self.make(0, num_classes=k)).eval()
        assert getattr(conditional, "num_classes", 0) == k, (
            f"built with num_classes = {k}, reports {getattr(conditional, 'num_classes', None)}"
        )
        x, _ = self.batch(1)
        x = x.expand(4, *self.image_shape).contiguous()
        t = torch.full((4,), self.num_timesteps // 2, device=device)
        labels = torch.tensor([0, 1, 2, NULL_CLASS], device=device)
        with torch.no_grad():
            out = conditional(x, t, cond={"class": labels})
            alone = [conditional(x[i : i + 1], t[i : i + 1], cond={"class": labels[i : i + 1]}) for i in range(4)]
        assert tuple(out.shape) == tuple(x.shape) and torch.isfinite(out).all(), (
            "bad output for labels 0, 1, 2 and null"
        )
        assert not torch.allclose(alone[0][0], alone[1][0]), (
            "the same image at class 0 and class 1 gives the same output: the label is ignored"
        )
        assert not torch.allclose(alone[0][0], alone[3][0]), "class 0 and the null class give the same output"
        for i in range(4):
            one_label = i and torch.allclose(out[i], alone[0][0], rtol=1e-4, atol=1e-5)
            assert torch.allclose(out[i], alone[i][0], rtol=1e-4, atol=1e-5), (
                f"image {i} of a batch with labels {labels.tolist()} differs from the same image alone: the label "
                "must be used per image"
                + (" (it gets the first image's label: one label is used for the whole batch)" if one_label else "")
            )
        return f"{k} classes and the null class ({NULL_CLASS}), per image"


def check_denoiser(
    name: str,
    options: dict[str, Any] | None = None,
    *,
    image_shape: tuple[int, int, int] = (1, 32, 32),
    num_timesteps: int = 1000,
    device: str = "cpu",
    only: Collection[str] | None = None,
) -> list[CheckResult]:
    """A known prediction target; shape in == shape out (several batch sizes, mixed t); the output depends on t,
    per image; other image shapes honoured or refused with ConfigError; eval deterministic; gradients reach
    every parameter; state_dict round trip."""
    checks = DenoiserChecks(name, options, image_shape=image_shape, num_timesteps=num_timesteps, device=device)
    return checks.run(only)


class _Counting(Denoiser):
    """``inner``, recording the batch size of every call in ``calls``."""

    def __init__(self, inner: Denoiser, calls: list[int]) -> None:
        super().__init__(image_shape=inner.image_shape, num_timesteps=inner.num_timesteps)
        self.inner, self.calls = inner, calls
        self.prediction = inner.prediction

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        self.calls.append(len(x_t))
        return self.inner(x_t, t) if cond is None else self.inner(x_t, t, cond=cond)


def _nudged(model: Denoiser, scale: float = 0.02) -> Denoiser:
    """A copy of ``model`` with every weight moved by a little seeded noise (scaled to the tensor's spread)."""
    import copy

    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(12345)
    with torch.no_grad():
        for p in other.parameters():
            spread = float(p.float().std()) if p.numel() > 1 and float(p.float().std()) > 0 else 1.0
            p.add_(scale * spread * torch.randn(p.shape, generator=g).to(p.device, p.dtype))
    return other


# --- samplers -------------------------------------------------------------------------------------


class GaussianOracle(Denoiser):
    """The exact predictor for data x_0 ~ N(mu, s^2) per pixel, under a given schedule, for any target.

    x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps gives E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar s^2 +
    1 - abar);
    E[x_0 | x_t] and v follow from eq. 4 and v = sqrt(abar) eps - sqrt(1 - abar) x_0.

    Class-conditional with ``class_means``: class k is N(class_means[k], s^2), and the null class (the
    unconditional model) N(mu, s^2), so that guidance has a closed form too
    (:func:`ddpmkit.diffusion.gaussian_reverse_moments` with ``guided_by``).
    """

    conditions = frozenset({"class"})

    def __init__(
        self,
        schedule,
        mu: float,
        s: float,
        image_shape=(1, 8, 8),
        prediction: str = "epsilon",
        class_means: list[float] | None = None,
    ) -> None:
        super().__init__(
            Denoiser.Options(),
            image_shape=image_shape,
            num_timesteps=schedule.num_timesteps,
            num_classes=len(class_means or []),
        )
        self.mu, self.s = mu, s
        self.prediction = prediction
        self.register_buffer("abar", schedule.alphas_cumprod.double().clone())
        self.register_buffer("class_means", torch.tensor([*(class_means or []), mu], dtype=torch.float64))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        ab = self.abar[t].view(-1, *([1] * (x_t.ndim - 1)))
        x = x_t.double()
        mu: Any = self.mu
        if cond is not None and self.num_classes:
            labels = torch.where(cond["class"] < 0, self.num_classes, cond["class"])
            mu = self.class_means[labels].view(-1, *([1] * (x_t.ndim - 1)))
        eps = (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * self.s**2 + 1 - ab)
        x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
        out = {"epsilon": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[self.prediction]
        return out.to(x_t.dtype)


class GaussianDataChecks(Checks):
    """Checks against the closed form for Gaussian data N(mu, s^2) per pixel, on a schedule named ``schedule`` at
    ``num_timesteps`` (the samplers' and the objectives' kits)."""

    def __init__(
        self,
        name: str,
        options: dict[str, Any] | None = None,
        *,
        device: str = "cpu",
        num_pixels: int = 16384,
        mu: float = 0.3,
        s: float = 0.2,
        num_timesteps: int = 1000,
        schedule: str = "linear",
    ) -> None:
        super().__init__(name)
        self.options, self.device = dict(options or {}), device
        self.num_pixels, self.mu, self.s = num_pixels, mu, s
        self.num_timesteps, self.schedule_name = num_timesteps, schedule


class SamplerChecks(GaussianDataChecks):
    """With the exact predictor of N(mu, s^2) data under ``schedule`` (an installed schedule's name, at
    ``num_timesteps``), samples match the exact answer for the sampler's own steps (or N(mu, s^2) within its
    declared tolerance); x0- and v-predicting denoisers give the same images; seeds reproduce; output in
    [-1, 1]; the callback sees the steps the sampler lists; a class-conditional oracle is drawn per class and
    with classifier-free guidance at w = 2, against the closed form; a sampler that ``supports_start`` starts
    from given images with a per-step hook (SDEdit, inpainting)."""

    kind = "sampler"
    CHECKS = (
        ("matches the Gaussian oracle", "moments"),
        ("x0 and v denoisers", "targets"),
        ("seeds reproduce", "seeds"),
        ("output in [-1, 1]", "in_range"),
        ("callback sees the listed steps", "callback"),
        ("cost as declared", "cost"),
        ("each class of a conditional oracle", "classes"),
        ("classifier-free guidance (w = 2)", "guided_classes"),
        ("starts from an image (edit)", "starts"),
        ("stated answer near the ideal", "stated"),
        ("order as declared", "order"),
    )
    #: How far a stated gaussian_answer may lie from N(mu, s^2) at :attr:`MANY_STEPS` steps (or T): any consistent
    #: solver is far closer there (Heun 1e-4, DPM-Solver++(2M) 1e-4, DDIM 6e-3 at 200 steps of a linear schedule).
    STATED_BOUND, MANY_STEPS = 0.02, 500
    #: The steps of the order check: errors against the same sampler at 16x the steps, at n and 2n.
    ORDER_STEPS = 32
    #: two classes either side of the unconditional N(0, S_CLASS^2), narrow enough that guiding them stays inside
    #: [-1, 1] (the samplers clip their output)
    MU_CLASS, S_CLASS = 0.0, 0.15

    def __init__(self, name: str, options: dict[str, Any] | None = None, **settings: Any) -> None:
        super().__init__(name, options, **settings)
        #: the first sample (seed 0, epsilon oracle), drawn once by the first check that needs it
        self._first: torch.Tensor | None = None
        self._first_failed = False
        #: the t the callback saw while the first sample was drawn
        self.seen_t: list[int] = []

    def build(self) -> None:
        self.sampler = create_sampler(self.full_name, **self.options)
        self.schedule = create_schedule(self.schedule_name, num_timesteps=self.num_timesteps)
        side = int(math.isqrt(self.num_pixels // 16))
        self.shape = (16, 1, side, side)
        self.oracles = {
            p: GaussianOracle(self.schedule, self.mu, self.s, image_shape=self.shape[1:], prediction=p).to(self.device)
            for p in PREDICTIONS
        }
        self.final_snr = float(self.schedule.snr()[-1])

    @property
    def no_ideal(self) -> str | None:
        """Why N(mu, s^2) is no one's answer (x_T of the schedule still holds signal, so sampling from x_T ~ N(0, 1)
        starts from the wrong marginal, and an ODE and an SDE sampler land in different places), else None."""
        if self.final_snr < MAX_FINAL_SNR:
            return None
        return (
            f"not held to N(mu, s^2): x_T of this schedule still holds signal (final SNR {self.final_snr:.3g} >= "
            f"{MAX_FINAL_SNR}), so samplers that start from pure noise differ by design; checked for the "
            "reverse-step family (exact for its steps) and a stated gaussian_answer only"
        )

    def draw(self, seed: int, record: bool = False, prediction: str = "epsilon") -> torch.Tensor:
        cb = (lambda i, t, x: self.seen_t.append(int(t))) if record else None
        return self.sampler.sample(
            self.oracles[prediction],
            self.schedule,
            self.shape,
            generator=torch.Generator().manual_seed(seed),
            callback=cb,
        )

    def first(self) -> torch.Tensor:
        """The first sample, recording the callback's t; a check after a failed first draw has nothing to compare."""
        if self._first is None:
            assert not self._first_failed, "no first sample to compare with"
            self._first_failed = True
            self.seen_t = []
            self._first = self.draw(0, record=True).double()
            self._first_failed = False
        return self._first

    def moments(self) -> str:
        sampler, schedule, mu, s = self.sampler, self.schedule, self.mu, self.s
        x = self.first()
        n = x.numel()
        steps = sampler.reverse_steps(schedule)
        stated = sampler.gaussian_answer(schedule, mu, s) if steps is None else None
        if steps is None and stated is None and self.no_ideal is not None:
            return f"mean {float(x.mean()):.4f}, std {float(x.std()):.4f}; {self.no_ideal}"
        if steps is not None:
            # the exact answer for this sampler's own discretisation; 1e-3 covers float32 arithmetic
            target_mu, target_s = gaussian_reverse_moments(schedule, steps, mu, s)
            bias, how = 1e-3, f"exact for its {len(steps)} steps"
        elif stated is not None:
            target_mu, target_s = (float(v) for v in stated)
            bias, how = 1e-3, "the exact answer it states (gaussian_answer)"
        else:
            target_mu, target_s = mu, s
            bias, how = (
                float(sampler.oracle_tolerance),
                f"ideal, within the declared oracle_tolerance {sampler.oracle_tolerance:g}",
            )
        tol_mean = 5 * s / math.sqrt(n) + bias  # 5 standard errors, plus the allowance for bias
        tol_std = 5 * s / math.sqrt(2 * n) + bias
        m_hat, s_hat = float(x.mean()), float(x.std())
        assert abs(m_hat - target_mu) < tol_mean, (
            f"mean {m_hat:.4f}, expected {target_mu:.4f} +- {tol_mean:.4f} ({how})"
        )
        assert abs(s_hat - target_s) < tol_std, f"std {s_hat:.4f}, expected {target_s:.4f} +- {tol_std:.4f} ({how})"
        return (
            f"mean {m_hat:.4f}, std {s_hat:.4f}; expected {target_mu:.4f}, {target_s:.4f} ({how}; "
            f"data N({mu}, {s}^2)), {n} pixels"
        )

    def targets(self) -> str:
        first = self.first()
        for prediction in ("x0", "v"):
            x = self.draw(0, prediction=prediction).double()
            gap = float((x - first).abs().max())
            # a sampler that took the output for epsilon would be off by O(1); 5e-3 leaves room for solvers that
            # convert in float32 at large noise levels (diffusers' Euler: 0.003)
            assert gap < 5e-3, (
                f"a {prediction}-predicting denoiser gives images up to {gap:.3g} away from the epsilon one's; "
                "convert its output with ddpmkit.diffusion.split_prediction"
            )
        return "x0 and v match epsilon"

    def seeds(self) -> None:
        first = self.first()
        assert torch.equal(self.draw(0).double(), first), "equal seeds gave different images"
        assert not torch.equal(self.draw(1).double(), first), "different seeds gave equal images"

    def in_range(self) -> None:
        x = self.first()
        assert tuple(x.shape) == self.shape, f"shape {tuple(x.shape)} != {self.shape}"
        assert torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1, f"output in [{x.min():.3g}, {x.max():.3g}]"

    def cost(self) -> str:
        calls: list[int] = []
        counting = _Counting(self.oracles["epsilon"], calls)
        self.sampler.sample(counting, self.schedule, self.shape, generator=torch.Generator().manual_seed(0))
        declared = int(self.sampler.num_evaluations(self.schedule))
        advice = (
            "a sampler that calls it more than once per step says so in num_evaluations()"
            if len(calls) > declared
            else "num_evaluations() must count only the calls sample() makes"
        )
        assert len(calls) == declared, (
            f"sample() called the denoiser {len(calls)} times for one batch, but num_evaluations() says {declared}; "
            + advice
        )
        steps = len(self.sampler.timesteps(self.schedule))
        return f"{declared} denoiser calls per batch for {steps} steps"

    def callback(self) -> str:
        self.first()
        seen_t, listed = self.seen_t, [int(t) for t in self.sampler.timesteps(self.schedule)]
        assert seen_t, "the callback was never called"
        assert seen_t == listed, (
            f"the callback saw {len(seen_t)} steps ({seen_t[:3]}...) but timesteps() lists {len(listed)} "
            f"({listed[:3]}...)"
        )
        # non-increasing: a second-order solver (Heun) evaluates the denoiser twice at some t
        assert all(a >= b for a, b in zip(seen_t, seen_t[1:])), "the callback's t increases somewhere"
        return f"{len(seen_t)} steps, t from {seen_t[0]} to {seen_t[-1]}"

    def classes(self) -> str:
        return self._check_classes(1.0)

    def guided_classes(self) -> str:
        return self._check_classes(2.0)

    def _per_class(self, weight: float) -> list[tuple[float, float]]:
        from ddpmkit.guidance import ClassConditioned

        means = [self.MU_CLASS - self.S_CLASS, self.MU_CLASS + self.S_CLASS]
        conditional = GaussianOracle(
            self.schedule, self.MU_CLASS, self.S_CLASS, image_shape=self.shape[1:], class_means=means
        ).to(self.device)
        labels = torch.tensor([0, 1] * (self.shape[0] // 2))
        guided = ClassConditioned(conditional, labels, weight)
        x = self.sampler.sample(guided, self.schedule, self.shape, generator=torch.Generator().manual_seed(0)).double()
        return [(float(x[labels == k].mean()), float(x[labels == k].std())) for k in range(len(means))]

    def _check_classes(self, weight: float) -> str:
        steps = self.sampler.reverse_steps(self.schedule)
        mu_c, s_c = self.MU_CLASS, self.S_CLASS
        class_means = [mu_c - s_c, mu_c + s_c]
        # The oracle's classes share one variance, so the guided predictor x0_0 + w (x0_k - x0_0) is the exact
        # predictor of N(mu + w (mu_k - mu), s^2): a stated answer at that mean is the guided answer.
        stated = (
            [self.sampler.gaussian_answer(self.schedule, mu_c + weight * (m - mu_c), s_c) for m in class_means]
            if steps is None
            else None
        )
        if stated is not None and any(a is None for a in stated):
            stated = None
        if steps is None and stated is None and weight != 1:
            # guided, an SDE and an ODE sampler of the same model reach different answers: no ideal to hold it to
            raise Skip(
                "neither of the reverse-step family nor stating its gaussian_answer: no closed form for guidance"
            )
        if steps is None and stated is None and self.no_ideal is not None:
            raise Skip(self.no_ideal)
        got, shown = self._per_class(weight), []
        n = self.num_pixels // len(class_means)
        for k, (m_hat, s_hat) in enumerate(got):
            if steps is not None:
                target_mu, target_s = gaussian_reverse_moments(
                    self.schedule, steps, class_means[k], s_c, guided_by=(mu_c, s_c), weight=weight
                )
                bias = 1e-3
            elif stated is not None:
                target_mu, target_s = (float(v) for v in stated[k])
                bias = 1e-3
            else:
                target_mu, target_s, bias = class_means[k], s_c, float(self.sampler.oracle_tolerance)
            tol_mean, tol_std = 5 * target_s / math.sqrt(n) + bias, 5 * target_s / math.sqrt(2 * n) + bias
            assert abs(m_hat - target_mu) < tol_mean, (
                f"class {k} at guidance weight {weight:g}: mean {m_hat:.4f}, expected {target_mu:.4f} +- {tol_mean:.4f}"
            )
            assert abs(s_hat - target_s) < tol_std, (
                f"class {k} at guidance weight {weight:g}: std {s_hat:.4f}, expected {target_s:.4f} +- {tol_std:.4f}"
            )
            shown.append(f"class {k}: mean {m_hat:.4f} (expected {target_mu:.4f}), std {s_hat:.4f} ({target_s:.4f})")
        return "; ".join(shown)

    def _with_steps(self, steps: int) -> Any:
        """This sampler with ``steps`` steps, or None when it has no ``steps`` option."""
        model = type(self.sampler).Options
        if "steps" not in model.model_fields:
            return None
        return create_sampler(self.full_name, **{**self.options, "steps": steps})

    def stated(self) -> str:
        """A stated gaussian_answer, asked at many steps, lies near N(mu, s^2): it cannot be any answer at all."""
        if self.sampler.reverse_steps(self.schedule) is not None:
            raise Skip("of the reverse-step family: its answer is computed by ddpmkit, not stated")
        if self.sampler.gaussian_answer(self.schedule, self.mu, self.s) is None:
            raise Skip("states no gaussian_answer")
        if self.no_ideal is not None:
            raise Skip(self.no_ideal)
        many = min(self.MANY_STEPS, self.num_timesteps)
        sampler = self._with_steps(many)
        if sampler is None:
            raise Skip("has no steps option to ask the answer at many steps")
        m, sd = (float(v) for v in sampler.gaussian_answer(self.schedule, self.mu, self.s))
        gap = max(abs(m - self.mu), abs(sd - self.s))
        assert gap < self.STATED_BOUND, (
            f"at {many} steps gaussian_answer states mean {m:.4f}, std {sd:.4f}, but data N({self.mu}, {self.s}^2) is "
            f"the limit of any consistent solver (allowed {self.STATED_BOUND}): the stated answer, or the solver it "
            "describes, is wrong"
        )
        return f"at {many} steps: mean {m:.4f}, std {sd:.4f} (data N({self.mu}, {self.s}^2))"

    def order(self) -> str:
        """A declared order holds: with the same x_T, the error against 16x the steps falls by about 2^order from n
        to 2n steps (a deterministic sampler with the Gaussian oracle: no sampling noise enters)."""
        declared = getattr(type(self.sampler), "order", None)
        if declared is None:
            raise Skip("declares no order")
        n = self.ORDER_STEPS
        if 16 * n > self.num_timesteps:
            raise Skip(f"T = {self.num_timesteps} is too few levels for {n}, {2 * n} and {16 * n} steps")
        draws = []
        for steps in (n, 2 * n, 16 * n):
            sampler = self._with_steps(steps)
            if sampler is None:
                raise Skip("has no steps option to vary")
            oracle = self.oracles["epsilon"]
            draws.append(
                sampler.sample(oracle, self.schedule, (4, 1, 32, 32), generator=torch.Generator().manual_seed(0))
            )
        reference = draws[2].double()
        e1, e2 = (float((d.double() - reference).square().mean().sqrt()) for d in draws[:2])
        assert e2 > 0, f"{2 * n} and {16 * n} steps gave identical images: the steps option changes nothing"
        observed = math.log2(e1 / e2)
        assert observed > declared - 0.5, (
            f"declares order {declared}, but its error fell from {e1:.3g} at {n} steps to {e2:.3g} at {2 * n}: "
            f"order {observed:.2f}"
        )
        return f"order {observed:.2f} (declared {declared}): error {e1:.3g} at {n} steps, {e2:.3g} at {2 * n}"

    def starts(self) -> str:
        """supports_start: a chain from a given image at a middle step visits only the steps at or below it,
        the hook's replacement of the state is honoured, and strength 1 (from the noised input) has the plain
        draw's distribution."""
        from ddpmkit.diffusion import Start, q_sample

        sampler, schedule, shape = self.sampler, self.schedule, self.shape
        if not getattr(type(sampler), "supports_start", False):
            raise Skip("does not declare supports_start: not used by ddpmkit edit")
        listed = [int(t) for t in sampler.timesteps(schedule)]
        t0 = listed[len(listed) // 2]
        x0 = torch.full(shape, -0.5)
        g = torch.Generator().manual_seed(0)
        visited: list[int] = []

        def hook(index: int, t_prev: int, x: torch.Tensor) -> torch.Tensor:
            visited.append(int(t_prev))
            x = x.clone()
            x[:, :, 0, 0] = 0.75  # a pixel pasted in at every step must come out as pasted
            return x

        start = Start(q_sample(schedule, x0, t0, torch.randn(shape, generator=g)), t0)
        out = sampler.sample(self.oracles["epsilon"], schedule, shape, generator=g, start=start, hook=hook)
        assert len(visited) == sum(1 for t in listed if t <= t0), (
            f"from t = {t0} the hook was called {len(visited)} times; {sum(1 for t in listed if t <= t0)} steps lie "
            "at or below it"
        )
        assert visited[-1] == -1 and all(a > b for a, b in zip(visited, visited[1:])), (
            f"hook saw t_prev {visited[:4]}..."
        )
        assert torch.allclose(out[:, :, 0, 0], torch.full_like(out[:, :, 0, 0], 0.75)), (
            "the hook's pasted pixel was lost"
        )
        full = Start(q_sample(schedule, x0, listed[0], torch.randn(shape, generator=g)), listed[0])
        edited = sampler.sample(self.oracles["epsilon"], schedule, shape, generator=g, start=full).double()
        plain = self.first()
        n = plain.numel()
        tol = 5 * self.s / math.sqrt(n) * 2 + 0.01  # two independent estimates, plus the input's leak at t = T - 1
        assert abs(float(edited.mean()) - float(plain.mean())) < tol, (
            f"from the noised input at t = {listed[0]}: mean {float(edited.mean()):.4f}, from noise "
            f"{float(plain.mean()):.4f}"
        )
        return f"from t = {t0}: {len(visited)} steps, the hook honoured; from t = {listed[0]}: as from noise"


def check_sampler(
    name: str,
    options: dict[str, Any] | None = None,
    *,
    device: str = "cpu",
    num_pixels: int = 16384,
    mu: float = 0.3,
    s: float = 0.2,
    num_timesteps: int = 1000,
    schedule: str = "linear",
    only: Collection[str] | None = None,
) -> list[CheckResult]:
    """The checks of :class:`SamplerChecks` on the sampler ``name`` (see there)."""
    checks = SamplerChecks(
        name, options, device=device, num_pixels=num_pixels, mu=mu, s=s, num_timesteps=num_timesteps, schedule=schedule
    )
    return checks.run(only)


# --- objectives -------------------------------------------------------------------------------------


class ObjectiveOracle(Denoiser):
    """The exact network for data x_0 ~ N(mu, s^2) per pixel under an objective: called as the objective calls a
    network (x scaled by ``input_scale``, at ``network_time``), it answers the objective's :meth:`target` of the
    posterior means E[x_0 | x] = mu + a s^2 (x - a mu) / (a^2 s^2 + b^2) and E[eps | x] = (x - a E[x_0 | x]) / b.
    It knows the noise level from the network time of the nearest of the objective's levels."""

    continuous_time = True

    def __init__(self, objective: Any, mu: float, s: float, image_shape=(1, 8, 8)) -> None:
        super().__init__(Denoiser.Options(), image_shape=image_shape, num_timesteps=objective.num_levels)
        self.objective, self.mu, self.s = objective, mu, s
        self.levels = objective.levels()
        self.times = objective.network_time(self.levels).double().cpu()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        o = self.objective
        at = torch.searchsorted(self.times, t.double().cpu()).clamp(1, len(self.times) - 1)
        nearer_low = (t.double().cpu() - self.times[at - 1]).abs() <= (self.times[at] - t.double().cpu()).abs()
        tau = self.levels[torch.where(nearer_low, at - 1, at)].to(x_t.device)
        x = x_t.double() / o.input_scale(tau).double().view(-1, *([1] * (x_t.ndim - 1)))
        return ideal_output(o, x, tau, self.mu, self.s).to(x_t.dtype)


def ideal_output(objective: Any, x: torch.Tensor, tau: torch.Tensor, mu: float, s: float, shift: float = 0.0) -> Any:
    """The objective's :meth:`target` at the posterior means of data N(mu, s^2) given x = a x_0 + b eps:
    E[x_0 | x] = mu + a s^2 (x - a mu) / (a^2 s^2 + b^2) (moved by ``shift``) and eps = (x - a x_0) / b."""
    a, b = (torch.as_tensor(c).double().view(-1, *([1] * (x.ndim - 1))) for c in objective.coefficients(tau))
    x = x.double()
    x0 = mu + a * s**2 * (x - a * mu) / (a * a * s**2 + b * b) + shift
    return objective.target(x0.float(), ((x - a * x0) / b).float(), tau)


class _Fixed(torch.nn.Module):
    """A network that answers a fixed output whatever it is asked (to score a given prediction with a loss)."""

    def __init__(self, output: torch.Tensor, prediction: str) -> None:
        super().__init__()
        self.output, self.prediction = output, prediction

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        return self.output


class ObjectiveChecks(GaussianDataChecks):
    """An objective's conversions against each other and against the closed form for Gaussian data N(mu, s^2):
    its levels order the noise and its training levels stay among them; network times tell levels apart;
    ``split`` inverts ``target``; the ideal predictor has a lower loss than a perturbed one; through
    ``sampling_network`` the ideal network is the Gaussian oracle of ``sampling_schedule``; and samplers reach the
    exact answer for their steps through it. Nothing is trained. An objective that reads a schedule is checked
    with ``schedule`` (a name) for each prediction target."""

    kind = "objective"
    CHECKS = (
        ("levels order the noise", "levels"),
        ("training levels in range", "draws"),
        ("network times tell levels apart", "times"),
        ("split inverts target", "round_trip"),
        ("the ideal predictor minimises the loss", "ideal_loss"),
        ("agrees with the Gaussian oracle", "oracle"),
        ("samplers reach the Gaussian answer", "samples"),
    )

    def build(self) -> str:
        from ddpmkit.registry.build import construct, validate_options
        from ddpmkit.registry.discovery import find, load

        comp = find("objective", self.full_name)
        options = validate_options(comp, self.options)
        schedule = create_schedule(self.schedule_name, num_timesteps=self.num_timesteps)
        predictions = PREDICTIONS if getattr(load(comp), "uses_schedule", False) else ("epsilon",)
        self.objectives = {p: construct(comp, options, schedule=schedule, prediction=p) for p in predictions}
        self.objective = self.objectives[predictions[0]]
        return f"{self.objective.num_levels} levels" + (
            f", on schedule {self.schedule_name}" if len(predictions) > 1 else ""
        )

    @property
    def view(self) -> Any:
        """The objective's sampling schedule (built by the first check that needs it)."""
        return self.objective.sampling_schedule()

    def coefficients(self, objective: Any, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = objective.coefficients(tau)
        return torch.as_tensor(a).double().flatten(), torch.as_tensor(b).double().flatten()

    def levels(self) -> str:
        o = self.objective
        levels = o.levels()
        assert len(levels) == o.num_levels, f"levels() gave {len(levels)} levels for num_levels = {o.num_levels}"
        a, b = self.coefficients(o, levels)
        assert torch.isfinite(a).all() and torch.isfinite(b).all(), "non-finite coefficients at its levels"
        assert (b > 0).all(), "a level without noise (b = 0): samplers end at x_0 themselves"
        abar = a.square() / (a.square() + b.square())
        assert (abar[1:] < abar[:-1]).all(), "abar = a^2 / (a^2 + b^2) does not fall strictly from level to level"
        view = self.view
        assert view.num_timesteps == o.num_levels, f"sampling_schedule has T = {view.num_timesteps}"
        final = float(view.snr()[-1])
        return f"abar from {float(abar[0]):.4g} down to {float(abar[-1]):.3g}; final SNR of the view {final:.3g}"

    def draws(self) -> str:
        o = self.objective
        tau = o.draw_levels(4096, torch.Generator().manual_seed(0))
        again = o.draw_levels(4096, torch.Generator().manual_seed(0))
        assert tau.shape == (4096,), f"draw_levels(4096) gave shape {tuple(tau.shape)}"
        assert torch.equal(tau, again), "draw_levels differs for one seed: it must draw from the generator only"
        a, b = self.coefficients(o, tau)
        assert torch.isfinite(a).all() and torch.isfinite(b).all(), "non-finite coefficients at training levels"
        assert (b > 0).all() and (a >= 0).all(), "training levels with b <= 0 or a < 0"
        abar = a.square() / (a.square() + b.square())
        q = torch.quantile(abar.float(), torch.tensor([0.05, 0.5, 0.95]))
        return f"abar of training levels: 5 % {q[0]:.3g}, median {q[1]:.3g}, 95 % {q[2]:.3g}"

    def times(self) -> str:
        o = self.objective
        times = torch.as_tensor(o.network_time(o.levels())).double()
        assert torch.isfinite(times).all(), "non-finite network times at its levels"
        d = times[1:] - times[:-1]
        assert (d > 0).all() or (d < 0).all(), "network_time is not strictly monotone over the levels"
        low, high = float(times.min()), float(times.max())
        assert low >= -1e-3 and high <= o.num_levels, (
            f"network times in [{low:g}, {high:g}], not within [0, {o.num_levels}]"
        )
        return f"from {float(times[0]):.4g} to {float(times[-1]):.4g}"

    def _batch(self, objective: Any, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gaussian x_0, noise, and taus: half drawn for training, half among the levels."""
        g = torch.Generator().manual_seed(seed)
        n = 2048
        x0 = self.mu + self.s * torch.randn((n, 1, 2, 2), generator=g)
        eps = torch.randn((n, 1, 2, 2), generator=g)
        levels = objective.levels()
        picked = levels[torch.randint(0, len(levels), (n // 2,), generator=g)]
        drawn = objective.draw_levels(n - n // 2, g).to(picked.dtype)
        return x0, eps, torch.cat([picked, drawn])

    def round_trip(self) -> str:
        worst = 0.0
        for p, o in self.objectives.items():
            x0, eps, tau = self._batch(o)
            x = o.corrupt(x0, eps, tau)
            got_x0, got_eps = o.split(x, tau, o.target(x0, eps, tau))
            err = max(float((got_x0 - x0).abs().max()), float((got_eps - eps).abs().max()))
            assert err < 2e-3, f"split(x, tau, target(x0, eps, tau)) is off by {err:.3g}" + (
                f" (prediction {p})" if len(self.objectives) > 1 else ""
            )
            worst = max(worst, err)
        return f"largest error {worst:.2g}"

    def ideal_loss(self) -> str:
        shown = []
        for p, o in self.objectives.items():
            x0, eps, tau = self._batch(o, seed=1)
            x = o.corrupt(x0, eps, tau)

            def loss(shift: float, o=o, x=x, x0=x0, eps=eps, tau=tau) -> float:
                out = ideal_output(o, x, tau, self.mu, self.s, shift)
                return float(o.training_loss(_Fixed(out, o.prediction), x0, tau, eps))

            best = loss(0.0)
            for shift in (-0.05, 0.05):
                worse = loss(shift)
                assert worse > best, (
                    f"the loss at the ideal predictor ({best:.5g}) is not below the loss with x_0 off by {shift:+g} "
                    f"({worse:.5g})" + (f" (prediction {p})" if len(self.objectives) > 1 else "")
                )
            shown.append(f"{best:.4g}")
        return "loss at the ideal " + ", ".join(shown)

    def oracle(self) -> str:
        o = self.objective
        network = o.sampling_network(ObjectiveOracle(o, self.mu, self.s))
        truth = GaussianOracle(self.view, self.mu, self.s, image_shape=(1, 2, 2), prediction=network.prediction)
        g = torch.Generator().manual_seed(2)
        t = torch.randint(0, o.num_levels, (512,), generator=g)
        t[:2] = torch.tensor([0, o.num_levels - 1])
        x = torch.randn((512, 1, 2, 2), generator=g)
        with torch.no_grad():
            got, want = network(x, t).double(), truth(x, t).double()
        err = float((got - want).abs().max())
        assert err < 5e-3 * max(1.0, float(want.abs().max())), (
            f"through sampling_network the ideal network predicts {network.prediction} off by {err:.3g} from the "
            "Gaussian oracle of sampling_schedule: its levels, coefficients or conversions disagree"
        )
        return f"largest difference {err:.2g} ({network.prediction}, {len(t)} levels)"

    def samples(self) -> str:
        o = self.objective
        side = int(math.isqrt(self.num_pixels // 16))
        network = o.sampling_network(ObjectiveOracle(o, self.mu, self.s, image_shape=(1, side, side)))
        shown = []
        for name, options in (("ddim", {"steps": 50, "spacing": "trailing"}), ("ddpm", {})):
            sampler = create_sampler(name, **options)
            steps = sampler.reverse_steps(self.view)
            if len(steps) > 100:
                steps = None  # the ancestral chain at L levels: costly for a check; DDIM covers the conversion
            if steps is None:
                continue
            x = sampler.sample(network, self.view, (16, 1, side, side), generator=torch.Generator().manual_seed(0))
            want_mu, want_s = gaussian_reverse_moments(self.view, steps, self.mu, self.s)
            n = x.numel()
            m_hat, s_hat = float(x.double().mean()), float(x.double().std())
            tol_mean = 4 * want_s / n**0.5 + 2e-3
            tol_std = 4 * want_s / (2 * n) ** 0.5 + 2e-3
            assert abs(m_hat - want_mu) < tol_mean, (
                f"{name}: mean {m_hat:.4f}, expected {want_mu:.4f} +- {tol_mean:.4f}"
            )
            assert abs(s_hat - want_s) < tol_std, f"{name}: std {s_hat:.4f}, expected {want_s:.4f} +- {tol_std:.4f}"
            shown.append(f"{name} {len(steps)} steps: mean {m_hat:.4f} ({want_mu:.4f}), std {s_hat:.4f} ({want_s:.4f})")
        return "; ".join(shown)


def check_objective(
    name: str,
    options: dict[str, Any] | None = None,
    *,
    device: str = "cpu",
    num_timesteps: int = 1000,
    schedule: str = "linear",
    only: Collection[str] | None = None,
) -> list[CheckResult]:
    """The checks of :class:`ObjectiveChecks` on the objective ``name`` (see there)."""
    return ObjectiveChecks(name, options, device=device, num_timesteps=num_timesteps, schedule=schedule).run(only)


# --- event plugins ----------------------------------------------------------------------------------

#: The keys of the ``metrics`` every ``step_end`` hook gets (more may come: the first step of a start also
#: carries its plan, ``speed`` and ``time_plan``; ``grad_norm`` with train.grad_clip; ``skipped`` on a
#: non-finite step that was skipped).
METRIC_KEYS: dict[str, type] = {
    "step": int,
    "epoch": int,
    "loss": float,
    "lr": float,
    "images_per_s": float,
    "time": float,
    "elapsed_s": float,
}


class EventPluginChecks(Checks):
    """An event plugin driven through a real tiny class-conditional run: its options, then each hook it implements,
    then ``evaluated`` with eval's own results (unconditional and conditional)."""

    kind = "event plugin"
    BUILD = "loads"
    CHECKS = (
        ("options validate", "options validate"),
        *((hook, hook) for hook in ("train_start", "step_end", "checkpoint_written", "samples_written", "train_end")),
        ("evaluated", "evaluated"),
        ("evaluated (class-conditional)", "evaluated (class-conditional)"),
        ("files it wrote", "files it wrote"),
    )


#: The tiny class-conditional run an event plugin is driven through (a few seconds on a CPU).
PROBE_RUN: dict[str, Any] = {
    "run": {"name": "probe", "device": "cpu", "seed": 0},
    "data": {"dataset": "synthetic", "num_samples": 8, "image_size": 8},
    "schedule": {"name": "linear", "options": {"num_timesteps": 20, "beta_start": 1e-3, "beta_end": 0.2}},
    "denoiser": {
        "name": "unet",
        "options": {
            "channels": [8, 16, 32, 32],
            "attentions": [False, False, False, False],
            "upscales": [False, False, True, True],
            "num_groups": 4,
            "num_heads": 2,
        },
    },
    "sampler": {"name": "ddim", "options": {"steps": 4}},
    "conditioning": {"kind": "class"},
    "train": {
        "batch_size": 4,
        "lr": 1e-3,
        "precision": "fp32",
        "channels_last": False,
        "compile": False,
        "keep_checkpoints": 1,
    },
    "sample": {"num_images": 4, "batch_size": 4, "trajectory_images": 0},
}


def _evaluated_results(classes: list[str]) -> list[dict[str, Any]]:
    """What ``ddpmkit eval`` hands the ``evaluated`` hook, in its own layout: an unconditional run's, then a
    class-conditional run's (with its ``conditional`` section, documented in :mod:`ddpmkit.hookspecs`)."""
    plain = {
        "num_samples": 40,
        "num_reference": 40,
        "samples": {"fid": 12.5, "kid": 0.01, "precision": 0.5, "recall": 0.5, "confident_share": 0.9},
        "floor": {"fid": 2.5, "kid": 0.001, "precision": 0.7, "recall": 0.7, "confident_share": 0.95},
    }
    per_class = [
        {"class": k, "num": 10, "accuracy": 0.9, "fid": 20.0 + k, "floor_fid": 5.0} for k in range(len(classes))
    ]
    conditional = {
        "class_accuracy": 0.9,
        "classes_drawn": len(classes),
        "mean_class_fid": sum(r["fid"] for r in per_class) / len(per_class),
        "mean_class_floor_fid": 5.0,
        "per_class": per_class,
    }
    return [plain, {**plain, "conditional": conditional}]


def check_event_plugin(
    name: str, options: dict[str, Any] | None = None, *, steps: int = 3, only: Collection[str] | None = None
) -> list[CheckResult]:
    """Drive the event plugin ``name`` through a real tiny class-conditional run in a scratch folder: its options
    validate; its hooks run without an exception while the run trains ``steps`` steps, writes a real checkpoint
    (``checkpoint_written``'s path loads with ``load_run``) and real samples; then ``evaluated`` is called with
    results in eval's own layout, an unconditional one and a conditional one. A hook that raises does not stop the
    probe: each is reported on its own line."""
    import tempfile

    from ddpmkit.registry import discovery
    from ddpmkit.run.config import config_from_dict
    from ddpmkit.run.events import RunInfo
    from ddpmkit.training.runner import RunReport, run_config

    c = EventPluginChecks(name)
    chosen = {check for check, _ in c.select(only)}
    found: dict[str, Any] = {}

    def build() -> str:
        plugin = discovery.find_plugin(name)
        c.qualified = plugin.qualified
        impls = {
            hook: [
                i
                for i in getattr(discovery.registry().manager.hook, hook).get_hookimpls()
                if i.plugin_name == plugin.qualified
            ]
            for hook in discovery.EVENT_HOOKS
        }
        found.update(plugin=plugin, impls={h: i for h, i in impls.items() if i})
        assert found["impls"], (
            f"plugin {plugin.label} implements none of the event hooks ({', '.join(discovery.EVENT_HOOKS)})"
        )
        return "implements " + ", ".join(found["impls"])

    c.attempt("loads", build)
    if "plugin" not in found:
        return c.results
    plugin = found["plugin"]
    with tempfile.TemporaryDirectory(prefix="ddpmkit-check-") as scratch:
        data = {
            **PROBE_RUN,
            "run": {**PROBE_RUN["run"], "dir": scratch},
            "train": {**PROBE_RUN["train"], "max_steps": steps, "checkpoint_every": steps},
            "plugins": {plugin.name: dict(options or {})},
        }
        built: dict[str, Any] = {}

        def configure() -> str:
            built["cfg"] = config_from_dict(data)
            return f"[plugins.{plugin.name}] = {built['cfg'].plugins.get(plugin.name)}"

        c.attempt("options validate", configure)
        if "cfg" not in built:
            return c.results
        cfg = built["cfg"]
        calls: list[tuple[str, dict[str, Any], BaseException | None]] = []
        originals = {}

        def recorder(impl: Any, hook: str) -> Callable[..., Any]:
            function = impl.function

            def recorded(*args: Any) -> None:
                given = dict(zip(impl.argnames, args))
                try:
                    function(*args)
                except Exception as exc:  # recorded, and the probe run goes on
                    calls.append((hook, given, exc))
                    return
                calls.append((hook, given, None))

            return recorded

        for hook, impls in found["impls"].items():
            for impl in impls:
                originals[id(impl)] = (impl, impl.function)
                impl.function = recorder(impl, hook)
        try:
            code = run_config(cfg, report=RunReport(), fresh=True)
            assert code == 0, f"the probe run ended with exit code {code}"
        finally:
            for impl, function in originals.values():
                impl.function = function
        run_dir = cfg.run_dir
        for hook, given, error in calls:
            if hook not in chosen:
                continue
            label = hook if hook != "step_end" else f"step_end (step {given.get('step', '?')})"

            def outcome(error=error) -> str:
                if error is not None:
                    raise error
                return ""

            c.attempt(label, outcome)
        if "evaluated" in found["impls"]:
            from ddpmkit.run.data import dataset_classes

            classes = dataset_classes(cfg.data)
            info = RunInfo(run_dir, cfg, "cpu", steps, steps)
            for label, result in zip(("evaluated", "evaluated (class-conditional)"), _evaluated_results(classes)):
                for impl in found["impls"]["evaluated"] if label in chosen else []:
                    args = {"run": info, "options": cfg.plugin_options(plugin), "result": result}

                    def call(impl=impl, args=args) -> str:
                        impl.function(*[args[a] for a in impl.argnames])
                        return ""

                    c.attempt(label, call)
        written = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())
        if "files it wrote" in chosen:
            shown = [f for f in written if not f.startswith("checkpoints")]  # the run's own checkpoints aside
            c.attempt("files it wrote", lambda: "in the probe run's folder: " + ", ".join(shown))
    return c.results


CHECKS = {
    "schedule": check_schedule,
    "denoiser": check_denoiser,
    "sampler": check_sampler,
    "objective": check_objective,
}
#: the checks of each kind, as classes (one method per check)
KITS: dict[str, type[Checks]] = {
    "schedule": ScheduleChecks,
    "denoiser": DenoiserChecks,
    "sampler": SamplerChecks,
    "objective": ObjectiveChecks,
    "event plugin": EventPluginChecks,
}


#: Other names of the event-plugin kind that check_component and assert_conforms take.
EVENT_KINDS = ("event plugin", "event", "events")


def check_component(kind: str, name: str, options: dict[str, Any] | None = None, **kwargs: Any) -> list[CheckResult]:
    """Run the conformance checks of ``kind`` on the installed component ``name`` (``only=[...]``: some of them);
    ``kind`` is one of ``CHECKS`` or ``"event plugin"`` (also ``"event"``, ``"events"``)."""
    if kind in EVENT_KINDS:
        return check_event_plugin(name, options, **kwargs)
    if kind not in CHECKS:
        raise ValueError(f"kind {kind!r}: the kit checks {', '.join((*CHECKS, 'event plugin'))}")
    return CHECKS[kind](name, options, **kwargs)


def assert_conforms(
    kind: str,
    name: str,
    *,
    image_shape: tuple[int, int, int] | None = None,
    num_timesteps: int | None = None,
    device: str = "cpu",
    only: Collection[str] | None = None,
    **options: Any,
) -> None:
    """For a plugin's own tests: AssertionError listing every failed check of component ``name`` with ``options``.

    ``kind`` is a component kind or ``"event plugin"``; ``image_shape`` (denoisers) and ``num_timesteps``
    (denoisers and samplers) set what the checks build for; ``only`` runs some checks alone (by name, e.g.
    ``only=["seeds reproduce"]``); every other keyword is an option of the component.
    """
    extra: dict[str, Any] = {"only": only} if kind in EVENT_KINDS else {"device": device, "only": only}
    if image_shape is not None:
        if kind != "denoiser":
            raise TypeError("image_shape applies to denoisers only")
        extra["image_shape"] = tuple(image_shape)
    if num_timesteps is not None:
        if kind == "schedule":
            options["num_timesteps"] = num_timesteps
        else:
            extra["num_timesteps"] = num_timesteps
    failed = [r for r in check_component(kind, name, options, **extra) if not r.passed]
    if failed:
        raise AssertionError("; ".join(f"{r.check}: {r.detail}" for r in failed))
