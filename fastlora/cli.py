"""The `fastlora` command: `fastlora demo` (train unpatched vs patched), `fastlora env` (setup report) and
`fastlora bench` (kernel benchmarks)."""

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

    demo = sub.add_parser("demo", help="train a small LoRA model unpatched, then patched, and compare")
    demo.add_argument("--steps", type=int, default=20, help="training steps per run (default 20)")
    demo.add_argument("--size", default=None, help="tiny (CPU default), small, or 8b (GPU default; random weights)")
    demo.add_argument("--model", default=None, help="a local transformers model directory to fine-tune instead")
    demo.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 4; 2 on a GPU)")
    demo.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 64; 2048 on a GPU)")
    demo.add_argument("--no-4bit", action="store_true", help="keep the base weights dense")
    demo.add_argument("--device", default=None, help="device (default: CUDA if present, else CPU)")
    demo.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                      help="what the model trains in (default: bfloat16 or float16 on a GPU, float32 on a CPU)")

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
    if args.command == "demo":
        return _demo(args)
    return bench_cli.run(args)


def _demo(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from .demo import format_result, run_demo

    gpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    with tqdm(total=2 * args.steps, desc="demo", unit="step", file=sys.stderr) as bar:
        def progress(text: str) -> None:
            bar.set_postfix_str(text)
            bar.update(1)

        result = run_demo(steps=args.steps, size=args.size or ("8b" if gpu else "tiny"), model_path=args.model,
                          device=args.device, batch_size=args.batch_size or (2 if gpu else 4),
                          seq_len=args.seq_len or (2048 if gpu else 64), four_bit=not args.no_4bit,
                          dtype=args.dtype, progress=progress)
    print(format_result(result))
    return 0


def _env(args: argparse.Namespace) -> int:
    from .env import collect, format_report

    report = collect(args.device)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
