"""Benchmarks: measurements of the library against its peers, run on a GPU (see eval/gpu/)."""
