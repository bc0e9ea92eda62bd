"""Running a sampler in batches: images in [-1, 1], the steps a strip shows, and the output checks."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch

from ddpmkit.errors import DdpmkitWarning, PluginCodeError
from ddpmkit.interfaces import Denoiser, NoiseSchedule, Sampler
from ddpmkit.registry.blame import blame
from ddpmkit.runtime.speed import SpeedModes, autocast, maybe_compiled, memory_format

if TYPE_CHECKING:
    from ddpmkit.registry.discovery import Component
    from ddpmkit.sampling.edit import Edit

ProgressFn = Callable[[int], None]
#: The network that draws a batch of these labels: ``conditioned(network, labels)``.
Conditioner = Callable[[Denoiser, torch.Tensor], Denoiser]
#: Sampler output this far beyond [-1, 1] on more than OUT_OF_RANGE_SHARE of the pixels is reported.
OUT_OF_RANGE_SLACK = 0.05
OUT_OF_RANGE_SHARE = 0.001


class SamplingInterrupted(KeyboardInterrupt):
    """Ctrl-C during sampling, carrying the images of the batches finished before it."""

    def __init__(self, images: torch.Tensor) -> None:
        super().__init__(f"interrupted after {len(images)} images")
        self.images = images


def nearest_visited(requested: list[int], visited: list[int]) -> list[int]:
    """For each requested t, the visited t nearest to it (ties to the larger), without repeats, noisiest first."""
    if not visited:
        return []
    chosen = {min(visited, key=lambda v: (abs(v - r), -v)) for r in requested}
    return sorted(chosen, reverse=True)


def generate(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    sampler: Sampler,
    num_images: int,
    *,
    batch_size: int,
    seed: int,
    image_shape: tuple[int, int, int],
    precision: str = "fp32",
    modes: SpeedModes | None = None,
    capture_steps: list[int] | None = None,
    progress: ProgressFn | None = None,
    sampler_component: Component | None = None,
    labels: torch.Tensor | None = None,
    conditioned: Conditioner | None = None,
    edit: Edit | None = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Draw ``num_images`` images in [-1, 1] (on the CPU); optionally the intermediate x at ``capture_steps``.

    Batches are drawn one after another from one generator seeded with ``seed``. ``progress(n)`` is
    called after every step of a batch of n images. Output that is not finite is an error naming
    ``sampler_component``; output outside [-1, 1] is reported with a warning (the image writers clip it).
    ``modes`` (precision, channels-last, compilation) replaces ``precision`` when given. With ``labels``
    (one class per image), each batch is drawn by ``conditioned(network, its labels)``. With ``edit``, image i
    starts from ``edit.images[i]`` (SDEdit, inpainting: :mod:`ddpmkit.sampling.edit`).
    """
    if labels is not None and (conditioned is None or len(labels) != num_images):
        raise ValueError(f"{num_images} images need {num_images} labels and a conditioner")
    device = denoiser.device
    modes = modes or SpeedModes(precision=precision)
    denoiser.to(memory_format=memory_format(modes.channels_last))
    network = maybe_compiled(denoiser, modes)
    generator = torch.Generator().manual_seed(seed)
    wanted = set(capture_steps or [])
    captured: dict[int, list[torch.Tensor]] = {t: [] for t in wanted}
    out = []
    was_training = denoiser.training
    denoiser.eval()
    try:
        for start in range(0, num_images, batch_size):
            n = min(batch_size, num_images - start)

            def callback(index: int, t: int, x: torch.Tensor) -> None:
                if t in wanted:
                    captured[t].append(x.float().cpu())
                if progress is not None:
                    progress(n)  # noqa: B023 (the callback of this batch only)

            guard = blame(sampler_component, "while sampling") if sampler_component else nullcontext()
            batch_network = conditioned(network, labels[start : start + n]) if labels is not None else network
            with guard, torch.inference_mode(), autocast(device, modes.precision):
                extra = (
                    edit.sampler_arguments(sampler, schedule, slice(start, start + n), generator, device)
                    if edit
                    else {}
                )
                x = sampler.sample(
                    batch_network, schedule, (n, *image_shape), generator=generator, callback=callback, **extra
                )
                if not isinstance(x, torch.Tensor) or tuple(x.shape) != (n, *image_shape):
                    got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                    raise ValueError(f"sample returned {got}, expected shape {(n, *image_shape)}")
            out.append(x.float().cpu())
    except KeyboardInterrupt:
        if out:  # keep the finished batches: the caller may write them
            raise SamplingInterrupted(torch.cat(out)) from None
        raise
    finally:
        denoiser.train(was_training)
    images = torch.cat(out) if out else torch.empty((0, *image_shape))
    _check_range(images, sampler_component)
    return images, {t: torch.cat(v) for t, v in captured.items() if v}


class NonFiniteSamples(PluginCodeError):
    """A draw gave NaN or infinite pixels."""


def _check_range(images: torch.Tensor, component: Component | None) -> None:
    who = component.label if component is not None else "the sampler"
    if images.numel() == 0:
        return
    if not torch.isfinite(images).all():
        share = float((~torch.isfinite(images)).float().mean())
        raise NonFiniteSamples(f"{who} returned non-finite values in {share:.1%} of the pixels")
    outside = float((images.abs() > 1 + OUT_OF_RANGE_SLACK).float().mean())
    if outside > OUT_OF_RANGE_SHARE:
        warnings.warn(
            f"{who} returned values in [{float(images.min()):.3g}, {float(images.max()):.3g}]; "
            f"{outside:.1%} of the pixels lie outside [-1, 1] and are clipped in the image files",
            DdpmkitWarning,
            stacklevel=2,
        )
