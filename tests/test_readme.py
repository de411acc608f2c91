"""The README's usage example runs and trains."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_trains():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  assert len(blocks) == 1
  namespace = {}
  exec(compile(blocks[0], str(README), "exec"), namespace)  # pylint: disable=exec-used
  model, optimizer, train_step = (namespace[k] for k in ("model", "optimizer", "train_step"))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 8)).astype(np.float32)
  y = (x @ np.linspace(-0.5, 0.5, 8, dtype=np.float32))[:, None] / 4
  losses = [float(train_step(model, optimizer, x, y)) for _ in range(200)]
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.05 * losses[0]
