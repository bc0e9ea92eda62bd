"""``ddpmkit eval`` and ``ddpmkit sweep``: sample quality, for one set of images or across samplers, steps and
weights."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import typer
from rich.table import Table

from ddpmkit.commands.app import (
    DataRootOption,
    JsonOption,
    SamplerOption,
    SamplingSetOption,
    SeedOption,
    StepsOption,
    app,
    console,
    err_console,
    mnist_root,
    print_table,
    sampling_overrides,
    user_errors,
    warner,
)


@app.command("eval")
@user_errors
def eval_cmd(
    samples: Path = typer.Argument(
        ...,
        help=(
            "A samples .npz (from ddpmkit sample or run, or another sampler's), a folder of images, or a run "
            "directory or diffusers model folder to sample from first (a run's figures are kept in RUN/eval.json)."
        ),
    ),
    reference: Path | None = typer.Option(
        None, "--reference", help="A .npz or image folder (default: the MNIST test set)."
    ),
    num: int | None = typer.Option(
        None, "--num", min=10, help="Use this many samples (run directory: draw this many; default 1000)."
    ),
    sampler: str | None = SamplerOption,
    steps: int | None = StepsOption,
    set_: list[str] | None = SamplingSetOption,
    batch_size: int = typer.Option(250, "--batch-size", min=1, help="Run directory only: sampling batch size."),
    seed: int = typer.Option(
        0, "--seed", min=0, max=2**63 - 1, help="Seed of the sampling and of the reference subsets."
    ),
    data_root: Path | None = DataRootOption,
    pairs: Path | None = typer.Option(None, "--pairs", help="Where to write the closest sample/training pairs (PNG)."),
    inception_weights: Path | None = typer.Option(
        None, "--inception-weights", help="torchmetrics' FID Inception weights, for Inception FID."
    ),
    as_json: bool = JsonOption,
) -> None:
    """Measure sample quality: classifier FID, KID and MiFID (torchmetrics), precision/recall, confidence and
    memorisation, each beside its floor (the same statistic for real training images)."""
    from ddpmkit.commands.sample import draw_with_progress
    from ddpmkit.evaluation.report import (
        check_feature_network,
        evaluate,
        evaluation_data,
        read_images,
        read_labels,
        small_sample_warning,
    )
    from ddpmkit.run.data import to_uint8

    out = err_console if as_json else console
    root = mnist_root(data_root)
    from ddpmkit.sampling.diffusers_io import is_diffusers_folder

    is_run = (samples / "checkpoints").is_dir()
    if is_run or (samples / "state.json").is_file() or is_diffusers_folder(samples):  # a run, checkpoint or model
        from ddpmkit.sampling.loaded import load_run

        loaded = load_run(samples, sampler=sampler, overrides=sampling_overrides(set_, steps=steps), warn=warner(out))
        data, caveat = evaluation_data(loaded, data_root=data_root, mnist_root=root)  # before sampling
        labels = loaded.labels(num or 1000, "all") if loaded.conditional else None  # class-balanced
        images = to_uint8(
            draw_with_progress(loaded, num or 1000, batch_size=batch_size, seed=seed, out=out, labels=labels)
        )
        pairs = pairs or samples / "eval-closest-pairs.png"
    else:
        if sampler or set_ or steps:
            from ddpmkit.errors import ConfigError

            raise ConfigError("--sampler, --steps and --set apply when SAMPLES is a run directory")
        images = read_images(samples)
        check_feature_network(tuple(images.shape[1:]))  # before the classifier is trained
        data, caveat = None, None
        labels = read_labels(samples)
        if num:
            images, labels = images[:num], labels[:num] if labels is not None else None
        pairs = pairs or samples.with_name(samples.stem + "-closest-pairs.png")
    ref = read_images(reference) if reference is not None else None
    if ref is not None and data is None:
        check_feature_network(tuple(ref.shape[1:]), "the reference images")
    for line in (caveat, small_sample_warning(len(images))):
        if line:
            warner(out)(line)
    result = evaluate(
        images,
        data_root=root,
        reference=ref,
        pairs_png=pairs,
        inception_weights=inception_weights,
        seed=seed,
        labels=labels if ref is None else None,
        log=lambda m: out.print(m, highlight=False),
        data=data,
    )
    if is_run:  # beside the run, for `ddpmkit export`'s model card, and to the run's event plugins (wandb)
        (samples / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
        _tell_event_plugins(loaded, samples, result, warner(out))
    if as_json:
        print(json.dumps(result, indent=2))
        return
    _print_eval(result)


@app.command()
@user_errors
def sweep(
    run: Path = typer.Argument(..., help="A run directory (its latest checkpoint) or a checkpoint directory."),
    samplers: list[str] | None = typer.Option(
        None,
        "--sampler",
        metavar="NAME[:STEPS,...]",
        help=(
            "A sampler, with step counts to try, e.g. ddim:10,20,50 (repeatable; default: ddpm, ddim:10,20,50,100, "
            "and diffusers:10,20 with the extra)."
        ),
    ),
    num: int = typer.Option(1000, "--num", min=10, help="Samples per point (the same seeds for every point)."),
    guidance: str | None = typer.Option(
        None,
        "--guidance",
        metavar="W[,W...]",
        help=(
            "Repeat the plan at each guidance weight (guidance.weight; 1 is off): classifier-free for a conditional "
            "run, else autoguidance (needs the run's guide)."
        ),
    ),
    ema: str | None = typer.Option(
        None,
        "--ema",
        metavar="S[,S...]",
        help=(
            "Repeat the plan with the post-hoc EMA of each length (sigma_rel), rebuilt from the run's snapshots, "
            "beside the EMA it trained (default plan: the run's own sampler)."
        ),
    ),
    batch_size: int = typer.Option(250, "--batch-size", min=1),
    seed: int = SeedOption,
    data_root: Path | None = DataRootOption,
    out: Path | None = typer.Option(None, "--out", help="Folder for sweep.json and sweep.png (default: RUN/sweep)."),
    as_json: bool = JsonOption,
) -> None:
    """Sample with each sampler at each step count from the same seeds, score each with `eval`'s statistics, and
    plot quality against denoiser evaluations and against seconds."""
    import torch

    from ddpmkit.commands.sample import draw_with_progress
    from ddpmkit.evaluation.sweep import default_plan, parse_plan
    from ddpmkit.evaluation.sweep import sweep as run_sweep
    from ddpmkit.sampling.loaded import SamplingPlan, load_run
    from ddpmkit.training.posthoc_ema import parse_sigma_rels, rebuild_run

    shown = err_console if as_json else console
    lengths = parse_sigma_rels(ema, "--ema") if ema is not None else None
    weights = _weights(guidance)
    if samplers:
        parse_plan(list(samplers))  # a mistake in the options is one line before anything loads
    root = mnist_root(data_root)
    loaded = load_run(run, warn=warner(shown))
    own = (
        [loaded.components.refs["sampler"].name] if lengths else None
    )  # EMA lengths compared on the run's own sampling
    plan = parse_plan(list(samplers or own or default_plan()), weights, lengths)
    ema_weights = None
    if lengths:  # rebuilt now from the snapshots up to the run's latest checkpoint
        ema_weights = {r.sigma_rel: folder for r, folder in rebuild_run(run, lengths)}
        shown.print(
            f"rebuilt the EMA of sigma_rel {', '.join(f'{s:g}' for s in lengths)} in {Path(run) / 'posthoc-ema'}",
            highlight=False,
        )
    from ddpmkit.evaluation.report import Evaluator, evaluation_data, small_sample_warning

    data, caveat = evaluation_data(loaded, data_root=data_root, mnist_root=root)  # before sampling
    for line in (caveat, small_sample_warning(num)):
        if line:
            warner(shown)(line)
    evaluator = Evaluator(num, data_root=root, seed=seed, log=lambda m: shown.print(m, highlight=False), data=data)

    def draw(point_plan: SamplingPlan, labels: torch.Tensor | None) -> torch.Tensor:
        return draw_with_progress(
            loaded, num, batch_size=batch_size, seed=seed, plan=point_plan, out=shown, labels=labels
        )

    result = run_sweep(
        loaded,
        plan,
        num=num,
        seed=seed,
        data_root=root,
        out_dir=out or Path(run) / "sweep",
        draw=draw,
        log=lambda m: shown.print(m, highlight=False),
        evaluator=evaluator,
        ema_weights=ema_weights,
    )
    if as_json:
        print(json.dumps(result, indent=2))
        return
    from rich import box

    conditional = all("class_accuracy" in r for r in result["points"])
    # short headers, explained below the table: nine columns fit in 80
    table = Table(
        title=f"{num:,} samples per point, seed {seed} (classifier FID; KID in the JSON)",
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        caption="evals: denoiser calls per image; s: seconds; prec/rec: precision and recall (k = 3); conf: share "
        "the classifier is 90 % sure of"
        + ("; acc: class accuracy" if conditional else "")
        + ("; ema=S: the post-hoc EMA of sigma_rel S (none: the EMA it trained)" if lengths else ""),
    )
    for col in ("sampler", "evals", "s", "FID", "prec", "rec", "conf", "classes") + (("acc",) if conditional else ()):
        table.add_column(col, no_wrap=col != "sampler", overflow="fold", min_width=9 if col == "sampler" else None)
    f = result["floor"]
    for r in result["points"]:
        table.add_row(
            r["line"],
            str(r["denoiser_evaluations"]),
            f"{r['seconds']:.1f}",
            f"{r['fid']:.2f}",
            f"{r['precision']:.3f}",
            f"{r['recall']:.3f}",
            f"{r['confident_share']:.1%}",
            str(r["classes_present"]),
            *([f"{r['class_accuracy']:.1%}"] if conditional else []),
        )
    table.add_row(
        "real data",
        "",
        "",
        f"{f['fid']:.2f}",
        f"{f['precision']:.3f}",
        f"{f['recall']:.3f}",
        f"{f['confident_share']:.1%}",
        "",
    )
    print_table(table)
    console.print(f"wrote {result['plot']} and {Path(result['plot']).with_name('sweep.json')}", highlight=False)


def _weights(text: str | None) -> list[float] | None:
    """``"1,2.5"`` -> [1.0, 2.5]; ConfigError for anything that is not a list of numbers >= 0."""
    from ddpmkit.errors import ConfigError

    if text is None:
        return None
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        weights = []
    if not weights or not all(math.isfinite(w) and w >= 1 for w in weights):
        raise ConfigError(
            f"--guidance {text}: expected weights of at least 1 (1 is off) separated by commas, e.g. 1,2,2.5"
        )
    return weights


def _print_eval(r: dict) -> None:
    s, f = r["samples"], r["floor"]
    table = Table(title=f"{r['num_samples']:,} samples against {r['num_reference']:,} reference images")
    for col in ("statistic", "samples", f"floor ({r['num_samples']:,} real training images)"):
        table.add_column(col)
    rows = [
        ("classifier FID", "fid", "{:.3f}"),
        ("KID", "kid", "{:.4g}"),
        ("MiFID", "mifid", "{:.3f}"),
        ("precision (k = 3)", "precision", "{:.3f}"),
        ("recall (k = 3)", "recall", "{:.3f}"),
        ("mean confidence", "mean_confidence", "{:.3f}"),
        ("confidence > 0.9", "confident_share", "{:.1%}"),
        (f"class entropy (bits, max {math.log2(s.get('num_classes', 10)):.2f})", "class_entropy_bits", "{:.3f}"),
        ("classes present (confident)", "classes_present", "{} of " + str(s.get("num_classes", 10))),
    ]
    for label, key, fmt in rows:
        # KID as it is: on the classifier's features (not Inception's) its scale is not the field's ~1e-3
        table.add_row(label, fmt.format(s[key]), fmt.format(f[key]))
    print_table(table)
    console.print(f"predicted classes 0..{len(s['class_histogram']) - 1}: {s['class_histogram']}", highlight=False)
    m = r["memorisation"]
    console.print(
        f"memorisation: median distance to the nearest training image {m['sample_median_nn_distance']:.2f} "
        f"(real test images: {m['test_median_nn_distance']:.2f}); {m['share_closer_than_test_p1']:.1%} of samples "
        f"are closer to one than 99 % of test images are"
        + (f"; closest pairs: {m['closest_pairs_png']}" if "closest_pairs_png" in m else ""),
        highlight=False,
    )
    inc = r["inception_fid"]
    console.print(
        f"Inception FID: {inc['fid']:.3f}" if inc["status"] == "ok" else f"Inception FID: skipped: {inc['reason']}",
        highlight=False,
    )
    if "conditional" in r:
        k = r["conditional"]
        console.print(
            f"class accuracy {k['class_accuracy']:.1%} over {k['classes_drawn']} classes drawn; "
            + (
                f"per-class classifier FID {k['mean_class_fid']:.3f} on average (floor "
                f"{k['mean_class_floor_fid']:.3f}): "
                if k["mean_class_fid"] is not None
                else ""
            )
            + ", ".join(
                f"{row['class']}: {row['accuracy']:.0%}" + (f" FID {row['fid']:.2f}" if "fid" in row else "")
                for row in k["per_class"]
            ),
            highlight=False,
        )
    c = r["classifier"]
    console.print(
        f"feature network: the {c.get('data', 'MNIST')} classifier {c['key']} (held-out accuracy "
        f"{c['test_accuracy']:.2%}"
        f"{', cached' if c['cached'] else ', trained now'})",
        highlight=False,
    )


def _tell_event_plugins(loaded, run_dir: Path, result: dict, warn: Callable[[str], None]) -> None:
    """The ``evaluated`` hook of the run's event plugins, with the ``[plugins.*]`` tables it trained with."""
    from ddpmkit.errors import DdpmkitError
    from ddpmkit.run.config import config_from_dict
    from ddpmkit.run.events import EventDispatcher, RunInfo

    tables = loaded.checkpoint.schema.config.get("plugins", {}) if loaded.checkpoint is not None else {}
    try:
        cfg = config_from_dict({**loaded.config.model_dump(mode="json", exclude={"log"}), "plugins": tables})
    except DdpmkitError as exc:  # a plugin of the run is gone: the figures are in eval.json all the same
        warn(f"the run's event plugins were not given the figures: {exc}")
        return
    EventDispatcher(RunInfo(run_dir, cfg, str(loaded.device), loaded.step, loaded.step)).emit(
        "evaluated", result=result
    )
