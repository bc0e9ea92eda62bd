"""Plugin API 2, with plugins registered in-process (no install, no subprocess; see conftest.plugin_module):
one-line errors naming the plugin, the kit's new checks, qualified names, plugin options, sampler steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from runconfigs import invoke, write_config

import ddpmkit
from ddpmkit.testing import assert_conforms, check_component

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"
TINY_UNET = dict(
    channels=[8, 16, 32, 32],
    attentions=[False, False, False, False],
    upscales=[False, False, True, True],
    num_groups=4,
    num_heads=2,
)

COMPONENTS = """
import torch
import ddpmkit
from ddpmkit import Denoiser, NoiseSchedule, Sampler


class Tiny(Denoiser):
    '''A 1x1 convolution of x and a learned per-step scale: small, but uses t per image.'''

    def __init__(self, options=None, *, image_shape, num_timesteps):
        super().__init__(options, image_shape=image_shape, num_timesteps=num_timesteps)
        self.conv = torch.nn.Conv2d(image_shape[0], image_shape[0], 1)
        self.scale = torch.nn.Parameter(torch.linspace(0.5, 1.5, num_timesteps))

    def forward(self, x_t, t):
        return self.conv(x_t) * self.scale[t].view(-1, 1, 1, 1)
"""


def one_line_error(result, *parts: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


def denoiser_plugin(plugin_module, body: str, name: str = "bad"):
    return plugin_module(
        COMPONENTS
        + body
        + f"""

@ddpmkit.hookimpl
def register_denoisers(register):
    register({name!r}, Bad)
"""
    )


def config_with(tmp_path: Path, **replace: str) -> Path:
    path = write_config(tmp_path, "c", epochs=1, num_images=2, trajectory_images=1)
    text = path.read_text()
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    path.write_text(text)
    return path


# --- plugin errors are one line naming the plugin -------------------------------------------------------

LABEL = "(plugin 'fake', ddpmkit-fake 1.0)"


def test_a_denoiser_raising_while_built_is_one_line(plugin_module, tmp_path):
    denoiser_plugin(
        plugin_module,
        """
class Bad(Tiny):
    def __init__(self, options=None, *, image_shape, num_timesteps):
        super().__init__(options, image_shape=image_shape, num_timesteps=num_timesteps)
        raise ValueError("only 64x64 images, sorry")
""",
    )
    cfg = config_with(tmp_path, **{'name = "unet"': 'name = "bad"'})
    cfg.write_text(cfg.read_text().split("[denoiser.options]")[0] + "[sampler]" + cfg.read_text().split("[sampler]")[1])
    one_line_error(
        invoke("validate", str(cfg)), f"denoiser 'bad' {LABEL} failed to build: ValueError: only 64x64 images"
    )
    # --debug shows the traceback behind it
    debug = invoke("--debug", "validate", str(cfg))
    assert debug.exit_code == 2 and "Traceback" in debug.stderr and "only 64x64 images" in debug.stderr


def test_a_denoiser_returning_the_wrong_shape_fails_validate(plugin_module, tmp_path):
    denoiser_plugin(
        plugin_module,
        """
class Bad(Tiny):
    def forward(self, x_t, t):
        return super().forward(x_t, t)[:, :, ::2]
""",
    )
    cfg = config_with(tmp_path)
    cfg.write_text(cfg.read_text().replace('name = "unet"', 'name = "bad"').replace("[denoiser.options]", "[x]"))
    cfg.write_text(cfg.read_text().split("[x]")[0] + "[sampler]" + cfg.read_text().split("[sampler]")[1])
    one_line_error(
        invoke("validate", str(cfg)),
        f"denoiser 'bad' {LABEL} failed a forward pass: ValueError: forward returned shape (2, 1, 4, 8)",
    )


def test_a_denoiser_failing_only_in_training_is_named(plugin_module, tmp_path):
    denoiser_plugin(
        plugin_module,
        """
class Bad(Tiny):
    def forward(self, x_t, t):
        if self.training:
            raise RuntimeError("CUDA error: device-side assert triggered\\nmore lines of torch detail")
        return super().forward(x_t, t)
""",
    )
    cfg = config_with(tmp_path)
    cfg.write_text(cfg.read_text().replace('name = "unet"', 'name = "bad"').replace("[denoiser.options]", "[x]"))
    cfg.write_text(cfg.read_text().split("[x]")[0] + "[sampler]" + cfg.read_text().split("[sampler]")[1])
    one_line_error(
        invoke("run", str(cfg)),
        f"denoiser 'bad' {LABEL} failed in training: RuntimeError: CUDA error",
        "--debug shows all",
    )


def test_a_schedule_with_nan_betas_fails_validate_naming_it(plugin_module, tmp_path):
    plugin_module("""
import torch
import ddpmkit

class Nan(ddpmkit.NoiseSchedule):
    def make_betas(self):
        b = torch.linspace(1e-4, 0.02, self.options.num_timesteps, dtype=torch.float64)
        b[3] = float("nan")
        return b

@ddpmkit.hookimpl
def register_schedules(register):
    register("nan", Nan)
""")
    cfg = config_with(tmp_path, **{'name = "linear"': 'name = "nan"', "beta_start = 1e-3\nbeta_end = 0.2\n": ""})
    one_line_error(invoke("validate", str(cfg)), f"schedule 'nan' {LABEL}", "non-finite betas")


@pytest.mark.parametrize(
    "body, expected, code",
    [
        (
            "raise KeyError('no such buffer')",
            "sampler 'bad' (plugin 'fake', ddpmkit-fake 1.0) failed while sampling: KeyError: 'no such buffer'",
            2,
        ),
        ("return torch.full(shape, float('nan'))", "returned non-finite values in 100.0% of the pixels", 2),
        ("return torch.full(shape, 3.0)", "returned values in [3, 3]; 100.0% of the pixels lie outside [-1, 1]", 0),
    ],
)
def test_sampler_failures_are_reported_naming_it(plugin_module, tmp_path, body, expected, code):
    plugin_module(f"""
import torch
import ddpmkit

class Bad(ddpmkit.Sampler):
    def sample(self, denoiser, schedule, shape, *, generator, callback=None):
        {body}

@ddpmkit.hookimpl
def register_samplers(register):
    register("bad", Bad)
""")
    cfg = config_with(tmp_path, **{'name = "ddpm"': 'name = "bad"'})
    result = invoke("run", str(cfg))
    assert result.exit_code == code, result.output
    assert expected in " ".join(result.stderr.split()), result.stderr
    assert "Traceback" not in result.stderr


# --- the kit's new checks ------------------------------------------------------------------------------------


def failed_checks(kind: str, name: str, **kwargs) -> dict[str, str]:
    return {r.check: r.detail for r in check_component(kind, name, **kwargs) if not r.passed}


def test_the_kit_catches_a_denoiser_that_ignores_t_or_uses_t0(plugin_module):
    plugin_module(
        COMPONENTS
        + """
class IgnoresT(Tiny):
    def forward(self, x_t, t):
        return self.conv(x_t)

class FirstT(Tiny):
    def forward(self, x_t, t):
        return self.conv(x_t) * self.scale[t[0]]

class WrongElsewhere(Tiny):
    def forward(self, x_t, t):
        out = super().forward(x_t, t)
        return out if x_t.shape[-1] == 32 else out[..., :-1]

@ddpmkit.hookimpl
def register_denoisers(register):
    register("tiny", Tiny)
    register("ignores-t", IgnoresT)
    register("first-t", FirstT)
    register("wrong-elsewhere", WrongElsewhere)
"""
    )
    assert failed_checks("denoiser", "tiny") == {}
    # (its per-step scale then gets no gradient either)
    assert set(failed_checks("denoiser", "ignores-t")) == {"uses t per image", "gradients reach all parameters"}
    assert "t[0]" in failed_checks("denoiser", "first-t")["uses t per image"]
    assert "raise ddpmkit.ConfigError" in failed_checks("denoiser", "wrong-elsewhere")["other image shapes"]
    assert_conforms("denoiser", "tiny", image_shape=(3, 12, 12), num_timesteps=50)


def test_the_kit_checks_unet_at_other_shapes_and_options():
    results = {
        r.check: r
        for r in check_component(
            "denoiser", "unet", dict(TINY_UNET, prediction="v"), image_shape=(3, 16, 16), num_timesteps=50
        )
    }
    assert all(r.passed for r in results.values()), [r for r in results.values() if not r.passed]
    assert results["prediction target"].detail == "v"
    assert "(3, 17, 17) refused" in results["other image shapes"].detail  # 17 is not divisible by 4
    assert "(1, 16, 16) ok" in results["other image shapes"].detail


def test_the_kit_wants_float64_betas(plugin_module):
    plugin_module("""
import torch
import ddpmkit

class Single(ddpmkit.NoiseSchedule):
    def make_betas(self):
        return torch.linspace(1e-4, 0.02, self.options.num_timesteps)

@ddpmkit.hookimpl
def register_schedules(register):
    register("single", Single)
""")
    assert set(failed_checks("schedule", "single")) == {"make_betas is float64"}


WRONG_DDIM = """
import torch
import ddpmkit
from ddpmkit.diffusion import ReverseStep, predict_x0_eps, alpha_bar

class WrongDDIM(ddpmkit.Sampler):
    '''DDIM at 50 steps that forgets the sqrt on abar_prev: a plausible bug.'''

    def reverse_steps(self, schedule):
        ts = list(range(980, -1, -20))
        return [ReverseStep(t, p, 0.0, 0.0) for t, p in zip(ts, ts[1:] + [-1])]

    def sample(self, denoiser, schedule, shape, *, generator, callback=None):
        x = torch.randn(shape, generator=generator)
        for i, step in enumerate(self.reverse_steps(schedule)):
            x0, eps = predict_x0_eps(denoiser, schedule, x, step.t)
            ab_prev = alpha_bar(schedule, step.t_prev)
            x = ab_prev * x0 + (1 - ab_prev) ** 0.5 * eps
            if callback:
                callback(i, step.t, x)
        return x.clamp(-1, 1)

@ddpmkit.hookimpl
def register_samplers(register):
    register("wrong-ddim", WrongDDIM)
"""


def test_the_kit_passes_a_correct_50_step_ddim_and_fails_a_wrong_one(plugin_module):
    assert failed_checks("sampler", "ddim") == {}
    assert failed_checks("sampler", "ddim", options={"steps": 10, "eta": 0.5, "spacing": "trailing"}) == {}
    plugin_module(WRONG_DDIM)
    failed = failed_checks("sampler", "wrong-ddim")
    assert "matches the Gaussian oracle" in failed and "exact for its 50 steps" in failed["matches the Gaussian oracle"]


def test_check_plugins_takes_options(plugin_module):
    result = invoke("check-plugins", "ddim", "--set", "steps=10", "--set", "spacing=trailing", "--json")
    assert result.exit_code == 0, result.output
    detail = {r["check"]: r["detail"] for r in json.loads(result.stdout)}
    assert "exact for its 10 steps" in detail["matches the Gaussian oracle"]
    assert detail["callback sees the listed steps"] == "10 steps, t from 999 to 99"
    one_line_error(invoke("check-plugins", "ddim", "--set", "steps=0"), "sampler.options.steps")
    one_line_error(invoke("check-plugins", "ddim", "ddpm", "--set", "steps=3"), "exactly one component NAME")


# --- names that cannot be hijacked ---------------------------------------------------------------------------

EVIL_LINEAR = """
import ddpmkit

class Evil(ddpmkit.NoiseSchedule):
    def make_betas(self):
        raise RuntimeError("hijacked")

@ddpmkit.hookimpl
def register_schedules(register):
    register("linear", Evil)
"""


def test_a_plugin_named_linear_leaves_configs_and_checkpoints_working(plugin_module, tmp_path):
    cfg = write_config(tmp_path, "old", epochs=1, num_images=0, trajectory_images=0)
    assert invoke("run", str(cfg)).exit_code == 0
    run = tmp_path / "runs" / "old"
    # make the checkpoint look like one from before qualified names: plain names, no components
    (ckpt,) = sorted((run / "checkpoints").iterdir())[-1:]
    state = json.loads((ckpt / "state.json").read_text())
    del state["components"], state["prediction"]
    for kind in ("schedule", "denoiser"):
        state["identity"][f"{kind}.name"] = state["config"][kind]["name"]
    state["identity"].pop("denoiser.options.prediction")
    state["config"]["denoiser"]["options"].pop("prediction")
    (ckpt / "state.json").write_text(json.dumps(state))

    plugin_module(EVIL_LINEAR, name="evil", distribution="ddpmkit-evil")
    validated = invoke("validate", str(SMOKE))
    assert validated.exit_code == 0, validated.output
    assert "schedule   ddpmkit:linear" in validated.stdout
    assert "'evil' (ddpmkit-evil 1.0) as ddpmkit-evil:linear; using ddpmkit's own (ddpmkit:linear)" in (
        " ".join(validated.stderr.split())
    )
    sampled = invoke("sample", str(run), "--num", "2", "--out", str(tmp_path / "s.png"))
    assert sampled.exit_code == 0, sampled.output
    resumed = invoke("run", str(cfg), "--set", "train.epochs=2")
    assert resumed.exit_code == 0, resumed.output
    assert "resuming from" in resumed.stdout
    with pytest.raises(
        ddpmkit.PluginCodeError,
        match=r"schedule 'linear' \(plugin 'evil', ddpmkit-evil 1.0\) failed to build: RuntimeError: hijacked",
    ):
        ddpmkit.create_schedule("ddpmkit-evil:linear")


def test_sample_keeps_the_runs_sampler_options_and_follows_its_steps(tmp_path):
    cfg = write_config(tmp_path, "d", epochs=1, num_images=2, trajectory_images=1)
    cfg.write_text(cfg.read_text().replace('name = "ddpm"', 'name = "ddim"\n\n[sampler.options]\nsteps = 5'))
    result = invoke("run", str(cfg))
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    # T = 20, steps 16, 12, 8, 4, 0; asked for 0, 5, 10, 19
    assert (
        "trajectory.png: ddim visits 5 of 20 steps; showing the visited t nearest to those asked for: 16, 12, 4, 0"
        in text
    )
    from PIL import Image

    strip = Image.open(tmp_path / "runs" / "d" / "trajectory.png")
    assert strip.size[0] == 4 * 10 + 2  # four columns of 8 pixels and 2 of padding
    run = tmp_path / "runs" / "d"
    for name in ("ddim", "ddpmkit:ddim"):
        r = invoke("sample", str(run), "--sampler", name, "--num", "2", "--out", str(tmp_path / "a.png"))
        assert r.exit_code == 0 and "(5 steps)" in r.stdout, r.output
    r = invoke("sample", str(run), "--sampler", "ddpm", "--num", "2", "--out", str(tmp_path / "b.png"))
    assert r.exit_code == 0 and "(20 steps)" in r.stdout, r.output
    one_line_error(
        invoke("sample", str(run), "--set", "schedule.options.beta_end=0.1", "--out", str(tmp_path / "c.png")),
        "--set schedule.options.beta_end=0.1: the weights were trained with the checkpoint's schedule",
    )


def test_a_v_predicting_unet_trains_with_the_v_loss_and_records_it(tmp_path):
    cfg = write_config(tmp_path, "v", epochs=1, num_images=2, trajectory_images=0)
    result = invoke("run", str(cfg), "--set", "denoiser.options.prediction=v")
    assert result.exit_code == 0, result.output
    assert "predicting v" in result.stdout
    (ckpt,) = sorted((tmp_path / "runs" / "v" / "checkpoints").iterdir())[-1:]
    state = json.loads((ckpt / "state.json").read_text())
    assert state["prediction"] == "v" and state["identity"]["denoiser.options.prediction"] == "v"
    refused = invoke("run", str(cfg), "--set", "denoiser.options.prediction=x0", "--set", "train.epochs=2")
    one_line_error(refused, "denoiser.options.prediction (checkpoint: 'v', config: 'x0')")


# --- plugin options -------------------------------------------------------------------------------------------

SPY = """
from pydantic import BaseModel, ConfigDict, Field
import ddpmkit

class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="where to write")
    every: int = Field(1, ge=1)

@ddpmkit.hookimpl
def step_end(step, options):
    if step % options.every == 0:
        with open(options.path, "a") as f:
            f.write(f"{step}\\n")

@ddpmkit.hookimpl
def train_end(step, interrupted, options):
    with open(options.path, "a") as f:
        f.write(f"end {step} {interrupted}\\n")
"""


def test_event_plugins_get_their_own_validated_options(plugin_module, tmp_path):
    plugin_module(SPY, name="spy", distribution="ddpmkit-spy")
    log = tmp_path / "spy.log"
    cfg = write_config(tmp_path, "p", epochs=2, num_images=0, trajectory_images=0)
    cfg.write_text(cfg.read_text() + f'\n[plugins.spy]\npath = "{log}"\nevery = 2\n')
    result = invoke("run", str(cfg))
    assert result.exit_code == 0, result.output
    assert log.read_text().split("\n") == ["2", "4", "6", "8", "end 8 False", ""]
    one_line_error(
        invoke("validate", str(cfg), "--set", "plugins.spy.every=0"),
        "--set plugins.spy.every=0: plugins.spy.every: Input should be greater than or equal to 1",
    )
    text = cfg.read_text()
    cfg.write_text(text.replace("\nevery = 2", "\nevry = 2"))
    lines = invoke("validate", str(cfg)).stderr
    assert f"{cfg}:" in lines and "plugins.spy.evry: unknown key (did you mean 'every'?)" in lines
    cfg.write_text(text + "\n[plugins.nope]\nx = 1\n")
    assert "plugins.nope: no plugin named 'nope'" in invoke("validate", str(cfg)).stderr
    described = invoke("describe", "spy")
    assert described.exit_code == 0 and "every" in described.stdout and "where to write" in described.stdout


def test_train_end_gets_the_step_a_failing_hook_stopped_at(plugin_module, tmp_path):
    plugin_module(SPY, name="spy", distribution="ddpmkit-spy")
    plugin_module(
        """
import ddpmkit

@ddpmkit.hookimpl
def step_end(step):
    if step == 3:
        raise OSError("disk full")
""",
        name="flaky",
        distribution="ddpmkit-flaky",
    )
    log = tmp_path / "spy.log"
    cfg = write_config(tmp_path, "f", epochs=2, checkpoint_every=100, num_images=0, trajectory_images=0)
    cfg.write_text(cfg.read_text() + f'\n[plugins.spy]\npath = "{log}"\n')
    one_line_error(
        invoke("run", str(cfg)),
        "event hook step_end of plugin 'flaky' (ddpmkit-flaky 1.0) failed: OSError",
        "training stopped at step 3",
    )
    assert log.read_text().split("\n")[-2] == "end 3 True"


def test_log_switches_still_work_with_a_deprecation_note(tmp_path):
    cfg = write_config(tmp_path, "l", epochs=1, num_images=0, trajectory_images=0)
    cfg.write_text(cfg.read_text() + "\n[log]\nmetrics = false\n")
    result = invoke("run", str(cfg))
    assert result.exit_code == 0, result.output
    assert "log.metrics is deprecated; write [plugins.metrics] enabled = false" in " ".join(result.stderr.split())
    assert not (tmp_path / "runs" / "l" / "metrics.jsonl").exists()
    cfg.write_text(cfg.read_text().replace("[log]\nmetrics = false", "[plugins.metrics]\nenabled = false"))
    result = invoke("run", str(cfg), "--fresh")
    assert result.exit_code == 0 and "deprecated" not in result.stderr, result.output
    assert not (tmp_path / "runs" / "l" / "metrics.jsonl").exists()


def test_denoiser_device_without_parameters():
    from ddpmkit.testing import GaussianOracle

    oracle = GaussianOracle(ddpmkit.create_schedule("linear", num_timesteps=10), 0.0, 1.0)
    assert oracle.device.type == "cpu"
    model = ddpmkit.create_denoiser("unet", image_shape=(1, 8, 8), num_timesteps=10, **TINY_UNET)
    assert model.device.type == "cpu" and "_ddpmkit_device" not in model.state_dict()


def test_an_unknown_prediction_target_is_refused_naming_the_plugin(plugin_module):
    denoiser_plugin(
        plugin_module,
        """
class Bad(Tiny):
    prediction = "score"
""",
    )
    with pytest.raises(
        ddpmkit.PluginCodeError,
        match=r"denoiser 'bad' \(plugin 'fake', ddpmkit-fake 1.0\) declares "
        r"prediction = 'score'; ddpmkit knows epsilon, x0, v",
    ):
        ddpmkit.create_denoiser("bad", image_shape=(1, 8, 8), num_timesteps=10)


def test_list_plugins_never_truncates_long_distribution_names(plugin_module):
    for suffix in ("alpha", "beta"):
        plugin_module(
            COMPONENTS
            + """
@ddpmkit.hookimpl
def register_denoisers(register):
    register("tiny", Tiny)
""",
            name=suffix,
            distribution=f"ddpmkit-a-rather-long-distribution-name-{suffix}",
        )
    result = invoke("list-plugins")
    assert result.exit_code == 0 and "…" not in result.stdout, result.stdout
    # folded over lines, each qualified name is still there whole
    cells = "".join(line.split("│")[3].strip() for line in result.stdout.splitlines() if line.count("│") >= 5)
    for suffix in ("alpha", "beta"):
        assert f"ddpmkit-a-rather-long-distribution-name-{suffix}:tiny" in cells
    assert "clash" in result.stdout
