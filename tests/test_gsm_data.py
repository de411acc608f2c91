"""Tests of the GSM-Symbolic data, formatting and loss masks."""

from __future__ import annotations

import builtins
import re
import sys

import numpy as np
import pytest

from qsgd_optax.tasks.lm import gguf_loader, gsm_data


def _wheel_or_skip():
  try:
    return gsm_data.fetch_reasoning_gym()
  except FileNotFoundError as e:  # no package index reachable
    pytest.skip(f"reasoning-gym wheel unavailable: {e}")


@pytest.fixture(scope="module")
def problems():
  _wheel_or_skip()
  return gsm_data.load_gsm_symbolic(40, 12, seed=3)


def test_generators_read_from_wheel_without_installing():
  _wheel_or_skip()
  generators, tasks_ok = gsm_data.gsm_symbolic_generators()
  assert len(generators) == 100
  assert len(tasks_ok) == 85 and set(tasks_ok) <= set(generators)
  assert "reasoning_gym" not in sys.modules  # nothing was imported


def test_problems_are_gsm_style(problems):
  train, test = problems
  assert (len(train), len(test)) == (40, 12)
  for p in train + test:
    assert p.question and p.solution
    final = re.search(r"####\s*(\S+)\s*$", p.solution)
    assert final is not None, p.solution
    assert float(final.group(1).replace(",", "")) == float(p.answer)


def test_templates_are_disjoint_and_seeded(problems):
  train, test = problems
  generators, tasks_ok = gsm_data.gsm_symbolic_generators()
  train_t, test_t = gsm_data.template_split(tasks_ok)
  assert len(train_t) == 68 and len(test_t) == 17
  assert not set(train_t) & set(test_t)
  assert {p.template for p in train} <= set(train_t)
  assert {p.template for p in test} <= set(test_t)
  again = gsm_data.load_gsm_symbolic(40, 12, seed=3)
  assert again == problems
  other = gsm_data.load_gsm_symbolic(40, 12, seed=4)
  assert other[0] != train
  # Growing the set keeps its prefix.
  assert gsm_data.load_gsm_symbolic(45, 0, seed=3)[0][:40] == train


def test_template_split_validates():
  with pytest.raises(ValueError, match="test_fraction"):
    gsm_data.template_split(range(10), 1.0)
  with pytest.raises(ValueError, match="templates"):
    gsm_data.template_split([3], 0.5)


def test_load_validates():
  with pytest.raises(ValueError, match="n_train"):
    gsm_data.load_gsm_symbolic(-1, 2)


def test_missing_wheel_says_what_to_run(tmp_path):
  with pytest.raises(FileNotFoundError) as err:
    gsm_data.fetch_reasoning_gym(tmp_path, download=False)
  assert ("python -m pip download --no-deps reasoning-gym==0.1.25 -d "
          f"{tmp_path}") in str(err.value)


PROBLEM = gsm_data.Problem(question="Tom has 3 apples and buys 4. How many?",
                           solution="3 + 4 = 7\n#### 7", answer="7",
                           template=0)


def test_format_example():
  prompt, completion = gsm_data.format_example(PROBLEM, "chat")
  assert prompt.startswith("<|im_start|>system\n")
  assert prompt.endswith(f"{PROBLEM.question}<|im_end|>\n<|im_start|>assistant\n")
  assert completion == "3 + 4 = 7\n#### 7<|im_end|>"
  prompt, completion = gsm_data.format_example(PROBLEM, "plain")
  assert prompt == f"Question: {PROBLEM.question}\nAnswer:"
  assert completion == " 3 + 4 = 7\n#### 7<|endoftext|>"
  with pytest.raises(ValueError, match="style"):
    gsm_data.format_example(PROBLEM, "markdown")


@pytest.mark.parametrize("style", ["chat", "plain"])
def test_tokenize_mask_covers_exactly_the_completion(style):
  tok = gguf_loader.byte_level_tokenizer()
  (ex,), cut = gsm_data.tokenize(tok, [PROBLEM], style=style)
  assert cut == 0
  prompt, completion = gsm_data.format_example(PROBLEM, style)
  assert ex.ids.dtype == np.int32 and ex.completion.dtype == np.bool_
  assert tok.decode(ex.ids[~ex.completion].tolist(),
                    skip_special_tokens=False) == prompt
  assert tok.decode(ex.ids[ex.completion].tolist(),
                    skip_special_tokens=False) == completion
  assert ex.completion[-1] and not ex.completion[0]
  # The completion is one contiguous tail.
  first = int(np.argmax(ex.completion))
  assert ex.completion[first:].all()


def test_tokenize_truncates_and_drops():
  tok = gguf_loader.byte_level_tokenizer()
  (full,), _ = gsm_data.tokenize(tok, [PROBLEM], style="plain")
  n_prompt = int((~full.completion).sum())
  kept, cut = gsm_data.tokenize(tok, [PROBLEM], style="plain",
                                max_len=n_prompt + 2)
  assert cut == 1 and len(kept[0]) == n_prompt + 3
  assert kept[0].completion[1:].sum() == 3
  dropped, cut = gsm_data.tokenize(tok, [PROBLEM], style="plain",
                                   max_len=n_prompt - 5)
  assert cut == 1 and dropped == []
  with pytest.raises(ValueError, match="max_len"):
    gsm_data.tokenize(tok, [PROBLEM], max_len=1)


def test_load_gsm8k_needs_datasets(monkeypatch):
  """The real-GSM8K path is not run here; without the library it says what to install."""
  real_import = builtins.__import__

  def no_datasets(name, *args, **kwargs):
    if name == "datasets":
      raise ImportError("No module named 'datasets'")
    return real_import(name, *args, **kwargs)

  monkeypatch.delitem(sys.modules, "datasets", raising=False)
  monkeypatch.setattr(builtins, "__import__", no_datasets)
  with pytest.raises(ImportError, match="pip install datasets"):
    gsm_data.load_gsm8k("train")
  with pytest.raises(ValueError, match="split"):
    gsm_data.load_gsm8k("validation")
