"""Benchmarks behind `sdsat bench`, `bench-serve` and `bench-prefix`: each prints or writes JSON."""
