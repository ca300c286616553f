"""Sections of the GPU suite (``benchmarks/gpu_suite.py``): environment and roofline
inputs, GPU tests, end-to-end correctness, workloads C and A, latency, decode attention
bandwidth and the optional vLLM runs. Each module exposes ``run_*`` functions taking the
:class:`~benchmarks.gpu.common.Suite` and returning a JSON-ready dict."""
