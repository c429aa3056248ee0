"""What a new user reads first: ``run --help`` in sections with examples, the sample inputs, the README's top,
and no pointer to a document the repository does not hold. In-process and file checks: milliseconds."""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

import pytest

from asyncraft import cli, config
from asyncraft.demo import DEMO_DOCS, DEMO_PROMPTS

ROOT = Path(__file__).resolve().parent.parent


def _help(command: str) -> str:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return str(sub.choices[command].format_help())


def _sections(text: str) -> dict[str, str]:
    """Section title -> its body, as argparse prints them (a title line ending with a colon, no indent)."""
    parts = re.split(r"^(\S[^\n]*):\n", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_every_option_is_declared_in_a_known_section() -> None:
    unknown = [o.name for o in config.OPTIONS if o.group not in config.GROUPS]
    assert not unknown, f"options without a section of config.GROUPS (add group=...): {unknown}"


def test_run_help_lists_its_options_by_section_in_order_and_ends_with_examples() -> None:
    text = _help("run")
    sections = _sections(text)
    titles = [config.GROUPS[g] for g in config.GROUPS if any(
        o.group == g and "run" in o.commands and o.flag for o in config.OPTIONS)]
    assert [t for t in sections if t in config.GROUPS.values()] == titles
    for opt in config.OPTIONS:
        if "run" in opt.commands and opt.flag:
            assert re.search(rf"^  {re.escape(opt.flag_name)}\b", sections[config.GROUPS[opt.group]], re.M), \
                f"{opt.flag_name} is not listed under {config.GROUPS[opt.group]!r}"
    assert text.splitlines()[0].startswith("usage: asyncraft run --input PATH") and len(text.splitlines()[0]) < 100
    examples = text[text.index("examples"):]
    for command in ("run --job prompts --input examples/prompts.jsonl", "run --job raft --input examples/docs/",
                    "export --state-dir"):
        assert command in examples
    assert text.rstrip().endswith("74 a write or fsync of the state failed.")


def test_the_examples_in_the_help_name_files_that_exist() -> None:
    for match in re.finditer(r"--input (examples/\S+)", _help("run")):
        assert (ROOT / match.group(1)).exists(), match.group(1)


def test_examples_are_the_inputs_the_demo_runs() -> None:
    assert (ROOT / "examples" / "prompts.jsonl").resolve() == DEMO_PROMPTS
    assert (ROOT / "examples" / "docs").resolve() == DEMO_DOCS
    assert len(DEMO_PROMPTS.read_text(encoding="utf-8").splitlines()) >= 5 and any(DEMO_DOCS.iterdir())


def test_the_readme_starts_with_the_demo_and_the_test_command_in_a_virtual_environment() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    first_block = readme.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(first_block) == 2
    demo, tests = first_block
    assert demo.startswith("python3 -m venv .venv") and demo.endswith("-m asyncraft demo")
    assert tests.startswith("python3 -m venv .venv") and tests.endswith("-m pytest -q")
    assert "3.11" in readme[:2000] and re.search(r"runs the tests: about \d", readme[:3000])


# Built from parts so that this file does not name them itself.
_ABSENT = ("DESIGN" + ".md", "STYLE" + ".md", "CONTAINERS" + ".md", "../" + "shared")


def test_no_project_file_points_to_a_document_outside_the_repository() -> None:
    try:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    hits = []
    for name in files.decode().split("\0"):
        path = ROOT / name
        if not name or path.is_symlink() or not path.is_file():
            continue
        text = path.read_bytes().decode("utf-8", "replace")
        hits += [f"{name}: {needle}" for needle in _ABSENT if needle in text]
    assert not hits, hits
