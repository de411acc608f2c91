"""Where a QSGD step's time goes, kernel by kernel, against optax.adamw.

For one pytree (``--leaves N`` small arrays of ``bench/_trees.many_leaf_shapes``,
or ``--size`` such as ``1M``, the transformer-shaped tree of
``bench/step_overhead.py``) and one ``circuit/scope/modulate`` combination,
this builds the jitted, buffer-donating optimizer step of
``bench/step_overhead.py`` for both arms and reports:

* the compile split of each arm: ``jax.jit(step).trace``, ``.lower()``,
  ``.compile()`` in process CPU seconds, on ``--compiles`` fresh optimizers
  each, after one untimed compile on a tiny tree;
* per kernel kind (an instruction of the compiled program's entry
  computation or of its loops' bodies, its numeric suffix dropped:
  ``multiply_add_fusion.47`` is ``multiply_add_fusion``; a kernel inside a
  loop, such as the chunks of scope ``"all"``, counts once per iteration),
  the launches and the summed kernel duration per step, read from JAX's
  profiler (``jax.profiler.start_trace`` around
  ``--calls`` steps per arm, read back with ``jax.profiler.ProfileData``);
* with ``--circuit-batch B``, the same table for the built-in circuit alone
  on ``B`` registers of ``--n-qubits``.

XLA:CPU records one profiler event per kernel from jax 0.10 on; with older
jax the kernel tables come out empty (``per_kernel_events`` false in the
summary) and only the compile split is measured.

The profiler slows the host side of each call, so step times are not taken
from it (``bench/step_overhead.py`` times steps); kernel durations and
launch counts are. Only events whose name is an instruction of the compiled
program count, so host-side events (dispatch, Python) are left out.

Examples::

  python bench/profile_kernels.py --leaves 512
  python bench/profile_kernels.py --size 1M --combo paper/leaf/update --circuit-batch 67
  python bench/profile_kernels.py --smoke --out /tmp/profile

``DIR/summary.json`` (``--out DIR``, default ``bench/results/profile_kernels``)
holds ``{"config", "versions", "compile", "kernels", "circuit"}``: per arm the
compile splits, and per arm (and for the circuit) one record per kernel kind
(``kind``, ``launches_per_call``, ``us_per_call``) and the totals.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import make_step, make_tx, warm_process  # noqa: E402
from _trees import layout_for_size, make_trees, many_leaf_shapes, parse_size, transformer_shapes  # noqa: E402

from step_overhead import _combos_arg  # noqa: E402

from qsgd_optax.tasks import cli  # noqa: E402

DEFAULT_OUT = Path("bench") / "results" / "profile_kernels"
SMOKE = dict(leaves=4, calls=3, compiles=1, circuit_batch=8)
# Instructions that run no kernel of their own (loops and conditionals are
# containers: their bodies' kernels are counted instead, so no time twice).
_NO_KERNEL = {"parameter", "constant", "bitcast", "tuple", "get-tuple-element", "while",
              "conditional", "call"}


def _combo(text: str) -> tuple[str, str, str]:
  """One ``circuit/scope/modulate``, checked as ``bench/step_overhead.py`` checks its lists."""
  combos = _combos_arg(text)
  if len(combos) != 1:
    raise argparse.ArgumentTypeError(f"expected one circuit/scope/modulate, got {text!r}")
  return combos[0]


def _size(text: str) -> int:
  try:
    return parse_size(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from e


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  tree = p.add_mutually_exclusive_group()
  tree.add_argument("--leaves", type=cli.int_arg(1), default=None,
                    help="that many small arrays (64 x 96 kernels and 96-entry biases; even)")
  tree.add_argument("--size", type=_size, default=None,
                    help="a transformer-shaped tree of about that many parameters (e.g. 1M)")
  p.add_argument("--combo", type=_combo, default=("paper", "leaf", "gradient"),
                 help="circuit/scope/modulate of the QSGD arm (default: paper/leaf/gradient)")
  p.add_argument("--calls", type=cli.int_arg(1), default=30, help="profiled steps per arm (default: 30)")
  p.add_argument("--compiles", type=cli.int_arg(1), default=2,
                 help="timed compiles per arm, each on a fresh optimizer (default: 2)")
  p.add_argument("--circuit-batch", type=cli.int_arg(1), default=None,
                 help="also profile the built-in circuit alone on this many registers")
  p.add_argument("--n-qubits", type=cli.int_arg(1), default=4, help="register size (default: 4)")
  p.add_argument("--top", type=cli.int_arg(1), default=12, help="kinds printed per table (default: 12)")
  p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
  p.add_argument("--smoke", action="store_true",
                 help="tiny run for tests: 4 arrays, 3 calls, 1 compile, circuit on 8 registers")
  return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.smoke:
    for key, value in SMOKE.items():
      if key == "leaves" and args.size is not None:
        continue
      setattr(args, key, value)
  if args.leaves is None and args.size is None:
    args.leaves = 512
  if args.leaves is not None and args.leaves % 2:
    parser.error(f"--leaves must be even (kernels and biases in pairs), got {args.leaves}")
  return args


# --------------------------------------------------------------------------
# Measurement.


def _shapes(args):
  if args.leaves is not None:
    return many_leaf_shapes(args.leaves)
  return transformer_shapes(*layout_for_size(args.size))


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*? ([a-z][\w\-]*)\(")
_CALLED = re.compile(r"(?:body|condition|true_computation|false_computation)=%?([\w.\-]+)"
                     r"|branch_computations=\{([^}]*)\}")


def kernel_names(hlo_text: str) -> set[str]:
  """Names of the instructions that run a kernel (fusions, dots, copies, loops, ...).

  Those of the entry computation and, recursively, of the bodies, conditions
  and branches of its loops and conditionals (a kernel inside a loop runs,
  and is counted, once per iteration); fused computations are not entered.
  """
  computations, current = {}, None
  for line in hlo_text.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{"):
      header = line.split(" (", 1)[0].split()
      current = header[-1].lstrip("%")
      computations[current] = {"entry": header[0] == "ENTRY", "lines": []}
    elif line.startswith("}"):
      current = None
    elif current is not None:
      computations[current]["lines"].append(line)
  todo = [name for name, c in computations.items() if c["entry"]]
  seen, names = set(), set()
  while todo:
    name = todo.pop()
    if name in seen or name not in computations:
      continue
    seen.add(name)
    for line in computations[name]["lines"]:
      m = _INSTRUCTION.match(line)
      if m and m.group(2) not in _NO_KERNEL:
        names.add(m.group(1))
      for single, many in _CALLED.findall(line):
        todo += [single] if single else [c.strip().lstrip("%") for c in many.split(",")]
  return names


def _kind(name: str) -> str:
  return re.sub(r"\.\d+$", "", name)


def profile(call, names: set[str], calls: int) -> dict:
  """Runs ``call`` ``calls`` times under JAX's profiler; per kind launches and us per call."""
  import jax  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    try:
      for _ in range(calls):
        call()
    finally:
      jax.profiler.stop_trace()
    path = next(Path(trace_dir).rglob("*.xplane.pb"))
    data = jax.profiler.ProfileData.from_serialized_xspace(path.read_bytes())
  launches, ns = collections.Counter(), collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        if event.name in names:
          kind = _kind(event.name)
          launches[kind] += 1
          ns[kind] += event.duration_ns
  rows = [{"kind": k, "launches_per_call": launches[k] / calls, "us_per_call": ns[k] / 1e3 / calls}
          for k in sorted(ns, key=lambda k: -ns[k])]
  return {"rows": rows,
          "launches_per_call": sum(launches.values()) / calls,
          "us_per_call": sum(ns.values()) / 1e3 / calls,
          "kernel_instructions": len(names)}


def compile_split(name: str, combo, shapes, repeats: int) -> list[dict]:
  """Trace, lower and compile seconds (process CPU) of fresh ``name`` steps."""
  import jax  # pylint: disable=g-import-not-at-top

  params, grads = make_trees(shapes)
  out = []
  for _ in range(repeats):
    tx = make_tx(name, combo)
    state = jax.jit(tx.init)(params)
    step = make_step(tx)
    t0 = time.process_time()
    traced = step.trace(params, state, grads)
    t1 = time.process_time()
    lowered = traced.lower()
    t2 = time.process_time()
    lowered.compile()
    t3 = time.process_time()
    out.append({"trace_s": t1 - t0, "lower_s": t2 - t1, "compile_s": t3 - t2, "total_s": t3 - t0})
  return out


def profile_step(name: str, combo, shapes, calls: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top

  tx = make_tx(name, combo)
  params, grads = make_trees(shapes)
  state = jax.jit(tx.init)(params)
  compiled = make_step(tx).lower(params, state, grads).compile()
  names = kernel_names(compiled.as_text())
  buffers = [params, state]

  def call():
    buffers[:] = compiled(buffers[0], buffers[1], grads)
    jax.block_until_ready(buffers)

  for _ in range(3):
    call()
  return profile(call, names, calls)


def profile_circuit(batch: int, n_qubits: int, readout: str, calls: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top

  from qsgd_optax import circuits  # pylint: disable=g-import-not-at-top

  circuit = circuits.make_qnode(n_qubits, readout)
  theta = jax.random.uniform(jax.random.key(0), (batch, n_qubits), minval=-3.0, maxval=3.0)
  compiled = jax.jit(lambda t: circuit(t)).lower(theta).compile()
  names = kernel_names(compiled.as_text())

  def call():
    jax.block_until_ready(compiled(theta))

  for _ in range(3):
    call()
  return profile(call, names, calls)


# --------------------------------------------------------------------------
# Output.


def format_kernels(title: str, record: dict, top: int) -> str:
  lines = [f"{title}: {record['launches_per_call']:.0f} launches, "
           f"{record['us_per_call']:.1f} us of kernels per call",
           "| kernel kind | launches per call | us per call |", "|---|---|---|"]
  for row in record["rows"][:top]:
    lines.append(f"| {row['kind']} | {row['launches_per_call']:g} | {row['us_per_call']:.1f} |")
  rest = record["rows"][top:]
  if rest:
    lines.append(f"| ({len(rest)} more kinds) | {sum(r['launches_per_call'] for r in rest):g} | "
                 f"{sum(r['us_per_call'] for r in rest):.1f} |")
  return "\n".join(lines)


def format_compile(split: dict[str, list[dict]]) -> str:
  lines = ["| arm | trace s | lower s | compile s | total s |", "|---|---|---|---|---|"]
  for arm, runs in split.items():
    cells = [" / ".join(f"{r[k]:.2f}" for r in runs) for k in ("trace_s", "lower_s", "compile_s", "total_s")]
    lines.append(f"| {arm} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _versions() -> dict:
  import importlib.metadata as md  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top

  out = {"jax": jax.__version__, "device": str(jax.devices()[0])}
  for dist in ("jaxlib", "optax", "pennylane", "qsgd_optax"):
    try:
      out[dist] = md.version(dist)
    except md.PackageNotFoundError:
      out[dist] = None
  return out


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  combo = tuple(args.combo)
  shapes = _shapes(args)
  tree = f"{args.leaves} arrays" if args.leaves is not None else f"{args.size:,} params"
  label = "/".join(combo)
  t0 = time.perf_counter()
  warm_process([combo])
  split = {"adamw": compile_split("adamw", None, shapes, args.compiles),
           f"qsgd {label}": compile_split("qsgd", combo, shapes, args.compiles)}
  kernels = {"adamw": profile_step("adamw", None, shapes, args.calls),
             f"qsgd {label}": profile_step("qsgd", combo, shapes, args.calls)}
  circuit = None
  if args.circuit_batch is not None and combo[0] != "sine":
    circuit = profile_circuit(args.circuit_batch, args.n_qubits, combo[0], args.calls)
  events = any(r["launches_per_call"] for r in kernels.values())
  print(f"{tree}, {label}; compile split (process CPU s, {args.compiles} fresh compiles per arm):")
  print(format_compile(split))
  for arm, record in kernels.items():
    print()
    print(format_kernels(f"{arm} step", record, args.top))
  if circuit is not None:
    print()
    print(format_kernels(f"{combo[0]} circuit alone, {args.circuit_batch} registers", circuit, args.top))
  if not events:
    print(f"\nnote: this jax/XLA build ({_versions()['jax']}) records no per-kernel profiler "
          "events (XLA:CPU emits them from jax 0.10 on), so the kernel tables are empty; the "
          "compile split stands.")
  args.out.mkdir(parents=True, exist_ok=True)
  summary = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
             "versions": _versions(), "tree": tree, "per_kernel_events": events,
             "compile": split, "kernels": kernels,
             "circuit": circuit}
  (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
  print(f"\nwall {time.perf_counter() - t0:.0f} s; wrote {args.out / 'summary.json'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
