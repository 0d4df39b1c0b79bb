"""What the start-up hook costs every Python process: ``python -c pass`` with and without it.

Runs the interpreter given by ``--python`` (default: this one), which must
have scail-win installed (``scail_win.pth`` in its site-packages), many
times, alternating ``SCAIL_WIN_DISABLE=1`` (the .pth line then imports
nothing) and unset, and prints the median and best wall times and the import
time of ``scail_win._startup`` that ``-X importtime`` reports.

    python benchmarks/bench_startup.py [--python PATH] [--runs 40]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def timed_run(python: str, env: dict) -> float:
    start = time.perf_counter()
    subprocess.run([python, "-c", "pass"], env=env, check=True)
    return time.perf_counter() - start


def startup_import_us(python: str, env: dict) -> int | None:
    """Cumulative microseconds ``-X importtime`` gives ``scail_win._startup``, None if not imported."""
    proc = subprocess.run([python, "-X", "importtime", "-c", "pass"], env=env, capture_output=True,
                          text=True, check=True)
    for line in proc.stderr.splitlines():
        fields = line.split("|")
        if len(fields) == 3 and fields[2].strip() == "scail_win._startup":
            return int(fields[1])
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="interpreter to measure (default: this one)")
    parser.add_argument("--runs", type=int, default=40, help="runs per setting (default 40)")
    opts = parser.parse_args(argv)
    if opts.runs < 1:
        parser.error("--runs must be at least 1")

    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SCAIL_WIN_DISABLE")}
    on, off = dict(base), dict(base, SCAIL_WIN_DISABLE="1")
    import_us = startup_import_us(opts.python, on)
    if import_us is None:
        print(f"scail_win.pth did not run in {opts.python}: install scail-win there first "
              f"(pip install .)", file=sys.stderr)
        return 2

    timed_run(opts.python, on)  # warm the file-system cache
    times: dict[str, list[float]] = {"with hook": [], "without (SCAIL_WIN_DISABLE=1)": []}
    for _ in range(opts.runs):  # interleaved, so drift hits both alike
        times["with hook"].append(timed_run(opts.python, on))
        times["without (SCAIL_WIN_DISABLE=1)"].append(timed_run(opts.python, off))

    print(f"python -c pass, {opts.runs} runs each, {opts.python}")
    print(f"{'':32} {'median ms':>10} {'best ms':>10}")
    for label, values in times.items():
        print(f"{label:32} {statistics.median(values) * 1e3:10.2f} {min(values) * 1e3:10.2f}")
    medians = [statistics.median(v) * 1e3 for v in times.values()]
    bests = [min(v) * 1e3 for v in times.values()]
    print(f"{'overhead':32} {medians[0] - medians[1]:10.2f} {bests[0] - bests[1]:10.2f}")
    print(f"-X importtime, scail_win._startup (cumulative): {import_us / 1e3:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
