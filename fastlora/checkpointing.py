"""Gradient checkpointing that keeps each checkpointed layer's input in CPU memory until the backward needs it.

Checkpointing already drops the activations inside every decoder layer and recomputes them in the backward; what
it keeps on the GPU is each layer's input, ``layers x tokens x hidden`` elements, which is what runs a long
context out of memory. :class:`OffloadedCheckpointing` runs the checkpoint under saved-tensor hooks: both of
torch's checkpoint variants (reentrant or not) save the layer's inputs through the hooks that are active around
them, and nothing else (inside, torch's own hooks or ``no_grad`` take over), so the hooks see exactly the tensors
to move.

On a CUDA device:

- a layer's input is copied to pinned host memory on a side stream when the next checkpointed layer starts, so the
  copy overlaps that layer's compute, and its GPU memory is released when the copy is done. The newest input is
  never copied: it is the last layer's, which the backward needs first.
- in the backward, when a layer's input is taken back, the input saved before it is already being copied to the
  GPU on another stream while this layer recomputes (double buffering).
- pinned memory that cannot be allocated is replaced by pageable memory, with one warning, not an error; a
  prefetch that finds no device memory is skipped (the backward then fetches that input when it needs it).

Tensors on other devices, and tensors smaller than ``min_offload_bytes``, stay where they are; on a CPU this is
plain checkpointing. The RNG state is restored for the recompute by torch's checkpoint (``preserve_rng_state``),
so dropout masks come out the same.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger("fastlora.checkpointing")

_DEVICE_TYPES = ("cuda", "cpu")
_RUNTIME = ("_newest", "_streams", "_pinned_failed", "_prefetch_failed", "_owner")


@dataclass
class OffloadStats:
    """What an :class:`OffloadedCheckpointing` has done: tensors copied to host memory (and their bytes), and
    how the backward got them back: from a prefetch, by a copy it waited for, or still on the device (the
    newest input, never copied)."""

    offloaded: int = 0
    offloaded_bytes: int = 0
    prefetched: int = 0
    fetched: int = 0
    on_device: int = 0


class _Saved:
    """One checkpoint input: on its device until the next one is saved, then in host memory until the backward."""

    __slots__ = ("__weakref__", "copied", "device", "host", "modified", "prefetched", "previous", "ready",
                 "source", "version")

    def __init__(self, tensor: torch.Tensor, previous: weakref.ref | None) -> None:
        self.device = tensor.device
        self.source: torch.Tensor | None = tensor
        self.version = tensor._version
        # Copies start later, from other streams: they wait for the point where the input was complete.
        self.ready = torch.cuda.current_stream(tensor.device).record_event() if tensor.is_cuda else None
        self.host: torch.Tensor | None = None
        self.copied: torch.cuda.Event | None = None
        self.prefetched: tuple[torch.Tensor, torch.cuda.Event | None] | None = None
        self.modified = False
        self.previous = previous


class OffloadedCheckpointing:
    """A checkpoint function that moves each checkpointed layer's input to CPU memory until the backward.

    Installed as a transformers model's checkpoint function (:meth:`install`, or ``fastlora.patch(model,
    checkpointing="offload")``), it is called by every decoder layer as ``self(layer_forward, hidden_states)``,
    with hidden_states ``[B, S, H]`` of any dtype. Gradients are exactly those of the same checkpoint without
    offloading: the recompute sees the same values. One object belongs to one model; it holds no module-level
    state and keeps only weak references to what it saved, so a graph that is dropped frees its host copies.

    Args:
        use_reentrant: which of torch's checkpoint variants runs (``torch.utils.checkpoint.checkpoint``).
        min_offload_bytes: inputs smaller than this stay on their device (default 1 MiB).
        pin_memory: copy into pinned host memory (asynchronous copies); if it cannot be allocated, pageable
            memory is used from then on, with one warning.
        offload_device_types: device types whose tensors are moved: ``("cuda",)``. Adding ``"cpu"`` makes CPU
            tensors go through the same copies into separate host buffers: no memory is saved, but the logic
            runs on a machine without a GPU (the tests do this).
        **checkpoint_kwargs: more arguments of ``torch.utils.checkpoint.checkpoint`` (``preserve_rng_state``...).

    Attributes:
        checkpoint_fn: the checkpoint that runs under the offload hooks; the transformers integration replaces
            it by the function transformers was asked to use, so ``use_reentrant`` and friends given to
            ``activation_checkpointing_enable`` or a Trainer still hold.
        stats: an :class:`OffloadStats`.

    Example:
        >>> offload = fastlora.OffloadedCheckpointing(use_reentrant=False)
        >>> offload.install(model)          # checkpointing on, with this object as its function
        >>> model(input_ids, labels=labels).loss.backward()
        >>> offload.stats.offloaded         # per step: layers - 1 on a GPU (inputs >= 1 MiB), 0 on a CPU
    """

    def __init__(self, *, use_reentrant: bool = False, min_offload_bytes: int = 1 << 20, pin_memory: bool = True,
                 offload_device_types: tuple[str, ...] = ("cuda",), **checkpoint_kwargs: Any) -> None:
        if isinstance(min_offload_bytes, bool) or not isinstance(min_offload_bytes, int) or min_offload_bytes < 0:
            raise ValueError("OffloadedCheckpointing: min_offload_bytes must be an int >= 0, "
                             f"got {min_offload_bytes!r}")
        if isinstance(offload_device_types, str) or any(t not in _DEVICE_TYPES for t in offload_device_types):
            raise ValueError(f"OffloadedCheckpointing: offload_device_types must be a tuple of {_DEVICE_TYPES}, "
                             f"got {offload_device_types!r}")
        self.checkpoint_fn: Callable[..., Any] = functools.partial(checkpoint, use_reentrant=use_reentrant,
                                                                   **checkpoint_kwargs)
        self.min_offload_bytes = min_offload_bytes
        self.pin_memory = bool(pin_memory)
        self.offload_device_types = tuple(offload_device_types)
        self.stats = OffloadStats()
        self._reset_runtime()

    def _reset_runtime(self) -> None:
        self._newest: weakref.ref | None = None
        self._streams: dict[torch.device, tuple[torch.cuda.Stream, torch.cuda.Stream]] = {}
        self._pinned_failed = False
        self._prefetch_failed = False
        self._owner: weakref.ref | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Streams and weak references belong to this process and this model's graphs: a copy starts afresh.
        return {k: v for k, v in self.__dict__.items() if k not in _RUNTIME}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_runtime()

    def __repr__(self) -> str:
        return (f"OffloadedCheckpointing(min_offload_bytes={self.min_offload_bytes}, pin_memory={self.pin_memory}, "
                f"offload_device_types={self.offload_device_types}, checkpoint_fn={self.checkpoint_fn!r})")

    def __call__(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``function(*args, **kwargs)`` checkpointed, its tensor inputs offloaded (the transformers call)."""
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            return self.checkpoint_fn(function, *args, **kwargs)

    def install(self, model: torch.nn.Module) -> None:
        """Turn gradient checkpointing on for ``model`` (a transformers model, or a PeftModel around one) with
        this object as the checkpoint function, as ``activation_checkpointing_enable`` would with torch's.

        Raises:
            TypeError: the model has no transformers checkpointing hook (``_set_gradient_checkpointing``).

        Example:
            >>> OffloadedCheckpointing().install(model)
        """
        setter = getattr(model, "_set_gradient_checkpointing", None)
        if not callable(setter) or not getattr(model, "supports_gradient_checkpointing", True):
            raise TypeError(f"OffloadedCheckpointing.install: {type(model).__name__} is not a transformers model "
                            "that supports gradient checkpointing")
        self.bind(model)
        setter(enable=True, gradient_checkpointing_func=self)
        # As transformers does when it turns checkpointing on: frozen embeddings (PEFT) must still hand the
        # layers an input that requires grad, or the reentrant checkpoint computes no gradient.
        if getattr(model, "main_input_name", None) == "input_ids" or getattr(model, "_hf_peft_config_loaded", False):
            model.enable_input_require_grads()

    def bind(self, model: torch.nn.Module) -> None:
        """Make ``model`` (or the transformers model inside a PeftModel) this object's owner; :meth:`install` and
        ``fastlora.patch`` do it.

        Raises:
            ValueError: the object already belongs to another live model (its saved inputs would chain across
                both models' steps): make one per model.

        Example:
            >>> offload.bind(model)
        """
        get_base = getattr(model, "get_base_model", None)
        model = get_base() if callable(get_base) else model
        owner = self._owner() if self._owner is not None else None
        if owner is not None and owner is not model:
            raise ValueError(f"OffloadedCheckpointing: this object belongs to another model ({type(owner).__name__} "
                             "at 0x%x); make one OffloadedCheckpointing per model" % id(owner))
        self._owner = weakref.ref(model)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor | _Saved:
        if tensor.device.type not in self.offload_device_types or tensor.nbytes < self.min_offload_bytes:
            return tensor
        newest = self._newest() if self._newest is not None else None
        if newest is not None and newest.source is not None:
            self._offload(newest)
        saved = _Saved(tensor, self._newest)
        self._newest = weakref.ref(saved)
        return saved

    def _unpack(self, saved: torch.Tensor | _Saved) -> torch.Tensor:
        if isinstance(saved, torch.Tensor):
            return saved
        if saved.source is not None:
            saved.modified = saved.source._version != saved.version
        if saved.modified:
            raise RuntimeError("OffloadedCheckpointing: a checkpointed layer's input was modified in place after "
                               "the layer ran; the recompute would see other values")
        if saved.source is not None:
            self.stats.on_device += 1
            tensor = saved.source
        else:
            tensor = self._fetch(saved)
        previous = saved.previous() if saved.previous is not None else None
        if previous is not None and previous.source is None and previous.prefetched is None:
            self._prefetch(previous)
        return tensor

    def _offload(self, saved: _Saved) -> None:
        source = saved.source
        host = self._host_like(source)
        if source.is_cuda:
            stream = self._stream(source.device, 0)
            stream.wait_event(saved.ready)
            with torch.cuda.stream(stream):
                host.copy_(source, non_blocking=True)
            saved.copied = stream.record_event()
            # The caching allocator must not hand this memory out again before the copy has read it.
            source.record_stream(stream)
        else:
            host.copy_(source)
        saved.modified = source._version != saved.version
        saved.host, saved.source = host, None
        self.stats.offloaded += 1
        self.stats.offloaded_bytes += host.nbytes

    def _prefetch(self, saved: _Saved) -> None:
        # The prefetch holds one more layer input on the device than the backward needs at this moment: where
        # that does not fit, the backward fetches it when it needs it instead of failing with out of memory.
        try:
            if saved.device.type == "cuda":
                stream = self._stream(saved.device, 1)
                stream.wait_event(saved.copied)
                with torch.cuda.stream(stream):
                    tensor = self._to_device(saved)
                saved.prefetched = (tensor, stream.record_event())
            else:
                saved.prefetched = (self._to_device(saved), None)
        except torch.OutOfMemoryError:
            if not self._prefetch_failed:
                logger.warning("OffloadedCheckpointing: no device memory to prefetch a layer input; fetching "
                               "inputs when the backward needs them where this happens")
            self._prefetch_failed = True

    def _fetch(self, saved: _Saved) -> torch.Tensor:
        if saved.prefetched is not None:
            tensor, loaded = saved.prefetched
            saved.prefetched = None
            if loaded is not None:
                stream = torch.cuda.current_stream(saved.device)
                stream.wait_event(loaded)
                tensor.record_stream(stream)  # allocated on the prefetch stream, used and freed on this one
            self.stats.prefetched += 1
            return tensor
        self.stats.fetched += 1
        if saved.device.type == "cuda":
            torch.cuda.current_stream(saved.device).wait_event(saved.copied)
        return self._to_device(saved)

    def _to_device(self, saved: _Saved) -> torch.Tensor:
        """A new device tensor with the host copy's values, on the current stream."""
        if saved.device.type == "cuda":
            return saved.host.to(saved.device, non_blocking=True)
        return saved.host.clone()

    def _host_like(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.pin_memory and not self._pinned_failed:
            try:
                return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            except RuntimeError as e:
                self._pinned_failed = True
                logger.warning("OffloadedCheckpointing: pinned host memory could not be allocated (%s); offloading "
                               "to pageable memory from now on, whose copies do not overlap compute",
                               str(e).splitlines()[0])
        return torch.empty(tensor.shape, dtype=tensor.dtype)

    def _stream(self, device: torch.device, which: int) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
        return self._streams[device][which]


def enable_checkpointing(model: torch.nn.Module, *, every_n_layers: int = 1, **checkpoint_kwargs: Any) -> None:
    """Turn on a transformers model's gradient checkpointing with torch's checkpoint and ``checkpoint_kwargs``
    (``use_reentrant=False`` unless given), through ``activation_checkpointing_enable`` where transformers has it
    and the older ``gradient_checkpointing_enable`` (transformers 5.17 and before) where it does not.

    Example:
        >>> enable_checkpointing(model, use_reentrant=False)
    """
    kwargs = {"use_reentrant": False, **checkpoint_kwargs}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if callable(enable):
        enable(kwargs, every_n_layers=every_n_layers)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers)


def trainer_checkpointing_args(**checkpoint_kwargs: Any) -> dict[str, Any]:
    """``TrainingArguments`` keywords that turn checkpointing on with ``checkpoint_kwargs``, under the names of
    the installed transformers (``activation_checkpointing``, or ``gradient_checkpointing`` before it).

    Example:
        >>> TrainingArguments(output_dir="out", **trainer_checkpointing_args(use_reentrant=False))
    """
    from transformers import TrainingArguments

    name = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ \
        else "gradient_checkpointing"
    return {name: True, f"{name}_kwargs": {"use_reentrant": False, **checkpoint_kwargs}}
