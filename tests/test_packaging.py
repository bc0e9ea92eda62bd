"""A plain (non-editable) install: the wheel holds ddpmkit and ddpmkit_plugins, never a top-level `plugins`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_plain_install_from_a_wheel(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info",
                                                             "__pycache__", ".pytest_cache", "docs"))
    (src / "docs").mkdir()
    pip = [sys.executable, "-m", "pip"]
    offline = ["--no-deps", "--no-index", "--no-build-isolation"]
    r = subprocess.run([*pip, "wheel", *offline, "-w", str(tmp_path / "dist"), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = (tmp_path / "dist").glob("ddpmkit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert "plugins" not in tops and {"ddpmkit", "ddpmkit_plugins"} <= tops, tops
    assert "ddpmkit_plugins/unet.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "builtin = ddpmkit_plugins.builtin" in text and "ddpmkit = ddpmkit.cli:main" in text

    target = tmp_path / "site"
    r = subprocess.run([*pip, "install", *offline, "--target", str(target), str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    env = {**os.environ, "PYTHONPATH": str(target)}
    env.pop("DDPMKIT_NO_THIRD_PARTY_PLUGINS", None)
    probe = ("import ddpmkit, ddpmkit_plugins, json; "
             "print(json.dumps([ddpmkit.__file__, ddpmkit_plugins.__file__, "
             "sorted(r['name'] for r in ddpmkit.list_plugins() if r['distribution'] == 'ddpmkit')]))")
    r = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    import json

    module_file, plugins_file, names = json.loads(r.stdout)
    assert module_file.startswith(str(target)) and plugins_file.startswith(str(target)), (module_file, plugins_file)
    assert names == ["cosine", "ddim", "ddpm", "diffusers", "linear", "metrics", "tensorboard", "unet"]
