"""Runs a script as N jax.distributed processes on this machine (127.0.0.1), for trying multi-host code.

Each process gets ``--coordinator 127.0.0.1:PORT --num-processes N
--process-id I`` appended to its arguments (a free loopback port), and, with
``--devices-per-process K``, ``K`` simulated CPU devices
(``--xla_force_host_platform_device_count``). Process 0's output is
streamed; the others' is kept and shown only if they fail. When one process
fails, the others are stopped; the launcher exits with the first failing
status (or 124 when ``--timeout`` passes), 0 when all succeed.

Examples::

  python examples/launch_local.py --processes 2 --devices-per-process 2 -- \\
      examples/finetune_lm.py --smoke --mesh data=2,fsdp=2 --out /tmp/lm2

The real thing on a cluster needs no launcher: start the script once per
host with the three flags (or ``--distributed`` where JAX detects the
cluster: SLURM, a TPU pod slice, Open MPI); see docs/devices_and_hosts.md.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _positive(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
  return value


def _seconds(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    value = 0.0
  if not value > 0:
    raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
  return value


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--processes", type=_positive, required=True, metavar="N", help="processes to start")
  parser.add_argument("--devices-per-process", type=_positive, default=None, metavar="K",
                      help="simulated CPU devices per process (sets JAX_PLATFORMS=cpu and XLA_FLAGS)")
  parser.add_argument("--timeout", type=_seconds, default=3600.0, metavar="S",
                      help="stop every process after S seconds, exit 124 (default: %(default)s)")
  parser.add_argument("command", nargs=argparse.REMAINDER, metavar="-- SCRIPT [ARGS...]",
                      help="the Python script to run and its arguments")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  command = list(args.command)
  if command[:1] == ["--"]:
    command = command[1:]
  if not command:
    parser.error("argument SCRIPT: give the script to run after --")
  if not os.path.isfile(command[0]):
    parser.error(f"argument SCRIPT: no such file {command[0]!r}")
  port = _free_port()
  env = dict(os.environ)
  if args.devices_per_process:
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                        + f" --xla_force_host_platform_device_count={args.devices_per_process}").strip()
  procs, logs = [], []
  for i in range(args.processes):
    flags = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(args.processes),
             "--process-id", str(i)]
    log = None if i == 0 else tempfile.TemporaryFile("w+")
    logs.append(log)
    procs.append(subprocess.Popen([sys.executable, *command, *flags], env=env, stdout=log,
                                  stderr=subprocess.STDOUT if log else None))
  deadline = time.monotonic() + args.timeout
  status = 0
  try:
    while True:
      codes = [p.poll() for p in procs]
      failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        status = failed[0][1]
        print(f"launch_local.py: process {failed[0][0]} exited with status {status}; stopping the others",
              file=sys.stderr)
        break
      if all(c == 0 for c in codes):
        break
      if time.monotonic() > deadline:
        status = 124
        print(f"launch_local.py: timed out after {args.timeout:g} s; stopping every process", file=sys.stderr)
        break
      time.sleep(0.2)
  except KeyboardInterrupt:
    status = 130
  finally:
    for p in procs:
      if p.poll() is None:
        p.terminate()
    stopper = threading.Timer(10.0, lambda: [p.kill() for p in procs if p.poll() is None])
    stopper.start()
    for p in procs:
      p.wait()
    stopper.cancel()
  if status:
    for i, log in enumerate(logs):
      if log is not None and procs[i].returncode not in (0, None):
        log.seek(0)
        tail = log.read()[-4000:]
        if tail:
          print(f"--- process {i} (status {procs[i].returncode}), last output:\n{tail}", file=sys.stderr)
  for log in logs:
    if log is not None:
      log.close()
  return status if status >= 0 else 1


if __name__ == "__main__":
  sys.exit(main())
