"""Flax tasks shared by ``examples/`` and ``bench/``: models, data and train loops.

This subpackage is the only part of :mod:`qsgd_optax` that imports Flax. It
needs the ``examples`` extra (``pip install 'qsgd_optax[examples]'``).
Import the submodules directly (``from qsgd_optax.tasks.lm import experiment``).

Layout (each module's docstring says what it holds and what it must not):

* shared by both tasks: :mod:`~qsgd_optax.tasks.arms` (optimizer arms:
  parse, build), :mod:`~qsgd_optax.tasks.cli` (argparse types and flag
  groups), :mod:`~qsgd_optax.tasks.running` (the loop over arms and seeds,
  progress bars), :mod:`~qsgd_optax.tasks.reporting` (statistics, tables,
  ``summary.json``, plots), ``_checkpoints`` (Orbax checkpoints of one run)
  and ``_compat`` (Flax version differences);
* :mod:`qsgd_optax.tasks.classification`: the transformer text-classification
  experiment;
* :mod:`qsgd_optax.tasks.lm`: the causal-LM fine-tuning experiment.

Data flows one way: CLI (``examples/``, ``bench/``) -> config -> data + model
-> jitted step (optimizer inside, circuit inside) -> metrics -> files. Task
modules never import ``examples/`` or ``bench/``; the core (``qsgd_optax``
outside ``tasks``) never imports ``tasks``.
"""

import importlib.util as _util

# Import name -> distribution of every package of the "examples" extra.
_EXTRA = {"flax": "flax", "orbax.checkpoint": "orbax-checkpoint", "tqdm": "tqdm",
          "matplotlib": "matplotlib", "gguf": "gguf", "tokenizers": "tokenizers"}


def _missing() -> list[str]:
  missing = []
  for module, dist in _EXTRA.items():
    try:
      found = _util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent missing, or a blocked module
      found = False
    if not found:
      missing.append(dist)
  return missing


_MISSING = _missing()
if _MISSING:
  raise ImportError(
      "qsgd_optax.tasks (the models, data and train loops of the examples and "
      f"benchmarks) needs the 'examples' extra; missing: {', '.join(_MISSING)}. "
      "Install it with: pip install 'qsgd_optax[examples]' (the optimizer itself, "
      "qsgd_optax and qsgd_optax.circuits, needs none of it)."
  )
