"""Benchmarks: `python -m bench [AREA...]` runs every bench/bench_<area>.py and prints one table."""
