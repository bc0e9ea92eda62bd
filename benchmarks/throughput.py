"""Training and sampling throughput of UNet variants, measured side by side in one process.

    python benchmarks/throughput.py [--steps 6] [--batch 64] [--threads N]

Prints images/s for each (variant, precision, memory format); compare ratios, not absolute
numbers, on a shared machine.
"""

from __future__ import annotations

import argparse
import time

import torch

import ddpmkit
from ddpmkit.diffusion import training_loss

VARIANTS = {
    "tutorial": dict(channels=[64, 128, 256, 512, 512, 384], attentions=[False, True, False, False, False, True],
                     upscales=[False, False, False, True, True, True], num_groups=32, num_heads=8),
    "w32-4": dict(channels=[32, 64, 128, 128], attentions=[False, False, False, False],
                  upscales=[False, False, True, True], num_groups=8, num_heads=4, dropout=0.0),
    "w32-6": dict(channels=[32, 64, 128, 256, 256, 192], attentions=[False, False, False, False, False, False],
                  upscales=[False, False, False, True, True, True], num_groups=8, num_heads=4, dropout=0.0),
    "w16-6-att": dict(channels=[16, 32, 64, 128, 128, 96], attentions=[False, True, False, False, False, True],
                      upscales=[False, False, False, True, True, True], num_groups=8, num_heads=4, dropout=0.0),
    "w24-4": dict(channels=[24, 48, 96, 96], attentions=[False, False, False, False],
                  upscales=[False, False, True, True], num_groups=8, num_heads=4, dropout=0.0),
}


def bench(name: str, opts: dict, precision: str, channels_last: bool, steps: int, batch: int) -> tuple[float, float, int]:
    torch.manual_seed(0)
    model = ddpmkit.create_denoiser("unet", image_shape=(1, 32, 32), num_timesteps=1000, **opts)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    schedule = ddpmkit.create_schedule("linear")
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x0 = torch.rand(batch, 1, 32, 32) * 2 - 1
    ac = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def step():
        t = torch.randint(0, 1000, (batch,))
        with ac:
            loss = training_loss(model, schedule, x0, t, torch.randn_like(x0))
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    train_ips = steps * batch / (time.perf_counter() - start)
    model.eval()
    with torch.no_grad(), ac:
        model(x0, torch.zeros(batch, dtype=torch.long))
        start = time.perf_counter()
        for _ in range(steps):
            model(x0, torch.zeros(batch, dtype=torch.long))
    fwd_ips = steps * batch / (time.perf_counter() - start)
    return train_ips, fwd_ips, sum(p.numel() for p in model.parameters())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {a.batch}")
    print(f"{'variant':<12}{'params':>10} {'precision':<6}{'layout':<14}{'train img/s':>12}{'fwd img/s':>11}")
    for name in a.variants.split(","):
        for precision, cl in (("fp32", False), ("bf16", False), ("bf16", True)):
            tr, fw, n = bench(name, VARIANTS[name], precision, cl, a.steps, a.batch)
            layout = "channels_last" if cl else "contiguous"
            print(f"{name:<12}{n:>10,} {precision:<6}{layout:<14}{tr:>12.1f}{fw:>11.1f}", flush=True)


if __name__ == "__main__":
    main()
