"""Plugin discovery with fake distributions on sys.path, in-process and through the CLI as a user runs it.

Each test writes ``NAME-VERSION.dist-info`` folders (METADATA + entry_points.txt with a ``[ddpmkit]``
group) and their modules into a temporary folder that is put on sys.path (and on PYTHONPATH for the
subprocesses), so importlib.metadata finds them exactly like installed packages.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import ddpmkit
from ddpmkit import PluginError
from ddpmkit.registry import discovery as plugins

ROW_KEYS = {"kind", "name", "qualified_name", "plugin", "distribution", "version", "status", "error"}
BUILTIN_ROWS = [
    {
        "kind": "schedule",
        "name": "linear",
        "plugin": "builtin",
        "distribution": "ddpmkit",
        "status": "ok",
        "error": None,
    },
    {"kind": "denoiser", "name": "unet", "plugin": "builtin", "distribution": "ddpmkit", "status": "ok", "error": None},
    {"kind": "sampler", "name": "ddpm", "plugin": "builtin", "distribution": "ddpmkit", "status": "ok", "error": None},
]

# A schedule class a fake plugin can point at lazily (imported only when the component is built).
SCHEDULE_MODULE = """
import torch
from pydantic import Field
from ddpmkit.interfaces import NoiseSchedule

class ConstantSchedule(NoiseSchedule):
    class Options(NoiseSchedule.Options):
        beta: float = Field(0.01, gt=0, lt=1)

    def make_betas(self):
        return torch.full((self.options.num_timesteps,), self.options.beta, dtype=torch.float64)
"""


def hook_module(kind: str, name: str, target: str) -> str:
    hook = {"schedule": "register_schedules", "denoiser": "register_denoisers", "sampler": "register_samplers"}[kind]
    return textwrap.dedent(
        f"""
        import ddpmkit

        @ddpmkit.hookimpl
        def {hook}(register):
            register({name!r}, {target!r})
        """
    )


def make_dist(site: Path, dist: str, version: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    """Write an installed-looking distribution: its dist-info folder and its top-level modules."""
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = ["[ddpmkit]"] + [f"{ep} = {module}" for ep, module in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for module, source in modules.items():
        (site / f"{module}.py").write_text(source)


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder on sys.path for fake distributions; the plugin registry is rediscovered around the test."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv(plugins.DISABLE_ENV, raising=False)
    plugins.reset()
    before = set(sys.modules)
    yield site
    plugins.reset()
    for name in set(sys.modules) - before:  # the fake plugins' modules must not leak into other tests
        if str(getattr(sys.modules[name], "__file__", "") or "").startswith(str(tmp_path)):
            del sys.modules[name]


def discovered() -> None:
    """Rediscover after writing fake distributions (the import system caches folder listings)."""
    importlib.invalidate_caches()
    plugins.reset()


def cli_json(*site_paths: Path, env_extra: dict[str, str] | None = None) -> list[dict]:
    """`python -m ddpmkit list-plugins --json` with the fake site folders on PYTHONPATH, as a user runs it."""
    env = {k: v for k, v in os.environ.items() if k != plugins.DISABLE_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(p) for p in site_paths] + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(env_extra or {})
    proc = subprocess.run(
        [sys.executable, "-m", "ddpmkit", "list-plugins", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    rows = json.loads(proc.stdout)
    for row in rows:
        assert set(row) == ROW_KEYS, row
    return rows


def rows_named(rows: list[dict], **match) -> list[dict]:
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def assert_builtins_ok(rows: list[dict]) -> None:
    for expected in BUILTIN_ROWS:
        found = rows_named(rows, kind=expected["kind"], name=expected["name"], distribution="ddpmkit")
        assert len(found) == 1, (expected, rows)
        assert {k: found[0][k] for k in expected} == expected
        assert found[0]["version"] == ddpmkit.__version__


# --- the built-ins ----------------------------------------------------------------------------


def test_builtins_come_through_the_entry_point_group(site):
    """The built-ins are found like any third party: an entry point of the distribution ddpmkit."""
    from importlib import metadata

    eps = [ep for ep in metadata.entry_points(group="ddpmkit") if ep.dist and ep.dist.metadata["Name"] == "ddpmkit"]
    assert sorted((ep.name, ep.value) for ep in eps) == [
        ("builtin", "ddpmkit_plugins.builtin"),
        ("metrics", "ddpmkit_plugins.metrics"),
        ("tensorboard", "ddpmkit_plugins.tensorboard"),
        ("wandb", "ddpmkit_plugins.wandb_events"),
    ]
    rows = ddpmkit.list_plugins()
    assert_builtins_ok(rows)
    targets = {r["name"]: r["target"] for r in rows if r["kind"] not in ("events", "objective")}
    assert {r["name"] for r in rows if r["kind"] == "events"} == {"metrics", "tensorboard", "wandb"}
    assert targets == {
        "linear": "ddpmkit_plugins.linear:LinearSchedule",
        "cosine": "ddpmkit_plugins.cosine:CosineSchedule",
        "betas": "ddpmkit_plugins.given_betas:GivenBetas",
        "unet": "ddpmkit_plugins.unet:UNet",
        "diffusers-unet": "ddpmkit_plugins.diffusers_unet:DiffusersUNet",
        "ddpm": "ddpmkit_plugins.ddpm:DDPMSampler",
        "ddim": "ddpmkit_plugins.ddim:DDIMSampler",
        "diffusers": "ddpmkit_plugins.diffusers_sampler:DiffusersSampler",
        "heun": "ddpmkit_plugins.solvers:HeunSampler",
        "dpmpp-2m": "ddpmkit_plugins.solvers:DPMSolverPP2M",
    }
    assert {r["name"]: r["target"] for r in rows if r["kind"] == "objective"} == {
        "ddpm": "ddpmkit_plugins.objectives:DDPMObjective",
        "flow": "ddpmkit_plugins.objectives:FlowObjective",
        "edm": "ddpmkit_plugins.objectives:EDMObjective",
    }


def test_the_folder_plugins_is_not_a_top_level_package(tmp_path):
    """Installed, the built-ins are the package ddpmkit_plugins (its folder named as it is imported); no
    top-level `plugins` exists (run from an empty folder, so the source tree is not on sys.path)."""
    code = (
        "import importlib.util, pathlib, ddpmkit_plugins; "
        "print(importlib.util.find_spec('plugins') is None, pathlib.Path(ddpmkit_plugins.__file__).parent.name)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", plugins.DISABLE_ENV)}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "ddpmkit_plugins"]


# --- a working third-party plugin ---------------------------------------------------------------


def test_working_third_party_plugin(site):
    make_dist(
        site,
        "ddpmkit-constant",
        "1.2.3",
        {"constant": "fake_constant_hooks"},
        {
            "fake_constant_hooks": hook_module("schedule", "constant", "fake_constant_impl:ConstantSchedule"),
            "fake_constant_impl": SCHEDULE_MODULE,
        },
    )
    discovered()
    rows = ddpmkit.list_plugins()
    assert_builtins_ok(rows)
    (row,) = rows_named(rows, name="constant")
    assert row["kind"] == "schedule"
    assert row["plugin"] == "constant"
    assert row["distribution"] == "ddpmkit-constant"
    assert row["version"] == "1.2.3"
    assert row["status"] == "ok" and row["error"] is None
    assert row["target"] == "fake_constant_impl:ConstantSchedule"
    # lazy: listing did not import the implementation
    assert "fake_constant_impl" not in sys.modules

    schedule = ddpmkit.create_schedule("constant", num_timesteps=10, beta=0.05)
    assert schedule.num_timesteps == 10
    assert schedule.betas.tolist() == pytest.approx([0.05] * 10)
    assert schedule.alphas_cumprod[-1].item() == pytest.approx(0.95**10, rel=1e-6)
    with pytest.raises(ddpmkit.ConfigError, match=r"schedule\.options\.beta\b"):
        ddpmkit.create_schedule("constant", beta=2.0)
    # the built-ins are unaffected
    assert ddpmkit.create_schedule("linear", num_timesteps=5).num_timesteps == 5

    cli_rows = cli_json(site)
    assert_builtins_ok(cli_rows)
    assert rows_named(cli_rows, name="constant") == [
        {
            "kind": "schedule",
            "name": "constant",
            "qualified_name": "ddpmkit-constant:constant",
            "plugin": "constant",
            "distribution": "ddpmkit-constant",
            "version": "1.2.3",
            "status": "ok",
            "error": None,
        }
    ]


def test_config_can_use_a_third_party_component(site, tmp_path):
    make_dist(
        site,
        "ddpmkit-constant2",
        "0.1",
        {"constant2": "fake_constant2_hooks"},
        {
            "fake_constant2_hooks": hook_module("schedule", "constant2", "fake_constant2_impl:ConstantSchedule"),
            "fake_constant2_impl": SCHEDULE_MODULE,
        },
    )
    discovered()
    config = tmp_path / "c.toml"
    config.write_text('[schedule]\nname = "constant2"\n[schedule.options]\nnum_timesteps = 10\nbetta = 0.1\n')
    with pytest.raises(ddpmkit.ConfigError) as info:
        ddpmkit.load_config(config)
    assert f"{config}:5: schedule.options.betta: unknown key (did you mean 'beta'?)" in str(info.value)


# --- a plugin that raises on import ---------------------------------------------------------------


def test_plugin_that_raises_on_import(site, tmp_path):
    make_dist(
        site,
        "ddpmkit-broken",
        "0.3",
        {"broken": "fake_broken_hooks"},
        {"fake_broken_hooks": "raise RuntimeError('boom from the broken plugin')\n"},
    )
    make_dist(
        site,
        "ddpmkit-fine",
        "2.0",
        {"fine": "fake_fine_hooks"},
        {
            "fake_fine_hooks": hook_module("schedule", "fine", "fake_fine_impl:ConstantSchedule"),
            "fake_fine_impl": SCHEDULE_MODULE,
        },
    )
    discovered()
    rows = ddpmkit.list_plugins()
    assert_builtins_ok(rows)
    (broken,) = rows_named(rows, plugin="broken")
    assert broken["status"] == "error"
    assert broken["distribution"] == "ddpmkit-broken" and broken["version"] == "0.3"
    assert broken["error"] == "RuntimeError: boom from the broken plugin"
    assert broken["kind"] is None and broken["name"] is None
    assert rows_named(rows, name="fine")[0]["status"] == "ok"
    # other plugins still work
    assert ddpmkit.create_schedule("fine", num_timesteps=3).num_timesteps == 3
    # a name nobody registered mentions the broken plugin and its original error
    with pytest.raises(PluginError) as info:
        ddpmkit.create_schedule("cosine-nope")
    message = str(info.value)
    assert "unknown schedule 'cosine-nope'" in message
    assert "installed: betas, cosine, fine, linear" in message
    assert "'broken' (ddpmkit-broken 0.3): RuntimeError: boom from the broken plugin" in message

    cli_rows = cli_json(site)
    assert_builtins_ok(cli_rows)
    assert rows_named(cli_rows, plugin="broken") == [
        {
            "kind": None,
            "name": None,
            "qualified_name": None,
            "plugin": "broken",
            "distribution": "ddpmkit-broken",
            "version": "0.3",
            "status": "error",
            "error": "RuntimeError: boom from the broken plugin",
        }
    ]
    assert rows_named(cli_rows, name="fine")[0]["status"] == "ok"

    # every CLI command keeps working: the table, and validate of a config that names a missing schedule
    env = {k: v for k, v in os.environ.items() if k != plugins.DISABLE_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    table = subprocess.run([sys.executable, "-m", "ddpmkit", "list-plugins"], capture_output=True, text=True, env=env)
    assert table.returncode == 0, table.stderr
    assert "boom from the broken plugin" in table.stdout and "linear" in table.stdout
    config = tmp_path / "uses-broken.toml"
    config.write_text('[schedule]\nname = "cosine-nope"\n')
    bad = subprocess.run(
        [sys.executable, "-m", "ddpmkit", "validate", str(config)], capture_output=True, text=True, env=env
    )
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert f"{config}:2: schedule.name: unknown schedule 'cosine-nope'" in bad.stderr
    assert "boom from the broken plugin" in bad.stderr


def test_plugin_whose_hook_raises(site):
    """A hook that raises after registering something: the plugin is an error and its components refuse to build."""
    make_dist(
        site,
        "ddpmkit-halfway",
        "1.0",
        {"halfway": "fake_halfway_hooks"},
        {
            "fake_halfway_hooks": textwrap.dedent(
                """
                import ddpmkit

                @ddpmkit.hookimpl
                def register_schedules(register):
                    register("halfway", "fake_halfway_impl:ConstantSchedule")

                @ddpmkit.hookimpl
                def register_samplers(register):
                    raise ValueError("sampler registration failed")
                """
            ),
            "fake_halfway_impl": SCHEDULE_MODULE,
        },
    )
    discovered()
    rows = ddpmkit.list_plugins()
    assert_builtins_ok(rows)
    (row,) = rows_named(rows, plugin="halfway")
    assert row["status"] == "error" and row["error"] == "ValueError: sampler registration failed"
    with pytest.raises(
        PluginError, match=r"'halfway' \(ddpmkit-halfway 1\.0\), which failed to load: ValueError: sampler"
    ):
        ddpmkit.create_schedule("halfway")


def test_register_with_a_bad_target_is_recorded(site):
    make_dist(
        site,
        "ddpmkit-badtarget",
        "1.0",
        {"badtarget": "fake_badtarget_hooks"},
        {"fake_badtarget_hooks": hook_module("denoiser", "nocolon", "not_a_module_attr_string")},
    )
    discovered()
    rows = ddpmkit.list_plugins()
    assert_builtins_ok(rows)
    (row,) = rows_named(rows, plugin="badtarget")
    assert row["status"] == "error" and "module:attr" in row["error"]


# --- two plugins registering one name --------------------------------------------------------------


def test_two_plugins_register_the_same_name(site):
    for dist, version, module in [("ddpmkit-one", "1.0", "fake_one_hooks"), ("ddpmkit-two", "2.0", "fake_two_hooks")]:
        make_dist(
            site,
            dist,
            version,
            {dist.split("-")[1]: module},
            {module: hook_module("schedule", "dup", "fake_dup_impl:ConstantSchedule")},
        )
    (site / "fake_dup_impl.py").write_text(SCHEDULE_MODULE)
    make_dist(
        site,
        "ddpmkit-unique",
        "1.0",
        {"unique": "fake_unique_hooks"},
        {"fake_unique_hooks": hook_module("schedule", "unique", "fake_dup_impl:ConstantSchedule")},
    )
    discovered()
    rows = ddpmkit.list_plugins()
    assert_builtins_ok(rows)
    dups = rows_named(rows, name="dup")
    assert sorted(r["distribution"] for r in dups) == ["ddpmkit-one", "ddpmkit-two"]
    assert all(r["status"] == "clash" for r in dups)
    one = rows_named(dups, distribution="ddpmkit-one")[0]
    assert one["error"] == "also registered by 'two' (ddpmkit-two 2.0); use ddpmkit-one:dup"
    with pytest.raises(PluginError) as info:
        ddpmkit.create_schedule("dup")
    message = str(info.value)
    assert "schedule 'dup' is registered by several plugins; name one of ddpmkit-one:dup, ddpmkit-two:dup" in message
    # the qualified names pick one (normalised as pip does), and nothing else can take them
    assert ddpmkit.create_schedule("ddpmkit-two:dup", num_timesteps=3).num_timesteps == 3
    assert ddpmkit.create_schedule("DDPMKIT_ONE:dup", num_timesteps=3).num_timesteps == 3
    with pytest.raises(
        PluginError, match="no schedule 'ddpmkit-three:dup': 'dup' comes from ddpmkit-one:dup, ddpmkit-two:dup"
    ):
        ddpmkit.create_schedule("ddpmkit-three:dup")
    # other names are unaffected
    assert rows_named(rows, name="unique")[0]["status"] == "ok"
    assert ddpmkit.create_schedule("unique", num_timesteps=4).num_timesteps == 4
    assert ddpmkit.create_schedule("linear", num_timesteps=4).num_timesteps == 4

    cli_rows = cli_json(site)
    assert_builtins_ok(cli_rows)
    assert sorted((r["distribution"], r["status"]) for r in rows_named(cli_rows, name="dup")) == [
        ("ddpmkit-one", "clash"),
        ("ddpmkit-two", "clash"),
    ]
    assert rows_named(cli_rows, name="unique")[0]["status"] == "ok"


def test_third_party_clashing_with_a_builtin(site):
    make_dist(
        site,
        "ddpmkit-shadow",
        "0.1",
        {"shadow": "fake_shadow_hooks"},
        {"fake_shadow_hooks": hook_module("sampler", "ddpm", "fake_shadow_impl:Nothing")},
    )
    discovered()
    rows = [r for r in rows_named(ddpmkit.list_plugins(), name="ddpm") if r["kind"] == "sampler"]
    assert sorted((r["distribution"], r["status"]) for r in rows) == [("ddpmkit", "ok"), ("ddpmkit-shadow", "shadowed")]
    assert "use ddpmkit-shadow:ddpm" in rows_named(rows, distribution="ddpmkit-shadow")[0]["error"]
    # the plain name stays ddpmkit's own, with a warning naming the shadowing plugin
    with pytest.warns(
        ddpmkit.DdpmkitWarning, match=r"'shadow' \(ddpmkit-shadow 0.1\) as ddpmkit-shadow:ddpm.*ddpmkit:ddpm"
    ):
        sampler = ddpmkit.create_sampler("ddpm")
    assert type(sampler).__module__ == "ddpmkit_plugins.ddpm"
    assert type(ddpmkit.create_sampler("ddpmkit:ddpm")).__module__ == "ddpmkit_plugins.ddpm"
    with pytest.raises(PluginError, match=r"plugin 'shadow', ddpmkit-shadow 0.1\) failed to load"):
        ddpmkit.create_sampler("ddpmkit-shadow:ddpm")
    assert ddpmkit.create_schedule("linear", num_timesteps=2).num_timesteps == 2


# --- the same distribution found twice ------------------------------------------------------------


def test_same_distribution_twice_on_sys_path_is_loaded_once(site, tmp_path, monkeypatch):
    second = tmp_path / "site2"
    for folder in (site, second):
        folder.mkdir(exist_ok=True)
        make_dist(
            folder,
            "ddpmkit-twice",
            "1.0",
            {"twice": "fake_twice_hooks"},
            {
                "fake_twice_hooks": hook_module("schedule", "twice", "fake_twice_impl:ConstantSchedule"),
                "fake_twice_impl": SCHEDULE_MODULE,
            },
        )
    monkeypatch.syspath_prepend(str(second))
    discovered()
    rows = ddpmkit.list_plugins()
    assert_builtins_ok(rows)
    assert [(r["distribution"], r["status"]) for r in rows_named(rows, name="twice")] == [("ddpmkit-twice", "ok")]
    assert sum(p.name == "twice" for p in plugins.registry().plugins) == 1
    assert ddpmkit.create_schedule("twice", num_timesteps=2).num_timesteps == 2

    cli_rows = cli_json(site, second)
    assert [(r["distribution"], r["status"]) for r in rows_named(cli_rows, name="twice")] == [("ddpmkit-twice", "ok")]
    assert_builtins_ok(cli_rows)


def test_duplicate_entry_points_are_deduplicated(site, monkeypatch):
    """importlib.metadata of Python >= 3.10 already drops a second copy of a distribution; ddpmkit must not
    rely on it (older importlib_metadata backports, or several finders): every entry point seen twice loads once."""
    from importlib import metadata

    real = metadata.entry_points
    monkeypatch.setattr(metadata, "entry_points", lambda **kw: list(real(**kw)) * 2)
    discovered()
    rows = ddpmkit.list_plugins()
    assert_builtins_ok(rows)
    assert len(plugins.registry().plugins) == len({(p.distribution, p.name) for p in plugins.registry().plugins})
    assert all(r["status"] == "ok" for r in rows)


# --- a lazy target that fails to import --------------------------------------------------------------


def test_lazy_target_that_fails_to_import(site):
    make_dist(
        site,
        "ddpmkit-lazybad",
        "0.9",
        {"lazybad": "fake_lazybad_hooks"},
        {
            "fake_lazybad_hooks": hook_module("schedule", "lazybad", "fake_lazybad_impl:ConstantSchedule")
            + hook_module("denoiser", "noattr", "fake_lazybad_other:Missing"),
            "fake_lazybad_impl": "import no_such_module_for_ddpmkit_tests\n",
            "fake_lazybad_other": "x = 1\n",
        },
    )
    discovered()
    rows = ddpmkit.list_plugins()
    assert_builtins_ok(rows)
    # listing imports nothing, so the component looks fine until it is used
    assert rows_named(rows, name="lazybad")[0]["status"] == "ok"
    with pytest.raises(PluginError) as info:
        ddpmkit.create_schedule("lazybad")
    message = str(info.value)
    assert "schedule 'lazybad' (plugin 'lazybad', ddpmkit-lazybad 0.9) failed to load" in message
    assert "fake_lazybad_impl:ConstantSchedule" in message
    assert "ModuleNotFoundError: No module named 'no_such_module_for_ddpmkit_tests'" in message
    with pytest.raises(
        PluginError,
        match=r"denoiser 'noattr' \(plugin 'lazybad', ddpmkit-lazybad 0.9\) failed to load .*AttributeError",
    ):
        ddpmkit.create_denoiser("noattr", image_shape=(1, 8, 8), num_timesteps=2)

    cli_rows = cli_json(site)
    assert_builtins_ok(cli_rows)
    assert rows_named(cli_rows, name="lazybad")[0]["status"] == "ok"


def test_target_that_is_not_a_subclass(site):
    make_dist(
        site,
        "ddpmkit-wrongkind",
        "1.0",
        {"wrongkind": "fake_wrongkind_hooks"},
        {"fake_wrongkind_hooks": hook_module("sampler", "notasampler", "ddpmkit_plugins.linear:LinearSchedule")},
    )
    discovered()
    with pytest.raises(
        PluginError,
        match=r"sampler 'notasampler' \(plugin 'wrongkind', ddpmkit-wrongkind 1.0\) is not a Sampler subclass",
    ):
        ddpmkit.create_sampler("notasampler")


# --- switching third-party plugins off ---------------------------------------------------------------


def test_env_var_disables_third_party_plugins(site, monkeypatch):
    make_dist(
        site,
        "ddpmkit-optional",
        "1.0",
        {"optional": "fake_optional_hooks"},
        {
            "fake_optional_hooks": hook_module("schedule", "optional", "fake_optional_impl:ConstantSchedule"),
            "fake_optional_impl": SCHEDULE_MODULE,
        },
    )
    make_dist(site, "ddpmkit-broken2", "0.1", {"broken2": "fake_broken2_hooks"}, {"fake_broken2_hooks": "1 / 0\n"})
    discovered()
    assert rows_named(ddpmkit.list_plugins(), name="optional")
    assert rows_named(ddpmkit.list_plugins(), plugin="broken2")

    monkeypatch.setenv(plugins.DISABLE_ENV, "1")
    discovered()
    rows = ddpmkit.list_plugins()
    assert_builtins_ok(rows)
    assert {r["distribution"] for r in rows} == {"ddpmkit"}
    with pytest.raises(PluginError, match="unknown schedule 'optional'; installed: betas, cosine, linear$"):
        ddpmkit.create_schedule("optional")
    assert "fake_broken2_hooks" not in sys.modules

    for value in ("0", ""):
        monkeypatch.setenv(plugins.DISABLE_ENV, value)
        discovered()
        assert rows_named(ddpmkit.list_plugins(), name="optional"), value

    cli_rows = cli_json(site, env_extra={plugins.DISABLE_ENV: "1"})
    assert {r["distribution"] for r in cli_rows} == {"ddpmkit"}
    assert_builtins_ok(cli_rows)
    cli_rows = cli_json(site)
    assert rows_named(cli_rows, name="optional") and rows_named(cli_rows, plugin="broken2")


# --- fast answers: no torch for --help and list-plugins ------------------------------------------------


@pytest.mark.parametrize("args", [["--help"], ["list-plugins"], ["list-plugins", "--json"], ["--version"]])
def test_cli_does_not_import_torch(args, tmp_path):
    make_dist(
        tmp_path,
        "ddpmkit-lazyok",
        "1.0",
        {"lazyok": "fake_lazyok_hooks"},
        {
            "fake_lazyok_hooks": hook_module("schedule", "lazyok", "fake_lazyok_impl:ConstantSchedule"),
            "fake_lazyok_impl": SCHEDULE_MODULE,
        },
    )
    snippet = textwrap.dedent(
        f"""
        import sys
        from typer.testing import CliRunner
        from ddpmkit.commands import app
        result = CliRunner().invoke(app, {args!r})
        assert result.exit_code == 0, (result.exit_code, result.output)
        assert {args[0]!r} == "--help" or "ddpmkit" in result.output
        print("torch" in sys.modules, "fake_lazyok_impl" in sys.modules)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != plugins.DISABLE_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]


def test_import_ddpmkit_does_not_import_torch():
    code = "import sys, ddpmkit; ddpmkit.list_plugins(); print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
