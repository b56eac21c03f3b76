"""The line config: examples in deploy/ are valid, and bad configs say which key is wrong."""
from __future__ import annotations

from pathlib import Path

import pytest

from musc_edge.edge.config import ConfigError, load_config, parse_config
from musc_edge.edge.sources.base import SOURCE_TYPES

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
MINIMAL = {"source": {"type": "replay", "path": "frames"}, "link": {"type": "zmq"}}


@pytest.mark.parametrize("path", sorted(DEPLOY.glob("*.yaml")), ids=lambda p: p.name)
def test_deploy_examples_are_valid(path):
    config = load_config(path)
    assert config.source.type in SOURCE_TYPES
    assert len(config.config_hash()) == 16


@pytest.mark.parametrize("patch, key", [
    ({"line": {"deadline_ms": 0}}, "line.deadline_ms"),
    ({"line": {"fail_safe": "explode"}}, "line.fail_safe"),
    ({"line": {"deadlin_ms": 5}}, "line.deadlin_ms"),
    ({"model": {"size": 4}}, "model.size"),
    ({"recipes": {}}, "recipes"),
    ({"recipes": {"a": {"pool": {"capacity": 5, "min_size": 9}}}}, "recipes.a.pool"),
    ({"recipes": {"a": {"threshold": "high"}}}, "recipes.a.threshold"),
    ({"source": {"type": "replay", "rate": 1, "fps": 3}}, "source"),
    ({"source": {"type": "camera"}}, "source"),
    ({"source": {"type": "replay", "path": "x", "recipe": "nope"}}, "source.recipe"),
    ({"link": {"type": "serial"}}, "link.url"),
    ({"link": {"type": "modbus"}}, "link"),
    ({"link": {"type": "zmq", "ack_timeout_s": -1}}, "link.ack_timeout_s"),
    ({"scoring": {"fraction": 1.5}}, "scoring.fraction"),
])
def test_invalid_configs_name_the_key(patch, key):
    with pytest.raises(ConfigError) as info:
        parse_config({**MINIMAL, **patch})
    assert key in str(info.value)


def test_config_hash_changes_with_any_setting():
    a = parse_config(MINIMAL)
    b = parse_config({**MINIMAL, "recipes": {"default": {"threshold": 0.7}}})
    assert a.config_hash() != b.config_hash()
    assert a.config_hash() == parse_config(dict(MINIMAL)).config_hash()


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("line: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
