"""Training and sampling throughput of UNet variants, measured side by side in one process.

    python benchmarks/throughput.py [--variants w32-4,...] [--modes fp32,bf16,bf16-cl] [--size 32]
                                    [--batch 64] [--steps 6] [--threads N] [--device cpu|cuda]

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
    "tutorial": dict(
        channels=[64, 128, 256, 512, 512, 384],
        attentions=[False, True, False, False, False, True],
        upscales=[False, False, False, True, True, True],
        num_groups=32,
        num_heads=8,
    ),
    "w32-4": dict(
        channels=[32, 64, 128, 128],
        attentions=[False, False, False, False],
        upscales=[False, False, True, True],
        num_groups=8,
        num_heads=4,
        dropout=0.0,
    ),
    "w32-6": dict(
        channels=[32, 64, 128, 256, 256, 192],
        attentions=[False, False, False, False, False, False],
        upscales=[False, False, False, True, True, True],
        num_groups=8,
        num_heads=4,
        dropout=0.0,
    ),
    "w16-6-att": dict(
        channels=[16, 32, 64, 128, 128, 96],
        attentions=[False, True, False, False, False, True],
        upscales=[False, False, False, True, True, True],
        num_groups=8,
        num_heads=4,
        dropout=0.0,
    ),
    "w24-4": dict(
        channels=[24, 48, 96, 96],
        attentions=[False, False, False, False],
        upscales=[False, False, True, True],
        num_groups=8,
        num_heads=4,
        dropout=0.0,
    ),
}


def bench(
    name: str,
    opts: dict,
    precision: str,
    channels_last: bool,
    steps: int,
    batch: int,
    size: int = 32,
    device: str = "cpu",
) -> tuple[float, float, int]:
    torch.manual_seed(0)
    dev = torch.device(device)
    model = ddpmkit.create_denoiser("unet", image_shape=(1, size, size), num_timesteps=1000, **opts).to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    schedule = ddpmkit.create_schedule("linear").to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x0 = torch.rand(batch, 1, size, size, device=dev) * 2 - 1
    ac = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def step():
        t = torch.randint(0, 1000, (batch,), device=dev)
        with ac:
            loss = training_loss(model, schedule, x0, t, torch.randn_like(x0))
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    train_ips = steps * batch / (time.perf_counter() - start)
    model.eval()
    t0 = torch.zeros(batch, dtype=torch.long, device=dev)
    with torch.no_grad(), ac:
        model(x0, t0)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            model(x0, t0)
        sync()
    fwd_ips = steps * batch / (time.perf_counter() - start)
    return train_ips, fwd_ips, sum(p.numel() for p in model.parameters())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--size", type=int, default=32, help="image side")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--modes", default="fp32,bf16,bf16-cl", help="fp32, bf16 and/or bf16-cl (channels-last)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(
        f"torch {torch.__version__}, {a.device}, {torch.get_num_threads()} threads, batch {a.batch}, {a.size}x{a.size}"
    )
    print(f"{'variant':<12}{'params':>10} {'precision':<6}{'layout':<14}{'train img/s':>12}{'fwd img/s':>11}")
    for name in a.variants.split(","):
        for mode in a.modes.split(","):
            precision, cl = mode.removesuffix("-cl"), mode.endswith("-cl")
            tr, fw, n = bench(name, VARIANTS[name], precision, cl, a.steps, a.batch, a.size, a.device)
            layout = "channels_last" if cl else "contiguous"
            print(f"{name:<12}{n:>10,} {precision:<6}{layout:<14}{tr:>12.1f}{fw:>11.1f}", flush=True)


if __name__ == "__main__":
    main()
