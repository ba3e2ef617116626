"""Comparison tables: one per suite, a row per shape and mode, a column per provider.

A timed cell holds the median time with its 20th-80th percentile range, the speed-up over the reference
provider, the achieved rate with its share of the roofline, and the peak memory. Skipped, failing and crashing
providers get a short mark and a numbered note with the reason under the table.
"""

from __future__ import annotations

from collections.abc import Sequence

from .harness import Result, Roofline, Suite

_MIB = 1 << 20


def format_roofline(device_name: str, roofline: Roofline | None) -> str:
    """One line naming the device and its measured roofline.

    Example:
        >>> format_roofline("AMD EPYC", Roofline(22.3, 0.18))
        'AMD EPYC: roofline 22.3 GB/s copy, 0.18 TFLOP/s matmul (measured)'
    """
    if roofline is None:
        return f"{device_name}: roofline not measured (shares are left out)"
    return (f"{device_name}: roofline {roofline.copy_gbps:.3g} GB/s copy, "
            f"{roofline.matmul_tflops:.3g} TFLOP/s matmul (measured)")


def format_table(suite: Suite, results: Sequence[Result]) -> str:
    """The comparison table of one suite's results, with notes for the providers that were not timed.

    Example:
        >>> from fastlora.benchmarks.suites import swiglu
        >>> results = run_suite(swiglu.SUITE, torch.device("cpu"), quick=True)
        >>> print(format_table(swiglu.SUITE, results))
        swiglu - silu(gate) * up over tokens x intermediate (float32)
        cells: median ms [p20-p80] | speed-up vs torch | rate | % of roofline | peak MiB
        +----------+---------------------+-------------+...
    """
    if not results:
        return f"{suite.name}: no cases"
    providers = [p.name for p in suite.providers if any(r.provider == p.name for r in results)]
    rows: dict[tuple[str, str], dict[str, Result]] = {}
    for r in results:
        rows.setdefault((r.shape, r.mode), {})[r.provider] = r
    notes: dict[str, str] = {}  # note text -> its mark; a reason shared by several cells gets one note
    grid: list[list[list[str]]] = [[["shape", "mode"], *[[p] for p in providers]]]
    for (shape, mode), by_provider in rows.items():
        ref = by_provider.get(suite.reference or "")
        base_ms = ref.timing.median_ms if ref is not None and ref.timing is not None else None
        cells = [[shape, mode]]
        for p in providers:
            r = by_provider.get(p)
            cells.append(_cell(r, base_ms, notes) if r is not None else ["-"])
        grid.append(cells)
    dtypes = ", ".join(sorted({r.dtype for r in results}))
    speedup = f" | speed-up vs {suite.reference}" if suite.reference else ""
    about = f" - {suite.description}" if suite.description else ""
    title = (f"{suite.name}{about} ({dtypes})\n"
             f"cells: median ms [p20-p80]{speedup} | rate | % of roofline | peak MiB")
    return "\n".join([title, _render(grid), *(f"{mark} {text}" for text, mark in notes.items())])


def _cell(r: Result, base_ms: float | None, notes: dict[str, str]) -> list[str]:
    if r.timing is None:
        note = notes.setdefault(f"{r.provider}: {r.reason}", f"[{len(notes) + 1}]")
        if r.status == "failed":
            return [f"FAILED gate {note}", f"max err {r.max_error:.2g}"]
        return [f"{'ERROR' if r.status == 'error' else 'skipped'} {note}"]
    t = r.timing
    lines = [f"{_num(t.median_ms)} [{_num(t.p20_ms)}-{_num(t.p80_ms)}]"]
    speed = f"{base_ms / t.median_ms:.2f}x " if base_ms is not None else ""
    share = f" {r.roofline_share:.0%}" if r.roofline_share is not None else ""
    rate = f"{r.achieved:.3g} {r.metric}" if r.achieved is not None else ""
    lines.append(f"{speed}{rate}{share}".strip() or "-")
    lines.append(f"{r.peak_mem_bytes / _MIB:.1f} MiB" if r.peak_mem_bytes is not None else "-")
    return lines


def _num(ms: float) -> str:
    """Milliseconds with three significant digits, without an exponent down to a microsecond."""
    return f"{ms:.3g}" if ms >= 1e-3 else f"{ms:.1e}"


def _render(grid: list[list[list[str]]]) -> str:
    widths = [max(len(line) for row in grid for line in row[c]) for c in range(len(grid[0]))]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    out = [rule]
    for i, row in enumerate(grid):
        height = max(len(cell) for cell in row)
        for k in range(height):
            out.append("| " + " | ".join((cell[k] if k < len(cell) else "").ljust(w)
                                         for cell, w in zip(row, widths, strict=True)) + " |")
        out.append(rule.replace("-", "=") if i == 0 else rule)
    return "\n".join(out)
