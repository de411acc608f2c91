#!/usr/bin/env bash
# The GPU half of bench/RESULTS.md ("GPU"): one short, bounded run of the
# circuit and step-overhead benchmarks on an NVIDIA GPU, for the cases whose
# CPU numbers are limited by XLA:CPU (scope "all" with the statevector
# circuits, many small arrays).
#
#   bash bench/gpu_check.sh --fetch   # here, with a package index: PennyLane's
#                                     # wheels (CPython 3.12, manylinux x86-64)
#                                     # into .whl/ (git-ignored, about 45 MB)
#   bash bench/gpu_check.sh [OUT]     # on the GPU machine, repository root:
#                                     # about 8 minutes; results under OUT
#                                     # (default: $OUT, else out/gpu)
#   bash bench/gpu_check.sh --smoke [OUT]   # the same steps, tiny, on any CPU
#
# The GPU machine is expected to hold a CUDA build of jax with optax, flax and
# matplotlib (a typical CUDA JAX image) but not PennyLane: the wheels in .whl/
# are installed into /tmp/site without touching its packages, and qsgd_optax
# is imported from this checkout (PYTHONPATH), not installed. Each benchmark
# runs under its own time limit, so one that hangs cannot take the rest with
# it; the log is written next to the results.
set -uo pipefail
cd "$(dirname "$0")/.."

# PennyLane and its dependencies, at the versions of the CPU measurements
# (pip download --no-deps takes no pins of its own: pennylane 0.45.1 wants
# autoray 0.8.4 and autograd < 1.9).
PENNYLANE_WHEELS=(pennylane==0.45.1 pennylane-lightning==0.45.0 appdirs==1.4.4 autograd==1.8.0
                  autoray==0.8.4 cachetools==8.0.2 diastatic-malt==2.15.3 gast==0.7.0
                  networkx==3.6.1 requests==2.34.2 rustworkx==0.18.1
                  scipy-openblas32==0.3.34.481.3 tomlkit==0.15.2)

if [[ "${1:-}" == "--fetch" ]]; then
  mkdir -p .whl
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${PENNYLANE_WHEELS[@]}"
  ls -l .whl
  exit
fi

smoke=0
if [[ "${1:-}" == "--smoke" ]]; then
  smoke=1
  shift
fi
out="${1:-${OUT:-out/gpu}}"
mkdir -p "$out"
log="$out/log.txt"
exec > >(tee "$log") 2>&1

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1

python3 - <<'EOF' || exit 1
import jax, optax, pennylane, qsgd_optax
print("jax", jax.__version__, "optax", optax.__version__, "pennylane", pennylane.__version__,
      "qsgd_optax", qsgd_optax.__version__, "from", qsgd_optax.__file__)
print("devices:", jax.devices())
EOF

status=0
run() {  # run LIMIT_S CMD...: one benchmark under its own limit
  local limit=$1
  shift
  echo "=== $* (limit ${limit}s)"
  timeout "$limit" "$@"
  local rc=$?
  echo "=== rc $rc"
  [[ $rc -eq 0 ]] || status=1
}

if [[ $smoke -eq 1 ]]; then
  run 300 python3 bench/circuit_forms.py --smoke --out "$out/circuit_forms"
  run 600 python3 bench/step_overhead.py --smoke --train-steps none --out "$out/step_overhead"
else
  run 150 python3 bench/circuit_forms.py --pairs 100 --budget-s 5 --out "$out/circuit_forms"
  run 330 python3 bench/step_overhead.py --sizes 8M \
    --combos paper/leaf/gradient,paper/all/gradient,entangled/all/gradient,sine/all/gradient \
    --leaves 512 --leaf-combos paper/leaf/gradient,paper/leaf/update \
    --pairs 30 --warmup 2 --budget-s 6 --train-steps none --out "$out/step_overhead"
fi
exit $status
