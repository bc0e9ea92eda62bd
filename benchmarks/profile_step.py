"""Where a training step of ddpmkit's own loop spends its time: a torch.profiler table.

    python benchmarks/profile_step.py [CONFIG] [--mode bf16+cl+compile] [--device cpu] [--steps 3] [--set K=V ...]
    python benchmarks/profile_step.py --kernels   # a row for each of the compiled graphs' CPU kernels
    python benchmarks/profile_step.py --hooks   # the per-step cost of the run's event hooks alone

The model is built and (in a compiled mode) compiled by an untimed first call, so the table shows
steady-state steps; on CUDA a second table sorts by GPU time. docs/benchmarks.md quotes its output.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def profile_steps(
    config: Path, mode: str, device: str, steps: int, overrides: list[str], kernels: bool = False
) -> None:
    import torch
    import torch._inductor.config

    # each generated C++ kernel as its own profiler record (else they all sit in "## Call CompiledFxGraph")
    torch._inductor.config.cpp.enable_kernel_profile = kernels
    from torch.profiler import ProfilerActivity, profile

    from ddpmkit.benchmark.bench import parse_mode
    from ddpmkit.run.config import load_config
    from ddpmkit.training.autotune import measure_training

    cfg = load_config(config, overrides)
    dev, modes = torch.device(device), parse_mode(mode)
    measure_training(cfg, modes, dev, warmup=2, steps=1)  # builds, compiles, warms the kernels
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        images_per_s, _ = measure_training(cfg, modes, dev, warmup=1, steps=steps)
    print(f"{mode} on {dev}: {images_per_s:.1f} images/s while profiled")
    table = prof.key_averages()
    print(table.table(sort_by="self_cpu_time_total", row_limit=30 if kernels else 20, max_name_column_width=70))
    if dev.type == "cuda":
        print(table.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60))


def time_hooks(steps: int = 3000) -> None:
    """Microseconds per step of `step_end` through the installed event plugins (metrics.jsonl, TensorBoard)."""
    sys.path.insert(0, str(REPO / "tests"))
    from runconfigs import write_config

    from ddpmkit.run.config import load_config
    from ddpmkit.run.events import EventDispatcher, RunInfo

    cfg = load_config(write_config(Path(tempfile.mkdtemp()), "hooks"))
    cfg.run_dir.mkdir(parents=True)
    events = EventDispatcher(RunInfo(cfg.run_dir, cfg, "cpu", 0, steps))
    events.emit("train_start")
    metrics = {
        "step": 0,
        "epoch": 0,
        "loss": 0.1,
        "lr": 1e-3,
        "images_per_s": 100.0,
        "time": time.time(),
        "elapsed_s": 1.0,
        "grad_norm": 0.5,
        "skipped": 0,
    }
    start = time.perf_counter()
    for step in range(1, steps + 1):
        events.emit("step_end", step=step, metrics={**metrics, "step": step})
    per_step = (time.perf_counter() - start) / steps
    events.emit("train_end", step=steps, interrupted=False)
    print(f"step_end through the event plugins: {per_step * 1e6:.0f} us per step")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", type=Path, default=REPO / "configs" / "mnist.toml")
    p.add_argument("--mode", default="bf16+cl+compile")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--kernels", action="store_true", help="a row per compiled CPU kernel (inductor's kernel profile)")
    p.add_argument("--hooks", action="store_true", help="time the event hooks instead")
    a = p.parse_args()
    if a.hooks:
        time_hooks()
    else:
        profile_steps(a.config, a.mode, a.device, a.steps, a.overrides, a.kernels)


if __name__ == "__main__":
    main()
