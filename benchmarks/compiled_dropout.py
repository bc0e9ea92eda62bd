"""The hashed dropout masks of compiled CPU graphs (ddpmkit.runtime.dropout) against inductor's own
(docs/benchmarks.md, "Hashed dropout masks in compiled CPU graphs").

    python benchmarks/compiled_dropout.py masks                 # one mask on 64 x 8 x 256 x 256, each way (ms)
    python benchmarks/compiled_dropout.py step [--rounds 2]     # the tutorial UNet's compiled bf16 step, interleaved
    A/B
    python benchmarks/compiled_dropout.py losses [--steps 400]  # the same dropout in training? three short runs
    python benchmarks/compiled_dropout.py weights [--rounds 3]  # attention's weights in bf16 for the product with v?

`step` and `losses` choose where the masks are hashed by swapping the UNet plugin's ``dropout`` and
``attention`` for ``F.dropout`` and ``F.scaled_dot_product_attention`` (what inductor compiles by itself).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import ddpmkit.runtime.dropout as D
import ddpmkit_plugins.unet as U

REPO = Path(__file__).resolve().parents[1]


def _plain_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    return F.dropout(x, p, training)


def _plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)


#: where the masks are hashed: the UNet's (dropout, attention)
VARIANTS = {
    "nothing": (_plain_dropout, _plain_attention),
    "the ResBlocks only": (D.dropout, _plain_attention),
    "attention only": (_plain_dropout, D.attention),
    "both (ddpmkit)": (D.dropout, D.attention),
}


def _median_ms(fn: Callable[[], object], repeat: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def masks() -> None:
    w = torch.rand(64, 8, 256, 256)  # one attention layer's weights in the tutorial UNet at batch 64
    compiled_f = torch.compile(lambda x: F.dropout(x, 0.1, training=True))
    compiled_hashed = torch.compile(lambda x: D.dropout(x, 0.1, True))
    # the seed's torch.randint as an ATen call, drawn once, instead of inlined into every vector of the mask's kernel
    compiled_hashed_aten_seed = torch.compile(lambda x: D.dropout(x, 0.1, True), options={"fallback_random": True})
    compiled_mul = torch.compile(lambda x: x * 1.1)
    for name, fn in (
        ("F.dropout, eager", lambda: F.dropout(w, 0.1, training=True)),
        ("F.dropout, compiled (inductor's Philox)", lambda: compiled_f(w)),
        ("ddpmkit dropout, compiled (hashed)", lambda: compiled_hashed(w)),
        ("ddpmkit dropout, compiled with fallback_random", lambda: compiled_hashed_aten_seed(w)),
        ("a multiply, compiled (the memory traffic alone)", lambda: compiled_mul(w)),
    ):
        print(f"{name}: {_median_ms(fn):.0f} ms", flush=True)


def step(config: Path, rounds: int, steps: int) -> None:
    from ddpmkit.benchmark.bench import parse_mode
    from ddpmkit.run.config import load_config
    from ddpmkit.training.autotune import measure_training

    cfg, modes, cpu = load_config(config), parse_mode("bf16+cl+compile"), torch.device("cpu")
    figures: dict[str, list[float]] = {name: [] for name in VARIANTS}
    ddpmkits = U.dropout, U.attention
    try:
        for r in range(rounds):
            for name, (drop, attend) in VARIANTS.items():
                U.dropout, U.attention = drop, attend
                figures[name].append(measure_training(cfg, modes, cpu, warmup=2, steps=steps)[0])
            ratios = ", ".join(f"{name} {v[-1] / figures['nothing'][-1]:.2f}x" for name, v in figures.items())
            print(
                f"round {r + 1}: masks hashed in {ratios} (nothing: {figures['nothing'][-1]:.1f} images/s)", flush=True
            )
    finally:
        U.dropout, U.attention = ddpmkits


def _attention_bf16_weights(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """ddpmkit's compiled attention with the dropped-out weights cast to v's dtype for the product with v (softmax
    still in fp32 from fp32 scores), as flash attention does on a GPU: half the weights' memory traffic in bf16."""
    if dropout_p == 0.0 or not D._hashed_here(q):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    with torch.autocast(q.device.type, enabled=False):
        weights = torch.softmax((q.float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5, dim=-1)
        return D.hashed_dropout(weights, dropout_p).to(v.dtype) @ v


def weights(config: Path, rounds: int, steps: int) -> None:
    """The error of each way against fp64 (bf16 q, k, v of the tutorial's head sizes, no dropout), then the
    compiled bf16 + channels-last step with each, interleaved."""
    torch.manual_seed(0)
    for head_dim in (16, 48):  # the tutorial UNet's attention layers: 128 and 384 channels over 8 heads
        for std in (1.0, 3.0):  # the scale of q and k: logits grow with it
            q, k = ((torch.randn(4, 8, 256, head_dim) * std).bfloat16() for _ in range(2))
            v, grad = torch.randn(4, 8, 256, head_dim).bfloat16(), torch.randn(4, 8, 256, head_dim)
            ways = {
                "fp64": lambda q, k, v: _softmax_product(q.double(), k.double(), v.double()),
                "fp32 weights (ddpmkit)": lambda q, k, v: _softmax_product(q.float(), k.float(), v.float()).bfloat16(),
                "bf16 weights": lambda q, k, v: _softmax_product(q.float(), k.float(), v),
                "bf16 scores and weights": lambda q, k, v: _softmax_product(q, k, v, upcast_scores=True),
            }
            results = {}
            for name, way in ways.items():
                leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
                out = way(*leaves)
                out.float().backward(grad)
                results[name] = [out.double()] + [t.grad.double() for t in leaves]
            for name in list(ways)[1:]:
                errors = [((a - b).norm() / b.norm()).item() for a, b in zip(results[name], results["fp64"])]
                print(
                    f"head size {head_dim}, q and k of std {std}, {name}: relative error of the output "
                    f"{errors[0]:.1e}, of dq {errors[1]:.1e}, dk {errors[2]:.1e}, dv {errors[3]:.1e}",
                    flush=True,
                )

    from ddpmkit.benchmark.bench import parse_mode
    from ddpmkit.run.config import load_config
    from ddpmkit.training.autotune import measure_training

    cfg, modes, cpu = load_config(config), parse_mode("bf16+cl+compile"), torch.device("cpu")
    variants = {"fp32 weights (ddpmkit)": D.attention, "bf16 weights": _attention_bf16_weights}
    figures: dict[str, list[float]] = {name: [] for name in variants}
    shipped = U.attention
    try:
        for r in range(rounds):
            for name, attend in variants.items():
                U.attention = attend
                figures[name].append(measure_training(cfg, modes, cpu, warmup=2, steps=steps, max_seconds=None)[0])
            base = figures["fp32 weights (ddpmkit)"][-1]
            print(
                f"round {r + 1}: fp32 weights {base:.2f} images/s, bf16 weights "
                f"{figures['bf16 weights'][-1] / base:.3f}x",
                flush=True,
            )
    finally:
        U.attention = shipped


def _softmax_product(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, upcast_scores: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v in q's dtype (or the scores taken to fp32 with ``upcast_scores``), the weights
    cast to v's dtype for the product."""
    scores = q @ k.transpose(-2, -1)
    if upcast_scores:
        scores = scores.float()
    weights = torch.softmax(scores * q.shape[-1] ** -0.5, dim=-1)
    return weights.to(v.dtype) @ v


def losses(config: Path, steps: int, data_root: str | None) -> None:
    from ddpmkit.run.config import load_config
    from ddpmkit.training.runner import run_config

    runs = {
        "dropout 0.1, eager (F.dropout)": (0.1, False),
        "dropout 0.1, compiled (hashed)": (0.1, True),
        "dropout 0, compiled": (0.0, True),
    }
    with tempfile.TemporaryDirectory(prefix="ddpmkit-dropout-") as tmp:
        for i, (name, (p, compiled)) in enumerate(runs.items()):
            cfg = load_config(
                config,
                [
                    f"run.dir={json.dumps(tmp)}",
                    f'run.name="r{i}"',
                    "denoiser.options.attentions=[false, true, false, false]",
                    f"denoiser.options.dropout={p}",
                    "guidance.weight=1.0",
                    'train.precision="bf16"',
                    "train.channels_last=true",
                    f"train.compile={str(compiled).lower()}",
                    f"train.max_steps={steps}",
                    "sample.num_images=16",
                    "sample.trajectory_images=0",
                    *([f"data.root={json.dumps(data_root)}"] if data_root else []),
                ],
            )
            cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"time_budget": None})})
            run_config(cfg)
            rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
            rows = [row for row in rows if "loss" in row]
            late = rows[len(rows) // 2 :]
            trace = [row["loss"] for row in late]
            print(
                f"{name}: mean loss over steps {late[0]['step']}-{late[-1]['step']} {statistics.fmean(trace):.5f} "
                f"(standard error {statistics.stdev(trace) / len(trace) ** 0.5:.5f}), "
                f"{statistics.median(row['images_per_s'] for row in late):.1f} images/s",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["masks", "step", "losses", "weights"])
    parser.add_argument(
        "--config", type=Path, help="default: configs/mnist.toml (step), configs/mnist-cpu.toml (losses)"
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, help="default: 5 timed steps (step, weights), 400 steps (losses)")
    parser.add_argument("--data-root", default=os.environ.get("DDPMKIT_DATA_ROOT"))
    args = parser.parse_args()
    if args.what == "masks":
        masks()
    elif args.what == "step":
        step(args.config or REPO / "configs" / "mnist.toml", args.rounds, args.steps or 5)
    elif args.what == "weights":
        weights(args.config or REPO / "configs" / "mnist.toml", args.rounds, args.steps or 5)
    else:
        losses(args.config or REPO / "configs" / "mnist-cpu.toml", args.steps or 400, args.data_root)


if __name__ == "__main__":
    main()
