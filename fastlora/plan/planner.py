"""``fastlora.plan``: the memory one LoRA/QLoRA training step takes, found by running the step on meta tensors."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..tuning import off as tuning_off
from .devices import GPU, caching_allocator_rounding, cublas_workspace_bytes, cuda_context_bytes, find_gpu
from .model import CPU_ATTENTION, FLASH_ATTENTION, MetaOffload, register_attention
from .shapes import load_config
from .step import CATEGORIES, build_model, training_step
from .tracker import AllocationTracker

logger = logging.getLogger("fastlora.plan")

_CHECKPOINTING = (None, "standard", "offload")


@dataclass
class Plan:
    """What one training step needs on a device.

    Attributes:
        peak_bytes: device memory at the step's peak: tracked tensors (allocator rounding included on a GPU) plus
            ``overheads``.
        breakdown: bytes per kind at the peak: weights (frozen, 4-bit storage included), adapters, gradients,
            optimizer states, saved activations, transient (the rest: temporaries and declared op workspaces).
        peak_op, peak_phase: the op whose allocation made the peak and the phase (forward, backward, optimizer).
        overheads: the stated models added to the tracked peak (CUDA context, cuBLAS workspaces, ...).
        cpu_offload_bytes: host memory held by offloaded checkpoint inputs at most.
        device_bytes: the device's memory (None: no limit given); fits: peak_bytes <= device_bytes.
        max_seq_len: the longest sequence (same settings) whose peak fits, up to max_position_embeddings; None
            when not searched or no device limit; 0 when not even one token fits.
    """

    model: str
    device: str
    settings: dict[str, Any]
    peak_bytes: int
    breakdown: dict[str, int]
    peak_op: str
    peak_phase: str
    overheads: dict[str, int] = field(default_factory=dict)
    cpu_offload_bytes: int = 0
    device_bytes: int | None = None
    fits: bool | None = None
    max_seq_len: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        def gib(n: int) -> str:
            return f"{n / 2**30:9.2f} GiB" if n >= 2**30 else f"{n / 2**20:9.2f} MiB"

        s = self.settings
        lines = [f"fastlora plan: {self.model} on {self.device}, batch {s['batch']} x {s['seq_len']} tokens, "
                 f"rank {s['rank']}, quant {s['quant'] or 'none'}, checkpointing {s['checkpointing'] or 'off'}, "
                 f"{s['optimizer']}, {'fastlora-patched' if s['patched'] else 'unpatched (HF + PEFT)'}, "
                 f"{s['dtype']}"]
        lines.append(f"  peak          {gib(self.peak_bytes)}  ({self.peak_phase}, at {self.peak_op})")
        for k, v in self.breakdown.items():
            lines.append(f"    {k:<36}{gib(v)}")
        for k, v in self.overheads.items():
            lines.append(f"    {k:<36}{gib(v)}  (stated model)")
        if self.cpu_offload_bytes:
            lines.append(f"  CPU memory for offloaded activations {gib(self.cpu_offload_bytes)}")
        if self.device_bytes is not None:
            lines.append(f"  device memory {gib(self.device_bytes)}: {'fits' if self.fits else 'does NOT fit'}")
        if self.max_seq_len is not None:
            lines.append(f"  max sequence length that fits (batch {s['batch']}): {self.max_seq_len:,} tokens")
        return "\n".join(lines)


@contextlib.contextmanager
def _dispatch_as(info: Any) -> Iterator[None]:
    """The dispatcher answers for meta tensors as it would on the planned device (``info``): the patch and the
    ops take that device's paths (DESIGN.md: probes are the only device-specific input)."""
    from .. import dispatch

    original = dispatch.device_info

    def device_info(device: Any = None) -> Any:
        if device is not None and torch.device(device).type == "meta":
            return info
        return original(device)

    dispatch.device_info = device_info
    try:
        yield
    finally:
        dispatch.device_info = original


def _workspaces(gpu: GPU | None) -> dict[str, Any]:
    """Scratch that ops hold while they run and their fakes do not make (meta only; real runs measure it)."""
    from ..ops.linear_cross_entropy import chunk_rows

    def flce(args: tuple, kwargs: dict) -> int:
        # fastlora.ops.linear_cross_entropy._flce: one chunk of logits (at most max_chunk_bytes, 256 MiB by
        # default), and an fp32 dW with a chunk's dW when the head trains.
        hidden, weight = args[0], args[1]
        grad_weight, max_chunk = args[10], args[12]
        n, vocab, item = hidden.shape[0], weight.shape[0], hidden.element_size()
        out = chunk_rows(n, vocab, item, max_chunk) * vocab * item
        if grad_weight:
            out += weight.numel() * (4 + (weight.element_size() if weight.dtype != torch.float32 else 0))
        return out

    def gemm_4bit(args: tuple, kwargs: dict) -> int:
        # bitsandbytes' gemm_4bit dequantizes the weight to a temporary and calls a GEMM, except on CUDA for at
        # most 1536 rows with K a multiple of the blocksize, where the dequant is fused (REFERENCE.md).
        a, shape, blocksize = args[0], args[2], args[4]
        rows = a.numel() // a.shape[-1]
        if gpu is not None and rows <= 1536 and shape[1] % blocksize == 0:
            return 0
        return math.prod(shape) * a.element_size()

    return {"fastlora::fused_linear_cross_entropy": flce, "bitsandbytes::gemm_4bit": gemm_4bit}


class _Session:
    """The planned model, built and patched once on meta, and its training step at any sequence length (the
    bisection for the longest sequence runs many steps of one model)."""

    def __init__(self, config: Any, *, rank: int, quant: str | None, checkpointing: str | None, optimizer: str,
                 patched: bool, gpu: GPU | None, dtype: torch.dtype) -> None:
        import fastlora

        from ..device import device_info

        register_attention()
        self.gpu, self.optimizer = gpu, optimizer
        self.info = gpu.device_info() if gpu is not None else device_info("cpu")
        self.extra: dict[str, int] = {}
        # On a CPU target fastlora's offload moves nothing (only CUDA tensors go to host memory): the real class
        # runs, which leaves meta tensors where they are, as it leaves CPU ones.
        self.offload = None if checkpointing != "offload" else MetaOffload(None) if gpu is not None \
            else fastlora.OffloadedCheckpointing()
        if self.offload is not None and not patched:
            raise ValueError("fastlora.plan: checkpointing='offload' is fastlora's (patched=True)")
        with tuning_off(), _dispatch_as(self.info):
            self.model = build_model(config, device="meta", dtype=dtype, rank=rank, quant=quant,
                                     attention=FLASH_ATTENTION if gpu is not None else CPU_ATTENTION)
            if checkpointing is not None:
                # Meta has no RNG state to keep for the recompute; the memory is the same.
                fastlora.checkpointing.enable_checkpointing(self.model, preserve_rng_state=False)
            if patched:
                # With tuning off, the patch leaves RoPE and the MLP alone on a CPU (patching/patch.py); the meta
                # model's parameters are not on a CPU, so the CPU plan says so itself.
                cpu = gpu is None
                fastlora.patch(self.model, rope=not cpu, mlp=not cpu, checkpointing=self.offload)

    def step(self, batch: int, seq_len: int) -> AllocationTracker:
        # For a CPU, fastlora's ops run their PyTorch code on meta as they would on the CPU (descend); a GPU's
        # run Triton kernels, which meta cannot launch: their fakes make the outputs, their workspaces are declared.
        gpu = self.gpu
        tracker = AllocationTracker("meta", rounding=caching_allocator_rounding if gpu is not None else None,
                                    workspaces=_workspaces(gpu), descend=gpu is None)
        self.model.zero_grad(set_to_none=True)
        if self.offload is not None:
            if isinstance(self.offload, MetaOffload):
                self.offload.tracker = tracker
            self.offload._reset_runtime()
            self.offload.bind(self.model)
        with tuning_off(), _dispatch_as(self.info):
            held = training_step(self.model, tracker, batch=batch, seq_len=seq_len, device="meta",
                                 optimizer=self.optimizer, foreach=gpu is not None)
        self.model.zero_grad(set_to_none=True)
        if gpu is not None and held:
            # On a GPU autograd runs the backward on its own thread, which keeps its own set of fastlora's
            # per-thread workspaces (fastlora/ops/_workspace.py) beside the forward's: the backward dequantizes
            # the same NF4 weights into the same buffers. On meta (and a CPU) the backward runs on the calling
            # thread and shares the forward's, which the tracker saw; the second set is added here.
            self.extra["workspaces of the backward thread"] = held
        return tracker


def plan(config: Any, *, batch: int = 1, seq_len: int = 2048, rank: int = 16, quant: str | None = None,
         checkpointing: str | None = None, optimizer: str = "adamw", patched: bool = True,
         device: str | int = "H100-80GB", dtype: torch.dtype | str | None = None,
         search_max_seq_len: bool = True, max_seq_len_cap: int | None = None) -> Plan:
    """Plan the device memory of one LoRA/QLoRA training step (forward with labels, backward, optimizer step).

    The model is built from its config on the meta device, made 4-bit and wrapped by PEFT LoRA (all linear layers
    of the decoder, ``rank``), patched by fastlora if asked, and one real step runs under an allocation tracker on
    ``[batch, seq_len]`` tokens; what meta tensors cannot show is added as stated models (:attr:`Plan.overheads`).

    Args:
        config: a transformers config, a known name (``"llama-3.1-8b"``, ``"llama-3-70b"``, see
            ``fastlora.plan.KNOWN_CONFIGS``) or a path to a ``config.json``.
        batch, seq_len: the step's token ids ``[batch, seq_len]`` (no padding).
        quant: None (dense base in ``dtype``) or ``"nf4"`` (bitsandbytes NF4, double quantization).
        checkpointing: None, ``"standard"`` (transformers' gradient checkpointing) or ``"offload"`` (fastlora's
            CPU-offloaded checkpointing; patched only).
        optimizer: ``"adamw"`` (torch AdamW, fp32 states).
        patched: run ``fastlora.patch(model)`` (else the HF + PEFT (+ bitsandbytes) baseline).
        device: a GPU name from ``fastlora.plan.GPUS`` (``"H100-80GB"``...), ``"cpu"`` (what the same step allocates
            on a CPU: no CUDA terms, no limit) or a number of bytes (a GPU of that size, Ampere-like).
        dtype: the model's dtype; default the device's compute dtype.
        search_max_seq_len: also find :attr:`Plan.max_seq_len` by bisection (GPU or bytes devices only).
        max_seq_len_cap: the longest sequence searched (default the config's ``max_position_embeddings``; longer
            contexts are trained with RoPE scaling).

    Returns:
        A :class:`Plan`.

    Example:
        >>> p = fastlora.plan("llama-3.1-8b", batch=1, seq_len=2048, quant="nf4", device="H100-80GB")
        >>> p.peak_bytes / 2**30, p.max_seq_len
    """
    if checkpointing not in _CHECKPOINTING:
        raise ValueError(f"fastlora.plan: checkpointing must be one of {_CHECKPOINTING}, got {checkpointing!r}")
    if batch < 1 or seq_len < 1 or rank < 1:
        raise ValueError(f"fastlora.plan: batch, seq_len and rank must be >= 1, got {batch}, {seq_len}, {rank}")
    cfg = load_config(config)
    if isinstance(device, int) and not isinstance(device, bool):
        gpu: GPU | None = GPU(f"{device / 2**30:.1f} GiB GPU", int(device), (8, 0))
    elif str(device).lower() == "cpu":
        gpu = None
    else:
        gpu = find_gpu(str(device))
    if dtype is None:
        from ..device import device_info

        dtype = gpu.compute_dtype if gpu is not None else device_info("cpu").compute_dtype
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    settings = dict(batch=batch, seq_len=seq_len, rank=rank, quant=quant, checkpointing=checkpointing,
                    optimizer=optimizer, patched=patched, dtype=str(dtype).removeprefix("torch."))
    session = _Session(cfg, rank=rank, quant=quant, checkpointing=checkpointing, optimizer=optimizer,
                       patched=patched, gpu=gpu, dtype=dtype)
    result = _plan_once(session, batch, seq_len)
    name = config if isinstance(config, str) else getattr(cfg, "_name_or_path", "") or cfg.model_type
    out = Plan(model=str(name), device=gpu.name if gpu is not None else "cpu", settings=settings, **result)
    if gpu is not None:
        out.device_bytes = gpu.total_bytes
        out.fits = out.peak_bytes <= gpu.total_bytes
        if search_max_seq_len:
            top = max_seq_len_cap or int(getattr(cfg, "max_position_embeddings", 0) or 1 << 20)
            out.max_seq_len = _max_seq_len(session, batch, seq_len, out.peak_bytes, gpu.total_bytes, top)
    return out


def _plan_once(session: _Session, batch: int, seq_len: int) -> dict[str, Any]:
    tracker = session.step(batch, seq_len)
    tags = tracker.peak_by_tag()
    breakdown = {k: tags.pop(k, 0) for k in CATEGORIES}
    breakdown["transient"] = sum(tags.values())
    gpu = session.gpu
    overheads = {"CUDA context": cuda_context_bytes(gpu), "cuBLAS workspaces": cublas_workspace_bytes(gpu),
                 **session.extra}
    overheads = {k: v for k, v in overheads.items() if v}
    logger.debug("plan at seq_len %d: tracked peak %d, overheads %s", seq_len, tracker.peak.bytes, overheads)
    return dict(peak_bytes=tracker.peak.bytes + sum(overheads.values()), breakdown=breakdown,
                peak_op=tracker.peak.op, peak_phase=tracker.peak.phase, overheads=overheads,
                cpu_offload_bytes=tracker.host_peak)


def _max_seq_len(session: _Session, batch: int, seq_len: int, peak: int, limit: int, top: int) -> int:
    """The largest sequence length up to ``top`` whose peak fits ``limit``. The peak grows with the length,
    nearly linearly: a bracketing search whose probes are the linear interpolation between the bracket's ends,
    halving instead whenever one end has moved twice in a row (so kinks cannot stall it)."""
    def peak_at(s: int) -> int:
        return _plan_once(session, batch, s)["peak_bytes"]

    points = {seq_len: peak}
    if peak <= limit:
        lo = seq_len
        hi = None
        while hi is None:
            if lo >= top:
                return top
            # Extrapolate from the two shortest lengths known (the line through them), at most 4x further.
            (s0, p0), (s1, p1) = sorted(points.items())[:2] if len(points) > 1 else ((0, 0), (lo, points[lo]))
            slope = max(1e-9, (p1 - p0) / max(1, s1 - s0))
            guess = int(lo + (limit - points[lo]) / slope)
            probe = min(top, max(lo + 1, min(4 * lo, guess + max(1, guess // 200))))
            points[probe] = peak_at(probe)
            if points[probe] <= limit:
                lo = probe
            else:
                hi = probe
    else:
        hi = seq_len
        points[1] = peak_at(1)
        if points[1] > limit:
            return 0
        lo = 1
    moved = ""
    while hi - lo > 1:
        guess = lo + (limit - points[lo]) * (hi - lo) / max(1, points[hi] - points[lo])
        mid = (lo + hi) // 2 if moved.endswith("ll") or moved.endswith("hh") else int(guess)
        mid = min(hi - 1, max(lo + 1, mid))
        points[mid] = peak_at(mid)
        if points[mid] <= limit:
            lo, moved = mid, moved + "l"
        else:
            hi, moved = mid, moved + "h"
    logger.info("max_seq_len: %d (%d steps planned)", lo, len(points))
    return lo
