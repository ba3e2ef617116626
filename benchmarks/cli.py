"""``fastlora bench``: run the suites, print a comparison table per suite, append the results to the CSV.

``fastlora/cli.py`` wires :func:`add_arguments` and :func:`run` into its ``bench`` subcommand;
``python -m fastlora.benchmarks`` runs the same thing on its own.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from tqdm import tqdm

import fastlora
from fastlora.device import parse_dtype

from . import report, results
from .harness import Roofline, run_suite
from .suites import SUITES, roofline, select
from .training import run as run_training


def _suite_names(value: str) -> list[str]:
    """argparse type of ``--op``: a name or comma list of names, each a known suite."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    try:
        select(names)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``fastlora bench`` to ``parser``.

    Example:
        >>> parser = argparse.ArgumentParser(prog="fastlora bench")
        >>> add_arguments(parser)
        >>> parser.parse_args(["--op", "swiglu", "--quick"]).op
        [['swiglu']]
    """
    parser.add_argument("--op", action="append", type=_suite_names, metavar="NAME",
                        help=f"suite to run; repeat or give a comma list (available: {', '.join(SUITES)}); "
                             "default: all. The roofline always runs first, since shares depend on it")
    parser.add_argument("--quick", action="store_true",
                        help="small shapes and short timing windows: a smoke test, not a measurement")
    parser.add_argument("--results-dir", default=None, metavar="DIR",
                        help="where <device>.csv is appended to (default: $FASTLORA_RESULTS_DIR, else "
                             "~/.local/share/fastlora/results, $XDG_DATA_HOME honoured)")
    parser.add_argument("--no-save", action="store_true", help="print the tables only, write no CSV")
    parser.add_argument("--checkpointing", action="store_true",
                        help="time whole training steps (8B shape, 8K and 32K tokens) with offloaded against in-GPU "
                             "checkpointing, instead of the kernel suites (unless --op is given too)")
    parser.add_argument("--max-context", action="store_true",
                        help="search the longest sequence that trains before the GPU runs out of memory, for HF + "
                             "PEFT + bitsandbytes and for fastlora with and without offloaded checkpointing")
    parser.add_argument("--static", action="store_true",
                        help="no timing: compile every kernel for sm_90a, sm_80 and gfx942 at Llama-8B shapes and "
                             "report what the compiler made and the time it predicts (needs no GPU; results in "
                             "DIR/static)")
    parser.add_argument("--device", default=None,
                        help="torch device to run on, e.g. cpu or cuda:1 (default: the GPU if there is one)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="what the suites and training steps compute in (default: the device's compute dtype, "
                             "bfloat16 or float16 on a GPU, float32 on a CPU)")


def run(args: argparse.Namespace) -> int:
    """Run the suites chosen by ``args`` (from :func:`add_arguments`); return the exit status.

    The status is 0 unless a fastlora provider fails the correctness gate or crashes (1), or the arguments
    are invalid (2). Unavailable providers and failing baselines are reported in the tables, not failures.

    Example:
        >>> parser = argparse.ArgumentParser(); add_arguments(parser)
        >>> run(parser.parse_args(["--op", "swiglu", "--quick", "--no-save"]))
        0
    """
    if getattr(args, "static", False):
        return _run_static(None if args.no_save else results.results_dir(args.results_dir) / "static")
    # A hand-built namespace may lack the newer options.
    checkpointing, max_ctx = bool(getattr(args, "checkpointing", False)), bool(getattr(args, "max_context", False))
    training = checkpointing or max_ctx
    try:
        suites = select(_op_names(args.op)) if args.op or not training else []
        device = _device(args.device)
        if max_ctx and device.type != "cuda":
            raise ValueError("--max-context needs a CUDA device: a CPU swaps instead of running out of memory")
    except (ValueError, RuntimeError) as e:
        print(f"fastlora bench: {e}", file=sys.stderr)
        return 2
    quick = bool(args.quick)
    dtype = parse_dtype(args.dtype) if getattr(args, "dtype", None) else None
    info = fastlora.device_info(device)
    total = sum(len(s.cases(device, quick)) for s in suites)
    measured: Roofline | None = None
    fatal = False
    commit = results.fastlora_commit()
    print(f"fastlora {fastlora.__version__}{f' ({commit})' if commit else ''} bench on {info.name} ({device}), "
          f"torch {torch.__version__}{', quick' if quick else ''}")
    with tqdm(total=total, desc="bench", unit="case", file=sys.stderr, leave=False, dynamic_ncols=True) as bar:
        for suite in suites:
            done = run_suite(suite, device, quick=quick, roofline=measured, progress=bar, dtype=dtype)
            if suite is roofline.SUITE:
                measured = roofline.from_results(done)
                if measured is not None:
                    roofline.remember(device, measured, quick=quick)
                    done = [r.with_roofline(measured) for r in done]
                tqdm.write(report.format_roofline(info.name, measured), file=sys.stdout)
            fatal |= any(r.fatal for r in done)
            lines = [report.format_table(suite, done)]
            if not args.no_save:
                path = results.save(done, device, quick=quick, directory=args.results_dir)
                if path is not None:
                    lines.append(f"{sum(r.ok for r in done)} rows appended to {path}")
            tqdm.write("\n" + "\n".join(lines), file=sys.stdout)
    if training:
        done = run_training(device, checkpointing=checkpointing, max_ctx=max_ctx, quick=quick, dtype=dtype)
        fatal |= any(r.fatal for r in done)
        if not args.no_save:
            path = results.save(done, device, quick=quick, directory=args.results_dir)
            if path is not None:
                print(f"{sum(r.ok for r in done)} rows appended to {path}")
    if fatal:
        print("fastlora bench: a fastlora provider failed the correctness gate (see the notes above)",
              file=sys.stderr)
    return 1 if fatal else 0


def _op_names(op: Iterable[str | Iterable[str]] | None) -> Iterator[str]:
    """The names given to ``--op``: argparse makes a list per option; a hand-built namespace may hold strings."""
    for entry in op or ():
        if isinstance(entry, str):
            yield entry
        else:
            yield from entry


def _device(name: str | None) -> torch.device:
    """The device to run on; a device torch cannot use here is an error, not a silent fallback."""
    if name is None:
        return fastlora.device_info().torch_device
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: the benchmarks run on cpu or cuda, not {device.type}")
    return fastlora.device_info(device).torch_device


def _run_static(out: Path | None) -> int:
    """The static report (fastlora.benchmarks.static) in a process of its own: the kernels must be defined for the
    GPU compiler, which ``TRITON_INTERPRET=1`` in this one would prevent."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "fastlora.benchmarks.static", "--device", "H100 SXM", "--device", "H200",
               "--device", "A100 80GB", "--device", "MI300X"]
    return subprocess.run(command + (["--out", str(out)] if out else []), env=env, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    """``python -m fastlora.benchmarks [--op NAME] [--quick] ...``.

    Example:
        >>> main(["--op", "roofline", "--quick", "--no-save"])
        0
    """
    parser = argparse.ArgumentParser(prog="python -m fastlora.benchmarks",
                                     description="Run the benchmark suites and compare the providers.")
    add_arguments(parser)
    return run(parser.parse_args(argv))
