"""Hostile inputs, table-driven: each is refused with one line and exit code 2, before anything is allocated."""

from __future__ import annotations

import numpy as np
import pytest
from runconfigs import invoke, write_config

pytestmark = pytest.mark.usefixtures("one_thread")

#: (--set override, a phrase the one-line error must contain)
BAD_SETTINGS = [
    ("train.batch_size=true", "train.batch_size: expected a number, got true"),
    ("train.epochs=false", "train.epochs: expected a number, got false"),
    ("train.lr=true", "train.lr: expected a number, got true"),
    ("schedule.options.num_timesteps=true", "expected a number, got true"),
    ("train.lr=inf", "train.lr"),
    ("train.lr=nan", "train.lr"),
    ("train.lr=-1", "train.lr"),
    ("train.epochs=-1", "train.epochs"),
    ("train.epochs=0", "train.epochs"),  # would sample from an untrained network
    ("train.max_steps=0", "train.max_steps"),
    ("train.precision=fp8", "train.precision"),
    ("train.nonfinite=ignore", "train.nonfinite"),
    ("train.max_nonfinite_skips=0", "train.max_nonfinite_skips"),
    ("train.compile=maybe", "train.compile"),
    ("schedule.options.num_timesteps=1000000000", "needs about"),
    ("schedule.options.num_timesteps=0", "num_timesteps"),
    ("data.image_size=1000000", "data.image_size = 1000000 needs about"),
    ("denoiser.options.time_embedding=learned", "time_embedding"),
    ("denoiser.options.channels=[8,16,32]", "channels"),
    ("sampler.name=nonexistent", "unknown sampler"),
    ("run.name=../../escape", "run.name"),
    ("train.ema_decay=1.5", "train.ema_decay"),
    ("run.seed=18446744073709551616", "run.seed"),  # 2**64: torch's generators take at most 2**63 - 1
    ("sample.seed=-1", "sample.seed"),
    ("run.device=cuda:-1", "run.device"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.batch_size=1.5", "fractional part"),
    ('train.lr="fast"', "train.lr"),
    ("train.lr=", "train.lr"),
    ("train.lr=1e400", "finite number"),
    ("train.batch_size=[1,2]", "train.batch_size"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints"),
    ("train.checkpoint_every=0", "train.checkpoint_every"),
    ("train.grad_clip=-1", "train.grad_clip"),
    ("train.lr_warmup_steps=-1", "train.lr_warmup_steps"),
    ("train.lr_decay=exponential", "train.lr_decay"),
    ("train.loss_weighting=p2", "train.loss_weighting"),
    ("train.max_steps=-3", "train.max_steps"),
    ("data.dataset=cifar100", "data.dataset"),
    ("data.image_size=30", "divisible by 4"),
    ("data.num_samples=0", "data.num_samples"),
    ("sample.num_images=-1", "sample.num_images"),
    ("sample.batch_size=0", "sample.batch_size"),
    ("sample.trajectory_steps=[5000]", "not below T = 20"),
    ("schedule.options.beta_start=0.5", "betas must increase"),
    ("schedule.options.beta_end=1.5", "schedule.options.beta_end"),
    ("schedule.name=", "unknown schedule"),
    ("denoiser.options.prediction=score", "denoiser.options.prediction"),
    ("denoiser.options.dropout=1.5", "denoiser.options.dropout"),
    ("denoiser.options.num_groups=7", "not divisible by num_groups"),
    ("denoiser.options.num_heads=3", "not divisible by num_heads"),
    ("denoiser.name=unet2", "unknown denoiser"),
    ("sampler.options.eta=-1", "unknown key"),  # the ddpm sampler has no eta
    ("run.unknown_key=1", "unknown key"),
    ("nosuchsection.x=1", "unknown key"),
    ("run.name=a/b", "run.name"),
    ("train", "expected KEY.PATH=VALUE"),
    ("=1", "expected KEY.PATH=VALUE"),
    ("train.lr=" + "[" * 5000 + "]" * 5000, "nested too deeply"),
]


@pytest.mark.parametrize("setting, phrase", BAD_SETTINGS, ids=[s for s, _ in BAD_SETTINGS])
def test_a_bad_setting_is_one_line_and_exit_code_2(setting, phrase, tmp_path):
    cfg = write_config(tmp_path, "hostile")
    r = invoke("validate", str(cfg), "--no-timing", "--set", setting)
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.strip().splitlines() if line.strip()]
    assert phrase in r.output and lines[-1].startswith("error:"), r.output
    assert not (tmp_path / "runs").exists()  # nothing written


#: (name, the config file's bytes, a phrase of the one-line error)
BAD_CONFIG_FILES = [
    ("syntax", b"this is [not toml", "invalid TOML"),
    ("binary", b"\x00\x01\x02garbage\xff", "cannot read config"),
    ("duplicate-key", b"[train]\nlr = 1\nlr = 2\n", "invalid TOML"),
    ("section-is-a-string", b'run = "x"\n', "run: Input should be a valid dictionary"),
    ("nested-too-deeply", b"a = " + b"[" * 5000 + b"]" * 5000, "nested too deeply"),
    ("too-large", b"# " + b"x" * (1 << 20) + b"\n", "too large for a config"),
]


@pytest.mark.parametrize("name, content, phrase", BAD_CONFIG_FILES, ids=[n for n, _, _ in BAD_CONFIG_FILES])
def test_a_bad_config_file_is_one_line_and_exit_code_2(name, content, phrase, tmp_path):
    path = tmp_path / f"{name}.toml"
    path.write_bytes(content)
    r = invoke("validate", str(path), "--no-timing")
    assert r.exit_code == 2 and phrase in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1, r.output


@pytest.mark.parametrize("kind", ["missing", "a-folder", "a-link-loop"])
def test_a_config_path_that_is_not_a_file_is_one_line(kind, tmp_path):
    path = tmp_path / "c.toml"
    if kind == "a-folder":
        path.mkdir()
    elif kind == "a-link-loop":
        path.symlink_to(path)
    r = invoke("validate", str(path))
    assert r.exit_code == 2 and str(path) in r.output and len(r.output.strip().splitlines()) == 1, r.output


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny finished run with two checkpoints (steps 2 and 4), copied by each test that damages it."""
    folder = tmp_path_factory.mktemp("trained")
    cfg = write_config(folder, "h", epochs=1, num_images=0, trajectory_images=0)
    assert invoke("run", str(cfg)).exit_code == 0
    return folder / "runs" / "h"


def _copy_run(trained_run, tmp_path, name="r"):
    import shutil

    run = tmp_path / "runs" / name
    shutil.copytree(trained_run, run)
    return run


@pytest.mark.parametrize(
    "out, phrase",
    [
        ("d.png", "is a folder"),  # a folder named like an image
        ("file.toml/x.png", "is a file, not a folder"),
        ("x.txt", "must end in .png or .npz"),
        (".", "holds other files than samples"),
    ],
    ids=["a-folder", "under-a-file", "wrong-suffix", "the-current-folder"],
)
def test_a_bad_sample_output_path_is_refused_before_sampling(out, phrase, trained_run, tmp_path):
    (tmp_path / "d.png").mkdir()
    (tmp_path / "file.toml").write_text("x")
    before = sorted(p.name for p in tmp_path.iterdir())
    r = invoke("sample", str(trained_run), "--num", "2", "--out", str(tmp_path / out))
    assert r.exit_code == 2 and phrase in r.output, r.output
    assert "sampling" not in r.output  # refused before any work
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_a_run_directory_under_a_file_is_one_line(tmp_path):
    cfg = write_config(tmp_path, "f")
    r = invoke("run", str(cfg), "--set", f"run.dir={cfg}")
    assert r.exit_code == 2 and "cannot write the run directory" in r.output, r.output
    assert cfg.read_text().startswith("\n[run]")  # the file is untouched


@pytest.mark.parametrize("kind", ["link-loop", "a-file", "broken-link"])
def test_a_checkpoints_path_that_is_not_a_folder_is_refused_before_training(kind, tmp_path):
    cfg = write_config(tmp_path, "k")
    folder = tmp_path / "runs" / "k"
    folder.mkdir(parents=True)
    ck = folder / "checkpoints"
    if kind == "link-loop":
        ck.symlink_to(ck)
    elif kind == "a-file":
        ck.write_text("x")
    else:
        ck.symlink_to(tmp_path / "nowhere")
    r = invoke("run", str(cfg))
    assert r.exit_code == 2 and "exists but is not a folder" in r.output, r.output
    assert "step" not in r.output  # no training started
    assert not (folder / "metrics.jsonl").exists()


def _state(change):
    def damage(ck):
        import json

        state = json.loads((ck / "state.json").read_text())
        change(state)
        (ck / "state.json").write_text(json.dumps(state))

    return damage


def _replace_with_folder(path):
    path.unlink()
    path.mkdir()


#: (name, damage done to the newest checkpoint folder, a phrase of the warning that skips it)
CHECKPOINT_DAMAGE = [
    ("state-not-json", lambda ck: (ck / "state.json").write_text("{not json"), "unreadable"),
    ("state-missing", lambda ck: (ck / "state.json").unlink(), "missing"),
    ("step-a-word", _state(lambda s: s.update(step="eight")), "invalid step"),
    ("step-not-the-folder", _state(lambda s: s.update(step=999)), "says step 999 but the folder is step-00000004"),
    ("step-negative", _state(lambda s: s.update(step=-5)), "invalid step"),
    ("model-truncated", lambda ck: (ck / "model.safetensors").write_bytes(b"\0" * 100), "truncated or wrong size"),
    ("ema-missing", lambda ck: (ck / "ema.safetensors").unlink(), "missing"),
    ("model-a-folder", lambda ck: _replace_with_folder(ck / "model.safetensors"), "unreadable"),
    (
        "optimizer-a-pickle",
        lambda ck: (ck / "optimizer.pt").write_bytes(b'cos\nsystem\n(S"touch pwned"\ntR.'),
        "truncated or wrong size",
    ),
    (
        "a-size-claim-of-a-petabyte",
        _state(lambda s: next(iter(s["files"].values())).update(bytes=10**15)),
        "truncated or wrong size",
    ),
]


@pytest.mark.parametrize("name, damage, phrase", CHECKPOINT_DAMAGE, ids=[n for n, _, _ in CHECKPOINT_DAMAGE])
def test_a_damaged_newest_checkpoint_is_skipped_by_sample_and_resume(
    name, damage, phrase, trained_run, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # where a crafted pickle would write, were it ever run
    run = _copy_run(trained_run, tmp_path, name)
    newest = run / "checkpoints" / "step-00000004"
    damage(newest)
    r = invoke("sample", str(run), "--num", "2", "--out", str(tmp_path / "x.png"))
    assert r.exit_code == 0 and "skipping broken checkpoint" in r.output and phrase in " ".join(r.output.split()), (
        r.output
    )
    assert "step-00000002" in " ".join(r.output.split())  # sampled from the earlier checkpoint
    cfg = write_config(tmp_path, name, epochs=2)
    r = invoke("run", str(cfg))
    assert r.exit_code == 0 and "skipping broken checkpoint" in r.output, r.output
    assert not (tmp_path / "pwned").exists()


def test_a_run_named_like_a_checkpoint_folder_is_still_a_run(trained_run, tmp_path):
    run = _copy_run(trained_run, tmp_path, "step-00000999")
    r = invoke("sample", str(run), "--num", "2", "--out", str(tmp_path / "x.png"))
    assert r.exit_code == 0 and "step-00000004" in " ".join(r.output.split()), r.output


def _bomb_png(path, side=20000):
    """A 99-byte PNG whose header claims side x side pixels (400 megapixels at 20000)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * (side + 1), 9))
        + chunk(b"IEND", b"")
    )


def test_a_decompression_bomb_in_an_image_folder_is_refused_for_training(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    _bomb_png(folder / "bomb.png")
    cfg = write_config(tmp_path, "b")
    cfg.write_text(cfg.read_text().replace('dataset = "synthetic"', f'dataset = "image-folder"\nroot = "{folder}"'))
    r = invoke("run", str(cfg))
    assert r.exit_code == 2 and "decompression bomb" in r.output, r.output


def _file(path, content: bytes):
    path.write_bytes(content)
    return path


def _folder(path, *files):
    """``path`` made a folder; each of ``files`` is (name, bytes or a writer taking the file's path)."""
    path.mkdir()
    for name, content in files:
        _file(path / name, content) if isinstance(content, bytes) else content(path / name)
    return path


def _saved(path, **arrays):
    np.savez(path, **arrays)
    return path


#: (name, how SAMPLES is made in a folder, a phrase of the one-line error) for `ddpmkit eval SAMPLES`
BAD_EVAL_INPUTS = [
    ("missing", lambda d: d / "nope.npz", "no such file or folder"),
    ("not-a-zip", lambda d: _file(d / "x.npz", b"not a zip"), "not a samples .npz"),
    (
        "wrong-shape",
        lambda d: _saved(d / "x.npz", images=np.zeros((3, 3))),
        "expected images [N, H, W, C], [N, C, H, W] or [N, H, W]",
    ),
    ("no-images-key", lambda d: _saved(d / "x.npz", foo=np.zeros((3, 8, 8, 1), "uint8")), "not a samples .npz"),
    ("empty-folder", lambda d: _folder(d / "e"), "holds no images"),
    ("text-named-png", lambda d: _folder(d / "t", ("a.png", b"hi")), "not an image"),
    ("bomb-in-folder", lambda d: _folder(d / "b", ("a.png", _bomb_png)), "decompression bomb"),
    ("other-file-kind", lambda d: _file(d / "x.txt", b"hi"), "expected a .npz file or a folder"),
]


@pytest.mark.parametrize("name, make, phrase", BAD_EVAL_INPUTS, ids=[n for n, _, _ in BAD_EVAL_INPUTS])
def test_bad_eval_samples_are_one_line_and_exit_code_2(name, make, phrase, tmp_path):
    samples = make(tmp_path)
    r = invoke("eval", str(samples), "--data-root", str(tmp_path / "no-mnist-needed"))
    assert r.exit_code == 2 and phrase in " ".join(r.output.split()), r.output
    assert len([line for line in r.output.strip().splitlines() if line.strip()]) == 1, r.output


def test_sampling_more_images_than_memory_holds_is_refused_up_front(tmp_path):
    cfg = write_config(tmp_path, "s", epochs=1, num_images=0, trajectory_images=0)
    assert invoke("run", str(cfg)).exit_code == 0
    r = invoke("sample", str(tmp_path / "runs" / "s"), "--num", str(10**12), "--out", str(tmp_path / "x.npz"))
    assert r.exit_code == 2 and "--num 1,000,000,000,000 needs about" in r.output
    assert not (tmp_path / "x.npz").exists()


def test_a_batch_larger_than_the_dataset_says_what_it_trains_with(tmp_path):
    cfg = write_config(tmp_path, "b", epochs=1, num_images=0, trajectory_images=0, num_samples=16)
    r = invoke("run", str(cfg), "--set", "train.batch_size=1000000000")
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())  # rich wraps at 80 columns
    assert "larger than the dataset (16 images)" in text and "batch 16 per epoch" in text


def test_an_inline_table_override_sets_its_keys_and_keeps_the_rest(tmp_path):
    from ddpmkit.run.config import load_config

    cfg = load_config(write_config(tmp_path, "t"), ["train={lr=0.5, batch_size=4}"])
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.grad_clip, cfg.train.ema_decay) == (0.5, 4, 1.0, 0.9)


def _mnist_copy(tmp_path, mnist_root, damage):
    """A data root whose MNIST files are the real ones, except train-images, passed through ``damage``."""
    real = mnist_root / "MNIST" / "raw"
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in real.iterdir():
        if f.name.endswith("-ubyte"):
            (raw / f.name).symlink_to(f)
    target = raw / "train-images-idx3-ubyte"
    data = (real / target.name).read_bytes()
    target.unlink()
    target.write_bytes(damage(data))
    return tmp_path / "data"


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: b"\x00\x00\x00\x00" + d[4:],  # a bad magic number
        lambda d: b"",  # an empty file
        lambda d: d[: len(d) // 3],  # truncated
        lambda d: d[:4] + b"\x7f\xff\xff\xff" + d[8:],  # an impossible image count
    ],
    ids=["bad-magic", "empty", "truncated", "impossible-header"],
)
def test_damaged_mnist_files_are_one_line_that_says_damaged(damage, tmp_path, mnist_root):
    root = _mnist_copy(tmp_path, mnist_root, damage)
    cfg = write_config(tmp_path, "m")
    cfg.write_text(cfg.read_text().replace('dataset = "synthetic"', 'dataset = "mnist"\ndownload = false'))
    r = invoke("run", str(cfg), "--data-root", str(root))
    assert r.exit_code == 2, r.output
    assert "the MNIST files are there but damaged" in " ".join(r.output.split())
    assert not (tmp_path / "runs" / "m" / "checkpoints").exists()


def test_a_seed_beyond_what_torch_takes_is_one_line_on_the_command_line(tmp_path):
    cfg = write_config(tmp_path, "s", epochs=1, num_images=0, trajectory_images=0)
    assert invoke("run", str(cfg)).exit_code == 0
    r = invoke(
        "sample", str(tmp_path / "runs" / "s"), "--num", "2", "--seed", str(2**64), "--out", str(tmp_path / "x.png")
    )
    assert r.exit_code == 2 and "--seed" in r.output


def test_ctrl_c_during_a_long_sampling_keeps_the_finished_batches(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from runconfigs import REPO, cli_env

    cfg = write_config(tmp_path, "c", epochs=1, num_images=0, trajectory_images=0)
    assert invoke("run", str(cfg)).exit_code == 0
    started = time.perf_counter()  # loading and one batch, in this process: the pace on this machine now
    r = invoke(
        "sample", str(tmp_path / "runs" / "c"), "--num", "4", "--batch-size", "4", "--out", str(tmp_path / "one.npz")
    )
    assert r.exit_code == 0, r.output
    one_batch = time.perf_counter() - started
    out = tmp_path / "partial.npz"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ddpmkit",
            "sample",
            str(tmp_path / "runs" / "c"),
            "--num",
            "200000",
            "--batch-size",
            "4",
            "--out",
            str(out),
        ],
        cwd=REPO,
        env=cli_env(PYTHONFAULTHANDLER="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().startswith("sampling 200000 images")  # loaded, sampling begins
        time.sleep(max(5.0, 5 * one_batch))  # several batches are done, even on a loaded machine
        proc.send_signal(signal.SIGINT)
        try:
            stdout, stderr = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:  # e.g. SIGINT ignored (see conftest._sigint_default): say where it was
            proc.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack
            _, stderr = proc.communicate(timeout=30)
            pytest.fail(
                f"no exit 120 s after Ctrl-C (one batch in-process took {one_batch:.1f} s); "
                f"the sampler's threads:\n{stderr[-6000:]}"
            )
    finally:
        if proc.poll() is None:  # never leave a sampler running
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    images = np.load(out)["images"]
    assert 0 < len(images) < 200_000 and len(images) % 4 == 0
    assert f"interrupted after {len(images):,} of 200,000 images" in " ".join(stdout.split())
