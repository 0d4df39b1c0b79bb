"""``python -m scail_win {sample,convert,doctor,hook,pose}`` and the ``scail-win`` command.

Thin on purpose: each subcommand's module owns its parser and its
``main(argv) -> int``; nothing heavy is imported before one is chosen, so
``--help`` is instant.
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import List, Optional

COMMANDS = {
    "sample": ("scail_win.cli.sample", "make videos (ref image + pose video -> animation)"),
    "convert": ("scail_win.weights.convert", "convert SCAIL-Preview weights to safetensors (bf16 or fp8)"),
    "doctor": ("scail_win.cli.doctor", "check this machine, the SCAIL checkout and the weights"),
    "hook": ("scail_win.hook", "show whether the startup import hook is active and what it redirects"),
    "pose": ("scail_win.pose.cli", "make SCAIL's pose video (rendered.mp4) from a driving video"),
}


def usage() -> str:
    lines = ["usage: scail-win {" + ",".join(COMMANDS) + "} [options]", "", "commands:"]
    lines += [f"  {name:<8} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Run 'scail-win COMMAND --help' for a command's options."]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from . import __version__
        print(f"scail-win {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"scail-win: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


def run() -> None:
    """Console-script entry point; also what ``python -m scail_win`` runs."""
    try:
        status = main()
        # Flush here, inside the handler: a failed flush at interpreter exit
        # is only reported as "Exception ignored ... BrokenPipeError".
        if sys.stdout is not None:  # None under pythonw
            sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`scail-win hook | head`). Point stdout at the
        # null device so the exit-time flush of what is still buffered cannot
        # fail again, and exit 1 as Python itself does on EPIPE.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        status = 1
    sys.exit(status)


if __name__ == "__main__":
    run()
