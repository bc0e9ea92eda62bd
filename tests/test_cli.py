"""The CLI skeleton: validate, --set overrides, --version, --help, list-plugins (training/sampling commands
are tested elsewhere)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from runconfigs import invoke

import ddpmkit
from ddpmkit.registry import discovery as plugins

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SMOKE = CONFIGS / "smoke.toml"


pytestmark = pytest.mark.usefixtures("fresh_plugin_registry")


def assert_user_error(result, *parts: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert result.stderr.startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for part in parts:
        assert part in result.stderr, (part, result.stderr)
    return result.stderr


def env_without_switch() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != plugins.DISABLE_ENV}


# --- validate --------------------------------------------------------------------------------------


def test_validate_mnist_prints_the_parameter_count():
    result = invoke("validate", str(CONFIGS / "mnist.toml"))
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "35,178,689 parameters (35.2 M)" in out
    assert "schedule   ddpmkit:linear, T = 1000" in out
    assert "data       mnist, 1x32x32" in out
    assert "75 epochs, batch 64, lr 2e-05, EMA 0.9999" in out
    assert "is valid" in out
    assert result.stderr == ""


@pytest.mark.parametrize("name", ["smoke.toml", "mnist-cpu.toml", "mnist-cond-cpu.toml", "mnist-cond.toml"])
def test_other_shipped_configs_validate(name):
    """Without timing: on a fresh machine timing mnist-cpu.toml measures every speed mode of four UNets (2-3 minutes
    on an AVX2-only CPU); what timing says is tested with fake timers (test_autotune, test_budget)."""
    result = invoke("validate", str(CONFIGS / name), "--no-timing")
    assert result.exit_code == 0, result.output
    assert " parameters (" in result.stdout and "is valid" in result.stdout


def test_every_shipped_config_loads():
    for path in sorted(CONFIGS.glob("*.toml")):
        cfg = ddpmkit.load_config(path)
        assert cfg.num_timesteps >= 1, path


def test_mnist_config_is_the_tutorials_recipe():
    cfg = ddpmkit.load_config(CONFIGS / "mnist.toml")
    assert cfg.data.dataset == "mnist" and cfg.image_shape == (1, 32, 32)
    assert cfg.schedule.options == {"num_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02}
    assert cfg.denoiser.options == {
        "prediction": "epsilon",
        "time_embedding": "sinusoidal",
        "num_groups": 32,
        "num_heads": 8,
        "dropout": 0.1,
        "channels": [64, 128, 256, 512, 512, 384],
        "attentions": [False, True, False, False, False, True],
        "upscales": [False, False, False, True, True, True],
    }
    assert (cfg.train.batch_size, cfg.train.lr, cfg.train.ema_decay, cfg.train.epochs) == (64, 2e-5, 0.9999, 75)
    assert cfg.sampler.options == {"variance": "beta", "clip_denoised": False}
    assert cfg.sample.trajectory_steps == [0, 15, 50, 100, 200, 300, 400, 550, 700, 999]


# --- --set overrides ---------------------------------------------------------------------------------


def test_set_good_override_is_applied():
    result = invoke("validate", str(SMOKE), "--set", "train.batch_size=32", "--set", "train.lr=5e-4")
    assert result.exit_code == 0, result.output
    assert "batch 32, lr 0.0005" in result.stdout
    cfg = ddpmkit.load_config(SMOKE, ["train.batch_size=32", "sampler.options.variance=posterior", "run.name=other"])
    assert cfg.train.batch_size == 32
    assert cfg.sampler.options["variance"] == "posterior"  # a bare word is taken as a string
    assert cfg.run.name == "other"


def test_set_override_that_changes_the_model():
    result = invoke(
        "validate",
        str(SMOKE),
        "--set",
        "denoiser.options.channels=[16, 32, 64, 64]",
        "--set",
        "denoiser.options.num_groups=8",
    )
    assert result.exit_code == 0, result.output
    small = invoke("validate", str(SMOKE))
    assert small.exit_code == 0
    count = lambda out: next(line for line in out.splitlines() if line.startswith("denoiser"))  # noqa: E731
    assert count(result.stdout) != count(small.stdout)


def test_set_bad_value_names_the_override():
    assert_user_error(
        invoke("validate", str(SMOKE), "--set", "train.batch_size=0"),
        "--set train.batch_size=0: train.batch_size: Input should be greater than or equal to 1",
    )
    assert_user_error(
        invoke("validate", str(SMOKE), "--set", "train.lr=fast"),
        "--set train.lr=fast: train.lr: Input should be a valid number",
    )
    line = next(i for i, text in enumerate(SMOKE.read_text().splitlines(), 1) if text.startswith("trajectory_steps"))
    assert_user_error(  # the override makes a value in the file wrong: the file's line is named
        invoke("validate", str(SMOKE), "--set", "schedule.options.num_timesteps=10"),
        f"{SMOKE}:{line}: sample.trajectory_steps: steps [10, 20, 30, 49] are not below T = 10",
    )


def test_set_unknown_key_names_the_override():
    err = assert_user_error(invoke("validate", str(SMOKE), "--set", "nope.x=1"), "--set nope.x=1: nope: unknown key")
    assert f"{SMOKE}:" not in err  # the mistake is on the command line, not in the file
    assert_user_error(
        invoke("validate", str(SMOKE), "--set", "train.bach_size=8"),
        "--set train.bach_size=8: train.bach_size: unknown key (did you mean 'batch_size'?)",
    )
    assert_user_error(
        invoke("validate", str(SMOKE), "--set", "denoiser.options.num_head=4"),
        "--set denoiser.options.num_head=4: denoiser.options.num_head: unknown key (did you mean 'num_heads'?)",
    )


@pytest.mark.parametrize(
    "item, text",
    [
        ("train.batch_size", "--set train.batch_size: expected KEY.PATH=VALUE"),
        ("=3", "expected KEY.PATH=VALUE"),
        ("train..lr=1", "expected KEY.PATH=VALUE"),
        ("train.batch_size.x=1", "--set train.batch_size.x=1: 'batch_size' is not a table"),
    ],
)
def test_set_malformed(item, text):
    assert_user_error(invoke("validate", str(SMOKE), "--set", item), text)


def test_messages_quoting_brackets_are_printed_verbatim():
    """rich markup must not eat or choke on user text such as '[true,false]' or '[/x]'."""
    err = assert_user_error(
        invoke("validate", str(SMOKE), "--set", "denoiser.options.attentions=[true,false]"),
        "--set denoiser.options.attentions=[true,false]: denoiser.options.attentions: needs one entry per layer (4), "
        "got 2",
    )
    assert err.count("\n") == 1
    assert_user_error(invoke("validate", str(SMOKE), "--set", "run.name=[/x]"), "--set run.name=[/x]: run.name:")


def test_validate_without_argument_is_a_usage_error():
    result = invoke("validate")
    assert result.exit_code == 2
    assert "Traceback" not in result.output


# --- version, help, list-plugins -------------------------------------------------------------------------


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"ddpmkit {ddpmkit.__version__}"
    from importlib import metadata

    assert ddpmkit.__version__ == metadata.version("ddpmkit")


def test_help_lists_the_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("list-plugins", "validate", "run", "sample", "--version"):
        assert command in result.stdout, command
    assert invoke().exit_code in (0, 2)  # no arguments shows the help


def test_list_plugins_table():
    result = invoke("list-plugins")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    for kind, name in [("schedule", "linear"), ("denoiser", "unet"), ("sampler", "ddpm"), ("objective", "flow")]:
        (row,) = [line for line in lines if f" {name} " in line and f" {kind} " in line]
        cells = [c.strip() for c in row.strip("│ ").split("│")]
        assert cells == [kind, name, f"ddpmkit:{name}", ddpmkit.__version__, "ok"], cells


def test_list_plugins_json():
    result = invoke("list-plugins", "--json")
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    assert rows == [
        {
            "kind": kind,
            "name": name,
            "qualified_name": f"ddpmkit:{name}",
            "plugin": plugin,
            "distribution": "ddpmkit",
            "version": ddpmkit.__version__,
            "status": "ok",
            "error": None,
        }
        for kind, name, plugin in [
            ("schedule", "betas", "builtin"),
            ("schedule", "cosine", "builtin"),
            ("schedule", "linear", "builtin"),
            ("denoiser", "diffusers-unet", "builtin"),
            ("denoiser", "unet", "builtin"),
            ("sampler", "ddim", "builtin"),
            ("sampler", "ddpm", "builtin"),
            ("sampler", "diffusers", "builtin"),
            ("sampler", "dpmpp-2m", "builtin"),
            ("sampler", "heun", "builtin"),
            ("objective", "ddpm", "builtin"),
            ("objective", "edm", "builtin"),
            ("objective", "flow", "builtin"),
            ("events", "metrics", "metrics"),
            ("events", "tensorboard", "tensorboard"),
            ("events", "wandb", "wandb"),
        ]
    ]


# --- real subprocesses ---------------------------------------------------------------------------------


def test_console_script_version_and_list_plugins():
    exe = shutil.which("ddpmkit", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("the ddpmkit console script is not installed next to this Python")
    proc = subprocess.run([exe, "--version"], capture_output=True, text=True, env=env_without_switch(), timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"ddpmkit {ddpmkit.__version__}"
    proc = subprocess.run([exe, "list-plugins"], capture_output=True, text=True, env=env_without_switch(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    for word in ("linear", "unet", "ddpm", "ddpmkit", "ddpmkit:linear"):
        assert word in proc.stdout


def test_subprocess_validate_and_set():
    base = [sys.executable, "-m", "ddpmkit", "validate", str(SMOKE)]
    proc = subprocess.run(base, capture_output=True, text=True, env=env_without_switch(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "112,313 parameters" in proc.stdout
    proc = subprocess.run(
        base + ["--set", "train.batch_size=0"], capture_output=True, text=True, env=env_without_switch(), timeout=120
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == "error: --set train.batch_size=0: train.batch_size: Input should be greater than or equal to 1"
    )
    assert proc.stdout == ""
