"""Where results go: one CSV per device under ``benchmarks/results/``, each row with its environment."""

from __future__ import annotations

import csv
import datetime
import functools
import os
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

import torch

import fastlora

from .harness import Result

COLUMNS = (
    "timestamp", "suite", "provider", "mode", "shape", "dtype",
    "median_ms", "p20_ms", "p80_ms", "peak_mem_bytes", "metric", "achieved", "roofline_share", "max_error",
    "device", "device_name", "arch", "torch", "triton", "cuda", "hip", "transformers",
    "fastlora_version", "fastlora_commit", "quick",
)


def device_slug(device: torch.device | str | None = None) -> str:
    """The file name of a device's results: its name, lower-case, with runs of other characters as '-'.

    CPUs get a ``cpu-`` prefix, since their names rarely say they are CPUs.

    Example:
        >>> device_slug("cuda:0")   # on an H100
        'nvidia-h100-80gb-hbm3'
        >>> device_slug("cpu")      # on an AMD EPYC
        'cpu-amd-epyc'
    """
    info = fastlora.device_info(device)
    slug = slugify(info.name)
    if not info.is_gpu and not slug.startswith("cpu"):
        slug = f"cpu-{slug}" if slug else "cpu"
    return slug


def slugify(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def results_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """``override``, else ``$FASTLORA_RESULTS_DIR``, else the user's data directory
    (``$XDG_DATA_HOME/fastlora/results``, by default ``~/.local/share/fastlora/results``): never a directory that
    happens to be the current one (the project's own ``benchmarks/results`` is passed explicitly, as
    ``benchmarks/gpu_checks.sh`` does).

    Example:
        >>> results_dir("/tmp/r")
        PosixPath('/tmp/r')
    """
    if override:
        return Path(override)
    env = os.environ.get("FASTLORA_RESULTS_DIR")
    if env:
        return Path(env)
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data) / "fastlora" / "results"


@functools.cache
def fastlora_commit() -> str:
    """The short commit of the checkout fastlora is imported from, "-dirty" when its code has uncommitted changes,
    or "" when it is not a git checkout.

    Example:
        >>> fastlora_commit()
        '6035f2c'
    """
    root = Path(fastlora.__file__).resolve().parent.parent
    # Only the repository that holds the package counts: an installed copy inside some other repository
    # (a virtualenv in a project) must not report that project's commit.
    if not (root / ".git").exists():
        return ""
    head = _git(root, "rev-parse", "--short", "HEAD")
    # The result files themselves change with every run: only changes elsewhere make the measured code differ.
    changes = _git(root, "status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results")
    return f"{head}-dirty" if head and changes else head


def _git(root: Path, *args: str) -> str:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def environment(device: torch.device | str | None = None) -> dict[str, str]:
    """The environment columns of a row: device, versions and the fastlora commit.

    Example:
        >>> environment("cpu")["device"]
        'cpu'
    """
    info = fastlora.device_info(device)
    versions = info.versions
    return {
        "device": str(info.torch_device),
        "device_name": info.name,
        "arch": info.arch or "",
        "torch": torch.__version__,
        "triton": versions.get("triton") or "",
        "cuda": versions.get("cuda") or "",
        "hip": versions.get("hip") or "",
        "transformers": versions.get("transformers") or "",
        "fastlora_version": fastlora.__version__,
        "fastlora_commit": fastlora_commit(),
    }


def to_row(result: Result, env: dict[str, str], *, quick: bool, timestamp: str) -> dict[str, str]:
    """A CSV row for an "ok" result.

    Example:
        >>> to_row(result, environment("cpu"), quick=True, timestamp="2025-01-01T00:00:00+00:00")["metric"]
        'GB/s'
    """
    if result.timing is None:
        raise ValueError(f"to_row: {result.suite}/{result.provider} has status {result.status!r}, not timed")

    def num(x: float | int | None) -> str:
        return "" if x is None else f"{x:.6g}" if isinstance(x, float) else str(x)

    t = result.timing
    return {
        "timestamp": timestamp, "suite": result.suite, "provider": result.provider, "mode": result.mode,
        "shape": result.shape, "dtype": result.dtype, "median_ms": num(t.median_ms), "p20_ms": num(t.p20_ms),
        "p80_ms": num(t.p80_ms), "peak_mem_bytes": num(result.peak_mem_bytes), "metric": result.metric,
        "achieved": num(result.achieved), "roofline_share": num(result.roofline_share),
        "max_error": num(result.max_error), **env, "quick": str(quick),
    }


def save(results: Sequence[Result], device: torch.device | str | None = None, *, quick: bool,
         directory: str | os.PathLike[str] | None = None) -> Path | None:
    """Append the "ok" results to ``<directory>/<device slug>.csv``; returns the file (None if nothing to write).

    A new file gets the header. A file written by a version with other columns is rewritten once with the union
    of both, so old rows are kept and every row lines up with the header.

    Example:
        >>> save(results, "cpu", quick=True, directory=tmp_path)
        PosixPath('/tmp/.../cpu-amd-epyc.csv')
    """
    ok = [r for r in results if r.ok]
    if not ok:
        return None
    path = results_dir(directory) / f"{device_slug(device)}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rows = [to_row(r, env, quick=quick, timestamp=stamp) for r in ok]
    new = not path.exists() or path.stat().st_size == 0
    columns = list(COLUMNS) if new else _migrate(path)
    with path.open("w" if new else "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path


def _migrate(path: Path) -> list[str]:
    """The columns of an existing file, after adding those of :data:`COLUMNS` it lacks (rewriting it once)."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        existing = list(reader.fieldnames or [])
        missing = [c for c in COLUMNS if c not in existing]
        old_rows = list(reader) if missing else []
    if not missing:
        return existing
    columns = existing + missing
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(old_rows)
    os.replace(tmp, path)  # atomic: an interrupted rewrite leaves the old file, not half of one
    return columns
