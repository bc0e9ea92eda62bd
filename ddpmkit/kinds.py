"""The kinds of component a plugin can register, declared once."""

from __future__ import annotations

#: schedule, denoiser, sampler and (plugin API 4) objective, in the order they are shown.
KINDS: tuple[str, ...] = ("schedule", "denoiser", "sampler", "objective")

#: The registration hook of each kind (``register_schedules`` ...), see :mod:`ddpmkit.hookspecs`.
REGISTER_HOOKS: dict[str, str] = {kind: f"register_{kind}s" for kind in KINDS}

#: A plugin module that implements training-event hooks is listed as this kind.
EVENTS = "events"


def base_class(kind: str) -> type:
    """The abstract base class components of ``kind`` subclass (imports torch)."""
    from ddpmkit.interfaces import Denoiser, NoiseSchedule, Objective, Sampler

    return {"schedule": NoiseSchedule, "denoiser": Denoiser, "sampler": Sampler, "objective": Objective}[kind]


def check_kind(kind: str) -> str:
    """``kind`` itself, or ValueError naming the valid kinds."""
    if kind not in KINDS:
        raise ValueError(f"unknown component kind {kind!r}; one of {', '.join(KINDS)}")
    return kind
