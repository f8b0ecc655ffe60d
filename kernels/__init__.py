"""Triton kernels, installed as omni_fast.kernels (one file per op: kernel, host wrapper, <op>_ref, autograd)."""
