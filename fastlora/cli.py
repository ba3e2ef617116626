"""The `fastlora` command: `fastlora demo` (train unpatched vs patched), `fastlora env` (setup report),
`fastlora tune` (measured dispatch ahead of a run), `fastlora plan` (the memory a training step needs, and the
longest sequence that fits a GPU) and `fastlora bench` (kernel benchmarks)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2): the usage is one ``--help`` away."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _at_least(least: int, why: str = "") -> Callable[[str], int]:
    """An argparse type: an integer of at least ``least``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}{why}, got {value}")
        return value

    return parse


def _device(text: str) -> str:
    """An argparse type: a device this torch can use (a CUDA request on a CPU build says so)."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r} (cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and torch.version.cuda is None and torch.version.hip is None:
        raise argparse.ArgumentTypeError(f"{text}: this torch has no CUDA (a CPU build: torch {torch.__version__})")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r} (cpu, cuda, cuda:N)")
    return text


def _model_dir(text: str) -> str:
    """An argparse type: a local model directory (nothing is downloaded)."""
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"no such directory: {text}")
    return text


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fastlora` console script; returns the exit code.

    Example:
        $ fastlora env            # readable report; exit code 1 when the installation is broken
        $ fastlora env --json
        $ fastlora bench --quick --op swiglu
    """
    parser = _Parser(prog="fastlora", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the dispatcher decides")
    sub = parser.add_subparsers(dest="command", required=True)

    env = sub.add_parser("env", help="report the device, each op's backend and why, and problems found")
    env.add_argument("--json", action="store_true", help="print the report as JSON")
    env.add_argument("--device", default=None, type=_device,
                     help="device to report on (default: CUDA if present, else CPU)")

    demo = sub.add_parser("demo", help="train a small LoRA model unpatched, then patched, and compare")
    demo.add_argument("--steps", type=_at_least(2, " (the first one warms up)"), default=20,
                      help="training steps per run (default 20)")
    demo.add_argument("--size", default=None, choices=("tiny", "small", "8b"),
                      help="tiny (CPU default), small, or 8b (GPU default; random weights)")
    _model_arguments(demo)

    tune = sub.add_parser("tune", help="measure each op's backends at a model's shapes ahead of a run (the "
                                       "decisions are kept on disk and used by later runs)")
    tune.add_argument("--config", default=None, choices=("tiny", "small", "8b"),
                      help="tiny (CPU default), small or 8b: a Llama-architecture model with random weights")
    _model_arguments(tune)

    plan = sub.add_parser("plan", help="plan the memory of a LoRA/QLoRA training step on a GPU (no GPU needed: the "
                                       "step runs on the meta device) and the longest sequence that fits")
    _plan_arguments(plan)

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
    if args.command == "tune":
        return _tune(args)
    if args.command == "plan":
        return _plan(args)
    return bench_cli.run(args)


def _tune(args: argparse.Namespace) -> int:
    """One patched training step of the model at the given shapes with measuring on: every op meets its sizes once,
    and the decisions made are printed (they are kept in the tuning file for later runs)."""
    import torch

    from . import tuning
    from .demo import build_model
    from .device import device_info, parse_dtype
    from .patching import patch

    if not tuning.enabled():
        print("fastlora tune: FASTLORA_TUNE=0 is set, so nothing would be measured", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    dtype = parse_dtype(args.dtype) if args.dtype else device_info(device).compute_dtype
    model, _, what = build_model(args.config or ("8b" if gpu else "tiny"), device, dtype, four_bit=not args.no_4bit,
                                 seed=0, model_path=args.model)
    patch(model)
    model.train()
    vocab = model.get_base_model().config.vocab_size
    ids = torch.randint(0, vocab, (args.batch_size or (2 if gpu else 4), args.seq_len or (2048 if gpu else 64)),
                        device=device)
    before = set(tuning.tuner().decisions())
    model(input_ids=ids, labels=ids).loss.backward()
    new = {k: m for k, m in tuning.tuner().decisions().items() if k not in before}
    print(f"fastlora tune: {what}, {tuple(ids.shape)} tokens, {str(dtype).removeprefix('torch.')}; "
          f"{len(new)} new decisions in {tuning.tuner().path}")
    for key, m in sorted(new.items()):
        times = ", ".join(f"{b} {t} us" for b, t in m.times_us.items())
        excluded = "".join(f"; {b} excluded: {why}" for b, why in m.excluded.items())
        print(f"  {key}  ->  {m.backend}  ({times}{excluded})")
    return 0


def _plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="a known model (llama-3.1-8b, llama-3-8b, llama-3-70b, "
                                                        "llama-3.1-70b) or a path to a config.json")
    parser.add_argument("--gpu", default="H100-80GB", help="a GPU from the table (H100-80GB, A100-40GB, L4-24GB, "
                                                          "T4-16GB, 8GB, ...), 'cpu', or a size in bytes")
    parser.add_argument("--seq-len", type=_at_least(1), default=2048, help="tokens per sequence (default 2048)")
    parser.add_argument("--batch-size", type=_at_least(1), default=1, help="sequences per step (default 1)")
    parser.add_argument("--rank", type=_at_least(1), default=16, help="LoRA rank on every linear layer (default 16)")
    parser.add_argument("--qlora", action="store_true", help="NF4 base weights (bitsandbytes, double quant)")
    parser.add_argument("--checkpointing", choices=("off", "standard", "offload"), default="off",
                        help="gradient checkpointing: off, standard (transformers') or offload (fastlora's, to CPU)")
    parser.add_argument("--unpatched", action="store_true", help="plan the HF + PEFT (+ bitsandbytes) baseline")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="model dtype (default: the GPU's compute dtype)")
    parser.add_argument("--no-max", action="store_true", help="skip the search for the longest sequence")
    parser.add_argument("--max-seq-len-cap", type=int, default=None,
                        help="search up to this length (default: the model's max_position_embeddings)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def _plan(args: argparse.Namespace) -> int:
    from .plan import plan

    device = int(args.gpu) if args.gpu.isdigit() else args.gpu
    result = plan(args.config, batch=args.batch_size, seq_len=args.seq_len, rank=args.rank,
                  quant="nf4" if args.qlora else None,
                  checkpointing=None if args.checkpointing == "off" else args.checkpointing,
                  patched=not args.unpatched, device=device, dtype=args.dtype, search_max_seq_len=not args.no_max,
                  max_seq_len_cap=args.max_seq_len_cap)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result)
    return 0


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and batch options `demo` and `tune` share."""
    parser.add_argument("--model", default=None, type=_model_dir, help="a local transformers model directory instead")
    parser.add_argument("--batch-size", type=_at_least(1), default=None,
                        help="sequences per step (default 4; 2 on a GPU)")
    parser.add_argument("--seq-len", type=_at_least(2, " (a token and the next one it learns to predict)"),
                        default=None, help="tokens per sequence (default 64; 2048 on a GPU)")
    parser.add_argument("--no-4bit", action="store_true", help="keep the base weights dense")
    parser.add_argument("--device", default=None, type=_device, help="device (default: CUDA if present, else CPU)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="what the model trains in (default: the device's compute dtype, bfloat16 or float16 "
                             "on a GPU, float32 on a CPU)")


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
