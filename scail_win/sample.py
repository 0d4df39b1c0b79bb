"""``python -m scail_win.sample``: the ``sample`` command (same as ``scail-win sample``).

The command's parser and checks live in :mod:`scail_win.cli.sample`; the
sampling itself in :mod:`scail_win.sample_video`, the drop-in for upstream's.
"""
import sys

from .cli.sample import main

if __name__ == "__main__":
    sys.exit(main())
