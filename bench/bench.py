#!/usr/bin/env python3
"""Measurement driver for bench/run.sh and bench/profile.sh: one subcommand per
phase (``bench.py --help``). The code is the package bench/harness/, whose
__init__.py describes its layout; this file only starts it."""

from harness.cli import main

if __name__ == "__main__":
    main()
