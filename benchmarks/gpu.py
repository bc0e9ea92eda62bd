"""The GPU measurements for docs/benchmarks.md on a CUDA machine, in one go or stage by stage:

    python benchmarks/gpu.py [--out gpu-bench] [--data-root DIR] [--stages bench,profile,run] [--max-steps N]
                             [--modes M,...] [--run-mode MODE]

1. ``ddpmkit bench configs/mnist.toml --device cuda``: the tutorial's fp32 loops beside ddpmkit in the
   CUDA speed modes of ``--modes`` (by default, all with fused Adam as a run on CUDA has it: fp32 + TF32, bf16 +
   channels-last, compiled, and compiled in CUDA graphs: ``graphs``), with FLOP/s against the measured matmul peak of
   each dtype and peak memory;
2. ``benchmarks/profile_step.py`` on the fastest mode and on its uncompiled twin (profile-*.txt): the kernel
   launches, copies and synchronisations of a step, which say what bounds it;
3. ``ddpmkit run configs/mnist.toml`` end to end on the GPU as written (its ``auto`` modes measured and chosen
   by the run, CUDA graphs among them), or in ``--run-mode`` (``fastest``: the bench's), timed from start to the
   last file written; by default stopped after 7,028 steps, 10 % of the
   recipe's 70,275, and the whole recipe's training time extrapolated from the loop's steady rate. The summary
   sets the loop's rate beside the bare step's (the bench's, same mode: ``loop_over_bare_step``, and the share of
   the measured matmul peak, ``run_utilisation``) and its median step beside its mean, so that stalls
   (checkpoints) and per-step costs (metrics, progress, host syncs) show apart.

Everything lands in OUT (bench.json, profile-*.txt, run.log, summary.json) for the benchmarks page. Each stage
compiles (about a minute per compiled mode on an H100), so on a lease with a 10-minute limit per command run
``--stages run`` first (the figure the recipe is judged by) and then ``--stages bench,profile`` with the same OUT:
the run is set beside the bench in whichever order they come.

Before a lease, rehearse every stage on a CPU in about a minute (a small config; its own run samples too):

    python benchmarks/gpu.py --device cpu --config configs/smoke.toml --out /tmp/rehearse --steps 3 --no-sample \
        --max-steps 40
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def ddpmkit(*args: str, log: Path | None = None) -> float:
    """Run the CLI (its output to ``log`` when given); returns its wall time in seconds (exits if it fails)."""
    start = time.perf_counter()
    command = [sys.executable, "-m", "ddpmkit", *args]
    if log is None:
        code = subprocess.call(command)
    else:
        with open(log, "w") as out:
            code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT)
    if code:
        sys.exit(f"ddpmkit {' '.join(args)} failed with exit code {code}" + (f" (see {log})" if log else ""))
    return time.perf_counter() - start


#: the bench's modes by default: what can be fastest at the tutorial's batch 64, where launches bound the step
MODES = (
    "fp32+fused+tf32,bf16+cl+fused,bf16+cl+fused+compile,bf16+cl+fused+compile+graphs,"
    "fp32+fused+compile+graphs+tf32"
)  # with fused Adam, as a run on CUDA trains by default
#: configs/mnist.toml's 75 epochs of MNIST's 60,000 images at batch 64 (the last partial batch dropped)
RECIPE_STEPS = 75 * (60_000 // 64)


def loop_figures(runs: Path, max_steps: int | None) -> dict:
    """The run's steady-state training rate from its metrics.jsonl (the mean after the warm-up, stalls included)
    and its median step's; for a shortened run, the training time of the whole config at the steady rate."""
    metrics = sorted(runs.glob("*/metrics.jsonl"))
    if not metrics:
        return {}
    records = [json.loads(line) for line in metrics[0].read_text().splitlines() if line.strip()]
    steps = [r for r in records if "images_per_s" in r]
    if not steps:
        return {}
    rate = steps[-1]["images_per_s"]
    out = {"steady_images_per_s": rate, "trained_steps": steps[-1].get("step")}
    times = [r["time"] for r in steps[10:] if "time" in r]
    if len(times) > 2:
        gaps = sorted(b - a for a, b in zip(times, times[1:]))
        batch = json.loads((metrics[0].parent / "config.json").read_text())["train"]["batch_size"]
        out["median_step_images_per_s"] = batch / gaps[len(gaps) // 2]
        out["slowest_steps_s"] = [round(g, 4) for g in gaps[-5:]]
    if max_steps:
        out["full_training_s_estimate"] = RECIPE_STEPS * 64 / rate
    return out


def trained_mode(runs: Path, device: str) -> str:
    """The bench's name of the modes the run trained in (its config.json holds them resolved)."""
    from types import SimpleNamespace

    import torch

    from ddpmkit.benchmark.bench import mode_name
    from ddpmkit.runtime.speed import SpeedModes

    train = json.loads(next(runs.glob("*/config.json")).read_text())["train"]
    return mode_name(SpeedModes.for_run(SimpleNamespace(**train), torch.device(device)))


def same_step(a, b) -> bool:
    """Whether two SpeedModes train the same step (TF32 only matters to fp32)."""

    def step(m):
        return replace(m, tf32=m.tf32 and m.precision == "fp32")

    return step(a) == step(b)


def beside_bench(bench: dict, trained, rate: float) -> dict:
    """The run's steady rate against the bench's bare step of the same mode (``loop_over_bare_step``), and as a share
    of the measured matmul peak that the bench holds that step to (``run_utilisation``)."""
    from ddpmkit.benchmark.bench import parse_mode

    bare = [row for row in bench["training"][1:] if same_step(parse_mode(row["mode"]), trained)]
    if not bare:
        return {}
    over = rate / bare[0]["per_s"]
    return {
        "loop_over_bare_step": over,
        **({"run_utilisation": bare[0]["utilisation"] * over} if bare[0].get("utilisation") else {}),
    }


def profile(config: Path, mode: str, device: str, out: Path, steps: int = 5) -> None:
    """profile_step.py's tables for ``config``'s model in ``mode`` on ``device``, into ``out``."""
    with open(out, "w") as log:
        code = subprocess.call(
            [
                sys.executable,
                str(REPO / "benchmarks" / "profile_step.py"),
                str(config),
                "--device",
                device,
                "--mode",
                mode,
                "--steps",
                str(steps),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    if code:
        print(f"profile of {mode} failed with exit code {code} (see {out}); going on", file=sys.stderr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("gpu-bench"))
    p.add_argument("--config", type=Path, default=REPO / "configs" / "mnist.toml")
    p.add_argument("--data-root", default=None)
    p.add_argument(
        "--device", default="cuda", help="cuda; cpu only to rehearse every stage before a lease (with a small --config)"
    )
    p.add_argument("--steps", default="20")
    p.add_argument("--modes", default=MODES, help=f"the bench's modes (default {MODES})")
    p.add_argument("--no-sample", action="store_true", help="the bench measures training only (a lease's minute)")
    p.add_argument("--stages", default="bench,profile,run", help="which of bench, profile, run (default all three)")
    p.add_argument(
        "--run-mode",
        default=None,
        help="the end-to-end run's mode (default: the config's own, auto measured by the run; "
        "'fastest': the bench's fastest); also the profiled mode (default: the bench's fastest)",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=RECIPE_STEPS // 10 + 1,
        help="stop the end-to-end run's training after this many steps (default: 10 %% of the recipe; "
        "0: the whole recipe); the summary extrapolates the full run from its steady-state rate",
    )
    a = p.parse_args()
    stages = set(a.stages.split(","))
    if stages - {"bench", "profile", "run"}:
        sys.exit(f"--stages {a.stages}: expected some of bench, profile, run")
    a.out.mkdir(parents=True, exist_ok=True)
    bench_json, summary_json = a.out / "bench.json", a.out / "summary.json"
    summary = json.loads(summary_json.read_text()) if summary_json.exists() else {}
    needs_fastest = a.run_mode == "fastest" or (a.run_mode is None and "profile" in stages)
    if needs_fastest and "bench" not in stages and "fastest_training_mode" not in summary:
        sys.exit(f"no bench in {a.out} to take the fastest mode from: run the bench stage first, or give --run-mode")

    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here: this script measures a GPU (use `ddpmkit bench` on a CPU)")
    from ddpmkit.benchmark.bench import mode_name, parse_mode

    started = time.perf_counter()
    if "bench" in stages:
        sampling = ["--no-sample"] if a.no_sample else ["--sample-steps", a.steps]
        ddpmkit(
            "bench",
            str(a.config),
            "--device",
            a.device,
            "--steps",
            a.steps,
            *sampling,
            "--modes",
            a.modes,
            "--out",
            str(bench_json),
        )
    rows = {}
    if bench_json.exists():
        bench = json.loads(bench_json.read_text())
        rows = {row["mode"]: row for row in bench["training"][1:]}
        fastest = max(rows.values(), key=lambda row: row["per_s"])
        summary.update(
            device=bench["device_name"],
            bench=str(bench_json),
            fastest_training_mode=fastest["mode"],
            fastest_training_ratio=fastest["ratio"],
            fastest_training_images_per_s=fastest["per_s"],
        )
    fastest_mode = summary.get("fastest_training_mode")
    if "profile" in stages:
        modes = parse_mode(fastest_mode if a.run_mode in (None, "fastest") else a.run_mode)
        for m in dict.fromkeys([modes, replace(modes, compile=False, cuda_graphs=False)]):
            profile(a.config, mode_name(m), a.device, a.out / f"profile-{mode_name(m)}.txt")
    if "run" in stages:
        forced = fastest_mode if a.run_mode == "fastest" else a.run_mode  # None: the config as written
        sets = (parse_mode(forced).overrides() if forced else []) + [f"run.dir={a.out / 'runs'}"]
        args = ["run", str(a.config), "--device", a.device, "--fresh"] + [x for s in sets for x in ("--set", s)]
        if a.max_steps:
            args += ["--set", f"train.max_steps={a.max_steps}"]
        if a.data_root:
            args += ["--data-root", a.data_root]
        summary["end_to_end_s"] = ddpmkit(*args, log=a.out / "run.log")
        summary["trained_mode"] = trained = trained_mode(a.out / "runs", a.device)
        summary["end_to_end_mode"] = trained + ("" if forced else " (the config as written)")
        summary.update(loop_figures(a.out / "runs", a.max_steps))
    if bench_json.exists() and {"trained_mode", "steady_images_per_s"} <= summary.keys():  # in either order
        summary.update(
            beside_bench(
                json.loads(bench_json.read_text()), parse_mode(summary["trained_mode"]), summary["steady_images_per_s"]
            )
        )
    summary[f"{a.stages}_s"] = time.perf_counter() - started
    summary_json.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
