"""Weights on disk: the two folder layouts, safe reading, fp8 storage, integrity.

Two layouts are recognised:

* the SCAIL-Preview download (``original``)::

      model/latest                      the iteration, e.g. "1"
      model/<it>/mp_rank_00_model_states.pt   sat/DeepSpeed pickle, tensors under 'module'
      Wan2.1_VAE.pth
      umt5-xxl/models_t5_umt5-xxl-enc-bf16.pth  + tokenizer files
      models_clip_open-clip-xlm-roberta-large-vit-huge-14-onlyvisual.pth

* the folder ``python -m scail_win convert`` writes (``converted``)::

      scail_win_manifest.json           format version, per-file size, dtypes, source
      dit.safetensors                   keys exactly as in the sat checkpoint's 'module'
      t5.safetensors  clip.safetensors  vae.safetensors   keys as in the .pth files
      umt5-xxl/<tokenizer files>

Every reader here memory-maps: a tensor costs RAM only where it is placed
(:func:`load_into` for resident weights, :class:`CheckpointWeights` as the
block swap's source).
Pickles are read with ``weights_only=True`` plus an allowlist of what a sat or
DeepSpeed checkpoint holds; anything else is refused with a message that
suggests ``convert --trust-pickle``.

fp8 storage: a quantized tensor ``<name>`` is stored as float8_e4m3fn with a
float32 scale per output channel (dim 0) under ``<name>_scale``;
``bf16 ~= dequantize(q, scale)``.  Only per-block Linear weights are
quantized (see :func:`is_fp8_candidate`); norms, biases, embeddings and the
first and last layers stay in bf16.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import struct
import zipfile
from abc import abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from scail_win.errors import UserError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

HF_URL = "https://huggingface.co/zai-org/SCAIL-Preview"
FORMAT_NAME = "scail-win-weights"
FORMAT_VERSION = 1
MANIFEST_NAME = "scail_win_manifest.json"
FP8_SCALE_SUFFIX = "_scale"
FP8_MAX = 448.0  # largest finite float8_e4m3fn value
PAD_TENSOR = "__scail_win_pad__"  # alignment filler in our safetensors files

# The original download's names (upstream's config points at these).
SAT_DIR = "model"
SAT_TRACKER = "model/latest"
SAT_FILE = "mp_rank_00_model_states.pt"
VAE_PTH = "Wan2.1_VAE.pth"
TOKENIZER_DIR = "umt5-xxl"
T5_PTH = "umt5-xxl/models_t5_umt5-xxl-enc-bf16.pth"
CLIP_PTH = "models_clip_open-clip-xlm-roberta-large-vit-huge-14-onlyvisual.pth"
# What transformers' AutoTokenizer reads from the umt5-xxl folder: the config
# always; the fast tokenizer.json, or spiece.model to rebuild it from.
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "spiece.model", "special_tokens_map.json")

# The converted folder's names.
CONVERTED_FILES = {
    "dit": "dit.safetensors",
    "t5": "t5.safetensors",
    "clip": "clip.safetensors",
    "vae": "vae.safetensors",
}

KB, MB, GB = 10**3, 10**6, 10**9
_SAFETENSORS_MAX_HEADER = 100 * MB  # the safetensors library refuses larger headers
_LFS_MAGIC = b"version https://git-lfs.github.com/spec/"


# --------------------------------------------------------------------------
# small helpers


def human_bytes(n: int) -> str:
    """Decimal units, as model hubs display file sizes."""
    if n < KB:
        return f"{n} B"
    for unit, div in (("kB", KB), ("MB", MB), ("GB", GB)):
        if n < div * 1000 or unit == "GB":
            return f"{n / div:.1f} {unit}"
    raise AssertionError("unreachable")


def _st_dtypes() -> dict[str, "torch.dtype"]:
    import torch

    table = {
        "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
        "I32": torch.int32, "I64": torch.int64, "F16": torch.float16,
        "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    }
    for st_name, attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
                          ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
        if hasattr(torch, attr):
            table[st_name] = getattr(torch, attr)
    return table


_ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2,
                "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def dtype_name(dtype: "torch.dtype") -> str:
    """The safetensors name of a torch dtype ('BF16', 'F8_E4M3', ...)."""
    for name, dt in _st_dtypes().items():
        if dt == dtype:
            return name
    raise TypeError(f"dtype {dtype} cannot be stored in safetensors")


# --------------------------------------------------------------------------
# integrity checks


@dataclass(frozen=True)
class FileSpec:
    """What a file should be: its format and a plausible size range."""

    fmt: str  # "pt" | "safetensors" | "json" | "blob"
    what: str  # for messages: "the umT5-XXL encoder, about 11.4 GB"
    min_size: int = 0
    max_size: int | None = None


SPECS: dict[str, FileSpec] = {
    "dit_pt": FileSpec("pt", "the SCAIL DiT checkpoint, about 32.8 GB (16.4 B parameters in bf16)", 24 * GB, 40 * GB),
    "t5_pth": FileSpec("pt", "the umT5-XXL text encoder, about 11.4 GB", 10 * GB, 13 * GB),
    "clip_pth": FileSpec("pt", "the CLIP ViT-H/14 image encoder, about 1.3 GB", 900 * MB, 2800 * MB),
    "vae_pth": FileSpec("pt", "the Wan2.1 VAE, about 0.25-0.5 GB", 200 * MB, 700 * MB),
    "tokenizer_config": FileSpec("json", "the umT5 tokenizer config, about 62 kB", 100, 5 * MB),
    "tokenizer_json": FileSpec("json", "the umT5 fast tokenizer, about 16.8 MB", 1 * MB, 100 * MB),
    "spiece": FileSpec("blob", "the umT5 SentencePiece model, about 4.5 MB", 1 * MB, 50 * MB),
    "special_tokens_map": FileSpec("json", "the umT5 special-tokens map, about 7 kB", 10, 5 * MB),
    "safetensors": FileSpec("safetensors", "a safetensors file"),
    "pt": FileSpec("pt", "a PyTorch checkpoint"),
}
_TOKENIZER_KINDS = {
    "tokenizer_config.json": "tokenizer_config",
    "tokenizer.json": "tokenizer_json",
    "spiece.model": "spiece",
    "special_tokens_map.json": "special_tokens_map",
}


@dataclass(frozen=True)
class Problem:
    """Why a file is unusable (FAIL) or suspicious (WARN), and the fix."""

    status: str
    message: str
    fix: str


@dataclass(frozen=True)
class FileCheck:
    """One line of a folder check."""

    path: Path
    status: str  # "OK" | "WARN" | "FAIL"
    message: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.status:<4}  {self.message}"
        return f"{text} -- fix: {self.fix}" if self.fix and self.status != "OK" else text


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: dtype name, shape, byte range in the data area."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    entries: dict[str, TensorEntry]
    data_start: int  # file offset of the data area
    metadata: dict[str, str]


class HeaderError(ValueError):
    """A safetensors header that does not describe its file."""


def read_safetensors_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and validate a safetensors header without reading tensor data.

    Raises HeaderError naming what is wrong (the checks the safetensors
    library makes, with messages a user can act on).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise HeaderError("shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > _SAFETENSORS_MAX_HEADER:
            raise HeaderError(f"header length {n} is too large (over {_SAFETENSORS_MAX_HEADER}): "
                              "not a safetensors file or a corrupt one")
        if 8 + n > size:
            raise HeaderError(f"header length {n} is larger than the file: truncated")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HeaderError(f"header is not valid JSON ({e.__class__.__name__}: {e})") from None
    if not isinstance(header, dict):
        raise HeaderError("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_len = size - 8 - n
    entries: dict[str, TensorEntry] = {}
    for name, spec in header.items():
        try:
            dtype, shape, (begin, end) = spec["dtype"], spec["shape"], spec["data_offsets"]
            shape = tuple(int(s) for s in shape)
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError):
            raise HeaderError(f"entry {name!r} is malformed") from None
        if dtype not in _ST_ITEMSIZE:
            raise HeaderError(f"entry {name!r} has unknown dtype {dtype!r}")
        if any(s < 0 for s in shape) or not 0 <= begin <= end:
            raise HeaderError(f"entry {name!r} has a negative shape or offset")
        if end - begin != math.prod(shape) * _ST_ITEMSIZE[dtype]:
            raise HeaderError(f"entry {name!r}: byte range does not match its shape and dtype")
        if end > data_len:
            raise HeaderError(f"tensor {name!r} ends at byte {8 + n + end}, beyond the end of the file: truncated")
        entries[name] = TensorEntry(dtype, shape, begin, end)
    # safetensors also refuses holes and overlaps; check the same so the loader
    # never meets an error this check let through.
    pos = 0
    for e in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if e.begin != pos:
            raise HeaderError(f"tensor data has a gap or overlap at byte {8 + n + e.begin}")
        pos = e.end
    if pos != data_len:
        raise HeaderError(f"{data_len - pos} bytes after the last tensor: the file is longer than its header says")
    return SafetensorsHeader(entries, 8 + n, {str(k): str(v) for k, v in metadata.items()})


def _zip_problem(path: Path, size: int) -> str | None:
    """Cheap structural check of a torch zip checkpoint: no unpickling."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if head[:2] == b"\x80\x02":
        return None  # the legacy (pre-1.6) pickle format; has no structure to check
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except zipfile.BadZipFile:
        return "not a complete zip archive (its directory at the end is missing): truncated or corrupt"
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if not any(i.filename.endswith("data.pkl") for i in infos):
        return "a zip archive without data.pkl: not a PyTorch checkpoint"
    for info in infos:
        # 30 bytes of fixed local header precede the name and the data.
        end = info.header_offset + 30 + len(info.filename.encode()) + info.compress_size
        if end > size:
            return f"zip entry {info.filename!r} extends past the end of the file: truncated"
    return None


def check_file(
    path: str | os.PathLike,
    kind: str | FileSpec,
    *,
    expected_size: int | None = None,
    display: str | None = None,
    fix: str | None = None,
) -> Problem | None:
    """Check one file without loading it; None when it looks right.

    ``kind`` names an entry of SPECS ("dit_pt", "t5_pth", "safetensors", ...)
    or is a FileSpec.  ``expected_size`` (from a manifest) makes any other
    size a failure; otherwise a size outside the spec's plausible range is a
    warning for formats whose structure was verified, a failure for the rest.
    """
    spec = SPECS[kind] if isinstance(kind, str) else kind
    path = Path(path)
    disp = display or str(path)
    fix = fix or f"re-download {path.name} from {HF_URL}"
    if not path.is_file():
        return Problem("FAIL", f"{disp}: missing; expected {spec.what}", fix)
    size = path.stat().st_size
    where = f"{disp} ({human_bytes(size)})"
    if size < 1024:
        with open(path, "rb") as f:
            if f.read(len(_LFS_MAGIC)) == _LFS_MAGIC:
                lfs_fix = f"run `git lfs pull` in the download folder, or {fix}"
                return Problem("FAIL", f"{where}: a Git LFS pointer, not the file itself; expected {spec.what}", lfs_fix)
    structure = None
    if spec.fmt == "pt":
        structure = _zip_problem(path, size)
    elif spec.fmt == "safetensors":
        try:
            read_safetensors_header(path)
        except HeaderError as e:
            structure = str(e)
        except OSError as e:
            structure = f"cannot be read ({e.strerror})"
    elif spec.fmt == "json":
        try:
            json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            structure = "not valid JSON: truncated or corrupt"
        except OSError as e:
            structure = f"cannot be read ({e.strerror})"
    if structure:
        return Problem("FAIL", f"{where}: {structure}; expected {spec.what}", fix)
    if expected_size is not None:
        if size != expected_size:
            return Problem("FAIL", f"{where}: {size} bytes where the manifest says {expected_size}; "
                                   f"expected {spec.what}", fix)
        return None
    if size < spec.min_size or (spec.max_size is not None and size > spec.max_size):
        status = "FAIL" if spec.fmt == "blob" else "WARN"
        side = "smaller" if size < spec.min_size else "larger"
        return Problem(status, f"{where}: {side} than expected for {spec.what}; a different or incomplete file?", fix)
    return None


# --------------------------------------------------------------------------
# the two layouts


@dataclass
class WeightsLayout:
    """Where each component lives in a weights folder."""

    root: Path
    kind: str  # "original" | "converted"
    dit: Path | None  # None when model/latest cannot be read
    t5: Path
    clip: Path
    vae: Path
    tokenizer_dir: Path
    dit_dtype: str | None = None  # "bf16" or "fp8_e4m3fn" for converted folders
    manifest: dict | None = None
    iteration: str | None = None


def detect_layout(root: str | os.PathLike) -> str | None:
    root = Path(root)
    if (root / MANIFEST_NAME).is_file():
        return "converted"
    if (root / SAT_DIR).is_dir() or (root / T5_PTH).is_file() or (root / VAE_PTH).is_file():
        return "original"
    return None


def read_manifest(root: str | os.PathLike) -> dict:
    path = Path(root) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable manifest ({e.__class__.__name__}); "
                        "delete the folder and run `python -m scail_win convert` again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise UserError(f"{path} is not a scail-win manifest; choose another folder")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: format version {manifest.get('format_version')!r}, this scail-win reads "
                        f"{FORMAT_VERSION}; convert again into an empty folder")
    return manifest


def _read_tracker(root: Path) -> str | None:
    try:
        text = (root / SAT_TRACKER).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if text.isdigit() or text == "release" else None


def find_weights(root: str | os.PathLike) -> WeightsLayout:
    """The layout of a weights folder; UserError when it is neither kind."""
    root = Path(root)
    kind = detect_layout(root)
    if kind == "converted":
        manifest = read_manifest(root)
        return WeightsLayout(
            root, kind, root / CONVERTED_FILES["dit"], root / CONVERTED_FILES["t5"],
            root / CONVERTED_FILES["clip"], root / CONVERTED_FILES["vae"], root / TOKENIZER_DIR,
            dit_dtype=manifest.get("dit_dtype"), manifest=manifest, iteration=manifest.get("source_iteration"),
        )
    if kind == "original":
        it = _read_tracker(root)
        dit = root / SAT_DIR / it / SAT_FILE if it else None
        return WeightsLayout(root, kind, dit, root / T5_PTH, root / CLIP_PTH, root / VAE_PTH,
                             root / TOKENIZER_DIR, iteration=it)
    if not root.is_dir():
        raise UserError(f"weights folder {root} does not exist; pass the SCAIL-Preview folder "
                        f"(download: {HF_URL}) or a folder made by `python -m scail_win convert`")
    raise UserError(f"{root} is neither a SCAIL-Preview folder (no {SAT_DIR}/ or {VAE_PTH}) nor a converted "
                    f"scail-win folder (no {MANIFEST_NAME})")


def _ok(path: Path, disp: str, what: str) -> FileCheck:
    return FileCheck(path, "OK", f"{disp} ({human_bytes(path.stat().st_size)}): {what}")


def _check_tokenizer(root: Path, fix_for: Callable[[str], str]) -> list[FileCheck]:
    tok = root / TOKENIZER_DIR
    out: list[FileCheck] = []
    for name in TOKENIZER_FILES:
        path, rel = tok / name, f"{TOKENIZER_DIR}/{name}"
        if path.is_file():
            problem = check_file(path, _TOKENIZER_KINDS[name], display=rel, fix=fix_for(rel))
            out.append(_ok(path, rel, "present") if problem is None
                       else FileCheck(path, problem.status, problem.message, problem.fix))
    config, fast, sp = (f"{TOKENIZER_DIR}/{n}" for n in ("tokenizer_config.json", "tokenizer.json", "spiece.model"))
    if not (root / config).is_file():
        out.append(FileCheck(root / config, "FAIL",
                             f"{config}: missing; expected {SPECS['tokenizer_config'].what}", fix_for(config)))
    if not (root / fast).is_file() and not (root / sp).is_file():
        out.append(FileCheck(root / fast, "FAIL", f"{fast} and {sp}: both missing; the umT5 tokenizer needs "
                             f"{SPECS['tokenizer_json'].what}", fix_for(fast)))
    elif not (root / fast).is_file():
        out.append(FileCheck(root / fast, "WARN", f"{fast}: missing; the tokenizer is rebuilt from spiece.model "
                             "at every start (slow, needs the sentencepiece package)", fix_for(fast)))
    return out


def verify_weights_dir(root: str | os.PathLike) -> list[FileCheck]:
    """Check every file a weights folder needs: present, plausible size, intact.

    Cheap: reads headers and zip directories, never tensor data.  The loader
    and the doctor command use this same function.
    """
    root = Path(root)
    try:
        layout = find_weights(root)
    except UserError as e:
        return [FileCheck(root, "FAIL", str(e), f"pass --weights with the SCAIL-Preview folder ({HF_URL})")]
    checks: list[FileCheck] = []

    if layout.kind == "original":
        def hf_fix(rel: str) -> str:
            return f"re-download {rel} from {HF_URL}"

        if layout.dit is None:
            checks.append(FileCheck(root / SAT_TRACKER, "FAIL",
                                    f"{SAT_TRACKER}: missing or not an iteration number; expected a text file "
                                    "holding the checkpoint iteration, e.g. 1", hf_fix(SAT_TRACKER)))
        files = [(layout.dit, "dit_pt"), (layout.t5, "t5_pth"), (layout.clip, "clip_pth"), (layout.vae, "vae_pth")]
        for path, kind in files:
            if path is None:
                continue
            rel = path.relative_to(root).as_posix()
            problem = check_file(path, kind, display=rel, fix=hf_fix(rel))
            checks.append(_ok(path, rel, SPECS[kind].what.split(",")[0]) if problem is None
                          else FileCheck(path, problem.status, problem.message, problem.fix))
        checks.extend(_check_tokenizer(root, hf_fix))
        return checks

    manifest = layout.manifest or {}
    src = manifest.get("source_dir", "SRC")
    convert_fix = f'run `python -m scail_win convert "{src}" "{root}"` again (it redoes only the bad files)'
    if not manifest.get("complete"):
        checks.append(FileCheck(root / MANIFEST_NAME, "FAIL", f"{MANIFEST_NAME}: the conversion did not finish",
                                convert_fix))
    files = manifest.get("files", {})
    for component, name in CONVERTED_FILES.items():
        path, entry = root / name, files.get(name)
        if entry is None:
            checks.append(FileCheck(path, "FAIL", f"{name}: not in the manifest (not converted yet)", convert_fix))
            continue
        spec = FileSpec("safetensors", f"the converted {component} ({entry.get('tensors', '?')} tensors)")
        problem = check_file(path, spec, expected_size=entry.get("size"), display=name, fix=convert_fix)
        checks.append(_ok(path, name, spec.what) if problem is None
                      else FileCheck(path, problem.status, problem.message, problem.fix))
    checks.extend(_check_tokenizer(root, lambda rel: convert_fix))
    return checks


def ensure_weights(root: str | os.PathLike) -> WeightsLayout:
    """verify_weights_dir for loaders: log warnings, raise UserError on failure."""
    checks = verify_weights_dir(root)
    fails = [c for c in checks if c.status == "FAIL"]
    for c in checks:
        if c.status == "WARN":
            log.warning("%s", c.line())
    for c in fails[1:]:
        log.error("%s", c.line())
    if fails:
        more = f" (and {len(fails) - 1} more problems above)" if len(fails) > 1 else ""
        raise UserError(f"{fails[0].message}{more} -- fix: {fails[0].fix}")
    return find_weights(root)


# --------------------------------------------------------------------------
# reading tensors


def _safe_globals() -> list:
    """Non-tensor objects a sat / DeepSpeed checkpoint holds besides builtins.

    DeepSpeed's client state stores numpy's RNG state (an ndarray) and sat
    may store its argparse.Namespace; none of these run code when rebuilt.
    """
    import argparse

    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    # numpy >= 1.25 rebuilds a dtype as an instance of its own class.
    dtype_classes = {type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDG"} - {np.dtype}
    # Pickles written under numpy 1.x name numpy.core, under 2.x numpy._core.
    return [argparse.Namespace, np.ndarray, np.dtype, *sorted(dtype_classes, key=str), _reconstruct,
            (_reconstruct, "numpy.core.multiarray._reconstruct"),
            (_reconstruct, "numpy._core.multiarray._reconstruct")]


def _safe_globals_context():
    import torch.serialization as ser

    if hasattr(ser, "safe_globals"):
        return ser.safe_globals(_safe_globals())
    if hasattr(ser, "add_safe_globals"):  # torch 2.4: process-wide only
        ser.add_safe_globals([g for g in _safe_globals() if not isinstance(g, tuple)])
    return contextlib.nullcontext()


def _unsafe_names(path: Path, error: Exception) -> list[str]:
    """What the refused pickle wanted, for the message (best effort)."""
    import torch.serialization as ser

    allowed = {"argparse.Namespace", "numpy.ndarray", "numpy.dtype",
               "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct"}
    names = []
    if hasattr(ser, "get_unsafe_globals_in_checkpoint"):
        try:
            names = [n for n in ser.get_unsafe_globals_in_checkpoint(str(path)) if n not in allowed]
        except Exception:  # the refusal stands without the listing
            names = []
    if not names:
        names = re.findall(r"(?:Unsupported global: GLOBAL |but got <class ')([\w.]+)", str(error))
    return names


def _torch_load(path: Path, trust_pickle: bool) -> tuple[Any, bool]:
    """torch.load memory-mapped, weights_only unless trusted; (object, mapped) or UserError."""
    import pickle

    import torch

    problem = check_file(path, "pt", display=str(path))
    if problem is not None and problem.status == "FAIL":
        raise UserError(f"{problem.message} -- fix: {problem.fix}")
    size = human_bytes(path.stat().st_size)

    def load(mmap: bool):
        if trust_pickle:
            return torch.load(path, map_location="cpu", mmap=mmap, weights_only=False)
        with _safe_globals_context():
            return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)

    try:
        try:
            return load(mmap=True), True
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            log.warning("%s (%s) is in the legacy torch format, which cannot be memory-mapped: "
                        "reading it needs that much RAM; `python -m scail_win convert` avoids this", path, size)
            return load(mmap=False), False
    except pickle.UnpicklingError as e:
        if trust_pickle:
            raise UserError(f"{path} ({size}): cannot be unpickled ({str(e).splitlines()[0]}); re-download it") from None
        names = _unsafe_names(path, e)
        what = ", ".join(sorted(set(names))) if names else "objects torch does not allow by default"
        raise UserError(
            f"{path} ({size}) holds Python objects outside the safe list ({what}); scail-win does not unpickle "
            "them because loading a pickle can run arbitrary code. If you trust the file's origin, convert the "
            "folder once with `python -m scail_win convert SRC DST --trust-pickle` and use DST") from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as e:
        first = str(e).splitlines()[0] if str(e) else e.__class__.__name__
        raise UserError(f"{path} ({size}): cannot be read as a PyTorch checkpoint ({first}); re-download it") from None


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: "torch.dtype"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class TensorSource(Mapping):
    """A lazy, read-only state dict: name -> tensor, memory-mapped.

    ``source[name]`` gives the tensor as a model wants it (fp8 tensors come
    back dequantized to bf16); ``raw(name)`` gives what is stored, plus the
    fp8 scale or None; ``info(name)`` reads only the header.  Keys never
    include fp8 scale entries or padding.  Close it (or use ``with``) to drop
    the file mapping; tensors already handed out stay valid.
    """

    path: Path
    extras: dict  # non-tensor entries of a .pt (e.g. 'iteration'); empty for safetensors
    metadata: dict
    mapped: bool = True  # False: the whole file was read into RAM (legacy .pt format)

    @abstractmethod
    def info(self, name: str) -> TensorInfo:
        """Shape and dtype from the header alone."""

    @abstractmethod
    def raw(self, name: str) -> tuple["torch.Tensor", "torch.Tensor | None"]:
        """The stored tensor and its fp8 scale (None when not quantized)."""

    @abstractmethod
    def close(self) -> None:
        """Drop this source's references to the file mapping."""

    def __getitem__(self, name: str) -> "torch.Tensor":
        tensor, scale = self.raw(name)
        return tensor if scale is None else dequantize(tensor, scale)

    def __enter__(self) -> "TensorSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SafetensorsSource(TensorSource):
    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        try:
            self.header = read_safetensors_header(path)
        except HeaderError as e:
            raise UserError(f"{path} ({human_bytes(path.stat().st_size)}): {e}; delete it and convert again "
                            "or re-download it") from None
        self.extras = {}
        self.metadata = self.header.metadata
        entries = self.header.entries
        self._scales = {n: n + FP8_SCALE_SUFFIX for n, e in entries.items()
                        if e.dtype.startswith("F8") and n + FP8_SCALE_SUFFIX in entries}
        hidden = set(self._scales.values()) | {PAD_TENSOR}
        self._names = [n for n in entries if n not in hidden]
        self._name_set = set(self._names)
        self._dtypes = _st_dtypes()
        try:
            self._file = safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # the library's own checks; its error types vary across versions
            raise UserError(f"{path} ({human_bytes(path.stat().st_size)}): safetensors cannot open it ({e}); "
                            "delete it and convert again or re-download it") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._name_set

    def info(self, name: str) -> TensorInfo:
        e = self.header.entries[name]
        return TensorInfo(e.shape, self._dtypes[e.dtype])

    def raw(self, name: str):
        if name not in self:
            raise KeyError(name)
        scale_name = self._scales.get(name)
        scale = self._file.get_tensor(scale_name) if scale_name else None
        return self._file.get_tensor(name), scale

    def close(self) -> None:
        if self._file is not None:
            # Release the handle now: Windows cannot replace a file that is still open.
            self._file.__exit__(None, None, None)
            self._file = None


class TorchFileSource(TensorSource):
    """A .pt/.pth file; a sat checkpoint's tensors are those under 'module'."""

    def __init__(self, path: Path, trust_pickle: bool = False):
        import torch

        self.path = path
        obj, self.mapped = _torch_load(path, trust_pickle)
        if not isinstance(obj, Mapping):
            raise UserError(f"{path} holds a {type(obj).__name__}, not a state dict; re-download it")
        inner = obj.get("module") if isinstance(obj.get("module"), Mapping) else None
        sd = inner if inner is not None else obj
        self._sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
        skipped = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
        if skipped:
            log.debug("%s: %d non-tensor entries ignored (%s...)", path, len(skipped), skipped[0])
        self.extras = {k: v for k, v in obj.items() if k != "module"} if inner is not None else {}
        self.metadata = {}

    def __iter__(self) -> Iterator[str]:
        return iter(self._sd)

    def __len__(self) -> int:
        return len(self._sd)

    def __contains__(self, name: object) -> bool:
        return name in self._sd

    def info(self, name: str) -> TensorInfo:
        t = self._sd[name]
        return TensorInfo(tuple(t.shape), t.dtype)

    def raw(self, name: str):
        return self._sd[name], None

    def close(self) -> None:
        self._sd = {}
        self.extras = {}


def open_state_dict(path: str | os.PathLike, *, trust_pickle: bool = False) -> TensorSource:
    """Open a .safetensors or .pt/.pth file as a lazy, memory-mapped state dict.

    For a sat/DeepSpeed checkpoint the tensors are those under 'module'
    (keys unchanged, e.g. 'model.diffusion_model.transformer.layers.0...');
    its other entries are in ``.extras``.  ``trust_pickle`` allows any
    pickled object: only for files whose origin the user trusts.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: missing; pass the weights folder with all files ({HF_URL})")
    if path.suffix == ".safetensors":
        return SafetensorsSource(path)
    return TorchFileSource(path, trust_pickle=trust_pickle)


# --------------------------------------------------------------------------
# fp8


_BLOCK_INDEX = re.compile(r"(^|\.)(layers|\w+_list)\.\d+\.")


def is_fp8_candidate(name: str, shape: tuple[int, ...]) -> bool:
    """Whether a tensor is stored in fp8: a Linear weight inside a repeated block.

    These are the DiT's per-layer attention, MLP and cross-attention
    matrices (sat's ``transformer.layers.<i>`` and the mixins' per-layer
    ``*_list.<i>``): over 98% of its parameters.  Norms, biases, the
    shared AdaLN tables, embeddings, patch and final layers stay bf16.
    """
    return (name.endswith(".weight") and len(shape) == 2 and min(shape) >= 16
            and _BLOCK_INDEX.search(name) is not None)


def quantize_fp8(t: "torch.Tensor", *, per_channel: bool = True) -> tuple["torch.Tensor", "torch.Tensor"]:
    """float8_e4m3fn values and their float32 scale (per output channel = dim 0, or one)."""
    import torch

    if t.dim() < 1:
        raise ValueError("quantize_fp8 needs a tensor of at least one dimension")
    w = t.float()
    if per_channel:
        amax = w.abs().reshape(w.shape[0], -1).amax(dim=1)
    else:
        amax = w.abs().amax()
    # An all-zero channel gets scale 1 rather than a division by zero.
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    shaped = scale.reshape(-1, *([1] * (w.dim() - 1))) if per_channel else scale
    q = (w / shaped).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize(q: "torch.Tensor", scale: "torch.Tensor", dtype: "torch.dtype | None" = None) -> "torch.Tensor":
    """q * scale in ``dtype`` (default bf16), on q's device.

    Computed in the target dtype: no float32 copy of the weight, and the
    rounding it adds is far below fp8's own.
    """
    import torch

    dtype = dtype or torch.bfloat16
    scale = scale.to(device=q.device, dtype=dtype)
    if scale.dim() == 1 and q.dim() > 1:
        scale = scale.reshape(-1, *([1] * (q.dim() - 1)))
    return q.to(dtype) * scale


def relative_error(approx: "torch.Tensor", reference: "torch.Tensor") -> float:
    """||approx - reference|| / ||reference|| in float32 (0 when both are zero)."""
    a, r = approx.float(), reference.float()
    denom = r.norm().item()
    diff = (a - r).norm().item()
    return diff / denom if denom > 0 else diff


# --------------------------------------------------------------------------
# writing safetensors tensor by tensor


@dataclass
class _Slot:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int = 0
    end: int = 0


class SafetensorsWriter:
    """Write a safetensors file one tensor at a time, under a temporary name.

    safetensors' save_file needs every tensor in RAM at once; this writes
    the header first (all shapes and dtypes are known up front) and then
    each tensor's bytes in ``order``.  Tensors are laid out by decreasing
    element size so each starts aligned to its own element size; the
    ``tail`` entries (fp8 scales) come last, after a small padding tensor if
    one is needed to realign them.  ``commit()`` flushes, syncs and renames
    the file into place; leaving the ``with`` block without it removes the
    partial file, so a final name never holds half a file.
    """

    def __init__(self, path: str | os.PathLike, entries: list[tuple[str, "torch.dtype", tuple[int, ...]]],
                 *, tail: list[tuple[str, "torch.dtype", tuple[int, ...]]] = (),
                 metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        names = [e[0] for e in entries] + [e[0] for e in tail]
        if len(set(names)) != len(names) or PAD_TENSOR in names:
            raise ValueError("tensor names must be unique and not use the padding name")
        body = sorted((_Slot(n, dtype_name(d), tuple(int(s) for s in shape)) for n, d, shape in entries),
                      key=lambda s: -_ST_ITEMSIZE[s.dtype])
        slots, pos = [], 0
        for slot in body:
            pos = self._place(slot, pos, slots)
        tail_slots = [_Slot(n, dtype_name(d), tuple(int(s) for s in shape)) for n, d, shape in tail]
        if tail_slots:
            align = max(_ST_ITEMSIZE[s.dtype] for s in tail_slots)
            if pos % align:
                pos = self._place(_Slot(PAD_TENSOR, "U8", (align - pos % align,)), pos, slots)
            for slot in sorted(tail_slots, key=lambda s: -_ST_ITEMSIZE[s.dtype]):
                pos = self._place(slot, pos, slots)
        self.order = [s.name for s in slots]
        self._slots = {s.name: s for s in slots}
        self.data_bytes = pos
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        for s in slots:
            header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [s.begin, s.end]}
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("ascii")
        raw += b" " * (-(8 + len(raw)) % 8)  # the data area starts 8-byte aligned
        self._header = struct.pack("<Q", len(raw)) + raw
        self.total_bytes = len(self._header) + pos
        self._next = 0
        self._file = None

    @staticmethod
    def _place(slot: _Slot, pos: int, slots: list) -> int:
        slot.begin, slot.end = pos, pos + math.prod(slot.shape) * _ST_ITEMSIZE[slot.dtype]
        slots.append(slot)
        return slot.end

    def __enter__(self) -> "SafetensorsWriter":
        self._file = open(self.partial, "wb")
        self._file.write(self._header)
        if self.order and self.order[0] == PAD_TENSOR:
            self._write_pad()
        return self

    def _write_pad(self) -> None:
        self._file.write(b"\0" * (self._slots[PAD_TENSOR].end - self._slots[PAD_TENSOR].begin))
        self._next += 1

    @property
    def pending(self) -> list[str]:
        """Names still to be written, in the order write() expects them."""
        return [n for n in self.order[self._next:] if n != PAD_TENSOR]

    def write(self, name: str, tensor: "torch.Tensor") -> None:
        if self._file is None:
            raise ValueError("write() outside the with block")
        if self._next < len(self.order) and self.order[self._next] == PAD_TENSOR:
            self._write_pad()
        import torch

        if self._next >= len(self.order) or self.order[self._next] != name:
            expected = self.order[self._next] if self._next < len(self.order) else "nothing"
            raise ValueError(f"write order: got {name!r}, expected {expected!r}")
        slot = self._slots[name]
        if dtype_name(tensor.dtype) != slot.dtype or tuple(tensor.shape) != slot.shape:
            raise ValueError(f"{name}: got {tensor.dtype} {tuple(tensor.shape)}, "
                             f"header says {slot.dtype} {slot.shape}")
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        if flat.numel():
            self._file.write(memoryview(flat.view(torch.uint8).numpy()))
        self._next += 1
        if self._next < len(self.order) and self.order[self._next] == PAD_TENSOR:
            self._write_pad()

    def commit(self) -> None:
        if self.pending:
            raise ValueError(f"{len(self.pending)} tensors not written (first: {self.pending[0]!r})")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        os.replace(self.partial, self.path)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            with contextlib.suppress(OSError):
                self.partial.unlink()


# --------------------------------------------------------------------------
# placing tensors into a model


Placement = Union[str, "torch.device", Callable[[str], Union[str, "torch.device"]]]


@dataclass
class LoadResult:
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    meta_left: list[str] = field(default_factory=list)  # still on 'meta' after loading


def _is_pinned(device) -> bool:
    return isinstance(device, str) and device == "pinned"


def _materialize(tensor, scale, device, dtype, keep_fp8):
    import torch

    pinned = _is_pinned(device)
    target = torch.device("cpu") if pinned else torch.device(device)
    if scale is not None and not keep_fp8:
        # Move the fp8 bytes, then upcast where the tensor will live: the copy
        # carries half the bytes of bf16.
        out = dequantize(tensor.to(target), scale.to(target), dtype)
    else:
        cast = dtype is not None and tensor.is_floating_point() and scale is None and tensor.dtype != dtype
        if target.type == "cpu":
            out = tensor.to(dtype) if cast else tensor
        else:
            out = tensor.to(target)
            out = out.to(dtype) if cast else out
    return out.pin_memory() if pinned else out


def load_into(
    module: "torch.nn.Module",
    source: "TensorSource | str | os.PathLike",
    *,
    prefix: str = "",
    placement: Placement = "cpu",
    dtype: "torch.dtype | None" = None,
    keep_fp8: bool | Callable[[str], bool] = False,
    strict: bool = True,
    trust_pickle: bool = False,
    select: Callable[[str], bool] | None = None,
) -> LoadResult:
    """Assign checkpoint tensors to a module's parameters and buffers in place.

    Built for modules constructed under ``torch.device('meta')``: each tensor
    is read from the memory-mapped file and put straight where it lives --
    ``placement`` is a device, ``"pinned"`` (page-locked CPU memory), or a
    callable ``name -> device|"pinned"`` (``name`` as in
    ``module.state_dict()``).  CPU tensors without a dtype change stay
    file-backed (no copy at all).  The checkpoint key of module tensor
    ``n`` is ``prefix + n``: e.g. ``prefix='model.diffusion_model.'`` loads
    a sat checkpoint into the bare DiT (upstream loads the whole engine
    with no prefix).  ``dtype`` casts floating tensors; fp8 tensors are
    dequantized (to ``dtype`` or bf16) unless ``keep_fp8`` (a bool, or a
    callable ``name -> bool``), in which case the fp8 weight is assigned
    and its scale is registered on the owning module as a non-persistent
    buffer ``<leaf>_scale``.  For the block swap, place swapped tensors on
    "cpu" with ``keep_fp8``: they stay file-backed fp8 (no RAM) and
    :class:`CheckpointWeights` upcasts them on the GPU.

    ``select(name)`` limits loading to some tensors (the rest stay as
    they are).
    All keys and shapes are checked before any data moves; a mismatch
    raises UserError.  Tied parameters stay tied.
    """
    import torch

    own = not isinstance(source, TensorSource)
    src = open_state_dict(source, trust_pickle=trust_pickle) if own else source
    place = placement if callable(placement) else (lambda name: placement)
    try:
        plan, missing, wrong = [], [], []
        seen: dict[int, str] = {}
        for mod_name, mod in module.named_modules():
            base = f"{mod_name}." if mod_name else ""
            tensors = [(leaf, p, True) for leaf, p in mod._parameters.items() if p is not None]
            tensors += [(leaf, b, False) for leaf, b in mod._buffers.items()
                        if b is not None and leaf not in mod._non_persistent_buffers_set]
            for leaf, old, is_param in tensors:
                name = base + leaf
                if select is not None and not select(name):
                    continue
                if id(old) in seen:
                    plan.append((mod, leaf, old, is_param, name, seen[id(old)]))
                    continue
                key = prefix + name
                if key not in src:
                    missing.append(name)
                    continue
                info = src.info(key)
                if tuple(info.shape) != tuple(old.shape):
                    wrong.append(f"{name}: checkpoint {list(info.shape)}, model {list(old.shape)}")
                    continue
                seen[id(old)] = name
                plan.append((mod, leaf, old, is_param, name, None))
        where = getattr(src, "path", "the checkpoint")
        if wrong:
            raise UserError(f"{where}: {len(wrong)} tensors have other shapes than the model "
                            f"(first: {wrong[0]}); is this the right checkpoint for this config?")
        if missing and strict:
            raise UserError(f"{where} lacks {len(missing)} tensors the model needs (first: {prefix}{missing[0]}); "
                            "is this the right checkpoint, and the right key prefix?")
        used = {prefix + p[4] for p in plan if p[5] is None}
        unexpected = [k for k in src if k.startswith(prefix) and k not in used
                      and (select is None or select(k[len(prefix):]))]

        done: dict[str, Any] = {}
        for mod, leaf, old, is_param, name, tied_to in plan:
            if tied_to is not None:
                new = done[tied_to]
            else:
                tensor, scale = src.raw(prefix + name)
                device = place(name)
                keep = scale is not None and (keep_fp8(name) if callable(keep_fp8) else keep_fp8)
                new = _materialize(tensor, scale, device, dtype, keep)
                if is_param:
                    grad = old.requires_grad and new.is_floating_point() and not keep
                    new = torch.nn.Parameter(new, requires_grad=grad)
                done[name] = new
                if keep:
                    target = torch.device("cpu") if _is_pinned(device) else torch.device(device)
                    mod.register_buffer(leaf + FP8_SCALE_SUFFIX, scale.to(target), persistent=False)
            if is_param:
                mod._parameters[leaf] = new
            else:
                mod._buffers[leaf] = new
        meta_left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
        return LoadResult(missing, unexpected, meta_left)
    finally:
        if own:
            src.close()


class CheckpointWeights:
    """A checkpoint file as the block swap's weight source (scail_win.placement.offload).

    ``master_for`` hands out the file's memory-mapped tensors as CPU
    masters, so fp8 weights stay fp8 in RAM and over PCIe; ``materialize``
    (pass it to BlockSwap too) makes the device copy and upcasts fp8 there
    with its scale to ``dtype`` (default bf16) -- except the weights
    ``keep_fp8(name)`` names, which arrive in fp8 for
    :mod:`scail_win.model.kernels.fp8_linear` -- and copies other tensors as stored.  ``name`` is the tensor's name in the swapped model; the
    checkpoint key is ``prefix + name``.  Tensors the file lacks (such as
    the fp8 scale buffers :func:`load_into` registers) come from the model.

    Recipe: ``load_into(model, source, placement=..., keep_fp8=is_swapped)``
    with swapped tensors placed on "cpu" (they stay file-backed fp8), then
    ``BlockSwap(model, groups, "cuda", mode="stream", source=cw,
    materialize=cw.materialize)``.
    """

    def __init__(self, source: TensorSource, *, prefix: str = "", dtype: "torch.dtype | None" = None,
                 keep_fp8: Callable[[str], bool] | None = None):
        import torch

        self.source = source
        self.prefix = prefix
        self.dtype = dtype or torch.bfloat16
        self.keep_fp8 = keep_fp8
        self._scales: dict[tuple[str, str], "torch.Tensor"] = {}

    def master_for(self, name: str, tensor: "torch.Tensor") -> "torch.Tensor":
        if self.prefix + name not in self.source:
            # Not in the file (e.g. an fp8 scale buffer load_into registered): the model's own tensor.
            if tensor.is_meta:
                raise ValueError(f"{name}: neither in {self.source.path} nor materialized in the model")
            return tensor.data.cpu()
        stored, _ = self.source.raw(self.prefix + name)
        if tuple(stored.shape) != tuple(tensor.shape):
            raise ValueError(f"{self.prefix + name}: checkpoint shape {list(stored.shape)}, "
                             f"model shape {list(tensor.shape)}")
        return stored

    def materialize(self, src: "torch.Tensor", device: "torch.device", name: str) -> "torch.Tensor":
        key = self.prefix + name
        scale = self.source.raw(key)[1] if key in self.source else None
        if scale is None or (self.keep_fp8 is not None and self.keep_fp8(name)):
            return src.to(device, non_blocking=True, copy=True)
        key = (name, str(device))
        if key not in self._scales:
            self._scales[key] = scale.to(device)
        return dequantize(src.to(device, non_blocking=True), self._scales[key], self.dtype)
