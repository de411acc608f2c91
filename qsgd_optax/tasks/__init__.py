"""Flax tasks shared by ``examples/`` and ``bench/``: models, data and one train loop.

This subpackage is the only part of :mod:`qsgd_optax` that imports Flax.
Import the submodules directly (``from qsgd_optax.tasks import classification``).
"""
