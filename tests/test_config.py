from __future__ import annotations

import re
from pathlib import Path

import pytest

from asyncraft import config
from asyncraft.errors import ConfigError
from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent


def test_flag_beats_environment_beats_default() -> None:
    env = {"ASYNCRAFT_CONCURRENCY": "7", "ASYNCRAFT_RPM": "100", "ASYNCRAFT_INPUT": "x"}
    s = config.load("run", {"rpm": "50"}, env)
    assert (s.concurrency, s.rpm, s.tpm) == (7, 50.0, 0.0)
    assert config.load("run", {}, {"ASYNCRAFT_INPUT": "x"}).concurrency == 64


@pytest.mark.parametrize(("name", "value", "fragment"), [
    ("ASYNCRAFT_CONCURRENCY", "many", "must be an integer"),
    ("ASYNCRAFT_CONCURRENCY", "0", "must be >= 1"),
    ("ASYNCRAFT_RPM", "-1", "must be >= 0"),
    ("ASYNCRAFT_FSYNC", "sometimes", "must be one of always, batch, off"),
    ("ASYNCRAFT_EXTRA_BODY", "[1]", "must be a JSON object"),
    ("ASYNCRAFT_BASE_URL", "ftp://x", "must start with http"),
    ("ASYNCRAFT_SALVAGE", "perhaps", "must be one of"),
])
def test_bad_values_name_the_variable(name: str, value: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.load("run", {}, {name: value, "ASYNCRAFT_INPUT": "x"})
    assert str(err.value).startswith(name) and fragment in str(err.value)


def test_bad_value_is_one_line_and_exit_2_before_any_work(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "ASYNCRAFT_RPM": "fast", "ASYNCRAFT_STATE_DIR": str(tmp_path / "s")}
    res = run_cli("run", "--input", str(tmp_path / "in.jsonl"), env=env)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "ASYNCRAFT_RPM" in res.stderr
    assert not (tmp_path / "s").exists()


def test_api_key_is_not_in_repr_or_public_dict() -> None:
    s = config.load("run", {}, {"ASYNCRAFT_INPUT": "x", "OPENAI_API_KEY": "hidden-test-key-123456"})
    assert s.api_key == "hidden-test-key-123456"
    assert "hidden-test-key" not in repr(s) and "hidden-test-key" not in str(config.as_public_dict(s))


def test_readme_lists_every_variable_with_its_default() -> None:
    readme = (ROOT / "README.md").read_text()
    for opt in config.OPTIONS:
        row = re.search(rf"\| `{opt.env}` \|[^\n]*", readme)
        assert row, f"{opt.env} is missing from the README"
        assert f"`{config._show_default(opt.default)}`" in row.group(0), f"{opt.env}: default differs in README"


def test_help_lists_env_names() -> None:
    res = run_cli("run", "--help", env={"PATH": "/usr/bin:/bin"})
    assert res.returncode == 0
    assert "ASYNCRAFT_CONCURRENCY" in res.stdout and "--fsync" in res.stdout


def test_settings_defaults_are_the_options_defaults() -> None:
    defaults = config.Settings()
    for opt in config.OPTIONS:
        assert getattr(defaults, opt.name) == opt.default, f"{opt.env}: Settings and OPTIONS disagree"
