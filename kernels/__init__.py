"""Triton kernels for bulk KV work, each with a torch reference. Installed as `kvcli.kernels`.

`reference` needs only torch and is the CPU path; `dequantize` needs triton (the `gpu` extra). On CPU the kernels
run under TRITON_INTERPRET=1, which is how the test suite checks them without a GPU.
"""
