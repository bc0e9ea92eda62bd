"""The maths of post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", section 3 and appendix C): power-function EMA profiles, their relative width sigma_rel, and the
least-squares fit that rebuilds the EMA of any profile from snapshots of others.

A power-function EMA with exponent gamma averages the weights theta_tau of steps tau <= t with density
p_{t,gamma}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1); tracked step by step it is
theta_hat_t = beta_t theta_hat_{t-1} + (1 - beta_t) theta_t with beta_t = (1 - 1/t)^(gamma + 1) (eq. 2). Its
width relative to the training so far is sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))) (eq. 3).
Because every snapshot is a linear average of the same history, the average of another profile is a linear
combination of snapshots: the coefficients minimise the L2 distance between the densities (appendix C.2),
whose inner products have the closed form of :func:`profile_inner`.

During training :class:`TrackedEmas` follows the profiles of ``[train.posthoc_ema]`` and the loop stores their
snapshots; afterwards :func:`rebuild` (``ddpmkit ema``) fits the EMA of any sigma_rel to them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from ddpmkit.run.checkpoint import Checkpoint


def gamma_to_sigma_rel(gamma: float) -> float:
    """Eq. 3: the relative standard deviation of the power-function profile of exponent ``gamma`` (> -1)."""
    if gamma <= -1:
        raise ValueError(f"gamma must exceed -1, got {gamma}")
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Eq. 3 solved for gamma: with s = sigma_rel^-2, (gamma + 2)^2 (gamma + 3) = s (gamma + 1), i.e. the largest
    real root of gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) = 0 (the root EDM2 takes)."""
    if not sigma_rel > 0:
        raise ValueError(f"sigma_rel must be positive, got {sigma_rel}")
    s = sigma_rel**-2
    real = [r.real for r in np.roots([1.0, 7.0, 16.0 - s, 12.0 - s]) if abs(r.imag) < 1e-9 and r.real > -1]
    if not real:  # sigma_rel above the profile family's widest (about 0.3)
        raise ValueError(f"sigma_rel {sigma_rel} is wider than any power-function profile")
    return float(max(real))


def ema_beta(step: int, gamma: float) -> float:
    """Eq. 2: the decay at ``step`` (1, 2, ...) of the power-function EMA of exponent ``gamma``."""
    if step < 1:
        raise ValueError(f"steps count from 1, got {step}")
    return float((1.0 - 1.0 / step) ** (gamma + 1))


def profile_inner(t_a: float, gamma_a: float, t_b: float, gamma_b: float) -> float:
    """The integral over tau of p_{t_a,gamma_a}(tau) p_{t_b,gamma_b}(tau): both vanish beyond their own t, so
    (gamma_a + 1)(gamma_b + 1) m^(gamma_a + gamma_b + 1) / ((gamma_a + gamma_b + 1) t_a^(gamma_a+1) t_b^(gamma_b+1))
    with m = min(t_a, t_b)."""
    m = min(t_a, t_b)
    g = gamma_a + gamma_b + 1
    # in logarithms: steps in the millions to powers in the tens overflow a float
    log = (
        np.log(gamma_a + 1)
        + np.log(gamma_b + 1)
        + g * np.log(m)
        - np.log(g)
        - (gamma_a + 1) * np.log(t_a)
        - (gamma_b + 1) * np.log(t_b)
    )
    return float(np.exp(log))


#: Up to this many steps the fit uses the tracked EMAs' exact per-step weights (what :class:`TrackedEmas`
#: computes); beyond it the continuous densities, whose per-step mismatch (about gamma / t) is then negligible.
DISCRETE_MAX_STEPS = 50_000


def step_weights(t: int, gamma: float, horizon: int) -> np.ndarray:
    """The weight of each step tau = 1..``horizon`` in the EMA of exponent ``gamma`` tracked by eq. 2 up to step
    ``t``: (tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1) for tau <= t (the density integrated over a step),
    0 beyond."""
    tau = np.arange(1, horizon + 1, dtype=np.float64)
    return (np.minimum(tau, t) / t) ** (gamma + 1) - (np.minimum(tau - 1, t) / t) ** (gamma + 1)


def _gram(
    snapshots: list[tuple[float, float]], targets: list[tuple[float, float]], discrete: bool
) -> tuple[np.ndarray, list[np.ndarray], list[float]]:
    """(A, [b], [c]): the inner products of the snapshots' profiles with each other (once), with each target's,
    and each target's with itself; over the per-step weights (``discrete``) or the densities (:func:`profile_inner`)."""
    if discrete:
        horizon = int(max(t for t, _ in [*snapshots, *targets]))
        w = np.stack([step_weights(int(t), g, horizon) for t, g in snapshots])
        wts = [step_weights(int(t), g, horizon) for t, g in targets]
        return w @ w.T, [w @ wt for wt in wts], [float(wt @ wt) for wt in wts]
    a = np.array([[profile_inner(ti, gi, tj, gj) for tj, gj in snapshots] for ti, gi in snapshots])
    bs = [np.array([profile_inner(ti, gi, *target) for ti, gi in snapshots]) for target in targets]
    return a, bs, [profile_inner(*target, *target) for target in targets]


def fit(
    snapshots: list[tuple[float, float]], targets: list[tuple[float, float]], *, discrete: bool = False
) -> list[tuple[np.ndarray, float]]:
    """For each target: (:func:`solve_coefficients`, :func:`fit_error`), the snapshots' inner products computed once."""
    if not snapshots:
        raise ValueError("no snapshots to reconstruct from")
    a, bs, cs = _gram(snapshots, targets, discrete)
    # with the coefficients summing to one (Lagrange: [[A, 1], [1', 0]] [x, l] = [b, 1]) the result stays an
    # average of weights: an unconstrained fit that is 1e-3 short of one pulls every weight 0.1 % towards zero,
    # more than the EMA lengths differ from each other early in training
    n = len(snapshots)
    kkt = np.block([[a, np.ones((n, 1))], [np.ones((1, n)), np.zeros((1, 1))]])
    out = []
    for b, c in zip(bs, cs):
        x = np.linalg.lstsq(kkt, np.append(b, 1.0), rcond=None)[0][:n]
        out.append((x, float(np.sqrt(max(0.0, x @ a @ x - 2 * x @ b + c) / c))))
    return out


def solve_coefficients(
    snapshots: list[tuple[float, float]], target: tuple[float, float], *, discrete: bool = False
) -> np.ndarray:
    """The coefficients x with sum_i x_i snapshot_i closest (in L2) to the EMA of profile ``target`` = (t, gamma),
    given ``snapshots`` = [(t_i, gamma_i), ...]: the solution of A x = b with A_ij = <p_i, p_j> and
    b_i = <p_i, p_target> (least squares, for an A that is near singular) with sum_i x_i = 1; the profiles as
    densities (appendix
    C.2) or, ``discrete``, as the per-step weights of :func:`step_weights`."""
    return fit(snapshots, [target], discrete=discrete)[0][0]


def fit_error(
    snapshots: list[tuple[float, float]], target: tuple[float, float], x: np.ndarray, *, discrete: bool = False
) -> float:
    """The relative L2 distance between the profile the coefficients ``x`` combine and the target's:
    ||sum_i x_i p_i - p_target|| / ||p_target|| (0: rebuilt exactly; the profiles' own shapes, not the weights)."""
    a, (b,), (c,) = _gram(snapshots, [target], discrete)
    return float(np.sqrt(max(0.0, x @ a @ x - 2 * x @ b + c) / c))


class TrackedEmas:
    """The power-function EMAs of ``sigma_rels``, one copy of the model's floating-point state per profile, updated
    after every optimizer step by eq. 2 (in fp32 whatever the training precision)."""

    def __init__(self, model: torch.nn.Module, sigma_rels: list[float]) -> None:
        self.sigma_rels = list(sigma_rels)
        self.gammas = {s: sigma_rel_to_gamma(s) for s in self.sigma_rels}
        state = model.state_dict()
        self.keys = [k for k, v in state.items() if v.is_floating_point()]
        self.averages = {s: [state[k].detach().float().clone() for k in self.keys] for s in self.sigma_rels}

    def update(self, model: torch.nn.Module, step: int) -> None:
        """Average in the weights after optimizer step ``step`` (1, 2, ...): at step 1 each profile is the weights."""
        state = model.state_dict()
        current = [state[k].detach().float() for k in self.keys]
        for s in self.sigma_rels:
            torch._foreach_lerp_(self.averages[s], current, 1.0 - ema_beta(step, self.gammas[s]))

    def weights(self, model: torch.nn.Module, sigma_rel: float) -> dict[str, torch.Tensor]:
        """The state dict of profile ``sigma_rel``: its averages, the model's own values for the rest (counters)."""
        state = dict(model.state_dict())
        for k, v in zip(self.keys, self.averages[sigma_rel]):
            state[k] = v.to(state[k].dtype)
        return state

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every profile's averages in fp32, for the checkpoint (keys ``<sigma_rel>/<parameter>``)."""
        return {f"{s:g}/{k}": v for s in self.sigma_rels for k, v in zip(self.keys, self.averages[s])}

    def load_state_dict(self, saved: dict[str, torch.Tensor]) -> None:
        for s in self.sigma_rels:
            self.averages[s] = [saved[f"{s:g}/{k}"].to(self.averages[s][0].device).float().clone() for k in self.keys]


@dataclass
class Rebuilt:
    """One EMA length rebuilt from the snapshots: its weights, and how well the snapshots' profiles fit it."""

    sigma_rel: float
    gamma: float
    step: int
    weights: dict[str, torch.Tensor]
    coefficients: list[float]
    snapshots: int
    fit_error: float

    def info(self) -> dict[str, Any]:
        return {
            "sigma_rel": self.sigma_rel,
            "gamma": self.gamma,
            "step": self.step,
            "snapshots": self.snapshots,
            "fit_error": self.fit_error,
            "coefficients": self.coefficients,
        }


def rebuild(
    snapshots: list[Checkpoint], sigma_rels: list[float], *, profiles: list[float] | None = None
) -> list[Rebuilt]:
    """The EMA of each of ``sigma_rels`` at the last snapshot's step, as the least-squares combination of the
    ``snapshots`` (their profiles, or only ``profiles`` of them), summed in float64."""
    from ddpmkit.errors import ConfigError
    from ddpmkit.run.checkpoint import profile_file

    if not snapshots:
        raise ConfigError("no post-hoc EMA snapshots: train with [train.posthoc_ema] enabled = true first")
    stored = [
        (ckpt, s, g)
        for ckpt in snapshots
        for s, g in zip(ckpt.state["posthoc_ema"]["sigma_rels"], ckpt.state["posthoc_ema"]["gammas"])
        if profiles is None or s in profiles
    ]
    pairs = [(float(ckpt.step), float(g)) for ckpt, _, g in stored]
    last = snapshots[-1].step
    template = stored[-1][0].weights(profile_file(stored[-1][1]))  # keys; non-float entries
    gammas = [sigma_rel_to_gamma(s) for s in sigma_rels]
    fits = fit(pairs, [(float(last), g) for g in gammas], discrete=last <= DISCRETE_MAX_STEPS)
    xs = [x for x, _ in fits]
    totals = [
        {k: torch.zeros_like(v, dtype=torch.float64) for k, v in template.items() if v.is_floating_point()}
        for _ in sigma_rels
    ]
    for i, (ckpt, s, _) in enumerate(stored):  # each snapshot read once, into every target
        for k, v in ckpt.weights(profile_file(s)).items():
            for x, total in zip(xs, totals):
                if k in total:
                    total[k].add_(v.double(), alpha=float(x[i]))
    return [
        Rebuilt(
            sigma_rel,
            gamma,
            last,
            {k: total[k].to(v.dtype) if k in total else v for k, v in template.items()},
            [float(c) for c in x],
            len(snapshots),
            error,
        )
        for sigma_rel, gamma, (x, error), total in zip(sigma_rels, gammas, fits, totals)
    ]


def parse_sigma_rels(text: str, what: str = "--sigma-rel") -> list[float]:
    """``"0.02,0.05,0.1"`` -> [0.02, 0.05, 0.1]; ConfigError for anything that is not a usable width."""
    import math

    from ddpmkit.errors import ConfigError
    from ddpmkit.run.config import sigma_rel_problem

    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what} {text}: expected widths such as 0.02,0.05,0.1") from None
    if not values or not all(map(math.isfinite, values)):
        raise ConfigError(f"{what} {text}: expected widths such as 0.02,0.05,0.1")
    values = list(dict.fromkeys(values))
    if problem := sigma_rel_problem(values):
        raise ConfigError(f"{what} {text}: {problem}")
    return values


def rebuild_run(
    run_dir: Path, sigma_rels: list[float], *, profiles: list[float] | None = None
) -> list[tuple[Rebuilt, Path]]:
    """Rebuild the EMA of each of ``sigma_rels`` from the snapshots of the run in ``run_dir`` (those up to its
    latest checkpoint) and write each as a checkpoint folder ``RUN/posthoc-ema/sigma-<S>`` that ``sample``,
    ``eval`` and ``ddpmkit.load_run`` read; returns each with its folder."""
    from ddpmkit.errors import ConfigError
    from ddpmkit.run.checkpoint import find_checkpoint, load_snapshots, save_rebuilt

    run_dir = Path(run_dir)
    ckpt = find_checkpoint(run_dir)
    if ckpt.path.parent.parent.resolve() != run_dir.resolve():
        raise ConfigError(f"{run_dir}: give the run folder (its snapshots are in RUN/posthoc-ema), not a checkpoint")
    if not ckpt.schema.config.get("train", {}).get("posthoc_ema", {}).get("enabled"):
        raise ConfigError(
            f"{run_dir} was trained without post-hoc EMA: train with [train.posthoc_ema] "
            "enabled = true (a new run: the tracked profiles are part of the run) to rebuild EMA lengths"
        )
    rebuilt = rebuild(load_snapshots(run_dir, up_to=ckpt.step), sigma_rels, profiles=profiles)
    return [(r, save_rebuilt(run_dir, r.sigma_rel, r.weights, ckpt, r.info())) for r in rebuilt]
