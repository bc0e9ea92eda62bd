"""``ddpmkit serve``: a local web page (gradio, extra ``ddpmkit[ui]``) that draws from a trained run by class,
guidance weight, sampler and steps, shows the denoising strip, and edits an uploaded image (SDEdit, or
inpainting where a mask is brushed).

:class:`Studio` holds the run, loaded once, and does the work as plain functions of numbers and arrays (so they
are tested without a browser); :func:`build_page` lays them out as a gradio page whose queue runs one request
at a time on the shared network while the page stays live for everyone waiting.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ddpmkit.errors import DdpmkitError
from ddpmkit.registry import discovery
from ddpmkit.sampling.images import class_rows, grid, trajectory_strip

if TYPE_CHECKING:
    from ddpmkit.sampling.loaded import LoadedRun

#: What the page may be asked for at most (a page is for looking, `ddpmkit sample` for many images).
MAX_IMAGES, MAX_UPLOAD_SIDE, STRIP_COLUMNS = 64, 4096, 8
#: A displayed image's cells are scaled up to about this many pixels (MNIST's 28 px are too small to see).
DISPLAY_CELL = 96
ALL = "all"


class PageError(DdpmkitError):
    """A request the page cannot do: shown on the page as a message."""


@dataclass
class Drawn:
    """What one request gives the page: the grid, the denoising strip (if any) and a line describing them."""

    grid: np.ndarray
    strip: np.ndarray | None
    caption: str


def enlarge(image: np.ndarray, cell: int) -> np.ndarray:
    """``image`` scaled up by whole pixels (nearest) so that a cell of ``cell`` pixels shows at DISPLAY_CELL."""
    k = max(1, DISPLAY_CELL // max(1, cell))
    return image.repeat(k, axis=0).repeat(k, axis=1)


class Studio:
    """A trained run and what the page does with it; one request at a time uses the network."""

    def __init__(self, run: LoadedRun) -> None:
        self.run = run
        self._lock = threading.Lock()

    @property
    def classes(self) -> list[str]:
        """The choices of the class menu: "all" and each class of a conditional run (empty: unconditional)."""
        return [ALL, *self.run.classes] if self.run.conditional else []

    @property
    def guidable(self) -> bool:
        """Whether a guidance weight means anything: classifier-free for a conditional run, autoguidance where
        the run has a trained guide."""
        from ddpmkit.run.checkpoint import latest_checkpoint
        from ddpmkit.run.guide import guide_dir

        return self.run.conditional or latest_checkpoint(guide_dir(self.run.run_dir)) is not None

    @property
    def samplers(self) -> list[str]:
        """The installed samplers, the run's own first."""
        own = self.run.components.refs["sampler"].name
        usable = sorted(
            {row["name"] for row in discovery.list_plugins() if row["kind"] == "sampler" and row["status"] == "ok"}
        )
        return [own, *[n for n in usable if n != own]]

    def describe(self) -> str:
        """A line naming the run, its step, size and (conditional) classes."""
        c, h, w = self.run.config.image_shape
        kind = f"{len(self.run.classes)} classes" if self.run.conditional else "unconditional"
        return (
            f"{self.run.source} — step {self.run.step:,}, {c}x{h}x{w}, {kind}, "
            f"sampler {self.samplers[0]} ({len(self.run.plan().timesteps)} steps)"
        )

    def takes_steps(self, sampler: str) -> bool:
        """Whether ``sampler`` has a ``steps`` option (ddpm walks every step of the schedule)."""
        try:
            return "steps" in discovery.resolve("sampler", sampler).Options.model_fields
        except DdpmkitError:
            return False

    def _plan(self, sampler: str, steps: int | None, guidance: float | None):
        sampler = sampler or self.samplers[0]
        try:
            return self.run.plan(
                sampler=sampler,
                steps=int(steps) if steps and self.takes_steps(sampler) else None,
                guidance=float(guidance) if guidance is not None else None,
            )
        except DdpmkitError as exc:
            raise PageError(str(exc)) from None

    def _labels(self, klass: str | None, num: int) -> torch.Tensor | None:
        if not self.run.conditional:
            return None
        try:
            return self.run.labels(num, ALL if klass in (None, "", ALL) else klass)
        except DdpmkitError as exc:
            raise PageError(str(exc)) from None

    def draw(
        self,
        *,
        klass: str | None = ALL,
        guidance: float | None = None,
        sampler: str = "",
        steps: int | None = None,
        num: int = 16,
        seed: int = 0,
    ) -> Drawn:
        """``num`` images and the denoising strip of the first few, from the same seed."""
        num = int(num)
        if not 1 <= num <= MAX_IMAGES:
            raise PageError(f"{num} images: the page draws 1 to {MAX_IMAGES} (ddpmkit sample draws more)")
        plan = self._plan(sampler, steps, guidance)
        labels = self._labels(klass, num)
        visited = plan.timesteps
        capture = sorted({visited[round(i * (len(visited) - 1) / (STRIP_COLUMNS - 1))] for i in range(STRIP_COLUMNS)})
        with self._lock:
            try:
                images, captured = self.run.draw(num, plan=plan, seed=int(seed), labels=labels, capture_steps=capture)
            except DdpmkitError as exc:
                raise PageError(str(exc)) from None
        from ddpmkit.run.data import to_uint8

        u8 = to_uint8(images)
        cell = u8.shape[-1] + 2
        body = (
            class_rows(u8, labels, self.run.classes)
            if labels is not None
            else grid(u8, nrow=int(np.ceil(np.sqrt(num))))
        )
        rows = min(4, num)
        strip = trajectory_strip({t: x[:rows] for t, x in captured.items()}) if captured else None
        words = (
            f"{num} images, {plan.components.refs['sampler'].name}, {len(plan.timesteps)} steps, seed {int(seed)}"
            + (f", guidance {plan.config.guidance.weight:g}" if plan.guided else "")
            + (f", class {klass}" if labels is not None and klass not in (None, "", ALL) else "")
        )
        return Drawn(enlarge(body, cell), enlarge(strip, cell) if strip is not None else None, words)

    def edit(
        self,
        image: np.ndarray | None,
        mask: np.ndarray | None,
        *,
        strength: float = 0.5,
        klass: str | None = ALL,
        guidance: float | None = None,
        sampler: str = "",
        steps: int | None = None,
        num: int = 4,
        seed: int = 0,
    ) -> Drawn:
        """``num`` edits of an uploaded ``image`` (any size, gray or colour, HxW[xC] uint8): SDEdit at
        ``strength``, or inpainting where ``mask`` (HxW, nonzero = generate) is set."""
        num = int(num)
        if image is None or not isinstance(image, np.ndarray) or image.size == 0:
            raise PageError("upload an image first (PNG or JPEG)")
        if image.ndim not in (2, 3) or max(image.shape[:2]) > MAX_UPLOAD_SIDE:
            raise PageError(
                f"an image of shape {image.shape} is not one this page can edit (at most {MAX_UPLOAD_SIDE} px a side)"
            )
        if not 1 <= num <= 16:
            raise PageError(f"{num} results: the page makes 1 to 16 per image")
        plan = self._plan(sampler, steps, guidance)
        c, h, w = plan.config.image_shape
        x = _resized(image, (h, w), c)
        generate = None  # uint8 [1, 1, H, W], white where generated
        if mask is not None and np.asarray(mask).any():
            generate = _resized((np.asarray(mask) > 0).astype(np.uint8) * 255, (h, w), 1, nearest=True)
        labels = self._labels(klass, num)
        with self._lock:
            try:
                edited = self.run.edit(
                    x.repeat(num, 1, 1, 1),
                    strength=float(strength) if generate is None else None,
                    mask=generate,
                    plan=plan,
                    seed=int(seed),
                    labels=labels,
                )
            except DdpmkitError as exc:
                raise PageError(str(exc)) from None
        from ddpmkit.run.data import to_uint8

        cells = [x]
        if generate is not None:
            gray = torch.where(generate.expand_as(x) > 127, torch.full_like(x, 128), x)
            cells.append(gray)
        cells.append(to_uint8(edited))
        u8 = torch.cat(cells)
        words = (
            f"{'inpainting' if generate is not None else f'SDEdit at strength {float(strength):g}'}, "
            f"{plan.components.refs['sampler'].name}, {num} results, seed {int(seed)} (first: the input"
            + (", then the mask in gray" if generate is not None else "")
            + ")"
        )
        return Drawn(enlarge(grid(u8, nrow=len(u8)), u8.shape[-1] + 2), None, words)


def _resized(image: np.ndarray, size: tuple[int, int], channels: int, nearest: bool = False) -> torch.Tensor:
    """An uploaded HxW[xC] array as uint8 [1, channels, H, W] of the run's ``size`` (centre-cropped square)."""
    from PIL import Image

    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[2] == 4:  # RGBA: on white, as a viewer shows it
        alpha = arr[..., 3:4].astype(np.float32) / 255
        arr = (arr[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    im = Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr)
    side = min(im.size)
    left, top = (im.width - side) // 2, (im.height - side) // 2
    im = im.crop((left, top, left + side, top + side)).convert("L" if channels == 1 else "RGB")
    im = im.resize((size[1], size[0]), Image.NEAREST if nearest else Image.BILINEAR)
    out = torch.from_numpy(np.array(im, dtype=np.uint8))
    return (out[None, None] if channels == 1 else out.permute(2, 0, 1)[None]).contiguous()


def build_page(studio: Studio) -> Any:
    """The gradio Blocks of the page (two tabs: draw, edit), with a queue of one worker."""
    import gradio as gr

    def shown(fn):
        def run(*args):
            try:
                return fn(*args)
            except PageError as exc:  # one line on the page; the server goes on
                raise gr.Error(str(exc)) from None

        return run

    def draw(klass, guidance, sampler, steps, num, seed):
        d = studio.draw(klass=klass, guidance=guidance, sampler=sampler, steps=steps, num=num, seed=seed)
        return d.grid, d.strip, d.caption

    def edit(editor, strength, klass, guidance, sampler, steps, num, seed):
        image, mask = _from_editor(editor)
        d = studio.edit(
            image,
            mask,
            strength=strength,
            klass=klass,
            guidance=guidance,
            sampler=sampler,
            steps=steps,
            num=num,
            seed=seed,
        )
        return d.grid, d.caption

    def controls(most: int, default: int, what: str) -> list[Any]:
        """The class, guidance, sampler, steps, how many and seed widgets, in the order draw and edit take them."""
        return [
            gr.Dropdown(studio.classes or [ALL], value=ALL, label="class", visible=bool(studio.classes)),
            gr.Slider(
                1.0,
                8.0,
                value=float(studio.run.config.guidance.weight),
                step=0.25,
                label="guidance weight (1 = off)",
                visible=studio.guidable,
            ),
            gr.Dropdown(studio.samplers, value=studio.samplers[0], label="sampler"),
            gr.Slider(
                1,
                studio.run.config.num_timesteps,
                value=len(studio.run.plan().timesteps),
                step=1,
                label="steps (samplers that take a step count)",
            ),
            gr.Slider(1, most, value=default, step=1, label=what),
            gr.Number(0, precision=0, minimum=0, label="seed"),
        ]

    with gr.Blocks(title="ddpmkit") as page:
        gr.Markdown(f"## ddpmkit\n{studio.describe()}")
        with gr.Tab("Draw"):
            with gr.Row():
                with gr.Column(scale=1):
                    drawing = controls(MAX_IMAGES, 16, "images")
                    go = gr.Button("Draw", variant="primary", elem_id="draw")
                with gr.Column(scale=2):
                    caption = gr.Markdown(elem_id="draw-caption")
                    out = gr.Image(label="samples", type="numpy", format="png", elem_id="samples", interactive=False)
                    gr.Markdown("the denoising strip of the first images: noise at the left, t = 0 at the right")
                    strip = gr.Image(label="denoising", show_label=False, type="numpy", format="png", interactive=False)
            go.click(shown(draw), drawing, [out, strip, caption], api_name="draw")
        with gr.Tab("Edit"):
            with gr.Row():
                with gr.Column(scale=1):
                    editor = gr.ImageEditor(
                        label="image: upload, then brush where to generate (no brush: SDEdit)",
                        type="numpy",
                        brush=gr.Brush(colors=["#ff0000"]),
                    )
                    editor.preprocess = _read_upload(editor.preprocess, gr.Error)
                    strength = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="SDEdit strength (0 keeps the image)")
                    editing = controls(16, 4, "results")
                    e_go = gr.Button("Edit", variant="primary", elem_id="edit")
                with gr.Column(scale=2):
                    e_caption = gr.Markdown()
                    e_out = gr.Image(label="input, mask, results", type="numpy", format="png", interactive=False)
            e_go.click(shown(edit), [editor, strength, *editing], [e_out, e_caption], api_name="edit")
    page.queue(default_concurrency_limit=1, max_size=64)
    return page


def _read_upload(preprocess: Any, error: type) -> Any:
    """gradio's decoding of an upload, with a file it cannot read as an image turned into one line on the page
    (gradio's own message is a paragraph naming its internals)."""

    def read(payload: Any) -> Any:
        try:
            return preprocess(payload)
        except Exception as exc:
            raise error(
                f"the upload is not an image this page can read ({type(exc).__name__}): use a PNG or JPEG file"
            ) from None

    return read


def _from_editor(value: Any) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(the uploaded image, the brushed mask or None) from an ImageEditor value."""
    if value is None:
        return None, None
    if isinstance(value, np.ndarray):
        return value, None
    background = value.get("background")
    layers = [np.asarray(layer) for layer in (value.get("layers") or []) if layer is not None]
    mask = None
    for layer in layers:
        if layer.ndim == 3 and layer.shape[2] == 4:
            brushed = layer[..., 3] > 0
            mask = brushed if mask is None else mask | brushed
    return (np.asarray(background) if background is not None else None), mask
