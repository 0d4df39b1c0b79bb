"""The start-up import hook: SCAIL's code runs on scail-win's replacements.

``scail_win.pth`` installs it in every interpreter of the environment (through
:mod:`scail_win._startup`). It does three things:

* ``sat.model.position_embedding.triton_rotary`` is always
  :mod:`scail_win.rotary`, so ``import sat`` works without Triton, whether
  ``sat`` is SCAIL's vendored copy or PyPI's SwissArmyTransformer.
* ``arguments``, ``diffusion_video`` and ``sample_video`` become
  ``scail_win.arguments`` etc. when -- and only when -- the import system
  would load them from a SCAIL checkout (:func:`is_scail_tree`); a module of
  that name anywhere else is left alone.
* ``python sample_video.py ...`` (or ``python -m sample_video``) in a SCAIL
  checkout runs ``scail_win.sample_video.main`` instead of SCAIL's script.

An alias is the very module object of its target:
``sys.modules['arguments'] is sys.modules['scail_win.arguments']``, so both
names share state, and the module keeps the target's ``__spec__`` (reload,
pickle and multiprocessing see ``scail_win.arguments``). A module imported
before the hook was installed is never replaced -- half of a program would
hold the old object -- it is reported instead (a warning and :func:`status`).
``SCAIL_WIN_DISABLE=1`` (anything but empty or ``0``) turns all of it off.

This module is imported at every interpreter start-up: it uses the standard
library only and imports ``logging``, ``pathlib`` and ``importlib.machinery``
(about 10 ms each for the first two) only where they are used.
"""
from __future__ import annotations

import os
import sys

# typing costs ~9 ms at start-up; type checkers treat this name as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from importlib.machinery import ModuleSpec
    from pathlib import Path
    from types import FrameType, ModuleType

DISABLE_ENV = "SCAIL_WIN_DISABLE"
PTH_NAME = "scail_win.pth"

#: Redirected wherever ``sat`` comes from.
ALWAYS = {"sat.model.position_embedding.triton_rotary": "scail_win.rotary"}
#: Redirected only when found in a SCAIL checkout.
FROM_SCAIL_TREE = {
    "arguments": "scail_win.arguments",
    "diffusion_video": "scail_win.diffusion_video",
    "sample_video": "scail_win.sample_video",
}
#: The upstream script that runs as scail-win's, and the alias whose ``main`` replaces it.
SCRIPT = "sample_video.py"
SCRIPT_MODULE = "sample_video"

_SCAIL_MARKER = "dit_video_crossattn_sc_xc.py"

# What status() says about each redirected name.
NOT_IMPORTED = "not imported yet"
REDIRECTED = "redirected"
NOT_REDIRECTED = "not redirected: imported before the hook was installed"
LEFT_ALONE = "left alone: not from a SCAIL checkout"

_state: dict = {"script": None, "tracer": None}


def _log():
    # logging costs ~12 ms to import; this runs in every start-up, so it is
    # imported only when there is something to say.
    import logging
    return logging.getLogger(__name__)


def disabled_by_env() -> bool:
    """True when ``SCAIL_WIN_DISABLE`` is set to anything but empty or ``0``."""
    return os.environ.get(DISABLE_ENV, "") not in ("", "0")


def is_scail_tree(path: str | os.PathLike) -> bool:
    """True when ``path`` is a SCAIL checkout: the DiT file beside ``sat/`` and ``sgm/``."""
    folder = os.fspath(path)
    return (os.path.isfile(os.path.join(folder, _SCAIL_MARKER))
            and os.path.isdir(os.path.join(folder, "sat"))
            and os.path.isdir(os.path.join(folder, "sgm")))


def find_scail_root(start: str | os.PathLike) -> Path | None:
    """The SCAIL checkout holding ``start`` (a file or folder, searched upwards), or None."""
    from pathlib import Path

    here = Path(os.path.abspath(start))
    if not here.is_dir():
        here = here.parent
    for folder in (here, *here.parents):
        if is_scail_tree(folder):
            return folder
    return None


def _in_scail_tree(spec: ModuleSpec) -> bool:
    if not spec.has_location or not spec.origin:
        return False
    folder = os.path.dirname(spec.origin)
    if spec.submodule_search_locations is not None:
        folder = os.path.dirname(folder)  # a package: its parent holds it
    return is_scail_tree(folder)


def _file_in_scail_tree(filename: str | None) -> bool:
    return bool(filename) and is_scail_tree(os.path.dirname(os.path.abspath(filename)))


class _AliasLoader:
    """Loads a module name as another, already importable module: one object, two names."""

    def __init__(self, target: str, replaced: str | None) -> None:
        self.target = target
        self.replaced = replaced  # the file the import system would have loaded, if any
        self._target_spec = None

    def create_module(self, spec: ModuleSpec) -> ModuleType:
        import importlib

        module = importlib.import_module(self.target)
        self._target_spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # module_from_spec() has just pointed __spec__ at the alias's spec
        # (it overwrites that attribute unconditionally); give it back.
        module.__spec__ = self._target_spec

    def get_code(self, fullname: str):
        """For runpy: ``python -m sample_video`` runs ours like ``python sample_video.py``."""
        if fullname != SCRIPT_MODULE:
            return None  # runpy then says "No code object available"
        source = (f"import scail_win.hook\n"
                  f"scail_win.hook._run_instead({self.target!r}, {self.replaced or fullname!r})\n")
        return compile(source, f"<scail-win {self.target}>", "exec")


class ScailWinFinder:
    """``sys.meta_path`` finder that maps upstream names to scail-win modules.

    ``always`` and ``from_scail_tree`` map a module name to its replacement
    (defaults: :data:`ALWAYS`, :data:`FROM_SCAIL_TREE`).
    """

    def __init__(self, always: dict | None = None, from_scail_tree: dict | None = None) -> None:
        self.always = dict(ALWAYS if always is None else always)
        self.from_scail_tree = dict(FROM_SCAIL_TREE if from_scail_tree is None else from_scail_tree)

    def __repr__(self) -> str:
        return f"<ScailWinFinder always={self.always} from_scail_tree={self.from_scail_tree}>"

    def find_spec(self, fullname: str, path=None, target=None) -> ModuleSpec | None:
        if fullname in self.always:
            return _alias_spec(fullname, self.always[fullname], None)
        replacement = self.from_scail_tree.get(fullname)
        if replacement is None:
            return None
        found = _find_elsewhere(fullname, path, target)
        if found is None or not _in_scail_tree(found):
            return found  # what the import system would have used anyway
        return _alias_spec(fullname, replacement, found.origin)


def _alias_spec(name: str, target: str, replaced: str | None) -> ModuleSpec:
    from importlib.machinery import ModuleSpec

    return ModuleSpec(name, _AliasLoader(target, replaced), origin=replaced)


def _find_elsewhere(fullname: str, path, target) -> ModuleSpec | None:
    """The spec the rest of ``sys.meta_path`` gives for ``fullname``: where it would come from."""
    for finder in list(sys.meta_path):
        find_spec = getattr(finder, "find_spec", None)
        if isinstance(finder, ScailWinFinder) or find_spec is None:
            continue
        spec = find_spec(fullname, path, target)
        if spec is not None:
            return spec
    return None


def _run_instead(target: str, script: str) -> None:
    """Run ``target.main(sys.argv[1:])`` in place of SCAIL's ``script``; exit with its status."""
    import importlib

    _log().warning("scail-win: running %s instead of SCAIL's %s (set %s=1 to run SCAIL's own)",
                   target, script, DISABLE_ENV)
    module = importlib.import_module(target)
    main_module = sys.modules.get("__main__")
    if main_module is not None:
        # multiprocessing's spawn (the only start method on Windows) re-imports
        # __main__ in each child by its spec's name: make that ours, whose
        # main() is guarded, instead of SCAIL's script.
        main_module.__spec__ = module.__spec__
    raise SystemExit(module.main(sys.argv[1:]))


def install() -> ScailWinFinder:
    """Put the finder first on ``sys.meta_path``; idempotent. Returns the installed finder.

    Modules of the redirected names imported earlier stay as they are and are
    reported with a warning.
    """
    for finder in sys.meta_path:
        if isinstance(finder, ScailWinFinder):
            return finder
    finder = ScailWinFinder()
    sys.meta_path.insert(0, finder)
    for entry in _redirects():
        if entry["state"] == NOT_REDIRECTED:
            _log().warning("scail-win: %s was imported from %s before the import hook was installed; "
                           "it is not redirected to %s", entry["name"], entry["origin"], entry["target"])
    return finder


def uninstall() -> None:
    """Remove the finder and a pending script redirect.

    Modules already imported through the hook stay in ``sys.modules`` (rolling
    them back would leave other modules holding the removed objects).
    """
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, ScailWinFinder)]
    if _state["tracer"] is not None and sys.gettrace() is _state["tracer"]:
        sys.settrace(None)
    _state.update(script=None, tracer=None)


def redirect_script(argv: list[str]) -> str | None:
    """Make SCAIL's ``sample_video.py``, if ``argv[0]`` names it, run as scail-win's.

    Called at start-up, before the interpreter opens the script: a trace
    function waits for the first frame of ``__main__`` and, if it is that
    file, runs ``scail_win.sample_video.main(sys.argv[1:])`` instead and exits
    with its status. Returns the script's absolute path when armed, else None.
    """
    if _state["script"] is not None:
        return _state["script"]
    if not argv or os.path.normcase(os.path.basename(argv[0])) != os.path.normcase(SCRIPT):
        return None
    script = os.path.abspath(argv[0])
    if not is_scail_tree(os.path.dirname(script)):
        return None
    if sys.gettrace() is not None:
        _log().warning("scail-win: a debugger or tracer is active, so SCAIL's %s runs as it is; "
                       "use 'python -m scail_win sample' to run scail-win's", script)
        return None
    key = os.path.normcase(script)
    target = FROM_SCAIL_TREE[SCRIPT_MODULE]

    def tracer(frame: FrameType, event: str, arg) -> None:
        # Only 'call' events reach a global trace function, and returning
        # None keeps every other frame untraced.
        if (event != "call" or frame.f_code.co_name != "<module>"
                or frame.f_globals.get("__name__") != "__main__"):
            return None
        sys.settrace(None)
        _state.update(script=None, tracer=None)
        if os.path.normcase(os.path.abspath(frame.f_code.co_filename)) == key:
            # Tracing is off inside this callback and no import lock is held.
            _run_instead(target, script)
        return None

    _state.update(script=script, tracer=tracer)
    sys.settrace(tracer)
    return script


def _redirects() -> list[dict]:
    rows = []
    for name, target, always in ([(n, t, True) for n, t in ALWAYS.items()]
                                 + [(n, t, False) for n, t in FROM_SCAIL_TREE.items()]):
        module = sys.modules.get(name)
        origin = getattr(module, "__file__", None)
        if module is None:
            state = NOT_IMPORTED
        elif module is sys.modules.get(target):
            state, origin = REDIRECTED, None
        elif always or _file_in_scail_tree(origin):
            state = NOT_REDIRECTED
        else:
            state = LEFT_ALONE
        rows.append({"name": name, "target": target,
                     "when": "always" if always else "from a SCAIL checkout",
                     "state": state, "origin": origin})
    return rows


def _find_pth() -> str | None:
    import site

    folders = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        folders.append(site.getusersitepackages())
    for folder in folders:
        candidate = os.path.join(folder, PTH_NAME)
        if os.path.isfile(candidate):
            return candidate
    return None


def status(start: str | os.PathLike | None = None) -> dict:
    """The hook's state in this process, as plain data (JSON-serialisable).

    Keys: ``active`` (finder on ``sys.meta_path``), ``disabled_by_env``,
    ``pth`` (the installed ``scail_win.pth`` or None), ``scail_root`` (the
    checkout holding ``start``, default the current directory, or None),
    ``script`` (SCAIL script waiting to run as ours, or None) and
    ``redirects`` (name, target, when, state, origin for each name).
    """
    root = find_scail_root(os.getcwd() if start is None else start)
    return {
        "active": any(isinstance(f, ScailWinFinder) for f in sys.meta_path),
        "disabled_by_env": disabled_by_env(),
        "pth": _find_pth(),
        "scail_root": None if root is None else str(root),
        "script": _state["script"],
        "redirects": _redirects(),
    }


def format_status(info: dict | None = None) -> str:
    """Human-readable form of :func:`status` (computed now when not given)."""
    info = status() if info is None else info
    if info["active"]:
        head = "scail-win import hook: active"
    elif info["disabled_by_env"]:
        head = f"scail-win import hook: off ({DISABLE_ENV} is set)"
    elif info["pth"] is None:
        head = (f"scail-win import hook: off ({PTH_NAME} is not in site-packages: install scail-win "
                f"with pip, 'pip install -e .' in a source checkout)")
    else:
        head = (f"scail-win import hook: off ({PTH_NAME} is installed but did not run: "
                f"Python started with -S, or it failed at start-up)")
    lines = [head, f"  start-up file: {info['pth'] or 'not installed'}"]
    lines.append(f"  SCAIL checkout: {info['scail_root'] or 'none found (not inside one)'}")
    if info["script"]:
        lines.append(f"  running scail-win's sample_video instead of {info['script']}")
    lines.append("redirects:")
    for row in info["redirects"]:
        where = f" ({row['origin']})" if row["origin"] else ""
        lines.append(f"  {row['name']} -> {row['target']}  [{row['when']}] {row['state']}{where}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``scail-win hook``: print :func:`format_status`; exit 0 when the hook is active, else 1."""
    import argparse
    import json

    parser = argparse.ArgumentParser(
        prog="scail-win hook",
        description="Show whether the start-up import hook is active and what it redirects. "
                    "Exit status 0 when active, 1 when not.")
    parser.add_argument("path", nargs="?", default=None,
                        help="a folder or file inside a SCAIL checkout to look for "
                             "(default: the current directory)")
    parser.add_argument("--json", action="store_true", help="print the status as JSON")
    opts = parser.parse_args(argv)
    info = status(opts.path)
    print(json.dumps(info, indent=2) if opts.json else format_status(info))
    return 0 if info["active"] else 1
