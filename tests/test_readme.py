"""The README is a user's README: its two commands at the top stay as CI runs them, every ddpmkit command it
shows parses with today's CLI, and it stays short."""

import re
import shlex
import warnings
from pathlib import Path

import pytest
from typer.main import get_command

from ddpmkit.commands import app

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
#: placeholders the README writes where a command takes a number
NUMBERS = {"N": "16"}


def _commands() -> list[str]:
    """Every ``ddpmkit ...`` command of the README: the lines of its bash blocks and its inline code."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.splitlines():
            line = line.split("#", 1)[0]
            for part in line.split("&&"):
                words = shlex.split(part)
                while words and "=" in words[0] and not words[0].startswith("-"):  # VAR=value before the command
                    words = words[1:]
                if words and words[0].endswith("bin/ddpmkit") or words and words[0] == "ddpmkit":
                    found.append(" ".join(["ddpmkit", *words[1:]]))
    found += [" ".join(c.split()) for c in re.findall(r"`(ddpmkit [^`]+)`", README) if "COMMAND" not in c]
    return list(dict.fromkeys(found))


def _parse(command: str) -> None:
    """Parse ``command`` as the CLI would, without running it; click's error when it does not parse."""
    args = [NUMBERS.get(w, w) for w in shlex.split(command)[1:] if not (w.startswith("[") and w.endswith("]"))]
    group = get_command(app)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = group.make_context("ddpmkit", args)
        rest = [*(getattr(ctx, "_protected_args", None) or getattr(ctx, "protected_args", [])), *ctx.args]
    name, cmd, rest = group.resolve_command(ctx, rest)
    if len(args) > 1:  # a bare `ddpmkit eval` in the prose names the command only
        cmd.make_context(name, rest, parent=ctx)


def _usage_error(exc: Exception) -> bool:
    """Whether ``exc`` is the CLI's own usage error (typer carries its own copy of click's exceptions)."""
    return any(k.__name__ == "ClickException" for k in type(exc).__mro__)


def test_the_readme_shows_commands():
    commands = _commands()
    assert "ddpmkit run configs/mnist-cpu.toml" in commands and len(commands) >= 15, commands


@pytest.mark.parametrize("command", _commands())
def test_every_readme_command_parses(command):
    try:
        _parse(command)
    except Exception as exc:
        if not _usage_error(exc):
            raise
        pytest.fail(f"README.md: `{command}`: {exc.format_message()}")


@pytest.mark.parametrize(
    "command", ["ddpmkit sample RUN --no-such-option", "ddpmkit eval RUN --num many", "ddpmkit nope"]
)
def test_a_command_that_does_not_parse_is_caught(command):
    with pytest.raises(Exception) as caught:
        _parse(command)
    assert _usage_error(caught.value)


def test_the_two_commands_at_the_top_are_what_ci_runs():
    top = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    assert (
        ".venv/bin/pip install -e . && DDPMKIT_DATA_ROOT=../shared/data .venv/bin/ddpmkit run configs/mnist-cpu.toml"
        in top
    )
    assert '.venv/bin/pip install -e ".[test]" && .venv/bin/python -m pytest -q' in top
    assert '.venv/bin/pip install -q -e ".[test]"' in (REPO / ".ci" / "run").read_text()


def test_the_readme_is_short_and_links_what_it_moved():
    assert len(README.encode()) <= 15_000
    for page in ("docs/config.md", "CONTRIBUTING.md", "CHANGELOG.md", "docs/results/README.md"):
        assert f"]({page}" in README and (REPO / page).is_file(), page


def test_the_changelog_has_this_version_and_contributing_its_commands():
    from ddpmkit.version import __version__

    changelog = (REPO / "CHANGELOG.md").read_text()
    assert f"## [{__version__}] - " in changelog, f"CHANGELOG.md has no section for {__version__}"
    contributing = (REPO / "CONTRIBUTING.md").read_text()
    for needed in ("python -m ddpmkit.run.reference > docs/config.md", "ruff check", "ruff format", "pytest -q"):
        assert needed in contributing, needed
