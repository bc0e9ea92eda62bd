"""Hostile inputs, table-driven: each is refused with one line and exit code 2, before anything is allocated."""

from __future__ import annotations

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
]


@pytest.mark.parametrize("setting, phrase", BAD_SETTINGS, ids=[s for s, _ in BAD_SETTINGS])
def test_a_bad_setting_is_one_line_and_exit_code_2(setting, phrase, tmp_path):
    cfg = write_config(tmp_path, "hostile")
    r = invoke("validate", str(cfg), "--no-timing", "--set", setting)
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.strip().splitlines() if line.strip()]
    assert phrase in r.output and lines[-1].startswith("error:"), r.output
    assert not (tmp_path / "runs").exists()  # nothing written


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
    from ddpmkit.config import load_config

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


@pytest.mark.parametrize("damage", [
    lambda d: b"\x00\x00\x00\x00" + d[4:],   # a bad magic number
    lambda d: b"",                            # an empty file
    lambda d: d[: len(d) // 3],               # truncated
    lambda d: d[:4] + b"\x7f\xff\xff\xff" + d[8:],  # an impossible image count
], ids=["bad-magic", "empty", "truncated", "impossible-header"])
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
    r = invoke("sample", str(tmp_path / "runs" / "s"), "--num", "2", "--seed", str(2**64), "--out", str(tmp_path / "x.png"))
    assert r.exit_code == 2 and "--seed" in r.output


def test_ctrl_c_during_a_long_sampling_keeps_the_finished_batches(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    import numpy as np

    from runconfigs import REPO, cli_env

    cfg = write_config(tmp_path, "c", epochs=1, num_images=0, trajectory_images=0)
    assert invoke("run", str(cfg)).exit_code == 0
    out = tmp_path / "partial.npz"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ddpmkit", "sample", str(tmp_path / "runs" / "c"), "--num", "200000", "--batch-size", "4",
         "--out", str(out)], cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout.readline().startswith("sampling 200000 images")  # loaded, sampling begins
        time.sleep(4.0)  # a batch of 4 takes well under a second here: several are done
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # never leave a sampler running
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    images = np.load(out)["images"]
    assert 0 < len(images) < 200_000 and len(images) % 4 == 0
    assert f"interrupted after {len(images):,} of 200,000 images" in " ".join(stdout.split())
