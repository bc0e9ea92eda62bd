"""docs/config.md is generated from the config's models: it must say what load_config accepts."""

from pathlib import Path

from ddpmkit.run.config import RunConfig, TrainSection
from ddpmkit.run.reference import config_reference, options_rows, schema_type

ROOT = Path(__file__).resolve().parent.parent


def test_docs_config_md_is_the_generated_reference():
    committed = (ROOT / "docs" / "config.md").read_text()
    assert committed == config_reference(), (
        "docs/config.md is stale: run `python -m ddpmkit.run.reference > docs/config.md` and commit it"
    )


def test_every_key_of_every_table_is_in_the_reference():
    text = config_reference()
    for section in ("run", "data", "train", "sample", "conditioning", "guidance"):
        model = type(getattr(RunConfig(), section))
        assert f"## [{section}]" in text
        for key, field in model.model_fields.items():
            if not field.exclude:
                assert f"`{key}`" in text or f"{section}.{key}]" in text, f"[{section}] {key} missing"
    assert "## [[train.smaller_models]]" in text and "## [train.posthoc_ema]" in text
    assert "### denoiser `unet`" in text and "### sampler `ddim`" in text


def test_defaults_are_the_config_defaults():
    rows = {key: default for key, _, default, _ in options_rows(TrainSection, RunConfig().train)}
    assert rows["epochs"] == "75" and rows["batch_size"] == "64" and rows["compile"] == "false"
    assert '| `name` | string | `"linear"` |' in config_reference()  # [schedule]'s default, not "required"


def test_schema_types_read_as_types():
    assert schema_type({"anyOf": [{"type": "integer"}, {"type": "null"}]}) == "integer | null"
    assert schema_type({"enum": ["a", "b"]}) == "one of a, b"
    assert schema_type({"type": "array", "items": {"type": "number"}}) == "array of number"
    assert schema_type({"anyOf": [{"type": "boolean"}, {"const": "auto"}]}) == 'boolean | "auto"'
