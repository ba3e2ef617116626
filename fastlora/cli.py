"""The `fastlora` command: `fastlora env` (setup report) and `fastlora bench` (kernel benchmarks)."""

from __future__ import annotations

import argparse
import json
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fastlora` console script; returns the exit code.

    Example:
        $ fastlora env            # readable report; exit code 1 when the installation is broken
        $ fastlora env --json
        $ fastlora bench --quick --op swiglu
    """
    parser = argparse.ArgumentParser(prog="fastlora", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the dispatcher decides")
    sub = parser.add_subparsers(dest="command", required=True)

    env = sub.add_parser("env", help="report the device, each op's backend and why, and problems found")
    env.add_argument("--json", action="store_true", help="print the report as JSON")
    env.add_argument("--device", default=None, help="device to report on (default: CUDA if present, else CPU)")

    bench = sub.add_parser("bench", help="benchmark the kernels against torch, torch.compile and peers")
    argv = sys.argv[1:] if argv is None else argv
    # The harness is imported only for `bench`, so that `env` keeps working when it cannot be.
    if next((a for a in argv if not a.startswith("-")), None) == "bench":
        from .benchmarks import cli as bench_cli

        bench_cli.add_arguments(bench)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.command == "env":
        return _env(args)
    return bench_cli.run(args)


def _env(args: argparse.Namespace) -> int:
    from .env import collect, format_report

    report = collect(args.device)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
