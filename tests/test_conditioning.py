"""Class conditioning (plugin API 3): labels in the data, the UNet's class embedding, label dropout,
classifier-free guidance through any sampler, asking for classes, and the refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from runconfigs import ddpmkit, invoke, write_config

from ddpmkit.diffusion import NULL_CLASS, ancestral_steps, gaussian_reverse_moments
from ddpmkit.guidance import ClassConditioned, mix
from ddpmkit.registry.build import create_denoiser, create_schedule
from ddpmkit.testing import GaussianOracle, check_denoiser, check_sampler

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_UNET = dict(
    channels=[8, 16, 32, 32],
    attentions=[False, True, False, False],
    upscales=[False, False, True, True],
    num_groups=4,
    num_heads=2,
    dropout=0.0,
)


def conditional_config(folder: Path, name: str = "c", **values) -> Path:
    cfg = write_config(folder, name, **values)
    cfg.write_text(cfg.read_text() + '\n[conditioning]\nkind = "class"\nlabel_dropout = 0.2\n')
    return cfg


def test_the_unet_takes_a_class_per_image_and_the_null_class():
    torch.manual_seed(0)
    unet = create_denoiser("unet", image_shape=(1, 8, 8), num_timesteps=20, num_classes=4, **TINY_UNET).eval()
    assert unet.num_classes == 4 and "class" in unet.conditions
    x = torch.randn(1, 1, 8, 8).expand(3, -1, -1, -1)
    t = torch.full((3,), 7)
    with torch.no_grad():
        out = unet(x, t, cond={"class": torch.tensor([0, 3, NULL_CLASS])})
        unconditional = unet(x[:1], t[:1])  # no cond: the null class
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[0], out[2])
    assert torch.allclose(out[2], unconditional[0], atol=1e-5)
    # an unconditional UNet has no class embedding: its weights are those of API 2
    plain = create_denoiser("unet", image_shape=(1, 8, 8), num_timesteps=20, **TINY_UNET)
    assert not any("class_embedding" in k for k in plain.state_dict())


def test_a_compiled_or_ddp_wrapped_denoiser_gets_the_labels_too():
    from ddpmkit.runtime.speed import RoutedDenoiser

    torch.manual_seed(0)
    unet = create_denoiser("unet", image_shape=(1, 8, 8), num_timesteps=20, num_classes=4, **TINY_UNET).eval()
    routed = RoutedDenoiser(unet, unet.forward)
    x, t, cond = torch.randn(2, 1, 8, 8), torch.tensor([3, 9]), {"class": torch.tensor([1, NULL_CLASS])}
    with torch.no_grad():
        assert torch.equal(routed(x, t, cond=cond), unet(x, t, cond=cond))


def test_synthetic_labels_are_the_quadrant_of_the_rectangle():
    from ddpmkit.run.config import DataSection
    from ddpmkit.run.data import load_dataset

    ds = load_dataset(DataSection(dataset="synthetic", num_samples=64, image_size=8), labelled=True)
    assert ds.classes == ["top-left", "top-right", "bottom-left", "bottom-right"]
    for image, label in zip(ds.images[:, 0].float(), ds.labels.tolist()):
        ys, xs = torch.nonzero(image, as_tuple=True)
        cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
        assert label == 2 * int(cy > 4) + int(cx > 4)
    assert len(set(ds.labels.tolist())) == 4


def test_an_image_folder_is_labelled_by_its_sub_folders(tmp_path):
    from PIL import Image

    from ddpmkit.errors import DataError
    from ddpmkit.run.config import DataSection
    from ddpmkit.run.data import dataset_classes, load_dataset

    for cls, value in (("cat", 40), ("dog", 200)):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(np.full((8, 8), value + i, dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    section = DataSection(dataset="image-folder", root=str(tmp_path), image_size=8)
    ds = load_dataset(section, labelled=True)
    assert ds.classes == ["cat", "dog"] == dataset_classes(section)
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1] and int(ds.images[3].float().mean()) == 200
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "loose.png")  # not in a class folder
    with pytest.raises(DataError, match="needs class labels"):
        load_dataset(section, labelled=True)


def test_label_dropout_is_seeded_and_at_its_rate():
    from ddpmkit.run.config import config_from_dict
    from ddpmkit.training.loop import _Trainer

    cfg = config_from_dict({"conditioning": {"kind": "class", "label_dropout": 0.25}, "run": {"seed": 3}})
    trainer = _Trainer.__new__(_Trainer)
    trainer.cfg, trainer.step = cfg, 0
    labels = torch.arange(4).repeat(250)
    dropped = []
    for step in range(8):
        trainer.step = step
        once, again = trainer.batch_labels(labels, slice(None)), trainer.batch_labels(labels, slice(None))
        assert torch.equal(once, again)  # a function of (seed, step): resume draws the same
        dropped.append(float((once == NULL_CLASS).double().mean()))
        kept = once != NULL_CLASS
        assert torch.equal(once[kept], labels[kept])
    share = sum(dropped) / len(dropped)
    assert abs(share - 0.25) < 5 * math.sqrt(0.25 * 0.75 / 8000)
    # two ranks take their slices of the very same draw
    trainer.step = 5
    whole = trainer.batch_labels(labels[:8], slice(None))
    assert torch.equal(
        torch.cat([trainer.batch_labels(labels[:8], slice(0, 4)), trainer.batch_labels(labels[:8], slice(4, 8))]), whole
    )


def test_classifier_free_guidance_is_one_batched_pass_mixing_the_predictions():
    schedule = create_schedule("linear", num_timesteps=50)
    oracle = GaussianOracle(schedule, 0.0, 0.3, image_shape=(1, 2, 2), class_means=[-0.5, 0.5])
    calls = []
    original = oracle.forward

    def counted(x_t, t, cond=None):
        calls.append((len(x_t), None if cond is None else cond["class"].tolist()))
        return original(x_t, t, cond)

    oracle.forward = counted
    labels = torch.tensor([0, 1, 1])
    x, t = torch.randn(3, 1, 2, 2), torch.full((3,), 30)
    guided = ClassConditioned(oracle, labels, weight=2.5)(x, t)
    assert calls == [(6, [0, 1, 1, NULL_CLASS, NULL_CLASS, NULL_CLASS])]
    cond = original(x, t, {"class": labels})
    uncond = original(x, t, {"class": torch.full_like(labels, NULL_CLASS)})
    assert torch.allclose(guided, uncond + 2.5 * (cond - uncond))
    calls.clear()
    outside = ClassConditioned(oracle, labels, weight=2.5, interval=(0, 20))(x, t)  # t = 30: not guided
    assert calls == [(3, [0, 1, 1])] and torch.allclose(outside, cond)
    mixed_t = torch.tensor([10, 30, 10])
    both = mix(uncond, cond, 2.5, mixed_t, (0, 20))
    assert torch.allclose(both[1], cond[1]) and torch.allclose(both[0], (uncond + 2.5 * (cond - uncond))[0])


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_every_builtin_sampler_draws_each_class_and_the_closed_form_guided_answer(name):
    results = {r.check: r for r in check_sampler(name, num_timesteps=100, num_pixels=4096)}
    for check in ("each class of a conditional oracle", "classifier-free guidance (w = 2)"):
        assert results[check].passed, results[check].detail


def test_guidance_moves_the_answer_as_the_closed_form_says():
    """w = 1 is the class's own N(mu_k, s^2) (up to discretisation); w > 1 pushes the mean away from the
    unconditional one and narrows the spread, as extrapolating two Gaussians' posterior means must."""
    schedule = create_schedule("linear", num_timesteps=200)
    steps = ancestral_steps(schedule)
    plain = gaussian_reverse_moments(schedule, steps, 0.5, 0.2)
    same = gaussian_reverse_moments(schedule, steps, 0.5, 0.2, guided_by=(0.0, 0.2), weight=1.0)
    guided = gaussian_reverse_moments(schedule, steps, 0.5, 0.2, guided_by=(0.0, 0.2), weight=3.0)
    assert plain == pytest.approx(same, abs=1e-12)
    assert abs(plain[0] - 0.5) < 0.02 and abs(plain[1] - 0.2) < 0.02
    assert guided[0] > plain[0] + 0.05  # further from the unconditional mean 0


def test_the_kit_checks_a_conditional_denoiser_and_sees_past_a_zero_initialisation(plugin_module):
    plugin_module('''
import torch
from torch import nn
from ddpmkit import hookimpl
from ddpmkit.interfaces import Denoiser

class ZeroHead(Denoiser):
    """A conditional denoiser whose output layer starts at zero, as DiT's does."""
    conditions = frozenset({"class"})

    def __init__(self, options=None, *, image_shape, num_timesteps, num_classes=0):
        super().__init__(options, image_shape=image_shape, num_timesteps=num_timesteps, num_classes=num_classes)
        c = image_shape[0]
        self.t_emb = nn.Embedding(num_timesteps, 8)
        self.y_emb = nn.Embedding(num_classes + 1, 8) if num_classes else None
        self.body = nn.Conv2d(c, 8, 3, padding=1)
        self.head = nn.Conv2d(8, c, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x_t, t, cond=None):
        e = self.t_emb(t)
        if self.y_emb is not None:
            y = cond["class"] if cond is not None else torch.full_like(t, -1)
            e = e + self.y_emb(torch.where(y < 0, self.num_classes, y))
        return self.head(torch.relu(self.body(x_t) + e[:, :, None, None]))

class Blind(Denoiser):
    """Declares class conditioning but ignores the label."""
    conditions = frozenset({"class"})

    def __init__(self, options=None, *, image_shape, num_timesteps, num_classes=0):
        super().__init__(options, image_shape=image_shape, num_timesteps=num_timesteps, num_classes=num_classes)
        self.t_emb = nn.Embedding(num_timesteps, image_shape[0])
        self.conv = nn.Conv2d(image_shape[0], image_shape[0], 3, padding=1)

    def forward(self, x_t, t, cond=None):
        return self.conv(x_t) + self.t_emb(t)[:, :, None, None]

@hookimpl
def register_denoisers(register):
    register("zerohead", ZeroHead)
    register("blind", Blind)
''')
    zero = {r.check: r for r in check_denoiser("zerohead", image_shape=(1, 8, 8), num_timesteps=20)}
    assert all(r.passed for r in zero.values()), {k: r.detail for k, r in zero.items() if not r.passed}
    assert "past a zero initialisation" in zero["gradients reach all parameters"].detail
    blind = {r.check: r for r in check_denoiser("blind", image_shape=(1, 8, 8), num_timesteps=20)}
    assert not blind["conditions on the class"].passed
    assert "the label is ignored" in blind["conditions on the class"].detail


def test_a_conditional_config_naming_an_unconditional_denoiser_is_one_line(tmp_path, plugin_module):
    plugin_module("""
import torch
from ddpmkit import hookimpl
from ddpmkit.interfaces import Denoiser

class Plain(Denoiser):
    def __init__(self, options=None, *, image_shape, num_timesteps):
        super().__init__(options, image_shape=image_shape, num_timesteps=num_timesteps)
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, x_t, t):
        return self.w * x_t

@hookimpl
def register_denoisers(register):
    register("plain", Plain)
""")
    cfg = conditional_config(tmp_path)
    cfg.write_text(
        cfg.read_text()
        .replace('[denoiser]\nname = "unet"', '[denoiser]\nname = "plain"')
        .split("[denoiser.options]")[0]
        + "[sampler]"
        + cfg.read_text().split("[sampler]", 1)[1]
    )
    r = invoke("validate", str(cfg))
    assert r.exit_code == 2, r.output
    assert "cannot be conditioned on class labels" in r.output and "plain" in r.output
    assert len([line for line in r.output.splitlines() if line.startswith("error")]) == 1


def test_guidance_method_and_interval_are_checked(tmp_path):
    cfg = write_config(tmp_path)
    r = invoke("validate", str(cfg), "--set", 'guidance.method="classifier-free"')
    assert r.exit_code == 2 and "needs a conditional run" in r.output, r.output
    cond = conditional_config(tmp_path, "k")
    r = invoke("validate", str(cond), "--set", "guidance.interval=[5, 40]")
    assert r.exit_code == 2 and "beyond the last step" in r.output, r.output


@pytest.mark.slow
def test_a_conditional_run_resumes_exactly_and_draws_the_classes_asked_for(tmp_path):
    common = dict(epochs=2, checkpoint_every=2, num_images=8, trajectory_images=0)
    whole = conditional_config(tmp_path / "a", **common) if (tmp_path / "a").mkdir() is None else None
    parts = conditional_config(tmp_path / "b", **common) if (tmp_path / "b").mkdir() is None else None
    assert invoke("run", str(whole)).exit_code == 0  # in-process, all three: one thread setting for all
    first = invoke("run", str(parts), "--set", "train.max_steps=3")
    assert first.exit_code == 0, first.output
    second = invoke("run", str(parts))
    assert second.exit_code == 0 and "resuming from" in second.output, second.output
    run_a, run_b = tmp_path / "a" / "runs" / "c", tmp_path / "b" / "runs" / "c"
    from safetensors.torch import load_file

    final = sorted((run_a / "checkpoints").iterdir())[-1].name
    a, b = (
        load_file(run_a / "checkpoints" / final / "ema.safetensors"),
        load_file(run_b / "checkpoints" / final / "ema.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)  # label dropout draws its own seeded stream
    state = json.loads((run_a / "checkpoints" / final / "state.json").read_text())
    assert state["classes"] == ["top-left", "top-right", "bottom-left", "bottom-right"]
    with np.load(run_a / "samples.npz") as data:  # the end of the run: every class alike, a row each
        assert data["labels"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
        assert list(data["classes"]) == state["classes"]

    out = tmp_path / "one.npz"
    r = ddpmkit("sample", str(run_a), "--class", "bottom-left,1", "--num", "4", "--out", str(out), "--guidance", "2")
    assert r.returncode == 0, r.stderr
    assert "classes top-right, bottom-left" in r.stdout and "classifier-free guidance (weight 2)" in r.stdout
    with np.load(out) as data:
        assert data["labels"].tolist() == [2, 2, 1, 1] and data["images"].shape == (4, 8, 8, 1)
    r = invoke("sample", str(run_a), "--class", "7", "--out", str(tmp_path / "x.png"))
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert "class '7'" in r.output and "top-left" in r.output

    plain = write_config(tmp_path, "u", epochs=1, num_images=0, trajectory_images=0)
    assert invoke("run", str(plain)).exit_code == 0
    r = invoke("sample", str(tmp_path / "runs" / "u"), "--class", "1", "--out", str(tmp_path / "y.png"))
    assert r.exit_code == 2 and "trained without class labels" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1


def test_describe_says_what_a_denoiser_can_be_conditioned_on():
    r = invoke("describe", "unet")
    assert r.exit_code == 0 and "conditions: class" in r.stdout, r.output
