"""Native kernels that XLA calls through its FFI, compiled on first use (see gemv.py)."""
