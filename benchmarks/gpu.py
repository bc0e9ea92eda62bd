"""The GPU measurements for docs/benchmarks.md, in one go on a CUDA machine:

    python benchmarks/gpu.py [--out gpu-bench] [--data-root DIR] [--skip-run]

1. ``ddpmkit bench configs/mnist.toml --device cuda``: the tutorial's fp32 loops beside ddpmkit in
   every CUDA speed mode (fp32, TF32, bf16/fp16 + channels-last + fused Adam, compiled), with
   FLOP/s against the measured matmul peak of each dtype and the allocator's peak memory;
2. ``ddpmkit run configs/mnist.toml`` end to end on the GPU in the fastest mode the bench found
   (unless --skip-run), timed from start to the last file written.

Everything lands in OUT (bench.json, run.log, summary.json) for the benchmarks page.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
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


def extrapolate(runs: Path, max_steps: int | None) -> dict:
    """The run's steady-state training rate from its metrics.jsonl and, for a shortened run, the
    training time of the whole config at that rate."""
    metrics = sorted(runs.glob("*/metrics.jsonl"))
    if not metrics:
        return {}
    records = [json.loads(line) for line in metrics[0].read_text().splitlines() if line.strip()]
    steps = [r for r in records if "images_per_s" in r]
    if not steps:
        return {}
    rate = steps[-1]["images_per_s"]
    out = {"steady_images_per_s": rate, "trained_steps": steps[-1].get("step")}
    if max_steps:
        epochs = json.loads((metrics[0].parent / "config.json").read_text())["train"]["epochs"]
        total_images = epochs * 60_000  # MNIST's training set
        out["full_training_s_estimate"] = total_images / rate
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("gpu-bench"))
    p.add_argument("--config", type=Path, default=REPO / "configs" / "mnist.toml")
    p.add_argument("--data-root", default=None)
    p.add_argument("--steps", default="20")
    p.add_argument("--skip-run", action="store_true", help="only the bench, not the end-to-end run")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop the end-to-end run's training after this many steps (a short lease); "
                        "the summary then extrapolates the full run from its steady-state rate")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)

    import torch

    if not torch.cuda.is_available():
        sys.exit("no CUDA device here: this script measures a GPU (use `ddpmkit bench` on a CPU)")
    bench_json = a.out / "bench.json"
    ddpmkit("bench", str(a.config), "--device", "cuda", "--steps", a.steps, "--sample-steps", a.steps,
            "--out", str(bench_json))
    bench = json.loads(bench_json.read_text())
    fastest = max(bench["training"][1:], key=lambda row: row["per_s"])
    summary = {"device": bench["device_name"], "bench": str(bench_json), "fastest_training_mode": fastest["mode"],
               "fastest_training_ratio": fastest["ratio"]}
    if not a.skip_run:
        from ddpmkit.benchmark.bench import parse_mode

        sets = parse_mode(fastest["mode"]).overrides() + [f"run.dir={a.out / 'runs'}"]
        args = ["run", str(a.config), "--device", "cuda", "--fresh"] + [x for s in sets for x in ("--set", s)]
        if a.max_steps:
            args += ["--set", f"train.max_steps={a.max_steps}"]
        if a.data_root:
            args += ["--data-root", a.data_root]
        summary["end_to_end_s"] = ddpmkit(*args, log=a.out / "run.log")
        summary["end_to_end_mode"] = fastest["mode"]
        summary.update(extrapolate(a.out / "runs", a.max_steps))
    (a.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
