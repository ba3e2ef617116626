"""pytest-benchmark over every suite: ``pytest benchmarks/`` gates and times each case of each suite.

Quick shapes unless ``FASTLORA_BENCH_FULL=1``. Cases run in suite order, the reference provider first within a
shape and mode, so the gate's reference outputs are computed once per shape and mode.

The harness is imported as ``fastlora.benchmarks``: pytest runs in importlib mode and the repository root is
never on sys.path (its ``kernels/`` would shadow the ``kernels`` package transformers imports).
"""

from __future__ import annotations

import os
import re

import pytest
import torch

import fastlora
from fastlora.benchmarks.harness import Roofline
from fastlora.benchmarks.suites import SUITES, roofline

QUICK = os.environ.get("FASTLORA_BENCH_FULL") != "1"


def _device() -> torch.device:
    return fastlora.device_info().torch_device


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``bench_case`` with every (suite, shape, mode, provider) of every suite, in run order."""
    if "bench_case" not in metafunc.fixturenames:
        return
    device = _device()
    params, ids = [], []
    for suite in SUITES.values():
        for shape, mode, provider in suite.cases(device, QUICK):
            params.append((suite, shape, mode, provider))
            ids.append(re.sub(r"[^\w^.]+", "_", f"{suite.name}-{suite.label(shape)}-{mode}-{provider.name}"))
    metafunc.parametrize("bench_case", params, ids=ids)


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    """The device the suites run on: the GPU if there is one, else the CPU."""
    return _device()


@pytest.fixture(scope="session")
def bench_quick() -> bool:
    """True unless FASTLORA_BENCH_FULL=1 asks for the full shapes."""
    return QUICK


@pytest.fixture(scope="session")
def bench_roofline(bench_device: torch.device, bench_quick: bool) -> Roofline | None:
    """The device's roofline, measured once per session (only when a timed test asks for it)."""
    return roofline.measure(bench_device, quick=bench_quick)
