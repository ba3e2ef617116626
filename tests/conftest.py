"""Test setup: the Triton interpreter on machines without a GPU, the gpu marker, and NaN-poisoned outputs."""

import os

import torch

# Triton decides at kernel definition whether to interpret, so this must happen before any kernel module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The static dispatch table, not measured choices: a test must run the same backend on every machine and run
# (tests/test_tuning.py turns measuring on where it is the subject).
os.environ.setdefault("FASTLORA_TUNE", "0")

import pytest  # noqa: E402

import fastlora.kernels._utils as kernel_utils  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

# Under pytest-xdist (pytest -n N), the workers share the cores: torch's default of one thread per core in each would
# oversubscribe them, and spinning OpenMP threads stall each other (the suite took 1:48 on 2 cores that way, 1:18
# with one thread per worker).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def poison_allocations(monkeypatch):
    """Every buffer fastlora allocates starts as NaN, so an unwritten output element cannot pass."""
    monkeypatch.setattr(kernel_utils, "POISON", True)
    yield


@pytest.fixture
def device():
    """Where the kernels under test run: the GPU when there is one, else the CPU (Triton interpreted)."""
    return torch.device("cuda") if HAS_CUDA else torch.device("cpu")


@pytest.fixture
def triton_device(device):
    """The device, or a skip when Triton cannot run there (not installed, or no GPU and no interpreter)."""
    import fastlora

    info = fastlora.device_info(device)
    if not info.triton_usable:
        pytest.skip(f"Triton unusable here: {info.triton_reason}")
    return device


@pytest.fixture
def fused_calls(monkeypatch):
    """The names of the fused LoRA ops the patched modules call (lora_linear, lora_qkv), in order."""
    import fastlora.patching.lora_layers as layers
    import fastlora.patching.qkv as qkv

    calls = []
    for module, name in ((layers, "lora_linear"), (qkv, "lora_qkv")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    return calls
