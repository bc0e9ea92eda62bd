"""Every config mistake a user can make: one readable line with file:line and the dotted key path, exit code 2.

Each bad config is configs/smoke.toml with one thing changed, written to tmp_path and checked through
`ddpmkit validate FILE` (Typer's CliRunner on the real app, plus a few real subprocesses).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ddpmkit
from ddpmkit import ConfigError
from ddpmkit.commands import app
from ddpmkit.registry import discovery as plugins

ROOT = Path(__file__).resolve().parents[1]
SMOKE = (ROOT / "configs" / "smoke.toml").read_text()


pytestmark = pytest.mark.usefixtures("fresh_plugin_registry")


def edited(old: str, new: str) -> tuple[str, int]:
    """The smoke config with ``old`` replaced by ``new`` (exactly once), and the 1-based line of ``new``."""
    assert SMOKE.count(old) == 1, old
    text = SMOKE.replace(old, new)
    return text, text[: text.index(new)].count("\n") + 1


def validate(*args: str):
    result = CliRunner().invoke(app, ["validate", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def assert_user_error(result, *parts: str) -> str:
    """Exit code 2, one 'error:' message on stderr containing every part, nothing on stdout, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    err = result.stderr
    assert err.startswith("error: "), err
    assert "Traceback" not in err and "Traceback" not in result.stdout
    assert result.stdout == ""
    for part in parts:
        assert part in err, (part, err)
    return err


# (id, old text, new text, expected message after "FILE:LINE: ")
CASES = [
    ("toml-syntax", "lr = 1e-3", "lr = = 1e-3", "invalid TOML"),
    ("toml-unclosed-table", "[sampler]", "[sampler", "invalid TOML"),
    ("unknown-key", "batch_size = 16", "bach_size = 16", "train.bach_size: unknown key (did you mean 'batch_size'?)"),
    ("unknown-key-no-suggestion", "epochs = 2", "epochs = 2\nzzz_qqq = 1", "train.zzz_qqq: unknown key"),
    ("unknown-table", "[sample]", "[sampel]", "sampel: unknown key (did you mean 'sample'?)"),
    (
        "unknown-option",
        "num_heads = 2",
        "num_head = 2",
        "denoiser.options.num_head: unknown key (did you mean 'num_heads'?)",
    ),
    (
        "unknown-schedule-option",
        "beta_end = 0.2",
        "beta_ned = 0.2",
        "schedule.options.beta_ned: unknown key (did you mean 'beta_end'?)",
    ),
    ("wrong-type-int", "batch_size = 16", 'batch_size = "big"', "train.batch_size: Input should be a valid integer"),
    ("wrong-type-float-to-int", "epochs = 2", "epochs = 2.5", "train.epochs: Input should be a valid integer"),
    (
        "wrong-type-bool",
        "ema_warmup = true",
        'ema_warmup = "sometimes"',
        "train.ema_warmup: Input should be a valid boolean",
    ),
    (
        "wrong-type-option",
        "num_groups = 4",
        'num_groups = "four"',
        "denoiser.options.num_groups: Input should be a valid integer",
    ),
    (
        "wrong-type-list",
        "channels = [8, 16, 32, 32]",
        "channels = 8",
        "denoiser.options.channels: Input should be a valid list",
    ),
    (
        "T-zero",
        "num_timesteps = 50",
        "num_timesteps = 0",
        "schedule.options.num_timesteps: Input should be greater than or equal to 1",
    ),
    (
        "T-negative",
        "num_timesteps = 50",
        "num_timesteps = -3",
        "schedule.options.num_timesteps: Input should be greater than or equal to 1",
    ),
    ("beta-end-ge-1", "beta_end = 0.2", "beta_end = 1.5", "schedule.options.beta_end: Input should be less than 1"),
    ("beta-end-eq-1", "beta_end = 0.2", "beta_end = 1.0", "schedule.options.beta_end: Input should be less than 1"),
    (
        "beta-start-zero",
        "beta_start = 1e-3",
        "beta_start = 0.0",
        "schedule.options.beta_start: Input should be greater than 0",
    ),
    (
        "beta-start-negative",
        "beta_start = 1e-3",
        "beta_start = -0.1",
        "schedule.options.beta_start: Input should be greater than 0",
    ),
    ("lr-zero", "lr = 1e-3", "lr = 0", "train.lr: Input should be greater than 0"),
    ("lr-negative", "lr = 1e-3", "lr = -1e-3", "train.lr: Input should be greater than 0"),
    ("ema-one", "ema_decay = 0.9", "ema_decay = 1.0", "train.ema_decay: Input should be less than 1"),
    (
        "ema-negative",
        "ema_decay = 0.9",
        "ema_decay = -0.1",
        "train.ema_decay: Input should be greater than or equal to 0",
    ),
    ("epochs-zero", "epochs = 2", "epochs = 0", "train.epochs: Input should be greater than or equal to 1"),
    ("batch-zero", "batch_size = 16", "batch_size = 0", "train.batch_size: Input should be greater than or equal to 1"),
    (
        "checkpoint-every-zero",
        "checkpoint_every = 3",
        "checkpoint_every = 0",
        "train.checkpoint_every: Input should be greater than or equal to 1",
    ),
    (
        "num-images-negative",
        "num_images = 8",
        "num_images = -1",
        "sample.num_images: Input should be greater than or equal to 0",
    ),
    (
        "num-samples-zero",
        "num_samples = 64",
        "num_samples = 0",
        "data.num_samples: Input should be greater than or equal to 1",
    ),
    ("seed-negative", "seed = 0", "seed = -1", "run.seed: Input should be greater than or equal to 0"),
    (
        "channels-odd-length",
        "channels = [8, 16, 32, 32]",
        "channels = [8, 16, 32]",
        "denoiser.options.channels: needs an even number (>= 2) of layers, got 3",
    ),
    (
        "attentions-wrong-length",
        "attentions = [false, true, false, false]",
        "attentions = [false, true, false]",
        "denoiser.options.attentions: needs one entry per layer (4), got 3",
    ),
    (
        "upscales-wrong-length",
        "upscales = [false, false, true, true]",
        "upscales = [false, false, true, true, true]",
        "denoiser.options.upscales: needs one entry per layer (4), got 5",
    ),
    (
        "channels-flow",
        "channels = [8, 16, 32, 32]",
        "channels = [8, 16, 32, 40]",
        "denoiser.options.channels: channels[3] must be 32",
    ),
    (
        "unknown-denoiser",
        'name = "unet"',
        'name = "unett"',
        "denoiser.name: unknown denoiser 'unett'; installed: diffusers-unet, unet",
    ),
    (
        "unknown-sampler",
        'name = "ddpm"',
        'name = "plms"',
        "sampler.name: unknown sampler 'plms'; installed: ddim, ddpm",
    ),
    (
        "unknown-schedule",
        'name = "linear"',
        'name = "quadratic"',
        "schedule.name: unknown schedule 'quadratic'; installed: betas, cosine, linear",
    ),
    (
        "trajectory-step-ge-T",
        "trajectory_steps = [0, 5, 10, 20, 30, 49]",
        "trajectory_steps = [0, 5, 50]",
        "sample.trajectory_steps: steps [50] are not below T = 50",
    ),
    (
        "trajectory-step-negative",
        "trajectory_steps = [0, 5, 10, 20, 30, 49]",
        "trajectory_steps = [-1, 5]",
        "sample.trajectory_steps: steps must be >= 0",
    ),
    ("run-name", 'name = "smoke"', 'name = "../evil"', "run.name: use letters, digits"),
    ("run-device", 'device = "cpu"', 'device = "gpu"', "run.device: must be auto, cpu, cuda, cuda:N or mps"),
    (
        "data-channels",
        "image_size = 16",
        "image_size = 16\nchannels = 2",
        'data.channels: must be 1 (grayscale), 3 (RGB) or "auto"; got 2',
    ),
    (
        "dataset",
        'dataset = "synthetic"',
        'dataset = "cifar"',
        "data.dataset: Input should be 'mnist', 'fashion-mnist', 'cifar10', 'image-folder', 'hf' or 'synthetic'",
    ),
    (
        "variance",
        '[sampler]\nname = "ddpm"',
        '[sampler]\nname = "ddpm"\noptions.variance = "huge"',
        "sampler.options.variance: Input should be 'beta' or 'posterior'",
    ),
]


@pytest.mark.parametrize("old, new, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_through_the_cli(tmp_path, old, new, expected):
    text, line = edited(old, new)
    line += new.count("\n")  # where ``new`` adds a line, the mistake is on its last line
    path = tmp_path / "bad.toml"
    path.write_text(text)
    err = assert_user_error(validate(str(path)), f"{path}:{line}: {expected}")
    assert err.count("\n") == 1, err  # one line

    # the Python API raises the same message as ConfigError
    with pytest.raises(ConfigError) as info:
        ddpmkit.load_config(path)
    assert f"{path}:{line}: {expected}" in str(info.value)


def test_betas_not_increasing(tmp_path):
    text, _ = edited("beta_end = 0.2", "beta_end = 0.0001")
    path = tmp_path / "bad.toml"
    path.write_text(text)
    table_line = text.splitlines().index("[schedule.options]") + 1
    assert_user_error(
        validate(str(path)),
        f"{path}:{table_line}: schedule.options: betas must increase: beta_end (0.0001) must be greater than "
        "beta_start (0.001)",
    )
    text, _ = edited("beta_end = 0.2", "beta_end = 0.001")  # equal is not increasing either
    path.write_text(text)
    assert_user_error(validate(str(path)), "schedule.options: betas must increase")


def test_channels_not_divisible_by_groups(tmp_path):
    text, _ = edited("num_groups = 4", "num_groups = 3")
    path = tmp_path / "bad.toml"
    path.write_text(text)
    channels_line = text.splitlines().index("channels = [8, 16, 32, 32]") + 1
    assert_user_error(
        validate(str(path)),
        f"{path}:{channels_line}: denoiser.options.channels: channels[0] = 8 is not divisible by num_groups = 3",
    )


def test_dotted_keys_and_inline_tables_are_located(tmp_path):
    text = SMOKE.replace('[sampler]\nname = "ddpm"', '[sampler]\nname = "ddpm"\noptions = { variance = "wide" }')
    path = tmp_path / "bad.toml"
    path.write_text(text)
    line = text.splitlines().index('options = { variance = "wide" }') + 1
    assert_user_error(
        validate(str(path)), f"{path}:{line}: sampler.options.variance: Input should be 'beta' or 'posterior'"
    )


def test_every_problem_is_reported(tmp_path):
    text = SMOKE.replace("lr = 1e-3", "lr = 0").replace("epochs = 2", "epochs = -1")
    path = tmp_path / "bad.toml"
    path.write_text(text)
    err = assert_user_error(validate(str(path)), "train.lr: Input should be greater than 0", "train.epochs:")
    assert err.count(str(path)) == 2


def test_unknown_plugin_lists_the_installed_ones_even_with_defaults(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[denoiser]\nname = "transformer"\n')
    assert_user_error(
        validate(str(path)), f"{path}:2: denoiser.name: unknown denoiser 'transformer'; installed: diffusers-unet, unet"
    )


def test_unet_needs_divisible_image_size(tmp_path):
    """A user can ask for an image size the layer count cannot halve: an error line, not a traceback."""
    text, _ = edited("image_size = 16", "image_size = 18")
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert_user_error(validate(str(path)), "needs image sides divisible by 4", "18x18")


def test_only_channels_given_reports_the_default_lists(tmp_path):
    text = SMOKE.replace("attentions = [false, true, false, false]\n", "").replace(
        "upscales = [false, false, true, true]\n", ""
    )
    path = tmp_path / "bad.toml"
    path.write_text(text)
    assert_user_error(validate(str(path)), "denoiser.options.attentions: needs one entry per layer (4), got 6")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    assert_user_error(validate(str(path)), f"{path}: no such config file")


def test_directory_instead_of_file(tmp_path):
    assert_user_error(validate(str(tmp_path)), f"{tmp_path}: cannot read config")


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[run]\nname = "caf\xe9"\n')
    assert_user_error(validate(str(path)), f"{path}: cannot read config")


def test_empty_file_is_the_defaults(tmp_path):
    path = tmp_path / "empty.toml"
    path.write_text("")
    cfg = ddpmkit.load_config(path)
    assert (cfg.train.batch_size, cfg.train.lr, cfg.train.ema_decay, cfg.train.epochs) == (64, 2e-5, 0.9999, 75)
    assert (cfg.schedule.name, cfg.denoiser.name, cfg.sampler.name) == ("linear", "unet", "ddpm")
    assert cfg.num_timesteps == 1000 and cfg.image_shape == (1, 32, 32)
    assert cfg.sample.trajectory_steps == [0, 15, 50, 100, 200, 300, 400, 550, 700, 999]
    # the options tables are filled in by each plugin's own Options model
    assert cfg.denoiser.options["channels"] == [64, 128, 256, 512, 512, 384]
    assert cfg.sampler.options == {"variance": "beta", "clip_denoised": False}


# --- real subprocesses: what a user sees in a terminal ----------------------------------------------------


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != plugins.DISABLE_ENV}
    return subprocess.run(
        [sys.executable, "-m", "ddpmkit", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120
    )


def test_subprocess_bad_option_and_syntax_error(tmp_path):
    text, line = edited("channels = [8, 16, 32, 32]", "channels = [8, 16, 32]")
    path = tmp_path / "bad.toml"
    path.write_text(text)
    proc = run_cli("validate", str(path))
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert (
        proc.stderr.strip()
        == f"error: {path}:{line}: denoiser.options.channels: needs an even number (>= 2) of layers, got 3"
    )

    text, line = edited("lr = 1e-3", "lr = = 1e-3")
    path.write_text(text)
    proc = run_cli("validate", str(path))
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {path}:{line}: invalid TOML")
    assert "Traceback" not in proc.stderr


def test_subprocess_relative_path_and_missing_file(tmp_path):
    (tmp_path / "c.toml").write_text(SMOKE.replace("lr = 1e-3", "lr = -1.0"))
    line = SMOKE.splitlines().index("lr = 1e-3") + 1
    proc = run_cli("validate", "c.toml", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: c.toml:{line}: train.lr: Input should be greater than 0"
    proc = run_cli("validate", "missing.toml", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: missing.toml: no such config file"


def test_the_default_trajectory_steps_follow_T(tmp_path):
    """Without sample.trajectory_steps the strip is the tutorial's at the same fractions of any T; a config with
    T = 200 validates without rewriting them (the tutorial's list has steps >= 200)."""
    from ddpmkit.run.config import default_trajectory_steps

    assert default_trajectory_steps(1000) == [0, 15, 50, 100, 200, 300, 400, 550, 700, 999]
    assert default_trajectory_steps(200) == [0, 3, 10, 20, 40, 60, 80, 110, 139, 199]
    assert default_trajectory_steps(2) == [0, 1]
    text = SMOKE.replace("trajectory_steps = [0, 5, 10, 20, 30, 49]\n", "")
    path = tmp_path / "t200.toml"
    path.write_text(text.replace("num_timesteps = 50", "num_timesteps = 200"))
    cfg = ddpmkit.load_config(path)
    assert cfg.sample.trajectory_steps == [0, 3, 10, 20, 40, 60, 80, 110, 139, 199]
    assert ddpmkit.load_config(ROOT / "configs" / "smoke.toml").sample.trajectory_steps == [0, 5, 10, 20, 30, 49]
