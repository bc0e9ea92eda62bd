"""`ddpmkit sweep`: the same seeds through several samplers and step counts, each scored, as a table and a plot."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddpmkit.errors import ConfigError
from ddpmkit.evaluation.report import Evaluator

if TYPE_CHECKING:
    import torch

    from ddpmkit.sampling.loaded import LoadedRun, SamplingPlan

#: What `ddpmkit sweep` runs when no --sampler is given: ancestral sampling, DDIM at a range of steps, and
#: DPM-Solver++ (the diffusers sampler's default scheduler) at 10 and 20 steps when ddpmkit[diffusers] is installed.
DEFAULT_PLAN = ("ddpm", "ddim:10,20,50,100")
DIFFUSERS_PLAN = ("diffusers:10,20",)


def default_plan() -> tuple[str, ...]:
    import importlib.util

    return DEFAULT_PLAN + (DIFFUSERS_PLAN if importlib.util.find_spec("diffusers") is not None else ())


@dataclass(frozen=True)
class Point:
    """One sampler at one step count."""

    sampler: str
    steps: int | None  # None: the sampler's own count (ddpm: T)
    guidance: float | None = None  # None: the run's [guidance] weight
    ema: float | None = None  # the post-hoc EMA of this sigma_rel; None: the EMA the run trained

    @property
    def _weight(self) -> str:
        return ("" if self.guidance is None else f" w={self.guidance:g}") + (
            "" if self.ema is None else f" ema={self.ema:g}"
        )

    @property
    def line(self) -> str:
        """The plot's line this point belongs to: the sampler, at one guidance weight and EMA length."""
        return f"{self.sampler}{self._weight}"

    @property
    def label(self) -> str:
        steps = "" if self.steps is None else f":{self.steps}"
        return f"{self.sampler}{steps}{self._weight}"


def parse_plan(items: list[str], guidance: list[float] | None = None, ema: list[float] | None = None) -> list[Point]:
    """``["ddpm", "ddim:10,20"]`` -> points; a step count sets ``sampler.options.steps``; each guidance
    weight (``guidance.weight``) repeats the plan, and so does the trained EMA and then each post-hoc ``ema``."""
    points = []
    for item in items:
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._:-]*?)(?::(\d+(?:,\d+)*))?", item.strip())
        if not m:
            raise ConfigError(f"--sampler {item}: expected NAME or NAME:STEPS[,STEPS...], e.g. ddim:10,20,50")
        name, steps = m.group(1), m.group(2)
        if steps is None:
            points.append(Point(name, None))
        else:
            points.extend(Point(name, int(s)) for s in steps.split(","))
    if guidance:
        points = [Point(p.sampler, p.steps, float(w)) for w in guidance for p in points]
    if ema:
        points = [Point(p.sampler, p.steps, p.guidance, e) for e in [None, *ema] for p in points]
    return points


def sweep(
    run: LoadedRun,
    plan: list[Point],
    *,
    num: int,
    seed: int,
    data_root: Path,
    out_dir: Path,
    batch_size: int = 250,
    draw: Callable[[SamplingPlan, torch.Tensor | None], torch.Tensor] | None = None,
    evaluator: Evaluator | None = None,
    log: Callable[[str], None] | None = None,
    ema_weights: dict[float, Path] | None = None,
) -> dict[str, Any]:
    """Sample ``num`` images for every point of ``plan`` from the same seed, from the run loaded once, score
    each, and write sweep.json and sweep.png. ``draw(sampling_plan, labels)`` (default: ``run.draw``) gives the
    images; a conditional run draws every class alike and is also scored by class accuracy. A point with a
    post-hoc EMA length samples the weights of its folder in ``ema_weights`` (sigma_rel -> folder, e.g.
    from :func:`ddpmkit.training.posthoc_ema.rebuild_run`), swapped into the loaded network."""
    from ddpmkit.run.data import to_uint8

    log = log or (lambda m: None)
    labels = run.labels(num, "all") if run.conditional else None
    draw = draw or (lambda p, y: run.draw(num, plan=p, seed=seed, batch_size=batch_size, labels=y)[0])
    if evaluator is None:
        from ddpmkit.evaluation.report import evaluation_data

        data, _ = evaluation_data(run, data_root=None, mnist_root=data_root)  # the run's own labelled data
        evaluator = Evaluator(num, data_root=data_root, seed=seed, log=log, data=data)
    ev = evaluator
    # every point's sampler is validated before the first one samples
    plans = [run.plan(sampler=point.sampler, steps=point.steps, guidance=point.guidance) for point in plan]
    missing = sorted({p.ema for p in plan if p.ema is not None} - set(ema_weights or {}))
    if missing:
        raise ConfigError(f"no rebuilt weights for the EMA lengths {missing}: `ddpmkit ema RUN --sigma-rel ...` first")
    trained, loaded_ema = run.source, None
    rows = []
    for point, sampling in zip(plan, plans):
        if point.ema != loaded_ema:  # the points of one EMA length are consecutive: one swap each
            run.load_weights(trained if point.ema is None else (ema_weights or {})[point.ema])
            loaded_ema = point.ema
        started = time.perf_counter()
        images = to_uint8(draw(sampling, labels))
        seconds = time.perf_counter() - started
        scored = ev.score(images)["samples"]
        if labels is not None:
            classes = ev.score_classes(images, labels)
            scored.update(class_accuracy=classes["class_accuracy"], mean_class_fid=classes["mean_class_fid"])
        rows.append(
            {
                **asdict(point),
                "label": point.label,
                "line": point.line,
                "denoiser_evaluations": sampling.evaluations,
                "seconds": seconds,
                **{
                    k: scored[k]
                    for k in (
                        "fid",
                        "kid",
                        "precision",
                        "recall",
                        "confident_share",
                        "classes_present",
                        "class_accuracy",
                        "mean_class_fid",
                    )
                    if k in scored
                },
            }
        )
        log(
            f"{point.label}: FID {scored['fid']:.2f}, {scored['confident_share']:.1%} confident"
            + (f", class accuracy {scored['class_accuracy']:.1%}" if "class_accuracy" in scored else "")
            + f", {seconds:.1f} s"
        )
    if loaded_ema is not None:
        run.load_weights(trained)  # the run as it was given
    floor = {k: ev.floor[k] for k in ("fid", "kid", "precision", "recall", "confident_share")}
    result = {"run": str(run.run_dir), "num_samples": num, "seed": seed, "floor": floor, "points": rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sweep.json").write_text(json.dumps(result, indent=2))
    plot(result, out_dir / "sweep.png")
    result["plot"] = str(out_dir / "sweep.png")
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    """Classifier FID against denoiser evaluations and against seconds, one line per sampler (and guidance weight),
    the floor dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conditional = all("class_accuracy" in row for row in result["points"])
    lengths = any(row.get("ema") is not None for row in result["points"])
    panels = 2 + conditional + lengths
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), constrained_layout=True)
    by_sampler: dict[str, list[dict]] = {}
    for row in result["points"]:
        by_sampler.setdefault(row.get("line", row["sampler"]), []).append(row)
    for ax, x_key, x_label in (
        (axes[0], "denoiser_evaluations", "denoiser evaluations per image"),
        (axes[1], "seconds", f"seconds for {result['num_samples']:,} images"),
    ):
        for name, rows in by_sampler.items():
            rows = sorted(rows, key=lambda r: r[x_key])
            ax.plot([r[x_key] for r in rows], [r["fid"] for r in rows], marker="o", label=name)
        ax.axhline(result["floor"]["fid"], linestyle="--", color="grey", label="floor (real images)")
        ax.set_xscale("log")
        ax.set_xlabel(x_label)
        ax.set_ylabel("classifier FID (lower is better)")
        ax.grid(True, which="both", alpha=0.3)
    if conditional:  # the trade-off guidance makes: accuracy up, diversity (recall) and FID where they go
        ax = axes[2]
        rows = sorted(result["points"], key=lambda r: r["class_accuracy"])
        ax.plot([r["class_accuracy"] for r in rows], [r["fid"] for r in rows], marker="o", label="FID")
        ax.set_xlabel("class accuracy")
        ax.set_ylabel("classifier FID")
        twin = ax.twinx()
        twin.plot(
            [r["class_accuracy"] for r in rows],
            [r["recall"] for r in rows],
            marker="s",
            color="tab:orange",
            label="recall",
        )
        twin.set_ylabel("recall (diversity)")
        for r in rows:
            ax.annotate(r["label"], (r["class_accuracy"], r["fid"]), fontsize=7)
        ax.grid(True, alpha=0.3)
    if lengths:  # post-hoc EMA: the figure against the EMA length, each point of the plan a line
        ax = axes[-1]
        by_point: dict[str, list[dict]] = {}
        for row in result["points"]:
            point = row["label"].split(" ema=")[0]
            by_point.setdefault(point, []).append(row)
        for i, (name, rows) in enumerate(by_point.items()):
            color = f"C{i}"
            rebuilt = sorted((r for r in rows if r.get("ema") is not None), key=lambda r: r["ema"])
            ax.plot(
                [r["ema"] for r in rebuilt],
                [r["fid"] for r in rebuilt],
                marker="o",
                color=color,
                label=f"{name}, post-hoc EMA",
            )
            for r in rows:
                if r.get("ema") is None:
                    ax.axhline(r["fid"], color=color, linestyle=":", label=f"{name}, the EMA it trained")
        ax.axhline(result["floor"]["fid"], linestyle="--", color="grey")
        ax.set_xscale("log")
        ax.set_xlabel("EMA length (sigma_rel)")
        ax.set_ylabel("classifier FID")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    from matplotlib.ticker import FuncFormatter

    def some(value: float, _: int) -> str:  # minor ticks of a log axis: 2 and 5 labelled, the rest not
        return f"{value:g}" if f"{value:.0e}"[0] in "25" else ""

    for ax in axes:
        if ax.get_xscale() == "log":  # matplotlib's own labels every minor tick of a narrow range, overlapping
            ax.xaxis.set_minor_formatter(FuncFormatter(some))
    axes[0].legend()
    fig.suptitle(f"speed against quality: {result['run']}, {result['num_samples']:,} samples, seed {result['seed']}")
    fig.savefig(path, dpi=100)
    plt.close(fig)
