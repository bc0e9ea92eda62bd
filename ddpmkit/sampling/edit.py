"""Editing images with a trained model: SDEdit (Meng et al. 2022) and inpainting (RePaint, Lugmayr et al. 2022),
with any sampler that can start from given images (:attr:`ddpmkit.interfaces.Sampler.supports_start`).

SDEdit noises an input to step t0 = strength * T (q(x_t0 | x_0), eq. 4 of Ho et al. 2020) and runs the
sampler from there: strength 0 keeps the input, 1 draws afresh. Inpainting also pastes the known pixels,
noised to each step's level, into the state after every step, so they come out exactly as given; RePaint's
resampling (``jump_length``, ``resample``) walks each stretch of steps several times so the generated pixels
agree with the known ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ddpmkit.diffusion import Start, q_sample, start_step
from ddpmkit.errors import ConfigError, DataError
from ddpmkit.interfaces import NoiseSchedule, Sampler


@dataclass
class Edit:
    """What to edit: ``images`` (float [N, C, H, W] in [-1, 1]), SDEdit's ``strength``, and for inpainting a
    ``keep`` mask (float [N, 1, H, W], 1 where a pixel is known and kept, 0 where it is generated)."""

    images: torch.Tensor
    strength: float
    keep: torch.Tensor | None = None
    jump_length: int = 10
    resample: int = 1

    def sampler_arguments(
        self, sampler: Sampler, schedule: NoiseSchedule, rows: slice, generator: torch.Generator, device: torch.device
    ) -> dict[str, Any]:
        """``start``, ``hook``, ``jump_length`` and ``resample`` of :meth:`Sampler.sample` for the images ``rows``;
        every draw from ``generator``."""
        x0 = self.images[rows].to(device)
        t0 = start_step(sampler.timesteps(schedule), self.strength, schedule.num_timesteps)
        if t0 is None:
            raise ValueError("strength 0 keeps the input: there is nothing to sample")
        s = schedule.to(device)

        def noise() -> torch.Tensor:
            return torch.randn(x0.shape, generator=generator, device=generator.device).to(device)

        arguments: dict[str, Any] = {"start": Start(q_sample(s, x0, t0, noise()), t0)}
        if self.keep is not None:
            keep = self.keep[rows].to(device)

            def paste_known(index: int, t_prev: int, x: torch.Tensor) -> torch.Tensor:
                known = x0 if t_prev < 0 else q_sample(s, x0, t_prev, noise())
                return keep * known + (1 - keep) * x

            arguments["hook"] = paste_known
            if self.resample > 1:  # only samplers that resample take these (ReverseStepSampler does)
                arguments.update(jump_length=self.jump_length, resample=self.resample)
        return arguments


def check_sampler(sampler: Sampler, name: str, resample: int = 1) -> None:
    """ConfigError unless ``sampler`` can start from given images (and, for ``resample`` > 1, resample)."""
    import inspect

    if not getattr(type(sampler), "supports_start", False):
        raise ConfigError(
            f"sampler {name} cannot start from an image (its supports_start is False), so it cannot "
            "edit; ddpm, ddim and any sampler built on ReverseStepSampler can"
        )
    if resample > 1 and "resample" not in inspect.signature(sampler.sample).parameters:
        raise ConfigError(
            f"sampler {name} does not take RePaint's resampling (resample, jump_length); for --resample above 1 "
            "use a sampler that does: ddpm, ddim, or any built on ReverseStepSampler"
        )


def as_model_scale(images: torch.Tensor, shape: tuple[int, int, int], what: str = "the inputs") -> torch.Tensor:
    """uint8 [N, C, H, W] (0..255) or float in [-1, 1] -> float [N, C, H, W] in [-1, 1], checked against the
    run's image ``shape``."""
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(shape):
        raise ConfigError(
            f"{what} are {tuple(images.shape)}; the run's images are {'x'.join(map(str, shape))} "
            "(C x H x W): give images of that shape"
        )
    if images.dtype == torch.uint8:
        return images.float() / 127.5 - 1.0
    x = images.float()
    if float(x.min()) < -1.0001 or float(x.max()) > 1.0001:
        raise ConfigError(f"{what}: float images must lie in [-1, 1] (uint8 ones in 0..255)")
    return x.clamp(-1, 1)


def as_keep_mask(mask: torch.Tensor, num: int, shape: tuple[int, int, int], what: str = "the mask") -> torch.Tensor:
    """A mask of the regions to *generate* (True / 1 / 255 there; [H, W], [1, H, W], [N, 1, H, W]) ->
    float [num, 1, H, W], 1 where a pixel is kept."""
    _, h, w = shape
    m = mask
    while m.ndim < 4:
        m = m.unsqueeze(0)
    if m.ndim != 4 or m.shape[1] != 1 or tuple(m.shape[-2:]) != (h, w) or m.shape[0] not in (1, num):
        raise ConfigError(
            f"{what} is {tuple(mask.shape)}; it must be one channel of the run's {h}x{w} images "
            f"([H, W], [1, H, W] or [N, 1, H, W] with N = 1 or {num}): white where pixels are generated"
        )
    generate = (m.float() > (127.5 if m.dtype == torch.uint8 else 0.5)).float()
    return (1.0 - generate).expand(num, 1, h, w).contiguous()


def read_inputs(path: Path, shape: tuple[int, int, int]) -> torch.Tensor:
    """uint8 [N, C, H, W]: one image file or a folder of them, converted and resized to the run's ``shape``."""
    from ddpmkit.run.config import DataSection
    from ddpmkit.run.data import IMAGE_SUFFIXES, load_dataset

    path = Path(path)
    c, h, _ = shape
    section = DataSection(dataset="image-folder", root=str(path), image_size=h, channels=c)
    if path.is_dir():
        return load_dataset(section).images
    if not path.is_file():
        raise DataError(f"{path}: no such file or folder")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise DataError(f"{path}: not an image file ({', '.join(sorted(IMAGE_SUFFIXES))}) or a folder of them")
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ddpmkit-edit-") as tmp:
        shutil.copy(path, Path(tmp) / path.name)
        return load_dataset(section.model_copy(update={"root": tmp})).images


def read_mask(path: Path, shape: tuple[int, int, int]) -> torch.Tensor:
    """A mask image (white where pixels are generated) as uint8 [1, 1, H, W]; a DataError when it is not one
    channel (gray) or not the run's size."""
    from ddpmkit.run.data import open_image

    _, h, w = shape
    with open_image(Path(path)) as im:
        if im.size != (w, h):
            raise DataError(f"{path}: the mask is {im.size[0]}x{im.size[1]}; the run's images are {w}x{h}")
        rgb = im.convert("RGB")
        gray = im.convert("L")
        data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(h, w, 3)
        if not (torch.equal(data[..., 0], data[..., 1]) and torch.equal(data[..., 1], data[..., 2])):
            raise DataError(f"{path}: the mask has colour; it must be gray (white where pixels are generated)")
        return torch.frombuffer(bytearray(gray.tobytes()), dtype=torch.uint8).view(1, 1, h, w).clone()
