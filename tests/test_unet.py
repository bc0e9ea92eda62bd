"""The built-in `unet` denoiser: size, shapes, determinism, gradients, the time-embedding buffer, options."""

from __future__ import annotations

import pytest
import torch

import ddpmkit
from ddpmkit import ConfigError
from ddpmkit.interfaces import Denoiser

SMALL = dict(
    channels=[8, 16, 32, 32],
    attentions=[False, True, False, False],
    upscales=[False, False, True, True],
    num_groups=4,
    num_heads=2,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def small_unet(image_shape=(1, 16, 16), T=50, **overrides):
    return ddpmkit.create_denoiser("unet", image_shape=image_shape, num_timesteps=T, **{**SMALL, **overrides})


def batch(shape, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randint(0, T, (shape[0],), generator=g)


@pytest.fixture(scope="module")
def default_unet():
    torch.manual_seed(0)
    return ddpmkit.create_denoiser("unet", image_shape=(1, 32, 32), num_timesteps=1000)


def test_default_is_the_tutorials_35M_network(default_unet):
    assert isinstance(default_unet, Denoiser)
    assert default_unet.prediction == "epsilon"
    o = default_unet.options
    assert o.channels == [64, 128, 256, 512, 512, 384]
    assert o.attentions == [False, True, False, False, False, True]
    assert o.upscales == [False, False, False, True, True, True]
    assert (o.num_groups, o.num_heads, o.dropout) == (32, 8, 0.1)
    n = sum(p.numel() for p in default_unet.parameters())
    assert n == 35_178_689
    assert default_unet.num_parameters() == n
    # the embedding table is not a parameter
    assert all("embedding" not in name for name, _ in default_unet.named_parameters())


def test_default_forward_shape_and_eval_determinism(default_unet):
    x, t = batch((2, 1, 32, 32), 1000)
    default_unet.eval()
    with torch.no_grad():
        a = default_unet(x, t)
        b = default_unet(x, t)
    assert a.shape == x.shape
    assert a.dtype == torch.float32
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)


@pytest.mark.parametrize("image_shape", [(1, 16, 16), (3, 16, 16), (3, 8, 12), (2, 32, 16)])
def test_output_shape_equals_input_shape(image_shape):
    model = small_unet(image_shape).eval()
    x, t = batch((3, *image_shape), 50)
    with torch.no_grad():
        out = model(x, t)
    assert out.shape == x.shape
    assert model.shallow_conv.in_channels == image_shape[0]
    assert model.output_conv.out_channels == image_shape[0]


def test_time_changes_the_output():
    model = small_unet().eval()
    x, _ = batch((2, 1, 16, 16), 50)
    with torch.no_grad():
        a = model(x, torch.tensor([0, 0]))
        b = model(x, torch.tensor([40, 40]))
        c = model(x, torch.tensor([0, 40]))
    assert not torch.allclose(a, b)
    # each sample uses its own t
    assert torch.allclose(c[0], a[0], atol=1e-6) and torch.allclose(c[1], b[1], atol=1e-6)


def test_train_mode_dropout_differs_eval_does_not():
    model = small_unet(dropout=0.1)
    x, t = batch((2, 1, 16, 16), 50)
    model.train()
    torch.manual_seed(1)
    a = model(x, t)
    b = model(x, t)
    assert not torch.allclose(a, b)
    model.eval()
    with torch.no_grad():
        torch.manual_seed(1)
        c = model(x, t)
        torch.manual_seed(2)
        d = model(x, t)
    assert torch.equal(c, d)


def test_attention_dropout_only_in_training(monkeypatch):
    """The tutorial applied attention dropout at inference too; eval must call SDPA with dropout_p = 0."""
    import torch.nn.functional as F

    seen = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("dropout_p", 0.0))
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = small_unet(dropout=0.3)
    x, t = batch((1, 1, 16, 16), 50)
    model.train()
    model(x, t)
    model.eval()
    with torch.no_grad():
        model(x, t)
    assert seen == [0.3, 0.0]


def test_gradients_reach_every_parameter():
    model = small_unet(image_shape=(3, 16, 16), dropout=0.1).train()
    x, t = batch((4, 3, 16, 16), 50)
    target = torch.randn_like(x)
    loss = torch.nn.functional.mse_loss(model(x, t), target)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum().item() == 0]
    assert not zero, zero


def test_time_embedding_is_a_non_persistent_buffer():
    model = small_unet(T=50)
    buffers = dict(model.named_buffers())
    assert "embedding.table" in buffers
    table = buffers["embedding.table"]
    assert table.shape == (50, 32)  # T x max(channels)
    assert "embedding.table" not in model.state_dict()
    assert not any("embedding" in k for k in model.state_dict())
    # sinusoidal: row t = [sin(t w_0), cos(t w_0), ...] with w_0 = 1
    assert table[0, 0::2].abs().max().item() == 0.0 and torch.all(table[0, 1::2] == 1.0)
    assert table[7, 0].item() == pytest.approx(torch.sin(torch.tensor(7.0)).item(), abs=1e-6)
    # follows .to(): dtype and device (the meta device works without a GPU)
    model.to(torch.float64)
    assert model.embedding.table.dtype == torch.float64
    model.to("meta")
    assert model.embedding.table.device.type == "meta"
    assert all(p.device.type == "meta" for p in model.parameters())


def test_state_dict_round_trip_and_strict_load():
    a, b = small_unet(), small_unet()
    b.load_state_dict(a.state_dict(), strict=True)
    a.eval(), b.eval()
    x, t = batch((2, 1, 16, 16), 50)
    with torch.no_grad():
        assert torch.equal(a(x, t), b(x, t))


def test_image_side_not_divisible_is_a_user_error():
    with pytest.raises(ConfigError, match=r"divisible by 4.*18x18"):
        small_unet(image_shape=(1, 18, 18))


@pytest.mark.parametrize(
    "options, key, text",
    [
        ({"channels": [8, 16, 32]}, "channels", "even number"),
        ({"channels": [8, 16, 32, 32, 32, 32]}, "channels", "twice"),
        ({"channels": [8, 16, 32, 40]}, "channels", "channels[3] must be 32"),
        ({"channels": [8, 17, 34, 34], "num_groups": 1, "num_heads": 1}, "channels", "twice"),
        ({"num_groups": 3}, "channels", "not divisible by num_groups = 3"),
        ({"channels": [6, 12, 24, 24], "num_groups": 3, "num_heads": 4}, "channels", "num_heads"),
        ({"attentions": [False, True, False]}, "attentions", "one entry per layer (4), got 3"),
        ({"upscales": [False, False, True]}, "upscales", "one entry per layer (4), got 3"),
        ({"upscales": [False, True, True, True]}, "upscales", "first half"),
        ({"upscales": [True, True, False, False]}, "upscales", "first half"),
        ({"channels": [8, -16, 32, 32]}, "channels", "positive"),
        ({"dropout": 1.0}, "dropout", "less than 1"),
        ({"num_groups": 0}, "num_groups", "greater than or equal to 1"),
        ({"chanels": [8, 16, 32, 32]}, "chanels", "unknown key"),
    ],
)
def test_bad_options_name_the_key(options, key, text):
    with pytest.raises(ConfigError) as info:
        small_unet(**options)
    message = str(info.value)
    assert f"denoiser.options.{key}" in message, message
    assert text in message, message


def test_default_channels_with_too_few_groups_fail():
    with pytest.raises(ConfigError, match=r"denoiser\.options\.channels: .*num_groups = 48"):
        ddpmkit.create_denoiser("unet", image_shape=(1, 32, 32), num_timesteps=1000, num_groups=48)


def test_unknown_denoiser_lists_unet():
    with pytest.raises(ddpmkit.PluginError, match=r"unknown denoiser 'resnet'.*installed: .*unet"):
        ddpmkit.create_denoiser("resnet", image_shape=(1, 32, 32), num_timesteps=10)


def test_default_lists_are_checked_against_options_that_were_set():
    """Only channels given: the default 6-entry attentions/upscales no longer fit and must be reported,
    not silently zipped down to 4 layers (which built a network that failed at its first forward)."""
    with pytest.raises(ConfigError) as info:
        ddpmkit.create_denoiser(
            "unet", image_shape=(1, 16, 16), num_timesteps=10, channels=[8, 16, 32, 32], num_groups=4, num_heads=2
        )
    message = str(info.value)
    assert "denoiser.options.attentions: needs one entry per layer (4), got 6" in message
    assert "denoiser.options.upscales" in message
    with pytest.raises(ConfigError, match=r"denoiser\.options\.channels: .*num_heads = 3"):
        ddpmkit.create_denoiser("unet", image_shape=(1, 32, 32), num_timesteps=10, num_heads=3)


def test_learned_time_embedding_adds_the_mlp_and_per_block_projections():
    plain, learned = small_unet(), small_unet(time_embedding="mlp")
    d = max(SMALL["channels"])
    mlp = (d * 4 * d + 4 * d) + (4 * d * d + d)
    projections = sum(2 * (d * c + c) for c in SMALL["channels"])  # two ResBlocks per layer
    assert learned.num_parameters() - plain.num_parameters() == mlp + projections
    x, t = batch((4, 1, 16, 16), 50)
    out = learned(x, t)
    out.square().mean().backward()
    assert learned.time_mlp.net[0].weight.grad.abs().sum() > 0
    assert learned.layers[0].res1.time_proj[1].weight.grad.abs().sum() > 0
    learned.eval()
    with torch.no_grad():  # the same image at two different t gives different outputs
        assert not torch.allclose(learned(x[:1], t[:1] * 0), learned(x[:1], t[:1] * 0 + 49))
