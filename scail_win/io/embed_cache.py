"""A disk cache of text-encoder embeddings.

umT5-XXL is 11 GB of weights run once per prompt; with the embedding cached,
a repeated prompt skips loading it at all.  An entry is keyed by everything
that determines the embedding: the prompt, the identity of the encoder
weights file (resolved path, size, modification time), the tokenizer's
identity when given, ``max_length`` and the dtype.  Replacing the weights
file changes its size or mtime, so old entries are simply never hit again.

Entries are safetensors files named by the key's SHA-256, written atomically
(temporary file + ``os.replace``); an unreadable entry is a miss with a
warning.  Default location: ``%LOCALAPPDATA%\\scail-win\\cache`` on Windows,
``~/Library/Caches/scail-win`` on macOS, ``$XDG_CACHE_HOME/scail-win`` (or
``~/.cache/scail-win``) elsewhere; ``SCAIL_WIN_CACHE`` overrides it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_TENSOR = "embedding"
_FORMAT = "scail-win text embedding v1"


def default_cache_dir() -> Path:
    """The per-user cache folder of scail-win (not created here)."""
    override = os.environ.get("SCAIL_WIN_CACHE")
    if override:
        return Path(override)
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA")
        return (Path(base) if base else Path.home() / "AppData" / "Local") / "scail-win" / "cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "scail-win"
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "scail-win"


def file_identity(path: str | os.PathLike) -> str:
    """``path|size|mtime_ns`` of a file, or of every file in a folder (sorted, recursive).

    Cheap (no reading) and changes whenever the file is replaced or edited.
    """
    p = Path(path).resolve()
    if p.is_dir():
        parts = [file_identity(f) for f in sorted(p.rglob("*")) if f.is_file()]
        return f"{os.path.normcase(str(p))}/[{';'.join(parts)}]"
    st = p.stat()
    return f"{os.path.normcase(str(p))}|{st.st_size}|{st.st_mtime_ns}"


class EmbedCache:
    """Text embeddings on disk.  Usage::

        cache = EmbedCache()
        key = cache.key(prompt, weights=t5_path, tokenizer=tok_dir, max_length=512, dtype=torch.bfloat16)
        emb = cache.get(key)
        if emb is None:
            emb = t5([prompt])
            cache.put(key, emb)
    """

    def __init__(self, cache_dir: str | os.PathLike | None = None):
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.dir = root / "text-embeddings"

    def key(
        self,
        prompt: str,
        *,
        weights: str | os.PathLike,
        max_length: int,
        dtype,
        tokenizer: str | os.PathLike | None = None,
    ) -> str:
        """The entry name for a prompt under these encoder settings.

        Raises OSError if ``weights`` (or ``tokenizer``) does not exist.
        """
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        fields = {
            "format": _FORMAT,
            "prompt": prompt,
            "weights": file_identity(weights),
            "tokenizer": file_identity(tokenizer) if tokenizer is not None else None,
            "max_length": int(max_length),
            "dtype": str(dtype),
        }
        blob = json.dumps(fields, sort_keys=True, ensure_ascii=False).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()

    def path(self, key: str) -> Path:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"not a cache key: {key!r}")
        return self.dir / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        """The cached embedding (on the CPU), or None on a miss or an unreadable entry."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            tensors = load_file(str(path))
            return tensors[_TENSOR]
        except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as exc:
            log.warning("ignoring unreadable text-embedding cache entry %s (%s)", path, exc)
            return None

    def put(self, key: str, embedding: torch.Tensor) -> Path | None:
        """Store ``embedding`` under ``key``; a failed write is logged, not raised."""
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        path = self.path(key)
        tmp = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=self.dir)
            os.close(fd)
            save_file({_TENSOR: embedding.detach().to("cpu").contiguous()}, tmp, metadata={"format": _FORMAT})
            os.replace(tmp, path)
            return path
        except (OSError, SafetensorError) as exc:
            # The run goes on without the cache (read-only folder, full disk,
            # a reader holding the file open on Windows).
            log.warning("could not write text-embedding cache entry %s (%s)", path, exc)
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            return None
