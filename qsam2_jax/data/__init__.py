"""Data: dataset readers, prompts, transforms and the synthetic dataset generator.

Submodules are imported explicitly (`from qsam2_jax.data import synthetic`) so that optional
dependencies of one reader never block another.
"""
