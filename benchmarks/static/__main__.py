"""``python -m fastlora.benchmarks.static [--out DIR] [--json] [--device NAME ...] [--case SUBSTRING]``: the static
report of every kernel case (see the package docstring), as a Markdown table, and CSV and Markdown files in DIR."""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from .analyse import analyse_all

_COLUMNS = ("case", "kernel", "device", "regs", "spills", "smem_kb", "warps", "occupancy", "limiter", "ctas", "waves",
            "loads", "stores", "tensor_core", "loop_instr", "instr_per_weight", "bound", "est_us", "roofline_pct",
            "vs_dequant_cublas")


def _markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in _COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def _environment() -> dict[str, str]:
    """What the report was made with: it is only true of this Triton and ptxas."""
    import datetime

    import triton

    from ..results import fastlora_commit
    from .sass import ptxas_for

    version = subprocess.run([ptxas_for(90), "--version"], capture_output=True, text=True, check=False).stdout
    return {"triton": triton.__version__, "ptxas": (version.strip().splitlines() or ["?"])[-1],
            "fastlora": fastlora_commit() or "?", "date": datetime.date.today().isoformat()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastlora.benchmarks.static", description=__doc__)
    parser.add_argument("--out", type=Path, help="write static.csv and static.md there")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON (what the tests read)")
    parser.add_argument("--device", action="append",
                        help="H100 SXM, H200, A100 80GB, MI300X (default: H100 SXM, A100 80GB, MI300X)")
    parser.add_argument("--case", help="only the cases whose name contains this")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 is set: the kernels would be defined for the interpreter; unset it")
    rows = analyse_all(args.device or ["H100 SXM", "A100 80GB", "MI300X"], args.case)
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        return 0
    stamp = _environment()
    for row in rows:
        row.update(stamp)
    table = f"Static report: {', '.join(f'{k} {v}' for k, v in stamp.items())}\n\n{_markdown(rows)}"
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "static.md").write_text(table + "\n")
        with open(args.out / "static.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=_COLUMNS + tuple(stamp), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
