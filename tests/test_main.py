"""``python -m scail_win`` / ``scail-win``: the dispatcher, exit codes, cheap --help, broken pipes."""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import scail_win
from scail_win import __main__ as dispatcher

COMMANDS = ("sample", "convert", "doctor", "hook")
HEAVY = ("torch", "numpy", "av", "safetensors")


def run_module(*args: str, cwd: Path, importtime: bool = False) -> subprocess.CompletedProcess:
    flags = ["-X", "importtime"] if importtime else []
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    return subprocess.run([sys.executable, *flags, "-m", "scail_win", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, encoding="utf-8", timeout=60)


def imported(importtime_stderr: str) -> set[str]:
    """Top-level module names from ``-X importtime`` lines (``import time: self | total | name``)."""
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


def test_help_lists_every_command(tmp_path):
    proc = run_module("--help", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr == ""
    for name in COMMANDS:
        assert f"\n  {name} " in proc.stdout
    assert proc.stdout.startswith("usage: scail-win {sample,convert,doctor,hook,pose}")


def test_no_command_prints_usage_and_exits_2(capsys):
    assert dispatcher.main([]) == 2
    assert capsys.readouterr().out.startswith("usage: scail-win")


def test_unknown_command_exits_2_on_stderr(tmp_path):
    proc = run_module("smaple", "--input-dir", "x", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("scail-win: unknown command 'smaple'") and "usage: scail-win" in proc.stderr


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag, capsys):
    assert dispatcher.main([flag]) == 0
    assert capsys.readouterr().out == f"scail-win {scail_win.__version__}\n"


@pytest.mark.parametrize("name", COMMANDS)
def test_subcommand_help_is_cheap(name, tmp_path):
    proc = run_module(name, "--help", cwd=tmp_path, importtime=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"usage: scail-win {name}")
    assert not imported(proc.stderr) & set(HEAVY), "--help imported a heavy module"


def test_subcommand_bad_flag_is_argparse_exit_2(tmp_path):
    proc = run_module("doctor", "--no-such-flag", cwd=tmp_path)
    assert proc.returncode == 2 and "unrecognized arguments: --no-such-flag" in proc.stderr


def test_subcommand_status_is_passed_through(tmp_path):
    # hook exits 0 when the import hook is active, 1 when it is not: both come through unchanged.
    direct = subprocess.run([sys.executable, "-c", "import sys, scail_win.hook as h; sys.exit(h.main([]))"],
                            cwd=tmp_path, capture_output=True, text=True, encoding="utf-8", timeout=60)
    proc = run_module("hook", cwd=tmp_path)
    assert proc.returncode == direct.returncode and proc.stdout == direct.stdout


@pytest.mark.skipif(sys.platform == "win32", reason="a closed pipe reads as EINVAL, not EPIPE, on Windows")
def test_closed_stdout_exits_quietly(tmp_path):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write, as with `scail-win hook | head -0`
    try:
        proc = subprocess.run([sys.executable, "-m", "scail_win", "hook", "--json"], cwd=tmp_path, stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert proc.returncode == 1
    assert proc.stderr == ""  # no traceback, no "Exception ignored ... BrokenPipeError"


def test_console_script_is_installed(tmp_path):
    script = Path(sysconfig.get_path("scripts")) / ("scail-win.exe" if os.name == "nt" else "scail-win")
    if not script.exists():
        pytest.skip(f"scail-win is not installed in this environment ({script} missing): pip install .")
    proc = subprocess.run([str(script), "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"scail-win {scail_win.__version__}"
