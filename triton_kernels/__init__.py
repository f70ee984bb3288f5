"""Triton GPU kernels of clipfast, installed as `clipfast.triton_kernels`.

Every launcher also accepts CPU tensors when TRITON_INTERPRET=1 is set before the kernels are imported,
which is how they are tested on machines without a GPU. Nothing here is imported by `import clipfast`:
the ops import a kernel module only when the Triton backend is selected.
"""
