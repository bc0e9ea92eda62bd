"""What post-hoc EMA costs a training run: one update of the tracked profiles (every step) and one snapshot
(every ``train.posthoc_ema.every`` steps), on a trained run's network.

    python benchmarks/posthoc_ema_cost.py runs/mnist-cpu-posthoc
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from ddpmkit.run.checkpoint import save_snapshot
from ddpmkit.sampling.loaded import load_run
from ddpmkit.training.posthoc_ema import TrackedEmas


def main(run: str, repeats: int = 20) -> None:
    model = load_run(run).denoiser
    tracked = TrackedEmas(model, [0.05, 0.10])
    for step in range(1, 4):  # warm-up
        tracked.update(model, step)
    started = time.perf_counter()
    for step in range(4, 4 + repeats):
        tracked.update(model, step)
    update = (time.perf_counter() - started) / repeats
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        save_snapshot(Path(folder), 50, {s: tracked.weights(model, s) for s in tracked.sigma_rels}, tracked.gammas)
        snapshot = time.perf_counter() - started
    print(
        f"{model.num_parameters():,} parameters, 2 profiles: update {update * 1000:.2f} ms per step, "
        f"snapshot {snapshot * 1000:.0f} ms"
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/mnist-cpu-posthoc")
