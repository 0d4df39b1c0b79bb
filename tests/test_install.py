"""Installing scail-win puts the start-up hook in place: wheel and editable installs.

Each test builds from a copy of the source tree and installs into a fresh venv
(``pip --no-index --no-deps``, offline). The venv borrows torch, PyPI
SwissArmyTransformer and setuptools from the interpreter running the tests
through a path line in a .pth file, so nothing is downloaded.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PTH = "scail_win.pth"
# What a build needs from the source tree (setup.cfg names the packages).
SOURCE_ITEMS = ("setup.py", "setup.cfg", "pyproject.toml", PTH, "README.md", "LICENSE", "scail_win", "configs")


def copy_source(dest: Path) -> Path:
    dest.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    for name in SOURCE_ITEMS:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        elif src.exists():
            shutil.copy2(src, dest / name)
    return dest


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SCAIL_WIN_DISABLE")}
    env.update(extra)
    return env


def run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("env", clean_env())
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kwargs)


def make_venv(path: Path) -> tuple[Path, Path]:
    """A venv that also sees this interpreter's site-packages (after its own); returns (python, site)."""
    venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt").create(path)
    python = path / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    proc = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    site = Path(proc.stdout.strip())
    parent = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "_parent_site.pth").write_text("\n".join(parent) + "\n", encoding="utf-8")
    return python, site


def pip_install(python: Path, *args) -> None:
    proc = run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--no-build-isolation", *args])
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = copy_source(tmp_path_factory.mktemp("wheel") / "src")
    proc = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index", "--no-build-isolation",
                "-w", src / "dist", src])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (built,) = (src / "dist").glob("scail_win-*.whl")
    return built


def test_wheel_carries_the_pth_at_its_root(wheel: Path):
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read(PTH) == (REPO / PTH).read_bytes()
        assert "scail_win/_startup.py" in archive.namelist()


def test_wheel_install_makes_import_sat_work(wheel: Path, tmp_path: Path):
    if importlib.util.find_spec("sat") is None:
        pytest.skip("PyPI SwissArmyTransformer is not installed here "
                    "(pip install --no-deps SwissArmyTransformer==0.4.12)")
    python, site = make_venv(tmp_path / "venv")
    # As on Windows: no Triton, even where this interpreter has it.
    (site / "triton.py").write_text("raise ModuleNotFoundError(\"No module named 'triton'\", name='triton')\n",
                                    encoding="ascii")
    pip_install(python, wheel)
    assert (site / PTH).read_bytes() == (REPO / PTH).read_bytes()

    code = ("import sat, scail_win.rotary as r; "
            "assert sat.model.position_embedding.triton_rotary is r; print('redirected')")
    proc = run([python, "-c", code], cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("redirected"), proc.stderr
    proc = run([python, "-c", "import sat"], cwd=tmp_path, env=clean_env(SCAIL_WIN_DISABLE="1"))
    assert proc.returncode == 1 and "No module named 'triton'" in proc.stderr, proc.stderr


@pytest.mark.parametrize("mode", ["lenient", "strict"])
def test_editable_install_carries_the_pth(tmp_path: Path, mode: str):
    src = copy_source(tmp_path / "src")
    python, site = make_venv(tmp_path / "venv")
    pip_install(python, "--config-settings", f"editable_mode={mode}", "-e", src)
    assert (site / PTH).read_bytes() == (REPO / PTH).read_bytes()

    code = "import sys, scail_win, scail_win.hook as h; print(scail_win.__file__); sys.exit(h.main([]))"
    proc = run([python, "-c", code], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    imported_from, head = proc.stdout.splitlines()[:2]
    assert head == "scail-win import hook: active"
    if mode == "lenient":  # strict mode imports through a link tree under src/build
        assert Path(imported_from) == src / "scail_win" / "__init__.py"
