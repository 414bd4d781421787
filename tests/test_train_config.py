"""Training config: YAML → typed dataclasses, --set overrides, and the errors they raise."""

import textwrap
from pathlib import Path

import pytest

from fastsana.training.config import TrainConfig, dump_config, load_config
from fastsana.training.config_parse import ConfigError, apply_overrides

YAML = textwrap.dedent(
    """
    output_dir: runs/x
    model:
      preset: sana-tiny
      dit: {depth: 3}
    data:
      folder: data/shapes
      base_size: 256
    optimizer:
      name: came
      lr: 2e-4        # PyYAML reads this as a string; the float field converts it
    validation:
      prompts: [a red circle]
    """
)


SHIPPED_CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "train").glob("*.yaml"))


def write(tmp_path, text=YAML):
    path = tmp_path / "train.yaml"
    path.write_text(text)
    return path


def test_yaml_maps_onto_nested_dataclasses(tmp_path):
    config = load_config(write(tmp_path))
    assert isinstance(config, TrainConfig)
    assert config.model.preset == "sana-tiny" and config.model.dit == {"depth": 3}
    assert config.data.folder == "data/shapes" and config.data.base_size == 256
    assert config.optimizer.name == "came" and config.optimizer.lr == 2e-4
    assert config.validation.prompts == ["a red circle"]
    assert config.ema.decay == 0.9999 and config.optimizer.grad_clip == 0.1  # paper defaults


def test_overrides_set_any_field_with_yaml_values(tmp_path):
    config = load_config(
        write(tmp_path),
        [
            "optimizer.lr=5e-5",
            "data.batch_size=16",
            "schedule.decay=cosine",
            "validation.seeds=[1, 2, 3]",
            "model.dit.hidden_size=128",
            "ema.enabled=false",
        ],
    )
    assert config.optimizer.lr == 5e-5
    assert config.data.batch_size == 16
    assert config.schedule.decay == "cosine"
    assert config.validation.seeds == [1, 2, 3]
    assert config.model.dit == {"depth": 3, "hidden_size": 128}
    assert config.ema.enabled is False


def test_dumped_config_loads_back_equal(tmp_path):
    config = load_config(write(tmp_path), ["optimizer.betas=[0.9, 0.99, 0.999]"])
    again = load_config(write(tmp_path, dump_config(config)))
    assert again == config


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimzer.lr=1", "unknown key 'optimzer'; valid keys: ae_loss, checkpointing,"),
        ("optimizer.learning_rate=1", "unknown key 'optimizer.learning_rate'; valid keys:"),
        ("data.batch_size=two", "data.batch_size must be an integer, got 'two'"),
        ("optimizer.name=sgd", "optimizer.name must be one of 'adamw', 'came', got 'sgd'"),
        ("schedule.max_steps=0", "schedule.max_steps must be >= 1"),
        ("ema.enabled=yes please", "ema.enabled must be true or false"),
        ("optimizer.lr", "override 'optimizer.lr' must look like key.sub=value"),
        ("optimizer.lr.x=1", "'optimizer.lr' is a value, not a section"),
        ("model.preset=sana-huge", "model.preset 'sana-huge' is not a DiT preset"),
        ("data.cache_dir=c", "data: give one of folder, shards, cache_dir, got folder and"),
    ],
)
def test_bad_values_name_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path), [override])
    assert message in str(error.value)


def test_unknown_key_lists_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path), ["data.fodler=x"])
    text = str(error.value)
    assert "data.fodler" in text
    for valid in ("folder", "shards", "cache_dir", "batch_size"):
        assert valid in text


def test_missing_output_dir_and_task_rules():
    with pytest.raises(ConfigError, match="missing required key"):
        load_config(data={"data": {"folder": "x"}, "model": {"preset": "sana-tiny"}})
    base = {"output_dir": "o", "data": {"folder": "x"}}
    with pytest.raises(ConfigError, match=r"task lora needs model\.init_from"):
        load_config(data={**base, "task": "lora", "model": {"preset": "sana-tiny"}})
    with pytest.raises(ConfigError, match="not an autoencoder preset"):
        load_config(data={**base, "task": "ae", "model": {"preset": "sana-tiny"}})
    with pytest.raises(ConfigError, match="give a preset or init_from"):
        load_config(data={**base, "model": {}})
    ae = load_config(data={**base, "task": "ae", "model": {"preset": "dc-ae-tiny"}})
    assert ae.task == "ae"


def test_override_parser_keeps_the_input_unchanged():
    data = {"optimizer": {"lr": 1.0}}
    out = apply_overrides(data, ["optimizer.lr=2", "schedule.max_steps=3"])
    assert data == {"optimizer": {"lr": 1.0}}
    assert out == {"optimizer": {"lr": 2}, "schedule": {"max_steps": 3}}


def test_dit_and_autoencoder_fields_are_checked_on_load(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'model\.dit\.widht'; valid keys:"):
        load_config(write(tmp_path), ["model.dit.widht=3"])
    with pytest.raises(ConfigError, match=r"model\.dit\.depth must be an integer"):
        load_config(write(tmp_path), ["model.dit.depth=deep"])


def test_docs_reference_every_field():
    import dataclasses
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "training.md").read_text()
    reference = text[text.index("## Config reference") :]
    sections = {"Top level": TrainConfig}
    for f in dataclasses.fields(TrainConfig):
        if dataclasses.is_dataclass(f.default_factory):
            sections[f.name] = f.default_factory
    for title, cls in sections.items():
        start = reference.index(f"**{title}**")
        end = reference.find("\n**", start + 1)
        table = reference[start : end if end > 0 else None]
        for f in dataclasses.fields(cls):
            if not dataclasses.is_dataclass(f.default_factory):
                assert f"| `{f.name}` |" in table, f"docs/training.md lacks {title}.{f.name}"


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_training_config_loads(path):
    # The recipes docs/shapes.md cites must stay valid as the config schema changes: an
    # unknown or mistyped key, or a value out of range, raises here rather than mid-session.
    config = load_config(path)
    assert config.output_dir and config.data.source is not None


def test_shipped_training_configs_are_found():
    assert len(SHIPPED_CONFIGS) >= 10
