"""``fastlora demo``: train the same LoRA model twice, unpatched then patched, and show both side by side.

The model is built here (Llama architecture, random weights: nothing is downloaded) or loaded with ``--model
PATH``; with bitsandbytes installed its decoder weights are NF4 (QLoRA), else dense. The text is a small corpus
shipped with the package, tokenized as bytes (or by the loaded model's tokenizer). Both runs start from the same
weights and see the same batches, step by step in turn (so that the machine's drift affects both alike); the
table shows their loss curves, tokens per second and the peak memory of one training step.
"""

from __future__ import annotations

import copy
import importlib.resources
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ._logging import logger
from .checkpointing import enable_checkpointing
from .device import parse_dtype

#: Model shapes: ``tiny`` trains in seconds on a CPU; ``8b`` is Llama-3.1-8B's shape, for a GPU.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=259),
    "small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=259),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
}


@dataclass
class RunResult:
    """One training run: the loss of every step, tokens per second (the median over the timed steps, with the 20th
    and 80th percentiles), each timed step's seconds, and peak memory."""

    name: str
    losses: list[float] = field(default_factory=list)
    tokens_per_s: float = 0.0
    tokens_per_s_p20: float = 0.0
    tokens_per_s_p80: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    peak_bytes: int = 0


@dataclass
class DemoResult:
    """Both runs and what they trained."""

    description: str
    runs: list[RunResult]
    patch_report: str
    load: tuple[float, float] = (0.0, 0.0)  # the 1-minute load average before and after, to set against the cores


def corpus_bytes() -> bytes:
    """The text the demo trains on (shipped in ``fastlora/data``)."""
    return importlib.resources.files("fastlora").joinpath("data/corpus.txt").read_bytes()


def _four_bit(model: torch.nn.Module, compute_dtype: torch.dtype) -> bool:
    """Make the decoder's linear layers bitsandbytes NF4 layers in place; False without bitsandbytes."""
    from .testing import nf4_decoder

    try:
        nf4_decoder(model, compute_dtype)
    except Exception as e:  # missing, or broken on this machine
        logger.info("demo: bitsandbytes unavailable (%s): training a dense base", type(e).__name__)
        return False
    return True


def build_model(size: str, device: torch.device, dtype: torch.dtype, *, four_bit: bool, seed: int,
                model_path: str | None = None) -> tuple[torch.nn.Module, Callable[[bytes], list[int]], str]:
    """(PEFT LoRA model, tokenizer function, description)."""
    import peft
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    if model_path:
        from transformers import AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        tokenize = lambda text: tokenizer(text.decode("utf-8"))["input_ids"]  # noqa: E731
        what = model_path
    else:
        config = LlamaConfig(**SIZES[size], max_position_embeddings=4096, tie_word_embeddings=False)
        with torch.device(device):  # made in place and in its dtype: an 8B model in fp32 would not fit twice
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        tokenize = list  # bytes as tokens (ids 0..255)
        what = f"Llama-architecture '{size}' model, random weights"
    quantized = four_bit and _four_bit(model, dtype)
    if size == "8b":  # two 8B models train side by side: keep their activations off the GPU's memory
        enable_checkpointing(model, use_reentrant=False)
    lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    model = peft.get_peft_model(model, lora)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # start away from zero so the patched and unpatched paths both matter
            torch.nn.init.normal_(p, std=0.02)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, tokenize, f"{what}, {'NF4 (QLoRA)' if quantized else 'dense'} base, LoRA r=16 ({n:,} trainable)"


def _batches(ids: torch.Tensor, steps: int, batch: int, seq: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, max(1, len(ids) - seq), (steps, batch), generator=g)
    return [torch.stack([ids[s:s + seq] for s in row]) for row in starts]


class _Trainer:
    """One model, its optimizer and its record."""

    def __init__(self, model: torch.nn.Module, device: torch.device, name: str):
        self.model, self.device = model, device
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
        self.result, self.tokens = RunResult(name), 0
        model.train()

    def step(self, ids: torch.Tensor, *, timed: bool = True) -> float:
        ids = ids.to(self.device)
        self._sync()
        start = time.perf_counter()
        loss = self.model(input_ids=ids, labels=ids).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())  # waits for the step on a GPU
        if timed:
            self.result.step_seconds.append(time.perf_counter() - start)
            self.tokens = ids.numel()
        return value

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _train_side_by_side(trainers: list[_Trainer], batches: list[torch.Tensor],
                        progress: Callable[[str], None] | None) -> None:
    """Step the models in turn on the same batches, so that a machine getting slower or faster during the
    demo affects both alike; the first step of each warms up and is not timed."""
    from .benchmarks.timing import peak_memory

    for i, ids in enumerate(batches):
        for t in trainers:
            t.result.losses.append(t.step(ids, timed=i > 0))
            if progress:
                progress(f"{t.result.name} step {i + 1}/{len(batches)} loss {t.result.losses[-1]:.3f}")
    for t in trainers:
        # Medians of the steps (each model's step i ran beside the other's): a machine that stalls now and then
        # moves a mean, not a median.
        p20, p50, p80 = _percentiles([t.tokens / max(sec, 1e-9) for sec in t.result.step_seconds])
        t.result.tokens_per_s, t.result.tokens_per_s_p20, t.result.tokens_per_s_p80 = p50, p20, p80
        # One more step, measured for memory alone (the CPU measurement slows it down).
        t.result.peak_bytes = peak_memory(lambda t=t: t.step(batches[-1], timed=False), t.device)


def run_demo(*, steps: int = 20, size: str = "tiny", model_path: str | None = None, device: str | None = None,
             batch_size: int = 4, seq_len: int = 64, four_bit: bool = True, seed: int = 0,
             dtype: torch.dtype | str | None = None,
             progress: Callable[[str], None] | None = None) -> DemoResult:
    """Train unpatched, then patched from the same start on the same batches; returns both runs.

    ``dtype`` is what the model is built (or loaded) in and trains in: by default the device's compute dtype
    (bf16 or fp16 on a GPU, fp32 on every CPU: see ``fastlora.device.CPU_COMPUTE_DTYPE``).

    Example:
        >>> result = run_demo(steps=10)
        >>> [len(r.losses) for r in result.runs]
        [10, 10]
    """
    import fastlora

    if size not in SIZES:
        raise ValueError(f"demo: size must be one of {', '.join(SIZES)}, got {size!r}")
    if steps < 2:
        raise ValueError(f"demo: steps must be at least 2 (the first one warms up), got {steps}")
    if batch_size < 1:
        raise ValueError(f"demo: batch_size must be at least 1, got {batch_size}")
    if seq_len < 2:
        raise ValueError(f"demo: seq_len must be at least 2 (a token and the next one it learns to predict), got "
                         f"{seq_len}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = parse_dtype(dtype) if dtype is not None else fastlora.device_info(dev).compute_dtype
    model, tokenize, description = build_model(size, dev, dtype, four_bit=four_bit, seed=seed,
                                               model_path=model_path)
    ids = torch.tensor(tokenize(corpus_bytes()), dtype=torch.long)
    batches = _batches(ids, steps, batch_size, seq_len, seed)
    # Two models at once: on a GPU that fits the small sizes; for 8b, four bits and LoRA keep each near 6 GB.
    patched_model = copy.deepcopy(model)
    report = fastlora.patch(patched_model)
    trainers = [_Trainer(model, dev, "unpatched"), _Trainer(patched_model, dev, "fastlora")]
    before = _load()
    _train_side_by_side(trainers, batches, progress)
    return DemoResult(f"{description}; {steps} steps of {batch_size} x {seq_len} tokens on {dev.type} in {dtype}",
                      [t.result for t in trainers], str(report), (before, _load()))


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # not on this platform
        return 0.0


def _percentiles(values: list[float]) -> tuple[float, float, float]:
    """(20th, 50th, 80th) percentiles, as the benchmarks summarise timings (0 for no value)."""
    from .benchmarks.timing import summarize

    if not values:
        return 0.0, 0.0, 0.0
    t = summarize(values)
    return t.p20_ms, t.median_ms, t.p80_ms


#: A ratio is printed with a warning when the per-step ratios' 20th-80th percentile range is wider than this
#: fraction of their median: the machine's swing is then as large as the difference measured.
WIDE_SPREAD = 0.15


def speed_ratio(result: DemoResult) -> tuple[float, float, float]:
    """Patched over unpatched speed, step by step (step i of both ran in turn): (p20, median, p80)."""
    base, fast = result.runs
    ratios = [b / f for b, f in zip(base.step_seconds, fast.step_seconds, strict=True) if f > 0]
    return _percentiles(ratios)


def warnings_for(result: DemoResult) -> list[str]:
    """Why a ratio may not be trusted: a busy machine (load above its cores) or a wide spread of the step ratios."""
    out = []
    cores = os.cpu_count() or 1
    if max(result.load) > cores:
        out.append(f"the machine was busy (load {max(result.load):.1f} on {cores} cores): other work shares the "
                   "cores and the speeds swing; run again when it is quiet")
    p20, p50, p80 = speed_ratio(result)
    if p50 > 0 and (p80 - p20) / p50 > WIDE_SPREAD:
        out.append(f"the step ratios spread from {p20:.2f}x to {p80:.2f}x (20th-80th percentile): too wide to tell "
                   "the two apart reliably; run more steps or on a quieter machine")
    return out


def format_result(result: DemoResult, *, rows: int = 10) -> str:
    """The side-by-side table."""
    base, fast = result.runs
    n = len(base.losses)
    shown = sorted({round(i * (n - 1) / max(1, rows - 1)) for i in range(rows)})
    lines = [result.description, "", f"{'step':>6}  {'unpatched loss':>14}  {'fastlora loss':>14}"]
    lines += [f"{i + 1:>6}  {base.losses[i]:>14.4f}  {fast.losses[i]:>14.4f}" for i in shown]
    p20, speed, p80 = speed_ratio(result)
    lines += ["", f"{'tokens/s (median)':>22}  {base.tokens_per_s:>14,.0f}  {fast.tokens_per_s:>14,.0f}  "
                  f"({speed:.2f}x, p20-p80 {p20:.2f}-{p80:.2f}x over {len(base.step_seconds)} interleaved steps)",
              f"{'p20-p80':>22}  {_span(base):>14}  {_span(fast):>14}",
              f"{'peak MiB (one step)':>22}  {base.peak_bytes / 2**20:>14.1f}  {fast.peak_bytes / 2**20:>14.1f}"]
    lines += [f"WARNING: {w}" for w in warnings_for(result)]
    lines += ["", result.patch_report]
    return "\n".join(lines)


def _span(run: RunResult) -> str:
    return f"{run.tokens_per_s_p20:,.0f}-{run.tokens_per_s_p80:,.0f}"
