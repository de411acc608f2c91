"""The paper's QNode on default.qubit: how it is batched, and what that costs.

Times the built-in circuit (``qsgd_optax.circuits.make_qnode``: ``jax.vmap``
of the QNode over single registers, angles read by a masked sum, the
Hadamards of all wires queued first) against the form used up to 0.4.2,
rebuilt here as the reference: one QNode call with PennyLane's parameter
broadcasting over the batch, the angles sliced as ``y[..., i]`` and the
gates in the per-wire order H, RY, RZ. Both are jitted, on ``B`` registers of
4 qubits, for each ``B`` of ``--batches``.

Method: both compiled first (compile time = ``lower`` + ``compile``, process
CPU seconds), 3 untimed calls each, then ``--pairs`` interleaved pairs (old,
new) timed to ``jax.block_until_ready`` (fewer for large batches: at most
``--budget-s`` seconds per batch, at least 3 pairs); ``ratio`` = median over
pairs of new / old. Also reported: the largest difference between the two
outputs (float32 rounding: the same gates, another order and batching).

Examples::

  python bench/circuit_forms.py
  python bench/circuit_forms.py --smoke --out /tmp/circuit_forms

``DIR/summary.json`` (``--out DIR``, default ``bench/results/circuit_forms``)
holds ``{"cases": [...], "config": {...}}``, one case per batch size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

DEFAULT_BATCHES = (1, 67, 512, 4096, 65536, 262144)
N_QUBITS = 4


def _batches_arg(text: str) -> list[int]:
  try:
    batches = [int(t) for t in text.split(",") if t.strip()]
  except ValueError:
    batches = []
  if not batches or any(b < 1 for b in batches):
    raise argparse.ArgumentTypeError(
        f"expected a comma list of batch sizes >= 1 such as 1,512,4096; got {text!r}")
  return batches


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", type=Path, default=Path("bench/results/circuit_forms"),
                      help="output folder for summary.json (default: %(default)s)")
  parser.add_argument("--batches", type=_batches_arg, default=list(DEFAULT_BATCHES),
                      help="comma list of register counts B (default: 1,67,512,4096,65536,262144)")
  parser.add_argument("--pairs", type=int, default=300, help="interleaved pairs (default: %(default)s)")
  parser.add_argument("--budget-s", type=float, default=20.0,
                      help="timed seconds per batch before stopping early (default: %(default)s)")
  parser.add_argument("--smoke", action="store_true", help="tiny run for tests: batches 1,8, 5 pairs")
  return parser


def _forms():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import pennylane as qml  # pylint: disable=g-import-not-at-top

  from qsgd_optax import circuits  # pylint: disable=g-import-not-at-top
  from qsgd_optax import _circuits  # pylint: disable=g-import-not-at-top

  n = N_QUBITS

  @qml.qnode(qml.device("default.qubit", wires=n), interface="jax", diff_method="backprop")
  def broadcast(y):  # y: [B, n], parameter broadcasting
    for i in range(n):
      qml.Hadamard(i)
      qml.RY(jnp.pi * y[..., i], i)
      qml.RZ(jnp.pi * y[..., i], i)
    for a in range(n - 1):
      qml.CNOT([a, a + 1])
    return [qml.expval(qml.PauliZ(0))] + [
        qml.expval(qml.PauliZ(a) @ qml.PauliZ(a + 1)) for a in range(n - 1)]

  def old(theta):
    y = _circuits.reduce_period2(theta)
    return -jnp.stack([jnp.reshape(e, theta.shape[:1]) for e in broadcast(y)], -1)

  return jax.jit(old), jax.jit(circuits.make_qnode(n, "paper"))


def run_case(batch: int, old, new, pairs: int, budget_s: float) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  theta = jax.numpy.asarray(
      np.random.default_rng(batch).uniform(-3, 3, (batch, N_QUBITS)).astype(np.float32))
  compiled, compile_s = [], []
  for fn in (old, new):
    t = time.process_time()
    compiled.append(fn.lower(theta).compile())
    compile_s.append(time.process_time() - t)
  c_old, c_new = compiled
  diff = float(np.max(np.abs(np.asarray(c_old(theta)) - np.asarray(c_new(theta)))))
  for _ in range(3):
    jax.block_until_ready(c_old(theta))
    jax.block_until_ready(c_new(theta))
  t_old, t_new, spent = [], [], 0.0
  while len(t_old) < pairs and (spent < budget_s or len(t_old) < 3):
    for fn, times in ((c_old, t_old), (c_new, t_new)):
      t = time.perf_counter()
      jax.block_until_ready(fn(theta))
      times.append(time.perf_counter() - t)
    spent += t_old[-1] + t_new[-1]
  return {
      "batch": batch, "pairs": len(t_old),
      "old_ms": 1e3 * statistics.median(t_old), "new_ms": 1e3 * statistics.median(t_new),
      "ratio": statistics.median(b / a for a, b in zip(t_old, t_new)),
      "compile_s_old": compile_s[0], "compile_s_new": compile_s[1],
      "max_abs_diff": diff,
      "old_times_ms": [1e3 * t for t in t_old], "new_times_ms": [1e3 * t for t in t_new],
  }


def format_table(cases: list[dict]) -> str:
  lines = ["| B | 0.4.2 form ms | built-in ms | ratio | compile s (0.4.2 / built-in) | max diff | pairs |",
           "|---|---|---|---|---|---|---|"]
  for c in cases:
    lines.append(f"| {c['batch']:,} | {c['old_ms']:.3f} | {c['new_ms']:.3f} | {c['ratio']:.2f} | "
                 f"{c['compile_s_old']:.2f} / {c['compile_s_new']:.2f} | {c['max_abs_diff']:.1e} | "
                 f"{c['pairs']} |")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  if args.pairs < 1 or args.budget_s <= 0:
    build_parser().error("--pairs must be >= 1 and --budget-s > 0")
  if args.smoke:
    args.batches, args.pairs = [1, 8], 5
  import warnings  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  import pennylane  # pylint: disable=g-import-not-at-top

  from qsgd_optax._circuits import EXPECTED_QNODE_WARNINGS  # pylint: disable=g-import-not-at-top

  with warnings.catch_warnings():
    for category, message in EXPECTED_QNODE_WARNINGS:
      warnings.filterwarnings("ignore", message=message, category=category)
    old, new = _forms()
    cases = []
    for batch in args.batches:
      cases.append(run_case(batch, old, new, args.pairs, args.budget_s))
      c = cases[-1]
      print(f"B={batch}: ratio {c['ratio']:.2f} ({c['new_ms']:.3f} / {c['old_ms']:.3f} ms, "
            f"{c['pairs']} pairs), max diff {c['max_abs_diff']:.1e}", flush=True)
  print(format_table(cases))
  args.out.mkdir(parents=True, exist_ok=True)
  config = {"batches": args.batches, "pairs": args.pairs, "budget_s": args.budget_s,
            "n_qubits": N_QUBITS, "jax": jax.__version__, "pennylane": pennylane.__version__,
            "device": str(jax.devices()[0])}
  (args.out / "summary.json").write_text(json.dumps({"cases": cases, "config": config}, indent=1))
  print(f"wrote {args.out / 'summary.json'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
