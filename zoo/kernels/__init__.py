"""Kernels: native ones that XLA calls through its FFI, compiled on first use (gemv.py), and
the TPU's fused attention, a Pallas kernel jax ships, in zoo's layouts (splash.py)."""
