"""Benchmarks for fastlora's kernels, installed as ``fastlora.benchmarks``.

- :mod:`fastlora.benchmarks.harness`: suites, providers, the runner; re-exports the pieces below.
- :mod:`fastlora.benchmarks.cases`: what a suite's factory builds (cases, work models, seeded inputs).
- :mod:`fastlora.benchmarks.gate`: the correctness gate against the reference provider.
- :mod:`fastlora.benchmarks.timing`: CPU and GPU timers, peak memory.
- :mod:`fastlora.benchmarks.results`: the per-device CSV files and their environment columns.
- :mod:`fastlora.benchmarks.report`: the comparison tables.
- :mod:`fastlora.benchmarks.cli`: ``fastlora bench`` (also ``python -m fastlora.benchmarks``).
- :mod:`fastlora.benchmarks.suites`: one module per suite; the roofline comes first.

Run them with ``fastlora bench [--op NAME] [--quick]`` or under pytest-benchmark with ``pytest benchmarks/``.

This module imports nothing: pytest imports it as a package of its own when it collects ``benchmarks/``, and
submodules imported from here would then be loaded twice.
"""
