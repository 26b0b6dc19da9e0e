"""Every speed-up of tunelab, and nothing else: C and Triton kernels, fused modules and autograd functions,
the last-layer shortcut, reused workspaces, the allocator setting.

The rest of tunelab is the reference computation in plain PyTorch. `tunelab.accel.kernels` is the only door:
`choose(model, train.kernels)` decides per model instance what runs, `apply(model, kernels)` attaches it to
that instance, and `REGISTRY` lists each speed-up with its reference twin and its parity test. No module
outside this package imports the kernel modules (tests/accel/test_accel_imports.py).
"""
