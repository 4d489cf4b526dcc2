"""Fixtures of the kernel tests: `built` (the C++ kernel library, or a skip with the reason) and
`env_settings` (LEANFM_KERNELS* for one test). A test module with its own availability rule (paged
decode, 2:4) defines its own `built`, which takes precedence."""

from __future__ import annotations

import pytest
import torch

from leanfm.ops import kernels


@pytest.fixture(scope="module")
def built():
    if not kernels.kernels_enabled():
        pytest.skip("leanfm C++ kernels disabled by LEANFM_KERNELS=0")
    if not kernels.kernels_available():
        pytest.skip(f"leanfm C++ kernels unavailable: {kernels.status().get('error')}")
    return torch.ops.leanfm_kernels


@pytest.fixture
def env_settings(monkeypatch):
    """Set LEANFM_KERNELS* for one test; settings are re-read before and after."""

    def set_env(**env):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        kernels.reload_settings()

    yield set_env
    monkeypatch.undo()
    kernels.reload_settings()
