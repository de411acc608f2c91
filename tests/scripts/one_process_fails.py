"""Started by examples/launch_local.py in tests: process 1 fails at once, process 0 would wait for ever."""

import sys
import time


def main() -> int:
  process_id = int(sys.argv[sys.argv.index("--process-id") + 1])
  if process_id == 1:
    print("process 1: failing on purpose", flush=True)
    return 7
  time.sleep(600)
  return 0


if __name__ == "__main__":
  sys.exit(main())
