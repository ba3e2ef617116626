"""Device code: Triton kernels and their launchers, one module per op family (installed as fastlora.kernels).

This package's __init__ and _utils never import triton, so the op layer can use the allocator without it;
the kernel modules (``swiglu``, ...) import triton and are only imported once Triton was chosen.
"""
