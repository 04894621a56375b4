# `tinygptv bench`: measures the whole data path (image encoding, prefill, decode, end to end, peak memory) per
# precision, against the machine's own bandwidth and GEMM roofs and a stock-transformers reference. Never asserts.
"""Benchmark package. cli.py (arguments) -> runner.py (one subprocess per job) -> worker.py (workload.py,
reference.py, machine.py inside that subprocess) -> report.py (fractions, table, JSON). docs/bench.md explains
every column."""
