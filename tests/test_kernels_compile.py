"""Every Triton kernel compiles for H100 (sm_90), A100 (sm_80) and Turing (sm_75, no bf16) as its launchers call
it, and the NF4 kernels' loads and stores stay wide: checked on a machine without a GPU by Triton's ahead-of-time
compiler (tests/compile_kernels.py), since the interpreter that runs the kernels here never compiles them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")


@pytest.fixture(scope="module")
def report():
    import inspect

    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
        from triton.compiler import ASTSource
    except Exception as e:  # no NVIDIA backend in this Triton build (not x86-64 Linux, say)
        pytest.skip(f"Triton has no NVIDIA backend here: {e}")
    if "constexprs" not in inspect.signature(ASTSource).parameters:  # older Triton names its arguments otherwise
        pytest.skip(f"Triton {triton.__version__}'s ahead-of-time API differs from the one the script uses")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("compile_kernels.py"))], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


def test_every_kernel_variant_compiles_for_every_target(report):
    assert len({row["case"] for row in report}) >= 40
    failed = [f"{row['case']} on {row['target']}: {row['error']}" for row in report if not row["ok"]]
    assert not failed, "\n\n".join(failed)


def test_nf4_dequantize_loads_a_row_of_packed_bytes_at_once_and_stores_wide(report):
    rows = [row for row in report if row["kernel"] == "nf4_dequantize_fwd_kernel"]
    assert len(rows) == 2 * 3 * 3 - 2  # nested or plain, three dtypes, three targets less Turing's bf16
    for row in rows:
        # A thread's four packed bytes are one 32-bit load; the only byte loads left are the absmax codes.
        assert row["loads"].get("ld.global.b8", 0) <= ("nested" in row["case"]), row
        assert all(kind.startswith("st.global.v") for kind in row["stores"]), row


def test_nf4_matmul_reads_byte_runs_not_a_byte_per_element(report):
    rows = [row for row in report if row["kernel"] == "nf4_matmul_fwd_kernel"]
    assert len(rows) == 2 * 2 * 3 - 2
    for row in rows:
        # 192 byte loads a thread when every element gathered its own byte; the absmax codes remain.
        assert row["loads"].get("ld.global.b8", 0) <= 4, row
