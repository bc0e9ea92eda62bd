"""docs/writing-plugins.md cannot rot: every code block in it is run here, in order.

A block right after a line ``**`path`**`` is written to that path in a scratch folder; a ``console``
block's ``$`` lines are run (pip installs offline into a throw-away venv; ``ddpmkit`` and ``python``
are that venv's); any other ``python`` block is run as a script. Every command must succeed.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from throwaway_venv import PIP_OFFLINE, make_venv, outer_snapshot

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "writing-plugins.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
FILE_LABEL = re.compile(r"^\*\*`([^`]+)`\*\*$")


def blocks() -> list[tuple[str, str, str | None]]:
    """(language, code, file path or None) for every fenced block of the guide, in order."""
    text = GUIDE.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        before = [line for line in text[: m.start()].splitlines() if line.strip()]
        label = FILE_LABEL.match(before[-1].strip()) if before else None
        out.append((m.group(1), m.group(2), label.group(1) if label else None))
    return out


def test_every_block_is_a_file_a_command_or_a_script():
    for lang, code, path in blocks():
        assert path or lang in ("console", "python"), f"a {lang or 'plain'} block the test would not run:\n{code}"
        if lang == "console":
            assert all(line.startswith("$ ") for line in code.splitlines() if line.strip()), code


def _argv(command: str, python: str) -> list[str]:
    words = shlex.split(command)
    if words[:2] == ["pip", "install"]:
        return [python, "-m", "pip", "install", *PIP_OFFLINE, *words[2:]]
    if words[0] == "ddpmkit":
        return [python, "-m", "ddpmkit", *words[1:]]
    if words[0] == "python":
        return [python, *words[1:]]
    raise AssertionError(f"the guide runs a command this test does not know: {command}")


@pytest.mark.slow
def test_the_guide_works_from_an_empty_folder(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    tv = make_venv(tmp_path, work)
    before = outer_snapshot()
    outputs = {}
    for lang, code, path in blocks():
        if path:
            target = work / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(code, encoding="utf-8")
        elif lang == "console":
            for line in code.splitlines():
                command = line.removeprefix("$ ").strip()
                proc = tv.call(*_argv(command, tv.python)[1:], timeout=600)
                assert proc.returncode == 0, f"$ {command}\n{proc.stdout}\n{proc.stderr}"
                outputs[command] = proc.stdout
        else:
            proc = tv.call("-c", code)
            assert proc.returncode == 0, f"{code}\n{proc.stdout}\n{proc.stderr}"
    # what the guide says these commands show
    listed = outputs["ddpmkit list-plugins"]
    for name in (
        "ddpmkit-tutorial:scaled-linear",
        "ddpmkit-tutorial:tiny-v",
        "ddpmkit-tutorial:simple-ddim",
        "ddpmkit-tutorial:trig-flow",
        "ddpmkit-tutorial:csvlog",
    ):
        assert name in listed, (name, listed)
    assert "width" in outputs["ddpmkit describe tiny-v"] and "eta" in outputs["ddpmkit describe simple-ddim"]
    assert "[plugins.csvlog]" in outputs["ddpmkit describe csvlog"] and "every" in outputs["ddpmkit describe csvlog"]
    checked = outputs["ddpmkit check-plugins scaled-linear tiny-v simple-ddim trig-flow"]
    assert "final SNR" in checked and "uses t per image" in checked and "exact for its 50" in checked
    assert "split inverts target" in checked and "samplers reach the Gaussian answer" in checked  # the objective
    trig = work / "runs" / "tutorial-trigflow"
    assert (trig / "samples.png").exists() and (work / "trig.png").exists()  # trained, and drawn by another sampler
    assert "exact for its 10" in outputs["ddpmkit check-plugins simple-ddim --set steps=10 --set eta=1.0"]
    assert "predicts v" in outputs["ddpmkit validate tutorial.toml"]
    run = work / "runs" / "tutorial-smoke"
    assert (run / "samples.png").exists() and (run / "trajectory.png").exists()
    assert "showing the visited t nearest to those asked for: 36, 12, 0" in " ".join(
        outputs["ddpmkit run tutorial.toml"].split()
    )
    assert (work / "drawn-edited.png").is_file() and (work / "inpainted.png").is_file()  # the guide's sampler edits
    with np.load(work / "inpainted.npz") as npz, np.load(work / "drawn.npz") as drawn:
        assert (npz["images"][:, :4] == drawn["images"][0, :4]).all()  # the kept top half, exactly
    lines = (run / "loss.csv").read_text().splitlines()
    assert lines[0] == "step,loss" and [int(x.split(",")[0]) for x in lines[1:]] == [2, 4, 6, 8]
    assert outer_snapshot() == before


def test_the_guide_and_the_example_pin_a_ddpmkit_that_includes_this_one():
    """pip resolves these pins against the ddpmkit a user has; the tests install with --no-deps, so the pins
    are checked here (an upper bound like <0.3 refused every later ddpmkit)."""
    import tomllib

    from packaging.requirements import Requirement

    import ddpmkit

    guide_toml = next(code for lang, code, path in blocks() if path and path.endswith("pyproject.toml"))
    example = GUIDE.parent / "examples" / "ddpmkit-example-plugin" / "pyproject.toml"
    for name, project in (
        ("the guide", tomllib.loads(guide_toml)["project"]),
        ("the example plugin", tomllib.loads(example.read_text())["project"]),
    ):
        (pin,) = [Requirement(d) for d in project["dependencies"] if Requirement(d).name == "ddpmkit"]
        assert pin.specifier.contains(ddpmkit.__version__), (
            f"{name} pins {pin}, which refuses ddpmkit {ddpmkit.__version__}"
        )
