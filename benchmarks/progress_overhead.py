"""A/B rounds: ddpmkit's training loop alone and with the run's rich progress bar refreshing beside it
(docs/benchmarks.md, the time budget's plan against the loop).

    python benchmarks/progress_overhead.py [CONFIG] [--rounds 3] [--steps 40] [--precision bf16]
"""

from __future__ import annotations

import argparse

import torch
from rich.console import Console

from ddpmkit.commands.progress import training_progress
from ddpmkit.run.config import load_config
from ddpmkit.runtime.speed import SpeedModes
from ddpmkit.training.autotune import measure_training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/mnist-cpu.toml")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--precision", default="bf16")
    args = parser.parse_args()
    cfg = load_config(args.config)
    modes = SpeedModes(args.precision, channels_last=False, compile=False, fused_adam=False, tf32=False)
    device = torch.device("cpu")
    terminal = Console(file=open("/dev/null", "w"), force_terminal=True, width=120)  # renders, as in a terminal
    for i in range(args.rounds):
        alone = measure_training(cfg, modes, device, steps=args.steps, mean=True)[0]
        with training_progress(terminal, 100, 0):
            barred = measure_training(cfg, modes, device, steps=args.steps, mean=True)[0]
        print(
            f"round {i}: loop alone {alone:.1f} images/s, with the bar {barred:.1f}: {barred / alone:.3f}x", flush=True
        )


if __name__ == "__main__":
    main()
