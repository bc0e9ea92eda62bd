"""Speed modes (precision, channels-last, compile, fused Adam) agree with fp32; the ETA is steady-state; `ddpmkit
bench`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from runconfigs import REPO, invoke, write_config
from safetensors.torch import load_file

import ddpmkit
import ddpmkit.training.loop as train_module
from ddpmkit.benchmark.bench import mode_name, parse_mode
from ddpmkit.run.components import build_components
from ddpmkit.run.config import load_config
from ddpmkit.runtime.speed import SpeedModes
from ddpmkit.sampling.draw import generate
from ddpmkit.training.runner import run_config

pytestmark = pytest.mark.usefixtures("one_thread")

#: mode -> largest relative difference allowed between its per-step losses and fp32's over 12 steps.
#: fp32 modes reorder float sums only; bf16 keeps 8 bits of mantissa (2^-8 = 0.4 % per rounding).
#: One compiled mode (a fresh machine compiles each for 1-3 minutes on 2 cores, and the inductor cache of a fresh
#: CI machine is empty): fp32 + channels-last, whose tolerance is tight and which is what auto takes where bf16 is
#: emulated; bf16 against fp32 is tested eagerly, and the resume test below compiles the same graph.
TRAIN_TOLERANCE = {
    "fp32+cl": 1e-3,
    "fp32+fused": 1e-3,
    "fp32+cl+compile": 1e-3,
    "bf16": 0.05,
    "bf16+cl": 0.05,
    "fp16": 0.01,
}
#: mode -> largest mean absolute pixel difference (images in [-1, 1]) from fp32 sampling, same seed.
SAMPLE_TOLERANCE = {"fp32+cl": 1e-4, "fp32+cl+compile": 1e-4, "bf16": 0.03, "bf16+cl": 0.03, "fp16": 0.01}


def _train(tmp_path: Path, name: str, *sets: str, epochs: int = 3) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg_path = write_config(
        tmp_path,
        name,
        epochs=epochs,
        checkpoint_every=2,
        num_images=0,
        trajectory_images=0,
        dropout=0.0,
        num_samples=32,
    )
    cfg = load_config(cfg_path, list(sets))
    assert run_config(cfg) == 0
    return cfg.run_dir


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _sets(mode: str) -> list[str]:
    return parse_mode(mode).overrides()


@pytest.fixture(scope="module")
def fp32_losses(tmp_path_factory) -> list[float]:
    return _losses(_train(tmp_path_factory.mktemp("fp32"), "fp32"))


@pytest.mark.parametrize("mode", list(TRAIN_TOLERANCE))
def test_each_training_mode_follows_fp32(mode, tmp_path, fp32_losses):
    losses = _losses(_train(tmp_path, "m", *_sets(mode)))
    assert len(losses) == len(fp32_losses) == 12
    worst = max(abs(a - b) / b for a, b in zip(losses, fp32_losses))
    assert worst <= TRAIN_TOLERANCE[mode], f"{mode}: losses differ from fp32 by up to {worst:.2%}"
    assert losses != fp32_losses or mode.startswith("fp32"), "the mode changed nothing"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = _train(tmp_path_factory.mktemp("w"), "w")
    cfg = load_config(write_config(run_dir.parent.parent, "w", dropout=0.0, num_samples=32))
    built = build_components(cfg)
    ckpt = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    built.denoiser.load_state_dict(load_file(ckpt / "ema.safetensors"))
    return cfg, built


def _sample(cfg, built, modes: SpeedModes) -> torch.Tensor:
    images, _ = generate(
        built.denoiser, built.schedule, built.sampler, 8, batch_size=8, seed=3, image_shape=cfg.image_shape, modes=modes
    )
    return images


@pytest.mark.parametrize("mode", list(SAMPLE_TOLERANCE))
def test_each_sampling_mode_follows_fp32(mode, trained):
    cfg, built = trained
    reference = _sample(cfg, built, SpeedModes())
    images = _sample(cfg, built, parse_mode(mode))
    diff = float((images - reference).abs().mean())
    assert diff <= SAMPLE_TOLERANCE[mode], f"{mode}: mean |difference| {diff:.4g}"


@pytest.mark.parametrize("mode", ["fp16", "fp32+cl+compile"])
def test_resume_is_bit_exact_in_each_mode(mode, tmp_path):
    """fp16 carries its loss scale in the checkpoint; compiled kernels are the same in every process. (Dropout 0, so
    that the compiled graph is the one test_each_training_mode_follows_fp32 compiled; a compiled graph's dropout masks
    follow the global RNG's state, which each step seeds: tests/test_dropout.py.)"""
    whole = _train(tmp_path / "a", "r", *_sets(mode), epochs=4)
    part = tmp_path / "b"
    _train(part, "r", *_sets(mode), epochs=2)
    resumed = _train(part, "r", *_sets(mode), epochs=4)
    state = json.loads((resumed / "checkpoints" / "step-00000016" / "state.json").read_text())
    if mode == "fp16":
        assert state["grad_scaler"]["scale"] > 0
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(whole / "checkpoints" / "step-00000016" / name)
        b = load_file(resumed / "checkpoints" / "step-00000016" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert _losses(whole) == _losses(resumed)


def test_the_eta_is_measured_after_the_warm_up(tmp_path, monkeypatch):
    """First steps that are slow (set-up) must not enter the throughput the ETA is computed from."""
    import time

    real = train_module.training_loss
    calls = {"n": 0}

    def slow_start(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= 2:
            time.sleep(3.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "training_loss", slow_start)
    measured = []
    cfg = load_config(write_config(tmp_path, "eta", epochs=8, num_images=0, trajectory_images=0, dropout=0.0))
    from ddpmkit.run.data import load_dataset

    built = build_components(cfg)
    train_module.train(
        cfg,
        model=built.denoiser,
        schedule=built.schedule,
        dataset=load_dataset(cfg.data, seed=0),
        device=torch.device("cpu"),
        run_dir=cfg.run_dir,
        checkpoint_state={},
        events=train_module.TrainEvents(on_measured=lambda rate, eta: measured.append(rate)),
    )
    assert len(measured) == 1
    # 6 s of set-up over the first 15 steps would cap a rate taken from the start at 15 * 8 / 6 = 20 images/s;
    # the tiny model's steady state is several times that even on a slow, busy 2-core machine
    assert measured[0] > 40, measured


def test_cuda_graphs_are_asked_for_the_training_step_only_on_a_gpu_and_in_one_process(tmp_path, monkeypatch):
    """train.cuda_graphs compiles the training step in torch.compile's reduce-overhead mode and marks each step's
    start (so the last step's outputs may be overwritten), on CUDA only; sampling keeps the default mode."""
    path = write_config(tmp_path, "graphs", epochs=1, num_images=0, trajectory_images=0, dropout=0.0)
    cfg = load_config(path, ["train.compile=true", "train.cuda_graphs=true"])
    assert SpeedModes.for_run(cfg.train, torch.device("cpu")).cuda_graphs is False
    with pytest.raises(ddpmkit.errors.ConfigError, match="set compile = true"):
        load_config(path, ["train.compile=false", "train.cuda_graphs=true"])
    on_gpu = SpeedModes.for_run(cfg.train, torch.device("cuda"))
    assert on_gpu.cuda_graphs and on_gpu.compile and "CUDA graphs" in on_gpu.describe()

    compiled: list[dict] = []
    marks: list[int] = []

    def fake_compile(fn, **kwargs):
        compiled.append(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    # the CPU standing in for a GPU: the modes a CUDA device resolves to
    monkeypatch.setattr(train_module.SpeedModes, "for_run", classmethod(lambda cls, train, device: on_gpu))
    from ddpmkit.run.data import load_dataset

    built = build_components(cfg)
    dataset = load_dataset(cfg.data, seed=0)
    result = train_module.train(
        cfg,
        model=built.denoiser,
        schedule=built.schedule,
        dataset=dataset,
        device=torch.device("cpu"),
        run_dir=cfg.run_dir,
        checkpoint_state={},
    )
    assert compiled == [{"mode": "reduce-overhead"}] and len(marks) == result.step > 0
    compiled.clear()
    generate(
        built.denoiser,
        built.schedule,
        built.sampler,
        2,
        batch_size=2,
        seed=0,
        image_shape=cfg.image_shape,
        modes=on_gpu,
    )
    assert compiled == [{}]


def test_metrics_records_carry_wall_clock_time(tmp_path):
    run_dir = _train(tmp_path, "clock", epochs=1)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["time"] > 1.7e9 and r["elapsed_s"] >= 0 for r in records)
    assert [r["elapsed_s"] for r in records] == sorted(r["elapsed_s"] for r in records)


def test_mode_names_round_trip_and_bad_ones_are_user_errors():
    for text in ("fp32", "bf16+cl", "fp16+cl+fused+compile", "fp32+tf32", "bf16+cl+fused+compile+graphs"):
        assert mode_name(parse_mode(text)) == text
    r = invoke("bench", str(REPO / "configs" / "smoke.toml"), "--modes", "bf16+graphs")
    assert r.exit_code == 2 and "add 'compile'" in r.output
    r = invoke("bench", str(REPO / "configs" / "smoke.toml"), "--modes", "bf17")
    assert r.exit_code == 2 and "precision must be one of" in r.output
    r = invoke("bench", str(REPO / "configs" / "smoke.toml"), "--modes", "bf16+turbo")
    assert r.exit_code == 2 and "unknown flag 'turbo'" in r.output


def test_bench_prints_the_side_by_side_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    r = invoke(
        "bench",
        str(REPO / "configs" / "smoke.toml"),
        "--steps",
        "2",
        "--warmup",
        "1",
        "--sample-steps",
        "2",
        "--modes",
        "fp32,bf16+cl",
        "--sample-batches",
        "4,8",
        "--out",
        str(out),
    )
    assert r.exit_code == 0, r.output
    assert "matmul peak" in r.output and "bf16+cl" in r.output
    # not a terminal: the table is printed whole, not cut to 80 columns ("images…", "tutori…")
    assert "images/s" in r.output and "x tutorial" in r.output and "│ tutorial │" in r.output
    assert "every FLOP of a step at the measured matmul peak: fp32" in " ".join(r.output.split())
    result = json.loads(out.read_text())
    loops = [(row["loop"], row["mode"]) for row in result["training"]]
    assert loops == [("tutorial", "fp32"), ("ddpmkit", "fp32"), ("ddpmkit", "bf16+cl")]
    assert result["training"][0]["ratio"] == 1.0
    for row in result["training"] + result["sampling"]:
        assert row["per_s"] > 0 and row["flop_per_s"] > 0 and 0 < row["utilisation"]
    assert result["flops_per_image"]["train"] > 2 * result["flops_per_image"]["forward"]  # backward ~ 2x forward
    assert set(result["matmul_peak_flop_per_s"]) >= {"fp32", "bf16"}
    from ddpmkit.training.autotune import cpu_flags, cpu_model

    assert result["device_name"] == cpu_model() and set(result["cpu_features"]) <= cpu_flags()  # the CPU is named
    # the mode "auto" would choose among those measured: fp32, or bf16+cl where bf16 is native and faster
    from ddpmkit.training.autotune import native_bf16

    rows = [row for row in result["training"] if row["loop"] == "ddpmkit"]
    expected = max(rows, key=lambda row: row["per_s"])["mode"] if native_bf16(torch.device("cpu")) else "fp32"
    assert result["auto"] == expected
    assert "(auto)" in r.output and "measuring training: ddpmkit, bf16+cl ..." in r.output
    assert [row["loop"] for row in result["sampling"]] == [
        "tutorial, 1 image",
        "ddpmkit ddpm, batch 8",
        "ddpmkit ddpm, batch 8",
        "ddpmkit ddpm, batch 4",
    ]
    r = invoke("bench", str(REPO / "configs" / "smoke.toml"), "--sample-batches", "4,x")
    assert r.exit_code == 2 and "expected comma-separated batch sizes" in r.output


def test_the_tutorial_reference_runs_on_pytorchs_own_tf32_defaults():
    """On CUDA torch's defaults already use TF32 for convolutions (not matmuls); the bench's tutorial
    reference must get exactly those, whatever ddpmkit's modes set before, and leave them as it found them."""
    from ddpmkit.runtime.speed import pytorch_default_precision

    flags = torch.backends.cuda.matmul, torch.backends.cudnn
    before = flags[0].allow_tf32, flags[1].allow_tf32
    try:
        flags[0].allow_tf32, flags[1].allow_tf32 = True, False  # as a ddpmkit mode may leave them
        with pytorch_default_precision(torch.device("cuda")):
            assert (flags[0].allow_tf32, flags[1].allow_tf32) == (False, True)
        assert (flags[0].allow_tf32, flags[1].allow_tf32) == (True, False)
        with pytorch_default_precision(torch.device("cpu")):
            assert (flags[0].allow_tf32, flags[1].allow_tf32) == (True, False)
    finally:
        flags[0].allow_tf32, flags[1].allow_tf32 = before


def test_bench_marks_a_compiled_mode_auto_only_when_a_run_would_take_it():
    """bench's "(auto)" follows the run's rule: compiled only when at least COMPILE_GAIN (5 %) faster."""
    from dataclasses import replace
    from types import SimpleNamespace

    from ddpmkit.benchmark.bench import auto_pick, mode_name
    from ddpmkit.training.autotune import COMPILE_GAIN, candidates

    cfg = ddpmkit.load_config(REPO / "configs" / "smoke.toml")
    probe = cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"precision": "auto", "channels_last": "auto", "compile": "auto"})}
    )
    plain = candidates(probe, torch.device("cpu"))[0][0]
    name, twin = mode_name(plain), mode_name(replace(plain, compile=True))

    def rows(gain):
        return [
            SimpleNamespace(loop="ddpmkit", mode=name, per_s=100.0),
            SimpleNamespace(loop="ddpmkit", mode=twin, per_s=100.0 * gain),
        ]

    assert auto_pick(cfg, torch.device("cpu"), rows(COMPILE_GAIN - 0.01)) == name
    assert auto_pick(cfg, torch.device("cpu"), rows(COMPILE_GAIN + 0.01)) == twin
    assert auto_pick(cfg, torch.device("cpu"), [SimpleNamespace(loop="tutorial", mode=name, per_s=1.0)]) is None


def test_bench_rounds_interleave_and_take_the_median_ratio_within_rounds(monkeypatch):
    """With --rounds the tutorial and each mode alternate; a ratio is the median of the ratios within a round,
    so a machine that slows down between rounds moves both sides alike (fake timers: the machine halves its
    speed in round 2; the mode is 2.6x the tutorial in every round)."""
    import ddpmkit.benchmark.bench as bench

    order: list[str] = []
    speed = iter([1.0, 1.0, 0.5, 0.5, 0.9, 0.9])
    monkeypatch.setattr(
        bench, "bench_tutorial_training", lambda *a, **k: order.append("tutorial") or 10.0 * next(speed)
    )
    monkeypatch.setattr(
        bench,
        "measure_training",
        lambda cfg, m, *a, **k: order.append(bench.mode_name(m)) or (26.0 * next(speed), 5.0 + len(order)),
    )
    cfg = ddpmkit.load_config(REPO / "configs" / "smoke.toml")
    result = bench.run_bench(
        cfg, torch.device("cpu"), modes=[parse_mode("fp32")], steps=1, warmup=1, sample=False, rounds=3
    )
    assert order == ["tutorial", "fp32"] * 3
    tutorial, row = result["training"]
    assert tutorial["per_s"] == 9.0 and row["per_s"] == pytest.approx(23.4)  # medians over the rounds
    assert row["round_ratios"] == pytest.approx([2.6] * 3) and row["ratio"] == pytest.approx(2.6)
    assert row["setup_s"] == 7.0 and result["rounds"] == 3  # the first round's set-up (compilation) is the one kept
    # the ceiling: every FLOP of a step at a dtype's measured matmul peak, against the tutorial's median 9.0 images/s
    flops, peaks = result["flops_per_image"]["train"], result["matmul_peak_flop_per_s"]
    for name, peak in peaks.items():
        assert result["ceiling"][name]["per_s"] == pytest.approx(peak / flops)
        assert result["ceiling"][name]["ratio"] == pytest.approx(peak / flops / 9.0)


def test_the_bench_says_when_a_mode_names_cuda_only_flags_off_a_gpu(monkeypatch):
    """``graphs`` and ``tf32`` change nothing on a CPU: rows that name them are the plain step, and the bench says so
    there (and not on a GPU, where they are what is measured)."""
    from rich.console import Console

    import ddpmkit.benchmark.bench as bench
    import ddpmkit.commands.bench as command

    monkeypatch.setattr(bench, "bench_tutorial_training", lambda *a, **k: 10.0)
    monkeypatch.setattr(bench, "measure_training", lambda *a, **k: (20.0, 1.0))
    cfg = ddpmkit.load_config(REPO / "configs" / "smoke.toml")
    modes = [parse_mode("fp32"), parse_mode("fp32+tf32"), parse_mode("fp32+compile+graphs")]
    result = bench.run_bench(cfg, torch.device("cpu"), modes=modes, steps=1, warmup=1, sample=False)
    result["config"] = "smoke.toml"
    monkeypatch.setattr(command, "print_table", lambda table: None)
    for device, said in (("cpu", True), ("cuda:0", False)):
        console = Console(record=True, width=200)
        monkeypatch.setattr(command, "console", console)
        command._print_bench({**result, "device": device})
        text = console.export_text()
        assert ("graphs, tf32: CUDA only; on cpu a mode with them trains the same step as without" in text) == said


def test_a_mode_that_breaks_here_is_left_out_of_the_bench_and_named(monkeypatch):
    """A mode whose measurement raises (torch.compile broken on this machine, CUDA graphs failing to capture) is
    measured once, left out of the rows and named with its error; the others are measured as usual."""
    import ddpmkit.benchmark.bench as bench
    from ddpmkit.commands.bench import _print_bench

    tried: list[str] = []

    def measure(cfg, m, *a, **k):
        tried.append(bench.mode_name(m))
        if m.compile:
            raise RuntimeError("Triton kernel failed to launch\nmore detail")
        return 20.0, 1.0

    monkeypatch.setattr(bench, "bench_tutorial_training", lambda *a, **k: 10.0)
    monkeypatch.setattr(bench, "measure_training", measure)
    cfg = ddpmkit.load_config(REPO / "configs" / "smoke.toml")
    result = bench.run_bench(
        cfg,
        torch.device("cpu"),
        modes=[parse_mode("fp32"), parse_mode("fp32+compile")],
        steps=1,
        warmup=1,
        sample=False,
        rounds=2,
    )
    assert tried == ["fp32", "fp32+compile", "fp32"]  # not retried in round 2
    assert [row["mode"] for row in result["training"]] == ["fp32", "fp32"]  # the tutorial, then ddpmkit's
    assert result["failed"] == {"fp32+compile": "RuntimeError: Triton kernel failed to launch"}
    result["config"] = "smoke.toml"
    from rich.console import Console

    import ddpmkit.commands.bench as command

    console = Console(record=True, width=200)
    monkeypatch.setattr(command, "console", console)
    monkeypatch.setattr(command, "print_table", console.print)  # the table into the recorded console too
    _print_bench(result)
    assert "fp32+compile failed here, left out: RuntimeError: Triton kernel failed to launch" in console.export_text()
