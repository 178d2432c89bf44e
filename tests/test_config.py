"""The config loader: embedded defaults, and errors that name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from shim import config


def test_no_file_means_the_embedded_defaults() -> None:
    loaded = config.load(None)
    assert loaded.tus.endpoint == "/files/"
    assert loaded.tus.forward.method == "PUT"


def test_the_example_config_is_valid_and_spells_out_every_default() -> None:
    example = Path(__file__).parent.parent / "config.example.yaml"
    assert config.load(example) == config.Config()
    assert _keys(yaml.safe_load(example.read_text())) == _keys(dataclasses.asdict(config.Config()))


def _keys(tree: dict[str, object], prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        keys.add(prefix + key)
        if isinstance(value, dict):
            keys |= _keys(value, f"{prefix}{key}.")
    return keys


def test_values_are_read_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("tus:\n  forward: {method: POST, body: multipart, field: upload}\n"
                    "upstream: {timeout: 5}\n")
    loaded = config.load(path)
    assert (loaded.tus.forward.method, loaded.tus.forward.body) == ("POST", "multipart")
    assert loaded.upstream.timeout == 5.0


@pytest.mark.parametrize("raw, key", [
    ({"tus": {"forwrd": {}}}, "tus.forwrd"),
    ({"tus": {"forward": {"method": "PATCH"}}}, "tus.forward.method"),
    ({"tus": {"forward": {"body": "form"}}}, "tus.forward.body"),
    ({"tus": {"forward": {"path": "uploads/{id}"}}}, "tus.forward.path"),
    ({"tus": {"forward": {"path": "/{a.b}"}}}, "tus.forward.path"),
    ({"tus": {"forward": {"path": "/{"}}}, "tus.forward.path"),
    ({"tus": {"endpoint": "/files"}}, "tus.endpoint"),
    ({"tus": {"max_size": -1}}, "tus.max_size"),
    ({"tus": {"max_size": True}}, "tus.max_size"),
    ({"storage": {"fsync": "yes"}}, "storage.fsync"),
    ({"storage": "here"}, "storage"),
    ({"upstream": {"timeout": 0}}, "upstream.timeout"),
])
def test_errors_name_the_key(raw: dict[str, object], key: str) -> None:
    with pytest.raises(config.ConfigError) as caught:
        config.from_dict(raw)
    assert str(caught.value).startswith(f"{key}:")


def test_unreadable_or_broken_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("tus: [unclosed\n")
    with pytest.raises(config.ConfigError, match="not valid YAML"):
        config.load(broken)


def test_every_error_is_reported_at_once_one_line_each() -> None:
    """A config with several mistakes names each of them, so that one run fixes them all."""
    raw = {"tus": {"endpoint": "files", "max_size": "big", "colour": "red"},
           "storage": {"fsync": "yes"}, "limits": {"header_bytes": 0}, "nonsense": 1,
           "public_url": "https://x.example/path"}
    with pytest.raises(config.ConfigError) as refused:
        config.from_dict(raw)
    lines = str(refused.value).splitlines()
    assert sorted(line.split(":")[0] for line in lines) == sorted([
        "tus.endpoint", "tus.max_size", "tus.colour", "storage.fsync", "limits.header_bytes",
        "nonsense", "public_url"])
