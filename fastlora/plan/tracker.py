"""An allocation tracker: counts every tensor storage an op creates until the storage dies, on one device.

It works the same on meta tensors (the plan) and on real ones (the check of the plan): a storage is counted once,
when an op's output first shows it, and uncounted when the storage object is collected (a weak finalizer), so
views, in-place ops and ``out=`` cost nothing more. Ops that are one call to the dispatcher but allocate inside
(fastlora's torch.library ops, bitsandbytes' ``gemm_4bit``) are handled in one of two ways:

- real tensors: fastlora's Python implementations are run under the tracker (``descend``), so their own buffers
  are measured;
- meta tensors: the op's fake makes its outputs, and its declared workspace (``workspaces``: op name ->
  bytes of the scratch it holds while it runs) is counted for the duration of the call.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

#: ``f(args, kwargs) -> bytes`` of scratch an op holds while it runs, beyond its outputs.
Workspace = Callable[[tuple, dict], int]


@dataclass
class Peak:
    """The live bytes at the highest point: total, per category (the storages' tags), where it happened."""

    bytes: int = 0
    op: str = ""
    phase: str = ""
    scratch: int = 0  # declared workspace of the op running at the peak (meta: no storage of its own)


class AllocationTracker(TorchDispatchMode):
    """Live tensor bytes on ``device_type`` while a region runs, and their peak.

    Args:
        device_type: ``"meta"`` for a plan, ``"cpu"`` (or ``"cuda"``) for a real run.
        rounding: bytes the allocator really takes for a request (the GPU caching allocator's rounding);
            default: exact.
        workspaces: declared scratch per op name (``"fastlora::fused_linear_cross_entropy"``), counted while the
            op runs when it is not descended into.
        descend: run fastlora's Python op implementations under the tracker (real tensors only).

    Attributes:
        live: bytes of the storages alive now; peak: the :class:`Peak`; phase: a label the caller sets
            (``"forward"``...), recorded with the peak; host_bytes / host_peak: storages marked as host memory
            (:meth:`to_host`), which do not count on the device.

    Example:
        >>> with AllocationTracker("cpu") as t:
        ...     y = torch.ones(1024) * 2
        >>> t.peak.bytes
        8192
    """

    def __init__(self, device_type: str, *, rounding: Callable[[int], int] | None = None,
                 workspaces: dict[str, Workspace] | None = None, descend: bool = False) -> None:
        super().__init__()
        self.device_type = device_type
        self.rounding = rounding or (lambda n: n)
        self.workspaces = workspaces or {}
        self.descend = descend
        self.live = 0
        self.peak = Peak()
        self.phase = ""
        self.host_bytes = 0
        self.host_peak = 0
        # Live storages by address (the StorageImpl's, unique while alive); tags by a serial number, since an
        # address is reused once its storage dies and the peak's storages are labelled after the peak.
        self._sizes: dict[int, int] = {}
        self._uids: dict[int, int] = {}
        self._tags: dict[int, str] = {}
        self._host: set[int] = set()
        self._serial = itertools.count()
        self._scratch = 0
        self._peak_keys: dict[int, int] = {}
        # A copy of the live set is taken once the peak is passed (at the next free), not at every new high.
        self._snapshot_due = False

    def add(self, tensor: torch.Tensor, tag: str = "", op: str = "") -> None:
        """Count ``tensor``'s storage (if on the device and not counted yet) under ``tag``."""
        if tensor.device.type != self.device_type or tensor.layout != torch.strided:
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        nbytes = self.rounding(storage.nbytes())
        old = self._sizes.get(key)
        if old is not None:
            if nbytes > old:  # resized in place (an ``out=`` that grew)
                self._sizes[key] = nbytes
                self._grow(nbytes - old, op)
            if tag:
                self._tags[self._uids[key]] = tag
            return
        self._sizes[key] = nbytes
        self._uids[key] = uid = next(self._serial)
        self._tags[uid] = tag
        weakref.finalize(storage, self._free, key)
        self._grow(nbytes, op)

    def tag(self, tensor: torch.Tensor, tag: str, *, overwrite: bool = False) -> None:
        """Label a storage (counting it if it is new): ``"saved activations"``, ``"gradients"``... A label
        already given stays unless ``overwrite``."""
        if tensor.device.type != self.device_type:
            return
        key = tensor.untyped_storage()._cdata
        if key in self._sizes and self._tags.get(self._uids[key]) and not overwrite:
            return
        self.add(tensor, tag)
        self._tags[self._uids[key]] = tag

    def to_host(self, tensor: torch.Tensor) -> None:
        """Count ``tensor``'s storage as host memory, not device memory: a meta tensor standing in for an offloaded
        copy. Make it outside the tracker (``torch.utils._python_dispatch._disable_current_modes``) so that it
        never counts on the device, even for a moment."""
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._host:
            return
        self._snapshot()
        if key in self._sizes:
            self.live -= self._sizes[key]
        else:
            self._sizes[key] = storage.nbytes()
            self._uids[key] = uid = next(self._serial)
            self._tags[uid] = "offloaded"
            weakref.finalize(storage, self._free, key)
        self._host.add(key)
        self.host_bytes += self._sizes[key]
        self.host_peak = max(self.host_peak, self.host_bytes)

    def tags(self) -> dict[str, int]:
        """Live device bytes per tag now."""
        out: dict[str, int] = {}
        for key, n in self._sizes.items():
            if key not in self._host:
                tag = self._tags[self._uids[key]]
                out[tag] = out.get(tag, 0) + n
        return out

    def _grow(self, nbytes: int, op: str) -> None:
        self.live += nbytes
        if self.live + self._scratch > self.peak.bytes:
            self.peak = Peak(self.live + self._scratch, op, self.phase, self._scratch)
            self._snapshot_due = True

    def _snapshot(self) -> None:
        if self._snapshot_due:
            self._peak_keys = {self._uids[k]: n for k, n in self._sizes.items() if k not in self._host}
            self._snapshot_due = False

    def peak_by_tag(self) -> dict[str, int]:
        """Device bytes per tag at the peak (tags given after the peak, such as a storage that became a gradient,
        count), with the declared scratch of the op running then under ``"workspace"``."""
        self._snapshot()
        out: dict[str, int] = {}
        for uid, n in self._peak_keys.items():
            tag = self._tags.get(uid, "")
            out[tag] = out.get(tag, 0) + n
        if self.peak.scratch:
            out["workspace"] = out.get("workspace", 0) + self.peak.scratch
        return out

    def _free(self, key: int) -> None:
        self._snapshot()
        n = self._sizes.pop(key, 0)
        self._uids.pop(key, None)
        if key in self._host:
            self._host.discard(key)
            self.host_bytes -= n
        else:
            self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        name = func._schema.name
        if self.descend and name.startswith("fastlora::"):
            # The Python implementation, under this tracker: its own buffers are measured, not declared.
            from ..ops._library import _IMPLS

            impl = _IMPLS.get(name.split("::", 1)[1].split(".")[0])
            if impl is not None:
                with self:
                    out = impl(*args, **kwargs)
                self._count(out, name)
                return out
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta" \
                and args[0].dtype == torch.bool:
            # A data-dependent test on meta: on the way of a planned step these are transformers' "is the batch
            # one unpacked, unpadded sequence per row" checks (masking_utils), which hold for the planned batch.
            return True
        extra = self.workspaces.get(name)
        out = func(*args, **kwargs)
        # The scratch lives while the op runs, with its outputs: counted with them, then released.
        self._scratch = extra(args, kwargs) if extra is not None else 0
        try:
            if self._scratch:
                self._grow(0, name)
            self._count(out, name)
        finally:
            if self._scratch:
                self._snapshot()  # dropping the scratch lowers the live bytes without a free
            self._scratch = 0
        return out

    def _count(self, out: object, name: str) -> None:
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.add(t, op=name)
