"""The Windows scripts in scripts/: encodings, line endings, argument forwarding, files they name.

cmd.exe and Windows PowerShell 5.1 cannot run here, so these check what
breaks them silently: cmd reads a batch file in the console's code page and
misparses LF-only files and a UTF-8 BOM; PowerShell 5.1 reads a .ps1 without
a BOM as ANSI, so any non-ASCII letter needs UTF-8 with a BOM.
"""
from __future__ import annotations

import codecs
import re
from pathlib import Path

import pytest

from scail_win.__main__ import COMMANDS

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
BATCH = sorted(SCRIPTS.glob("*.bat"))
POWERSHELL = sorted(SCRIPTS.glob("*.ps1"))
LAUNCHERS = {"sample": ("sample.bat", "sample.ps1"), "doctor": ("doctor.bat", "doctor.ps1")}


def test_the_scripts_exist():
    names = {p.name for p in BATCH + POWERSHELL}
    assert {"install.ps1", "sample.ps1", "sample.bat", "doctor.ps1", "doctor.bat"} <= names


@pytest.mark.parametrize("path", BATCH, ids=lambda p: p.name)
def test_batch_files_are_ascii_with_crlf(path: Path):
    data = path.read_bytes()
    assert not data.startswith(codecs.BOM_UTF8), "cmd.exe reads a BOM as part of the first command"
    assert data.isascii(), "cmd.exe reads batch files in the console code page: keep them ASCII"
    assert data.endswith(b"\r\n")
    assert data.count(b"\n") == data.count(b"\r\n"), "LF-only lines break labels and blocks in cmd.exe"
    assert data.count(b"\r") == data.count(b"\r\n")


@pytest.mark.parametrize("path", POWERSHELL, ids=lambda p: p.name)
def test_powershell_files_are_ascii_or_utf8_with_bom(path: Path):
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data[3:].decode("utf-8")  # a BOM promises UTF-8: it must decode
    else:
        assert data.isascii(), "Windows PowerShell 5.1 reads a .ps1 without a BOM as ANSI"
    assert data.count(b"\n") == data.count(b"\r\n"), "mixed line endings"


@pytest.mark.parametrize("command", sorted(LAUNCHERS))
def test_launchers_forward_every_argument_to_their_command(command: str):
    assert command in COMMANDS
    bat, ps1 = (SCRIPTS / name for name in LAUNCHERS[command])
    bat_lines = [ln for ln in bat.read_text(encoding="ascii").splitlines() if "-m scail_win" in ln]
    assert bat_lines == [f'"%VENV%\\Scripts\\python.exe" -m scail_win {command} %*']
    ps1_text = ps1.read_text(encoding="utf-8-sig")
    assert f"& (Join-Path $PSScriptRoot 'scail-win.ps1') {command} @args" in ps1_text
    # The exit status comes back to the caller.
    assert bat.read_text(encoding="ascii").rstrip().endswith("exit /b %ERRORLEVEL%")
    assert ps1_text.rstrip().endswith("exit $LASTEXITCODE")


def test_the_powershell_launcher_forwards_everything_to_python_m_scail_win():
    text = (SCRIPTS / "scail-win.ps1").read_text(encoding="utf-8-sig")
    lines = [ln.strip() for ln in text.splitlines() if "-m scail_win" in ln and ln.lstrip().startswith("&")]
    assert lines == ["& (Join-Path $Bin 'python.exe') -m scail_win @args"]
    assert "exit $Status" in text


@pytest.mark.parametrize("name", ["sample.bat", "doctor.bat"])
def test_batch_paths_are_quoted(name: str):
    text = (SCRIPTS / name).read_text(encoding="ascii")
    # Every use of the venv path sits inside double quotes (spaces, parentheses in
    # "Program Files (x86)"), and so does every assignment of it.
    for line in text.splitlines():
        if line.lstrip().lower().startswith("rem"):
            continue
        for match in re.finditer(r"%VENV%|%~dp0|%SCAIL_WIN_VENV%", line):
            assert line[:match.start()].count('"') % 2 == 1, f"unquoted {match.group()} in: {line}"


def test_install_script_names_existing_files_and_pytorch_index():
    text = (SCRIPTS / "install.ps1").read_text(encoding="utf-8-sig")
    for name in re.findall(r"Join-Path \$Root '([^']+)'", text):
        if name != ".venv":
            assert (REPO / name).is_file(), f"install.ps1 names {name}, which is not in the repository"
    assert "https://download.pytorch.org/whl/$Cuda" in text
    assert re.search(r"\[ValidatePattern\('\^\(cu\\d\{3\}\|cpu\)\$'\)\]\s*\[string\]\$Cuda", text)
    for param in ("$Venv", "$Cuda", "$Python"):
        assert f"[string]{param}" in text


def test_install_script_fast_switch_is_optional_and_never_fatal():
    text = (SCRIPTS / "install.ps1").read_text(encoding="utf-8-sig")
    assert re.search(r"\[switch\]\$Fast\s*\)", text), "-Fast is a switch parameter"
    assert ".PARAMETER Fast" in text
    block = text[text.index("if ($Fast) {"):]
    block = block[:block.index("\n}\n") + 2]
    # Both packages in one pip call, inside a try whose catch only warns.
    assert re.search(r"try \{.*Invoke-Native \$VenvPython @\('-m', 'pip', 'install', \$Triton, 'sageattention'\)"
                     r".*\} catch \{\s*Write-Warning", block, re.S)
    assert "$Triton = 'triton-windows'" in block
    assert "throw" not in block.split("catch", 1)[1]
    # The plain install never mentions them.
    assert "sageattention" not in text.replace(block, "").split("#>", 1)[1]


def test_install_script_passes_no_double_quotes_inside_python_code():
    # Windows PowerShell 5.1 strips embedded double quotes from native arguments.
    text = (SCRIPTS / "install.ps1").read_text(encoding="utf-8-sig")
    for code in re.findall(r"-c '((?:[^']|'')*)'", text):
        assert '"' not in code, code
