"""benchmarks/gpu.py, the script a GPU lease runs once with no second try: its stages rehearsed on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from runconfigs import REPO

SCRIPT = REPO / "benchmarks" / "gpu.py"


def gpu_module():
    """benchmarks/gpu.py imported as a module (benchmarks/ is not a package)."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return gpu


def gpu_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600, cwd=REPO)


@pytest.mark.slow
def test_the_run_stage_rehearsed_on_the_cpu_writes_the_summary_the_benchmarks_page_quotes(tmp_path):
    out = tmp_path / "out"
    r = gpu_script(
        "--device",
        "cpu",
        "--config",
        str(REPO / "configs" / "smoke.toml"),
        "--out",
        str(out),
        "--stages",
        "run",
        "--max-steps",
        "40",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads(r.stdout[r.stdout.index("{") :])  # printed as written
    # smoke.toml's 2 epochs of 4 steps come before the 40-step cap; its own fp32 mode, as written
    assert summary["trained_steps"] == 8 and summary["end_to_end_mode"] == "fp32 (the config as written)"
    assert summary["steady_images_per_s"] > 0 and summary["end_to_end_s"] > 0
    # the whole recipe (75 epochs of 937 steps at batch 64) at the loop's rate
    assert summary["full_training_s_estimate"] == pytest.approx(75 * 937 * 64 / summary["steady_images_per_s"])
    assert (out / "run.log").is_file() and (out / "runs" / "smoke" / "metrics.jsonl").is_file()
    assert "loop_over_bare_step" not in summary  # no bench in OUT to set it beside


def test_stages_that_need_a_bench_or_a_gpu_say_so(tmp_path):
    r = gpu_script("--device", "cpu", "--out", str(tmp_path), "--stages", "profile")
    assert r.returncode == 1 and "no bench in" in r.stderr and "run the bench stage first" in r.stderr
    r = gpu_script("--device", "cpu", "--out", str(tmp_path), "--stages", "bench,sample")
    assert r.returncode == 1 and "expected some of bench, profile, run" in r.stderr
    if not torch.cuda.is_available():
        r = gpu_script("--out", str(tmp_path))
        assert r.returncode == 1 and "no CUDA device here" in r.stderr


def test_same_step_ignores_tf32_only_where_no_fp32_matmul_runs():
    gpu = gpu_module()
    from ddpmkit.benchmark.bench import parse_mode

    assert gpu.same_step(parse_mode("bf16+cl+fused+tf32"), parse_mode("bf16+cl+fused"))
    assert not gpu.same_step(parse_mode("fp32+fused+tf32"), parse_mode("fp32+fused"))
    assert not gpu.same_step(parse_mode("bf16+cl+fused+compile+graphs"), parse_mode("bf16+cl+fused+compile"))


def test_the_run_is_set_beside_the_bench_row_of_its_own_step():
    gpu = gpu_module()
    from ddpmkit.benchmark.bench import parse_mode

    bench = {
        "training": [
            {"mode": "fp32", "per_s": 50.0, "utilisation": 0.1},  # the tutorial's row comes first
            {"mode": "fp32+fused+tf32", "per_s": 80.0, "utilisation": 0.05},
            {"mode": "bf16+cl+fused", "per_s": 200.0, "utilisation": 0.4},
        ]
    }
    # TF32 changes nothing in a bf16 step, so the bf16 row is this run's bare step
    figures = gpu.beside_bench(bench, parse_mode("bf16+cl+fused+tf32"), 150.0)
    assert figures == {"loop_over_bare_step": 0.75, "run_utilisation": pytest.approx(0.3)}
    assert gpu.beside_bench(bench, parse_mode("fp32+fused"), 150.0) == {}  # no row of that step: nothing made up
