"""`python -m scail_win doctor`: can this machine run SCAIL with scail-win?

One line per check, OK / WARN / FAIL with the fix in a few words; exit
status 1 when anything FAILs.  ``--json`` prints the same as JSON.  The
weights checks are the loader's own (:func:`scail_win.weights.checkpoint.verify_weights_dir`).
Nothing here needs a GPU, deepspeed, triton or psutil; missing pieces are
reported, never raised.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from scail_win.placement import host_memory
from scail_win.hook import find_scail_root as find_scail_root_from, is_scail_tree
from scail_win.upstream import patches, versions
from scail_win.upstream.versions import git_head
from scail_win.weights.checkpoint import detect_layout, human_bytes, verify_weights_dir

GIB = 2**30
MIN_TORCH = (2, 1)
MIN_VRAM_GIB = 8  # the smallest card scail-win targets
MIN_RAM_GIB = 16  # the weights issue's low-RAM target machine
DISK_FAIL_GIB, DISK_WARN_GIB = 1, 5
OPTIONAL = ("triton", "deepspeed", "decord", "flash_attn")
TORCH_INSTALL = "install CUDA torch from https://pytorch.org/get-started/locally/ (pip --index-url ...whl/cu128)"
EXAMPLE_VIDEO = Path("examples") / "001" / "rendered.mp4"


@dataclass
class Check:
    name: str
    status: str  # "OK" | "WARN" | "FAIL"
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.status:<4}  {self.name:<12} {self.detail}"
        return f"{text} -- fix: {self.fix}" if self.fix and self.status != "OK" else text


# --------------------------------------------------------------------------
# platform facts


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def git_commit(root: Path) -> str | None:
    """'<sha12> (<branch>)' of a git clone, read from .git without the git binary."""
    head = git_head(root)
    if head is None:
        return None
    if head.sha is None:
        return f"unborn branch {head.branch}"
    return f"{head.sha[:12]} ({head.branch})" if head.branch else head.sha[:12]


# --------------------------------------------------------------------------
# the checks


def check_python() -> Check:
    v = sys.version_info
    text = f"{platform.python_version()} ({sys.executable})"
    if v < (3, 10):
        return Check("python", "FAIL", text, "install Python 3.10, 3.11 or 3.12")
    if v >= (3, 13):
        return Check("python", "WARN", f"{text}: untested, SCAIL's pinned packages support 3.10-3.12",
                     "use Python 3.10-3.12")
    return Check("python", "OK", text)


def check_torch() -> tuple[list[Check], object]:
    try:
        import torch
    except (ImportError, OSError) as e:  # OSError: a DLL that fails to load on Windows
        return [Check("torch", "FAIL", f"not importable ({e})", TORCH_INSTALL)], None
    checks = []
    if _version_tuple(torch.__version__) < MIN_TORCH:
        checks.append(Check("torch", "FAIL", f"{torch.__version__}: scail-win needs >= 2.1", TORCH_INSTALL))
    else:
        checks.append(Check("torch", "OK", torch.__version__))
    cuda = torch.version.cuda
    if cuda is None:
        checks.append(Check("cuda", "WARN", "this torch build has no CUDA: sampling falls back to the CPU, "
                            "impractically slow for the 14B model", TORCH_INSTALL))
    elif not torch.cuda.is_available():
        checks.append(Check("cuda", "WARN", f"torch built for CUDA {cuda}, but no usable GPU or driver",
                            "install or update the NVIDIA driver"))
    else:
        checks.append(Check("cuda", "OK", f"CUDA {cuda}, driver OK"))
    return checks, torch


def check_gpus(torch) -> list[Check]:
    if torch is None or not torch.cuda.is_available():
        return [Check("gpu", "WARN", "no CUDA GPU found", "scail-win needs an NVIDIA GPU with >= 8 GB")]
    checks = []
    for i in range(torch.cuda.device_count()):
        name = torch.cuda.get_device_name(i)
        try:
            free, total = torch.cuda.mem_get_info(i)
        except RuntimeError as e:
            checks.append(Check(f"gpu{i}", "WARN", f"{name}: cannot query memory ({e})", "check the driver"))
            continue
        text = f"{name}, {total / GIB:.1f} GiB VRAM, {free / GIB:.1f} GiB free"
        if total < MIN_VRAM_GIB * GIB * 0.95:
            checks.append(Check(f"gpu{i}", "WARN", f"{text}: below the {MIN_VRAM_GIB} GB scail-win targets",
                                "try a lower resolution and --vram-budget"))
        else:
            checks.append(Check(f"gpu{i}", "OK", text))
    return checks


def check_memory() -> list[Check]:
    mem = host_memory.memory_info()
    if mem is None:
        return [Check("ram", "WARN", "cannot read the memory size on this system", "")]
    total = mem["ram_total"]
    text = f"{total / GIB:.1f} GiB total"
    if "ram_available" in mem:
        text += f", {mem['ram_available'] / GIB:.1f} GiB available"
    checks = [Check("ram", "OK", text) if total >= MIN_RAM_GIB * GIB * 0.95 else
              Check("ram", "WARN", f"{text}: below {MIN_RAM_GIB} GB",
                    "convert the weights with --dtype fp8_e4m3fn and use a low --ram-budget")]
    if "swap_total" in mem:
        label = "page file" if sys.platform == "win32" else "swap"
        detail = f"{label} {mem['swap_total'] / GIB:.1f} GiB, {mem['swap_free'] / GIB:.1f} GiB free"
        checks.append(Check("swap", "OK", detail))
    return checks


# What an optional package changes when present (Triton) or absent.
_TRITON_USE = "the rotary and DiT layer-norm kernels on CUDA"


def check_optional() -> list[Check]:
    checks = []
    for name in OPTIONAL:
        # find_spec only: importing deepspeed or triton can take seconds or crash.
        if importlib.util.find_spec(name) is None:
            if name == "triton":
                checks.append(Check(name, "OK", f"not installed: {_TRITON_USE} run on PyTorch, slower "
                                                "(on an H200 the PyTorch layer norms alone add 10% to a step)"))
            else:
                checks.append(Check(name, "OK", "not installed (not needed)"))
            continue
        try:
            version = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            version = "version unknown"
        use = f"used for {_TRITON_USE}" if name == "triton" else "scail-win does not need it"
        checks.append(Check(name, "OK", f"installed ({version}); {use}"))
    return checks


def check_attention() -> Check:
    """Which ``--attention`` kernels import here (the GPU probe runs with the first sample)."""
    try:
        from scail_win.model.kernels import attention
        found = attention.available_backends()
    except Exception as e:  # a broken kernel package must not break the doctor
        return Check("attention", "WARN", f"cannot check the attention kernels ({e.__class__.__name__}: {e})",
                     "reinstall scail-win")
    usable = [name for name, state in found.items() if state == "available"]
    missing = "; ".join(f"{attention.PACKAGES[name][0]} {state}" for name, state in found.items()
                        if state != "available")
    detail = f"--attention auto can use {', '.join(usable)}" + (f" ({missing})" if missing else "")
    return Check("attention", "OK", detail)


def check_hook() -> Check:
    """The startup hook's state as scail_win.hook.status() reports it."""
    try:
        hook = importlib.import_module("scail_win.hook")
        status = hook.status()
        head = hook.format_status(status).splitlines()[0] if callable(getattr(hook, "format_status", None)) else ""
    except ImportError as e:
        return Check("hook", "WARN", f"scail_win.hook unavailable ({e})", "reinstall scail-win")
    except Exception as e:  # a broken hook must not break the doctor
        return Check("hook", "WARN", f"hook status failed: {e.__class__.__name__}: {e}", "reinstall scail-win")
    rows = status.get("redirects") or []
    listing = ", ".join(f"{r.get('name')} -> {r.get('target')} ({r.get('state')})" for r in rows) or "nothing"
    if not status.get("active"):
        reason = head.partition(": ")[2] or "not installed in this Python"
        return Check("hook", "WARN", f"inactive: {reason}",
                     "unset SCAIL_WIN_DISABLE, or `pip install scail-win` in this environment")
    early = [r.get("name") for r in rows if str(r.get("state", "")).startswith("not redirected")]
    if early:
        return Check("hook", "WARN", f"active, but imported before the hook: {', '.join(early)}; {listing}",
                     "do not start Python with -S; import nothing from SCAIL before scail-win")
    return Check("hook", "OK", f"active; {listing}")


def find_scail_root(explicit: str | None) -> tuple[Path | None, str]:
    """The SCAIL checkout to use and where it came from."""
    if explicit:
        return Path(explicit), "--scail"
    if os.environ.get("SCAIL_ROOT"):
        return Path(os.environ["SCAIL_ROOT"]), "SCAIL_ROOT"
    here = Path.cwd()
    found = find_scail_root_from(here)
    if found is None:
        return None, ""
    return found, "current folder" if found == here else "search from the current folder"


def check_scail(explicit: str | None) -> tuple[Check, Path | None]:
    root, origin = find_scail_root(explicit)
    if root is None:
        return Check("scail", "WARN", "no SCAIL checkout in the current folder, --scail or SCAIL_ROOT",
                     "run inside the SCAIL checkout or pass --scail DIR"), None
    if not is_scail_tree(root):
        return Check("scail", "FAIL", f"{root} ({origin}) is not a SCAIL checkout "
                     "(no dit_video_crossattn_sc_xc.py beside sat/ and sgm/)",
                     "git clone https://github.com/zai-org/SCAIL and pass its folder"), None
    commit = git_commit(root)
    detail = f"{root} ({origin})" + (f", git {commit}" if commit else ", not a git clone")
    return Check("scail", "OK", detail), root


def check_scail_version(root: Path | None) -> list[Check]:
    """Whether the checkout is SCAIL code scail-win was tested with (a warning otherwise: it may still run)."""
    if root is None:
        return []
    tree = versions.check_tree(root)
    if tree.known:
        return [Check("scail-code", "OK", tree.detail)]
    return [Check("scail-code", "WARN", f"{tree.detail}: untested",
                  f"check out SCAIL {versions.TESTED_COMMIT.sha[:12]} (git checkout {versions.TESTED_COMMIT.sha[:7]})")]


def check_patches(root: Path | None) -> Check:
    """Every patch scail-win applies to SCAIL and torch finds its target (SCAIL's read from ``root``)."""
    found = {name: problem for name, problem in patches.check_targets(root).items()
             if root is not None or not patches.REGISTRY[name].in_scail_tree}
    missing = {name: problem for name, problem in found.items() if problem}
    names = ", ".join(found)
    if missing:
        listing = "; ".join(f"{name}: {problem}" for name, problem in missing.items())
        return Check("patches", "FAIL", f"{len(missing)} of {len(found)} patch targets missing: {listing}",
                     f"use SCAIL {versions.TESTED_COMMIT.sha[:12]} and a torch scail-win supports")
    unchecked = "" if root is not None else " (SCAIL's not checked: no checkout)"
    return Check("patches", "OK", f"{len(found)} targets present{unchecked}: {names}")


def find_weights(explicit: str | None, scail_root: Path | None) -> tuple[Path | None, str]:
    """The weights folder to check and where it came from.

    ``--weights``, else ``$SCAIL_WEIGHTS``, else ``./SCAIL-Preview`` -- the
    order ``scail-win sample`` uses (:func:`scail_win.arguments.resolve_weights_dir`)
    -- and, when none of those exists, ``SCAIL-Preview`` beside the checkout.
    """
    from scail_win.arguments import DEFAULT_WEIGHTS_DIR, WEIGHTS_ENV, resolve_weights_dir

    if explicit:
        return resolve_weights_dir(explicit), "--weights"
    if os.environ.get(WEIGHTS_ENV):
        return resolve_weights_dir(), WEIGHTS_ENV
    default = resolve_weights_dir()
    if default.is_dir():
        return default, "current folder"
    if scail_root is not None and (scail_root / DEFAULT_WEIGHTS_DIR).is_dir():
        return Path(os.path.abspath(scail_root / DEFAULT_WEIGHTS_DIR)), "beside the SCAIL checkout"
    return None, ""


def check_weights(explicit: str | None, scail_root: Path | None) -> list[Check]:
    from scail_win.arguments import WEIGHTS_ENV, resolve_weights_dir

    root, origin = find_weights(explicit, scail_root)
    if root is None:
        return [Check("weights", "FAIL", f"no weights folder: not given by --weights or {WEIGHTS_ENV}, "
                      f"and no SCAIL-Preview in the current folder or beside the checkout",
                      "pass --weights DIR")]
    checks = []
    if origin == "beside the SCAIL checkout":
        # sample resolves the folder the same way minus this last fallback.
        checks.append(Check("weights", "WARN", f"{root} found beside the SCAIL checkout, but `scail-win sample` "
                            f"run from here looks in {resolve_weights_dir()}",
                            f"pass --weights \"{root}\" or set {WEIGHTS_ENV}"))
    kind = detect_layout(root)
    if kind:
        checks.append(Check("weights", "OK", f"{root} ({origin}): {kind} layout"))
    return checks + [Check("weights", fc.status, fc.message, fc.fix) for fc in verify_weights_dir(root)]


def _encode_h264(path: Path, frames: int = 8, size: int = 64) -> None:
    import av
    import numpy as np

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264" if "libx264" in av.codecs_available else "h264", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            img = np.full((size, size, 3), i * 20, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _decode(path: Path, limit: int = 8) -> tuple[int, int, int]:
    import av

    with av.open(str(path)) as f:
        n = 0
        for frame in f.decode(video=0):
            width, height = frame.width, frame.height
            n += 1
            if n >= limit:
                break
    if n == 0:
        raise ValueError("no video frames")
    return n, width, height


def check_video(scail_root: Path | None) -> list[Check]:
    try:
        import av
    except ImportError as e:
        return [Check("video", "FAIL", f"PyAV not importable ({e})", "pip install av")]
    checks = []
    with tempfile.TemporaryDirectory(prefix="scail_win_doctor_") as tmp:
        clip = Path(tmp) / "h264 test.mp4"
        try:
            _encode_h264(clip)
            _decode(clip)
            checks.append(Check("h264", "OK", f"PyAV {av.__version__} encodes and decodes H.264"))
        except Exception as e:  # any codec failure is the finding itself
            checks.append(Check("h264", "FAIL", f"PyAV {av.__version__} cannot encode H.264 ({e})",
                                "pip install --force-reinstall av (its wheels ship FFmpeg with libx264)"))
        example = scail_root / EXAMPLE_VIDEO if scail_root else None
        if example is not None and example.is_file():
            try:
                n, w, h = _decode(example)
                checks.append(Check("decode", "OK", f"{example}: {w}x{h}, decoded {n} frames"))
            except Exception as e:  # a broken file or codec is the finding
                checks.append(Check("decode", "FAIL", f"{example}: cannot decode ({e})",
                                    "restore the example (git checkout) or reinstall av"))
    return checks


def check_disk(output: Path) -> Check:
    probe = output
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError as e:
        return Check("disk", "WARN", f"{output}: cannot read free space ({e.strerror})", "")
    text = f"{output}: {human_bytes(free)} free"
    if free < DISK_FAIL_GIB * GIB:
        return Check("disk", "FAIL", text, "free disk space or pass another output folder")
    if free < DISK_WARN_GIB * GIB:
        return Check("disk", "WARN", text, "resume checkpoints and videos need a few GB")
    return Check("disk", "OK", text)


def run_checks(weights: str | None = None, scail: str | None = None, output: str = "samples") -> list[Check]:
    checks = [check_python()]
    torch_checks, torch = check_torch()
    checks += torch_checks
    checks += check_gpus(torch)
    checks += check_memory()
    checks += check_optional()
    checks.append(check_attention())
    checks.append(check_hook())
    scail_check, scail_root = check_scail(scail)
    checks.append(scail_check)
    checks += check_scail_version(scail_root)
    checks.append(check_patches(scail_root))
    checks += check_weights(weights, scail_root)
    checks += check_video(scail_root)
    checks.append(check_disk(Path(output)))
    return checks


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scail-win doctor",
                                description="Check this machine, the SCAIL checkout and the weights for scail-win.")
    p.add_argument("--weights", help="the weights folder (SCAIL-Preview, or one made by convert); default: "
                                     "the SCAIL_WEIGHTS environment variable, else ./SCAIL-Preview, else "
                                     "SCAIL-Preview beside the checkout")
    p.add_argument("--scail", help="the SCAIL checkout (default: SCAIL_ROOT, or the current folder)")
    p.add_argument("--output", default="samples", help="where videos will be written (free space check)")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        # Paths may hold letters the console's code page lacks; never crash on them.
        sys.stdout.reconfigure(errors="replace")
    checks = run_checks(args.weights, args.scail, args.output)
    counts = {s: sum(c.status == s for c in checks) for s in ("OK", "WARN", "FAIL")}
    if args.json:
        print(json.dumps({"ok": counts["FAIL"] == 0, "counts": counts, "checks": [asdict(c) for c in checks]},
                         indent=1, ensure_ascii=False))
    else:
        for c in checks:
            print(c.line())
        print(f"{len(checks)} checks: {counts['OK']} OK, {counts['WARN']} WARN, {counts['FAIL']} FAIL")
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
