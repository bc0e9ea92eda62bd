"""A throw-away virtual environment that sees this environment's packages, for real pip installs.

The venv is created without pip and without packages. A ``.pth`` file in its site-packages holding
``import site; site.addsitedir("<outer site-packages>")`` makes this environment's packages (torch,
ddpmkit's editable install, pip, setuptools) importable there: ``addsitedir`` also processes the
outer ``.pth`` files, which an editable install needs (a plain path line would not). pip run by the
venv's interpreter installs into the venv (``sys.prefix``) and refuses to uninstall anything outside
it, so the outer environment is never modified.
"""

from __future__ import annotations

import os
import subprocess
import sysconfig
import venv
from dataclasses import dataclass
from pathlib import Path

PIP_OFFLINE = ["--no-index", "--no-build-isolation", "--no-deps"]


@dataclass
class ThrowawayVenv:
    root: Path
    python: str
    site_dir: Path
    env: dict[str, str]
    cwd: Path

    def call(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run the venv's python with ``args`` in ``cwd``."""
        return subprocess.run(
            [self.python, *args], cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=timeout
        )


def outer_site_dirs() -> list[str]:
    paths = sysconfig.get_paths()
    return list(dict.fromkeys([paths["purelib"], paths["platlib"]]))


def outer_snapshot() -> set[str]:
    """The ddpmkit-related entries of the outer site-packages (a test checks they never change)."""
    return {
        name
        for d in outer_site_dirs()
        if os.path.isdir(d)
        for name in os.listdir(d)
        if name.lower().startswith("ddpmkit")
    }


def make_venv(where: Path, cwd: Path) -> ThrowawayVenv:
    root = (where / "venv").resolve()
    venv.create(root, with_pip=False, symlinks=os.name != "nt", clear=True)
    python = str(root / ("Scripts/python.exe" if os.name == "nt" else "bin/python"))
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "DDPMKIT_NO_THIRD_PARTY_PLUGINS")
    }
    env.update(
        PIP_NO_INDEX="1",
        PIP_NO_CACHE_DIR="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        PYTHONNOUSERSITE="1",
        NO_COLOR="1",
        COLUMNS="200",
    )
    probe = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    site_dir = Path(probe.stdout.strip()).resolve()
    assert site_dir.is_dir() and root in site_dir.parents, site_dir
    lines = "".join(f"import site; site.addsitedir({d!r})\n" for d in outer_site_dirs())
    (site_dir / "_ddpmkit_test_outer_env.pth").write_text(lines, encoding="utf-8")
    return ThrowawayVenv(root, python, site_dir, env, cwd)
