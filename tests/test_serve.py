"""`ddpmkit serve`: the page's work as functions, the server alone through an HTTP client, and the page in a real
headless Chromium (Debian's, driven by selenium): load it, ask for samples, see an image arrive."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from runconfigs import REPO, cli_env, trained_tiny

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny class-conditional run on the labelled rectangles."""
    return trained_tiny(tmp_path_factory.mktemp("serve"), "page", "--set", "conditioning.kind=class")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(run):
    """``ddpmkit serve RUN`` as a user starts it, on a free port; its URL while it runs."""
    port = _free_port()
    log = open(run.parent / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ddpmkit", "serve", str(run), "--port", str(port)],
        cwd=REPO,
        env=cli_env(GRADIO_ANALYTICS_ENABLED="False"),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while time.time() < deadline:
        assert proc.poll() is None, (run.parent / "serve.log").read_text()
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("the page did not come up in 180 s: " + (run.parent / "serve.log").read_text())
    yield url
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def test_the_studio_draws_by_class_and_edits_with_a_brushed_mask(run):
    from ddpmkit.sampling.loaded import load_run
    from ddpmkit.serving.page import PageError, Studio

    studio = Studio(load_run(run))
    assert studio.classes[0] == "all" and len(studio.classes) > 2 and studio.samplers[0] == "ddpm"
    drawn = studio.draw(klass=studio.classes[1], num=3, seed=1)
    assert drawn.grid.ndim == 2 and drawn.strip is not None and f"class {studio.classes[1]}" in drawn.caption
    again = studio.draw(klass=studio.classes[1], num=3, seed=1)
    assert np.array_equal(drawn.grid, again.grid)  # the same seed, the same images
    photo = (np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)  # any size, colour
    brushed = np.zeros((40, 50), bool)
    brushed[:, :25] = True
    edited = studio.edit(photo, brushed, num=2, sampler="ddim", steps=5)
    assert "inpainting" in edited.caption and edited.grid.shape[1] > 3 * edited.grid.shape[0]  # 4 cells in a row
    assert "SDEdit at strength 0.3" in studio.edit(photo, None, strength=0.3, num=1).caption
    for bad, message in (
        (lambda: studio.edit(None, None), "upload an image"),
        (lambda: studio.draw(num=500), "1 to 64"),
        (lambda: studio.draw(sampler="nope"), "unknown sampler 'nope'"),
        (lambda: studio.draw(klass="no-such-class"), "class 'no-such-class'"),
    ):
        with pytest.raises(PageError, match=message):
            bad()


def test_the_server_answers_an_http_client_and_a_bad_upload_is_a_message(server, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(server, verbose=False)
    grid, strip, caption = client.predict("all", 1.0, "ddim", 5, 4, 3, api_name="/draw")
    assert "4 images, ddim, 5 steps, seed 3" in caption
    assert min(Image.open(grid).size) > 0 and min(Image.open(strip).size) > 0  # PNGs the server made
    Image.fromarray(np.full((30, 30), 200, np.uint8)).save(tmp_path / "in.png")
    brush = np.zeros((30, 30, 4), np.uint8)
    brush[:15, :, 0] = brush[:15, :, 3] = 255
    Image.fromarray(brush).save(tmp_path / "brush.png")
    editor = {
        "background": handle_file(str(tmp_path / "in.png")),
        "layers": [handle_file(str(tmp_path / "brush.png"))],
        "composite": None,
        "id": None,
    }
    _, words = client.predict(editor, 0.5, "all", 1.0, "ddpm", 5, 2, 0, api_name="/edit")
    assert words.startswith("inpainting, ddpm, 2 results")
    (tmp_path / "not-an-image.png").write_text("hello")
    with pytest.raises(AppError, match="the upload is not an image this page can read"):
        client.predict(
            {**editor, "background": handle_file(str(tmp_path / "not-an-image.png")), "layers": []},
            0.5,
            "all",
            1.0,
            "ddpm",
            5,
            2,
            0,
            api_name="/edit",
        )
    assert "4 images" in client.predict("all", 1.0, "ddim", 5, 4, 3, api_name="/draw")[2]  # still serving


def test_the_page_draws_in_a_real_headless_browser(server):
    if os.environ.get("DDPMKIT_NO_BROWSER"):  # set by .ci/run when Chromium could not be installed
        pytest.skip("Chromium could not be installed here (see .ci/run's warning)")
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are missing: apt-get install chromium chromium-driver")
        pytest.skip("no Chromium here (apt-get install chromium chromium-driver); CI installs it")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,1600",
    ):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        browser.get(server)
        wait = WebDriverWait(browser, 120, poll_frequency=0.5)
        wait.until(lambda b: b.find_elements(By.ID, "draw"))
        assert "ddpmkit" in browser.page_source and "unconditional" not in browser.page_source
        browser.find_element(By.ID, "draw").click()

        def arrived(b):
            images = b.find_elements(By.CSS_SELECTOR, "#samples img")
            return images and b.execute_script("return arguments[0].complete && arguments[0].naturalWidth", images[0])

        width = wait.until(arrived)
        assert width > 100  # a grid of 16 images, scaled up for the eye
        assert "16 images" in browser.find_element(By.ID, "draw-caption").text
    finally:
        browser.quit()


def test_without_the_extra_serve_says_what_to_install(run, monkeypatch):
    from runconfigs import invoke

    import ddpmkit.extras

    real = ddpmkit.extras.is_missing
    monkeypatch.setattr(ddpmkit.extras, "is_missing", lambda extra: extra == "ui" or real(extra))
    result = invoke("serve", str(run))
    assert result.exit_code == 2 and "pip install 'ddpmkit[ui]'" in result.output, result.output
