"""Benchmarks: each bench_*.py module is a program that prints one JSON document on stdout."""
