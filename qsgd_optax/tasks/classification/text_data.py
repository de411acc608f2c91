"""Sequence-classification data: a synthetic order task and real sentence polarity.

Both loaders return a :class:`TextDataset` of padded ``int32`` token arrays
(``0`` is padding) with fixed, seeded splits.

Synthetic task (``make_synthetic``)
-----------------------------------
"Which class fires first": every sequence is uniform noise tokens with
``markers_per_class`` marker tokens of *every* class inserted at random
distinct positions (each marker drawn from that class's ``marker_tokens``
tokens). The label is the class of the **earliest** marker. Every class
contributes the same number of markers to every sequence, so token counts
carry no information: only order does, and the deciding marker can sit
anywhere, so it takes a model that relates positions across the whole
sequence (a bag of words scores chance). The split is fixed by ``seed``.

Calibration (the paper gives no spec). We ran
``examples/sequence_classification.py --optimizers adamw --seeds 0,1,2
--epochs 12`` (paper model and AdamW: lr 1e-3, batch 32, embedding 64,
4 heads, ff 128, 2 layers, dropout 0.1, mean pooling) over candidate
settings and kept the one where AdamW crosses 90% test accuracy inside
4-10 epochs: length 32, 2 classes, 2 markers per class, 3000 training and
1000 test sequences. Measured for AdamW, seeds 0, 1, 2: first epoch at
>= 90% test accuracy = 7, 6, 9 (mean 7.3); test accuracy after 12 epochs
0.949, 0.963, 0.935. One epoch (94 steps) takes about 1 s on a 2-core
CPU. Fewer markers made it too easy (one marker per class: 90% in 2-3
epochs), more made it too slow (three per class: not at 90% after 12).

Agreement task (``make_synthetic(rule="agree")``): the headroom task
---------------------------------------------------------------------
The order task is nearly linear: a logistic regression on which class
sits at each position reaches 96.4% (AdamW 95-97%), so it leaves an
optimizer little room. In the agreement variant every marker draws its
class independently and the label says whether the *first and the last*
marker agree: an XOR of two positions, which the same linear probe cannot
learn (48.8% test accuracy, chance). Calibration with the paper's model
and AdamW (lr 1e-3, batch 32, 2000 training / 1000 test sequences of
length 32, 15 epochs, seed 0): with 2 markers the test accuracy stays at
chance for 4-6 epochs and then jumps to 100% within one epoch (seeds 0-4:
first epoch at >= 90% = 6, 5, 6, 7, 6); with 3 or 4 markers it climbs to
a 75% plateau and stays there (4 markers, 4000 or 8000 sequences: 72-74%
after 15 epochs). ``markers=2`` is the headroom task for speed (when the
rule is found; evaluate several times per epoch to resolve it),
``markers=4`` a task with 25 points of headroom in final accuracy.

Polarity task (``load_polarity``)
---------------------------------
Pang & Lee movie-review snippets with VADER's human ratings (10,605
sentences; label = mean rating > 0, the 37 zeros dropped), read from the
source distribution of PyPI ``vadersentiment`` 3.3.2 (file
``additional_resources/hutto_ICWSM_2014.tar.gz`` ->
``hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt``). The sdist is
fetched with ``python -m pip download`` into the cache directory
(``$QSGD_OPTAX_CACHE`` or ``~/.cache/qsgd_optax``) and verified by SHA-256;
the tokenized split is cached next to it. Tokens are lower-cased words and
punctuation, vocabulary from the training split only (no download).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "PAD",
    "SYNTHETIC_RULES",
    "POLARITY_COMMAND",
    "Split",
    "TextDataset",
    "UNK",
    "WordTokenizer",
    "cache_dir",
    "fetch_polarity_file",
    "load_polarity",
    "make_synthetic",
    "read_polarity",
]

PAD = 0
SYNTHETIC_RULES = ("first", "agree")
UNK = 1  # text tasks only

VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
VADER_SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
POLARITY_FILE = "movieReviewSnippets_GroundTruth.txt"
POLARITY_FILE_SHA256 = "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350"
_INNER_TAR = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_INNER_MEMBER = f"hutto_ICWSM_2014/{POLARITY_FILE}"
POLARITY_COMMAND = "{python} -m pip download --no-deps --no-binary :all: vadersentiment==3.3.2 -d {cache}"


@dataclasses.dataclass(frozen=True)
class Split:
  """One split: ``tokens`` ``int32[n, length]`` (0 = padding) and ``labels`` ``int32[n]``."""

  tokens: np.ndarray
  labels: np.ndarray

  def __post_init__(self) -> None:
    if self.tokens.ndim != 2 or self.labels.shape != self.tokens.shape[:1]:
      raise ValueError(f"tokens must be (n, length) and labels (n,), got {self.tokens.shape}, {self.labels.shape}")

  def __len__(self) -> int:
    return int(self.labels.shape[0])


@dataclasses.dataclass(frozen=True)
class TextDataset:
  """A tokenized classification task with fixed splits.

  Attributes:
    name: task name.
    train, test: the splits every task has.
    validation: a held-out split for model selection, or ``None``.
    vocab_size: token ids are in ``[0, vocab_size)``.
    num_classes: labels are in ``[0, num_classes)``.
    info: JSON-ready description (generator settings, sizes, source).
  """

  name: str
  train: Split
  test: Split
  validation: Split | None
  vocab_size: int
  num_classes: int
  info: dict

  @property
  def seq_len(self) -> int:
    return int(self.train.tokens.shape[1])


# --------------------------------------------------------------------------- synthetic


def _synthetic_split(
    rng: np.random.Generator, n: int, seq_len: int, num_classes: int,
    markers_per_class: int, marker_tokens: int, noise_tokens: int, rule: str = "first",
    markers: int | None = None,
) -> Split:
  """Draws ``n`` sequences of the first-marker (or agreement) task."""
  first_noise = 1
  first_marker = first_noise + noise_tokens
  tokens = rng.integers(first_noise, first_marker, size=(n, seq_len))
  n_markers = num_classes * markers_per_class if markers is None else markers
  # distinct random positions per row: argsort of uniform keys
  positions = np.argsort(rng.random((n, seq_len)), axis=1)[:, :n_markers]
  if rule == "first":
    classes = np.repeat(np.arange(num_classes), markers_per_class)[None, :].repeat(n, axis=0)
    classes = rng.permuted(classes, axis=1)
  else:  # "agree": every marker's class drawn independently
    classes = rng.integers(0, num_classes, size=(n, n_markers))
  which = rng.integers(0, marker_tokens, size=(n, n_markers))
  rows = np.arange(n)[:, None]
  tokens[rows, positions] = first_marker + classes * marker_tokens + which
  first = classes[np.arange(n), np.argmin(positions, axis=1)]
  if rule == "first":
    labels = first
  else:
    labels = (first == classes[np.arange(n), np.argmax(positions, axis=1)]).astype(np.int64)
  return Split(tokens.astype(np.int32), labels.astype(np.int32))


def make_synthetic(
    n_train: int = 2000,
    n_test: int = 1000,
    *,
    seq_len: int = 32,
    num_classes: int = 2,
    markers_per_class: int = 2,
    marker_tokens: int = 4,
    noise_tokens: int = 24,
    seed: int = 0,
    rule: str = "first",
    markers: int | None = None,
) -> TextDataset:
  """The seeded "which class fires first" task (see the module docstring).

  Args:
    n_train: training sequences.
    n_test: test sequences.
    seq_len: tokens per sequence (no padding).
    num_classes: classes of markers, and of labels.
    markers_per_class: markers of every class in every sequence.
    marker_tokens: distinct marker tokens per class.
    noise_tokens: distinct noise tokens.
    seed: fixes both splits.
    rule: ``"first"``: the label is the class of the earliest marker (every
      class contributes ``markers_per_class`` markers). ``"agree"``: each of
      the ``num_classes * markers_per_class`` markers draws its class
      independently, and the label is 1 when the first and the last marker
      are of the same class, else 0 (two labels whatever ``num_classes``).
    markers: rule ``"agree"`` only: markers per sequence (default
      ``num_classes * markers_per_class``), at least 2.

  Returns:
    A :class:`TextDataset` with ``vocab_size = 1 + noise_tokens +
    num_classes * marker_tokens`` and no validation split.

  >>> data = make_synthetic(8, 4, seq_len=10)
  >>> data.train.tokens.shape, data.test.labels.shape, data.vocab_size
  ((8, 10), (4,), 33)
  """
  for name, value, low in (("n_train", n_train, 1), ("n_test", n_test, 1), ("num_classes", num_classes, 2),
                           ("markers_per_class", markers_per_class, 1), ("marker_tokens", marker_tokens, 1),
                           ("noise_tokens", noise_tokens, 1)):
    if not isinstance(value, (int, np.integer)) or value < low:
      raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
  if seq_len < num_classes * markers_per_class:
    raise ValueError(
        f"seq_len ({seq_len}) must hold num_classes * markers_per_class = {num_classes * markers_per_class} markers")
  if rule not in SYNTHETIC_RULES:
    raise ValueError(f"rule must be one of {SYNTHETIC_RULES}, got {rule!r}")
  if markers is not None:
    if rule != "agree":
      raise ValueError(f"markers is for rule='agree' only, got rule={rule!r}")
    if not isinstance(markers, (int, np.integer)) or not 2 <= markers <= seq_len:
      raise ValueError(f"markers must be an int in [2, seq_len={seq_len}], got {markers!r}")
  rng = np.random.default_rng(np.random.SeedSequence([seed, 20251101]))
  args = (seq_len, num_classes, markers_per_class, marker_tokens, noise_tokens, rule, markers)
  train = _synthetic_split(rng, n_train, *args)
  test = _synthetic_split(rng, n_test, *args)
  info = {"generator": "first_marker" if rule == "first" else "first_last_agree", "n_train": n_train, "n_test": n_test, "seq_len": seq_len,
          "num_classes": num_classes, "markers_per_class": markers_per_class,
          "marker_tokens": marker_tokens, "noise_tokens": noise_tokens, "seed": seed}
  if rule == "agree":
    info["markers"] = num_classes * markers_per_class if markers is None else markers
  return TextDataset("synthetic", train, test, None, 1 + noise_tokens + num_classes * marker_tokens,
                     num_classes if rule == "first" else 2, info)


# --------------------------------------------------------------------------- tokenizer

_TOKEN_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


class WordTokenizer:
  """Lower-cased word/punctuation tokenizer with a vocabulary built from texts.

  Ids: ``0`` padding, ``1`` unknown, then words by decreasing training
  frequency (ties alphabetical), keeping words seen at least ``min_count``
  times, at most ``max_vocab`` ids in all.

  >>> tok = WordTokenizer.fit(["a good film", "a bad film", "good"], min_count=2)
  >>> tok.vocab
  ('<pad>', '<unk>', 'a', 'film', 'good')
  >>> tok.encode(["a truly good film!"], max_len=6).tolist()
  [[2, 1, 4, 3, 1, 0]]
  """

  def __init__(self, vocab: Sequence[str]):
    if len(vocab) < 2 or vocab[0] != "<pad>" or vocab[1] != "<unk>":
      raise ValueError("vocab must start with '<pad>', '<unk>'")
    self.vocab = tuple(vocab)
    self._ids = {w: i for i, w in enumerate(self.vocab)}

  @staticmethod
  def split(text: str) -> list[str]:
    """The word and punctuation tokens of ``text``."""
    return _TOKEN_RE.findall(text.lower().replace("''", '"'))

  @classmethod
  def fit(cls, texts: Iterable[str], *, min_count: int = 2, max_vocab: int = 20000) -> WordTokenizer:
    if min_count < 1 or max_vocab < 3:
      raise ValueError(f"need min_count >= 1 and max_vocab >= 3, got {min_count}, {max_vocab}")
    counts = collections.Counter(w for t in texts for w in cls.split(t))
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return cls(("<pad>", "<unk>", *words[: max_vocab - 2]))

  def encode(self, texts: Sequence[str], max_len: int) -> np.ndarray:
    """``int32[len(texts), max_len]``: ids, truncated, right-padded with 0."""
    out = np.zeros((len(texts), max_len), dtype=np.int32)
    for row, text in enumerate(texts):
      ids = [self._ids.get(w, UNK) for w in self.split(text)[:max_len]]
      out[row, : len(ids)] = ids
    return out


# --------------------------------------------------------------------------- polarity


def cache_dir() -> Path:
  """``$QSGD_OPTAX_CACHE`` if set, else ``~/.cache/qsgd_optax``."""
  return Path(os.environ.get("QSGD_OPTAX_CACHE") or Path.home() / ".cache" / "qsgd_optax")


def _sha256(path: Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _command(cache: Path) -> str:
  return POLARITY_COMMAND.format(python=sys.executable, cache=cache)


def _pip_download(cache: Path) -> None:
  """Fetches the ``vadersentiment`` sdist into ``cache`` with pip."""
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         "vadersentiment==3.3.2", "-d", str(cache)]
  subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)


def _extract_polarity(sdist: Path, dest: Path, *, sdist_sha256: str, file_sha256: str) -> Path:
  """Verifies ``sdist`` and writes the ratings file from its nested tarball to ``dest``."""
  digest = _sha256(sdist)
  if digest != sdist_sha256:
    raise RuntimeError(f"{sdist} has sha256 {digest}, expected {sdist_sha256}; delete it and run again")
  with tarfile.open(sdist) as outer:
    inner_bytes = outer.extractfile(_INNER_TAR).read()  # type: ignore[union-attr]
  with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
    data = inner.extractfile(_INNER_MEMBER).read()  # type: ignore[union-attr]
  if hashlib.sha256(data).hexdigest() != file_sha256:
    raise RuntimeError(f"{_INNER_MEMBER} inside {sdist} does not have the expected sha256 {file_sha256}")
  dest.parent.mkdir(parents=True, exist_ok=True)
  tmp = dest.with_suffix(".tmp")
  tmp.write_bytes(data)
  tmp.replace(dest)
  return dest


def fetch_polarity_file(cache: str | os.PathLike[str] | None = None, *, download: bool = True) -> Path:
  """Returns the verified ratings file, fetching the ``vadersentiment`` sdist if needed.

  Args:
    cache: cache directory (default :func:`cache_dir`).
    download: run ``pip download`` when the sdist is not cached.

  Raises:
    RuntimeError: the file cannot be obtained; the message gives the exact
      command that fetches it.
  """
  cache = Path(cache) if cache is not None else cache_dir()
  dest = cache / POLARITY_FILE
  if dest.exists() and _sha256(dest) == POLARITY_FILE_SHA256:
    return dest
  sdist = cache / VADER_SDIST
  if not sdist.exists():
    if not download:
      raise RuntimeError(f"the polarity data is not cached in {cache}; fetch it with:\n  {_command(cache)}")
    cache.mkdir(parents=True, exist_ok=True)
    try:
      _pip_download(cache)
    except (OSError, subprocess.SubprocessError) as e:
      detail = getattr(e, "stderr", None) or str(e)
      raise RuntimeError(
          f"could not download the polarity data ({detail.strip()[-500:]}).\n"
          f"Fetch it with:\n  {_command(cache)}\n(or set QSGD_OPTAX_CACHE to a directory that holds {VADER_SDIST})"
      ) from e
    if not sdist.exists():
      raise RuntimeError(f"pip did not leave {VADER_SDIST} in {cache}; fetch it with:\n  {_command(cache)}")
  return _extract_polarity(sdist, dest, sdist_sha256=VADER_SDIST_SHA256, file_sha256=POLARITY_FILE_SHA256)


def read_polarity(path: str | os.PathLike[str]) -> tuple[list[str], np.ndarray]:
  """Parses a ratings file (``id<TAB>rating<TAB>text`` lines) into texts and labels.

  Labels are ``rating > 0``; sentences rated exactly 0 are dropped.

  Raises:
    ValueError: naming the first malformed line.
  """
  texts: list[str] = []
  labels: list[int] = []
  with open(path, encoding="utf-8", newline="") as f:
    for number, line in enumerate(f, 1):
      line = line.rstrip("\r\n")
      if not line.strip():
        continue
      fields = line.split("\t")
      try:
        if len(fields) != 3:
          raise ValueError(f"expected 3 tab-separated fields, got {len(fields)}")
        rating = float(fields[1])
      except ValueError as e:
        raise ValueError(f"{path}:{number}: malformed line ({e}): {line[:80]!r}") from None
      if rating != 0:
        texts.append(fields[2])
        labels.append(int(rating > 0))
  if not texts:
    raise ValueError(f"{path}: no rated sentences")
  return texts, np.asarray(labels, dtype=np.int32)


def _split_indices(n: int, fractions: tuple[float, float], seed: int) -> tuple[np.ndarray, ...]:
  """Seeded permutation cut into train / validation / test."""
  order = np.random.default_rng(np.random.SeedSequence([seed, 4])).permutation(n)
  n_val, n_test = (max(1, int(round(f * n))) for f in fractions)
  if n - n_val - n_test < 1:
    raise ValueError(f"{n} sentences are too few for validation/test fractions {fractions}")
  return order[n_val + n_test:], order[:n_val], order[n_val:n_val + n_test]


def load_polarity(
    *,
    max_len: int = 48,
    min_count: int = 2,
    max_vocab: int = 20000,
    validation_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    path: str | os.PathLike[str] | None = None,
    cache: str | os.PathLike[str] | None = None,
    download: bool = True,
) -> TextDataset:
  """The movie-review polarity task with a fixed, seeded train/validation/test split.

  Args:
    max_len: tokens kept per sentence (longer ones are truncated).
    min_count: a word needs this many training occurrences to get an id.
    max_vocab: at most this many ids (padding and unknown included).
    validation_fraction: share of sentences held out for validation.
    test_fraction: share held out for test.
    seed: fixes the split.
    path: a ratings file to use instead of the fetched one (no checksum).
    cache: cache directory (default :func:`cache_dir`); the tokenized split
      is cached there too.
    download: allow ``pip download`` when the data is not cached.

  Raises:
    RuntimeError: the data is missing and cannot be fetched (the message
      gives the command that fetches it).
  """
  if not 0 < validation_fraction < 1 or not 0 < test_fraction < 1 or validation_fraction + test_fraction >= 1:
    raise ValueError(f"validation_fraction and test_fraction must be in (0, 1) and sum below 1, "
                     f"got {validation_fraction}, {test_fraction}")
  if max_len < 1:
    raise ValueError(f"max_len must be >= 1, got {max_len}")
  cache = Path(cache) if cache is not None else cache_dir()
  source = Path(path) if path is not None else fetch_polarity_file(cache, download=download)
  settings = {"max_len": max_len, "min_count": min_count, "max_vocab": max_vocab, "seed": seed,
              "fractions": [validation_fraction, test_fraction], "source_sha256": _sha256(source)}
  key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
  cached = cache / f"polarity-{key}.npz"
  if cached.exists():
    with np.load(cached, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
  else:
    arrays = _tokenize_polarity(source, settings)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".polarity-{key}.{os.getpid()}.npz"
    np.savez_compressed(tmp, **arrays)
    tmp.replace(cached)
  splits = {name: Split(arrays[f"{name}_tokens"], arrays[f"{name}_labels"]) for name in ("train", "validation", "test")}
  vocab_size = int(arrays["vocab_size"])
  info = {**settings, "source": str(source), "vocab_size": vocab_size,
          **{f"n_{name}": len(s) for name, s in splits.items()}}
  return TextDataset("polarity", splits["train"], splits["test"], splits["validation"], vocab_size, 2, info)


def _tokenize_polarity(source: Path, settings: dict) -> dict[str, np.ndarray]:
  texts, labels = read_polarity(source)
  train, val, test = _split_indices(len(texts), tuple(settings["fractions"]), settings["seed"])
  tok = WordTokenizer.fit([texts[i] for i in train], min_count=settings["min_count"],
                          max_vocab=settings["max_vocab"])
  arrays: dict[str, np.ndarray] = {"vocab_size": np.asarray(len(tok.vocab))}
  for name, idx in (("train", train), ("validation", val), ("test", test)):
    arrays[f"{name}_tokens"] = tok.encode([texts[i] for i in idx], settings["max_len"])
    arrays[f"{name}_labels"] = labels[idx]
  return arrays
