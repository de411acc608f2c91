"""The null arm of the step benchmarks: the same AdamW step, built several times, timed against itself.

Every arm here is the very same program (``optax.adamw`` on the same pytree,
the jitted, buffer-donating step of ``bench/step_overhead.py``), compiled
and given its own buffers one after the other. Any ratio away from 1.00 is
a property of the measurement, not of an optimizer: on XLA:CPU the host
side of a call is slower for an executable built after others are alive in
the process, which is why ``bench/step_overhead.py`` measures every case in
both build orders.

Arms are timed interleaved (1, 2, ..., k, 1, 2, ...) after a warm-up, or
with ``--timing-order reverse`` in the opposite order (k, ..., 1); each
ratio is the median over rounds of the arm's time over the first-built
arm's time in the same round. With ``--kernels`` each arm's calls are also
profiled (``bench/profile_kernels.py``): the kernels' own durations per
call, to tell the host side from the device side.

Examples::

  python bench/build_order.py                    # 512 and 128 small arrays, 1M
  python bench/build_order.py --trees 512 --arms 4 --timing-order reverse
  python bench/build_order.py --smoke --out /tmp/order

``DIR/summary.json`` (``--out DIR``, default ``bench/results/build_order``)
holds one record per tree (``tree``, ``leaves``, ``params``, ``rounds``,
``timing_order``, and per arm in build order ``median_ms``, ``ratio``,
``kernel_us`` when profiled, and the raw times in ms).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import LEARNING_RATE, WEIGHT_DECAY, make_step  # noqa: E402
from _trees import count_params, layout_for_size, make_trees, many_leaf_shapes, parse_size, transformer_shapes  # noqa: E402

from qsgd_optax.tasks import cli  # noqa: E402

DEFAULT_OUT = Path("bench") / "results" / "build_order"
SMOKE = dict(trees="8", arms=2, rounds=5, warmup=1)


def _trees_arg(text: str) -> list[str]:
  out = []
  for item in text.split(","):
    item = item.strip()
    try:
      if item.isdigit():
        many_leaf_shapes(int(item))
      else:
        parse_size(item)
    except ValueError as e:
      raise argparse.ArgumentTypeError(
          f"expected a comma list of even array counts (e.g. 512) or parameter counts "
          f"(e.g. 1M); {item!r}: {e}") from e
    out.append(item)
  return out


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--trees", type=_trees_arg, default=_trees_arg("512,128,1M"),
                 help="comma list: an even number is that many small arrays (64 x 96 kernels and "
                      "96-entry biases), a size such as 1M a transformer-shaped tree "
                      "(default: 512,128,1M)")
  p.add_argument("--arms", type=cli.int_arg(2), default=3,
                 help="identical arms built one after the other (default: 3)")
  p.add_argument("--rounds", type=cli.int_arg(1), default=100,
                 help="interleaved rounds of all arms (default: 100)")
  p.add_argument("--warmup", type=cli.int_arg(1), default=3, help="untimed calls per arm (default: 3)")
  p.add_argument("--timing-order", choices=("build", "reverse"), default="build",
                 help="time the arms in build order or in reverse within each round (default: build)")
  p.add_argument("--kernels", action="store_true",
                 help="also profile each arm's kernels (needs jax >= 0.10 for per-kernel events)")
  p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
  p.add_argument("--smoke", action="store_true", help="tiny run for tests: 8 arrays, 2 arms, 5 rounds")
  return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  args = build_parser().parse_args(argv)
  if args.smoke:
    args.trees = _trees_arg(SMOKE["trees"])
    args.arms, args.rounds, args.warmup = SMOKE["arms"], SMOKE["rounds"], SMOKE["warmup"]
  return args


def run_tree(tree: str, args) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  if tree.isdigit():
    shapes = many_leaf_shapes(int(tree))
  else:
    shapes = transformer_shapes(*layout_for_size(parse_size(tree)))
  tx = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)
  arms = []
  for _ in range(args.arms):
    params, grads = make_trees(shapes)
    state = jax.jit(tx.init)(params)
    compiled = make_step(tx).lower(params, state, grads).compile()
    arms.append([compiled, params, state, grads])
  texts = [a[0].as_text() for a in arms]

  def call(a) -> float:
    t0 = time.perf_counter()
    a[1], a[2] = a[0](a[1], a[2], a[3])
    jax.block_until_ready((a[1], a[2]))
    return (time.perf_counter() - t0) * 1e3

  for a in arms:
    for _ in range(args.warmup):
      call(a)
  order = list(range(args.arms))
  if args.timing_order == "reverse":
    order.reverse()
  times = [[] for _ in arms]
  for _ in range(args.rounds):
    for i in order:
      times[i].append(call(arms[i]))
  kernel_us = [None] * args.arms
  if args.kernels:
    import profile_kernels  # pylint: disable=g-import-not-at-top
    for i, a in enumerate(arms):
      names = profile_kernels.kernel_names(texts[i])
      kernel_us[i] = profile_kernels.profile(lambda a=a: call(a), names, args.rounds)["us_per_call"]
  n_params, n_leaves = count_params(shapes)
  record = {"tree": tree, "leaves": n_leaves, "params": n_params, "rounds": args.rounds,
            "timing_order": args.timing_order,
            "same_program": all(t == texts[0] for t in texts), "arms": []}
  for i in range(args.arms):
    ratios = [t / b for t, b in zip(times[i], times[0])]
    record["arms"].append({"built": i + 1, "median_ms": statistics.median(times[i]),
                           "ratio": statistics.median(ratios), "kernel_us": kernel_us[i],
                           "times_ms": times[i]})
  return record


def format_table(records: list[dict]) -> str:
  k = max(len(r["arms"]) for r in records)
  lines = ["| tree | leaves | params | first-built ms | "
           + " | ".join(f"built {i + 1} / built 1" for i in range(1, k)) + " | rounds | timed |",
           "|---|---|---|---|" + "---|" * (k - 1) + "---|---|"]
  for r in records:
    name = f"{r['tree']} arrays" if r["tree"].isdigit() else r["tree"]
    cells = [f"{a['ratio']:.3f}" for a in r["arms"][1:]] + [""] * (k - len(r["arms"]))
    lines.append(f"| {name} | {r['leaves']} | {r['params']:,} | {r['arms'][0]['median_ms']:.3f} | "
                 + " | ".join(cells) + f" | {r['rounds']} | {r['timing_order']} order |")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top

  t0 = time.perf_counter()
  records = []
  for tree in args.trees:
    records.append(run_tree(tree, args))
    print(format_table(records[-1:]).splitlines()[-1], flush=True)
  print()
  print(format_table(records))
  if args.kernels:
    for r in records:
      print(f"{r['tree']}: kernel us per call by build order: "
            + ", ".join(f"{a['kernel_us']:.0f}" for a in r["arms"]))
  args.out.mkdir(parents=True, exist_ok=True)
  summary = {"config": {"trees": args.trees, "arms": args.arms, "rounds": args.rounds,
                        "warmup": args.warmup, "timing_order": args.timing_order,
                        "kernels": args.kernels},
             "device": str(jax.devices()[0]), "jax": jax.__version__, "records": records}
  (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
  print(f"\nwall {time.perf_counter() - t0:.0f} s; wrote {args.out / 'summary.json'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
