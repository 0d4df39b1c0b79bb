"""Warm the OS file cache with the weight files while the rest of start-up runs.

A cold start reads every weight file (the DiT alone is 30.5 GiB in bf16)
before the first denoising step, and spends another 15-20 s on imports,
process-group set-up and model construction that need little of the disk.
One background thread reading the files front to back, in the order the
pipeline needs them, overlaps the two: the loader then finds most pages in
the cache.

It only takes files that fit in half the RAM available at the start, so
that the pages stay cached until they are used (pinned copies and the rest
of the process need the other half); a file that does not fit is left to
the loader. The thread only reads, into one reused buffer, and stops with
the process. ``SCAIL_WIN_PREFETCH=0`` turns it off.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Iterable, Optional

log = logging.getLogger(__name__)

ENV = "SCAIL_WIN_PREFETCH"
CHUNK_BYTES = 16 << 20
RAM_SHARE = 0.5

_started: set = set()  # files this process has already queued
_lock = threading.Lock()


def disabled_by_env() -> bool:
    return os.environ.get(ENV, "").strip().lower() in ("0", "off", "false", "no")


class Prefetch:
    """A daemon thread reading ``files`` in turn; ``stop()`` ends it early."""

    def __init__(self, files: list):
        self.files = files
        self.bytes_read = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scail-win-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        buffer = memoryview(bytearray(CHUNK_BYTES))
        for path in self.files:
            try:
                with open(path, "rb", buffering=0) as f:
                    if hasattr(os, "posix_fadvise"):
                        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
                    while not self._stop.is_set():
                        n = f.readinto(buffer)
                        if not n:
                            break
                        self.bytes_read += n
            except OSError as exc:
                # The loader reads the file itself and reports what is wrong with it.
                log.debug("prefetch of %s stopped: %s", path, exc)
            if self._stop.is_set():
                return

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Wait for the thread; True when it has finished."""
        self._thread.join(timeout)
        return self.done()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def prefetch_files(paths: Iterable, *, available: Optional[int] = None) -> Optional[Prefetch]:
    """Start reading ``paths`` (in this order) into the file cache; None when there is nothing to read.

    Takes each file that exists, has not been queued before in this process,
    and keeps the running total within ``RAM_SHARE`` of ``available`` bytes
    (default: the RAM available now; unknown RAM means no prefetch).
    """
    if disabled_by_env():
        return None
    if available is None:
        from ..placement.host_memory import available_ram

        available = available_ram()
    if not available:
        return None
    budget = int(available * RAM_SHARE)
    chosen, total = [], 0
    with _lock:
        for path in paths:
            if path is None:
                continue
            path = Path(path)
            try:
                key = path.resolve()
                size = path.stat().st_size
            except (OSError, ValueError):  # ValueError: a NUL in the name
                continue
            if key in _started or not path.is_file() or total + size > budget:
                continue
            chosen.append(path)
            total += size
            _started.add(key)
    if not chosen:
        return None
    log.info("reading %d weight file(s), %.1f GiB, into the file cache while start-up runs",
             len(chosen), total / 2**30)
    return Prefetch(chosen)


def prefetch_weights(root, *, available: Optional[int] = None) -> Optional[Prefetch]:
    """Prefetch a weights folder's files in the order a run loads them: DiT, T5, CLIP, VAE.

    Never raises: a folder that cannot be read is the loader's to report.
    """
    from ..errors import UserError
    from .checkpoint import find_weights

    try:
        layout = find_weights(root)
    except (UserError, OSError):
        return None
    return prefetch_files(load_order(layout), available=available)


def load_order(layout) -> list:
    """A :class:`scail_win.weights.checkpoint.WeightsLayout`'s files in the order a run loads them."""
    return [layout.dit, layout.t5, layout.clip, layout.vae]
