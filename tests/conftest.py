"""Shared pytest setup: CPU-only JAX, deterministic-enough defaults, optional torch references."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XFORMERS_DISABLED", "1")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~30 s on 2 CPU cores")
