"""Device code: Triton kernels and their launchers, one module per op family (installed as fastlora.kernels).

This package's __init__ and _utils never import triton, so the op layer can use the allocator without it;
the kernel modules (``swiglu``, ...) import triton and are only imported once Triton was chosen.

Every launch states ``enable_fp_fusion``: True (multiply-adds contract), or False where bitsandbytes' separate
roundings must be kept (NF4). Triton's default is on up to 3.9 and off from 3.10, and it warns when left unstated.
"""
