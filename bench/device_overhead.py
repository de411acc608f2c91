"""Cost of a device outside XLA: a jitted QSGD step, host callback against traced.

``qsgd_optax.circuits.make_device_qnode`` keeps ``default.qubit`` traced
into the compiled step, and runs any other device (``lightning.qubit``,
``qiskit.aer``) from PennyLane's JAX-jit host callback: the step stops, the
angles go to Python, the device runs, the readouts come back. This
benchmark times one jitted QSGD step (``qsgd(1e-3, 0.5)``, paper circuit,
scope ``"leaf"``, 4 qubits, update plus ``optax.apply_updates``) on a tree of
``--leaves`` arrays (alternating 64 x 96 matrices and 96-vectors), with the
circuit traced (``circuit="paper"``, arm A) and on each host device (arm B).

Method: each arm is compiled first (``jit(step).lower(...).compile()``,
timed apart), then ``--warmup`` untimed calls per arm, then ``--pairs``
interleaved rounds A B1 B2 ..., each call timed up to
``jax.block_until_ready``; reported per device: the medians, ``ratio`` =
median over rounds of host / traced, and ``overhead_ms`` = median over
rounds of host - traced. ``qiskit.aer`` uses ``method="statevector"``
(exact values), as the tests do.

Examples::

  python bench/device_overhead.py                 # the default run
  python bench/device_overhead.py --smoke --out /tmp/device

``DIR/summary.json`` (``--out DIR``, default ``bench/results/device_overhead``)
holds ``{"runs": [...], "config": {...}}``: one run record per host device
(optimizer "qsgd", quantum_weight 0.5, seed 0, device, medians, ratio,
overhead, compile times, the per-round times). ``DIR/device_overhead.png``
shows the per-round ratios. ``qiskit.aer`` needs the devices extra
(``pip install "qsgd_optax[devices]"``); without it the default run times
``lightning.qubit`` alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from qsgd_optax.tasks import cli, reporting, running

HOST_DEVICES = ("lightning.qubit", "qiskit.aer")
DEFAULTS = dict(leaves=4, pairs=40, warmup=3)
SMOKE = dict(leaves=2, pairs=4, warmup=1)
DEFAULT_OUT = Path("bench") / "results" / "device_overhead"
PNG_NAME = "device_overhead.png"
QUANTUM_WEIGHT = 0.5
N_QUBITS = 4
EXTRA = 'pip install "qsgd_optax[devices]"'


def _available(name: str) -> bool:
  modules = {"lightning.qubit": ("pennylane_lightning",),
             "qiskit.aer": ("pennylane_qiskit", "qiskit_aer")}[name]
  try:
    return all(importlib.util.find_spec(m) is not None for m in modules)
  except (ImportError, ValueError):
    return False


def build_parser() -> argparse.ArgumentParser:
  parser = cli.docstring_parser(__doc__)
  parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                      help=f"output folder for summary.json and {PNG_NAME} (default: %(default)s)")
  parser.add_argument("--smoke", action="store_true",
                      help=f"tiny run for tests: {SMOKE['leaves']} leaves, {SMOKE['pairs']} rounds")
  parser.add_argument("--devices", type=cli.names_arg(HOST_DEVICES), default=None,
                      help="comma list of host devices to time against the traced circuit "
                           f"(default: those installed of {', '.join(HOST_DEVICES)})")
  parser.add_argument("--leaves", type=cli.int_arg(1), default=None,
                      help=f"number of parameter arrays (default: {DEFAULTS['leaves']})")
  parser.add_argument("--pairs", type=cli.int_arg(1), default=None,
                      help=f"interleaved rounds (default: {DEFAULTS['pairs']})")
  parser.add_argument("--warmup", type=cli.int_arg(0), default=None,
                      help=f"untimed calls per arm before timing (default: {DEFAULTS['warmup']})")
  return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = build_parser()
  args = parser.parse_args(argv)
  preset = SMOKE if args.smoke else DEFAULTS
  for name in ("leaves", "pairs", "warmup"):
    if getattr(args, name) is None:
      setattr(args, name, preset[name])
  if args.devices is None:
    args.devices = tuple(d for d in HOST_DEVICES if _available(d))
  missing = [d for d in args.devices if not _available(d)]
  if missing:
    parser.error(f"--devices: {', '.join(missing)} not installed; {EXTRA}")
  return args


def make_tree(leaves: int):
  """``leaves`` float32 arrays: 64 x 96 matrices and 96-vectors in turn."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  shapes = [(64, 96) if i % 2 == 0 else (96,) for i in range(leaves)]
  return {f"p{i:04d}": jnp.linspace(-1.0, 1.0, 64 * 96 if len(s) == 2 else 96).reshape(s)
          for i, s in enumerate(shapes)}


def make_circuit(name: str):
  """``"paper"`` for the traced arm, else the paper circuit on a host device."""
  import pennylane as qml  # pylint: disable=g-import-not-at-top

  from qsgd_optax import circuits  # pylint: disable=g-import-not-at-top

  if name == "default.qubit":
    return "paper"
  kwargs = {"method": "statevector"} if name == "qiskit.aer" else {}
  return circuits.make_device_qnode(qml.device(name, wires=N_QUBITS, **kwargs), N_QUBITS)


def time_devices(devices: Sequence[str], leaves: int, pairs: int, warmup: int, bar) -> list[dict]:
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  import qsgd_optax  # pylint: disable=g-import-not-at-top

  params = make_tree(leaves)
  grads = jax.tree.map(lambda p: 0.1 * p + 0.01, params)
  names = ("default.qubit", *devices)
  steps, states, compile_s = {}, {}, {}
  for name in names:
    tx = qsgd_optax.qsgd(1e-3, QUANTUM_WEIGHT, n_qubits=N_QUBITS, circuit=make_circuit(name),
                         scope="leaf")

    def step(p, s, g, tx=tx):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    states[name] = tx.init(params)
    start = time.perf_counter()
    steps[name] = jax.jit(step).lower(params, states[name], grads).compile()
    compile_s[name] = time.perf_counter() - start

  def call(name):
    start = time.perf_counter()
    out, states[name] = steps[name](params, states[name], grads)
    jax.block_until_ready(out)
    return time.perf_counter() - start

  for _ in range(warmup):
    for name in names:
      call(name)
  times = {name: [] for name in names}
  for _ in range(pairs):
    for name in names:
      times[name].append(call(name) * 1e3)
    bar.update(1)
  traced = times["default.qubit"]
  runs = []
  for name in devices:
    ratios = [h / t for t, h in zip(traced, times[name])]
    runs.append({
        "optimizer": "qsgd", "quantum_weight": QUANTUM_WEIGHT, "seed": 0,
        "device": name, "leaves": leaves, "n_qubits": N_QUBITS, "scope": "leaf",
        "traced_ms": statistics.median(traced), "host_ms": statistics.median(times[name]),
        "ratio": statistics.median(ratios),
        "overhead_ms": statistics.median(h - t for t, h in zip(traced, times[name])),
        "traced_compile_s": compile_s["default.qubit"], "host_compile_s": compile_s[name],
        "pairs": pairs, "ratios": ratios,
        "traced_times_ms": traced, "host_times_ms": times[name],
    })
  return runs


def plot(runs, path: Path) -> Path:
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  fig = Figure(figsize=(6.0, 4.0), layout="constrained")
  ax = fig.subplots()
  ax.boxplot([r["ratios"] for r in runs], tick_labels=[r["device"] for r in runs])
  ax.axhline(1.0, color="gray", lw=1)
  ax.set_yscale("log")
  ax.set_ylabel("host device / traced default.qubit, per round")
  ax.set_title(f"jitted qsgd step, scope leaf, {runs[0]['leaves']} leaves")
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  return path



def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  if not args.devices:
    print(f"no host device installed; {EXTRA}", file=sys.stderr)
    return 2
  import importlib.metadata as metadata  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top

  with running.progress_bar(total=args.pairs, desc="rounds") as bar:
    runs = time_devices(args.devices, args.leaves, args.pairs, args.warmup, bar)
  versions = {}
  for dist in ("pennylane", "pennylane-lightning", "pennylane-qiskit", "qiskit", "qiskit-aer"):
    try:
      versions[dist] = metadata.version(dist)
    except metadata.PackageNotFoundError:
      versions[dist] = None
  config = {**vars(args), "device": jax.devices()[0].device_kind, "machine": reporting.cpu_model(),
            "jax": jax.__version__, "python": sys.version.split()[0], "versions": versions}
  reporting.write_summary(args.out, runs, config)
  plot(runs, args.out / PNG_NAME)
  rows = [[r["device"], f"{r['traced_ms']:.3f}", f"{r['host_ms']:.3f}", f"{r['ratio']:.1f}",
           f"{r['overhead_ms']:.3f}"] for r in runs]
  print(reporting.format_table(
      ["host device", "traced ms", "host ms", "ratio", "overhead ms"], rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
