"""Test-session settings that must be in place before torch loads."""

import os

# As the stages do (stages/_common.py): OpenMP threads that busy-wait make a shared 2-core machine crawl.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
