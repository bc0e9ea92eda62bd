"""What a user installs: the sdist holds what the README links, and the wheel, installed non-editable into a
fresh virtual environment, holds every subpackage and runs every command."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from throwaway_venv import PIP_OFFLINE, make_venv

REPO = Path(__file__).resolve().parents[1]
IGNORED = shutil.ignore_patterns(".venv", ".git", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """(wheel, sdist) built offline from a copy of the checkout."""
    tmp = tmp_path_factory.mktemp("build")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=IGNORED)
    dist = tmp / "dist"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            "-w",
            str(dist),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(
        [sys.executable, "-c", f"from setuptools import build_meta as b; print(b.build_sdist({str(dist)!r}))"],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = dist.glob("ddpmkit-*.whl")
    return wheel, dist / r.stdout.split()[-1]


def _packages(root: Path) -> set[str]:
    return {str(p.parent.relative_to(root)).replace("/", ".") for p in root.rglob("__init__.py")}


@pytest.mark.slow
def test_the_wheel_holds_every_subpackage_and_no_top_level_plugins(built):
    wheel, _ = built
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert "plugins" not in tops and {"ddpmkit", "ddpmkit_plugins"} <= tops, tops
    in_wheel = {n.rpartition("/")[0].replace("/", ".") for n in names if n.endswith("/__init__.py")}
    expected = {"ddpmkit" if p == "." else f"ddpmkit.{p}" for p in _packages(REPO / "ddpmkit")} | {"ddpmkit_plugins"}
    assert expected <= in_wheel, sorted(expected - in_wheel)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "builtin = ddpmkit_plugins.builtin" in text and "ddpmkit = ddpmkit.commands:main" in text


@pytest.mark.slow
def test_the_sdist_holds_the_configs_and_the_docs_the_readme_links(built):
    _, sdist = built
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    linked = set(re.findall(r"\]\(((?:docs|configs)/[^)#\s]+)", (REPO / "README.md").read_text()))
    linked |= {f"configs/{p.name}" for p in (REPO / "configs").glob("*.toml")}
    assert linked and linked <= names, sorted(linked - names)


@pytest.mark.slow
def test_a_non_editable_install_runs_every_command(built, tmp_path, mnist_root, quick_classifier_cache):
    wheel, _ = built
    work = tmp_path / "work"
    work.mkdir()
    venv = make_venv(tmp_path, cwd=work)
    r = venv.call("-m", "pip", "install", *PIP_OFFLINE, str(wheel))
    assert r.returncode == 0, r.stdout + r.stderr
    r = venv.call(
        "-c",
        "import ddpmkit, ddpmkit_plugins, ddpmkit.evaluation.report, ddpmkit.benchmark.bench, "
        "ddpmkit.serving.page; "
        "print(ddpmkit.__file__); print(ddpmkit_plugins.__file__)",
    )
    assert r.returncode == 0, r.stderr
    assert all(Path(line).resolve().is_relative_to(venv.site_dir) for line in r.stdout.split()), r.stdout
    script = Path(venv.python).with_name("ddpmkit")
    env = {**venv.env, "DDPMKIT_CACHE_DIR": str(quick_classifier_cache)}

    def ddpmkit(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([str(script), *args], cwd=work, env=env, capture_output=True, text=True, timeout=timeout)

    shutil.copy(REPO / "configs" / "smoke.toml", work / "smoke.toml")
    r = ddpmkit("run", "smoke.toml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (work / "runs" / "smoke" / "samples.npz").is_file()
    r = ddpmkit("sample", "runs/smoke", "--num", "12", "--out", "more.npz")
    assert r.returncode == 0, r.stderr
    r = ddpmkit("eval", "more.npz", "--data-root", str(mnist_root), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["num_samples"] == 12
    for command in ("bench", "sweep", "validate", "describe", "check-plugins", "ema", "serve"):
        r = ddpmkit(command, "--help")
        assert r.returncode == 0 and "Usage" in r.stdout, (command, r.stderr)
    r = ddpmkit("list-plugins", "--json")
    assert r.returncode == 0, r.stderr
    rows = [row for row in json.loads(r.stdout) if row["distribution"] == "ddpmkit"]
    assert sorted(row["name"] for row in rows) == [
        "betas",
        "cosine",
        "ddim",
        "ddpm",
        "ddpm",  # the sampler and the objective
        "diffusers",
        "diffusers-unet",
        "dpmpp-2m",
        "edm",
        "flow",
        "heun",
        "linear",
        "metrics",
        "tensorboard",
        "unet",
        "wandb",
    ]
    optional = {"diffusers", "diffusers-unet", "tensorboard", "wandb"}  # "needs extra" where it is not installed
    assert all(row["status"] == "ok" for row in rows if row["name"] not in optional), rows
    assert all(row["status"] in ("ok", "needs extra") for row in rows if row["name"] in optional), rows
