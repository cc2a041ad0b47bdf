"""Benchmarks that reproduce the MT-COOL paper's experiments on small, local data.

Run the main one with ``python -m benchmarks.even_odd``.
"""
