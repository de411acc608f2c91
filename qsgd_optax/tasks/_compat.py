"""Differences between the supported Flax versions, kept in one place."""

from flax import nnx

# flax >= 0.12 needs a list of submodules wrapped in nnx.List to see it as
# part of the graph; flax 0.11 takes the plain list.
ModuleList = getattr(nnx, "List", list)
