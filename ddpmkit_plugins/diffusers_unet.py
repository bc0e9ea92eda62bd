"""HuggingFace diffusers' ``UNet2DModel`` as a ddpmkit denoiser (the optional extra ``ddpmkit[diffusers]``).

Trained by ddpmkit's loop like any denoiser, built from its options (the model's own config keys), or
started from a pretrained folder (``pretrained = "PATH"``: what ``UNet2DModel.save_pretrained`` writes, or
a pipeline folder holding ``unet/``), so a DDPM downloaded from the Hub can be sampled, evaluated and
fine-tuned here. Class conditioning uses the model's ``num_class_embeds``: one row per class and a last
row for "no class" (classifier-free guidance).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from ddpmkit.diffusion import Cond
from ddpmkit.errors import ConfigError, MissingExtra
from ddpmkit.interfaces import Denoiser

try:
    import diffusers
except ImportError:
    raise MissingExtra(
        "the 'diffusers-unet' denoiser needs HuggingFace diffusers: pip install 'ddpmkit[diffusers]'"
    ) from None

#: UNet2DModel arguments ddpmkit sets from the run (the image shape and the classes).
SET_BY_DDPMKIT = {"sample_size", "in_channels", "out_channels", "num_class_embeds", "class_embed_type"}


def unet_folder(path: str | Path) -> Path:
    """The folder holding the UNet's ``config.json``: ``path`` itself, or its ``unet/`` (a pipeline folder)."""
    folder = Path(path).expanduser()
    if (folder / "unet" / "config.json").is_file():
        return folder / "unet"
    if (folder / "config.json").is_file():
        return folder
    raise ConfigError(
        f"denoiser.options.pretrained = {str(path)!r}: no config.json there or in its unet/ "
        "(a folder written by UNet2DModel.save_pretrained or a pipeline's save_pretrained)"
    )


def _blocks_module():
    """diffusers' module of UNet blocks (moved into ``models.unets`` in diffusers 0.26)."""
    import importlib

    for name in ("diffusers.models.unets.unet_2d_blocks", "diffusers.models.unet_2d_blocks"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise MissingExtra(
        f"diffusers {diffusers.__version__} has no unet_2d_blocks module; pip install -U 'ddpmkit[diffusers]'"
    )


class DiffusersUNet(Denoiser):
    """``diffusers.UNet2DModel`` predicting the run's target; ``forward(x_t, t, cond)`` returns its ``.sample``."""

    conditions = frozenset({"class"})
    continuous_time = True  # UNet2DModel embeds float timesteps

    class Options(Denoiser.Options):
        prediction: Literal["epsilon", "x0", "v"] = Field(
            "epsilon", description="what the network outputs (a pretrained DDPM from the Hub: usually epsilon)"
        )
        pretrained: str | None = Field(
            None,
            description="start from this folder (UNet2DModel.save_pretrained's, or a pipeline's with unet/); "
            "its config then sets the architecture and the options below are not used",
        )
        block_out_channels: list[int] = Field([32, 64, 64], description="channels of each resolution level")
        layers_per_block: int = Field(2, ge=1, description="ResNet layers per level")
        down_block_types: list[str] = Field(
            ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"], description="diffusers block class of each down level"
        )
        up_block_types: list[str] = Field(
            ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], description="diffusers block class of each up level"
        )
        attention_head_dim: int = Field(8, ge=1, description="channels per attention head")
        norm_num_groups: int = Field(32, ge=1, description="GroupNorm groups; every channel count must divide by it")
        dropout: float = Field(0.0, ge=0, lt=1, description="dropout in the ResNet blocks")
        config: dict[str, Any] = Field(
            default_factory=dict, description="any other UNet2DModel argument, e.g. {act_fn = 'silu'}"
        )

        @model_validator(mode="after")
        def _consistent(self) -> DiffusersUNet.Options:
            n = len(self.block_out_channels)
            if len(self.down_block_types) != n or len(self.up_block_types) != n:
                raise ValueError(
                    f"block_out_channels, down_block_types and up_block_types need one entry per level "
                    f"(got {n}, {len(self.down_block_types)} and {len(self.up_block_types)})"
                )
            if any(c % self.norm_num_groups for c in self.block_out_channels):
                raise ValueError(
                    f"every block_out_channels entry must divide by norm_num_groups = {self.norm_num_groups}"
                )
            blocks = _blocks_module()
            for name in (*self.down_block_types, *self.up_block_types):
                if not hasattr(blocks, name):
                    raise ValueError(f"diffusers {diffusers.__version__} has no UNet block {name!r}")
            taken = SET_BY_DDPMKIT & set(self.config)
            if taken:
                raise ValueError(f"config.{sorted(taken)[0]} is set by ddpmkit from the run (image shape, classes)")
            return self

    def __init__(
        self,
        options: DiffusersUNet.Options | None = None,
        *,
        image_shape: tuple[int, int, int],
        num_timesteps: int,
        num_classes: int = 0,
    ) -> None:
        super().__init__(options, image_shape=image_shape, num_timesteps=num_timesteps, num_classes=num_classes)
        o = self.options
        c, h, w = self.image_shape
        if h != w:
            raise ConfigError(f"diffusers-unet: images must be square, got {h}x{w}")
        if o.pretrained is not None:
            self.unet = diffusers.UNet2DModel.from_pretrained(str(unet_folder(o.pretrained)))
            self._check_pretrained(o.pretrained)
        else:
            factor = 2 ** (len(o.block_out_channels) - 1)  # each level but the last halves the side
            if h % factor:
                raise ConfigError(
                    f"diffusers-unet: {len(o.block_out_channels)} levels halve the side "
                    f"{len(o.block_out_channels) - 1} times, so it must divide by {factor}; the "
                    f"images are {h}x{w} (data.image_size)"
                )
            self.unet = diffusers.UNet2DModel(
                sample_size=h,
                in_channels=c,
                out_channels=c,
                block_out_channels=tuple(o.block_out_channels),
                layers_per_block=o.layers_per_block,
                down_block_types=tuple(o.down_block_types),
                up_block_types=tuple(o.up_block_types),
                attention_head_dim=o.attention_head_dim,
                norm_num_groups=o.norm_num_groups,
                dropout=o.dropout,
                num_class_embeds=num_classes + 1 if num_classes else None,
                **o.config,
            )

    def _check_pretrained(self, path: str) -> None:
        cfg, (c, h, _) = self.unet.config, self.image_shape
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        where = f"denoiser.options.pretrained = {path!r}"
        if cfg.in_channels != c or cfg.out_channels != c:
            raise ConfigError(
                f"{where}: the UNet takes {cfg.in_channels} and returns {cfg.out_channels} channels; "
                f"the run's images have {c} (data.channels)"
            )
        if size != h:
            raise ConfigError(
                f"{where}: the UNet was built for {size}x{size} images; the run's are {h}x{h} (data.image_size)"
            )
        want = self.num_classes + 1 if self.num_classes else None
        if (cfg.num_class_embeds or None) != want:
            raise ConfigError(
                f"{where}: the UNet has {cfg.num_class_embeds or 'no'} class embeddings; the run needs "
                + (f"{want} (its {self.num_classes} classes and a null class)" if want else "none")
            )

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        labels = None
        if self.num_classes:
            given = cond.get("class") if cond is not None else None
            if given is None:
                given = torch.full((x_t.shape[0],), -1, dtype=torch.long, device=x_t.device)
            labels = torch.where(given < 0, torch.full_like(given, self.num_classes), given)  # the null row
        return self.unet(x_t, t, class_labels=labels).sample
