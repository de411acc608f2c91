"""bench/gpu_check.sh: the shell parses, and every benchmark call in it is one its CLI accepts.

The script runs only on a GPU machine (or with --smoke, which adds nothing the
benchmarks' own smoke tests do not cover), so what can rot unnoticed is the
command lines: a renamed or removed flag would fail there, in device time.
"""

import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def _calls() -> list[tuple[str, list[str]]]:
  """``(benchmark, argv)`` of every ``python3 bench/NAME.py ...`` line, continuations joined."""
  text = SCRIPT.read_text().replace("\\\n", " ")
  calls = []
  for line in text.splitlines():
    m = re.search(r"python3 bench/(\w+)\.py(.*)$", line)
    if m:
      argv = [a.replace('"$out', '"/tmp/x').strip('"') for a in shlex.split(m.group(2), posix=False)]
      calls.append((m.group(1), argv))
  return calls


def _parser(name: str):
  sys.path.insert(0, str(ROOT / "bench"))
  try:
    spec = importlib.util.spec_from_file_location(f"_gpu_check_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  finally:
    sys.path.remove(str(ROOT / "bench"))
  return module


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_script_parses():
  proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=30)
  assert proc.returncode == 0, proc.stderr


def test_every_benchmark_call_is_accepted_by_its_parser():
  calls = _calls()
  # circuit_forms and step_overhead, each in the GPU run and in the smoke run.
  assert sorted(name for name, _ in calls) == ["circuit_forms", "circuit_forms",
                                               "step_overhead", "step_overhead"]
  for name, argv in calls:
    module = _parser(name)
    parse = getattr(module, "parse_args", None) or module.build_parser().parse_args
    parse(argv)  # argparse exits (SystemExit) on an unknown flag or a bad value
