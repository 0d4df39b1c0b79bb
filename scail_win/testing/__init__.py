"""Test support shipped with the package: the tiny random SCAIL behind ``--smoke``."""
