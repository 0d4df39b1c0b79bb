"""`python -m scail_win convert SRC DST`: a SCAIL-Preview folder to safetensors.

Streams tensor by tensor: the source is memory-mapped a window at a time
(``--window-mb``) and re-mapped for the next window, so resident memory stays
near one window plus the largest tensor, never the whole checkpoint.  Each
output is written under ``<name>.partial`` and renamed when complete; the
manifest records finished files, so running the same command again resumes
where it stopped and skips what is done.

Pickles are read with ``weights_only=True`` and a small allowlist;
``--trust-pickle`` lifts that for a checkpoint whose origin you trust (a
pickle can run arbitrary code while it loads).  Only convert offers it: the
converted folder is then safe to load anywhere.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from scail_win import __version__
from scail_win.errors import UserError
from scail_win.weights.checkpoint import (
    CONVERTED_FILES,
    FORMAT_NAME,
    FORMAT_VERSION,
    FP8_SCALE_SUFFIX,
    MANIFEST_NAME,
    PAD_TENSOR,
    TOKENIZER_DIR,
    TOKENIZER_FILES,
    SafetensorsWriter,
    check_file,
    find_weights,
    human_bytes,
    is_fp8_candidate,
    open_state_dict,
    quantize_fp8,
    read_manifest,
    verify_weights_dir,
)

log = logging.getLogger(__name__)

DTYPES = ("bf16", "fp8_e4m3fn")
DEFAULT_WINDOW_MB = 256


@dataclass
class _Job:
    component: str  # "dit", "t5", "clip", "vae" or "tokenizer"
    src: Path
    out: str  # path relative to DST, '/'-separated
    options: dict
    entries: list = field(default_factory=list)  # (name, dtype, shape) written in order
    tail: list = field(default_factory=list)  # fp8 scales, written last
    casts: dict = field(default_factory=dict)  # name -> dtype to cast to, or "fp8"
    src_bytes: dict = field(default_factory=dict)  # name -> bytes read from the source
    out_bytes: int = 0


def _source_stamp(path: Path) -> dict:
    st = path.stat()
    return {"source_size": st.st_size, "source_mtime_ns": st.st_mtime_ns}


def _write_manifest(dst: Path, manifest: dict) -> None:
    tmp = dst / (MANIFEST_NAME + ".partial")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, dst / MANIFEST_NAME)


def _claim_dst(src: Path, dst: Path) -> dict | None:
    """The existing manifest of DST, None for a new or empty folder; refuse anything else."""
    if dst.exists() and not dst.is_dir():
        raise UserError(f"{dst} is a file; give a folder for the converted weights")
    if dst.exists() and dst.resolve() == src.resolve():
        raise UserError(f"{dst}: the destination must be another folder than the source")
    if not dst.exists():
        return None
    if (dst / MANIFEST_NAME).is_file():
        return read_manifest(dst)
    others = sorted(p.name for p in dst.iterdir())
    if others:
        raise UserError(f"{dst} already holds other files ({', '.join(others[:3])}{'...' if len(others) > 3 else ''}); "
                        "convert writes into a new or empty folder, or into one it made before")
    return None


def _plan_tensors(job: _Job, dtype: str, trust_pickle: bool) -> None:
    import torch

    fp8 = job.component == "dit" and dtype == "fp8_e4m3fn"
    with open_state_dict(job.src, trust_pickle=trust_pickle) as source:
        names = list(source)
        infos = {n: source.info(n) for n in names}
    for name in names:
        info = infos[name]
        job.src_bytes[name] = info.nbytes
        floating = info.dtype.is_floating_point
        if fp8 and floating and is_fp8_candidate(name, info.shape):
            scale_name = name + FP8_SCALE_SUFFIX
            if scale_name in infos or scale_name == PAD_TENSOR:
                raise UserError(f"{job.src}: tensor {scale_name!r} clashes with the fp8 scale name; "
                                "convert with --dtype bf16")
            job.entries.append((name, torch.float8_e4m3fn, info.shape))
            job.tail.append((scale_name, torch.float32, (info.shape[0],)))
            job.casts[name] = "fp8"
        elif job.component == "dit" and floating:
            # Upstream casts the whole engine to bf16 before loading the DiT.
            job.entries.append((name, torch.bfloat16, info.shape))
            job.casts[name] = torch.bfloat16
        else:
            job.entries.append((name, info.dtype, info.shape))


def _windows(names: list[str], sizes: dict[str, int], window: int) -> list[list[str]]:
    out, cur, used = [], [], 0
    for name in names:
        if cur and used + sizes[name] > window:
            out.append(cur)
            cur, used = [], 0
        cur.append(name)
        used += sizes[name]
    if cur:
        out.append(cur)
    return out


def _convert_tensors(job: _Job, dst: Path, trust_pickle: bool, window: int, progress: bool) -> dict:
    from safetensors import safe_open
    from tqdm import tqdm

    out_path = dst / job.out
    metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "component": job.component,
                "fp8_scale_suffix": FP8_SCALE_SUFFIX}
    writer = SafetensorsWriter(out_path, job.entries, tail=job.tail, metadata=metadata)
    scales = {}
    with writer, tqdm(total=writer.data_bytes, unit="B", unit_scale=True, desc=job.out,
                      disable=None if progress else True) as bar:
        body = [n for n in writer.pending if n in job.src_bytes]
        source = None
        try:
            for group in _windows(body, job.src_bytes, window):
                # A fresh mapping per window: pages read through the previous
                # one leave this process with its tensors.  A file that could
                # not be mapped is already all in RAM: keep that one copy.
                if source is None or source.mapped:
                    if source is not None:
                        source.close()
                    source = open_state_dict(job.src, trust_pickle=trust_pickle)
                for name in group:
                    tensor = source.raw(name)[0]
                    cast = job.casts.get(name)
                    if cast == "fp8":
                        q, scales[name + FP8_SCALE_SUFFIX] = quantize_fp8(tensor)
                        writer.write(name, q)
                        bar.update(q.numel())
                        del q
                    else:
                        out = tensor.to(cast) if cast is not None else tensor
                        writer.write(name, out)
                        bar.update(out.numel() * out.element_size())
                        del out
                    del tensor
        finally:
            if source is not None:
                source.close()
        for name in writer.pending:
            scale = scales.pop(name)
            writer.write(name, scale)
            bar.update(scale.numel() * scale.element_size())
        writer.commit()
    # Read the header back with the safetensors library itself.
    with safe_open(str(out_path), framework="pt") as f:
        stored = len(list(f.keys()))
    expected = len(job.entries) + len(job.tail) + (1 if PAD_TENSOR in writer.order else 0)
    if stored != expected:
        raise UserError(f"{out_path}: read back {stored} tensors, wrote {expected}; disk problem? convert again")
    dtypes: dict[str, int] = {}
    for _, dt, _ in job.entries + job.tail:
        key = str(dt).replace("torch.", "")
        dtypes[key] = dtypes.get(key, 0) + 1
    return {"kind": "safetensors", "component": job.component, "size": out_path.stat().st_size,
            "tensors": len(job.entries), "fp8_tensors": len(job.tail), "dtypes": dtypes}


def _copy_file(job: _Job, dst: Path) -> dict:
    out = dst / job.out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    try:
        shutil.copyfile(job.src, partial)
        os.replace(partial, out)
    finally:
        if partial.exists():
            partial.unlink()
    return {"kind": "copy", "component": job.component, "size": out.stat().st_size}


def _is_done(job: _Job, dst: Path, manifest: dict) -> bool:
    entry = manifest.get("files", {}).get(job.out)
    path = dst / job.out
    if not entry or not path.is_file() or path.stat().st_size != entry.get("size"):
        return False
    if any(entry.get(k) != v for k, v in _source_stamp(job.src).items()) or entry.get("options") != job.options:
        return False
    if entry.get("kind") == "safetensors":
        return check_file(path, "safetensors", expected_size=entry["size"]) is None
    return True


def convert_checkpoint(src_file: str | os.PathLike, dst_file: str | os.PathLike, *, component: str = "dit",
                       dtype: str = "bf16", trust_pickle: bool = False, window_mb: int = DEFAULT_WINDOW_MB,
                       progress: bool = True) -> dict:
    """Convert one .pt/.pth file into one safetensors file, streamed; returns its manifest entry.

    ``component="dit"`` applies ``dtype`` (bf16 cast, or fp8 for per-layer
    Linear weights); any other component keeps every tensor's dtype.
    """
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    dst_file = Path(dst_file)
    job = _Job(component, Path(src_file), dst_file.name, {"dtype": dtype} if component == "dit" else {})
    _plan_tensors(job, dtype, trust_pickle)
    return _convert_tensors(job, dst_file.parent, trust_pickle, window_mb * 2**20, progress)


def convert_folder(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str = "bf16",
                   trust_pickle: bool = False, window_mb: int = DEFAULT_WINDOW_MB,
                   progress: bool = True) -> Path:
    """Convert the SCAIL-Preview folder SRC into DST; returns DST's manifest path.

    UserError for anything the user must fix (a bad source file, a DST that
    holds other files, too little disk space, an unsafe pickle).
    """
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if window_mb < 1:
        raise UserError(f"--window-mb {window_mb}: must be at least 1")
    src, dst = Path(src), Path(dst)
    layout = find_weights(src)
    if layout.kind != "original":
        raise UserError(f"{src} is already a converted folder; pass the SCAIL-Preview download as SRC")
    checks = verify_weights_dir(src)
    for c in checks:
        if c.status == "WARN":
            log.warning("%s", c.line())
    fails = [c for c in checks if c.status == "FAIL"]
    for c in fails:
        log.error("%s", c.line())
    if fails:
        raise UserError(f"{len(fails)} source file(s) in {src} failed their checks (listed above); "
                        f"first: {fails[0].message} -- fix: {fails[0].fix}")
    old_manifest = _claim_dst(src, dst)

    jobs = [
        _Job("dit", layout.dit, CONVERTED_FILES["dit"], {"dtype": dtype}),
        _Job("t5", layout.t5, CONVERTED_FILES["t5"], {}),
        _Job("clip", layout.clip, CONVERTED_FILES["clip"], {}),
        _Job("vae", layout.vae, CONVERTED_FILES["vae"], {}),
    ]
    jobs += [_Job("tokenizer", layout.tokenizer_dir / name, f"{TOKENIZER_DIR}/{name}", {})
             for name in TOKENIZER_FILES if (layout.tokenizer_dir / name).is_file()]
    manifest = old_manifest or {"files": {}}
    todo = [j for j in jobs if not _is_done(j, dst, manifest)]
    for job in jobs:
        if job not in todo:
            log.info("%s: already converted, kept", job.out)
    for job in todo:
        if job.component == "tokenizer":
            job.out_bytes = job.src.stat().st_size
        else:
            _plan_tensors(job, dtype, trust_pickle)
            job.out_bytes = sum(math.prod(shape) * dt.itemsize for _, dt, shape in job.entries + job.tail)
    dst.mkdir(parents=True, exist_ok=True)
    need = sum(j.out_bytes for j in todo)
    free = shutil.disk_usage(dst).free
    if need > free:
        raise UserError(f"{dst}: the conversion needs {human_bytes(need)} free, the disk has {human_bytes(free)}; "
                        "free space or choose a folder on another disk")

    manifest.update({
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "scail_win_version": __version__,
        "source_dir": str(src.resolve()), "source_iteration": layout.iteration, "dit_dtype": dtype,
        "complete": False,
    })
    # Outputs of an earlier run that are about to be redone stop counting as done.
    for job in todo:
        manifest["files"].pop(job.out, None)
    _write_manifest(dst, manifest)
    window = window_mb * 2**20
    for job in todo:
        log.info("%s -> %s (%s)", job.src, dst / job.out, human_bytes(job.out_bytes))
        if job.component == "tokenizer":
            entry = _copy_file(job, dst)
        else:
            entry = _convert_tensors(job, dst, trust_pickle, window, progress)
        entry.update(_source_stamp(job.src), source=job.src.relative_to(src).as_posix(), options=job.options)
        manifest["files"][job.out] = entry
        _write_manifest(dst, manifest)
    manifest["complete"] = True
    _write_manifest(dst, manifest)

    bad = [c for c in verify_weights_dir(dst) if c.status == "FAIL"]
    if bad:
        raise UserError(f"the converted folder failed its check: {bad[0].message} -- fix: {bad[0].fix}")
    return dst / MANIFEST_NAME


def build_parser() -> argparse.ArgumentParser:
    from scail_win.cli.support import HelpFormatter

    p = argparse.ArgumentParser(
        prog="scail-win convert", formatter_class=HelpFormatter,
        description="Convert a SCAIL-Preview folder (sat .pt checkpoint, T5, CLIP and VAE .pth) into "
                    "memory-mappable safetensors files plus the tokenizer, in a folder scail-win loads "
                    "directly. Interrupted? Run the same command again: finished files are kept.",
    )
    p.add_argument("src", help="the SCAIL-Preview folder (holds model/latest, Wan2.1_VAE.pth, umt5-xxl/, ...)")
    p.add_argument("dst", help="new or empty folder for the converted weights (or one convert made before)")
    p.add_argument("--dtype", choices=DTYPES, default="bf16",
                   help="storage of the DiT's per-layer weights: bf16 (exact, ~33 GB) or fp8_e4m3fn with a "
                        "scale per output channel (~17 GB: half the RAM, VRAM and transfer of bf16, "
                        "with a small loss of precision). T5, CLIP and VAE keep their dtype.")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow any Python object in the .pt/.pth files. Loading a pickle can run arbitrary "
                        "code: use only for files from a source you trust. Without it, files holding objects "
                        "beyond tensors and plain data are refused.")
    p.add_argument("--window-mb", type=int, default=DEFAULT_WINDOW_MB,
                   help="how much of a source file is mapped at a time; resident memory stays near this "
                        "plus the largest tensor")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    p.add_argument("--debug", action="store_true", help="debug logging, and tracebacks on errors")
    return p


def main(argv: list[str] | None = None) -> int:
    from scail_win.cli.support import run_cli, setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(quiet=args.quiet, debug=args.debug)

    def body() -> int:
        try:
            manifest = convert_folder(args.src, args.dst, dtype=args.dtype, trust_pickle=args.trust_pickle,
                                      window_mb=args.window_mb, progress=not args.no_progress)
        except KeyboardInterrupt:
            log.error("interrupted; finished files are kept: run the same command again to resume")
            return 130
        total = sum(e["size"] for e in json.loads(manifest.read_text(encoding="utf-8"))["files"].values())
        print(f"converted {args.src} -> {args.dst} ({human_bytes(total)}, DiT in {args.dtype})")
        return 0

    return run_cli(body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
