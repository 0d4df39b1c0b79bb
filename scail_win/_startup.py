"""What ``scail_win.pth`` runs at every interpreter start-up: install the import hook.

Every Python process of the environment pays for this module, so it uses the
standard library only and does nothing beyond installing the finder and, when
``sys.argv[0]`` is SCAIL's ``sample_video.py``, arming the script redirect
(``benchmarks/bench_startup.py`` measures the cost). ``SCAIL_WIN_DISABLE=1``
is checked by the .pth line already; it is checked again here for a direct
``import scail_win._startup``.
"""
import sys

from scail_win import hook

if not hook.disabled_by_env():
    hook.install()
    hook.redirect_script(sys.argv)
