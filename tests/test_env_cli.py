import json
import subprocess
import sys
import textwrap

import pytest

import fastlora
from fastlora import env
from fastlora.cli import main


def test_env_text_report(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    info = fastlora.device_info()
    assert info.name in out
    assert f"recommended dtype {str(info.compute_dtype).removeprefix('torch.')}" in out
    assert "swiglu" in out
    assert "Status: OK" in out


def test_env_json_report(capsys):
    assert main(["env", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True
    assert report["device"]["vendor"] == fastlora.device_info().vendor
    ops = {o["op"]: o for o in report["ops"]}
    assert set(ops) == set(fastlora.dispatch.policies())
    backend, _ = fastlora.resolve_backend("swiglu", None, fastlora.device_info().compute_dtype)
    assert ops["swiglu"]["backend"] == backend.value
    assert all(c["ok"] for c in report["checks"])
    assert {"torch", "triton", "transformers", "peft", "bitsandbytes"} <= set(report["device"]["versions"])


def test_env_exits_non_zero_when_the_selected_backend_is_broken(monkeypatch, capsys):
    def broken(backend, device):
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setitem(env._SMOKE, "swiglu", broken)
    assert main(["env"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "PassManager::run failed" in out and "Status: BROKEN" in out


def test_env_exits_non_zero_when_a_forced_backend_cannot_run(monkeypatch, capsys):
    monkeypatch.setenv("FASTLORA_BACKEND_SWIGLU", "cuda")
    assert main(["env", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert any("swiglu: backend cuda" in e for e in report["errors"])


def test_env_warns_about_missing_bitsandbytes(monkeypatch):
    info = fastlora.device_info()
    fake = info.replace(versions={**info.versions, "bitsandbytes": None})
    warnings = env._warnings(fake)
    assert any("bitsandbytes not installed: 4-bit layers will not be patched" in w for w in warnings)


def test_env_warns_about_driver_without_cuda_torch(monkeypatch):
    monkeypatch.setattr(env, "_nvidia_driver_present", lambda: True)
    monkeypatch.setattr(env.torch.version, "cuda", None)
    assert any("NVIDIA driver present but torch has no CUDA" in w for w in env._warnings(fastlora.device_info()))


# Run in a fresh interpreter where `import triton` and `import bitsandbytes` fail, as on a machine without them.
_BLOCK_TRITON = textwrap.dedent("""
    import sys
    class _Blocked:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("triton", "bitsandbytes"):
                raise ImportError(f"{name} is blocked for this test")
    sys.meta_path.insert(0, _Blocked())
""")


def _run(code: str, **env_vars: str) -> subprocess.CompletedProcess:
    import os

    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environ.update(env_vars)
    return subprocess.run([sys.executable, "-c", _BLOCK_TRITON + textwrap.dedent(code)], capture_output=True,
                          text=True, env=environ, timeout=300)


def test_import_and_env_without_triton():
    proc = _run("""
        import fastlora, torch
        assert "triton" not in sys.modules
        info = fastlora.device_info("cpu")
        assert not info.triton_importable and "blocked" in info.triton_reason, info
        g = torch.randn(5, 7)
        y = fastlora.swiglu(g, g)
        torch.testing.assert_close(y, fastlora.ops.swiglu_reference(g, g))
        w = fastlora.quantize_nf4(torch.randn(8, 70), blocksize=32)
        backend, _ = fastlora.resolve_backend("nf4_dequantize", "cpu", torch.float32)
        assert backend in (fastlora.Backend.CPP, fastlora.Backend.TORCH), backend
        assert torch.equal(fastlora.dequantize_nf4(w), fastlora.dequantize_nf4(w, backend="torch"))
        from fastlora.cli import main
        sys.exit(main(["env"]))
    """)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "triton cannot be imported" in proc.stdout
    assert "Status: OK" in proc.stdout


def test_import_touches_no_gpu_and_no_triton():
    proc = _run("""
        import os
        before = dict(os.environ)
        sys.meta_path.pop(0)  # triton may be importable here: importing fastlora must still not import it
        import fastlora
        import torch
        assert "triton" not in sys.modules, "import fastlora imported triton"
        assert "fastlora.kernels.swiglu" not in sys.modules
        assert not torch.cuda.is_initialized()
        assert dict(os.environ) == before, "import fastlora changed the environment"
    """)
    assert proc.returncode == 0, proc.stderr


def test_broken_native_build_falls_back_with_its_reason(tmp_path):
    src = tmp_path / "csrc"
    (src / "cpu").mkdir(parents=True)
    (src / "cpu" / "broken.cpp").write_text("this is not C++;\n")
    proc = _run("""
        import logging
        logging.basicConfig(level=logging.WARNING)
        import fastlora, torch
        backend, reason = fastlora.resolve_backend("swiglu", "cpu", torch.float32)
        assert backend is fastlora.Backend.TORCH, (backend, reason)
        g = torch.randn(3, 3)
        fastlora.swiglu(g, g)
        try:
            fastlora.swiglu(g, g, backend="cpp")
        except fastlora.BackendUnavailableError as e:
            print("RAISED", e)
    """, FASTLORA_CSRC_DIR=str(src), FASTLORA_CACHE_DIR=str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr
    assert "native extension unavailable" in proc.stderr
    assert "RAISED swiglu: backend cpp was requested" in proc.stdout
    assert "Error building extension" in proc.stdout


def test_native_can_be_disabled():
    proc = _run("""
        import fastlora, torch
        backend, reason = fastlora.resolve_backend("swiglu", "cpu", torch.float32)
        assert backend is fastlora.Backend.TORCH
        print(fastlora._native.load_error())
    """, FASTLORA_NATIVE="0")
    assert proc.returncode == 0, proc.stderr
    assert "disabled by FASTLORA_NATIVE=0" in proc.stdout


@pytest.mark.gpu
def test_env_on_gpu_runs_triton(capsys):
    assert main(["env", "--json", "--device", "cuda"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["device"]["vendor"] in ("nvidia", "amd")
    assert any(c["backend"] == "triton" and c["ok"] for c in report["checks"])


def test_a_first_build_says_so_once_and_a_built_extension_loads_quietly(tmp_path, monkeypatch, caplog):
    """The just-in-time build stalls the first use for seconds: one WARNING names it and where it goes; when the
    library is already built for these sources, nothing is said (the build itself is stubbed here)."""
    import logging

    from torch.utils import cpp_extension

    from fastlora import _native

    built = []
    monkeypatch.setenv("FASTLORA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", lambda name, build_directory, **_: built.append((name, build_directory)))
    with caplog.at_level(logging.WARNING, logger="fastlora"):
        _native._build_jit()
    (name, where), = built
    assert [r.getMessage() for r in caplog.records if "building fastlora's native kernels" in r.getMessage()] == [
        f"building fastlora's native kernels, once for these sources and this torch (~10-30 s), in {where}"]
    (tmp_path / name / f"{name}.so").write_bytes(b"")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastlora"):
        _native._build_jit()
    assert not caplog.records and len(built) == 2


def test_env_runs_every_ops_chosen_backend_once(monkeypatch, tmp_path):
    """Each op's chosen backend computes a small case against its reference; a wrong result is an error. A report
    measures nothing, even with tuning on (every check names its backend)."""
    import importlib

    from fastlora import tuning

    ce = importlib.import_module("fastlora.ops.cross_entropy")  # the package's cross_entropy is the function
    monkeypatch.setenv("FASTLORA_TUNE", "1")
    monkeypatch.setenv("FASTLORA_TUNING_CACHE", str(tmp_path / "tuning.json"))
    report = env.collect("cpu")
    checks = {c["op"]: c for c in report["checks"]}
    assert set(checks) == set(fastlora.dispatch.policies()) and all(c["ok"] for c in checks.values()), checks
    assert tuning.tuner().decisions() == {}
    monkeypatch.setattr(ce, "cross_entropy_reference", lambda logits, labels: ce.cross_entropy(logits, labels) + 1)
    report = env.collect("cpu")
    assert not report["ok"]
    assert any("cross_entropy on torch differs from the reference" in e for e in report["errors"])
