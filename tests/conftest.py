from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """Where the real MNIST IDX files are (no network in CI): $DDPMKIT_TEST_MNIST_ROOT or ../shared/data."""
    root = Path(os.environ.get("DDPMKIT_TEST_MNIST_ROOT", REPO.parent / "shared" / "data"))
    if not (root / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
        pytest.skip(f"MNIST IDX files not found under {root}/MNIST/raw")
    return root


@pytest.fixture(scope="session", autouse=True)
def own_cache_dir(tmp_path_factory):
    """A cache folder of the suite's own (speed figures, classifiers), inherited by every ddpmkit process it starts:
    the user's ~/.cache/ddpmkit is neither read (a warm one hid 5 minutes of measuring from a local run that a fresh
    CI machine pays) nor written (with figures measured beside the suite's other work)."""
    from ddpmkit.runtime.cache import CACHE_ENV

    before = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("ddpmkit-cache"))
    yield
    if before is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = before


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors on a shared 2-core machine: one thread avoids threads fighting over the cores (on a busy
    machine two threads made a sampling step 50x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fresh_plugin_registry(monkeypatch):
    """Third-party plugins allowed, and the registry rediscovered before and after the test."""
    from ddpmkit.registry import discovery as plugins

    monkeypatch.delenv(plugins.DISABLE_ENV, raising=False)
    plugins.reset()
    yield
    plugins.reset()


@pytest.fixture
def plugin_module(monkeypatch):
    """Register plugin modules in-process, as if a distribution's entry point named them (no install, no
    subprocess): ``plugin_module(source, name="fake", distribution="ddpmkit-fake")`` returns the module.

    The module's source is executed as a real module (importable by its name, so lazy targets work);
    everything registered is forgotten after the test.
    """
    import sys
    import textwrap
    import types

    from ddpmkit.registry import discovery as plugins

    monkeypatch.delenv(plugins.DISABLE_ENV, raising=False)
    added: list[types.ModuleType] = []

    def register(source: str, name: str = "fake", distribution: str | None = "ddpmkit-fake", version: str = "1.0"):
        module_name = f"ddpmkit_test_plugin_{name}_{len(added)}"
        module = types.ModuleType(module_name)
        sys.modules[module_name] = module
        exec(compile(textwrap.dedent(source), f"<plugin {name}>", "exec"), module.__dict__)
        plugins.register_module(module, name, distribution, version)
        added.append(module)
        return module

    yield register
    for module in added:
        plugins.unregister_module(module)
        sys.modules.pop(module.__name__, None)
    plugins.reset()


@pytest.fixture(scope="session")
def quick_classifier_cache(mnist_root, tmp_path_factory):
    """A classifier cache whose entry for the default definition holds a quickly trained network (3,000 images,
    one epoch: seconds), so CLI tests of eval and sweep do not spend 45 s training the real one."""
    import json

    from safetensors.torch import save_file

    from ddpmkit.evaluation.classifier import ClassifierSpec, train_classifier

    folder = tmp_path_factory.mktemp("quick-classifier")
    model, record = train_classifier(ClassifierSpec(train_limit=3000, epochs=1), mnist_root)
    key = ClassifierSpec().key()
    save_file(model.state_dict(), str(folder / f"mnist-classifier-{key}.safetensors"))
    (folder / f"mnist-classifier-{key}.json").write_text(json.dumps({**record, "key": key}))
    return folder


@pytest.fixture(autouse=True, scope="session")
def _sigint_default():
    """SIGINT at its default for the tests' children: a suite started as a shell's background job (``pytest &``)
    has SIGINT ignored, children inherit that, and Python then never raises KeyboardInterrupt (seen: a sampler
    went on for 120 s after a test's Ctrl-C). A handler, unlike an ignored signal, is reset at exec."""
    import signal

    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _sigint_kept(request):
    """A test that leaves SIGINT changed in this process (a library's handler, or ignored) is named in a
    warning and the handler is put back: children inherit an ignored SIGINT, and Ctrl-C tests then hang."""
    import signal
    import warnings

    before = signal.getsignal(signal.SIGINT)
    yield
    after = signal.getsignal(signal.SIGINT)
    if after is not before:
        signal.signal(signal.SIGINT, before)
        warnings.warn(f"{request.node.nodeid} left SIGINT's handler as {after!r}; put back", stacklevel=1)
