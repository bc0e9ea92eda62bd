"""The ``ddpmkit`` command line (Typer + rich).

torch and the plugins' heavy code are imported inside the commands that need them, so that
``ddpmkit --help`` and ``ddpmkit list-plugins`` answer fast.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import traceback
import warnings
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .errors import DEBUG_ENV, DdpmkitError, DdpmkitWarning, debug_enabled

app = typer.Typer(
    name="ddpmkit",
    help="Train and sample Denoising Diffusion Probabilistic Models from one TOML config.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(emoji=False)  # ":100:" in "ddim:100:" is a step count, not an emoji
err_console = Console(stderr=True, emoji=False)

SetOption = typer.Option(
    None, "--set", metavar="KEY.PATH=VALUE", help="Override a config value, e.g. --set train.batch_size=128 (repeatable)."
)


_flags = {"debug": False}


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """ddpmkit's warnings are one line on stderr; others keep Python's format."""
    if issubclass(category, DdpmkitWarning):
        err_console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def user_errors(func: Callable) -> Callable:
    """Turn a DdpmkitError into one line on stderr and exit code 2; bugs keep their traceback.

    With ``--debug`` (or DDPMKIT_DEBUG=1) the traceback behind a one-line plugin error is shown too.
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        warnings.showwarning = _show_warning
        warnings.simplefilter("always", DdpmkitWarning)
        try:
            return func(*args, **kwargs)
        except DdpmkitError as exc:
            if _flags["debug"] or debug_enabled():
                traceback.print_exception(exc, file=sys.stderr)
            # escape: a message may quote user text such as "[/x]" that rich would read as markup
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        console.print(f"ddpmkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help=f"Show the full traceback behind an error (or set {DEBUG_ENV}=1)."),
) -> None:
    _flags["debug"] = debug


@app.command("list-plugins")
@user_errors
def list_plugins_cmd(as_json: bool = typer.Option(False, "--json", help="Print a JSON array instead of a table.")) -> None:
    """Show the installed noise schedules, denoisers and samplers, and plugins that failed to load."""
    from .plugins import list_plugins

    rows = list_plugins()
    if as_json:
        keys = ("kind", "name", "qualified_name", "plugin", "distribution", "version", "status", "error")
        print(json.dumps([{k: r[k] for k in keys} for r in rows], indent=2))
        return
    table = Table(title="ddpmkit plugins")
    styles = {"ok": "green", "clash": "yellow", "shadowed": "yellow", "error": "red", "incompatible": "red"}
    # the qualified name is DISTRIBUTION:NAME, so it also says where a component comes from
    cells = [
        (r["kind"] or "-", r["name"] or "-",
         r["qualified_name"] or f"{r['distribution'] or '?'} (plugin {r['plugin']})", r["version"] or "?", r["status"])
        for r in rows
    ]
    for col in ("kind", "name", "qualified name", "version", "status"):
        # names fold, never truncate (two long distribution names must not end up looking the same);
        # the short columns never wrap
        short = col in ("kind", "version", "status")
        table.add_column(col, overflow="fold", no_wrap=short)
    for c in cells:
        table.add_row(*map(escape, c[:4]), f"[{styles.get(c[4], 'white')}]{c[4]}[/]")
    console.print(table)
    for r in rows:
        if r["error"]:
            what = f"{r['kind']} '{r['name']}'" if r["name"] else f"plugin '{r['plugin']}'"
            console.print(f"[{styles.get(r['status'], 'white')}]{escape(what)}:[/] {escape(r['error'])}", highlight=False)


@app.command()
@user_errors
def validate(
    config: Path = typer.Argument(..., help="The run's TOML config."),
    set_: Optional[List[str]] = SetOption,
    data_root: Optional[Path] = typer.Option(
        None, "--data-root", help="Where the dataset lives (overrides data.root and DDPMKIT_DATA_ROOT)."
    ),
    timing: bool = typer.Option(True, "--timing/--no-timing", help="Time a few training steps to estimate the run's length."),
) -> None:
    """Check a config, build what it names, and report on the run before it starts (no training)."""
    from .config import load_config
    from .preflight import preflight
    from .factory import build_checked
    from .summary import describe_config

    cfg = load_config(config, set_)
    built = build_checked(cfg)
    console.print(describe_config(cfg, built))
    findings = preflight(cfg, built, data_root=data_root, timing=timing)
    for f in findings:
        console.print(f"{f.label:<10} {escape(f.text)}", highlight=False)
    for f in findings:
        if f.warning:
            console.print(f"[yellow]warning:[/] {escape(f.warning)}", highlight=False)
    console.print(f"[green]ok:[/] {config} is valid")


@app.command()
@user_errors
def run(
    config: Path = typer.Argument(..., help="The run's TOML config."),
    set_: Optional[List[str]] = SetOption,
    fresh: bool = typer.Option(False, "--fresh", help="Delete the run's checkpoints and start over."),
    data_root: Optional[Path] = typer.Option(
        None, "--data-root", help="Where the dataset lives (overrides data.root and DDPMKIT_DATA_ROOT)."
    ),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps (overrides run.device)."),
    nproc: int = typer.Option(
        1, "--nproc", min=1, help="Train with N processes on this machine (launches torchrun; DDP, gloo on CPU, NCCL on CUDA)."
    ),
) -> None:
    """Train (or resume) the run a config describes, then sample from it."""
    from .config import load_config
    from .runner import run_config

    if nproc > 1:
        import os

        if "WORLD_SIZE" in os.environ:
            raise DdpmkitError("--nproc inside torchrun: use one or the other")
        load_config(config, list(set_ or []))  # a config mistake is one line here, not one per process
        args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                "-m", "ddpmkit", "run", str(config)]
        args += [a for item in (set_ or []) for a in ("--set", item)]
        args += (["--fresh"] if fresh else []) + (["--data-root", str(data_root)] if data_root else [])
        args += ["--device", device] if device else []
        # the cores shared out between the processes (torchrun would pick 1 and print a banner about it)
        env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc)), **os.environ}
        raise typer.Exit(_launch(args, env))
    overrides = list(set_ or [])
    if device:
        overrides.append(f"run.device={device}")
    cfg = load_config(config, overrides)
    code = run_config(cfg, console=console, fresh=fresh, data_root=data_root)
    if code:
        raise typer.Exit(code)


@app.command()
@user_errors
def sample(
    source: Path = typer.Argument(..., help="A run directory (its latest checkpoint) or a checkpoint directory."),
    num: int = typer.Option(16, "--num", min=1, help="Number of images."),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    seed: int = typer.Option(0, "--seed", min=0, max=2**63 - 1),
    out: Path = typer.Option(Path("samples.png"), "--out", help="FILE.png (a grid) or FILE.npz (uint8 NHWC 'images')."),
    raw: bool = typer.Option(False, "--raw", help="Use the raw weights instead of the EMA weights."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="Another installed sampler than the config's."),
    set_: Optional[List[str]] = typer.Option(
        None, "--set", metavar="KEY.PATH=VALUE", help="Override a config value, e.g. --set sampler.options.variance=posterior."
    ),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps."),
) -> None:
    """Draw images from a trained run's checkpoint."""
    from .sampling import sample_command

    sample_command(
        source,
        num=num,
        batch_size=batch_size,
        seed=seed,
        out=out,
        use_ema=not raw,
        sampler=sampler,
        overrides=list(set_ or []),
        device=device,
        console=console,
    )


@app.command("eval")
@user_errors
def eval_cmd(
    samples: Path = typer.Argument(..., help="A samples .npz (from ddpmkit sample or run), a folder of images, or a run directory to sample from first."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="A .npz or image folder (default: the MNIST test set)."),
    num: Optional[int] = typer.Option(None, "--num", min=10, help="Use this many samples (run directory: draw this many; default 1000)."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="Run directory only: sample with another sampler."),
    set_: Optional[List[str]] = typer.Option(None, "--set", metavar="KEY.PATH=VALUE", help="Run directory only: sampling overrides."),
    batch_size: int = typer.Option(250, "--batch-size", min=1, help="Run directory only: sampling batch size."),
    seed: int = typer.Option(0, "--seed", min=0, max=2**63 - 1, help="Seed of the sampling and of the reference subsets."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="The folder holding MNIST/raw (default: DDPMKIT_DATA_ROOT or ./data)."),
    pairs: Optional[Path] = typer.Option(None, "--pairs", help="Where to write the closest sample/training pairs (PNG)."),
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", help="torchmetrics' FID Inception weights, for Inception FID."),
    as_json: bool = typer.Option(False, "--json", help="Print only JSON on stdout."),
) -> None:
    """Measure sample quality: classifier FID, KID and MiFID (torchmetrics), precision/recall, confidence and
    memorisation, each beside its floor (the same statistic for real training images)."""
    from .data import to_uint8
    from .evaluation.report import evaluate, read_images

    out = err_console if as_json else console
    root = _mnist_root(data_root)
    if (samples / "checkpoints").is_dir() or (samples / "state.json").is_file():  # a run or a checkpoint
        from .sampling import draw_from_checkpoint

        drawn, _ = draw_from_checkpoint(samples, num=num or 1000, batch_size=batch_size, seed=seed, use_ema=True,
                                     sampler=sampler, overrides=list(set_ or []), device=None, console=out)
        images = to_uint8(drawn)
        pairs = pairs or samples / "eval-closest-pairs.png"
    else:
        if sampler or set_:
            from .errors import ConfigError

            raise ConfigError("--sampler and --set apply when SAMPLES is a run directory")
        images = read_images(samples)[:num] if num else read_images(samples)
        pairs = pairs or samples.with_name(samples.stem + "-closest-pairs.png")
    ref = read_images(reference) if reference is not None else None
    result = evaluate(images, data_root=root, reference=ref, pairs_png=pairs, inception_weights=inception_weights,
                      seed=seed, log=lambda m: out.print(m, highlight=False))
    if as_json:
        print(json.dumps(result, indent=2))
        return
    _print_eval(result)


@app.command()
@user_errors
def sweep(
    run: Path = typer.Argument(..., help="A run directory (its latest checkpoint) or a checkpoint directory."),
    samplers: Optional[List[str]] = typer.Option(
        None, "--sampler", metavar="NAME[:STEPS,...]", help="A sampler, with step counts to try, e.g. ddim:10,20,50 (repeatable; default: ddpm, ddim:10,20,50,100, and diffusers:10,20 with the extra)."
    ),
    num: int = typer.Option(1000, "--num", min=10, help="Samples per point (the same seeds for every point)."),
    guidance: Optional[str] = typer.Option(
        None, "--guidance", metavar="W[,W...]", help="Repeat the plan at each autoguidance weight (guidance.weight; 1 is off; above 1 needs the run's guide)."
    ),
    batch_size: int = typer.Option(250, "--batch-size", min=1),
    seed: int = typer.Option(0, "--seed", min=0, max=2**63 - 1),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="The folder holding MNIST/raw (default: DDPMKIT_DATA_ROOT or ./data)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for sweep.json and sweep.png (default: RUN/sweep)."),
    as_json: bool = typer.Option(False, "--json", help="Print only JSON on stdout."),
) -> None:
    """Sample with each sampler at each step count from the same seeds, score each with `eval`'s statistics, and
    plot quality against denoiser evaluations and against seconds."""
    from .evaluation.sweep import default_plan, parse_plan, sweep as run_sweep

    shown = err_console if as_json else console
    plan = parse_plan(list(samplers or default_plan()), _weights(guidance))
    root = _mnist_root(data_root)
    result = run_sweep(run, plan, num=num, batch_size=batch_size, seed=seed, data_root=root,
                       out_dir=out or Path(run) / "sweep", console=shown)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    from rich import box

    table = Table(title=f"{num:,} samples per point, seed {seed} (classifier FID; KID in the JSON)", box=box.SIMPLE_HEAD)
    for col in ("sampler", "steps", "seconds", "FID", "precision", "recall", "confident", "digits"):
        table.add_column(col, no_wrap=col != "sampler", overflow="fold", min_width=9 if col == "sampler" else None)
    f = result["floor"]
    for r in result["points"]:
        table.add_row(r["line"], str(r["denoiser_evaluations"]), f"{r['seconds']:.1f}", f"{r['fid']:.2f}",
                      f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['confident_share']:.1%}",
                      str(r["classes_present"]))
    table.add_row("real data", "", "", f"{f['fid']:.2f}", f"{f['precision']:.3f}", f"{f['recall']:.3f}",
                  f"{f['confident_share']:.1%}", "")
    console.print(table)
    console.print(f"wrote {result['plot']} and {Path(result['plot']).with_name('sweep.json')}", highlight=False)


def _weights(text: Optional[str]) -> list[float] | None:
    """``"1,2.5"`` -> [1.0, 2.5]; ConfigError for anything that is not a list of numbers >= 0."""
    from .errors import ConfigError

    if text is None:
        return None
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        weights = []
    if not weights or not all(math.isfinite(w) and w >= 0 for w in weights):
        raise ConfigError(f"--guidance {text}: expected weights >= 0 separated by commas, e.g. 1,2,2.5")
    return weights


def _mnist_root(data_root: Optional[Path]) -> Path:
    """Where eval and sweep read MNIST: --data-root, else $DDPMKIT_DATA_ROOT, else ./data (as a run config's default)."""
    from .config import DataSection
    from .data import resolve_root

    return resolve_root(DataSection(), data_root)


def _print_eval(r: dict) -> None:
    s, f = r["samples"], r["floor"]
    table = Table(title=f"{r['num_samples']:,} samples against {r['num_reference']:,} reference images")
    for col in ("statistic", "samples", f"floor ({r['num_samples']:,} real training images)"):
        table.add_column(col)
    rows = [
        ("classifier FID", "fid", "{:.3f}"), ("KID", "kid", "{:.4g}"), ("MiFID", "mifid", "{:.3f}"),
        ("precision (k = 3)", "precision", "{:.3f}"), ("recall (k = 3)", "recall", "{:.3f}"),
        ("mean confidence", "mean_confidence", "{:.3f}"), ("confidence > 0.9", "confident_share", "{:.1%}"),
        ("class entropy (bits, max 3.32)", "class_entropy_bits", "{:.3f}"),
        ("digits present (confident)", "classes_present", "{} of 10"),
    ]
    for label, key, fmt in rows:
        table.add_row(label, fmt.format(s[key]), fmt.format(f[key]))
    console.print(table)
    console.print(f"predicted classes 0..9: {s['class_histogram']}", highlight=False)
    m = r["memorisation"]
    console.print(
        f"memorisation: median distance to the nearest training image {m['sample_median_nn_distance']:.2f} "
        f"(real test images: {m['test_median_nn_distance']:.2f}); {m['share_closer_than_test_p1']:.1%} of samples "
        f"are closer to one than 99 % of test images are" + (f"; closest pairs: {m['closest_pairs_png']}" if "closest_pairs_png" in m else ""),
        highlight=False,
    )
    inc = r["inception_fid"]
    console.print(f"Inception FID: {inc['fid']:.3f}" if inc["status"] == "ok" else f"Inception FID: skipped: {inc['reason']}",
                  highlight=False)
    c = r["classifier"]
    console.print(f"feature network: MNIST classifier {c['key']} (test accuracy {c['test_accuracy']:.2%}"
                  f"{', cached' if c['cached'] else ', trained now'})", highlight=False)


@app.command()
@user_errors
def bench(
    config: Path = typer.Argument(..., help="The run's TOML config (its denoiser, batch sizes and sampler)."),
    set_: Optional[List[str]] = SetOption,
    steps: int = typer.Option(10, "--steps", min=1, help="Timed training steps per mode (after the warm-up)."),
    warmup: int = typer.Option(3, "--warmup", min=1, help="Untimed training steps first (set-up, compilation)."),
    sample_steps: int = typer.Option(10, "--sample-steps", min=1, help="Timed sampler steps per mode."),
    modes: Optional[str] = typer.Option(
        None, "--modes", help="Comma-separated speed modes, e.g. fp32,bf16+cl,bf16+cl+compile (default: all for the device)."
    ),
    no_sample: bool = typer.Option(False, "--no-sample", help="Measure training only."),
    sample_batches: str = typer.Option(
        "", "--sample-batches", help="Also sample at these batch sizes in the fastest mode, e.g. 16,256."
    ),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N or mps (overrides run.device)."),
    as_json: bool = typer.Option(False, "--json", help="Print only JSON on stdout."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the JSON to this file."),
) -> None:
    """Training and sampling speed of ddpmkit in each speed mode beside the tutorial's own loops, in one process.

    Random images of the config's shape stand in for the data; nothing is written but --out.
    """
    from .benchmark.bench import parse_mode, run_bench
    from .config import load_config
    from .device import pick_device

    overrides = list(set_ or [])
    if device:
        overrides.append(f"run.device={device}")
    cfg = load_config(config, overrides)
    dev = pick_device(cfg.run.device)
    chosen = [parse_mode(m) for m in modes.split(",")] if modes else None
    try:
        batches = tuple(int(b) for b in sample_batches.split(",") if b.strip())
    except ValueError:
        raise DdpmkitError(f"--sample-batches {sample_batches}: expected comma-separated batch sizes, e.g. 16,256") from None
    if any(b < 1 for b in batches):
        raise DdpmkitError(f"--sample-batches {sample_batches}: batch sizes must be at least 1")
    say = err_console if as_json else console
    with say.status("measuring") as status:
        result = run_bench(cfg, dev, modes=chosen, steps=steps, warmup=warmup, sample_steps=sample_steps,
                           sample=not no_sample, sample_batches=batches, note=lambda text: status.update(f"measuring {text}"))
    result["config"] = str(config)
    text = json.dumps(result, indent=2)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    if as_json:
        print(text)
    else:
        _print_bench(result)


RANK_STOPPED_HINT = "this one stopped too"


def _launch(args: list[str], env: dict[str, str]) -> int:
    """Run torchrun; when a worker fails with ddpmkit's one-line error, show that line once (exit code 2)
    instead of torchrun's own traceback about a failed child. Anything else is shown whole."""
    import subprocess

    proc = subprocess.run(args, env=env, stderr=subprocess.PIPE, text=True)
    lines = proc.stderr.splitlines()
    warnings_ = list(dict.fromkeys(line for line in lines if line.startswith("warning:")))
    errors = list(dict.fromkeys(line for line in lines if line.startswith("error:")))
    if proc.returncode == 0 or not errors or _flags["debug"]:
        sys.stderr.write(proc.stderr)
        return proc.returncode
    # every rank reports; the cause is the line that is not a "stopped because another stopped"
    causes = [line for line in errors if RANK_STOPPED_HINT not in line] or errors
    sys.stderr.write("\n".join(warnings_ + causes[:1]) + "\n")
    return 2


def _print_bench(r: dict) -> None:
    peaks = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in r["matmul_peak_flop_per_s"].items())
    console.print(
        f"[bold]ddpmkit bench[/] {r['config']}: {r['denoiser']} {r['parameters']:,} parameters, "
        f"{'x'.join(map(str, r['image_shape']))}, on {r['device']} ({r['device_name']}, {r['threads']} threads), "
        f"torch {r['torch']}\n  matmul peak GFLOP/s: {peaks}; "
        f"{r['flops_per_image']['train'] / 1e9:.2f} GFLOP per training image, "
        f"{r['flops_per_image']['forward'] / 1e9:.2f} per forward pass; memory: {r['memory']}",
        highlight=False,
    )
    for key, title, unit in (
        ("training", f"training, batch {r['batch_size']}: median of {r['timed_steps']} steps after {r['warmup_steps']}", "images/s"),
        ("sampling", f"sampling: {r['sample_steps']} steps", "image-steps/s"),
    ):
        if not r[key]:
            continue
        table = Table(title=title, title_justify="left")
        for col in ("loop", "mode", unit, "x tutorial", "GFLOP/s", "of peak", "memory", "set-up s"):
            table.add_column(col, justify="left" if col in ("loop", "mode") else "right")
        for row in r[key]:
            table.add_row(
                row["loop"], row["mode"], f"{row['per_s']:.1f}", f"{row['ratio']:.2f}",
                f"{row['flop_per_s'] / 1e9:.1f}", f"{row['utilisation']:.0%}" if row["utilisation"] else "",
                f"{row['peak_memory'] / 2**20:,.0f} MiB", f"{row['setup_s']:.1f}" if row["setup_s"] is not None else "",
            )
        console.print(table)


@app.command("check-plugins")
@user_errors
def check_plugins(
    names: Optional[List[str]] = typer.Argument(None, help="Components to check, plain or DISTRIBUTION:NAME (default: all)."),
    set_: Optional[List[str]] = typer.Option(
        None, "--set", metavar="KEY=VALUE", help="Check with this option set, e.g. --set steps=10 (one NAME only; repeatable)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON array of results instead of a table."),
    device: str = typer.Option("cpu", "--device", help="Device to run the checks on."),
) -> None:
    """Run the conformance checks on installed schedules, denoisers and samplers; exit 1 if any fails."""
    from .config import parse_override
    from .errors import ConfigError
    from .testing import check_component

    targets = _components_named(names or [])
    options: dict = {}
    for item in set_ or []:
        if len(targets) != 1:
            raise ConfigError("--set needs exactly one component NAME to apply to")
        key, value, _ = parse_override(item)
        options[key] = value
    if options:
        from .factory import validate_options

        validate_options(targets[0], options)  # a bad option is a user error (exit 2), not a failed check
    results = []
    for comp in targets:
        if not as_json:
            console.print(f"checking {comp.label} as {comp.qualified} ...", highlight=False)
        results.extend(check_component(comp.kind, comp.qualified, options or None, device=device))
    if as_json:
        print(json.dumps([x.as_dict() for x in results], indent=2))
    else:
        table = Table(title="conformance")
        for col in ("kind", "name", "check", "result", "detail"):
            table.add_column(col, overflow="fold")
        for x in results:
            table.add_row(x.kind, x.qualified_name, x.check, "[green]pass[/]" if x.passed else "[red]FAIL[/]", escape(x.detail))
        console.print(table)
    failed = [x for x in results if not x.passed]
    if failed:
        if not as_json:
            err_console.print(f"[red]{len(failed)} of {len(results)} checks failed[/]")
        raise typer.Exit(1)


def _components_named(names: list[str]) -> list:
    """The installed components ``names`` mean (each plain name in every kind that has it); when empty, all
    of them but those that need an optional extra that is not installed (said in one line each)."""
    from .errors import MissingExtra, PluginError
    from .kinds import KINDS
    from .plugins import find, load, registry

    reg = registry()
    if not names:
        found = []
        for comp in (c for c in reg.components if c.plugin.status == "ok"):
            try:
                load(comp)
            except PluginError as exc:
                if isinstance(exc.__cause__, MissingExtra):
                    err_console.print(f"skipping {comp.qualified}: {escape(str(exc.__cause__))}", highlight=False)
                    continue
            found.append(comp)
        return found
    found = []
    for name in names:
        kinds = [k for k in KINDS if reg.named(k, name.rpartition(":")[2])]
        if not kinds:
            raise PluginError(f"no installed component named {name}; see ddpmkit list-plugins")
        found.extend(find(kind, name) for kind in kinds)
    return found


@app.command()
@user_errors
def describe(
    name: str = typer.Argument(..., help="A component or event plugin, plain or DISTRIBUTION:NAME, e.g. unet."),
    kind: Optional[str] = typer.Option(
        None, "--kind", help="schedule, denoiser, sampler or events (when a name is used by several kinds)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the options' JSON schema."),
) -> None:
    """Show a component's (or an event plugin's) options: types, defaults and descriptions."""
    from .errors import PluginError
    from .kinds import EVENTS, KINDS
    from .plugins import event_plugins, find, find_plugin, load, registry

    reg = registry()
    if kind and kind not in (*KINDS, EVENTS):
        raise PluginError(f"--kind must be one of {', '.join((*KINDS, EVENTS))}")
    short = name.rpartition(":")[2]
    kinds = [k for k in KINDS if reg.named(k, short)]
    if any(p.name == short for p, _ in event_plugins(reg)) or any(p.name == short and p.options_model for p in reg.plugins):
        kinds.append(EVENTS)
    if kind:
        kinds = [kind]
    if not kinds:
        raise PluginError(
            f"nothing installed is named '{name}'; components: {', '.join(sorted({c.name for c in reg.components}))}; "
            f"event plugins: {', '.join(sorted(p.name for p, _ in event_plugins(reg))) or 'none'}"
        )
    if len(kinds) > 1:
        raise PluginError(f"'{name}' names a {' and a '.join(kinds)}; choose one with --kind")
    if kinds[0] == EVENTS:
        plugin = find_plugin(name)
        model, title = plugin.options_model, f"event plugin [bold]{plugin.name}[/] ({plugin.distribution} {plugin.version})"
        title += escape(f", configured by [plugins.{plugin.name}]")
    else:
        comp = find(kinds[0], name)
        model, title = load(comp).Options, f"{escape(comp.label)} as {comp.qualified}"
    schema = model.model_json_schema() if model is not None else {"properties": {}}
    if as_json:
        print(json.dumps(schema, indent=2))
        return
    console.print(title, highlight=False)
    if not schema.get("properties"):
        console.print("no options")
        return
    table = Table()
    for col in ("option", "type", "default", "description"):
        table.add_column(col)
    for key, prop in schema.get("properties", {}).items():
        table.add_row(key, escape(_schema_type(prop)), escape(json.dumps(prop.get("default"))), escape(prop.get("description", "")))
    console.print(table)


def _schema_type(prop: dict) -> str:
    """A short type name for one property of a JSON schema."""
    if "enum" in prop:
        return "one of " + ", ".join(map(str, prop["enum"]))
    if "type" in prop:
        return str(prop["type"])
    return " | ".join(str(a.get("type", "?")) for a in prop.get("anyOf", [])) or "?"


def main() -> None:
    """Console-script entry point."""
    app(prog_name="ddpmkit")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
