"""Which SCAIL commits and sat versions scail-win was tested with, and what a checkout is.

:func:`check_tree` looks at a SCAIL checkout: its git commit when it is a
clone, and always the content of the upstream files scail-win patches or
imports (hashed with line endings normalised, so a Windows checkout with
CRLF matches). ``doctor`` shows the result; the engine logs one warning for
an unknown or changed tree (:func:`warn_if_untested`) and carries on.
"""
from __future__ import annotations

import hashlib
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScailCommit:
    sha: str
    date: str
    subject: str
    tested: bool  # run end to end; the others hold the same code (TESTED_FILES)


#: zai-org/SCAIL commits whose code scail-win runs on, newest first. From
#: 62fcf6f on, every file of TESTED_FILES is identical; earlier commits have
#: another DiT module.
SCAIL_COMMITS = (
    ScailCommit("33122ea3095d893197cb53a4a8656147ed7d77d3", "2025-12-12", "add cases and acknowledgements, fix typo", True),
    ScailCommit("87ece2849321a12c5657d486ca4953d0ef6f0532", "2025-12-12", "reword info", False),
    ScailCommit("e9d6f6cdd4354731ad461f3b4af27b02691949f1", "2025-12-11", "official release", False),
    ScailCommit("2699cc42f036676ae3320327aa0aad256fe364ba", "2025-12-11", "update README.md", False),
    ScailCommit("37277320c1ea493b5b0c8edcecf0565d4a41f37b", "2025-12-11", "Update README.md", False),
    ScailCommit("7563a424cadefa19ddfd12c68bf223c213acf81c", "2025-12-11", "Update README.md", False),
    ScailCommit("5688bb321dbe48815eb551600a561297c2cdda63", "2025-12-09", "[fix] sample issues", False),
    ScailCommit("b80afda05e836ee5aef3ec4e1999711360601b5a", "2025-12-08", "official resolution", False),
    ScailCommit("8751423e53478192514b16ff88bd5cd111ea3855", "2025-12-08", "add news", False),
    ScailCommit("ec3d1e38e18dc0c3539221366fc96a396920345a", "2025-12-08", "add prompt optimization plan", False),
    ScailCommit("1d6db3492c84e3dc64df225323d416a5f07cbec0", "2025-12-08", "add hf model", False),
    ScailCommit("62fcf6f2222f3b21065b4056ae2129780133987e", "2025-12-05", "add citation and paper link", False),
)
TESTED_COMMIT = SCAIL_COMMITS[0]

#: sha256 (LF line endings) at TESTED_COMMIT of the upstream files scail-win
#: patches (patches.REGISTRY) or imports and builds from.
TESTED_FILES = {
    "dit_video_crossattn_sc_xc.py": "b0d115d40b495df56465d704f96965ed5ea7551f68610f13808aa921e68e7211",
    "sgm/util.py": "2fedd4cd709f999cc5701f4c11324a68b58700529e5b923290cdedfb7364a76a",
    "sgm/modules/encoders/umt5.py": "6c376d3952c37d906f36cf51ecfd0c39a95407f9c12ffd982865438d05f024cf",
    "sgm/modules/encoders/clip.py": "4c05838d86e72eca52fdb3ca8609f5e18ad6fe630162b9b360d42f0112c26d0c",
    "sgm/modules/diffusionmodules/wrappers.py": "5c89f8d057d4533395488c01c0b5a4d7ae1b111d85cc1718084cde21df24b513",
    "sgm/models/wan_vae.py": "8c5af4160a0db3d2514b6258cb876f75905c3a4497e7a57f642c1ef2a178be8b",
    "sat/__init__.py": "e314d36630d4b144e91d7d88294b3cb8a8d04454d42230458b98ff96d0f00643",
    "sat/model/base_model.py": "990569f766b742a4091f21ee88a6dd7c419711931de46212a2698dedea3ea0e6",
    "sat/model/mixins.py": "daf3ff683f79acbff714708385a1893174252d07256aa72f8f8eb1747da532c2",
    "sat/transformer_defaults.py": "fdd5d9e303a7656ed81121f529c07c3ae2195bf02ad6e908c84722604087589c",
}

#: sat versions scail-win runs on, and where each comes from.
SAT_VERSIONS = {
    "0.4.11": "vendored in SCAIL (tested)",
    "0.4.12": "PyPI SwissArmyTransformer (CI)",
}

_SAT_VERSION = re.compile(r"""^__version__\s*=\s*['"]([^'"]+)['"]""", re.M)


@dataclass(frozen=True)
class GitHead:
    sha: Optional[str]  # None on an unborn branch
    branch: Optional[str]  # None for a detached HEAD


def git_head(root: Path) -> Optional[GitHead]:
    """The checked-out commit of a git clone, read from .git without the git binary; None if not a clone."""
    git = root / ".git"
    try:
        if git.is_file():  # worktree or submodule: "gitdir: <path>"
            target = git.read_text(encoding="utf-8").strip().removeprefix("gitdir:").strip()
            git = (root / target).resolve()
        head = (git / "HEAD").read_text(encoding="utf-8").strip()
    except OSError:
        return None
    if not head.startswith("ref:"):
        return GitHead(head or None, None)
    ref = head[4:].strip()
    common = git
    if (git / "commondir").is_file():
        common = (git / (git / "commondir").read_text(encoding="utf-8").strip()).resolve()
    branch = ref.removeprefix("refs/heads/")
    for base in (git, common):
        with_ref = base / ref
        if with_ref.is_file():
            return GitHead(with_ref.read_text(encoding="utf-8").strip(), branch)
    packed = common / "packed-refs"
    if packed.is_file():
        for line in packed.read_text(encoding="utf-8").splitlines():
            sha, _, name = line.partition(" ")
            if name.strip() == ref:
                return GitHead(sha, branch)
    return GitHead(None, branch)


def file_sha256(path: Path) -> str:
    """sha256 of a text file with CRLF read as LF (git on Windows may check out either)."""
    return hashlib.sha256(path.read_bytes().replace(b"\r\n", b"\n")).hexdigest()


def vendored_sat_version(root: Path) -> Optional[str]:
    """``sat.__version__`` of the checkout's sat, read from its source; None without one."""
    try:
        match = _SAT_VERSION.search((root / "sat" / "__init__.py").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return None
    return match.group(1) if match else None


@dataclass(frozen=True)
class TreeCheck:
    known: bool
    commit: Optional[str]  # full sha when the tree is a git clone
    sat_version: Optional[str]
    differs: Tuple[str, ...]  # TESTED_FILES entries that are missing or changed

    @property
    def detail(self) -> str:
        if self.commit is None:
            where = "not a git clone"
        else:
            entry = next((c for c in SCAIL_COMMITS if c.sha == self.commit), None)
            where = (f"commit {self.commit[:12]}" + ("" if entry is None else
                                                     " (tested)" if entry.tested else " (same code as tested)"))
            if entry is None:
                where += " (not a commit scail-win knows)"
        sat = f"sat {self.sat_version or 'version unknown'}"
        if self.sat_version not in SAT_VERSIONS:
            sat += " (untested)"
        if self.differs:
            files = ", ".join(self.differs)
            return f"{where}, {sat}; differs from SCAIL {TESTED_COMMIT.sha[:12]} in {files}"
        return f"{where}, {sat}; the files scail-win patches or imports match SCAIL {TESTED_COMMIT.sha[:12]}"


def check_tree(root: Path) -> TreeCheck:
    """Whether ``root`` holds SCAIL code scail-win knows, and what differs if not."""
    root = Path(root)
    head = git_head(root)
    commit = head.sha if head is not None else None
    differs = []
    for name, digest in TESTED_FILES.items():
        try:
            if file_sha256(root / name) != digest:
                differs.append(name)
        except OSError:
            differs.append(f"{name} (missing)")
    sat_version = vendored_sat_version(root)
    commit_known = commit is None or any(c.sha == commit for c in SCAIL_COMMITS)
    return TreeCheck(commit_known and not differs and sat_version in SAT_VERSIONS,
                     commit, sat_version, tuple(differs))


def supported_summary() -> str:
    """One phrase: the SCAIL commits and sat versions scail-win supports."""
    sats = ", ".join(f"{v} ({where})" for v, where in SAT_VERSIONS.items())
    return (f"SCAIL {TESTED_COMMIT.sha[:12]} and the {len(SCAIL_COMMITS) - 1} commits before it with the "
            f"same code (back to {SCAIL_COMMITS[-1].sha[:7]}), sat {sats}")


def _running_sat_version() -> Optional[str]:
    sat = sys.modules.get("sat")
    version = getattr(sat, "__version__", None)
    if version is None:
        import importlib.metadata
        try:
            version = importlib.metadata.version("SwissArmyTransformer")
        except importlib.metadata.PackageNotFoundError:
            return None
    return version


def _running_scail_root() -> Optional[Path]:
    from .. import hook

    module = sys.modules.get("dit_video_crossattn_sc_xc")
    start = getattr(module, "__file__", None) or Path.cwd()
    return hook.find_scail_root(start)


def running_versions() -> str:
    """The SCAIL checkout, sat and torch this process runs, in one phrase."""
    root = _running_scail_root()
    if root is None:
        scail = "no SCAIL checkout found"
    else:
        head = git_head(root)
        scail = f"SCAIL at {root}" + (f", commit {head.sha[:12]}" if head is not None and head.sha else "")
    torch = sys.modules.get("torch")
    torch_version = f", torch {torch.__version__}" if torch is not None else ""
    return f"{scail}, sat {_running_sat_version() or 'not found'}{torch_version}"


_warned: set = set()


def warn_if_untested(dit_module) -> None:
    """One warning per checkout when the DiT's SCAIL tree or the running sat is not one scail-win knows."""
    from .. import hook

    file = getattr(dit_module, "__file__", None)
    root = hook.find_scail_root(file) if file else None
    sat_version = _running_sat_version()
    key = (root, sat_version)
    if key in _warned:
        return
    _warned.add(key)
    problems = []
    if root is not None:
        check = check_tree(root)
        if not check.known:
            problems.append(f"SCAIL checkout {root}: {check.detail}")
    if sat_version not in SAT_VERSIONS:
        problems.append(f"sat {sat_version or 'version unknown'} is untested")
    if problems:
        log.warning("%s; scail-win supports %s: expect failures or different results",
                    "; ".join(problems), supported_summary())
