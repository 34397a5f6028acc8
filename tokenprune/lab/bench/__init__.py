"""Benchmarks behind `tokenprune bench`."""
