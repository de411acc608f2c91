"""How many distinct kernels an optimized XLA program compiles into.

XLA:CPU compiles each distinct fused computation once: the fusions of
leaves of one shape share a kernel when their fused computations are the
same up to instruction names. :func:`distinct_fusions` counts them in the
text of a compiled program (``jax.jit(f).lower(...).compile().as_text()``),
the structural measure behind the compile times of bench/step_overhead.py.
"""

from __future__ import annotations

import re

_COMPUTATION = re.compile(
    r"^%?(?:fused_computation|wrapped_\w+_computation)\S* \((.*?)\) -> (.*?) \{\n(.*?)\n\}",
    re.M | re.S)
_METADATA = re.compile(r", metadata=\{.*?\}")
_NAME = re.compile(r"%[\w.\-]+")
_PARAM_NAME = re.compile(r"[\w.\-]+:")


def distinct_fusions(hlo_text: str) -> tuple[int, int]:
  """``(fused computations, distinct ones)`` in ``hlo_text``.

  Two fused computations are the same when their signatures and bodies
  agree after instruction names and metadata are removed.
  """
  bodies = set()
  total = 0
  for params, result, body in _COMPUTATION.findall(hlo_text):
    total += 1
    lines = tuple(_NAME.sub("%", _METADATA.sub("", line)).strip()
                  for line in body.splitlines())
    bodies.add((_PARAM_NAME.sub("", params), result, lines))
  return total, len(bodies)
