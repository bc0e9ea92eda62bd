"""The pre-flight report of `ddpmkit validate`, loss weighting and the learning-rate schedule, against closed forms."""

from __future__ import annotations

import json
import math

import pytest
import torch
from runconfigs import invoke, write_config
from timm.utils import ModelEmaV3

import ddpmkit
from ddpmkit import diffusion as D
from ddpmkit.training.loop import learning_rate
from ddpmkit.training.preflight import ema_schedule


@pytest.mark.parametrize("decay, warmup, steps", [(0.9999, False, 2200), (0.999, True, 300), (0.99, True, 5)])
def test_ema_schedule_matches_timm(decay, warmup, steps):
    """The EMA of a model whose weight jumps from 1 to 0 after initialisation is exactly the initial share."""
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.ones_(model.weight)
    ema = ModelEmaV3(model, decay=decay, use_warmup=warmup)
    torch.nn.init.zeros_(model.weight)
    for step in range(steps):  # as ddpmkit.training.loop updates it
        ema.update(model, step=step + 1 if warmup else None)
    share, last = ema_schedule(decay, warmup, steps)
    assert float(ema.module.weight.detach()) == pytest.approx(share, rel=1e-4, abs=1e-12)
    assert last == pytest.approx(ema.get_decay(steps if warmup else None))
    if not warmup:
        assert share == pytest.approx(decay**steps)


def test_validate_reports_and_warns(tmp_path):
    cfg = write_config(tmp_path, "pf")
    ok = invoke("validate", str(cfg), "--set", "schedule.options.beta_end=0.4")  # T = 20 needs large betas
    assert ok.exit_code == 0, ok.output
    text = " ".join(ok.stdout.split())
    assert "data 32 images, values in [-1.00, 1.00]" in text
    assert "terminal signal-to-noise ratio" in text and "of training on cpu" in text
    assert "warning" not in ok.stdout
    # the tutorial's EMA on a short run, and a schedule that never reaches noise
    bad = invoke(
        "validate",
        str(cfg),
        "--no-timing",
        "--set",
        "train.ema_decay=0.9999",
        "--set",
        "train.ema_warmup=false",
        "--set",
        "schedule.options.beta_end=0.002",
    )
    assert bad.exit_code == 0, bad.output
    text = " ".join(bad.stdout.split())
    assert "the EMA weights (used for sampling) would still be 100% random initialisation" in text
    assert "x_T still holds signal" in text and "of training" not in text
    missing = invoke("validate", str(cfg), "--set", "data.dataset=mnist", "--data-root", str(tmp_path))
    assert missing.exit_code == 0 and "not checked: MNIST not found" in " ".join(missing.stdout.split())


def test_min_snr_weighting_is_the_same_objective_for_every_target():
    """Hang et al. 2023: min(SNR, gamma) ||x0 error||^2, whatever the network predicts."""
    schedule = ddpmkit.create_schedule("linear", num_timesteps=1000)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 1, 4, 4, generator=g), torch.randn(6, 1, 4, 4, generator=g)
    t = torch.tensor([0, 10, 100, 300, 600, 999])
    x_t = D.q_sample(schedule, x0, t, eps)
    x0_hat = x0 + 0.1 * torch.randn(6, 1, 4, 4, generator=g)  # an estimate, consistent with x_t
    eps_hat = D.eps_from_x0(schedule, x_t, t, x0_hat)
    errors = {
        "x0": (x0_hat - x0),
        "epsilon": (eps_hat - eps),
        "v": D.v_from_x0_eps(schedule, t, x0_hat, eps_hat) - D.v_from_x0_eps(schedule, t, x0, eps),
    }
    snr = schedule.snr()[t].double()
    want = snr.clamp(max=5.0) * errors["x0"].double().square().flatten(1).mean(1)
    for prediction, err in errors.items():
        weight = D.loss_weight(schedule, t, prediction, "min_snr", 5.0).double()
        got = weight * err.double().square().flatten(1).mean(1)
        assert torch.allclose(got, want, rtol=2e-3), (prediction, got, want)
    assert torch.equal(D.loss_weight(schedule, t, "v", "uniform"), torch.ones(6))
    eps_w = D.loss_weight(schedule, t, "epsilon", "min_snr", 5.0)
    assert float(eps_w[-1]) == 1.0 and float(eps_w[0]) == pytest.approx(5.0 / float(snr[0]), rel=1e-4)


def test_learning_rate_schedule():
    base = {"train": {"lr": 1e-3, "lr_warmup_steps": 10, "lr_decay": "cosine", "lr_min": 1e-5}}
    from ddpmkit.run.config import config_from_dict

    cfg = config_from_dict({**base, "data": {"dataset": "synthetic"}})
    assert learning_rate(cfg, 0, 110) == pytest.approx(1e-4)
    assert learning_rate(cfg, 9, 110) == pytest.approx(1e-3)
    assert learning_rate(cfg, 10, 110) == pytest.approx(1e-3)
    assert learning_rate(cfg, 60, 110) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    assert learning_rate(cfg, 110, 110) == pytest.approx(1e-5)
    constant = config_from_dict({"train": {"lr": 2e-4}, "data": {"dataset": "synthetic"}})
    assert {learning_rate(constant, s, 50) for s in range(50)} == {2e-4}
    assert math.isclose(learning_rate(config_from_dict({"train": {"lr": 1.0, "lr_warmup_steps": 4}}), 1, 10), 0.5)


def test_a_changed_learning_rate_takes_effect_on_resume(tmp_path):
    cfg = write_config(tmp_path, "lr", epochs=1, num_images=0, trajectory_images=0)
    assert invoke("run", str(cfg)).exit_code == 0
    r = invoke(
        "run", str(cfg), "--set", "train.epochs=2", "--set", "train.lr=5e-4", "--set", "train.loss_weighting=min_snr"
    )
    assert r.exit_code == 0, r.output
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "runs" / "lr" / "metrics.jsonl").read_text().splitlines()]
    assert lrs == [1e-3] * 4 + [5e-4] * 4


def test_extending_a_finished_cosine_run_continues_at_lr_min(tmp_path):
    """The decay's end is the first start's plan, recorded in the checkpoints: more steps later train at
    lr_min (with a warning) instead of sending the learning rate back to its peak."""
    import json

    from runconfigs import invoke, write_config

    cfg = write_config(tmp_path, "ext", epochs=1, num_images=0, trajectory_images=0)
    cfg.write_text(cfg.read_text().replace("lr = 1e-3\n", 'lr = 1e-3\nlr_decay = "cosine"\nlr_min = 1e-5\n'))
    assert invoke("run", str(cfg)).exit_code == 0
    r = invoke("run", str(cfg), "--set", "train.epochs=2")
    assert r.exit_code == 0, r.output
    assert "cosine learning-rate decay ended at step 4" in r.output and "lr_min = 1e-05" in r.output
    records = [json.loads(line) for line in (tmp_path / "runs" / "ext" / "metrics.jsonl").read_text().splitlines()]
    lrs = {rec["step"]: rec["lr"] for rec in records}
    assert lrs[4] == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 3 / 4)))
    assert [lrs[s] for s in (5, 6, 7, 8)] == [pytest.approx(1e-5)] * 4
    state = json.loads((tmp_path / "runs" / "ext" / "checkpoints" / "step-00000008" / "state.json").read_text())
    assert state["lr_decay_end"] == 4
