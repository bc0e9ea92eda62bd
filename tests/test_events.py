"""Training-event hooks: the built-in metrics and TensorBoard writers, a third party's hooks, a failing hook.

Third-party plugins are registered in-process (conftest.plugin_module) and the CLI runs in-process;
test_plugins.py and the real-install tests cover entry-point discovery itself."""

from __future__ import annotations

import json
import textwrap

import pytest
from runconfigs import invoke, write_config

from ddpmkit.registry import discovery as plugins


def _event_plugin(plugin_module, dist: str, body: str):
    return plugin_module("import ddpmkit\n" + textwrap.dedent(body), name="events", distribution=dist)


def test_metrics_and_tensorboard_writers(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = write_config(tmp_path, "tb", epochs=1, num_images=0, trajectory_images=0)
    r = invoke("run", str(cfg), "--set", "plugins.tensorboard.enabled=true")
    assert r.exit_code == 0, r.output
    run = tmp_path / "runs" / "tb"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    losses = acc.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2, 3, 4]
    assert [e.value for e in losses] == pytest.approx([m["loss"] for m in metrics], rel=1e-6)


def test_metrics_can_be_switched_off(tmp_path):
    cfg = write_config(tmp_path, "quiet", epochs=1, num_images=0, trajectory_images=0)
    assert invoke("run", str(cfg), "--set", "plugins.metrics.enabled=false").exit_code == 0
    assert not (tmp_path / "runs" / "quiet" / "metrics.jsonl").exists()


def test_third_party_hooks_see_every_event(tmp_path, plugin_module):
    log = tmp_path / "events.log"
    _event_plugin(
        plugin_module,
        "ddpmkit-spy",
        f"""
        LOG = {str(log)!r}

        def _log(*words):
            with open(LOG, "a") as f:
                f.write(" ".join(map(str, words)) + "\\n")

        @ddpmkit.hookimpl
        def train_start(run):
            _log("start", run.start_step, run.total_steps, run.config.run.name)

        @ddpmkit.hookimpl
        def step_end(step, metrics):
            _log("step", step, round(metrics["loss"], 6) > 0)

        @ddpmkit.hookimpl
        def checkpoint_written(step, path):
            _log("checkpoint", step, path.name)

        @ddpmkit.hookimpl
        def samples_written(paths):
            _log("samples", *sorted(p.name for p in paths))

        @ddpmkit.hookimpl
        def train_end(step, interrupted):
            _log("end", step, interrupted)
    """,
    )
    cfg = write_config(tmp_path, "spy", epochs=1, checkpoint_every=2, num_images=2, trajectory_images=1)
    r = invoke("run", str(cfg))
    assert r.exit_code == 0, r.output
    assert log.read_text().splitlines() == [
        "start 0 4 spy",
        "step 1 True",
        "step 2 True",
        "checkpoint 2 step-00000002",
        "step 3 True",
        "step 4 True",
        "checkpoint 4 step-00000004",
        "end 4 False",
        "samples samples.npz samples.png trajectory.png",
    ]
    listed = invoke("list-plugins", "--json")
    rows = [row for row in json.loads(listed.stdout) if row["distribution"] == "ddpmkit-spy"]
    assert [(row["kind"], row["status"]) for row in rows] == [("events", "ok")]


def test_a_failing_hook_stops_after_a_checkpoint_and_names_the_plugin(tmp_path, plugin_module):
    flaky = _event_plugin(
        plugin_module,
        "ddpmkit-flaky",
        """
        @ddpmkit.hookimpl
        def step_end(step):
            if step == 3:
                raise RuntimeError("disk full")
    """,
    )
    cfg = write_config(tmp_path, "flaky", epochs=3, checkpoint_every=100, num_images=0, trajectory_images=0)
    r = invoke("run", str(cfg))
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.stderr
    assert "step_end" in r.stderr and "ddpmkit-flaky" in r.stderr and "disk full" in r.stderr
    assert "training stopped at step 3" in r.stderr
    run = tmp_path / "runs" / "flaky"
    assert (run / "checkpoints" / "step-00000003" / "state.json").exists()
    # without the broken plugin the run resumes from there and finishes
    plugins.unregister_module(flaky)
    r = invoke("run", str(cfg))
    assert r.exit_code == 0, r.output
    assert "resuming from" in r.stdout and "(step 3)" in r.stdout
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))


def test_incompatible_plugin_is_marked_and_breaks_nothing(tmp_path, plugin_module):
    plugin_module(
        """
        import ddpmkit
        DDPMKIT_PLUGIN_API = [7, 8]

        @ddpmkit.hookimpl
        def register_schedules(register):
            register("warp", "future_hooks:Nothing")
    """,
        name="future",
        distribution="ddpmkit-future",
        version="9.0",
    )
    r = invoke("list-plugins", "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    future = [row for row in rows if row["distribution"] == "ddpmkit-future"]
    assert len(future) == 1 and future[0]["status"] == "incompatible"
    assert "plugin API [7, 8]" in future[0]["error"] and "speaks plugin API 1" in future[0]["error"]
    assert not [row for row in rows if row["name"] == "warp"]
    assert {row["name"] for row in rows if row["status"] == "ok"} >= {"linear", "unet", "ddpm"}
    cfg = write_config(tmp_path, "w")
    text = cfg.read_text().replace('name = "linear"', 'name = "warp"')
    cfg.write_text(text)
    r = invoke("validate", str(cfg))
    assert r.exit_code == 2, r.output
    assert (
        "unknown schedule 'warp'" in r.stderr and "ddpmkit-future 9.0" in r.stderr and "plugin API [7, 8]" in r.stderr
    )
