"""How much RAM and page file (swap) this machine has; Windows and Linux.

Shared by the model loader (the automatic ``--ram-budget``), the weights
prefetch and ``doctor``.
Standard library only.
"""
from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo as bytes."""
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            out[key.strip()] = int(fields[0]) * (1024 if len(fields) > 1 and fields[1] == "kB" else 1)
    return out


def memory_info() -> dict[str, int] | None:
    """Total/available RAM and swap (page file on Windows) in bytes, or None."""
    if sys.platform == "win32":
        class MEMORYSTATUSEX(ctypes.Structure):
            _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong),
                        ("ullTotalPhys", ctypes.c_ulonglong), ("ullAvailPhys", ctypes.c_ulonglong),
                        ("ullTotalPageFile", ctypes.c_ulonglong), ("ullAvailPageFile", ctypes.c_ulonglong),
                        ("ullTotalVirtual", ctypes.c_ulonglong), ("ullAvailVirtual", ctypes.c_ulonglong),
                        ("ullAvailExtendedVirtual", ctypes.c_ulonglong)]

        stat = MEMORYSTATUSEX()
        stat.dwLength = ctypes.sizeof(MEMORYSTATUSEX)
        if not ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(stat)):
            return None
        # The "page file" totals are the commit limit: RAM plus page files.
        return {"ram_total": stat.ullTotalPhys, "ram_available": stat.ullAvailPhys,
                "swap_total": max(0, stat.ullTotalPageFile - stat.ullTotalPhys),
                "swap_free": max(0, stat.ullAvailPageFile - stat.ullAvailPhys),
                "commit_limit": stat.ullTotalPageFile}
    try:
        info = parse_meminfo(Path("/proc/meminfo").read_text(encoding="ascii"))
        return {"ram_total": info["MemTotal"], "ram_available": info.get("MemAvailable", info.get("MemFree", 0)),
                "swap_total": info.get("SwapTotal", 0), "swap_free": info.get("SwapFree", 0)}
    except (OSError, KeyError):
        pass
    try:
        return {"ram_total": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}
    except (AttributeError, ValueError, OSError):
        return None


def available_ram() -> int | None:
    """Host RAM available now in bytes, or None when the platform does not say."""
    info = memory_info()
    return info.get("ram_available") if info else None
