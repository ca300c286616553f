"""Triton kernels of the CUDA platform (paged attention, fused norms, rotary, ...).

Empty for now: the kernels land in a later issue, each with a plain-torch twin in the
core's reference that the conformance kit compares it to. Modules here may import
``triton`` at module level; :mod:`kvplane_cuda.plugin` must only import them lazily, so
that the plugin still loads on machines without a GPU.
"""
