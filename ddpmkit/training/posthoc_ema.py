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

(Step one of issue 20's post-hoc EMA: the tracking in the training loop, the snapshots in the checkpoint
format and ``ddpmkit ema`` build on this.)
"""

from __future__ import annotations

import numpy as np


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
    log = (np.log(gamma_a + 1) + np.log(gamma_b + 1) + g * np.log(m) - np.log(g)
           - (gamma_a + 1) * np.log(t_a) - (gamma_b + 1) * np.log(t_b))
    return float(np.exp(log))


def solve_coefficients(snapshots: list[tuple[float, float]], target: tuple[float, float]) -> np.ndarray:
    """The coefficients x with sum_i x_i snapshot_i closest (L2 over the densities) to the EMA of profile
    ``target`` = (t, gamma), given ``snapshots`` = [(t_i, gamma_i), ...]: the solution of A x = b with
    A_ij = <p_i, p_j> and b_i = <p_i, p_target> (least squares, for an A that is near singular)."""
    if not snapshots:
        raise ValueError("no snapshots to reconstruct from")
    a = np.array([[profile_inner(ti, gi, tj, gj) for tj, gj in snapshots] for ti, gi in snapshots])
    b = np.array([profile_inner(ti, gi, *target) for ti, gi in snapshots])
    return np.linalg.lstsq(a, b, rcond=None)[0]
