"""Benchmarks: step cost, generation throughput against peers, drift streams."""
