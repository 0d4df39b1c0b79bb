"""README.md stays true: CI runs its test command, and the flags it documents exist."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from scail_win import arguments, hook
from scail_win.cli import sample
from scail_win.weights import convert
from scail_win.cli import doctor

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def section(title: str) -> str:
    """The text under a ``##``/``###`` heading, up to the next heading of any level."""
    match = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#+ |\Z)", README, flags=re.M | re.S)
    assert match, f"README has no section {title!r}"
    return match.group(1)


def option_strings(parser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings}


def documented_flags(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))


def test_ci_runs_the_readme_test_command():
    blocks = re.findall(r"```\n(.*?)```", README, flags=re.S)
    test_command = next(b.strip() for b in blocks if "pytest" in b)
    ci_lines = [ln.strip() for ln in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    assert test_command in ci_lines


def test_the_first_command_samples():
    first = re.search(r"```\n(.*?)```", README, flags=re.S).group(1)
    assert "python -m scail_win sample --input-dir" in first


def test_documented_sample_flags_exist():
    flags = option_strings(sample.build_parser())
    for title in ("sample", "Resume", "Smoke check"):
        assert documented_flags(section(title)) <= flags, title
    memory = section("Memory options")
    first_table = memory.split("Three more are")[0]
    assert documented_flags(first_table) <= flags
    upstream_style = option_strings(arguments.build_parser())
    assert documented_flags(memory) <= upstream_style


def test_documented_convert_doctor_hook_flags_exist(capsys):
    # convert's text also names sample's --weights, which takes convert's output.
    convert_flags = option_strings(convert.build_parser()) | option_strings(sample.build_parser())
    assert documented_flags(section("convert")) <= convert_flags
    assert documented_flags(section("doctor")) <= option_strings(doctor.build_parser())
    with pytest.raises(SystemExit):
        hook.main(["--help"])
    assert documented_flags(section("Switching it off")) <= documented_flags(capsys.readouterr().out)


def test_documented_environment_variables_are_read_by_the_code():
    names = set(re.findall(r"\bSCAIL_(?:WIN_)?[A-Z]+\b", README))
    files = [*(REPO / "scail_win").rglob("*.py"), REPO / "tests" / "conftest.py", *(REPO / "scripts").glob("*.*")]
    source = "\n".join(p.read_text(encoding="utf-8-sig") for p in files)
    read = set(re.findall(r"\bSCAIL_(?:WIN_)?[A-Z]+\b", source))
    assert names and names <= read, f"README documents {names - read}, which nothing reads"


def test_every_benchmark_is_listed():
    listed = set(re.findall(r"^- `([\w.]+)`:", section("Developing"), flags=re.M))
    present = {p.name for p in (REPO / "benchmarks").iterdir() if p.suffix in (".py", ".sh")}
    assert present <= listed, f"README's Developing section does not list {sorted(present - listed)}"
