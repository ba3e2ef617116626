import json

import pytest
import torch

import fastlora
import fastlora.testing  # noqa: F401
from fastlora.device import DeviceInfo, device_info


def test_cpu_probe():
    info = device_info("cpu")
    assert info.vendor == "cpu" and info.device_type == "cpu" and not info.is_gpu
    assert info.total_memory > 0 and 0 < info.free_memory <= info.total_memory
    assert info.compute_dtype == torch.float32  # on every CPU (tests/test_dispatch.py simulates several)
    assert info.bf16 == bool({"avx512_bf16", "amx_bf16"} & info.cpu_features)
    assert not info.tf32
    assert info.arch == torch.backends.cpu.get_cpu_capability()
    assert torch.__version__.startswith(info.versions["torch"].split("+")[0])
    assert info.torch_device == torch.device("cpu")


def test_probe_is_cached():
    assert device_info("cpu") is device_info(torch.device("cpu"))
    if not torch.cuda.is_available():
        assert device_info() is device_info("cpu")


def test_cpu_features_come_from_the_cpu():
    info = device_info("cpu")
    flags = open("/proc/cpuinfo").read() if __import__("os").path.exists("/proc/cpuinfo") else ""
    for feature in info.cpu_features:
        assert feature in flags
    if " avx2 " in f" {flags} ".replace("\n", " "):
        assert "avx2" in info.cpu_features


def test_cpu_features_are_what_this_process_can_execute(monkeypatch):
    """/proc/cpuinfo can describe another CPU than the one code runs on (an emulator such as qemu-user runs a CPU
    without AVX-512 on a host with it): torch's CPUID probes filter the x86 features."""
    import fastlora.device as device

    monkeypatch.setattr(device, "_cpu_flags", lambda: {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"})
    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx2_supported", lambda: True, raising=False)
    monkeypatch.setattr(device.platform, "machine", lambda: "x86_64")
    info = device._probe_cpu({})
    assert info.cpu_features == {"avx2", "fma"} and not info.bf16 and info.compute_dtype == torch.float32


def test_bad_device_type():
    with pytest.raises(ValueError, match="device_info: unsupported device type 'meta'"):
        device_info("meta")


def test_report_is_json_serialisable():
    d = device_info("cpu").to_dict()
    assert json.loads(json.dumps(d))["compute_dtype"] == "float32"


def test_simulated_devices_are_hashable_and_replaceable():
    info = fastlora.testing.SIMULATED_DEVICES["h100"]
    other = info.replace(name="other")
    assert isinstance(other, DeviceInfo) and other.name == "other" and info.name != "other"
    assert hash(info) != hash(other)


@pytest.mark.gpu
def test_cuda_probe():
    info = device_info("cuda")
    props = torch.cuda.get_device_properties(0)
    assert info.name == props.name and info.total_memory == props.total_memory
    assert info.capability == (props.major, props.minor)
    if info.vendor == "nvidia":
        assert info.bf16 == (props.major >= 8) and info.tf32 == info.bf16
    assert info.compute_dtype == (torch.bfloat16 if info.bf16 else torch.float16)
    assert info.triton_usable, info.triton_reason
