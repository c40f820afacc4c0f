"""config.toml loading: every mistake names its key; the shipped file documents every key."""

from __future__ import annotations

import re
import typing
from dataclasses import fields, is_dataclass, replace
from pathlib import Path

import pytest

from fractured import config
from tests.paths import REPO


def load_text(tmp_path: Path, text: str) -> config.Settings:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return config.load(path)


def test_shipped_config_loads_with_its_documented_defaults() -> None:
    shipped = config.load(REPO / "config.toml")
    defaults = config.from_dict({}, base=REPO)
    # The shipped file writes out every default; only the example destination and the
    # peers of a first test on this machine are extra.
    assert shipped.node == defaults.node
    assert shipped.access == replace(defaults.access, peers=shipped.access.peers)
    assert {p.ae_title: p.addresses for p in shipped.access.peers} == {
        "STORESCU": ["127.0.0.1", "::1"], "ECHOSCU": ["127.0.0.1", "::1"],
        "ORTHANC": ["127.0.0.1", "::1"]}
    assert shipped.tls == defaults.tls
    assert shipped.study == defaults.study
    assert shipped.engine == defaults.engine
    assert shipped.database == defaults.database
    assert shipped.metrics == defaults.metrics
    assert [d.name for d in shipped.destinations] == ["pacs"]


def test_every_key_is_documented_in_the_shipped_config() -> None:
    text = (REPO / "config.toml").read_text()
    hints = typing.get_type_hints(config.Settings)
    for section in fields(config.Settings):
        if section.name == "source":
            continue
        cls = hints[section.name]
        cls = typing.get_args(cls)[0] if typing.get_origin(cls) is list else cls
        assert is_dataclass(cls)
        header = f"[[{section.name}]]" if section.name == "destinations" else f"[{section.name}]"
        assert header in text, f"section {header} missing from config.toml"
        key_hints = typing.get_type_hints(cls)
        for key in fields(cls):
            # A key without a value by default (a path, a list of tables) is shown as a
            # commented-out example.
            item = typing.get_args(key_hints[key.name])
            example = key.default is None or (item and is_dataclass(item[0]))
            line = (rf"#\s*(?:{key.name} = |\[\[{section.name}\.{key.name}\]\])" if example
                    else rf"{key.name} = ")
            match = re.search(rf"^# .*\n(?:#.*\n)*{line}", text, re.MULTILINE)
            assert match, f"{header}.{key.name} is not in config.toml with a comment above it"


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    s = load_text(tmp_path / "etc", '[node]\nspool_dir = "spool"\n'
                  '[database]\nurl = "sqlite:///db/q.db"\n[engine]\nbundle = "../engines/x"\n')
    assert s.node.spool_dir == tmp_path / "etc" / "spool"
    assert s.database.url == f"sqlite:///{tmp_path / 'etc' / 'db' / 'q.db'}"
    assert s.engine.bundle == tmp_path / "engines" / "x"


def test_absolute_sqlite_url_is_kept(tmp_path: Path) -> None:
    s = load_text(tmp_path, '[database]\nurl = "sqlite:////var/lib/fractured/q.db"\n')
    assert s.database.url == "sqlite:////var/lib/fractured/q.db"


@pytest.mark.parametrize(("text", "message"), [
    ('[node]\nae_titel = "X"\n', r"\[node\]\.ae_titel: unknown key"),
    ('[nodes]\nport = 1\n', r"nodes: unknown section"),
    ('[node]\nport = "11112"\n', r"\[node\]\.port: expected an integer, got '11112'"),
    ("[node]\nport = 1.5\n", r"\[node\]\.port: expected an integer"),
    ("[study]\nquiet_period_s = true\n", r"\[study\]\.quiet_period_s: expected a number"),
    ('[study]\nmodalities = "CR"\n', r"\[study\]\.modalities: expected a list"),
    ("[study]\nmodalities = [1]\n", r"\[study\]\.modalities\[0\]: expected a string"),
    ('[engine]\nbackend = "cuda"\n', r"\[engine\]\.backend: expected one of 'auto'"),
    ('[[destinations]]\nname = "p"\nhost = "h"\nport = 104\n',
     r"\[\[destinations\]\]\[0\]\.ae_title: required key is missing"),
    ('[[destinations]]\nname = "p"\nae_title = "P"\nhost = "h"\nport = 104\nfoo = 1\n',
     r"\[\[destinations\]\]\[0\]\.foo: unknown key"),
    ('[[destinations]]\nname = "p"\nae_title = "P"\nhost = "h"\nport = 104\n'
     'ca_file = "ca.pem"\n',
     r"\[\[destinations\]\]\[0\]\.ca_file: only used with TLS; set .*tls = true"),
    ('[[destinations]]\nname = "p"\nae_title = "P"\nhost = "h"\nport = 104\ntls = true\n'
     'ca_file = "missing.pem"\n',
     r"\[\[destinations\]\]\[0\]\.ca_file: file not found: .*missing.pem"),
    ('[[destinations]]\nname = "p"\nae_title = "P"\nhost = "h"\nport = 104\ntls = true\n'
     'certificate = "node.crt"\n',
     r"\[\[destinations\]\]\[0\]\.private_key: a client certificate needs both"),
    ('[node]\nae_title = "A_TITLE_LONGER_THAN_16"\n', r"\[node\]\.ae_title: an AE title"),
    ("[node]\nport = 70000\n", r"\[node\]\.port: a TCP port is 1-65535"),
    ("[study]\nquiet_period_s = 0\n", r"\[study\]\.quiet_period_s: must be greater than 0"),
    ('[database]\nurl = "mysql://x"\n', r"\[database\]\.url: expected sqlite"),
    ('[database]\nurl = "postgresql+psycopg2://u:secret@h/db"\n',
     r"\[database\]\.url: the psycopg2 driver is not installed.*u:\*\*\*@h/db"),
    ('[database]\nurl = "no url"\n', r"\[database\]\.url: expected sqlite.*not a URL"),
    ("[node\n", r"not valid TOML"),
])
def test_mistakes_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(config.ConfigError, match=message) as info:
        load_text(tmp_path, text)
    assert str(tmp_path / "config.toml") in str(info.value)


def test_duplicate_destination_names_are_refused(tmp_path: Path) -> None:
    one = '[[destinations]]\nname = "pacs"\nae_title = "P"\nhost = "h"\nport = 104\n'
    with pytest.raises(config.ConfigError, match="'pacs' is used twice"):
        load_text(tmp_path, one + one)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="file not found"):
        config.load(tmp_path / "nope.toml")


def test_cli_reports_a_config_error_without_a_traceback(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from fractured.cli import main

    path = tmp_path / "config.toml"
    path.write_text("[node]\nport = 0\n")
    result = CliRunner().invoke(main, ["status", "--config", str(path)])
    assert result.exit_code == 1
    assert "configuration error" in result.output and "[node].port" in result.output
