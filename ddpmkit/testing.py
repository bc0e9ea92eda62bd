"""The conformance kit: checks every schedule, denoiser and sampler must pass.

Run them from the command line (``ddpmkit check-plugins``) or from a plugin's own test suite::

    from ddpmkit.testing import assert_conforms

    def test_my_schedule():
        assert_conforms("schedule", "cosine", num_timesteps=100)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ddpmkit.diffusion import MAX_FINAL_SNR, PREDICTIONS, gaussian_reverse_moments
from ddpmkit.errors import ConfigError, DdpmkitError
from ddpmkit.interfaces import Denoiser
from ddpmkit.registry.blame import one_line
from ddpmkit.registry.build import create_denoiser, create_sampler, create_schedule


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
        from ddpmkit.kinds import KINDS
        from ddpmkit.registry.discovery import find

        self.kind, self.name, self.results = kind, name.rpartition(":")[2], []
        try:
            self.qualified = find(kind, name).qualified if kind in KINDS else name
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

    for check, fn in (
        ("T >= 1", steps),
        ("make_betas is float64", float64),
        ("betas in (0, 1)", betas),
        ("abar decreasing", decreasing),
        ("final SNR", final_snr),
        ("float32 on device", on_device),
    ):
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

    def make(seed: int, shape: tuple[int, int, int] = image_shape, num_classes: int = 0) -> Denoiser:
        torch.manual_seed(seed)
        return create_denoiser(
            name, image_shape=shape, num_timesteps=num_timesteps, num_classes=num_classes, **(options or {})
        ).to(device)

    def build() -> str:
        built["m"] = make(0)
        n = sum(p.numel() for p in built["m"].parameters())
        return f"{n:,} parameters"

    c.run("builds", build)
    if "m" not in built:
        return c.results
    m: Denoiser = built["m"]
    # the dependence checks (on t, on the class, gradients) run on a copy with every weight nudged: a layer
    # initialised to zero (DiT's output layer, adaLN-Zero) hides them at initialisation, not after training
    nudged = _nudged(m)
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
        nudged.eval()
        x, _ = batch(2)
        x = x[:1].expand(2, *image_shape).contiguous()
        t = torch.tensor([num_timesteps - 1, 0], device=device)
        with torch.no_grad():
            together = nudged(x, t)
            alone = [nudged(x[i : i + 1], t[i : i + 1]) for i in range(2)]
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
        for shape in {
            (channels, height // 2, width // 2),
            (4 - channels if channels in (1, 3) else 1, height, width),
            (channels, height + 1, width + 1),
        }:
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
        for model in (m, nudged):
            model.train()
            model.zero_grad(set_to_none=True)
            x, t = batch(2)
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

    def conditions() -> str:
        """A denoiser that declares "class": its output changes with the label, per image, and takes the null class."""
        from ddpmkit.diffusion import NULL_CLASS

        declared = set(getattr(type(m), "conditions", frozenset()))
        if "class" not in declared:
            return "declares no conditions: trained unconditionally only"
        k = 3
        conditional = _nudged(make(0, num_classes=k)).eval()
        assert getattr(conditional, "num_classes", 0) == k, (
            f"built with num_classes = {k}, reports {getattr(conditional, 'num_classes', None)}"
        )
        x, _ = batch(1)
        x = x.expand(4, *image_shape).contiguous()
        t = torch.full((4,), num_timesteps // 2, device=device)
        labels = torch.tensor([0, 1, 2, NULL_CLASS], device=device)
        with torch.no_grad():
            out = conditional(x, t, cond={"class": labels})
            alone = [conditional(x[i : i + 1], t[i : i + 1], cond={"class": labels[i : i + 1]}) for i in range(4)]
        assert tuple(out.shape) == tuple(x.shape) and torch.isfinite(out).all(), (
            "bad output for labels 0, 1, 2 and null"
        )
        assert not torch.allclose(out[0], out[1]), (
            "the same image at class 0 and class 1 gives the same output: the label is ignored"
        )
        assert not torch.allclose(out[0], out[3]), "class 0 and the null class give the same output"
        for i in range(4):
            assert torch.allclose(out[i], alone[i][0], rtol=1e-4, atol=1e-5), (
                f"image {i} of a batch with labels {labels.tolist()} differs from the same image alone: the label "
                "must be used per image"
            )
        return f"{k} classes and the null class ({NULL_CLASS}), per image"

    for check, fn in (
        ("prediction target", predicts),
        ("shape in == out", shapes),
        ("uses t per image", uses_t),
        ("other image shapes", other_shapes),
        ("eval deterministic", deterministic),
        ("gradients reach all parameters", gradients),
        ("state_dict round trip", round_trip),
        ("conditions on the class", conditions),
        ("forward time", speed),
    ):
        c.run(check, fn)
    return c.results


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
) -> list[CheckResult]:
    """With the exact predictor of N(mu, s^2) data under ``schedule`` (an installed schedule's name, at
    ``num_timesteps``), samples match the exact answer for the sampler's own steps (or N(mu, s^2) within its
    declared tolerance); x0- and v-predicting denoisers give the same images; seeds reproduce; output in
    [-1, 1]; the callback sees the steps the sampler lists; a class-conditional oracle is drawn per class and
    with classifier-free guidance at w = 2, against the closed form; a sampler that ``supports_start`` starts
    from given images with a per-step hook (SDEdit, inpainting)."""
    schedule_name = schedule
    c = _Checks("sampler", name)
    built: dict[str, Any] = {}

    def build() -> None:
        built["sampler"] = create_sampler(name, **(options or {}))

    c.run("builds", build)
    if "sampler" not in built:
        return c.results
    sampler = built["sampler"]
    schedule = create_schedule(schedule_name, num_timesteps=num_timesteps)
    side = int(math.isqrt(num_pixels // 16))
    shape = (16, 1, side, side)
    oracles = {p: GaussianOracle(schedule, mu, s, image_shape=shape[1:], prediction=p).to(device) for p in PREDICTIONS}
    seen_t: list[int] = []

    def draw(seed: int, record: bool = False, prediction: str = "epsilon") -> torch.Tensor:
        cb = (lambda i, t, x: seen_t.append(int(t))) if record else None
        return sampler.sample(
            oracles[prediction], schedule, shape, generator=torch.Generator().manual_seed(seed), callback=cb
        )

    first: dict[str, torch.Tensor] = {}
    final_snr = float(schedule.snr()[-1])
    # where x_T still holds signal, sampling from x_T ~ N(0, 1) starts from the wrong marginal, and an ODE and an SDE
    # sampler land in different places: N(mu, s^2) is no one's answer then (the schedule's own check fails)
    no_ideal = (
        (
            f"not held to N(mu, s^2): x_T of this schedule still holds signal (final SNR {final_snr:.3g} >= "
            f"{MAX_FINAL_SNR}), so samplers that start from pure noise differ by design; checked for the "
            "reverse-step family (exact for its steps) and a stated gaussian_answer only"
        )
        if final_snr >= MAX_FINAL_SNR
        else None
    )

    def moments() -> str:
        x = draw(0, record=True).double()
        first["x"] = x
        n = x.numel()
        steps = sampler.reverse_steps(schedule)
        stated = sampler.gaussian_answer(schedule, mu, s) if steps is None else None
        if steps is None and stated is None and no_ideal is not None:
            return f"mean {float(x.mean()):.4f}, std {float(x.std()):.4f}; {no_ideal}"
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

    def cost() -> str:
        calls = []
        oracle = oracles["epsilon"]
        counting = _Counting(oracle, calls)
        sampler.sample(counting, schedule, shape, generator=torch.Generator().manual_seed(0))
        declared = int(sampler.num_evaluations(schedule))
        assert len(calls) == declared, (
            f"sample() called the denoiser {len(calls)} times for one batch, but num_evaluations() says {declared}; "
            "a sampler that calls it more than once per step says so in num_evaluations()"
        )
        steps = len(sampler.timesteps(schedule))
        return f"{declared} denoiser calls per batch for {steps} steps"

    def callback() -> str:
        listed = [int(t) for t in sampler.timesteps(schedule)]
        assert seen_t, "the callback was never called"
        assert seen_t == listed, (
            f"the callback saw {len(seen_t)} steps ({seen_t[:3]}...) but timesteps() lists {len(listed)} "
            f"({listed[:3]}...)"
        )
        # non-increasing: a second-order solver (Heun) evaluates the denoiser twice at some t
        assert all(a >= b for a, b in zip(seen_t, seen_t[1:])), "the callback's t increases somewhere"
        return f"{len(seen_t)} steps, t from {seen_t[0]} to {seen_t[-1]}"

    # two classes either side of the unconditional N(0, s_c^2), narrow enough that guiding them stays inside [-1, 1]
    # (the samplers clip their output)
    mu_c, s_c = 0.0, 0.15
    class_means = [mu_c - s_c, mu_c + s_c]
    conditional = GaussianOracle(schedule, mu_c, s_c, image_shape=shape[1:], class_means=class_means).to(device)
    labels = torch.tensor([0, 1] * (shape[0] // 2))

    def per_class(weight: float) -> list[tuple[float, float]]:
        from ddpmkit.guidance import ClassConditioned

        guided = ClassConditioned(conditional, labels, weight)
        x = sampler.sample(guided, schedule, shape, generator=torch.Generator().manual_seed(0)).double()
        return [(float(x[labels == k].mean()), float(x[labels == k].std())) for k in range(len(class_means))]

    def check_classes(weight: float) -> str:
        steps = sampler.reverse_steps(schedule)
        if steps is None and weight != 1:
            # guided, an SDE and an ODE sampler of the same model reach different answers: no ideal to hold it to
            return "not of the reverse-step family: guidance is checked for those only"
        if steps is None and no_ideal is not None:
            return no_ideal
        got, shown = per_class(weight), []
        n = num_pixels // len(class_means)
        for k, (m_hat, s_hat) in enumerate(got):
            if steps is not None:
                target_mu, target_s = gaussian_reverse_moments(
                    schedule, steps, class_means[k], s_c, guided_by=(mu_c, s_c), weight=weight
                )
                bias = 1e-3
            else:
                target_mu, target_s, bias = class_means[k], s_c, float(sampler.oracle_tolerance)
            tol_mean, tol_std = 5 * target_s / math.sqrt(n) + bias, 5 * target_s / math.sqrt(2 * n) + bias
            assert abs(m_hat - target_mu) < tol_mean, (
                f"class {k} at guidance weight {weight:g}: mean {m_hat:.4f}, expected {target_mu:.4f} +- {tol_mean:.4f}"
            )
            assert abs(s_hat - target_s) < tol_std, (
                f"class {k} at guidance weight {weight:g}: std {s_hat:.4f}, expected {target_s:.4f} +- {tol_std:.4f}"
            )
            shown.append(f"class {k}: mean {m_hat:.4f} (expected {target_mu:.4f}), std {s_hat:.4f} ({target_s:.4f})")
        return "; ".join(shown)

    def starts() -> str:
        """supports_start: a chain from a given image at a middle step visits only the steps at or below it,
        the hook's replacement of the state is honoured, and strength 1 (from the noised input) has the plain
        draw's distribution."""
        from ddpmkit.diffusion import Start, q_sample

        if not getattr(type(sampler), "supports_start", False):
            return "does not declare supports_start: not used by ddpmkit edit"
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
        out = sampler.sample(oracles["epsilon"], schedule, shape, generator=g, start=start, hook=hook)
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
        edited = sampler.sample(oracles["epsilon"], schedule, shape, generator=g, start=full).double()
        plain = first.get("x")
        assert plain is not None, "no plain sample to compare with"
        n = plain.numel()
        tol = 5 * s / math.sqrt(n) * 2 + 0.01  # two independent estimates, plus the input's leak at t = T - 1
        assert abs(float(edited.mean()) - float(plain.mean())) < tol, (
            f"from the noised input at t = {listed[0]}: mean {float(edited.mean()):.4f}, from noise "
            f"{float(plain.mean()):.4f}"
        )
        return f"from t = {t0}: {len(visited)} steps, the hook honoured; from t = {listed[0]}: as from noise"

    for check, fn in (
        ("matches the Gaussian oracle", moments),
        ("x0 and v denoisers", targets),
        ("seeds reproduce", seeds),
        ("output in [-1, 1]", in_range),
        ("callback sees the listed steps", callback),
        ("cost as declared", cost),
        ("each class of a conditional oracle", lambda: check_classes(1.0)),
        ("classifier-free guidance (w = 2)", lambda: check_classes(2.0)),
        ("starts from an image (edit)", starts),
    ):
        c.run(check, fn)
    return c.results


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


def check_event_plugin(name: str, options: dict[str, Any] | None = None, *, steps: int = 3) -> list[CheckResult]:
    """Drive the event plugin ``name`` through a short pretend run in a scratch folder (its hooks only): its
    options validate; train_start, ``steps`` step_end calls with the documented metric keys,
    checkpoint_written, samples_written, train_end and evaluated each run without an exception."""
    import tempfile

    from ddpmkit.registry import discovery
    from ddpmkit.run.config import config_from_dict
    from ddpmkit.run.events import RunInfo

    c = _Checks("event plugin", name)
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

    c.run("loads", build)
    if "plugin" not in found:
        return c.results
    plugin = found["plugin"]
    with tempfile.TemporaryDirectory(prefix="ddpmkit-check-") as scratch:
        data = {
            "run": {"dir": scratch, "name": "probe", "device": "cpu"},
            "data": {"dataset": "synthetic", "num_samples": 8, "image_size": 8},
            "plugins": {plugin.name: dict(options or {})},
        }
        built: dict[str, Any] = {}

        def configure() -> str:
            built["cfg"] = config_from_dict(data)
            return f"[plugins.{plugin.name}] = {built['cfg'].plugins.get(plugin.name)}"

        c.run("options validate", configure)
        if "cfg" not in built:
            return c.results
        cfg = built["cfg"]
        run_dir = cfg.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        info = RunInfo(run_dir, cfg, "cpu", 0, steps)
        args = {"run": info, "options": cfg.plugin_options(plugin)}
        now = time.time()
        calls = [("train_start", {})]
        calls += [
            (
                "step_end",
                {
                    "step": k,
                    "metrics": {
                        "step": k,
                        "epoch": 0,
                        "loss": 1.0 / k,
                        "lr": 1e-3,
                        "images_per_s": 100.0,
                        "time": now + k,
                        "elapsed_s": 0.1 * k,
                    },
                },
            )
            for k in range(1, steps + 1)
        ]
        calls += [
            ("checkpoint_written", {"step": steps, "path": run_dir / "checkpoints" / f"step-{steps:08d}"}),
            ("samples_written", {"paths": []}),
            ("train_end", {"step": steps, "interrupted": False}),
            (
                "evaluated",
                {
                    "result": {
                        "num_samples": 10,
                        "samples": {"fid": 12.5, "precision": 0.5, "recall": 0.5},
                        "floor": {"fid": 2.5, "precision": 0.7, "recall": 0.7},
                    }
                },
            ),
        ]
        for hook, kwargs in calls:
            for impl in found["impls"].get(hook, []):

                def call(impl=impl, hook=hook, kwargs=kwargs) -> str:
                    impl.function(*[{**args, **kwargs}[a] for a in impl.argnames])
                    return ""

                label = hook if hook != "step_end" else f"step_end (step {kwargs['step']})"
                c.run(label, call)
        written = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())
        c.run("files it wrote", lambda: ", ".join(written) or "none")
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
