"""`ddpmkit sweep` on a tiny trained run: every point sampled from the same seeds, scored, tabled and plotted."""

from __future__ import annotations

import json

import pytest
from runconfigs import cli_env, ddpmkit, invoke, on_mnist, write_config

from ddpmkit import errors as ddpmkit_errors
from ddpmkit.evaluation.sweep import Point, parse_plan


def test_parse_plan():
    assert parse_plan(["ddpm", "ddim:10,20"]) == [Point("ddpm", None), Point("ddim", 10), Point("ddim", 20)]
    assert parse_plan(["ddpmkit:ddim:5"]) == [Point("ddpmkit:ddim", 5)]
    assert parse_plan(["ddim:ten"]) == [Point("ddim:ten", None)]  # a qualified name (distribution 'ddim')
    with pytest.raises(ddpmkit_errors.ConfigError, match="expected NAME or NAME:STEPS"):
        parse_plan(["ddim:10,"])


def _trained(tmp_path, name: str, mnist_root, extra: str = "", **values):
    """A tiny run trained on a few MNIST digits through the CLI (``extra``: TOML appended to its config)."""
    cfg = write_config(tmp_path, name, epochs=1, num_images=0, trajectory_images=0, **values)
    cfg.write_text(cfg.read_text() + extra)
    assert invoke("run", str(cfg), *on_mnist(mnist_root, 32)).exit_code == 0
    return tmp_path / "runs" / name


def test_sweep_cli(tmp_path, mnist_root, quick_classifier_cache, monkeypatch):
    run = _trained(tmp_path, "sw", mnist_root)
    env = cli_env(DDPMKIT_CACHE_DIR=str(quick_classifier_cache))
    r = ddpmkit(
        "sweep",
        str(run),
        "--sampler",
        "ddpm",
        "--sampler",
        "ddim:5,10",
        "--num",
        "20",
        "--data-root",
        str(mnist_root),
        "--json",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert [(p["label"], p["denoiser_evaluations"]) for p in result["points"]] == [
        ("ddpm", 20),
        ("ddim:5", 5),
        ("ddim:10", 10),
    ]
    assert all(p["seconds"] > 0 and p["fid"] >= 0 for p in result["points"]) and result["floor"]["fid"] >= 0
    assert (run / "sweep" / "sweep.png").stat().st_size > 10_000 and (run / "sweep" / "sweep.json").exists()
    # the rest in-process (the start-up is tested above)
    monkeypatch.setenv("DDPMKIT_CACHE_DIR", env["DDPMKIT_CACHE_DIR"])
    table = invoke(
        "sweep",
        str(run),
        "--sampler",
        "ddim:4",
        "--num",
        "10",
        "--data-root",
        str(mnist_root),
        "--out",
        str(tmp_path / "s2"),
    )
    assert table.exit_code == 0 and "real data" in table.output and "FID" in table.output, table.output
    bad = invoke("sweep", str(run), "--sampler", "ddim:50", "--num", "10", "--data-root", str(mnist_root))
    assert bad.exit_code == 2 and "50 steps exceed the schedule's T = 20" in bad.output, bad.output


def test_parse_plan_repeats_at_each_guidance_weight():
    assert parse_plan(["ddim:5,10"], [1, 2.5]) == [
        Point("ddim", 5, 1.0),
        Point("ddim", 10, 1.0),
        Point("ddim", 5, 2.5),
        Point("ddim", 10, 2.5),
    ]
    assert Point("ddim", 5, 2.5).label == "ddim:5 w=2.5" and Point("ddim", 5, 2.5).line == "ddim w=2.5"


def test_sweep_over_guidance_weights(tmp_path, mnist_root, quick_classifier_cache, monkeypatch):
    run = _trained(tmp_path, "gw", mnist_root, "\n[guidance]\nweight = 2.0\nsteps = 2\n", dropout=0.0)
    monkeypatch.setenv("DDPMKIT_CACHE_DIR", str(quick_classifier_cache))
    r = invoke(
        "sweep",
        str(run),
        "--sampler",
        "ddim:5",
        "--guidance",
        "1,3",
        "--num",
        "10",
        "--data-root",
        str(mnist_root),
        "--json",
    )
    assert r.exit_code == 0, r.output
    points = json.loads(r.stdout[r.stdout.index("{") :])["points"]
    assert [(p["label"], p["denoiser_evaluations"]) for p in points] == [("ddim:5 w=1", 5), ("ddim:5 w=3", 10)]
    assert points[0]["fid"] != points[1]["fid"]
    bad = invoke("sweep", str(run), "--guidance", "1,x", "--num", "10", "--data-root", str(mnist_root))
    assert bad.exit_code == 2 and "--guidance 1,x: expected weights" in bad.output, bad.output


def test_parse_plan_repeats_with_the_trained_ema_then_each_post_hoc_length():
    assert parse_plan(["ddim:5"], ema=[0.05, 0.1]) == [
        Point("ddim", 5),
        Point("ddim", 5, None, 0.05),
        Point("ddim", 5, None, 0.1),
    ]
    assert Point("ddim", 5, None, 0.05).line == "ddim ema=0.05"


def test_sweep_ranks_post_hoc_ema_lengths_beside_the_trained_ema(
    tmp_path, mnist_root, quick_classifier_cache, monkeypatch
):
    monkeypatch.setenv("DDPMKIT_CACHE_DIR", str(quick_classifier_cache))
    cfg = write_config(tmp_path, "pe", epochs=2, num_images=0, trajectory_images=0)
    trained = invoke("run", str(cfg), *on_mnist(mnist_root, 32), "--set", "train.posthoc_ema.enabled=true")
    assert trained.exit_code == 0, trained.output
    run = tmp_path / "runs" / "pe"
    r = invoke("sweep", str(run), "--ema", "0.05,0.2", "--num", "10", "--data-root", str(mnist_root), "--json")
    assert r.exit_code == 0, r.output
    points = json.loads(r.stdout[r.stdout.index("{") :])["points"]
    assert [p["label"] for p in points] == ["ddpm", "ddpm ema=0.05", "ddpm ema=0.2"]
    assert len({p["fid"] for p in points}) == 3  # three sets of weights, three figures
    assert (run / "posthoc-ema" / "sigma-0.200" / "ema.safetensors").is_file()
