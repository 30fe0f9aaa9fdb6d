"""The one timing module: how symfast times things, and what the machine's limits are.

- :mod:`~symfast.profiling.timing`: warm-up, median and quantiles of repeats, CUDA-synchronised
  (events) on GPU; copy bandwidth and GEMM throughput measured in the same run.
- :mod:`~symfast.profiling.costs`: each op's bytes/flops model, so a time becomes a share of the
  machine's limit (roofline).
- :mod:`~symfast.profiling.bench`: ``symfast bench all`` (every op x backend x dtype x size).
- :mod:`~symfast.profiling.trace`: ``symfast profile`` (a job's steps under torch.profiler,
  split by category, with a Chrome trace, tables and a plot).

benchmarks/ and the CLI both use it.
"""
from symfast.profiling.costs import Cost, call_cost
from symfast.profiling.timing import (MachineLimits, Timing, copy_bandwidth, gemm_throughput,
                                      machine_info, machine_label, measure, measure_limits,
                                      median_time, paired_ratio, quantile, synchronize)

__all__ = ["Cost", "call_cost", "MachineLimits", "Timing", "copy_bandwidth", "gemm_throughput",
           "machine_info", "machine_label", "measure", "measure_limits", "median_time",
           "paired_ratio", "quantile", "synchronize", "bench_all", "profile"]


def bench_all(*args, **kwargs):
    """See :func:`symfast.profiling.bench.bench_all` (imported on use: it pulls in matplotlib)."""
    from symfast.profiling.bench import bench_all as run
    return run(*args, **kwargs)


def profile(*args, **kwargs):
    """See :func:`symfast.profiling.trace.profile`."""
    from symfast.profiling.trace import profile as run
    return run(*args, **kwargs)
