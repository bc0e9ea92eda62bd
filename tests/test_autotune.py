"""``auto`` speed modes: candidates pruned by CPU flags, the fastest measured mode chosen (a fake timer here,
whatever machine runs the tests), the measurement cached, the choice recorded and kept on resume, and an
explicit bf16 on a CPU without native bf16 warned about with both figures."""

from __future__ import annotations

import json

import pytest
import torch
from runconfigs import write_config

import ddpmkit.training.autotune as autotune
from ddpmkit.run.config import load_config
from ddpmkit.runtime.speed import SpeedModes
from ddpmkit.training.runner import RunReport, run_config

CPU = torch.device("cpu")
AVX2 = {"avx", "avx2", "fma"}
AMX = AVX2 | {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}


def _auto_config(tmp_path, name="a", precision="auto", channels_last="auto", **values):
    path = write_config(tmp_path, name, **values)
    layout = '"auto"' if channels_last == "auto" else str(channels_last).lower()
    path.write_text(
        path.read_text()
        .replace('precision = "fp32"', f'precision = "{precision}"')
        .replace("channels_last = false", f"channels_last = {layout}")
    )
    return load_config(path)


class FakeTimer:
    """Images/s per mode from a table; counts its calls."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def __call__(self, cfg, modes: SpeedModes, device):
        self.calls.append(autotune.mode_label(modes))
        return self.table[autotune.mode_label(modes)]


def test_bf16_is_pruned_without_native_support_and_measured_with_it(tmp_path):
    cfg = _auto_config(tmp_path)
    modes, pruned = autotune.candidates(cfg, CPU, flags=AVX2)
    assert [autotune.mode_label(m) for m in modes] == ["fp32", "fp32+channels-last"]
    assert "no native bf16" in pruned["bf16"]
    modes, pruned = autotune.candidates(cfg, CPU, flags=AMX)
    assert [autotune.mode_label(m) for m in modes] == ["fp32", "fp32+channels-last", "bf16", "bf16+channels-last"]
    assert not pruned


def test_the_fastest_mode_is_chosen_and_the_measurement_cached(tmp_path):
    cfg = _auto_config(tmp_path)
    cache = tmp_path / "cache.json"
    timer = FakeTimer({"fp32": 70.0, "fp32+channels-last": 71.0, "bf16": 380.0, "bf16+channels-last": 450.0})
    choice = autotune.choose(cfg, CPU, timer=timer, flags=AMX, cache=cache)
    assert autotune.mode_label(choice.modes) == "bf16+channels-last" and not choice.cached
    assert len(timer.calls) == 4 and "bf16+channels-last 450" in choice.reason()
    again = autotune.choose(cfg, CPU, timer=timer, flags=AMX, cache=cache)
    assert again.cached and again.modes == choice.modes and len(timer.calls) == 4  # no second measurement
    on_avx2 = autotune.choose(cfg, CPU, timer=timer, flags=AVX2, cache=cache)  # another CPU: measured anew
    assert autotune.mode_label(on_avx2.modes) == "fp32+channels-last" and len(timer.calls) == 6
    assert "bf16 not tried: no native bf16 on this CPU" in on_avx2.reason()
    bigger = cfg.model_copy(update={"train": cfg.train.model_copy(update={"batch_size": 16})})  # another step
    autotune.choose(bigger, CPU, timer=timer, flags=AMX, cache=cache)
    assert len(timer.calls) == 10


def test_another_ddpmkit_version_measures_anew(tmp_path, monkeypatch):
    """ddpmkit's own code (its compiled dropout, say) can change which mode is fastest: a cached figure is its
    version's."""
    cfg = _auto_config(tmp_path)
    cache = tmp_path / "cache.json"
    timer = FakeTimer({"fp32": 70.0, "fp32+channels-last": 71.0, "bf16": 380.0, "bf16+channels-last": 450.0})
    autotune.choose(cfg, CPU, timer=timer, flags=AMX, cache=cache)
    monkeypatch.setattr(autotune, "__version__", "99.0.0")
    assert not autotune.choose(cfg, CPU, timer=timer, flags=AMX, cache=cache).cached and len(timer.calls) == 8


def test_an_explicit_mode_is_measured_only_when_it_is_not_auto(tmp_path):
    cfg = _auto_config(tmp_path, precision="fp32", channels_last=False)
    timer = FakeTimer({})
    choice = autotune.choose(cfg, CPU, timer=timer, flags=AMX, cache=tmp_path / "c.json")
    assert autotune.mode_label(choice.modes) == "fp32" and timer.calls == []


def test_explicit_bf16_without_native_support_warns_with_both_figures(tmp_path):
    cfg = _auto_config(tmp_path, precision="bf16", channels_last=False)
    timer = FakeTimer({"fp32": 71.2, "bf16": 5.2})
    text = autotune.slow_mode_warning(cfg, CPU, timer=timer, flags=AVX2, cache=tmp_path / "c.json")
    assert "13.7x slower than fp32" in text and "5.2 against 71.2 images/s" in text and 'precision = "auto"' in text
    assert autotune.slow_mode_warning(cfg, CPU, timer=timer, flags=AMX, cache=tmp_path / "c.json") is None
    close = FakeTimer({"fp32": 71.2, "bf16": 60.0})
    assert autotune.slow_mode_warning(cfg, CPU, timer=close, flags=AVX2, cache=tmp_path / "d.json") is None


def test_bf16_named_where_it_is_emulated_warns_and_measures_only_its_plain_mode(tmp_path, monkeypatch):
    """With the layout and compile left "auto", an explicit bf16 is still warned about (it was not: only a config
    with no "auto" left was); and auto measures nothing of emulated bf16 beyond the plain mode that the warning's
    measurement already cached: on an AVX2-only EPYC each bf16 mode cost minutes, and validate measured for 10."""
    monkeypatch.setattr(autotune, "native_bf16", lambda device, flags=None: False)
    path = write_config(tmp_path, "b")
    path.write_text(
        path.read_text()
        .replace('precision = "fp32"', 'precision = "bf16"')
        .replace("channels_last = false", 'channels_last = "auto"\ncompile = "auto"')
    )
    cfg = load_config(path)
    cache = tmp_path / "c.json"
    timer = FakeTimer({"fp32": 71.2, "bf16": 5.2})
    text = autotune.slow_mode_warning(cfg, CPU, timer=timer, flags=AVX2, cache=cache)
    assert "13.7x slower than fp32" in text and timer.calls == ["fp32", "bf16"]
    choice = autotune.choose(cfg, CPU, timer=timer, flags=AVX2, cache=cache)
    assert autotune.mode_label(choice.modes) == "bf16" and timer.calls == ["fp32", "bf16"]  # nothing measured again
    assert "channels-last not tried: bf16 is emulated" in choice.reason() and "compile not tried" in choice.reason()
    assert autotune.measured_rate(cfg, CPU, timer=timer, flags=AVX2, cache=cache) == (choice.modes, 5.2)

    said: list[str] = []  # validate says it, first among its findings
    from ddpmkit.run.components import build_checked
    from ddpmkit.training.preflight import preflight

    monkeypatch.setenv("DDPMKIT_CACHE_DIR", str(tmp_path / "validate-cache"))
    monkeypatch.setattr(autotune, "_measured_rate", timer)
    with autotune.announced(said.append):
        findings = preflight(cfg, build_checked(cfg))
    assert findings[1].label == "speed" and "13.7x slower" in findings[1].warning
    assert sum(s.strip().startswith("measuring") for s in said) == 1, said  # fp32 and bf16, in one line
    assert "in bf16:" in findings[-1].text and "5.2 images/s" in findings[-1].text


def test_a_run_naming_bf16_where_it_is_emulated_warns_and_trains_its_plain_mode(tmp_path, monkeypatch):
    monkeypatch.setattr(autotune, "native_bf16", lambda device, flags=None: False)
    monkeypatch.setattr(autotune, "_measured_rate", FakeTimer({"fp32": 71.2, "bf16": 5.2}))
    cfg = _auto_config(tmp_path, "w", precision="bf16", epochs=1, num_images=0, trajectory_images=0)
    warned, said = [], []
    assert run_config(cfg, report=RunReport(info=said.append, warn=warned.append)) == 0
    assert any("bf16 is 13.7x slower than fp32 here" in w for w in warned), warned
    assert any("speed modes: bf16" in s and "channels-last not tried: bf16 is emulated" in s for s in said), said


def test_a_slow_measurement_ends_after_two_steps_past_the_first(tmp_path, monkeypatch):
    """A mode whose steps take seconds (emulated bf16: 12 s a step on an AVX2-only CPU) is timed from two steps after
    the first, not eight: MEASURE_SECONDS, on a fake clock that makes each step 15 s."""
    import time
    from types import SimpleNamespace

    clock = iter(range(0, 10**6, 15))  # autotune's own clock only: the loop keeps the real one
    monkeypatch.setattr(autotune, "time", SimpleNamespace(perf_counter=lambda: float(next(clock)), time=time.time))
    cfg = _auto_config(tmp_path, precision="fp32", channels_last=False)
    steps: list[int] = []
    real = autotune.train
    monkeypatch.setattr(
        autotune,
        "train",
        lambda *a, events, **k: real(
            *a, events=autotune.TrainEvents(on_step=lambda m: (steps.append(m["step"]), events.on_step(m))), **k
        ),
    )
    ips, _ = autotune.measure_training(cfg, SpeedModes(), CPU)
    assert steps == [1, 2, 3] and ips == pytest.approx(8 / 15)
    steps.clear()
    autotune.measure_training(cfg, SpeedModes(), CPU, max_seconds=None)  # ddpmkit bench: the steps it was asked for
    assert steps == list(range(1, autotune.MEASURE_WARMUP + autotune.MEASURE_STEPS + 1))


def test_sigterm_while_measuring_ends_the_command_and_caches_nothing(tmp_path, monkeypatch):
    """The training loop turns SIGTERM into a graceful stop; in a measurement that stopped the measurement only,
    and the next one started (``timeout`` could not end ``validate``). Now the command ends: exit code 130."""
    import os
    import signal

    from runconfigs import invoke

    monkeypatch.setenv("DDPMKIT_CACHE_DIR", str(tmp_path / "cache"))
    real = autotune.train

    def terminated_at_step_2(*args, events, **kwargs):
        def on_step(metrics):
            events.on_step(metrics)
            if metrics["step"] == 2:
                os.kill(os.getpid(), signal.SIGTERM)

        return real(*args, events=autotune.TrainEvents(on_step=on_step), **kwargs)

    monkeypatch.setattr(autotune, "train", terminated_at_step_2)
    r = invoke("validate", str(write_config(tmp_path, "v")))
    assert r.exit_code == 130, r.output
    assert "interrupted while measuring the speed of fp32 for v: nothing was trained, and no figure" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "cache" / autotune.CACHE_FILE).exists()


def test_a_run_records_its_choice_and_a_resume_keeps_it(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPMKIT_CACHE_DIR", str(tmp_path / "cache"))
    prefer_cl = {"fp32": 10.0, "fp32+channels-last": 20.0, "bf16": 1.0, "bf16+channels-last": 1.0}
    monkeypatch.setattr(autotune, "_measured_rate", FakeTimer(prefer_cl))
    cfg = _auto_config(tmp_path, "r", epochs=1, num_images=0, trajectory_images=0)
    said: list[str] = []
    assert run_config(cfg, report=RunReport(info=said.append)) == 0
    assert any("speed modes: fp32+channels-last (measured images/s: fp32+channels-last 20" in line for line in said), (
        said
    )
    state = json.loads((tmp_path / "runs" / "r" / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["config"]["train"]["channels_last"] is True and state["config"]["train"]["precision"] == "fp32"
    assert state["speed"]["figures"]["fp32+channels-last"] == 20.0
    first = json.loads((tmp_path / "runs" / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["speed"]["modes"]["channels_last"] is True

    # a longer run, resumed on a "machine" that now measures the other layout faster: the mode is kept
    monkeypatch.setenv("DDPMKIT_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(autotune, "_measured_rate", FakeTimer({**prefer_cl, "fp32": 99.0}))
    longer = _auto_config(tmp_path, "r", epochs=2, num_images=0, trajectory_images=0)
    said.clear()
    assert run_config(longer, report=RunReport(info=said.append)) == 0
    assert any("speed modes kept from the run's start: fp32, channels-last" in line for line in said), said
    state = json.loads((tmp_path / "runs" / "r" / "checkpoints" / "step-00000008" / "state.json").read_text())
    assert state["config"]["train"]["channels_last"] is True


def test_validate_times_the_mode_that_will_run(tmp_path, monkeypatch):
    from ddpmkit.run.components import build_checked
    from ddpmkit.training.preflight import time_finding

    monkeypatch.setenv("DDPMKIT_CACHE_DIR", str(tmp_path / "cache"))
    cfg = _auto_config(tmp_path)
    timer = FakeTimer({"fp32": 100.0, "fp32+channels-last": 50.0, "bf16": 1.0, "bf16+channels-last": 1.0})
    finding = time_finding(cfg, build_checked(cfg), 1000, CPU, timer=timer)
    # 1000 steps of batch 8 at 100 images/s
    assert "about 1m 20s of training on cpu in fp32: 100.0 images/s measured at the run's batch of 8" in finding.text


@pytest.mark.parametrize("value", ["fast", "bf17"])
def test_a_bad_precision_is_still_a_user_error(value, tmp_path):
    from runconfigs import invoke

    r = invoke("validate", str(write_config(tmp_path, "p")), "--no-timing", "--set", f"train.precision={value}")
    assert r.exit_code == 2 and "train.precision" in r.output


@pytest.mark.parametrize("compiled, chosen", [(26.0, "fp32+channels-last+compiled"), (20.5, "fp32+channels-last")])
def test_compile_auto_is_measured_once_on_the_fastest_mode(compiled, chosen, tmp_path):
    path = write_config(tmp_path, "c")
    path.write_text(
        path.read_text()
        .replace('precision = "fp32"', 'precision = "auto"')
        .replace("channels_last = false", 'channels_last = "auto"\ncompile = "auto"')
    )
    cfg = load_config(path)
    timer = FakeTimer(
        {
            "fp32": 10.0,
            "fp32+channels-last": 20.0,
            "bf16": 1.0,
            "bf16+channels-last": 1.0,
            "fp32+channels-last+compiled": compiled,
        }
    )
    choice = autotune.choose(cfg, CPU, timer=timer, flags=AVX2, cache=tmp_path / "c.json")
    assert autotune.mode_label(choice.modes) == chosen
    assert timer.calls == ["fp32", "fp32+channels-last", "fp32+channels-last+compiled"]  # one compilation measured


def test_without_a_cxx_compiler_auto_trains_uncompiled_and_an_explicit_compile_is_one_line(tmp_path):
    """A machine without a C++ compiler (a slim container; torch finds none through $CXX or g++): ``compile = "auto"``
    says why it did not try compiling and trains; ``compile = true`` stops before anything with exit code 2."""
    from runconfigs import cli_env, ddpmkit

    path = write_config(tmp_path, "nocxx", epochs=1, num_images=2, trajectory_images=0)
    path.write_text(path.read_text().replace("channels_last = false", 'channels_last = false\ncompile = "auto"'))
    env = cli_env(
        CXX="/bin/false", XDG_CACHE_HOME=str(tmp_path / "cache"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor")
    )
    r = ddpmkit("run", str(path), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "compile not tried: no working C++ compiler" in r.stdout + r.stderr
    assert (load_config(path).run_dir / "samples.npz").is_file()
    r = ddpmkit("run", str(path), "--fresh", "--set", "train.compile=true", env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    assert lines == [
        "error: train.compile is on, but torch.compile cannot run here: no working C++ compiler for "
        "torch.compile's CPU kernels (install g++ or clang++, or set CXX); or set train.compile = false "
        '(or "auto", which measures without it)'
    ], lines


def test_a_python_that_torch_cannot_compile_on_prunes_compile_too(tmp_path, monkeypatch):
    import torch._dynamo

    import ddpmkit.runtime.speed as speed

    monkeypatch.setattr(torch._dynamo, "is_dynamo_supported", lambda: False)
    speed._compile_unavailable.cache_clear()
    try:
        path = write_config(tmp_path, "py")
        path.write_text(path.read_text().replace("channels_last = false", 'channels_last = false\ncompile = "auto"'))
        _, pruned = autotune.candidates(load_config(path), CPU, flags=AVX2)
        assert pruned["compile"].startswith(f"torch {torch.__version__} cannot compile on this Python")
    finally:
        speed._compile_unavailable.cache_clear()


def test_a_compiled_run_resumed_where_nothing_compiles_says_how_to_go_on(tmp_path, monkeypatch):
    import ddpmkit.runtime.speed as speed
    from ddpmkit.errors import ConfigError

    monkeypatch.setenv("DDPMKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # what ran is not the point: what is kept is
    monkeypatch.setattr(autotune, "_measured_rate", FakeTimer({"fp32": 10.0, "fp32+compiled": 20.0}))
    path = write_config(tmp_path, "k", epochs=1, num_images=0, trajectory_images=0)
    path.write_text(path.read_text().replace("channels_last = false", 'channels_last = false\ncompile = "auto"'))
    assert run_config(load_config(path)) == 0
    monkeypatch.setattr(speed, "_compile_unavailable", lambda device_type: "no working C++ compiler (a test)")
    with pytest.raises(ConfigError, match=r"this run started compiled.*--set train.compile=false"):
        run_config(load_config(path, ["train.epochs=2"]))
    assert run_config(load_config(path, ["train.epochs=2", "train.compile=false"])) == 0


def test_a_compile_trial_that_fails_leaves_auto_uncompiled_and_says_why(tmp_path):
    path = write_config(tmp_path, "f")
    path.write_text(path.read_text().replace("channels_last = false", 'channels_last = false\ncompile = "auto"'))
    table = {"fp32": 10.0}

    def timer(cfg, modes, device):
        if modes.compile:
            raise RuntimeError("CUDA graphs: operation not permitted when stream is capturing")
        return table[autotune.mode_label(modes)]

    choice = autotune.choose(load_config(path), CPU, timer=timer, flags=AVX2, cache=tmp_path / "c.json")
    assert autotune.mode_label(choice.modes) == "fp32"
    assert choice.failed == {
        "fp32+compiled": "RuntimeError: CUDA graphs: operation not permitted when stream is capturing"
    }
    assert "fp32+compiled failed here, so not taken: RuntimeError: CUDA graphs" in choice.reason()


@pytest.mark.parametrize("bad", [0.0, -5.0, float("nan"), "fast", True])
def test_a_cached_figure_that_cannot_be_right_is_measured_again(bad, tmp_path):
    """A speed-mode cache holding 0 (or a negative, NaN or non-number) ended validate and run in a
    ZeroDivisionError: such an entry is ignored, said, and measured anew."""
    cfg = _auto_config(tmp_path)
    cache = tmp_path / "cache.json"
    table = {"fp32": 70.0, "fp32+channels-last": 71.0}
    autotune.choose(cfg, CPU, timer=FakeTimer(table), flags=AVX2, cache=cache)
    data = json.loads(cache.read_text())
    for entry in data.values():
        entry["images_per_s"] = bad
    cache.write_text(json.dumps(data))
    said: list[str] = []
    with autotune.announced(said.append):
        timer = FakeTimer(table)
        choice = autotune.choose(cfg, CPU, timer=timer, flags=AVX2, cache=cache)
    assert sorted(timer.calls) == ["fp32", "fp32+channels-last"] and choice.figures["fp32"] == 70.0
    assert any("cannot be right: measured again" in line for line in said), said


def test_the_steady_measurement_is_held_to_its_time_whatever_the_cache_says(tmp_path, monkeypatch):
    """A cached rate 1000x this machine's sized the 10-second measurement before training at millions of steps; it
    stops after about twice its time instead (a fake clock: every reading is a second later)."""
    cfg = _auto_config(tmp_path, precision="fp32", channels_last=False)
    clock = iter(range(10**6))
    monkeypatch.setattr(autotune.time, "perf_counter", lambda: float(next(clock)))
    steps: list[int] = []
    real_train = autotune.train

    def counting(*args, events, **kwargs):
        inner = events.on_step
        events.on_step = lambda metrics: (steps.append(metrics["step"]), inner(metrics))
        return real_train(*args, events=events, **kwargs)

    monkeypatch.setattr(autotune, "train", counting)
    modes = autotune.candidates(cfg, CPU)[0][0]
    autotune._steady_rate(cfg, modes, CPU, expected_ips=1e6)  # asks for about 10 s x 1e6 images/s of steps
    assert len(steps) <= 2 * autotune.RATE_SECONDS, len(steps)
