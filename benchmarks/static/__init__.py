"""What the GPU compiler makes of fastlora's Triton kernels, read on a machine without a GPU, and what it predicts.

Triton compiles ahead of time for a named target (sm_90a, sm_80, sm_75) down to PTX and a cubin with its bundled
``ptxas``; ``ptxas -v`` gives registers, spills and shared memory, and ``cuobjdump -sass`` the machine code. From
those, the launcher's grid and a device's limits (:mod:`.devices`) follow occupancy, waves, load and store widths,
tensor-core instructions and the main loop's instructions per weight; and with the work a case does (bytes, FLOPs),
a stated model gives an estimated time and its share of the roofline (:mod:`.estimate`). It is a model, not a
measurement: ``benchmarks/gpu_checks.sh`` times the same cases where a GPU exists.

Run it with the Triton interpreter off: ``python -m fastlora.benchmarks.static`` (or ``fastlora bench --static``).
"""
