"""``python -m fastlora.benchmarks.static.timed --out DIR`` (a GPU only): every static case timed on the GPU beside
what the static model estimated for it, so that the model is checked where it can be. Writes DIR/static-timed.csv
and prints the table; one run takes about a minute on an H100."""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

from . import cases
from .analyse import analyse
from .devices import DEVICES, Device


def device_model(name: str) -> Device:
    """The static model's entry for a GPU name (``NVIDIA H100 80GB HBM3`` -> ``H100 SXM``)."""
    for key, model in DEVICES.items():
        if key.split()[0] in name:
            return model
    raise ValueError(f"no static model of {name!r}; known: {', '.join(DEVICES)}")


def time_us(fn, warmup: int = 3, repeats: int = 20) -> tuple[float, float, float]:  # noqa: ANN001
    """Median, 20th and 80th percentile of ``fn()``'s GPU time, CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    times.sort()
    return times[len(times) // 2], times[len(times) // 5], times[(4 * len(times)) // 5]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastlora.benchmarks.static.timed", description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU: the static report itself (python -m fastlora.benchmarks.static) needs none")
    gpu = torch.cuda.get_device_properties(0)
    model = device_model(gpu.name)
    cases.DEVICE = torch.device("cuda")
    rows = []
    for case in cases.all_cases():
        estimate = analyse(case, model)
        median, p20, p80 = time_us(lambda c=case: c.launcher((gpu.multi_processor_count, gpu.major)))
        for row in estimate:  # one row per kernel launch; the time is the whole launcher's
            row.update(gpu=gpu.name, measured_us=round(median, 1), p20_us=round(p20, 1), p80_us=round(p80, 1),
                       measured_roofline_pct=round(100 * case.min_bytes / model.hbm_bytes_s / (median * 1e-6), 1)
                       if not case.flops else None, est_over_measured=round(row["est_us"] / median, 2))
            rows.append(row)
            print(f"{row['case']:<42} est {row['est_us']:>8} us  measured {median:>8.1f} us "
                  f"[{p20:.1f}, {p80:.1f}]  est/measured {row['est_over_measured']}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    columns = ["case", "kernel", "gpu", "device", "est_us", "measured_us", "p20_us", "p80_us", "est_over_measured",
               "roofline_pct", "measured_roofline_pct", "bound", "regs", "occupancy", "waves"]
    with open(args.out / "static-timed.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
