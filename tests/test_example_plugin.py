"""The example third-party plugin in docs/examples/ddpmkit-example-plugin.

Fast tests import its components from the source folder. The slow test installs it for real with
pip into a throw-away virtual environment (offline, no build isolation) and drives ddpmkit's CLI
in subprocesses: list-plugins, validate and run see it; after pip uninstall they do not.

The throw-away venv is described in tests/throwaway_venv.py.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from throwaway_venv import make_venv, outer_snapshot

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "docs" / "examples" / "ddpmkit-example-plugin"
DIST = "ddpmkit-example-plugin"
VERSION = "0.1.0"
BUILTINS = {("schedule", "linear"), ("denoiser", "unet"), ("sampler", "ddpm")}


# --- in-process tests of the components -------------------------------------------------------


@pytest.fixture
def example(monkeypatch):
    """Import ``ddpmkit_example`` from its source folder (writing no __pycache__ into docs/)."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    yield
    for name in [m for m in sys.modules if m == "ddpmkit_example" or m.startswith("ddpmkit_example.")]:
        del sys.modules[name]


def closed_form_gamma(t: float, start: float, end: float, tau: float) -> float:
    """gamma(t) of Chen (2023), Algorithm 1, written out independently of the plugin."""

    def sigmoid(x: float) -> float:
        return 1.0 / (1.0 + math.exp(-x))

    v_start, v_end = sigmoid(start / tau), sigmoid(end / tau)
    return (v_end - sigmoid((t * (end - start) + start) / tau)) / (v_end - v_start)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"num_timesteps": 50},
        {"num_timesteps": 200, "start": 0.0, "end": 3.0, "tau": 1.1},
        {"num_timesteps": 100, "start": -3.0, "end": 3.0, "tau": 0.7},
    ],
)
def test_sigmoid_schedule(example, options):
    import torch
    from ddpmkit_example.sigmoid import MAX_BETA, SigmoidSchedule

    opts = SigmoidSchedule.Options(**options)
    schedule = SigmoidSchedule(opts)
    T = opts.num_timesteps
    assert schedule.num_timesteps == T
    assert schedule.make_betas().dtype == torch.float64
    betas, abar = schedule.betas, schedule.alphas_cumprod
    assert betas.dtype == abar.dtype == torch.float32
    assert torch.isfinite(betas).all()
    assert ((betas > 0) & (betas < 1)).all()
    assert (abar[1:] < abar[:-1]).all(), "alphas_cumprod must strictly decrease"
    # alpha-bar after the first step is gamma(1/T); the last beta is clipped to MAX_BETA.
    first = closed_form_gamma(1 / T, opts.start, opts.end, opts.tau)
    last = closed_form_gamma((T - 1) / T, opts.start, opts.end, opts.tau) * (1 - MAX_BETA)
    assert abar[0].item() == pytest.approx(first, rel=1e-5)
    assert abar[-1].item() == pytest.approx(last, rel=1e-5)
    assert betas[-1].item() == pytest.approx(MAX_BETA)


def test_sigmoid_options_are_validated(example):
    from ddpmkit_example.sigmoid import SigmoidSchedule
    from pydantic import ValidationError

    assert SigmoidSchedule.Options().model_dump() == {"num_timesteps": 1000, "start": -3.0, "end": 3.0, "tau": 1.0}
    for bad, words in [
        ({"start": 3.0, "end": -3.0}, "start (3.0) must be less than end (-3.0)"),
        ({"start": 1.0, "end": 1.0}, "must be less than end"),
        ({"tau": 0.0}, "greater than 0"),
        ({"start": 40.0, "end": 50.0}, "equal in float64"),
        ({"num_timesteps": 0}, "greater than or equal to 1"),
        ({"beta_start": 1e-4}, "Extra inputs are not permitted"),
    ]:
        with pytest.raises(ValidationError, match=re.escape(words)):
            SigmoidSchedule.Options(**bad)


@pytest.mark.parametrize("image_shape", [(1, 16, 16), (3, 8, 8)])
def test_resconv_keeps_the_input_shape(example, image_shape):
    import torch
    from ddpmkit_example.resconv import ResConv

    from ddpmkit.interfaces import Denoiser

    model = ResConv(ResConv.Options(channels=8, num_blocks=2, num_groups=4), image_shape=image_shape, num_timesteps=100)
    assert isinstance(model, Denoiser)
    x = torch.randn(3, *image_shape, generator=torch.Generator().manual_seed(0))
    out = model(x, torch.tensor([0, 42, 99]))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_resconv_options_are_validated(example):
    from ddpmkit_example.resconv import ResConv
    from pydantic import ValidationError

    assert ResConv.Options().model_dump() == {"channels": 32, "num_blocks": 4, "num_groups": 8}
    for bad, words in [
        ({"channels": 12, "num_groups": 8}, "channels (12) must be divisible by num_groups (8)"),
        ({"num_blocks": 0}, "greater than or equal to 1"),
        ({"channels": 0}, "greater than or equal to 1"),
        ({"num_groups": 0}, "greater than or equal to 1"),
        ({"dropout": 0.1}, "Extra inputs are not permitted"),
    ]:
        with pytest.raises(ValidationError, match=re.escape(words)):
            ResConv.Options(**bad)


def test_hooks_register_lazy_targets_without_importing_torch(example):
    """The entry point's module is imported by list-plugins: it must not pull in torch."""
    script = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(EXAMPLE)!r})\n"
        "import ddpmkit_example.hooks as hooks\n"
        "found = []\n"
        "register = lambda name, target: found.append((name, target))\n"
        "hooks.register_schedules(register=register)\n"
        "hooks.register_denoisers(register=register)\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'found': found}))\n"
    )
    proc = subprocess.run([sys.executable, "-B", "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["torch"] is False, "importing ddpmkit_example.hooks imported torch"
    found = dict(result["found"])
    assert found == {
        "sigmoid": "ddpmkit_example.sigmoid:SigmoidSchedule",
        "resconv": "ddpmkit_example.resconv:ResConv",
    }

    import importlib

    from ddpmkit.interfaces import Denoiser, NoiseSchedule

    for (name, target), base in zip(found.items(), (NoiseSchedule, Denoiser)):
        module, _, attr = target.partition(":")
        assert issubclass(getattr(importlib.import_module(module), attr), base), name


# --- a real install into a throw-away virtual environment -------------------------------------


def _set_table(text: str, header: str, body: str) -> str:
    """Replace the body of the TOML table ``[header]`` (it must exist) with ``body``."""
    pattern = re.compile(rf"^\[{re.escape(header)}\][ \t]*\n.*?(?=^\[|\Z)", re.M | re.S)
    new, count = pattern.subn(lambda _: f"[{header}]\n{body.strip()}\n\n", text, count=1)
    assert count == 1, f"no [{header}] table"
    return new


def _write_config(path: Path, runs: Path, *, schedule: bool = True, denoiser: bool = True) -> dict:
    """configs/smoke.toml with the sigmoid schedule and/or the resconv denoiser, runs written under ``runs``."""
    text = (REPO / "configs" / "smoke.toml").read_text(encoding="utf-8")
    text = text.replace("[run]\n", f"[run]\ndir = {json.dumps(str(runs))}\n", 1)
    if schedule:
        text = _set_table(text, "schedule", 'name = "sigmoid"')
        text = _set_table(text, "schedule.options", "num_timesteps = 50\nstart = -3.0\nend = 3.0\ntau = 1.0")
    if denoiser:
        text = _set_table(text, "denoiser", 'name = "resconv"')
        text = _set_table(text, "denoiser.options", "channels = 8\nnum_blocks = 2\nnum_groups = 4")
    path.write_text(text, encoding="utf-8")
    data = tomllib.loads(text)
    assert data["run"]["dir"] == str(runs)
    assert data["schedule"]["name"] == ("sigmoid" if schedule else "linear")
    assert data["denoiser"]["name"] == ("resconv" if denoiser else "unet")
    return data


def _install_fake(site_dir: Path, dist: str, module_source: str) -> None:
    """An installed-looking distribution (dist-info + module) whose ``ddpmkit`` entry point is that module."""
    module = dist.replace("-", "_") + "_hooks"
    info = site_dir / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[ddpmkit]\n{dist} = {module}\n")
    (site_dir / f"{module}.py").write_text(module_source + "\n")


@pytest.mark.slow
def test_real_install_through_the_cli(tmp_path):
    outer_before = outer_snapshot()
    assert not any(n.startswith("ddpmkit_example") for n in outer_before), "the example is installed in the outer env"

    # 1. A bare venv that sees the outer environment's packages through a .pth file.
    tv = make_venv(tmp_path, tmp_path)
    call, site_dir = tv.call, tv.site_dir

    pip = call("-m", "pip", "--version")
    if pip.returncode != 0:
        pytest.skip(f"pip is unusable from a virtual environment: {pip.stderr.strip() or pip.stdout.strip()}")

    # 2. pip install the example (a copy, so that build/ and *.egg-info land in tmp_path).
    source = tmp_path / "src" / DIST
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("__pycache__", "build", "dist", "*.egg-info"))
    proc = call("-m", "pip", "install", "--no-index", "--no-build-isolation", "--no-deps", str(source))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    where = call(
        "-c",
        "import importlib.metadata as m, ddpmkit_example; print(ddpmkit_example.__file__); "
        "print(m.version('ddpmkit-example-plugin'))",
    )
    assert where.returncode == 0, where.stderr
    module_file, version = where.stdout.split()
    assert Path(module_file).resolve().is_relative_to(site_dir) and version == VERSION, where.stdout

    # 3. list-plugins shows both components with the example's distribution and version.
    def plugins() -> dict[tuple[str, str], dict]:
        proc = call("-m", "ddpmkit", "list-plugins", "--json")
        assert proc.returncode == 0, proc.stderr
        return {(r["kind"], r["name"] or r["plugin"]): r for r in json.loads(proc.stdout)}

    rows = plugins()
    for key in [("schedule", "sigmoid"), ("denoiser", "resconv")]:
        assert key in rows, sorted(rows)
        row = rows[key]
        assert (row["distribution"], row["version"], row["plugin"], row["status"]) == (
            DIST,
            VERSION,
            "example",
            "ok",
        ), row
    for key in BUILTINS:
        assert rows[key]["distribution"] == "ddpmkit" and rows[key]["status"] == "ok", rows.get(key)

    # 3b. it passes the conformance kit
    proc = call("-m", "ddpmkit", "check-plugins", "sigmoid", "resconv", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checks = json.loads(proc.stdout)
    assert {c["name"] for c in checks} == {"sigmoid", "resconv"} and all(c["passed"] for c in checks), checks

    # 3c. a broken and an incompatible plugin installed beside it are shown as such and break nothing
    _install_fake(site_dir, "ddpmkit-broken", "raise ImportError('needs a library that is not installed')")
    _install_fake(site_dir, "ddpmkit-old", "import ddpmkit\nDDPMKIT_PLUGIN_API = [0]\n")
    rows_with_bad = plugins()
    status = {r["distribution"]: r["status"] for r in rows_with_bad.values()}
    assert status["ddpmkit-broken"] == "error" and status["ddpmkit-old"] == "incompatible", status
    assert rows_with_bad[("schedule", "sigmoid")]["status"] == "ok"

    # 4. validate and a smoke run with the sigmoid schedule and the resconv backbone.
    runs = tmp_path / "runs"
    config = tmp_path / "example.toml"
    data = _write_config(config, runs)
    proc = call("-m", "ddpmkit", "validate", str(config))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "sigmoid" in proc.stdout and "resconv" in proc.stdout
    proc = call("-m", "ddpmkit", "run", str(config), timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = runs / data["run"]["name"]
    for name in ("samples.png", "samples.npz", "trajectory.png"):
        assert (run_dir / name).stat().st_size > 0, name
    import numpy as np

    with np.load(run_dir / "samples.npz") as npz:
        images = npz["images"]
    assert images.dtype == np.uint8 and images.shape == (data["sample"]["num_images"], 16, 16, 1)

    # 5. pip uninstall: the components are gone, and a config naming them fails in one line each.
    proc = call("-m", "pip", "uninstall", "-y", DIST)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not list(site_dir.glob("ddpmkit_example*"))
    rows = plugins()
    assert not [r for r in rows.values() if r["distribution"] == DIST], rows
    assert ("schedule", "sigmoid") not in rows and ("denoiser", "resconv") not in rows
    assert BUILTINS <= set(rows)

    proc = call("-m", "ddpmkit", "validate", str(config))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    problems = proc.stderr.strip().splitlines()
    assert len(problems) == 2, problems  # one line per unknown component
    assert "unknown schedule 'sigmoid'" in problems[0] and "schedule.name" in problems[0], problems
    assert "unknown denoiser 'resconv'" in problems[1], problems

    only_schedule = tmp_path / "sigmoid-only.toml"
    _write_config(only_schedule, runs, denoiser=False)
    proc = call("-m", "ddpmkit", "validate", str(only_schedule))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    message = proc.stderr.strip()
    assert "\n" not in message and "Traceback" not in message, message
    assert message.startswith("error:") and "unknown schedule 'sigmoid'" in message, message

    # 6. The outer environment was never touched.
    assert outer_snapshot() == outer_before
