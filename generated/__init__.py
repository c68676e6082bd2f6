"""Kernels emitted by designmodel for the zoo (committed, reproducible)."""
