"""``kvplane bench``: offline throughput, latency and serving benchmarks.

Workloads and result field names follow vLLM's benchmarks, so results line up with
published figures and existing tooling reads ours.
"""
