"""The measurements behind `ddpmkit bench`: the tutorial's loops and ddpmkit's in each speed mode, one process."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from ddpmkit.benchmark.measure import (
    count_flops,
    matmul_peak,
    median_seconds,
    peak_memory_bytes,
    reset_peak_memory,
)
from ddpmkit.benchmark.tutorial import TutorialTrainer, tutorial_sample_one
from ddpmkit.errors import ConfigError, attempt
from ddpmkit.run.config import RunConfig
from ddpmkit.run.data import to_model_scale
from ddpmkit.runtime.speed import AUTO, PRECISIONS, SpeedModes, compile_unavailable, pytorch_default_precision
from ddpmkit.sampling.draw import generate
from ddpmkit.training.autotune import (
    candidates,
    compile_pays,
    cpu_flags,
    cpu_model,
    fresh_model,
    measure_training,
    synthetic_dataset,
)

#: The CPU flags that decide which speed modes are fast (named in the results beside the CPU model).
CPU_FEATURES = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16"}

#: Mode flags after the precision in a mode name such as ``bf16+cl+compile``.
FLAGS = {"cl": "channels_last", "fused": "fused_adam", "compile": "compile", "graphs": "cuda_graphs", "tf32": "tf32"}
#: the flags that change nothing off a CUDA GPU
CUDA_ONLY_FLAGS = {"graphs", "tf32"}


def parse_mode(text: str) -> SpeedModes:
    """``fp32``, ``bf16+cl``, ``fp16+cl+fused``, ``bf16+cl+compile``, ``bf16+compile+graphs`` (CUDA graphs),
    ``fp32+tf32`` ... as SpeedModes."""
    precision, *flags = text.strip().split("+")
    if precision not in PRECISIONS:
        raise ConfigError(f"--modes {text}: the precision must be one of {', '.join(PRECISIONS)}")
    fields = {}
    for flag in flags:
        if flag not in FLAGS:
            raise ConfigError(f"--modes {text}: unknown flag '{flag}' (flags: {', '.join(FLAGS)})")
        fields[FLAGS[flag]] = True
    if fields.get("cuda_graphs") and not fields.get("compile"):
        raise ConfigError(f"--modes {text}: 'graphs' captures the compiled step in CUDA graphs: add 'compile'")
    return SpeedModes(precision=precision, **fields)


def parse_modes(text: str) -> list[SpeedModes]:
    """``"fp32,bf16+cl"`` -> the modes; an empty item is named as such."""
    items = text.split(",")
    if any(not item.strip() for item in items):
        raise ConfigError(f"--modes {text}: an empty mode (a comma too many?); e.g. --modes fp32,bf16+cl")
    return [parse_mode(item) for item in items]


def mode_name(modes: SpeedModes) -> str:
    return "+".join([modes.precision] + [flag for flag, field in FLAGS.items() if getattr(modes, field)])


def default_modes(device: torch.device) -> list[SpeedModes]:
    """Every speed mode ddpmkit offers on ``device``."""
    if device.type == "cuda":
        names = [
            "fp32",
            "fp32+tf32",
            "bf16+cl+fused",
            "fp16+cl+fused",
            "bf16+cl+fused+compile",
            "bf16+cl+fused+compile+graphs",
        ]
        if not torch.cuda.is_bf16_supported():
            names = [n for n in names if not n.startswith("bf16")] + ["fp16+cl+fused+compile+graphs"]
    else:
        names = ["fp32", "bf16", "bf16+cl", "bf16+cl+fused", "bf16+cl+compile"]
    if compile_unavailable(device):  # the bench says which modes it measured; --modes can still ask for these
        names = [n for n in names if "compile" not in n]
    return [parse_mode(n) for n in names]


@dataclass
class Row:
    """One line of a bench table: a loop in a mode, its speed and its ratio to the reference."""

    loop: str
    mode: str
    per_s: float  # images/s (training) or image-steps/s (sampling)
    ratio: float = 1.0
    flop_per_s: float | None = None
    utilisation: float | None = None  # of the matmul peak of the mode's dtype
    peak_memory: int | None = None
    setup_s: float | None = None  # the first (untimed) step: kernel selection, compilation
    round_ratios: list[float] | None = None  # per interleaved round, against that round's tutorial (``rounds`` > 1)


def ceilings(peaks: dict[str, float], flops_per_image: float, tutorial_per_s: float) -> dict[str, dict[str, float]]:
    """For each dtype, the images/s of a training step that ran all its FLOPs at that dtype's measured matmul
    peak, and that as a multiple of the tutorial's: what no mode of the dtype can beat on this device without
    doing fewer FLOPs (on a Zen 4, whose bf16 peak is 2.2x its fp32 one, bf16 cannot reach 2.5x a tutorial that
    runs near the fp32 peak)."""
    return {
        name: {"per_s": peak / flops_per_image, "ratio": peak / flops_per_image / tutorial_per_s}
        for name, peak in peaks.items()
    }


def bench_tutorial_training(cfg: RunConfig, device: torch.device, *, warmup: int, steps: int) -> float:
    """Images/s of the tutorial's fp32 eager step (median step time)."""
    model, schedule, _ = fresh_model(cfg)
    model.to(device).train()
    schedule.to(device)
    trainer = TutorialTrainer(model, schedule, lr=cfg.train.lr, ema_decay=cfg.train.ema_decay)
    x = to_model_scale(synthetic_dataset(cfg, cfg.train.batch_size).images.to(device))
    return cfg.train.batch_size / median_seconds(lambda: trainer.step(x), device, warmup=warmup, repeats=steps)


class _Enough(Exception):
    """Raised from the progress callback to stop a timed sampling run after its steps."""


def bench_ddpmkit_sampling(
    cfg: RunConfig, modes: SpeedModes, device: torch.device, *, steps: int, batch: int
) -> tuple[float, float]:
    """(image-steps/s over ``steps`` steps, seconds of a first 2-step warm-up run) of ddpmkit's batched sampler."""
    model, schedule, sampler = fresh_model(cfg)
    model.to(device)
    schedule.to(device)

    def run(n_steps: int) -> float:
        count = {"steps": 0}

        def progress(n: int) -> None:
            count["steps"] += 1
            if count["steps"] == n_steps:
                raise _Enough

        start = time.perf_counter()
        try:
            generate(
                model,
                schedule,
                sampler,
                batch,
                batch_size=batch,
                seed=0,
                image_shape=cfg.image_shape,
                modes=modes,
                progress=progress,
            )
        except _Enough:
            pass
        return time.perf_counter() - start

    setup = run(2)
    return batch * steps / run(steps), setup


def bench_tutorial_sampling(cfg: RunConfig, device: torch.device, *, steps: int) -> float:
    """Image-steps/s of the tutorial's one-image-at-a-time loop."""
    model, schedule, _ = fresh_model(cfg)
    model.to(device).eval()
    schedule.to(device)
    seconds = median_seconds(
        lambda: tutorial_sample_one(model, schedule, cfg.image_shape, steps), device, warmup=1, repeats=3
    )
    return steps / seconds


def flops_per_image(cfg: RunConfig, device: torch.device) -> tuple[float, float, int]:
    """(training forward+backward FLOPs, forward FLOPs) per image of the config's denoiser, and its parameters."""
    model, _, _ = fresh_model(cfg)
    model.to(device)
    x = torch.randn(2, *cfg.image_shape, device=device)
    t = torch.zeros(2, dtype=torch.long, device=device)
    train_flops = count_flops(lambda: model(x, t).square().mean().backward())
    with torch.no_grad():
        forward_flops = count_flops(lambda: model(x, t))
    return train_flops / 2, forward_flops / 2, model.num_parameters()


def run_bench(
    cfg: RunConfig,
    device: torch.device,
    *,
    modes: list[SpeedModes] | None = None,
    steps: int = 10,
    warmup: int = 3,
    sample_steps: int = 10,
    sample: bool = True,
    sample_batches: tuple[int, ...] = (),
    rounds: int = 1,
    note: Callable[[str], None] = lambda text: None,
) -> dict[str, Any]:
    """Measure everything `ddpmkit bench` reports; ``note`` is told what is being measured.

    With ``rounds`` > 1 training is measured in interleaved rounds (the tutorial, then every mode, again and
    again): a row's speed is the median over rounds and its ratio the median of the ratios within a round, so
    a machine whose speed drifts over minutes moves both sides of each ratio alike."""
    modes = modes or default_modes(device)
    torch.manual_seed(0)
    note("matrix-multiply peaks")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if device.type == "cuda":
        dtypes["fp16"] = torch.float16
    peaks = {name: matmul_peak(device, dtype) for name, dtype in dtypes.items()}
    if device.type == "cuda":
        before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        peaks["tf32"] = matmul_peak(device, torch.float32)
        torch.backends.cuda.matmul.allow_tf32 = before
    train_flops, forward_flops, parameters = flops_per_image(cfg, device)

    def peak_for(m: SpeedModes | None) -> float | None:
        if m is None or m.precision == "fp32":
            return peaks["tf32"] if m is not None and m.tf32 and "tf32" in peaks else peaks["fp32"]
        return peaks.get(m.precision)

    def row(
        loop: str,
        m: SpeedModes | None,
        per_s: float,
        flops: float,
        ref: float | None,
        setup=None,
        memory: int | None = None,
    ) -> Row:
        peak = peak_for(m)
        return Row(
            loop,
            mode_name(m) if m else "fp32",
            per_s,
            per_s / ref if ref else 1.0,
            per_s * flops,
            per_s * flops / peak if peak else None,
            peak_memory_bytes(device)[0] if memory is None else memory,
            setup,
        )

    batch = cfg.train.batch_size
    tutorial_rates: list[float] = []
    rates: dict[str, list[float]] = {mode_name(m): [] for m in modes}
    setups: dict[str, float] = {}
    memory: dict[str, int] = {}
    failed: dict[str, str] = {}  # mode -> its error: a mode that breaks here (compiling, say) is left out, not fatal

    def tried(key: str, what: str, measure: Callable[[], tuple[float, float]]) -> tuple[float, float] | None:
        """``measure()``, or None where it broke, its error recorded under ``key`` in ``failed`` and noted."""
        measured, error = attempt(measure)
        if error is not None:
            failed[key] = error
            note(f"{what} failed: {error}")
        return measured

    for r in range(rounds):
        of = f" (round {r + 1} of {rounds})" if rounds > 1 else ""
        note(f"training: the tutorial's fp32 eager step, batch {batch}{of}")
        reset_peak_memory(device)
        with pytorch_default_precision(device):  # the tutorial never sets TF32: it runs on torch's defaults
            tutorial_rates.append(bench_tutorial_training(cfg, device, warmup=warmup, steps=steps))
        memory.setdefault("tutorial", peak_memory_bytes(device)[0])
        for m in modes:
            name = mode_name(m)
            if name in failed:
                continue
            note(f"training: ddpmkit, {name}{of}")
            reset_peak_memory(device)
            measured = tried(
                name,
                f"training: ddpmkit, {name}",
                lambda: measure_training(
                    cfg,
                    m,  # noqa: B023 (called at once)
                    device,
                    warmup=warmup,
                    steps=steps,
                    max_seconds=None,
                ),
            )
            if measured is None:
                continue
            ips, setup = measured
            rates[name].append(ips)
            setups.setdefault(name, setup)  # the first round's: later ones find the compiled code cached
            memory.setdefault(name, peak_memory_bytes(device)[0])
    ref = statistics.median(tutorial_rates)
    training = [row("tutorial", None, ref, train_flops, None, memory=memory["tutorial"])]
    for m in modes:
        name = mode_name(m)
        if name in failed:
            continue
        ratios = [ips / t for ips, t in zip(rates[name], tutorial_rates)]
        training.append(
            replace(
                row("ddpmkit", m, statistics.median(rates[name]), train_flops, ref, setups[name], memory=memory[name]),
                ratio=statistics.median(ratios),
                round_ratios=ratios if rounds > 1 else None,
            )
        )

    sampling: list[Row] = []
    sample_batch = cfg.sample.batch_size
    if sample:
        note(f"sampling: the tutorial's one-image loop, {sample_steps} steps")
        reset_peak_memory(device)
        with pytorch_default_precision(device):
            ref_s = bench_tutorial_sampling(cfg, device, steps=sample_steps)
        sampling.append(row("tutorial, 1 image", None, ref_s, forward_flops, None))
        for m in modes:
            m = replace(m, fused_adam=False)
            name = mode_name(m)
            if any(r.mode == name for r in sampling[1:]) or f"{name} (sampling)" in failed:
                continue  # the optimizer does not sample
            note(f"sampling: ddpmkit {cfg.sampler.name}, batch {sample_batch}, {name}")
            reset_peak_memory(device)
            measured = tried(
                f"{name} (sampling)",
                f"sampling: ddpmkit, {name}",
                lambda: bench_ddpmkit_sampling(
                    cfg,
                    m,  # noqa: B023 (called at once)
                    device,
                    steps=sample_steps,
                    batch=sample_batch,
                ),
            )
            if measured is None:
                continue
            per_s, setup = measured
            sampling.append(
                row(f"ddpmkit {cfg.sampler.name}, batch {sample_batch}", m, per_s, forward_flops, ref_s, setup)
            )
        best = max(sampling[1:], key=lambda r: r.per_s, default=None)
        for b in sample_batches:  # the batch size is a speed choice too: larger is not always faster on a CPU
            if best is None or b == sample_batch:
                continue
            m = parse_mode(best.mode)
            note(f"sampling: ddpmkit {cfg.sampler.name}, batch {b}, {best.mode}")
            per_s, setup = bench_ddpmkit_sampling(cfg, m, device, steps=sample_steps, batch=b)
            sampling.append(row(f"ddpmkit {cfg.sampler.name}, batch {b}", m, per_s, forward_flops, ref_s, setup))

    _, memory_kind = peak_memory_bytes(device)
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu_features": sorted(cpu_flags() & CPU_FEATURES) if device.type == "cpu" else [],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "denoiser": cfg.denoiser.name,
        "parameters": parameters,
        "image_shape": list(cfg.image_shape),
        "batch_size": batch,
        "sample_batch_size": sample_batch,
        "timed_steps": steps,
        "warmup_steps": warmup,
        "rounds": rounds,
        "sample_steps": sample_steps,
        "matmul_peak_flop_per_s": peaks,
        "flops_per_image": {"train": train_flops, "forward": forward_flops},
        "memory": memory_kind,
        "training": [vars(r) for r in training],
        "ceiling": ceilings(peaks, train_flops, ref),
        "sampling": [vars(r) for r in sampling],
        "auto": auto_pick(cfg, device, training),
        "failed": failed,
    }


def auto_pick(cfg: RunConfig, device: torch.device, training: list[Row]) -> str | None:
    """Of the measured ddpmkit rows, the mode ``train.precision = channels_last = compile = "auto"`` would choose
    by the same rule as a run (:func:`ddpmkit.training.autotune.choose`): the fastest uncompiled candidate, or its
    compiled twin when :func:`~ddpmkit.training.autotune.compile_pays`; None when none of its candidates was
    measured."""
    auto = {"precision": AUTO, "channels_last": AUTO, "compile": AUTO}
    probe = cfg.model_copy(update={"train": cfg.train.model_copy(update=auto)})
    by_name = {mode_name(m): m for m in candidates(probe, device)[0]}
    rates = {r.mode: r.per_s for r in training if r.loop == "ddpmkit"}
    measured = [name for name in by_name if name in rates]
    if not measured:
        return None
    best = max(measured, key=rates.__getitem__)
    twin = mode_name(replace(by_name[best], compile=True))
    return twin if twin in rates and compile_pays(rates[best], rates[twin]) else best
