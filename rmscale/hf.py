"""Hugging Face checkpoints (GPT-NeoX/Pythia, Llama, GPT-2) to and from rmscale's config and params.

    model, params = load_pretrained("/ckpts/pythia-410m", reward_head="linear", rng=key)
    save_pretrained(model.cfg, params, "/out/pythia-410m-rm")

Safetensors are read and written with numpy alone: no PyTorch at run time, and bfloat16 works (through
ml_dtypes; safetensors' own numpy reader rejects it, yet most Llama checkpoints ship in it). One
checkpoint tensor is on the host at a time and each parameter goes straight into its target sharding,
so a model larger than one device's memory loads without ever sitting whole on one device.

Each family is described once as a list of ``_Map``s (HF tensor <-> rmscale leaves, with the split
for import and the join for export side by side), so import and export cannot drift apart.

Command line::

    python -m rmscale.hf convert --hf_dir=/ckpts/pythia-70m --out=/ckpts/pythia-70m-rmscale
    python -m rmscale.hf export --ckpt=/ckpts/pythia-70m-rmscale --out=/ckpts/pythia-70m-hf

A missing, malformed or mismatched checkpoint (config.json, its fields, tensors and their shapes) is
a `UserError` naming the file and the field or tensor; the command line reports it in one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_dtypes
import numpy as np

from rmscale import atomic, errors, fs
from rmscale.errors import UserError
from rmscale.fs import MissingFileError
from rmscale.models.config import TransformerConfig
from rmscale.models.sizes import FAMILIES
from rmscale.models.transformer import Transformer, abstract_params, init_params

_log = logging.getLogger(__name__)

Path = tuple[str, ...]  # A leaf of the params tree, e.g. ("layers_0", "attn", "query", "kernel").

# ----------------------------------------------------------------------------------------------
# safetensors, by hand: an 8-byte little-endian header length, a JSON header, then raw tensors.

_ST_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "F8_E4M3": ml_dtypes.float8_e4m3fn,
  "F8_E5M2": ml_dtypes.float8_e5m2,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U8": np.uint8,
  "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # The safetensors spec's own limit; a larger claim means a corrupt file.


@dataclasses.dataclass(frozen=True)
class _TensorInfo:
  file: str
  dtype: np.dtype
  shape: tuple[int, ...]
  offset: int  # Absolute byte offset of the data in ``file``.


def read_safetensors_header(path: str) -> dict[str, _TensorInfo]:
  """Tensor names to dtype/shape/offset, checking that every tensor lies inside the file."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise UserError(
        f"{path}: corrupt safetensors file: {size} bytes, shorter than the header length"
      )
    n = int.from_bytes(head, "little")
    if n > min(size - 8, _MAX_HEADER):
      raise UserError(
        f"{path}: truncated or corrupt safetensors file: the header claims {n} bytes "
        f"but the file has {size}"
      )
    try:
      header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise UserError(f"{path}: corrupt safetensors header: {e}") from e
  if not isinstance(header, dict):
    raise UserError(f"{path}: corrupt safetensors header: expected a JSON object")
  data_start = 8 + n
  infos = {}
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype = np.dtype(_ST_DTYPES[entry["dtype"]])
      shape = tuple(int(d) for d in entry["shape"])
      begin, end = (int(o) for o in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as e:
      raise UserError(
        f"{path}: corrupt safetensors header entry for tensor {name!r}: {entry!r} "
        f"({type(e).__name__}: {e})"
      ) from e
    if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
      raise UserError(
        f"{path}: corrupt safetensors header: tensor {name!r} of shape {shape} "
        f"{entry['dtype']} has data_offsets {[begin, end]}"
      )
    if data_start + end > size:
      raise UserError(
        f"{path}: truncated safetensors file: tensor {name!r} ends at byte "
        f"{data_start + end} but the file has {size} bytes"
      )
    infos[name] = _TensorInfo(path, dtype, shape, data_start + begin)
  return infos


def _read_tensor(info: _TensorInfo) -> np.ndarray:
  count = math.prod(info.shape)
  a = np.fromfile(info.file, dtype=info.dtype, count=count, offset=info.offset)
  if a.size != count:  # The file shrank after its header was read.
    raise UserError(f"{info.file}: truncated safetensors file: read {a.size} of {count} elements")
  return a.reshape(info.shape)


def write_safetensors(
  path: str,
  specs: Sequence[tuple[str, np.dtype, tuple[int, ...]]],
  arrays,
  metadata: dict[str, str] | None = None,
) -> None:
  """Writes tensors atomically, streaming ``arrays`` (an iterable matching ``specs``) one at a time.

  The header (which needs every offset) is built from ``specs`` alone, so a caller can produce each
  array only when it is written, e.g. gathering a sharded parameter to the host one by one.
  """
  header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
  offset = 0
  for name, dtype, shape in specs:
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    header[name] = {
      "dtype": _ST_NAMES[np.dtype(dtype)],
      "shape": list(shape),
      "data_offsets": [offset, offset + nbytes],
    }
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # Readers expect tensor data to start 8-byte aligned.

  def fill(f):
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    for (name, dtype, shape), a in zip(specs, arrays, strict=True):
      a = np.ascontiguousarray(a)
      if a.dtype != np.dtype(dtype) or a.shape != tuple(shape):
        raise ValueError(
          f"{path}: tensor {name!r} is {a.dtype}{list(a.shape)}, "
          f"expected {np.dtype(dtype)}{list(shape)}"
        )
      f.write(a.reshape(-1).view(np.uint8).data)

  atomic.write(path, fill)


def _write_json(path: str, obj: Any) -> None:
  atomic.write(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()))


# ----------------------------------------------------------------------------------------------
# A Hugging Face model directory: config.json plus one safetensors file or an index of shards.

_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"


class HFCheckpoint:
  """The tensors of a local HF model directory, by name, read lazily."""

  def __init__(self, directory: str):
    self.directory = str(directory)
    if not os.path.isdir(self.directory):
      raise UserError(
        f"{self.directory}: not a directory (expected a Hugging Face model directory)"
      )
    self.config_path = os.path.join(self.directory, "config.json")
    self.config = _read_json(self.config_path)
    self.infos: dict[str, _TensorInfo] = {}
    single, index = (os.path.join(self.directory, n) for n in (_SINGLE, _INDEX))
    if os.path.exists(single):
      self.infos = read_safetensors_header(single)
    elif os.path.exists(index):
      self._read_index(index)
    else:
      found = sorted(os.listdir(self.directory))
      hint = (
        " It holds PyTorch .bin weights only; convert them to safetensors first (e.g. "
        "transformers' from_pretrained + save_pretrained(safe_serialization=True))."
        if any(n.startswith("pytorch_model") for n in found)
        else ""
      )
      raise UserError(
        f"{self.directory}: neither {_SINGLE} nor {_INDEX} found (files: {found}).{hint}"
      )

  def _read_index(self, index: str) -> None:
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise UserError(f"{index}: field 'weight_map' is missing or empty")
    by_file: dict[str, list[str]] = {}
    for name, file in weight_map.items():
      by_file.setdefault(file, []).append(name)
    for file, names in sorted(by_file.items()):
      path = os.path.join(self.directory, file)
      if not os.path.exists(path):
        raise UserError(
          f"{index}: shard file {file!r} (listed in 'weight_map' for {len(names)} "
          f"tensors, e.g. {names[0]!r}) is missing from {self.directory}"
        )
      infos = read_safetensors_header(path)
      for name in names:
        if name not in infos:
          raise UserError(
            f"{index}: 'weight_map' puts tensor {name!r} in {file!r}, "
            f"but {path} does not contain it"
          )
        self.infos[name] = infos[name]

  def shape(self, name: str) -> tuple[int, ...]:
    return self.infos[name].shape

  def read(self, name: str) -> np.ndarray:
    return _read_tensor(self.infos[name])


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    raise MissingFileError(f"{path}: file not found")
  try:
    with open(path) as f:
      obj = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserError(f"{path}: not valid JSON: {e}") from e
  if not isinstance(obj, dict):
    raise UserError(f"{path}: expected a JSON object")
  return obj


# ----------------------------------------------------------------------------------------------
# config.json <-> TransformerConfig.

_MODEL_TYPES = {"gpt_neox": "neox", "llama": "llama", "gpt2": "gpt2"}
_HF_MODEL_TYPE = {v: k for k, v in _MODEL_TYPES.items()}
# Architecture name -> which head its checkpoint holds ("lm", "score" or "none": bare trunk).
_ARCHITECTURES = {
  "neox": {
    "GPTNeoXForCausalLM": "lm",
    "GPTNeoXForSequenceClassification": "score",
    "GPTNeoXModel": "none",
  },
  "llama": {
    "LlamaForCausalLM": "lm",
    "LlamaForSequenceClassification": "score",
    "LlamaModel": "none",
  },
  "gpt2": {"GPT2LMHeadModel": "lm", "GPT2ForSequenceClassification": "score", "GPT2Model": "none"},
}
_ACTIVATIONS = {
  "gelu": "gelu",
  "gelu_new": "gelu_tanh",
  "gelu_pytorch_tanh": "gelu_tanh",
  "gelu_fast": "gelu_tanh",
  "relu": "relu",
  "silu": "silu",
  "swish": "silu",
}
_HF_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}


class _Fields:
  """config.json fields with errors that name the file and the field."""

  def __init__(self, hf: dict, path: str):
    self.hf, self.path = hf, path

  def get(self, key: str, default: Any = ...) -> Any:
    value = self.hf.get(key)
    if value is None:
      if default is ...:
        raise UserError(f"{self.path}: field {key!r} is missing")
      return default
    return value

  def int(self, key: str, default: Any = ...) -> int:
    value = self.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise UserError(f"{self.path}: field {key!r} must be a positive integer, got {value!r}")
    return value

  def bool(self, key: str, default: bool) -> bool:
    value = self.get(key, default)
    if not isinstance(value, bool):
      raise UserError(f"{self.path}: field {key!r} must be true or false, got {value!r}")
    return value

  def require(self, key: str, expected: Any, default: Any) -> None:
    value = self.get(key, default)
    if value != expected:
      raise UserError(
        f"{self.path}: field {key!r}={value!r} is not supported (rmscale needs {expected!r})"
      )

  def activation(self, key: str, default: str) -> str:
    name = self.get(key, default)
    if name not in _ACTIVATIONS:
      raise UserError(
        f"{self.path}: field {key!r}={name!r} is not supported; known: {sorted(_ACTIVATIONS)}"
      )
    return _ACTIVATIONS[name]

  def rope(self) -> tuple[float, float]:
    """(theta, rotary fraction) from transformers 5's rope_parameters or the older flat fields."""
    params = self.get("rope_parameters", {})
    scaling = self.get("rope_scaling", {})
    rope_type = (
      params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    )
    if rope_type != "default":
      raise UserError(
        f"{self.path}: rope type {rope_type!r} (field 'rope_parameters'/'rope_scaling') "
        "is not supported; rmscale implements unscaled RoPE only"
      )
    theta = params.get("rope_theta", self.get("rope_theta", self.get("rotary_emb_base", 10000.0)))
    pct = params.get(
      "partial_rotary_factor", self.get("partial_rotary_factor", self.get("rotary_pct", 1.0))
    )
    return float(theta), float(pct)


def _family_and_head(ckpt: HFCheckpoint) -> tuple[str, str]:
  """Family from ``model_type``; the head the checkpoint holds from ``architectures``."""
  fields = _Fields(ckpt.config, ckpt.config_path)
  model_type = fields.get("model_type")
  if model_type not in _MODEL_TYPES:
    raise UserError(
      f"{ckpt.config_path}: field 'model_type'={model_type!r} is not supported; "
      f"known: {sorted(_MODEL_TYPES)}"
    )
  family = _MODEL_TYPES[model_type]
  archs = fields.get("architectures", [])
  if not archs:  # Old exports omit it; the score tensor is then the only witness.
    return family, "score" if "score.weight" in ckpt.infos else "lm"
  if len(archs) != 1 or archs[0] not in _ARCHITECTURES[family]:
    raise UserError(
      f"{ckpt.config_path}: field 'architectures'={archs!r} is not supported for "
      f"model_type {model_type!r}; known: {sorted(_ARCHITECTURES[family])}"
    )
  head = _ARCHITECTURES[family][archs[0]]
  if head == "score":
    labels = len(ckpt.config.get("id2label") or {0: None})
    if labels != 1:
      raise UserError(
        f"{ckpt.config_path}: field 'id2label' has {labels} labels; a reward model "
        "checkpoint needs num_labels=1"
      )
  return family, head


def _config_fields(family: str, hf: dict, path: str) -> dict[str, Any]:
  """TransformerConfig fields (architecture only, no heads) from a family's config.json."""
  f = _Fields(hf, path)
  out = dict(FAMILIES[family])
  if family == "neox":
    theta, pct = f.rope()
    bias = f.bool("attention_bias", True)
    out.update(
      vocab_size=f.int("vocab_size"),
      d_model=f.int("hidden_size"),
      n_layers=f.int("num_hidden_layers"),
      n_heads=f.int("num_attention_heads"),
      d_ff=f.int("intermediate_size"),
      max_len=f.int("max_position_embeddings", 2048),
      norm_eps=float(f.get("layer_norm_eps", 1e-5)),
      activation=f.activation("hidden_act", "gelu"),
      rotary_pct=pct,
      rope_theta=theta,
      parallel_residual=f.bool("use_parallel_residual", True),
      tie_embeddings=f.bool("tie_word_embeddings", False),
      qkv_bias=bias,
      out_bias=bias,
    )
  elif family == "llama":
    theta, pct = f.rope()
    if pct != 1.0:
      raise UserError(f"{path}: field 'partial_rotary_factor'={pct} is not supported for llama")
    f.require("hidden_act", "silu", "silu")
    d_model, n_heads = f.int("hidden_size"), f.int("num_attention_heads")
    head_dim = f.int("head_dim", d_model // n_heads)
    bias = f.bool("attention_bias", False)
    out.update(
      vocab_size=f.int("vocab_size"),
      d_model=d_model,
      n_layers=f.int("num_hidden_layers"),
      n_heads=n_heads,
      n_kv_heads=f.int("num_key_value_heads", n_heads),
      head_dim=None if head_dim * n_heads == d_model else head_dim,
      d_ff=f.int("intermediate_size"),
      max_len=f.int("max_position_embeddings", 2048),
      norm_eps=float(f.get("rms_norm_eps", 1e-6)),
      rope_theta=theta,
      tie_embeddings=f.bool("tie_word_embeddings", False),
      qkv_bias=bias,
      out_bias=bias,
      mlp_bias=f.bool("mlp_bias", False),
    )
  else:
    f.require("scale_attn_weights", True, True)
    f.require("scale_attn_by_inverse_layer_idx", False, False)
    f.require("add_cross_attention", False, False)
    d_model = f.int("n_embd")
    out.update(
      vocab_size=f.int("vocab_size"),
      d_model=d_model,
      n_layers=f.int("n_layer"),
      n_heads=f.int("n_head"),
      d_ff=f.int("n_inner", 4 * d_model),
      max_len=f.int("n_positions"),
      norm_eps=float(f.get("layer_norm_epsilon", 1e-5)),
      activation=f.activation("activation_function", "gelu_new"),
      tie_embeddings=f.bool("tie_word_embeddings", True),
    )
  return out


def _family_mismatches(cfg: TransformerConfig, family: str) -> list[str]:
  """Why ``cfg`` cannot be written as ``family`` (empty when it can)."""
  default_head_dim = cfg.head_dim is None or cfg.head_dim * cfg.n_heads == cfg.d_model
  checks = {
    "neox": [
      ("norm", cfg.norm == "layernorm"),
      ("position", cfg.position == "rope"),
      ("activation", cfg.activation in _HF_ACTIVATION),
      ("n_kv_heads", cfg.kv_heads == cfg.n_heads),
      ("head_dim", default_head_dim),
      ("qkv_bias", cfg.qkv_bias == cfg.out_bias),
      ("mlp_bias", cfg.mlp_bias),
    ],
    "llama": [
      ("norm", cfg.norm == "rmsnorm"),
      ("position", cfg.position == "rope"),
      ("activation", cfg.activation == "swiglu"),
      ("rotary_pct", cfg.rotary_pct == 1.0),
      ("parallel_residual", not cfg.parallel_residual),
      ("qkv_bias", cfg.qkv_bias == cfg.out_bias),
    ],
    "gpt2": [
      ("norm", cfg.norm == "layernorm"),
      ("position", cfg.position == "learned"),
      ("activation", cfg.activation in _HF_ACTIVATION),
      ("parallel_residual", not cfg.parallel_residual),
      ("n_kv_heads", cfg.kv_heads == cfg.n_heads),
      ("head_dim", default_head_dim),
      ("qkv_bias", cfg.qkv_bias),
      ("out_bias", cfg.out_bias),
      ("mlp_bias", cfg.mlp_bias),
    ],
  }[family]
  return [f"model.{name}={getattr(cfg, name)!r}" for name, ok in checks if not ok]


def infer_family(cfg: TransformerConfig) -> str:
  """The HF family that represents ``cfg`` exactly; ValueError listing the blocking fields if none."""
  reasons = {fam: _family_mismatches(cfg, fam) for fam in FAMILIES}
  for fam, why in reasons.items():
    if not why:
      return fam
  raise UserError(
    "model config matches no Hugging Face family: "
    + "; ".join(f"{fam}: {', '.join(why)}" for fam, why in reasons.items())
  )


def _config_to_hf(
  cfg: TransformerConfig, family: str, head: str, dtype: np.dtype
) -> dict[str, Any]:
  """config.json for transformers 5 (rope_parameters) that 4.x also reads (flat rope fields)."""
  arch = {v: k for k, v in _ARCHITECTURES[family].items()}[head]
  out: dict[str, Any] = {
    "model_type": _HF_MODEL_TYPE[family],
    "architectures": [arch],
    "vocab_size": cfg.vocab_size,
    "tie_word_embeddings": cfg.tie_embeddings,
    "dtype": np.dtype(dtype).name,
    "torch_dtype": np.dtype(dtype).name,
  }
  if head == "score":
    out.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
  if family == "neox":
    out.update(
      hidden_size=cfg.d_model,
      num_hidden_layers=cfg.n_layers,
      num_attention_heads=cfg.n_heads,
      intermediate_size=cfg.d_ff,
      hidden_act=_HF_ACTIVATION[cfg.activation],
      max_position_embeddings=cfg.max_len,
      layer_norm_eps=cfg.norm_eps,
      use_parallel_residual=cfg.parallel_residual,
      attention_bias=cfg.qkv_bias,
      rotary_pct=cfg.rotary_pct,
      rotary_emb_base=cfg.rope_theta,
      rope_parameters={
        "rope_type": "default",
        "rope_theta": cfg.rope_theta,
        "partial_rotary_factor": cfg.rotary_pct,
      },
    )
  elif family == "llama":
    out.update(
      hidden_size=cfg.d_model,
      num_hidden_layers=cfg.n_layers,
      num_attention_heads=cfg.n_heads,
      num_key_value_heads=cfg.kv_heads,
      head_dim=cfg.dim_per_head,
      intermediate_size=cfg.d_ff,
      hidden_act="silu",
      max_position_embeddings=cfg.max_len,
      rms_norm_eps=cfg.norm_eps,
      attention_bias=cfg.qkv_bias,
      mlp_bias=cfg.mlp_bias,
      rope_theta=cfg.rope_theta,
      rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
    )
  else:
    out.update(
      n_embd=cfg.d_model,
      n_layer=cfg.n_layers,
      n_head=cfg.n_heads,
      n_inner=cfg.d_ff,
      n_positions=cfg.max_len,
      n_ctx=cfg.max_len,
      activation_function=_HF_ACTIVATION[cfg.activation],
      layer_norm_epsilon=cfg.norm_eps,
      scale_attn_weights=True,
      scale_attn_by_inverse_layer_idx=False,
      reorder_and_upcast_attn=False,
    )
  return out


# ----------------------------------------------------------------------------------------------
# Tensor layouts: one HF tensor <-> one or more rmscale leaves.


@dataclasses.dataclass(frozen=True)
class _Map:
  names: tuple[str, ...]  # HF tensor name; later names are older aliases accepted on import.
  hf_shape: tuple[int, ...]
  paths: tuple[Path, ...]
  split: Callable[[np.ndarray], tuple[np.ndarray, ...]]  # HF tensor -> rmscale leaves.
  join: Callable[..., np.ndarray]  # rmscale leaves -> HF tensor.


def _copy(name, shape, path, aliases=()) -> _Map:
  return _Map((name, *aliases), tuple(shape), (path,), lambda a: (a,), lambda a: a)


def _reshape(name, hf_shape, path, shape) -> _Map:
  """A bias stored flat in HF, per head ([H, D]) in rmscale."""
  return _Map(
    (name,), tuple(hf_shape), (path,), lambda a: (a.reshape(shape),), lambda a: a.reshape(hf_shape)
  )


def _linear(name, out_features, in_features, path, kernel_shape, aliases=()) -> _Map:
  """torch.nn.Linear stores [out, in]; rmscale kernels are [in, out], reshaped per head."""
  return _Map(
    (name, *aliases),
    (out_features, in_features),
    (path,),
    lambda w: (w.T.reshape(kernel_shape),),
    lambda k: k.reshape(in_features, out_features).T,
  )


def _conv1d(name, in_features, out_features, path, kernel_shape) -> _Map:
  """GPT-2's Conv1D already stores [in, out]."""
  return _Map(
    (name,),
    (in_features, out_features),
    (path,),
    lambda w: (w.reshape(kernel_shape),),
    lambda k: k.reshape(in_features, out_features),
  )


def _vocab_padded(m: _Map, cfg: TransformerConfig, axis: int) -> _Map:
  """``m`` for a leaf with a vocabulary dimension at ``axis`` of a model with a padded vocabulary
  (``model.vocab_multiple``): zero rows appended on import, dropped on export, so HF files keep the
  checkpoint's own vocabulary size."""
  V, padded = cfg.vocab_size, cfg.padded_vocab
  if padded == V:
    return m

  def split(a):
    (leaf,) = m.split(a)
    pad = [(0, 0)] * leaf.ndim
    pad[axis] = (0, padded - V)
    return (np.pad(leaf, pad),)

  return dataclasses.replace(
    m, split=split, join=lambda leaf: m.join(np.take(leaf, np.arange(V), axis=axis))
  )


def _neox_qkv(name, cfg, paths) -> _Map:
  """GPT-NeoX fuses q, k, v per head: rows [H, 3, D] (modeling_gpt_neox views [.., H, 3D], chunks)."""
  E, H, D = cfg.d_model, cfg.n_heads, cfg.dim_per_head

  def split(w):
    w = w.reshape(H, 3, D, E)
    return tuple(w[:, j].transpose(2, 0, 1) for j in range(3))  # [E, H, D] each.

  def join(*ks):
    return np.stack([k.transpose(1, 2, 0) for k in ks], 1).reshape(3 * H * D, E)

  return _Map((name,), (3 * H * D, E), paths, split, join)


def _neox_qkv_bias(name, cfg, paths) -> _Map:
  H, D = cfg.n_heads, cfg.dim_per_head
  return _Map(
    (name,),
    (3 * H * D,),
    paths,
    lambda b: tuple(b.reshape(H, 3, D)[:, j] for j in range(3)),
    lambda *bs: np.stack(bs, 1).reshape(3 * H * D),
  )


def _gpt2_qkv(name, cfg, paths) -> _Map:
  """GPT-2's c_attn is Conv1D [E, 3E] whose columns are [3, H, D] (split(E) then view per head)."""
  E, H, D = cfg.d_model, cfg.n_heads, cfg.dim_per_head
  return _Map(
    (name,),
    (E, 3 * H * D),
    paths,
    lambda w: tuple(w.reshape(E, 3, H, D)[:, j] for j in range(3)),
    lambda *ks: np.stack(ks, 1).reshape(E, 3 * H * D),
  )


def _gpt2_qkv_bias(name, cfg, paths) -> _Map:
  H, D = cfg.n_heads, cfg.dim_per_head
  return _Map(
    (name,),
    (3 * H * D,),
    paths,
    lambda b: tuple(b.reshape(3, H, D)),
    lambda *bs: np.stack(bs).reshape(3 * H * D),
  )


def _norm(cfg, hf: str, path: Path) -> list[_Map]:
  maps = [_copy(f"{hf}.weight", (cfg.d_model,), path + ("scale",))]
  if cfg.norm == "layernorm":
    maps.append(_copy(f"{hf}.bias", (cfg.d_model,), path + ("bias",)))
  return maps


def _dense(
  hf: str,
  out_f: int,
  in_f: int,
  path: Path,
  kernel_shape,
  bias_shape,
  bias: bool,
  conv1d: bool = False,
) -> list[_Map]:
  kernel = (
    _conv1d(f"{hf}.weight", in_f, out_f, path + ("kernel",), kernel_shape)
    if conv1d
    else _linear(f"{hf}.weight", out_f, in_f, path + ("kernel",), kernel_shape)
  )
  if not bias:
    return [kernel]
  return [kernel, _reshape(f"{hf}.bias", (out_f,), path + ("bias",), bias_shape)]


_PREFIX = {"neox": "gpt_neox.", "llama": "model.", "gpt2": "transformer."}


def _layout(family: str, cfg: TransformerConfig, head: str, prefix: str) -> list[_Map]:
  """Every HF tensor of ``family`` for ``cfg`` with its rmscale leaves; ``head`` in lm/score/none."""
  E, F, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
  H, K, D = cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
  p = prefix
  maps: list[_Map] = []
  for i in range(cfg.n_layers):
    L = ("layers_" + str(i),)
    qkv = tuple(L + ("attn", n, "kernel") for n in ("query", "key", "value"))
    qkv_b = tuple(L + ("attn", n, "bias") for n in ("query", "key", "value"))
    if family == "neox":
      hf = f"{p}layers.{i}."
      maps += _norm(cfg, hf + "input_layernorm", L + ("ln_attn",))
      maps += _norm(cfg, hf + "post_attention_layernorm", L + ("ln_mlp",))
      maps.append(_neox_qkv(hf + "attention.query_key_value.weight", cfg, qkv))
      if cfg.qkv_bias:
        maps.append(_neox_qkv_bias(hf + "attention.query_key_value.bias", cfg, qkv_b))
      maps += _dense(
        hf + "attention.dense", E, H * D, L + ("attn", "out"), (H, D, E), (E,), cfg.out_bias
      )
      maps += _dense(hf + "mlp.dense_h_to_4h", F, E, L + ("mlp", "up"), (E, F), (F,), True)
      maps += _dense(hf + "mlp.dense_4h_to_h", E, F, L + ("mlp", "down"), (F, E), (E,), True)
    elif family == "llama":
      hf = f"{p}layers.{i}."
      maps += _norm(cfg, hf + "input_layernorm", L + ("ln_attn",))
      maps += _norm(cfg, hf + "post_attention_layernorm", L + ("ln_mlp",))
      for name, heads, path in (
        ("q_proj", H, "query"),
        ("k_proj", K, "key"),
        ("v_proj", K, "value"),
      ):
        maps += _dense(
          hf + "self_attn." + name,
          heads * D,
          E,
          L + ("attn", path),
          (E, heads, D),
          (heads, D),
          cfg.qkv_bias,
        )
      maps += _dense(
        hf + "self_attn.o_proj", E, H * D, L + ("attn", "out"), (H, D, E), (E,), cfg.out_bias
      )
      maps += _dense(hf + "mlp.gate_proj", F, E, L + ("mlp", "gate"), (E, F), (F,), cfg.mlp_bias)
      maps += _dense(hf + "mlp.up_proj", F, E, L + ("mlp", "up"), (E, F), (F,), cfg.mlp_bias)
      maps += _dense(hf + "mlp.down_proj", E, F, L + ("mlp", "down"), (F, E), (E,), cfg.mlp_bias)
    else:
      hf = f"{p}h.{i}."
      maps += _norm(cfg, hf + "ln_1", L + ("ln_attn",))
      maps += _norm(cfg, hf + "ln_2", L + ("ln_mlp",))
      maps.append(_gpt2_qkv(hf + "attn.c_attn.weight", cfg, qkv))
      maps.append(_gpt2_qkv_bias(hf + "attn.c_attn.bias", cfg, qkv_b))
      maps += _dense(
        hf + "attn.c_proj", E, H * D, L + ("attn", "out"), (H, D, E), (E,), True, conv1d=True
      )
      maps += _dense(hf + "mlp.c_fc", F, E, L + ("mlp", "up"), (E, F), (F,), True, conv1d=True)
      maps += _dense(hf + "mlp.c_proj", E, F, L + ("mlp", "down"), (F, E), (E,), True, conv1d=True)
  embed, final = {
    "neox": ("embed_in", "final_layer_norm"),
    "llama": ("embed_tokens", "norm"),
    "gpt2": ("wte", "ln_f"),
  }[family]
  maps.append(_vocab_padded(_copy(f"{p}{embed}.weight", (V, E), ("embed", "embedding")), cfg, 0))
  if family == "gpt2":
    maps.append(_copy(f"{p}wpe.weight", (cfg.max_len, E), ("pos_embed", "embedding")))
  maps += _norm(cfg, p + final, ("final_norm",))
  if head == "lm" and not cfg.tie_embeddings:
    # transformers writes GPT-NeoX's head as embed_out (its 5.x class renames it lm_head on load).
    names = ("embed_out.weight", "lm_head.weight") if family == "neox" else ("lm_head.weight",)
    lm = _linear(names[0], V, E, ("lm_head", "kernel"), (E, V), aliases=names[1:])
    maps.append(_vocab_padded(lm, cfg, 1))
  if head == "score":
    maps.append(_linear("score.weight", 1, E, ("reward_head", "score", "kernel"), (E, 1)))
  return maps


# Non-parameter buffers that older exports contain (causal-mask and RoPE caches).
_BUFFERS = re.compile(
  r"(^|\.)(attn\.bias|attn\.masked_bias|attention\.bias|attention\.masked_bias"
  r"|rotary_emb\.inv_freq)$"
)


def _trunk_prefix(family: str, names) -> str:
  """HF's full models prefix the trunk (``gpt_neox.``); bare trunks and OpenAI's GPT-2 do not."""
  p = _PREFIX[family]
  return p if any(n.startswith(p) for n in names) else ""


# ----------------------------------------------------------------------------------------------
# Import.


def _dtype_name(dtype) -> str:
  return np.dtype(dtype).name


def _plan(
  path: str,
  *,
  reward_head: str | None,
  value_head: bool,
  lm_head: bool | None,
  dtype,
  param_dtype,
  overrides: dict,
) -> tuple[HFCheckpoint, str, TransformerConfig, list[_Map]]:
  ckpt = HFCheckpoint(path)
  family, stored = _family_and_head(ckpt)
  fields = _config_fields(family, ckpt.config, ckpt.config_path)
  if reward_head not in (None, "none", "linear", "mlp"):
    raise ValueError(f"reward_head={reward_head!r} must be None, 'none', 'linear' or 'mlp'")
  if reward_head is None:
    reward_head = "linear" if stored == "score" else "none"
  if reward_head == "mlp" and stored == "score":
    raise UserError(
      f"{path} holds a trained linear reward head (score.weight); load it with "
      "reward_head='linear' (or 'none' to drop it) rather than replacing it with a "
      "fresh MLP"
    )
  if lm_head is None:
    lm_head = stored == "lm"
  if lm_head and stored != "lm":
    raise UserError(
      f"{ckpt.config_path}: architecture {ckpt.config.get('architectures')} has no LM "
      "head to load; pass lm_head=False"
    )
  fields.update(
    lm_head=lm_head,
    tie_embeddings=fields["tie_embeddings"] and lm_head,
    reward_head=reward_head,
    value_head=value_head,
    dtype=_dtype_name(dtype),
    param_dtype=_dtype_name(param_dtype),
  )
  fields.update(overrides)
  try:
    cfg = TransformerConfig(**fields)
  except ValueError as e:
    raise UserError(f"{ckpt.config_path}: {e}") from e
  if stored == "score" and reward_head == "linear":
    loaded_head = "score"
  else:
    loaded_head = "lm" if lm_head else "none"
  maps = _layout(family, cfg, loaded_head, _trunk_prefix(family, ckpt.infos))
  _check_names_and_shapes(ckpt, family, cfg, maps, stored)
  return ckpt, family, cfg, maps


def _check_names_and_shapes(
  ckpt: HFCheckpoint, family: str, cfg: TransformerConfig, maps: list[_Map], stored: str
) -> None:
  """Fails before any tensor data is read: missing, unexpected and wrongly shaped tensors."""
  where = ckpt.directory
  missing = [m.names[0] for m in maps if not any(n in ckpt.infos for n in m.names)]
  if missing:
    raise UserError(
      f"{where}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''} "
      f"({len(missing)} in all) that a {family} {ckpt.config.get('architectures')} "
      f"with this config.json must have"
    )
  used = {n for m in maps for n in m.names}
  dropped = set()  # Heads the caller chose not to load, and the tied copy of the embedding.
  if stored == "score" and cfg.reward_head != "linear":
    dropped.add("score.weight")
  if stored == "lm" and (not cfg.lm_head or cfg.tie_embeddings):
    dropped |= {"embed_out.weight", "lm_head.weight"}
  unexpected = sorted(
    n for n in ckpt.infos if n not in used and n not in dropped and not _BUFFERS.search(n)
  )
  if unexpected:
    files = sorted({os.path.basename(ckpt.infos[n].file) for n in unexpected})
    raise UserError(
      f"{where}: unexpected tensors {unexpected[:5]}"
      f"{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)} in all, in {files}) "
      f"for a {family} model with this config.json"
    )
  for m in maps:
    name = next(n for n in m.names if n in ckpt.infos)
    got = ckpt.shape(name)
    if got != m.hf_shape:
      raise UserError(
        f"{ckpt.infos[name].file}: tensor {name!r} has shape {got} but {ckpt.config_path} implies "
        f"{m.hf_shape} (vocab_size={cfg.vocab_size}, d_model={cfg.d_model}, n_heads={cfg.n_heads}, "
        f"n_kv_heads={cfg.kv_heads}, d_ff={cfg.d_ff}, max_len={cfg.max_len})"
      )


def load_config(
  path: str,
  *,
  reward_head: str | None = None,
  value_head: bool = False,
  lm_head: bool | None = None,
  dtype="float32",
  param_dtype="float32",
  **overrides,
) -> TransformerConfig:
  """The TransformerConfig that `load_pretrained` would build (e.g. to derive shardings first)."""
  return _plan(
    path,
    reward_head=reward_head,
    value_head=value_head,
    lm_head=lm_head,
    dtype=dtype,
    param_dtype=param_dtype,
    overrides=overrides,
  )[2]


def _placer(shardings, cfg: TransformerConfig) -> Callable[[Path, np.ndarray], jax.Array]:
  if shardings is None:
    return lambda path, a: jax.device_put(a)
  if callable(shardings) and not isinstance(shardings, jax.sharding.Sharding):
    shardings = shardings(cfg)

  def put(path, a):
    sharding = shardings
    if not isinstance(sharding, jax.sharding.Sharding):
      try:
        for key in path:
          sharding = sharding[key]
      except (KeyError, TypeError, IndexError) as e:
        raise ValueError(f"shardings has no entry for parameter {'/'.join(path)}") from e
    # Each process fills only its addressable shards, from the host copy of the whole tensor.
    return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])

  return put


def _fresh_heads(cfg: TransformerConfig, rng) -> dict[str, Any]:
  """Freshly initialised reward/value heads, exactly as `init_params(cfg, rng)` would make them.

  Flax derives each parameter's key from ``rng`` and its module path alone, so a one-layer,
  tiny-vocabulary model initialises the same head values as the full model at a fraction of the cost.
  """
  small = cfg.replace(
    n_layers=1, vocab_size=8, d_ff=8, max_len=8, lm_head=False, tie_embeddings=False, remat=False
  )
  params, _ = init_params(small, rng)
  return {k: params[k] for k in ("reward_head", "value_head") if k in params}


def _set(tree: dict, path: Path, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree, path: Path):
  for key in path:
    tree = tree[key]
  return tree


def load_pretrained(
  path: str,
  *,
  reward_head: str | None = None,
  value_head: bool = False,
  lm_head: bool | None = None,
  dtype="float32",
  param_dtype="float32",
  shardings=None,
  rng: jax.Array | None = None,
  **overrides,
):
  """Loads a local HF model directory as ``(Transformer(cfg), params)``.

  Args:
    path: directory with config.json and model.safetensors or model.safetensors.index.json.
    reward_head: None keeps what the checkpoint has (the linear ``score`` head of a
      ``*ForSequenceClassification``, else none); 'linear' or 'mlp' adds a fresh head to a causal LM
      ('linear' on a classification checkpoint loads its trained head); 'none' drops a stored head.
    value_head: add a fresh value head (for PPO).
    lm_head: None keeps the LM head if the checkpoint has one; False skips it (an RM needs none).
    dtype, param_dtype: compute and parameter dtypes (parameters are cast on the host).
    shardings: None (default device), one `jax.sharding.Sharding` for every parameter, a pytree of
      them shaped like the params (e.g. `rmscale.parallel.mesh.logical_shardings`), or a function of
      the TransformerConfig returning either.
    rng: key for fresh heads; required when a head is added.
    **overrides: other TransformerConfig fields (``remat``, ``max_len``, ``matmul``...).

  The reward is read at the last token where the caller's mask is true; HF's classification models
  read it at the last token that differs from ``pad_token_id``. They agree when the mask is
  ``tokens != pad_token_id``.
  """
  ckpt, _, cfg, maps = _plan(
    path,
    reward_head=reward_head,
    value_head=value_head,
    lm_head=lm_head,
    dtype=dtype,
    param_dtype=param_dtype,
    overrides=overrides,
  )
  abstract, _ = abstract_params(cfg)
  place = _placer(shardings, cfg)
  params: dict[str, Any] = {}
  for m in maps:
    name = next(n for n in m.names if n in ckpt.infos)
    for leaf_path, value in zip(m.paths, m.split(ckpt.read(name))):
      want = _get(abstract, leaf_path)
      _set(params, leaf_path, place(leaf_path, np.asarray(value, dtype=want.dtype)))
  loaded_score = "reward_head" in params
  fresh_needed = (cfg.reward_head != "none" and not loaded_score) or cfg.value_head
  if fresh_needed:
    if rng is None:
      raise ValueError(
        "load_pretrained adds a fresh reward/value head, which needs rng=jax.random.key(...)"
      )
    for key, subtree in _fresh_heads(cfg, rng).items():
      if key == "reward_head" and loaded_score:
        continue
      for leaf_path, value in jax.tree_util.tree_flatten_with_path(subtree)[0]:
        full = (key,) + tuple(k.key for k in leaf_path)
        _set(params, full, place(full, np.asarray(value, dtype=_get(abstract, full).dtype)))
  if jax.tree.structure(params) != jax.tree.structure(abstract):  # A layout bug, never user input.
    raise AssertionError(
      f"loaded tree {jax.tree.structure(params)} != model tree {jax.tree.structure(abstract)}"
    )
  return Transformer(cfg), params


# ----------------------------------------------------------------------------------------------
# Export.

_UNITS = {
  "": 1,
  "B": 1,
  "KB": 10**3,
  "MB": 10**6,
  "GB": 10**9,
  "KIB": 2**10,
  "MIB": 2**20,
  "GIB": 2**30,
}


def _parse_size(size: int | str) -> int:
  if isinstance(size, int):
    value = size
  else:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
    if not match or match.group(2).upper() not in _UNITS:
      raise UserError(f"max_shard_size={size!r}: expected bytes or a size like '5GB'")
    value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
  if value <= 0:
    raise UserError(f"max_shard_size={size!r} must be positive")
  return value


def _to_host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


def save_pretrained(
  cfg: TransformerConfig,
  params,
  out_dir: str,
  family: str | None = None,
  *,
  dtype=None,
  max_shard_size: int | str = "5GB",
  extra_config: dict | None = None,
) -> list[str]:
  """Writes ``params`` as a HF model directory; returns the files written.

  A linear reward head makes a ``*ForSequenceClassification`` model (its LM head, if any, is not
  written); otherwise the LM head makes a ``*ForCausalLM``. Value heads and MLP reward heads have no
  HF counterpart: a value head is left out with a warning, an MLP reward head is an error.
  ``extra_config`` adds fields to config.json (e.g. ``pad_token_id``, which HF's classification
  models need to find the last token of a padded batch). Above ``max_shard_size`` the weights are
  split into ``model-0000i-of-0000n.safetensors`` plus an index. Every file is written atomically,
  and under multi-host only process 0 writes (all processes must call, to gather sharded arrays).
  """
  family = family or infer_family(cfg)
  if family not in FAMILIES:
    raise UserError(f"family={family!r} is not one of {sorted(FAMILIES)}")
  why = _family_mismatches(cfg, family)
  if why:
    raise UserError(f"model config cannot be written as a {family} checkpoint: {', '.join(why)}")
  if cfg.reward_head == "mlp":
    raise UserError(
      "model.reward_head='mlp' has no Hugging Face equivalent; only a linear reward "
      "head exports (as a SequenceClassification model)"
    )
  head = "score" if cfg.reward_head == "linear" else ("lm" if cfg.lm_head else None)
  if head is None:
    raise UserError("model has neither an LM head nor a linear reward head to export")
  if cfg.value_head:
    _log.warning(
      "save_pretrained: the value head has no Hugging Face equivalent and is not written"
    )
  if head == "score" and cfg.lm_head and not cfg.tie_embeddings:
    _log.warning(
      "save_pretrained: writing a SequenceClassification model; the LM head is not written"
    )
  out_dtype = np.dtype(dtype if dtype is not None else cfg.params_dtype)
  if out_dtype not in (np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)):
    raise UserError(f"dtype={out_dtype} must be float32, float16 or bfloat16")
  limit = _parse_size(max_shard_size)
  maps = _layout(family, cfg, head, _PREFIX[family])
  abstract, _ = abstract_params(cfg)
  for m in maps:  # Check the whole tree before writing anything.
    for path in m.paths:
      try:
        shape = tuple(_get(params, path).shape)
      except (KeyError, TypeError, AttributeError) as e:
        raise UserError(
          f"params has no array leaf {'/'.join(path)}, which the model config needs"
        ) from e
      if shape != _get(abstract, path).shape:
        raise UserError(
          f"params leaf {'/'.join(path)} has shape {shape}, the model config implies "
          f"{_get(abstract, path).shape}"
        )

  shards: list[list[_Map]] = [[]]
  used = 0
  for m in maps:
    nbytes = math.prod(m.hf_shape) * out_dtype.itemsize
    if shards[-1] and used + nbytes > limit:
      shards.append([])
      used = 0
    shards[-1].append(m)
    used += nbytes
  n = len(shards)
  files = [_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

  def tensors(shard):
    for m in shard:
      yield np.asarray(m.join(*(_to_host(_get(params, p)) for p in m.paths))).astype(out_dtype)

  writer = jax.process_index() == 0
  if writer:
    os.makedirs(out_dir, exist_ok=True)
  written = []
  for file, shard in zip(files, shards):
    specs = [(m.names[0], out_dtype, m.hf_shape) for m in shard]
    if writer:
      write_safetensors(os.path.join(out_dir, file), specs, tensors(shard))
    else:
      for _ in tensors(shard):  # Take part in the gathers.
        pass
    written.append(file)
  if not writer:
    return [os.path.join(out_dir, f) for f in written]
  if n > 1:
    weight_map = {m.names[0]: f for f, shard in zip(files, shards) for m in shard}
    total = sum(math.prod(m.hf_shape) * out_dtype.itemsize for m in maps)
    _write_json(
      os.path.join(out_dir, _INDEX), {"metadata": {"total_size": total}, "weight_map": weight_map}
    )
    written.append(_INDEX)
  hf_config = dict(extra_config or {})
  hf_config.update(_config_to_hf(cfg, family, head, out_dtype))
  _write_json(os.path.join(out_dir, "config.json"), hf_config)
  written.append("config.json")
  # Weights of an earlier export into the same directory would shadow or contradict these.
  for stale in os.listdir(out_dir):
    ours = stale == _INDEX or re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors", stale)
    if ours and stale not in written:
      os.remove(os.path.join(out_dir, stale))
  return [os.path.join(out_dir, f) for f in written]


# ----------------------------------------------------------------------------------------------
# Command line: HF directory <-> rmscale (orbax) checkpoint.

_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def convert(
  hf_dir: str,
  out: str,
  *,
  reward_head: str | None = None,
  value_head: bool = False,
  param_dtype: str = "float32",
  seed: int = 0,
) -> TransformerConfig:
  """HF directory -> rmscale checkpoint step 0 (``{'params': ...}``, meta holds the model config)."""
  from rmscale.checkpoint import Checkpointer

  model, params = load_pretrained(
    hf_dir,
    reward_head=reward_head,
    value_head=value_head,
    param_dtype=param_dtype,
    rng=jax.random.key(seed),
  )
  hf_config = HFCheckpoint(hf_dir).config
  meta = {
    "model": dataclasses.asdict(model.cfg),
    "source": os.path.abspath(hf_dir),
    "hf_config": {k: hf_config[k] for k in _TOKEN_FIELDS if k in hf_config},
  }
  with Checkpointer(out, async_save=False) as ckpt:
    ckpt.save(0, {"params": params}, meta, force=True)
  return model.cfg


def export(
  ckpt_dir: str,
  out: str,
  *,
  step: int | None = None,
  family: str | None = None,
  dtype: str | None = None,
  max_shard_size: int | str = "5GB",
) -> list[str]:
  """rmscale checkpoint whose meta has ``model`` (a TransformerConfig dict) -> HF directory."""
  from rmscale.checkpoint import Checkpointer

  if not fs.isdir(ckpt_dir):  # Checkpointer would create it.
    raise MissingFileError(f"{ckpt_dir}: no such checkpoint directory")
  with Checkpointer(ckpt_dir, async_save=False) as ckpt:
    state, meta = ckpt.restore(step)
  if "model" not in meta or "params" not in state:
    raise UserError(
      f"{ckpt_dir}: checkpoint meta has no 'model' config or state has no 'params' "
      "(write it with `python -m rmscale.hf convert` or store both when saving)"
    )
  cfg = TransformerConfig(**meta["model"])
  return save_pretrained(
    cfg,
    state["params"],
    out,
    family,
    dtype=dtype,
    max_shard_size=max_shard_size,
    extra_config=meta.get("hf_config"),
  )


def main(argv: Sequence[str] | None = None) -> None:
  """The command line; an error in the user's input (a flag, a missing or damaged checkpoint) ends
  it with one line, ``error: ...``, and exit status 2 (``--debug``: with its traceback)."""
  parser = argparse.ArgumentParser(prog="python -m rmscale.hf", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  debug = argparse.ArgumentParser(add_help=False)
  debug.add_argument("--debug", action="store_true", help="show the traceback of input errors")
  c = sub.add_parser(
    "convert", help="Hugging Face directory -> rmscale checkpoint", parents=[debug]
  )
  c.add_argument("--hf_dir", required=True)
  c.add_argument("--out", required=True)
  c.add_argument(
    "--reward_head",
    choices=["none", "linear", "mlp"],
    default=None,
    help="default: the checkpoint's own (linear for SequenceClassification)",
  )
  c.add_argument("--value_head", action="store_true")
  c.add_argument("--param_dtype", default="float32", choices=["float32", "bfloat16", "float16"])
  c.add_argument("--seed", type=int, default=0, help="initialises fresh heads")
  e = sub.add_parser("export", help="rmscale checkpoint -> Hugging Face directory", parents=[debug])
  e.add_argument("--ckpt", required=True)
  e.add_argument("--out", required=True)
  e.add_argument("--step", type=int, default=None, help="default: latest")
  e.add_argument("--family", choices=sorted(FAMILIES), default=None, help="default: inferred")
  e.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
  e.add_argument("--max_shard_size", default="5GB")
  args = parser.parse_args(argv)
  # Each path once, as the user means it (~ expanded, relative made absolute). A checkpoint may be
  # a gs:// URL; a Hugging Face directory is local.
  hf_key, ckpt_key = ("hf_dir", "out") if args.command == "convert" else ("out", "ckpt")
  for key, remote_ok in ((hf_key, False), (ckpt_key, True)):
    value = getattr(args, key)
    if not value or (fs.is_remote(value) and not remote_ok):
      where = "a local directory" + (" or a gs:// URL" if remote_ok else "")
      parser.error(f"--{key}={value!r}: give {where}")
    setattr(args, key, fs.resolve(value))
  with errors.reported(args.debug):
    if args.command == "convert":
      cfg = convert(
        args.hf_dir,
        args.out,
        reward_head=args.reward_head,
        value_head=args.value_head,
        param_dtype=args.param_dtype,
        seed=args.seed,
      )
      print(f"wrote {args.out} (step 0): {cfg}")
    else:
      files = export(
        args.ckpt,
        args.out,
        step=args.step,
        family=args.family,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
      )
      print("wrote " + ", ".join(files))


if __name__ == "__main__":
  main(sys.argv[1:])
