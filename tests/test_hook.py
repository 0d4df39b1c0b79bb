"""The start-up import hook: redirects, SCAIL-tree detection, the script takeover.

In-process tests drive :class:`scail_win.hook.ScailWinFinder` with stand-in
module names; subprocess tests run the real start-up path (``scail_win.pth``
in a throw-away venv's site-packages, the real ``hook.py`` and ``_startup.py``)
with stand-in ``scail_win.rotary``/``arguments``/``sample_video`` modules, so
they need neither torch nor the other parts of scail-win.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

from scail_win import hook

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def make_scail_tree(root: Path) -> Path:
    """A SCAIL-shaped checkout whose own modules fail loudly if they are executed."""
    write(root / "dit_video_crossattn_sc_xc.py", "")
    (root / "sat").mkdir()
    (root / "sgm").mkdir()
    for name in ("arguments", "diffusion_video"):
        write(root / f"{name}.py", f"raise RuntimeError('SCAIL {name}.py was executed')\n")
    write(root / "sample_video.py", """\
        print("UPSTREAM sample_video.py ran")
        raise SystemExit(7)
        """)
    return root


@pytest.fixture
def isolated():
    """Restore sys.path, sys.meta_path and sys.modules; start with no scail-win finder."""
    saved_path, saved_meta, saved_modules = list(sys.path), list(sys.meta_path), set(sys.modules)
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, hook.ScailWinFinder)]
    yield
    hook.uninstall()
    sys.path[:] = saved_path
    sys.meta_path[:] = saved_meta
    for name in set(sys.modules) - saved_modules:
        del sys.modules[name]
    importlib.invalidate_caches()


@pytest.fixture
def fakes(tmp_path: Path) -> Path:
    """Stand-in replacement modules (package ``fakewin``) on sys.path."""
    pkgs = tmp_path / "pkgs"
    write(pkgs / "fakewin" / "__init__.py", "")
    write(pkgs / "fakewin" / "arguments.py", "STATE = {}\n")
    write(pkgs / "fakewin" / "rotary.py", "def apply_rotary(x):\n    return ('fakewin', x)\n")
    sys.path.insert(0, str(pkgs))
    importlib.invalidate_caches()
    return pkgs


# --- SCAIL tree detection -----------------------------------------------------

def test_is_scail_tree_and_find_root(tmp_path: Path):
    tree = make_scail_tree(tmp_path / "SCAIL checkout ü")
    assert hook.is_scail_tree(tree) and hook.is_scail_tree(str(tree))
    deep = tree / "sat" / "model"
    deep.mkdir()
    assert hook.find_scail_root(deep) == tree
    assert hook.find_scail_root(tree / "sample_video.py") == tree
    assert hook.find_scail_root(tmp_path) is None

    no_sgm = tmp_path / "no_sgm"
    write(no_sgm / "dit_video_crossattn_sc_xc.py", "")
    (no_sgm / "sat").mkdir()
    assert not hook.is_scail_tree(no_sgm)
    marker_dir = tmp_path / "marker_is_a_dir"
    for sub in ("dit_video_crossattn_sc_xc.py", "sat", "sgm"):
        (marker_dir / sub).mkdir(parents=True)
    assert not hook.is_scail_tree(marker_dir)
    with pytest.raises(TypeError):
        hook.is_scail_tree(3)


def test_pth_is_one_ascii_import_line():
    # site executes a .pth line only if it starts with "import"; it reads the
    # file in the locale's encoding, so anything but ASCII is a risk on Windows.
    lines = (REPO / hook.PTH_NAME).read_bytes().decode("ascii").splitlines()
    assert len(lines) == 1 and lines[0].startswith("import ")
    compile(lines[0], hook.PTH_NAME, "exec")


# --- the finder ---------------------------------------------------------------

def test_scail_arguments_is_aliased_to_the_replacement(isolated, fakes, tmp_path: Path):
    tree = make_scail_tree(tmp_path / "SCAIL")
    sys.path.insert(0, str(tree))
    sys.meta_path.insert(0, hook.ScailWinFinder(always={}, from_scail_tree={"arguments": "fakewin.arguments"}))

    alias = importlib.import_module("arguments")  # SCAIL's file would raise

    ours = sys.modules["fakewin.arguments"]
    assert alias is ours and sys.modules["arguments"] is ours
    assert ours.__name__ == "fakewin.arguments"
    assert ours.__spec__.name == "fakewin.arguments"  # not clobbered by the alias spec
    alias.STATE["seen"] = True
    assert importlib.import_module("fakewin.arguments").STATE == {"seen": True}
    # reload goes by __spec__: with the alias's spec it would rename the module.
    assert importlib.reload(alias) is ours and ours.__name__ == "fakewin.arguments"


def test_same_name_outside_a_scail_tree_is_left_alone(isolated, fakes, tmp_path: Path):
    other = write(tmp_path / "project" / "arguments.py", "VALUE = 'mine'\n")
    sys.path.insert(0, str(other.parent))
    sys.meta_path.insert(0, hook.ScailWinFinder(always={}, from_scail_tree={"arguments": "fakewin.arguments",
                                                                            "diffusion_video": "fakewin.nope"}))

    module = importlib.import_module("arguments")

    assert module.VALUE == "mine" and Path(module.__file__) == other
    assert "fakewin.arguments" not in sys.modules
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("diffusion_video")  # found nowhere: still an ordinary miss


def test_triton_rotary_is_always_redirected(isolated, fakes, tmp_path: Path):
    # PyPI-shaped: no SCAIL tree around it, and the kernel module needs Triton.
    site = tmp_path / "site"
    write(site / "fakesat" / "__init__.py", "")
    write(site / "fakesat" / "model" / "__init__.py", "")
    write(site / "fakesat" / "model" / "position_embedding" / "__init__.py",
          "from .triton_rotary import apply_rotary\n")
    write(site / "fakesat" / "model" / "position_embedding" / "triton_rotary.py", "import triton\n")
    sys.path.insert(0, str(site))
    name = "fakesat.model.position_embedding.triton_rotary"
    sys.meta_path.insert(0, hook.ScailWinFinder(always={name: "fakewin.rotary"}, from_scail_tree={}))

    package = importlib.import_module("fakesat.model.position_embedding")

    ours = sys.modules["fakewin.rotary"]
    assert sys.modules[name] is ours and package.triton_rotary is ours
    assert package.apply_rotary("x") == ("fakewin", "x")


def test_install_is_idempotent_and_uninstall_removes_it(isolated):
    first = hook.install()
    assert hook.install() is first and sys.meta_path[0] is first
    assert sum(isinstance(f, hook.ScailWinFinder) for f in sys.meta_path) == 1
    assert first.always == hook.ALWAYS and first.from_scail_tree == hook.FROM_SCAIL_TREE
    hook.uninstall()
    assert not any(isinstance(f, hook.ScailWinFinder) for f in sys.meta_path)


def test_module_imported_before_install_is_reported_not_replaced(isolated, tmp_path: Path, caplog):
    tree = make_scail_tree(tmp_path / "SCAIL")
    write(tree / "arguments.py", "FROM_SCAIL = True\n")
    elsewhere = write(tmp_path / "project" / "diffusion_video.py", "")
    sys.path[:0] = [str(elsewhere.parent), str(tree)]
    importlib.invalidate_caches()
    upstream = importlib.import_module("arguments")
    importlib.import_module("diffusion_video")

    with caplog.at_level(logging.WARNING, logger="scail_win.hook"):
        hook.install()

    assert sys.modules["arguments"] is upstream and importlib.import_module("arguments").FROM_SCAIL
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "arguments" in warnings[0] and str(tree / "arguments.py") in warnings[0]
    rows = {row["name"]: row for row in hook.status()["redirects"]}
    assert rows["arguments"]["state"] == hook.NOT_REDIRECTED
    assert rows["arguments"]["origin"] == str(tree / "arguments.py")
    assert rows["diffusion_video"]["state"] == hook.LEFT_ALONE
    assert rows["sample_video"]["state"] == hook.NOT_IMPORTED


# --- status and the `hook` command ------------------------------------------------

def test_status_text_and_json(isolated, tmp_path: Path, monkeypatch, capsys):
    tree = make_scail_tree(tmp_path / "SCAIL")
    (tree / "examples").mkdir()
    monkeypatch.chdir(tree / "examples")
    monkeypatch.delenv(hook.DISABLE_ENV, raising=False)

    assert hook.main([]) == 1
    assert "import hook: off" in capsys.readouterr().out

    hook.install()
    assert hook.main(["--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["active"] and not info["disabled_by_env"]
    assert info["scail_root"] == str(tree)
    assert [row["name"] for row in info["redirects"]] == [*hook.ALWAYS, *hook.FROM_SCAIL_TREE]
    text = hook.format_status(info)
    assert text.startswith("scail-win import hook: active")
    assert f"SCAIL checkout: {tree}" in text
    assert "arguments -> scail_win.arguments  [from a SCAIL checkout] not imported yet" in text

    monkeypatch.chdir(tmp_path)
    assert hook.main(["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["scail_root"] is None
    assert hook.main([str(tree / "sat"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["scail_root"] == str(tree)

    hook.uninstall()
    monkeypatch.setenv(hook.DISABLE_ENV, "1")
    assert hook.main([]) == 1
    assert "SCAIL_WIN_DISABLE is set" in capsys.readouterr().out


@pytest.mark.parametrize("value, installs", [("1", False), ("yes", False), ("0", True), ("", True)])
def test_startup_module_honours_disable(isolated, monkeypatch, value, installs):
    monkeypatch.setenv(hook.DISABLE_ENV, value)
    sys.modules.pop("scail_win._startup", None)
    importlib.import_module("scail_win._startup")
    assert any(isinstance(f, hook.ScailWinFinder) for f in sys.meta_path) is installs


# --- the real start-up path, in a throw-away venv ---------------------------------

FAKE_SAMPLE_VIDEO = """\
    import json, os, sys

    def main(argv=None):
        print(json.dumps({"ours": True, "argv": argv, "main_spec": sys.modules["__main__"].__spec__.name}))
        return int(os.environ.get("FAKE_RC", "0"))

    if __name__ == "__main__":
        sys.exit(main())
    """


@pytest.fixture(scope="module")
def startup_env(tmp_path_factory) -> dict:
    """A venv whose site-packages holds scail_win.pth, our hook and stand-in targets."""
    root = tmp_path_factory.mktemp("startup")
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt").create(env_dir)
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    shutil.copy2(REPO / "scail_win.pth", site / "scail_win.pth")
    pkg = site / "scail_win"
    pkg.mkdir()
    for name in ("__init__.py", "hook.py", "_startup.py"):
        shutil.copy2(REPO / "scail_win" / name, pkg / name)
    write(pkg / "rotary.py", "def apply_rotary(*args, **kwargs):\n    return 'scail_win.rotary'\n")
    write(pkg / "arguments.py", "STATE = {}\n")
    write(pkg / "diffusion_video.py", "")
    write(pkg / "sample_video.py", FAKE_SAMPLE_VIDEO)
    # PyPI SwissArmyTransformer's shape: sat imports the Triton kernel module at import time.
    write(site / "sat" / "__init__.py", "from .model import position_embedding\n")
    write(site / "sat" / "model" / "__init__.py", "")
    write(site / "sat" / "model" / "position_embedding" / "__init__.py",
          "from .triton_rotary import apply_rotary\n")
    write(site / "sat" / "model" / "position_embedding" / "triton_rotary.py", "import triton\n")
    tree = make_scail_tree(root / "SCAIL checkout ü")
    return {"python": str(python), "site": site, "tree": tree, "root": root}


def run_py(env: dict, *args: str, cwd: Path, disable: bool = False, rc: int = 0) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", hook.DISABLE_ENV)}
    environ.update(FAKE_RC=str(rc), PYTHONIOENCODING="utf-8")
    if disable:
        environ[hook.DISABLE_ENV] = "1"
    return subprocess.run([env["python"], *args], cwd=cwd, env=environ, capture_output=True,
                          text=True, encoding="utf-8", timeout=60)


def ours_ran(proc: subprocess.CompletedProcess) -> dict:
    assert "UPSTREAM" not in proc.stdout, proc.stdout
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_scail_script_runs_ours(startup_env):
    tree = startup_env["tree"]
    proc = run_py(startup_env, "sample_video.py", "--base", "model.yaml", "--seed", "3", cwd=tree, rc=5)
    assert proc.returncode == 5, proc.stderr
    result = ours_ran(proc)
    assert result["argv"] == ["--base", "model.yaml", "--seed", "3"]
    assert result["main_spec"] == "scail_win.sample_video"  # what multiprocessing's spawn re-imports
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "instead of SCAIL's" in lines[0] and str(tree / "sample_video.py") in lines[0]


def test_scail_script_by_path_from_elsewhere(startup_env):
    proc = run_py(startup_env, str(startup_env["tree"] / "sample_video.py"), "x", cwd=startup_env["root"])
    assert proc.returncode == 0, proc.stderr
    assert ours_ran(proc)["argv"] == ["x"]


def test_scail_module_run_with_dash_m_runs_ours(startup_env):
    proc = run_py(startup_env, "-m", "sample_video", "y", cwd=startup_env["tree"], rc=4)
    assert proc.returncode == 4, proc.stderr
    assert ours_ran(proc)["argv"] == ["y"]
    assert "instead of SCAIL's" in proc.stderr
    # Only sample_video is a script; neither SCAIL's arguments.py nor ours runs.
    proc = run_py(startup_env, "-m", "arguments", cwd=startup_env["tree"])
    assert proc.returncode == 1 and "No code object available for arguments" in proc.stderr


def test_disable_env_runs_upstream(startup_env):
    proc = run_py(startup_env, "sample_video.py", cwd=startup_env["tree"], disable=True)
    assert proc.returncode == 7 and "UPSTREAM sample_video.py ran" in proc.stdout
    proc = run_py(startup_env, "-c", "import arguments", cwd=startup_env["tree"], disable=True)
    assert proc.returncode == 1 and "SCAIL arguments.py was executed" in proc.stderr


def test_sample_video_outside_scail_tree_runs_as_is(startup_env, tmp_path: Path):
    write(tmp_path / "sample_video.py", "print('plain script')\n")
    proc = run_py(startup_env, "sample_video.py", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "plain script" and proc.stderr == ""


def test_imports_are_redirected_at_startup(startup_env):
    code = ("import arguments, diffusion_video, scail_win.arguments as a, scail_win.diffusion_video as d; "
            "assert arguments is a and diffusion_video is d; "
            "import sat, scail_win.rotary as r; "
            "assert sat.model.position_embedding.triton_rotary is r; "
            "print(sat.model.position_embedding.apply_rotary())")
    proc = run_py(startup_env, "-c", code, cwd=startup_env["tree"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "scail_win.rotary" and proc.stderr == ""
    proc = run_py(startup_env, "-c", "import sat", cwd=startup_env["root"], disable=True)
    assert proc.returncode == 1 and "No module named 'triton'" in proc.stderr


def test_active_tracer_keeps_upstream_script_and_warns(startup_env):
    # A .pth sorted before ours stands in for a debugger that traces from the start.
    tracer_pth = startup_env["site"] / "a_tracer.pth"
    tracer_pth.write_text("import sys; sys.settrace(lambda *a: None)\n", encoding="ascii")
    try:
        proc = run_py(startup_env, "sample_video.py", cwd=startup_env["tree"])
    finally:
        tracer_pth.unlink()
    assert proc.returncode == 7 and "UPSTREAM" in proc.stdout
    assert "debugger or tracer is active" in proc.stderr


def test_hook_command_in_a_real_startup(startup_env):
    code = "import sys, scail_win.hook as h; sys.exit(h.main([]))"
    proc = run_py(startup_env, "-c", code, cwd=startup_env["tree"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("scail-win import hook: active")
    assert f"start-up file: {startup_env['site'] / 'scail_win.pth'}" in proc.stdout
    assert f"SCAIL checkout: {startup_env['tree']}" in proc.stdout
    proc = run_py(startup_env, "-c", code, cwd=startup_env["root"], disable=True)
    assert proc.returncode == 1 and "SCAIL_WIN_DISABLE is set" in proc.stdout


# --- the real SCAIL checkout ----------------------------------------------------------

@pytest.mark.scail
@pytest.mark.skipif(not os.environ.get("SCAIL_ROOT"), reason="needs a SCAIL checkout named by SCAIL_ROOT")
def test_real_scail_checkout_is_recognised_and_its_sat_imports():
    root = Path(os.environ["SCAIL_ROOT"]).resolve()
    assert hook.is_scail_tree(root) and hook.find_scail_root(root / "sat" / "model") == root
    # find_spec only: the replacement modules are not loaded, the vendored sat is.
    code = textwrap.dedent("""\
        import importlib.util, sys
        import scail_win.hook as h
        h.install()
        spec = importlib.util.find_spec("arguments")
        print(spec.origin, spec.loader.target)
        import sat, scail_win.rotary as r
        print(sat.__file__, sys.modules["sat.model.position_embedding.triton_rotary"] is r)
        """)
    environ = dict(os.environ, PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1")  # the checkout stays untouched
    environ.pop(hook.DISABLE_ENV, None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=environ, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    spec_line, sat_line = proc.stdout.strip().splitlines()[-2:]
    assert spec_line == f"{root / 'arguments.py'} scail_win.arguments"
    assert sat_line == f"{root / 'sat' / '__init__.py'} True"
