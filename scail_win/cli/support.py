"""What every scail-win command does around its work: logging and exit codes.

A :class:`~scail_win.errors.UserError` becomes one ``error:`` line and exit
status 2; Ctrl-C exits 130; anything else is a bug and says so in one line,
with the traceback only under ``--debug``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from ..errors import UserError

log = logging.getLogger("scail_win")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults, but not the empty ones (None, False) that say nothing."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def setup_logging(quiet: bool = False, debug: bool = False) -> None:
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s" if debug else "%(message)s",
                        stream=sys.stderr, force=True)


def run_cli(body: Callable[[], int], debug: bool = False) -> int:
    """Run ``body`` and map its outcome to an exit status."""
    try:
        return int(body() or 0)
    except UserError as exc:
        if debug:
            log.exception("error")
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not a user mistake: say so briefly
        if debug:
            log.exception("unexpected error")
        else:
            print(f"error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
