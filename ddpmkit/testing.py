"""The conformance kit: checks every schedule, denoiser and sampler must pass.

Run them from the command line (``ddpmkit check-plugins``) or from a plugin's own test suite::

    from ddpmkit.testing import assert_conforms

    def test_my_schedule():
        assert_conforms("schedule", "cosine", num_timesteps=100)
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from ddpmkit.registry.blame import one_line
from ddpmkit.diffusion import MAX_FINAL_SNR, PREDICTIONS, gaussian_reverse_moments
from ddpmkit.errors import ConfigError, DdpmkitError
from ddpmkit.registry.build import create_denoiser, create_sampler, create_schedule
from ddpmkit.interfaces import Denoiser



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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Checks:
    def __init__(self, kind: str, name: str) -> None:
        from ddpmkit.registry.discovery import find

        self.kind, self.name, self.results = kind, name.rpartition(":")[2], []
        try:
            self.qualified = find(kind, name).qualified
        except DdpmkitError:  # reported by the "builds" check
            self.qualified = name

    def run(self, check: str, fn: Callable[[], str | None]) -> None:
        """Run one check; an AssertionError or any exception is a failure with its message."""
        try:
            detail = fn() or ""
            self.results.append(CheckResult(self.kind, self.name, check, True, detail, self.qualified))
        except Exception as exc:
            msg = str(exc) if isinstance(exc, AssertionError) else f"{type(exc).__name__}: {exc}"
            self.results.append(CheckResult(self.kind, self.name, check, False, msg, self.qualified))


# --- schedules ------------------------------------------------------------------------------------


def check_schedule(name: str, options: dict[str, Any] | None = None, *, device: str = "cpu") -> list[CheckResult]:
    """T >= 1; betas finite, in (0, 1) (also as float32); abar strictly decreasing; small final SNR; device/dtype."""
    c = _Checks("schedule", name)
    built: dict[str, Any] = {}

    def build() -> str:
        built["s"] = create_schedule(name, **(options or {}))
        return f"T = {built['s'].num_timesteps}"

    c.run("builds", build)
    if "s" not in built:
        return c.results
    s = built["s"]

    def steps() -> None:
        assert s.num_timesteps >= 1, f"T = {s.num_timesteps}"

    def betas() -> str:
        b = s.betas
        assert torch.isfinite(b).all(), "betas are not all finite"
        assert ((b > 0) & (b < 1)).all(), f"betas (float32) outside (0, 1): min {b.min():.3g}, max {b.max():.3g}"
        return f"beta in [{b.min():.3g}, {b.max():.3g}]"

    def decreasing() -> None:
        ab = s.alphas_cumprod
        if len(ab) > 1:
            bad = int((ab[1:] >= ab[:-1]).sum())
            assert bad == 0, f"alphas_cumprod fails to decrease at {bad} steps (float32)"
        assert (ab > 0).all(), "alphas_cumprod reaches 0: x_0 cannot be predicted at the last steps"

    def float64() -> str:
        b = s.make_betas()
        assert isinstance(b, torch.Tensor) and b.dtype == torch.float64, (
            f"make_betas() returned {getattr(b, 'dtype', type(b).__name__)}; compute it in float64 "
            "(float32 betas lose the small products of alphas_cumprod)"
        )
        return "float64"

    def final_snr() -> str:
        snr = float(s.snr()[-1])
        assert snr < MAX_FINAL_SNR, f"final SNR {snr:.3g} >= {MAX_FINAL_SNR}: x_T is not close to pure noise"
        return f"final SNR {snr:.3g}"

    def on_device() -> str:
        s.to(device)
        for attr in ("betas", "alphas_cumprod", "posterior_variance", "posterior_mean_coef1"):
            t = getattr(s, attr)
            assert t.dtype == torch.float32, f"{attr} is {t.dtype}"
            assert t.device.type == torch.device(device).type, f"{attr} on {t.device}"
        return f"float32 on {device}"

    for check, fn in (("T >= 1", steps), ("make_betas is float64", float64), ("betas in (0, 1)", betas),
                      ("abar decreasing", decreasing), ("final SNR", final_snr), ("float32 on device", on_device)):
        c.run(check, fn)
    return c.results


# --- denoisers ------------------------------------------------------------------------------------


def check_denoiser(
    name: str,
    options: dict[str, Any] | None = None,
    *,
    image_shape: tuple[int, int, int] = (1, 32, 32),
    num_timesteps: int = 1000,
    device: str = "cpu",
) -> list[CheckResult]:
    """A known prediction target; shape in == shape out (several batch sizes, mixed t); the output depends on t,
    per image; other image shapes honoured or refused with ConfigError; eval deterministic; gradients reach
    every parameter; state_dict round trip."""
    c = _Checks("denoiser", name)
    built: dict[str, Any] = {}
    image_shape = tuple(image_shape)

    def make(seed: int, shape: tuple[int, int, int] = image_shape) -> Denoiser:
        torch.manual_seed(seed)
        return create_denoiser(name, image_shape=shape, num_timesteps=num_timesteps, **(options or {})).to(device)

    def build() -> str:
        built["m"] = make(0)
        n = sum(p.numel() for p in built["m"].parameters())
        return f"{n:,} parameters"

    c.run("builds", build)
    if "m" not in built:
        return c.results
    m: Denoiser = built["m"]
    g = torch.Generator().manual_seed(0)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn((n, *image_shape), generator=g).to(device)
        t = torch.randint(0, num_timesteps, (n,), generator=g)
        t[0] = num_timesteps - 1
        if n > 1:
            t[1] = 0
        return x, t.to(device)

    def predicts() -> str:
        p = getattr(m, "prediction", None)
        assert p in PREDICTIONS, f"prediction = {p!r}, not one of {', '.join(PREDICTIONS)}"
        return str(p)

    def uses_t() -> str:
        m.eval()
        x, _ = batch(2)
        x = x[:1].expand(2, *image_shape).contiguous()
        t = torch.tensor([num_timesteps - 1, 0], device=device)
        with torch.no_grad():
            together = m(x, t)
            alone = [m(x[i : i + 1], t[i : i + 1]) for i in range(2)]
        for i in range(2):
            assert torch.allclose(together[i], alone[i][0], rtol=1e-4, atol=1e-5), (
                f"image {i} of a batch with t = {t.tolist()} differs from the same image alone: "
                "t must be used per image (not t[0] for the whole batch)"
            )
        assert num_timesteps == 1 or not torch.allclose(together[0], together[1]), (
            "the same image at t = 0 and t = T-1 gives the same output: t is ignored"
        )
        return "per-image t"

    def other_shapes() -> str:
        channels, height, width = image_shape
        tried = []
        for shape in {(channels, height // 2, width // 2), (4 - channels if channels in (1, 3) else 1, height, width),
                      (channels, height + 1, width + 1)}:
            if min(shape[1:]) < 1:
                continue
            try:
                other = make(2, shape)
            except ConfigError:
                tried.append(f"{shape} refused")
                continue
            other.eval()
            x = torch.randn((2, *shape), generator=g).to(device)
            try:
                with torch.no_grad():
                    y = other(x, torch.tensor([0, num_timesteps - 1], device=device))
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

    def shapes() -> str:
        m.eval()
        with torch.no_grad():
            for n in (1, 3):
                x, t = batch(n)
                y = m(x, t)
                assert y.shape == x.shape, f"batch {n}: output {tuple(y.shape)} != input {tuple(x.shape)}"
                assert torch.isfinite(y).all(), f"batch {n}: non-finite output"
        return "batches 1 and 3, t from 0 to T-1"

    def deterministic() -> None:
        m.eval()
        x, t = batch(2)
        with torch.no_grad():
            assert torch.equal(m(x, t), m(x, t)), "two eval-mode calls differ"

    def gradients() -> str:
        m.train()
        m.zero_grad(set_to_none=True)
        x, t = batch(2)
        m(x, t).square().mean().backward()
        missing = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, f"no gradient reaches {len(missing)} parameters, e.g. {missing[:3]}"
        bad = [n for n, p in m.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        assert not bad, f"non-finite gradients in {bad[:3]}"
        m.zero_grad(set_to_none=True)
        m.eval()
        return f"{sum(1 for _ in m.parameters())} tensors"

    def round_trip() -> None:
        other = make(1)
        other.load_state_dict(m.state_dict())
        other.eval()
        m.eval()
        x, t = batch(2)
        with torch.no_grad():
            assert torch.equal(m(x, t), other(x, t)), "a copy loaded from state_dict() computes differently"

    def speed() -> str:
        m.eval()
        x, t = batch(8)
        with torch.no_grad():
            m(x, t)
            start = time.perf_counter()
            m(x, t)
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
        return f"{(time.perf_counter() - start) * 1000 / 8:.2f} ms per image forward on {device}"

    for check, fn in (("prediction target", predicts), ("shape in == out", shapes), ("uses t per image", uses_t),
                      ("other image shapes", other_shapes), ("eval deterministic", deterministic),
                      ("gradients reach all parameters", gradients), ("state_dict round trip", round_trip),
                      ("forward time", speed)):
        c.run(check, fn)
    return c.results


# --- samplers -------------------------------------------------------------------------------------


class GaussianOracle(Denoiser):
    """The exact predictor for data x_0 ~ N(mu, s^2) per pixel, under a given schedule, for any target.

    x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps gives E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar);
    E[x_0 | x_t] and v follow from eq. 4 and v = sqrt(abar) eps - sqrt(1 - abar) x_0.
    """

    def __init__(self, schedule, mu: float, s: float, image_shape=(1, 8, 8), prediction: str = "epsilon") -> None:
        super().__init__(Denoiser.Options(), image_shape=image_shape, num_timesteps=schedule.num_timesteps)
        self.mu, self.s = mu, s
        self.prediction = prediction
        self.register_buffer("abar", schedule.alphas_cumprod.double().clone())

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = self.abar[t].view(-1, *([1] * (x_t.ndim - 1)))
        x = x_t.double()
        eps = (1 - ab).sqrt() * (x - ab.sqrt() * self.mu) / (ab * self.s**2 + 1 - ab)
        x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
        out = {"epsilon": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[self.prediction]
        return out.to(x_t.dtype)


def check_sampler(
    name: str,
    options: dict[str, Any] | None = None,
    *,
    device: str = "cpu",
    num_pixels: int = 16384,
    mu: float = 0.3,
    s: float = 0.2,
    num_timesteps: int = 1000,
) -> list[CheckResult]:
    """With the exact predictor of N(mu, s^2) data, samples match the exact answer for the sampler's own
    steps (or N(mu, s^2) within its declared tolerance); x0- and v-predicting denoisers give the same
    images; seeds reproduce; output in [-1, 1]; the callback sees the steps the sampler lists."""
    c = _Checks("sampler", name)
    built: dict[str, Any] = {}

    def build() -> None:
        built["sampler"] = create_sampler(name, **(options or {}))

    c.run("builds", build)
    if "sampler" not in built:
        return c.results
    sampler = built["sampler"]
    schedule = create_schedule("linear", num_timesteps=num_timesteps)
    side = int(math.isqrt(num_pixels // 16))
    shape = (16, 1, side, side)
    oracles = {p: GaussianOracle(schedule, mu, s, image_shape=shape[1:], prediction=p).to(device) for p in PREDICTIONS}
    seen_t: list[int] = []

    def draw(seed: int, record: bool = False, prediction: str = "epsilon") -> torch.Tensor:
        cb = (lambda i, t, x: seen_t.append(int(t))) if record else None
        return sampler.sample(oracles[prediction], schedule, shape, generator=torch.Generator().manual_seed(seed),
                              callback=cb)

    first: dict[str, torch.Tensor] = {}

    def moments() -> str:
        x = draw(0, record=True).double()
        first["x"] = x
        n = x.numel()
        steps = sampler.reverse_steps(schedule)
        if steps is not None:
            # the exact answer for this sampler's own discretisation; 1e-3 covers float32 arithmetic
            target_mu, target_s = gaussian_reverse_moments(schedule, steps, mu, s)
            bias, how = 1e-3, f"exact for its {len(steps)} steps"
        else:
            target_mu, target_s = mu, s
            bias, how = float(sampler.oracle_tolerance), f"ideal, within the declared oracle_tolerance {sampler.oracle_tolerance:g}"
        tol_mean = 5 * s / math.sqrt(n) + bias  # 5 standard errors, plus the allowance for bias
        tol_std = 5 * s / math.sqrt(2 * n) + bias
        m_hat, s_hat = float(x.mean()), float(x.std())
        assert abs(m_hat - target_mu) < tol_mean, f"mean {m_hat:.4f}, expected {target_mu:.4f} +- {tol_mean:.4f} ({how})"
        assert abs(s_hat - target_s) < tol_std, f"std {s_hat:.4f}, expected {target_s:.4f} +- {tol_std:.4f} ({how})"
        return (f"mean {m_hat:.4f}, std {s_hat:.4f}; expected {target_mu:.4f}, {target_s:.4f} ({how}; "
                f"data N({mu}, {s}^2)), {n} pixels")

    def targets() -> str:
        assert "x" in first, "no first sample to compare with"
        for prediction in ("x0", "v"):
            x = draw(0, prediction=prediction).double()
            gap = float((x - first["x"]).abs().max())
            # a sampler that took the output for epsilon would be off by O(1); 5e-3 leaves room for solvers that
            # convert in float32 at large noise levels (diffusers' Euler: 0.003)
            assert gap < 5e-3, (
                f"a {prediction}-predicting denoiser gives images up to {gap:.3g} away from the epsilon one's; "
                "convert its output with ddpmkit.diffusion.split_prediction"
            )
        return "x0 and v match epsilon"

    def seeds() -> None:
        assert "x" in first, "no first sample to compare with"
        assert torch.equal(draw(0).double(), first["x"]), "equal seeds gave different images"
        assert not torch.equal(draw(1).double(), first["x"]), "different seeds gave equal images"

    def in_range() -> None:
        x = first.get("x")
        assert x is not None, "no sample"
        assert tuple(x.shape) == shape, f"shape {tuple(x.shape)} != {shape}"
        assert torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1, f"output in [{x.min():.3g}, {x.max():.3g}]"

    def callback() -> str:
        listed = [int(t) for t in sampler.timesteps(schedule)]
        assert seen_t, "the callback was never called"
        assert seen_t == listed, (
            f"the callback saw {len(seen_t)} steps ({seen_t[:3]}...) but timesteps() lists {len(listed)} ({listed[:3]}...)"
        )
        # non-increasing: a second-order solver (Heun) evaluates the denoiser twice at some t
        assert all(a >= b for a, b in zip(seen_t, seen_t[1:])), "the callback's t increases somewhere"
        return f"{len(seen_t)} steps, t from {seen_t[0]} to {seen_t[-1]}"

    for check, fn in (("matches the Gaussian oracle", moments), ("x0 and v denoisers", targets),
                      ("seeds reproduce", seeds), ("output in [-1, 1]", in_range),
                      ("callback sees the listed steps", callback)):
        c.run(check, fn)
    return c.results


CHECKS = {"schedule": check_schedule, "denoiser": check_denoiser, "sampler": check_sampler}


def check_component(kind: str, name: str, options: dict[str, Any] | None = None, **kwargs: Any) -> list[CheckResult]:
    """Run the conformance checks of ``kind`` on the installed component ``name``."""
    return CHECKS[kind](name, options, **kwargs)


def assert_conforms(
    kind: str,
    name: str,
    *,
    image_shape: tuple[int, int, int] | None = None,
    num_timesteps: int | None = None,
    device: str = "cpu",
    **options: Any,
) -> None:
    """For a plugin's own tests: AssertionError listing every failed check of component ``name`` with ``options``.

    ``image_shape`` (denoisers) and ``num_timesteps`` (denoisers and samplers) set what the checks build
    for; every other keyword is an option of the component.
    """
    extra: dict[str, Any] = {"device": device}
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
