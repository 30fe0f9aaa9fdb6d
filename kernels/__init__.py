"""Triton kernels (installed as symfast.kernels). Each module holds private @triton.jit kernels
and host launchers; on CPU tensors they run only under TRITON_INTERPRET=1."""
