"""``auto`` speed modes: the fastest exact mode for this model on this device, measured before training.

``train.precision = "auto"`` and ``train.channels_last = "auto"`` are resolved by timing a few training steps
of the run's own model at its own batch in each candidate mode (what ``ddpmkit bench`` measures), and the
fastest is taken. bf16 is a candidate only where it is native (CUDA with bf16, or a CPU with AVX-512 BF16 or
AMX): emulated bf16 measured 14x slower than fp32 on an AVX2-only CPU, so it is pruned without paying for
the measurement (and where a config names bf16 there, only its plain mode is measured, once, for the warning).
fp16 is never chosen by ``auto`` (it needs a loss scaler; name it explicitly). The answer is cached (keyed by
device, CPU or GPU model and flags, torch and ddpmkit versions and the model's identity), recorded in the run's
checkpoints, and kept when the run resumes, so a resumed run stays bit-exact.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ddpmkit.errors import attempt
from ddpmkit.run.components import build_components
from ddpmkit.run.config import RunConfig, config_from_dict
from ddpmkit.run.data import Dataset, dataset_classes
from ddpmkit.runtime.cache import cache_dir
from ddpmkit.runtime.speed import AUTO, SpeedModes, compile_unavailable
from ddpmkit.training.loop import TrainEvents, train
from ddpmkit.version import __version__

CACHE_FILE = "speed-modes.json"
#: steps untimed, then timed, per candidate (the median step is taken)
MEASURE_WARMUP, MEASURE_STEPS = 3, 5
#: a candidate's measurement ends once its steps after the first (set-up, compilation) took this long and at least
#: two were taken: one step of emulated bf16 took 12 s on an AVX2-only EPYC Zen 3, and eight of them per mode made
#: ``validate`` measure for over 10 minutes; exact modes there take about 1 s a step, so they take all their steps
MEASURE_SECONDS = 20.0
#: ``compile = "auto"`` compiles when that measured at least this many times the uncompiled images/s
COMPILE_GAIN = 1.05
#: an explicit mode this many times slower than the fastest exact one is warned about
SLOW_RATIO = 2.0
#: a time budget's rate is measured afresh at the start of the budgeted network, over at least this many
#: seconds and this many steps of steady training (the few steps of the cached choice are a burst, and a
#: machine's speed changes with what else runs on it)
RATE_SECONDS, RATE_MIN_STEPS = 10.0, 8
#: a cached figure this many times off the steady rate measured afresh is stale (measured while the machine was
#: busy, or on a changed one: two torch processes on 2 cores measured 5-100x slower than one): the model's cached
#: figures are forgotten, so the next run measures them again
STALE_RATIO = 2.0
#: the CPU flags that mean native bf16 (x86: AVX-512 BF16, AMX)
BF16_FLAGS = ("avx512_bf16", "amx_bf16")

Timer = Callable[[RunConfig, SpeedModes, torch.device], float]
#: (images/s of steady training, seconds of set-up) measured now, for ``cfg`` in ``modes``; given the rate
#: expected from the choice's figures, to size the measurement
RateTimer = Callable[[RunConfig, SpeedModes, torch.device, float], tuple[float, float]]


#: who is told before modes are measured (they take seconds to minutes): set by ``announced``
_announce: contextvars.ContextVar[Callable[[str], None] | None] = contextvars.ContextVar("announce", default=None)


def _tell(text: str) -> None:
    say = _announce.get()
    if say is not None:
        say(text)


@contextmanager
def announced(say: Callable[[str], None]) -> Iterator[None]:
    """Within it, each measurement of speed modes that is not cached is said first, with ``say``."""
    token = _announce.set(say)
    try:
        yield
    finally:
        _announce.reset(token)


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_bf16(device: torch.device, flags: set[str] | None = None) -> bool:
    """Whether bf16 runs natively on ``device`` (else it is emulated, many times slower than fp32)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        flags = cpu_flags() if flags is None else flags
        arm_bf16 = platform.machine() in ("arm64", "aarch64") and "bf16" in flags
        return arm_bf16 or any(f in flags for f in BF16_FLAGS)
    return False


def machine_key(device: torch.device, flags: set[str] | None = None) -> dict[str, Any]:
    """What a measurement depends on besides the model: the device, its model and flags, torch, and ddpmkit
    itself (whose own code, its compiled dropout say, can change which mode is fastest)."""
    flags = cpu_flags() if flags is None else flags
    key: dict[str, Any] = {
        "device": device.type,
        "torch": torch.__version__,
        "ddpmkit": __version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "flags": sorted(f for f in flags if f.startswith(("avx", "amx", "fma"))),
    }
    if device.type == "cuda":
        key["gpu"] = torch.cuda.get_device_name(device)
    return key


@dataclass
class Choice:
    """The modes a run trains in, and why: images/s of each candidate measured, what was pruned."""

    modes: SpeedModes
    figures: dict[str, float] = field(default_factory=dict)
    pruned: dict[str, str] = field(default_factory=dict)
    cached: bool = False
    #: modes tried that failed (compiling, where torch.compile breaks on this machine), with the error
    failed: dict[str, str] = field(default_factory=dict)

    def reason(self) -> str:
        """One line: what was chosen, the figures, and what was left out."""
        chosen = mode_label(self.modes)
        shown = ", ".join(f"{name} {ips:,.0f}" for name, ips in sorted(self.figures.items(), key=lambda kv: -kv[1]))
        text = f"speed modes: {chosen}" + (
            f" (measured images/s: {shown}{'; cached' if self.cached else ''})" if shown else ""
        )
        if self.pruned:
            text += "; " + "; ".join(f"{name} not tried: {why}" for name, why in self.pruned.items())
        if self.failed:
            text += "; " + "; ".join(f"{name} failed here, so not taken: {why}" for name, why in self.failed.items())
        return text

    def record(self) -> dict[str, Any]:
        return {"modes": asdict(self.modes), "figures": self.figures, "pruned": self.pruned, "failed": self.failed}


def mode_label(modes: SpeedModes) -> str:
    return (
        modes.precision
        + ("+channels-last" if modes.channels_last else "")
        + ("+compiled" if modes.compile else "")
        + ("+cuda-graphs" if modes.graphed else "")
    )


def is_auto(train_section: Any) -> bool:
    return AUTO in (train_section.precision, train_section.channels_last, train_section.compile)


def emulated_bf16(cfg: RunConfig, device: torch.device, flags: set[str] | None = None) -> bool:
    """Whether ``cfg`` names bf16 for a CPU that only emulates it."""
    return cfg.train.precision == "bf16" and device.type == "cpu" and not native_bf16(device, flags)


#: why ``auto`` measures nothing more where a config names bf16 and the CPU emulates it
EMULATED_BF16 = "bf16 is emulated on this CPU, and each bf16 mode measured here costs a minute or more"


def candidates(
    cfg: RunConfig, device: torch.device, flags: set[str] | None = None
) -> tuple[list[SpeedModes], dict[str, str]]:
    """The exact modes ``auto`` measures for this config on ``device``, and those pruned with the reason."""
    tc = cfg.train
    pruned: dict[str, str] = {}
    if tc.precision == AUTO:
        precisions = ["fp32"]
        if native_bf16(device, flags):
            precisions.append("bf16")
        else:
            pruned["bf16"] = (
                "no native bf16 on this CPU (no AVX-512 BF16 or AMX): it is emulated, about 14x slower"
                if device.type == "cpu"
                else f"no native bf16 on {device.type}"
            )
    else:
        precisions = [tc.precision]
    layouts = [False, True] if tc.channels_last == AUTO else [bool(tc.channels_last)]
    if emulated_bf16(cfg, device, flags):  # the run is many times slower whichever layout: the plain one, unmeasured
        if tc.channels_last == AUTO:
            layouts, pruned["channels-last"] = [False], EMULATED_BF16
        if tc.compile == AUTO:
            pruned["compile"] = EMULATED_BF16
    if tc.compile == AUTO and "compile" not in pruned and (why := compile_unavailable(device)):
        pruned["compile"] = why
    base = SpeedModes.for_run(tc, device)
    compiled = tc.compile is True  # "auto": tried afterwards, on the fastest of these (see choose)
    return [
        SpeedModes(
            p,
            channels_last=cl,
            compile=compiled,
            fused_adam=base.fused_adam,
            tf32=base.tf32,
            cuda_graphs=base.cuda_graphs,
        )
        for p in precisions
        for cl in layouts
    ], pruned


def measure_training(
    cfg: RunConfig,
    modes: SpeedModes,
    device: torch.device,
    *,
    warmup: int = MEASURE_WARMUP,
    steps: int = MEASURE_STEPS,
    mean: bool = False,
    max_seconds: float | None = MEASURE_SECONDS,
) -> tuple[float, float]:
    """(images/s from the median step after ``warmup``, or from their mean with ``mean``, and seconds of the
    first step) of ddpmkit's own training loop (EMA, bookkeeping and all) for ``cfg``'s model and batch in
    ``modes``, on random images. The steps end early once those after the first took ``max_seconds`` (and at least
    two were taken); the median or mean is then of those after the second."""
    batch = cfg.train.batch_size
    run_cfg = with_modes(cfg, modes, max_steps=warmup + steps, epochs=10**6, checkpoint_every=10**9, keep_checkpoints=1)
    model, schedule, _ = fresh_model(run_cfg)
    stamps: list[float] = []
    started = time.perf_counter()

    def on_step(metrics: dict[str, Any]) -> None:
        stamps.append(time.perf_counter())
        if max_seconds is not None and len(stamps) >= 3 and stamps[-1] - stamps[0] >= max_seconds:
            raise _Measured

    with tempfile.TemporaryDirectory(prefix="ddpmkit-measure-") as tmp:
        try:
            result = train(
                run_cfg,
                model=model,
                schedule=schedule,
                dataset=synthetic_dataset(run_cfg, batch * 4),
                device=device,
                run_dir=Path(tmp),
                checkpoint_state={},
                events=TrainEvents(on_step=on_step),
            )
        except _Measured:
            pass
        else:
            if result.interrupted:  # Ctrl-C or SIGTERM: the command stops, with no partial figure cached
                raise MeasurementInterrupted(
                    f"interrupted while measuring the speed of {mode_label(modes)} for "
                    f"{cfg.run.name}: nothing was trained, and no figure of it was cached"
                )
    times = [b - a for a, b in zip(stamps, stamps[1:])]
    times = times[min(warmup - 1, len(times) - 1) :]
    step_s = statistics.fmean(times) if mean else statistics.median(times)
    return batch / step_s, stamps[0] - started


class _Measured(Exception):
    """Raised from a measurement's step callback: enough slow steps were timed."""


class MeasurementInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM while speed modes were measured (before anything trained): the command ends."""


def _measured_rate(cfg: RunConfig, modes: SpeedModes, device: torch.device) -> float:
    return measure_training(cfg, modes, device)[0]


def _steady_rate(cfg: RunConfig, modes: SpeedModes, device: torch.device, expected_ips: float) -> tuple[float, float]:
    steps = max(RATE_MIN_STEPS, math.ceil(RATE_SECONDS * expected_ips / cfg.train.batch_size))
    # sized from the cached rate, and held to about that time whatever the cache says (a figure copied from a
    # faster machine, or measured while this one was idle, asked for millions of steps)
    return measure_training(cfg, modes, device, steps=steps, mean=True, max_seconds=2 * RATE_SECONDS)


def steady_rate(
    cfg: RunConfig, device: torch.device, *, timer: Timer | None = None, rate_timer: RateTimer | None = None
) -> tuple[float, float]:
    """(images/s, seconds of set-up) of ``cfg`` in the modes it will train in, measured now over about
    ``RATE_SECONDS`` of steady training (the mean step, so stalls count); never cached."""
    modes, expected = measured_rate(cfg, device, timer=timer)
    _tell(
        f"  measuring {mode_label(modes)} for {cfg.run.name} over about {RATE_SECONDS:.0f} s of training, to plan "
        "its steps ..."
    )
    ips, setup = (rate_timer or _steady_rate)(cfg, modes, device, expected)
    if max(ips / expected, expected / ips) >= STALE_RATIO and forget(cfg, device):
        _tell(
            f"  the speed figures measured before ({expected:,.1f} images/s in {mode_label(modes)}) were "
            f"{max(ips / expected, expected / ips):.1f}x "
            f"off the {ips:,.1f} measured now: forgotten, measured again by the next run"
        )
    return ips, setup


def synthetic_dataset(cfg: RunConfig, num: int, seed: int = 0) -> Dataset:
    """Random uint8 images of the config's shape (with random labels when it is class-conditional): speed does
    not depend on what the pixels show."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (num, *cfg.image_shape), generator=g, dtype=torch.uint8)
    if not cfg.conditioning.enabled:
        return Dataset(images, f"{num} random images of {cfg.image_shape}")
    classes = dataset_classes(cfg.data) or ["0", "1"]
    labels = torch.randint(0, len(classes), (num,), generator=g)
    return Dataset(images, f"{num} random labelled images of {cfg.image_shape}", labels, classes)


def fresh_model(cfg: RunConfig) -> tuple[Any, Any, Any]:
    torch.manual_seed(cfg.run.seed)
    built = build_components(cfg)
    return built.denoiser, built.schedule, built.sampler


def with_modes(cfg: RunConfig, modes: SpeedModes, **train_settings: Any) -> RunConfig:
    """``cfg`` training in ``modes`` (and with ``train_settings``)."""
    data = cfg.model_dump(mode="json")
    data["train"].update(modes.train_settings(), **train_settings)
    return config_from_dict(data)  # validated as a config, so its components are resolved


def model_key(cfg: RunConfig) -> dict[str, Any]:
    """The model and the step being timed: the identity's model keys, the batch and the image shape."""
    identity = {k: v for k, v in cfg.identity().items() if k.startswith(("denoiser.", "schedule.", "conditioning."))}
    graphs = {"cuda_graphs": True} if cfg.train.cuda_graphs else {}  # keys measured before it existed still match
    return {
        **identity,
        "batch": cfg.train.batch_size,
        "shape": list(cfg.image_shape),
        "compile": cfg.train.compile,
        **graphs,
    }


def choose(
    cfg: RunConfig,
    device: torch.device,
    *,
    timer: Timer | None = None,
    flags: set[str] | None = None,
    cache: Path | None = None,
) -> Choice:
    """The fastest exact candidate mode for ``cfg`` on ``device`` (measured with ``timer``, or cached)."""
    modes, pruned = candidates(cfg, device, flags)
    figures: dict[str, float] = {}
    cached = True
    if len(modes) > 1 or (cfg.train.compile == AUTO and "compile" not in pruned):
        figures, cached = _figures(cfg, device, modes, timer=timer, flags=flags, cache=cache)
    best = max(modes, key=lambda m: figures.get(mode_label(m), 0.0))
    failed: dict[str, str] = {}
    if cfg.train.compile == AUTO and "compile" not in pruned:  # one compilation, of the fastest: each costs a minute
        compiled = replace(best, compile=True)
        measured, error = attempt(lambda: _figures(cfg, device, [compiled], timer=timer, flags=flags, cache=cache))
        if error is not None:  # torch.compile broken here (a toolchain, a driver, a torch bug): train without it
            failed[mode_label(compiled)] = error
            import torch._dynamo

            torch._dynamo.reset()  # nothing of the failed graphs (or their CUDA-graph memory pools) stays behind
        else:
            more, more_cached = measured
            figures, cached = {**figures, **more}, cached and more_cached
            if compile_pays(figures[mode_label(best)], more[mode_label(compiled)]):
                best = compiled
    return Choice(best, figures, pruned, cached and bool(figures), failed)


def compile_pays(plain: float, compiled: float) -> bool:
    """``auto``'s rule for torch.compile: taken when the compiled mode trains at least ``COMPILE_GAIN`` faster
    (its minute of set-up, and its fragility, for less is not worth it)."""
    return compiled >= COMPILE_GAIN * plain


def measured_rate(
    cfg: RunConfig,
    device: torch.device,
    *,
    timer: Timer | None = None,
    flags: set[str] | None = None,
    cache: Path | None = None,
) -> tuple[SpeedModes, float]:
    """The modes ``cfg`` will train in on ``device`` (``auto`` resolved) and their images/s, measured for
    this model at its batch (cached like the choice)."""
    if is_auto(cfg.train):
        choice = choose(cfg, device, timer=timer, flags=flags, cache=cache)
        if choice.figures:
            return choice.modes, choice.figures[mode_label(choice.modes)]
        modes = choice.modes
    else:
        modes = SpeedModes.for_run(cfg.train, device)
    figures, _ = _figures(cfg, device, [modes], timer=timer, flags=flags, cache=cache)
    return modes, figures[mode_label(modes)]


def slow_mode_warning(
    cfg: RunConfig,
    device: torch.device,
    *,
    timer: Timer | None = None,
    flags: set[str] | None = None,
    cache: Path | None = None,
) -> str | None:
    """The warning for an explicit ``train.precision = "bf16"`` (whatever the other modes) on a CPU without native
    bf16, with fp32's and bf16's measured images/s when bf16 is SLOW_RATIO or more times slower; None otherwise.

    Both are measured uncompiled, in the configured layout (contiguous for ``auto``): the mode the run then
    trains in where the other modes are ``auto`` (see ``candidates``), cached for it."""
    if not emulated_bf16(cfg, device, flags):
        return None
    base = SpeedModes.for_run(cfg.train, device)
    modes = [replace(base, precision=p, compile=False) for p in ("fp32", "bf16")]
    figures, _ = _figures(cfg, device, modes, timer=timer, flags=flags, cache=cache)
    fp32, bf16 = (figures[mode_label(m)] for m in modes)
    if fp32 < SLOW_RATIO * bf16:
        return None
    return (
        f"train.precision = bf16 is {fp32 / bf16:.1f}x slower than fp32 here ({bf16:,.1f} against {fp32:,.1f} "
        "images/s measured for this model, uncompiled): this CPU has no native bf16 (no AVX-512 BF16 or AMX), "
        'so it is emulated; set train.precision = "auto" (or "fp32")'
    )


def _figures(
    cfg: RunConfig,
    device: torch.device,
    modes: list[SpeedModes],
    *,
    timer: Timer | None,
    flags: set[str] | None,
    cache: Path | None,
) -> tuple[dict[str, float], bool]:
    """Images/s of each of ``modes`` for ``cfg``'s model on ``device``, and whether all were cached: each mode's
    figure from the cache, or measured and cached (one entry per mode, so a figure measured for one purpose, the
    bf16 warning say, serves the others)."""
    cache = cache or default_cache_file()
    machine, model = machine_key(device, flags), json.loads(json.dumps(model_key(cfg), default=str))
    keys = {
        mode_label(m): hashlib.sha256(json.dumps([machine, model, asdict(m)], sort_keys=True).encode()).hexdigest()
        for m in modes
    }
    stored = _read_cache(cache)
    figures = {}
    for label, key in keys.items():
        entry = stored.get(key)
        ips = entry.get("images_per_s") if isinstance(entry, dict) else None
        if isinstance(ips, (int, float)) and not isinstance(ips, bool) and math.isfinite(ips) and ips > 0:
            figures[label] = float(ips)
        elif entry is not None:
            _tell(f"  the cached speed figure of {label} ({ips!r} images/s) cannot be right: measured again")
    missing = [m for m in modes if mode_label(m) not in figures]
    if not missing:
        return figures, True
    _tell(
        f"  measuring {', '.join(mode_label(m) for m in missing)} for {cfg.run.name} ({_size(cfg)}) on this "
        f"{device.type} "
        f"(up to {MEASURE_WARMUP + MEASURE_STEPS} steps each; cached for later runs) ..."
    )
    timer = timer or _measured_rate
    for m in missing:
        figures[mode_label(m)] = ips = float(timer(cfg, m, device))
        _write_cache(
            cache,
            keys[mode_label(m)],
            {"images_per_s": ips, "mode": mode_label(m), "machine": machine, "model": model, "time": time.time()},
        )
    return {mode_label(m): figures[mode_label(m)] for m in modes}, False


def _size(cfg: RunConfig) -> str:
    """``0.52 M parameters``: which model is measured, where a budget's smaller models share the run's name."""
    with torch.random.fork_rng(devices=[]):
        n = build_components(cfg).denoiser.num_parameters()
    return f"{n / 1e6:.2f} M parameters"


def forget(cfg: RunConfig, device: torch.device, *, flags: set[str] | None = None, cache: Path | None = None) -> bool:
    """Drop the cached figures of ``cfg``'s model on this machine; whether there were any."""
    cache = cache or default_cache_file()
    data = _read_cache(cache)
    ours = json.loads(json.dumps([machine_key(device, flags), model_key(cfg)], default=str))
    stale = [k for k, v in data.items() if isinstance(v, dict) and [v.get("machine"), v.get("model")] == ours]
    if stale:
        _update_cache(cache, lambda d: [d.pop(k, None) for k in stale])
    return bool(stale)


def default_cache_file() -> Path:
    """``speed-modes.json`` in ddpmkit's cache folder (:func:`ddpmkit.runtime.cache.cache_dir`)."""
    return cache_dir() / CACHE_FILE


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, key: str, value: dict[str, Any]) -> None:
    """Best effort: a cache that cannot be written only costs the next run a measurement."""
    _update_cache(path, lambda data: data.__setitem__(key, value))


def _update_cache(path: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    try:
        data = _read_cache(path)
        change(data)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass
