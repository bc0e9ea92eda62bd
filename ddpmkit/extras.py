"""ddpmkit's optional extras (``pip install 'ddpmkit[NAME]'``): what each installs, and who needs it.

Imports nothing heavy: ``list-plugins`` and ``validate`` ask which extras are missing before anything runs.
"""

from __future__ import annotations

import importlib.util

from ddpmkit.errors import MissingExtra

#: extra -> (the module it makes importable, what it is for)
EXTRAS: dict[str, tuple[str, str]] = {
    "diffusers": ("diffusers", "HuggingFace diffusers: the diffusers sampler and diffusers-unet denoiser, export"),
    "hf": ("datasets", 'HuggingFace datasets: data.dataset = "hf"'),
    "tensorboard": ("tensorboard", "TensorBoard event files: [plugins.tensorboard]"),
    "wandb": ("wandb", "Weights & Biases logging: [plugins.wandb]"),
    "inception": ("torch_fidelity", "Inception features for eval (torch-fidelity)"),
    "ui": ("gradio", "the web page of ddpmkit serve (gradio)"),
}

#: ddpmkit's own components and event plugins (qualified names) that need an extra.
NEEDED_BY: dict[str, str] = {
    "ddpmkit:diffusers": "diffusers",
    "ddpmkit:diffusers-unet": "diffusers",
    "ddpmkit:tensorboard": "tensorboard",
    "ddpmkit:wandb": "wandb",
}


def is_missing(extra: str) -> bool:
    """Whether the extra's package cannot be imported here."""
    return importlib.util.find_spec(EXTRAS[extra][0]) is None


def install_hint(extra: str) -> str:
    return f"pip install 'ddpmkit[{extra}]'"


def require(extra: str, what: str) -> None:
    """MissingExtra naming ``what`` and the install command, when the extra is missing."""
    if is_missing(extra):
        raise MissingExtra(f"{what} needs the {EXTRAS[extra][0]} package: {install_hint(extra)}")
