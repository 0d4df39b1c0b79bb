"""Setuptools shim: ships ``scail_win.pth`` at the top of site-packages.

setup.cfg cannot place a file outside the package, and the startup hook
must be a .pth file beside the packages, so build_py copies it there --
also for ``pip install -e .``, whose editable wheel does not take it from
build_lib.
"""
import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "scail_win.pth"


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        src = os.path.join(os.path.dirname(os.path.abspath(__file__)), PTH)
        self.copy_file(src, os.path.join(self._pth_dir(), PTH), preserve_mode=0)

    def _pth_dir(self):
        if self.editable_mode:
            # setuptools' editable_wheel zips the install command's install_lib
            # (its unpacked wheel) as it is, and only links packages from build_lib.
            return self.get_finalized_command("install").install_lib
        return self.build_lib

    def get_outputs(self, include_bytecode=1):
        outputs = super().get_outputs(include_bytecode)
        if self.editable_mode:
            return outputs
        return outputs + [os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": build_py_with_pth})
