"""Tests for the synthetic order task, the tokenizer and the polarity loader."""

from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from qsgd_optax.tasks.classification import text_data

# --------------------------------------------------------------------------- synthetic


def _marker_classes(tokens: np.ndarray, info: dict) -> np.ndarray:
  """Class of every token (-1 for noise), recomputed from the documented vocabulary layout."""
  first_marker = 1 + info["noise_tokens"]
  return np.where(tokens >= first_marker, (tokens - first_marker) // info["marker_tokens"], -1)


def test_synthetic_label_is_class_of_first_marker():
  data = text_data.make_synthetic(300, 100, seed=3)
  for split in (data.train, data.test):
    classes = _marker_classes(split.tokens, data.info)
    for row, label in zip(classes, split.labels):
      markers = row[row >= 0]
      assert label == markers[0]


def test_synthetic_token_counts_carry_no_label_information():
  data = text_data.make_synthetic(300, 10, num_classes=3, markers_per_class=2, seed=1)
  classes = _marker_classes(data.train.tokens, data.info)
  for c in range(3):
    np.testing.assert_array_equal((classes == c).sum(axis=1), 2)
  # the same multiset of tokens can carry either label: order decides
  reversed_labels = np.array([row[row >= 0][-1] for row in classes])
  assert 0.4 < np.mean(reversed_labels != data.train.labels) < 0.9


def test_synthetic_is_balanced_in_range_and_uses_the_whole_sequence():
  data = text_data.make_synthetic(2000, 500, seed=0)
  assert data.train.tokens.dtype == np.int32 and data.train.labels.dtype == np.int32
  assert data.train.tokens.shape == (2000, 32) and data.test.tokens.shape == (500, 32)
  assert data.train.tokens.min() >= 1 and data.train.tokens.max() < data.vocab_size
  assert abs(data.train.labels.mean() - 0.5) < 0.05
  classes = _marker_classes(data.train.tokens, data.info)
  first = np.argmax(classes >= 0, axis=1)
  assert first.max() >= 16, "the deciding marker is not always near the start"
  assert data.validation is None and data.num_classes == 2


def test_synthetic_split_is_fixed_by_seed():
  a, b = text_data.make_synthetic(50, 20, seed=7), text_data.make_synthetic(50, 20, seed=7)
  c = text_data.make_synthetic(50, 20, seed=8)
  np.testing.assert_array_equal(a.train.tokens, b.train.tokens)
  np.testing.assert_array_equal(a.test.labels, b.test.labels)
  assert not np.array_equal(a.train.tokens, c.train.tokens)
  assert not np.array_equal(a.train.tokens[:20], a.test.tokens)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        pytest.param({"n_train": 0}, "n_train", id="n_train"),
        pytest.param({"num_classes": 1}, "num_classes", id="num_classes"),
        pytest.param({"seq_len": 3}, "seq_len", id="seq_len"),
        pytest.param({"markers_per_class": 0}, "markers_per_class", id="markers"),
    ],
)
def test_synthetic_rejects_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    text_data.make_synthetic(**{"n_train": 10, "n_test": 10, **kwargs})


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_vocab_from_training_texts_only():
  tok = text_data.WordTokenizer.fit(["The film, the FILM!", "a film"], min_count=2)
  assert tok.vocab == ("<pad>", "<unk>", "film", "the")
  out = tok.encode(["the film isn't", "x"], max_len=3)
  np.testing.assert_array_equal(out, [[3, 2, 1], [1, 0, 0]])
  assert tok.split("''Conan'' isn't bad.") == ['"', "conan", '"', "isn't", "bad", "."]


def test_tokenizer_max_vocab_keeps_most_frequent():
  tok = text_data.WordTokenizer.fit(["a a a b b c"], min_count=1, max_vocab=4)
  assert tok.vocab == ("<pad>", "<unk>", "a", "b")


# --------------------------------------------------------------------------- polarity

_ROWS = [
    ("1", "2.26666666667", "A gorgeous, moving film."),
    ("2", "-1.5", "Dull and far too long."),
    ("3", "0", "It is a film."),
    ("4", "3.1", "Great fun from start to finish."),
    ("5", "-0.2", "Not great, not terrible, mostly dull."),
]


def _ratings_file(path: Path, rows_count: int = 40) -> Path:
  lines = []
  for i in range(rows_count):
    ident, rating, text = _ROWS[i % len(_ROWS)]
    lines.append(f"{i + 1}\t{rating}\t{text} {ident}")
  path.write_bytes(("\r\n".join(lines)).encode("utf-8"))  # CRLF and no final newline, like the real file
  return path


def test_read_polarity_labels_and_drops_zero_ratings(tmp_path):
  texts, labels = text_data.read_polarity(_ratings_file(tmp_path / "r.txt", 5))
  assert texts == ["A gorgeous, moving film. 1", "Dull and far too long. 2", "Great fun from start to finish. 4",
                   "Not great, not terrible, mostly dull. 5"]
  np.testing.assert_array_equal(labels, [1, 0, 1, 0])


def test_read_polarity_names_the_malformed_line(tmp_path):
  path = tmp_path / "bad.txt"
  path.write_text("1\t1.0\tfine\n2\tnot-a-number\toops\n")
  with pytest.raises(ValueError, match=r"bad.txt:2"):
    text_data.read_polarity(path)


def test_load_polarity_split_and_cache(tmp_path, monkeypatch):
  source = _ratings_file(tmp_path / "r.txt", 40)  # 32 rated sentences
  data = text_data.load_polarity(path=source, cache=tmp_path / "cache", max_len=6, min_count=1, seed=0)
  sizes = (len(data.train), len(data.validation), len(data.test))
  assert sizes == (26, 3, 3) and data.num_classes == 2
  assert data.train.tokens.shape == (26, 6) and data.train.tokens.max() < data.vocab_size
  # the three splits partition the rated sentences (16 positive, 16 negative)
  labels = np.concatenate([data.train.labels, data.validation.labels, data.test.labels])
  assert labels.sum() == 16 and len(labels) == 32
  assert len(list((tmp_path / "cache").glob("polarity-*.npz"))) == 1

  # a second load reads the cache, never the tokenizer
  def fail(*args, **kwargs):
    raise AssertionError("tokenized again")

  monkeypatch.setattr(text_data, "_tokenize_polarity", fail)
  again = text_data.load_polarity(path=source, cache=tmp_path / "cache", max_len=6, min_count=1, seed=0)
  np.testing.assert_array_equal(again.test.tokens, data.test.tokens)
  np.testing.assert_array_equal(again.train.labels, data.train.labels)


def test_load_polarity_split_depends_on_seed(tmp_path):
  source = _ratings_file(tmp_path / "r.txt", 40)
  a = text_data.load_polarity(path=source, cache=tmp_path, max_len=8, min_count=1, seed=0)
  b = text_data.load_polarity(path=source, cache=tmp_path, max_len=8, min_count=1, seed=1)
  assert not np.array_equal(a.train.labels, b.train.labels) or not np.array_equal(a.test.tokens, b.test.tokens)


def _fake_sdist(path: Path, content: bytes) -> Path:
  """A tarball laid out like the vadersentiment sdist, with a nested data tarball."""
  inner = io.BytesIO()
  with tarfile.open(fileobj=inner, mode="w:gz") as tar:
    info = tarfile.TarInfo(f"hutto_ICWSM_2014/{text_data.POLARITY_FILE}")
    info.size = len(content)
    tar.addfile(info, io.BytesIO(content))
  with tarfile.open(path, mode="w:gz") as tar:
    info = tarfile.TarInfo(text_data._INNER_TAR)
    info.size = len(inner.getvalue())
    tar.addfile(info, io.BytesIO(inner.getvalue()))
  return path


def test_extract_polarity_verifies_checksums(tmp_path):
  content = b"1\t1.5\tgood\r\n2\t-1.0\tbad"
  sdist = _fake_sdist(tmp_path / "sdist.tar.gz", content)
  sdist_sha = hashlib.sha256(sdist.read_bytes()).hexdigest()
  file_sha = hashlib.sha256(content).hexdigest()
  out = text_data._extract_polarity(sdist, tmp_path / "out.txt", sdist_sha256=sdist_sha, file_sha256=file_sha)
  assert out.read_bytes() == content
  with pytest.raises(RuntimeError, match="sha256"):
    text_data._extract_polarity(sdist, tmp_path / "x.txt", sdist_sha256="0" * 64, file_sha256=file_sha)
  with pytest.raises(RuntimeError, match="sha256"):
    text_data._extract_polarity(sdist, tmp_path / "x.txt", sdist_sha256=sdist_sha, file_sha256="0" * 64)


def test_missing_data_error_gives_the_command(tmp_path, monkeypatch):
  def offline(cache):
    raise subprocess.CalledProcessError(1, ["pip"], stderr="No matching distribution found")

  monkeypatch.setattr(text_data, "_pip_download", offline)
  with pytest.raises(RuntimeError) as error:
    text_data.load_polarity(cache=tmp_path)
  message = str(error.value)
  assert "pip download --no-deps --no-binary :all: vadersentiment==3.3.2 -d " + str(tmp_path) in message
  assert "No matching distribution" in message
  with pytest.raises(RuntimeError, match="pip download"):
    text_data.fetch_polarity_file(tmp_path, download=False)


def test_cache_dir_honours_environment(monkeypatch, tmp_path):
  monkeypatch.setenv("QSGD_OPTAX_CACHE", str(tmp_path))
  assert text_data.cache_dir() == tmp_path
  monkeypatch.delenv("QSGD_OPTAX_CACHE")
  assert text_data.cache_dir() == Path.home() / ".cache" / "qsgd_optax"


def _real_data_cached() -> bool:
  cache = text_data.cache_dir()
  return (cache / text_data.POLARITY_FILE).exists() or (cache / text_data.VADER_SDIST).exists()


@pytest.mark.skipif(not _real_data_cached(), reason="polarity data not cached (see text_data.fetch_polarity_file)")
def test_real_polarity_data():
  data = text_data.load_polarity(download=False)
  sizes = (len(data.train), len(data.validation), len(data.test))
  assert sum(sizes) == 10605 - 37 and sizes[1] == sizes[2] == 1057
  assert 0.45 < data.train.labels.mean() < 0.55
  assert 5000 < data.vocab_size < 20000


def test_agreement_label_is_whether_first_and_last_marker_agree():
  data = text_data.make_synthetic(400, 100, seed=5, rule="agree", markers=3)
  assert data.num_classes == 2 and data.info["generator"] == "first_last_agree"
  for split in (data.train, data.test):
    classes = _marker_classes(split.tokens, data.info)
    for row, label in zip(classes, split.labels):
      markers = row[row >= 0]
      assert markers.size == 3
      assert label == int(markers[0] == markers[-1])
  assert 0.4 < data.train.labels.mean() < 0.6  # two marker classes drawn independently: balanced


def test_agreement_is_not_linearly_separable_from_marker_positions():
  """A logistic regression on which class sits at each position stays near chance (it solves "first")."""
  def probe_accuracy(data):
    def features(split):
      classes = _marker_classes(split.tokens, data.info)
      return np.concatenate([classes == 0, classes == 1], axis=1).astype(np.float64)
    x, y, xt, yt = features(data.train), data.train.labels, features(data.test), data.test.labels
    mu, sd = x.mean(0), x.std(0) + 1e-9
    x, xt = (x - mu) / sd, (xt - mu) / sd
    w, b = np.zeros(x.shape[1]), 0.0
    for _ in range(1500):
      p = 1 / (1 + np.exp(-(x @ w + b)))
      w -= 0.5 * x.T @ (p - y) / len(y)
      b -= 0.5 * np.mean(p - y)
    return np.mean(((xt @ w + b) > 0) == yt)

  assert probe_accuracy(text_data.make_synthetic(2000, 1000)) > 0.9
  assert probe_accuracy(text_data.make_synthetic(2000, 1000, rule="agree")) < 0.6


@pytest.mark.parametrize("kwargs, match", [
    ({"rule": "last"}, "rule"),
    ({"rule": "first", "markers": 3}, "markers"),
    ({"rule": "agree", "markers": 1}, "markers"),
    ({"rule": "agree", "markers": 40}, "markers"),
])
def test_agreement_rejects_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    text_data.make_synthetic(8, 4, **kwargs)
