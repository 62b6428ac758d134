"""Architecture description shared by policies, proxy RMs and gold RMs.

One frozen dataclass covers GPT-NeoX/Pythia, Llama and GPT-2 exactly (the knobs below are the ones
in which those families differ), so Hugging Face checkpoints load without a second model class.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu", "swiglu")
POSITIONS = ("rope", "learned")
REWARD_HEADS = ("none", "linear", "mlp")
MATMULS = ("default", "fp8")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Decoder-only transformer trunk plus the heads a given role needs."""

  vocab_size: int  # Real tokens (the tokenizer's / checkpoint's); see vocab_multiple.
  d_model: int
  n_layers: int
  n_heads: int
  d_ff: int
  n_kv_heads: int | None = None  # None: multi-head attention; fewer than n_heads: GQA.
  head_dim: int | None = None  # None: d_model // n_heads.
  max_len: int = 2048  # Learned-position table size and the longest sequence the sampler accepts.
  norm: str = "layernorm"
  norm_eps: float = 1e-5
  activation: str = "gelu"
  position: str = "rope"
  rotary_pct: float = 1.0  # Fraction of each head rotated (Pythia: 0.25).
  rope_theta: float = 10000.0
  parallel_residual: bool = False  # GPT-NeoX: x + attn(ln1 x) + mlp(ln2 x).
  tie_embeddings: bool = False  # GPT-2 reuses the token embedding as the LM head.
  qkv_bias: bool = True
  out_bias: bool = True
  mlp_bias: bool = True
  lm_head: bool = True
  reward_head: str = "none"
  reward_head_hidden: int = 1024  # GRM's MLP head width.
  reward_head_dropout: float = 0.0
  value_head: bool = False
  init_std: float = 0.02
  dtype: str = "float32"  # Compute dtype of matmuls.
  param_dtype: str = "float32"
  matmul: str = "default"  # "fp8": attention projections and MLP through FP8 quantised matmuls.
  remat: bool = False  # Rematerialise each block in the backward pass (memory for compute).
  # Embedding rows and LM-head columns are padded with zeros up to a multiple of this, so that the
  # vocabulary splits evenly over the tensor axis (the offline world's 291 words do not); padded
  # logits are masked, so no padded token is ever sampled or carries probability. 1: no padding
  # (HF shapes as they are; Pythia's 50304 is already a multiple of 128).
  vocab_multiple: int = 1

  def __post_init__(self):
    validate_model_config(self)

  @property
  def padded_vocab(self) -> int:
    """Rows of the embedding and columns of the LM head (and of the logits)."""
    return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def rotary_dim(self) -> int:
    return int(self.dim_per_head * self.rotary_pct) if self.position == "rope" else 0

  @property
  def compute_dtype(self) -> Any:
    return jnp.dtype(self.dtype)

  @property
  def params_dtype(self) -> Any:
    return jnp.dtype(self.param_dtype)

  def replace(self, **kw) -> "TransformerConfig":
    return dataclasses.replace(self, **kw)


def _choice(name: str, value: str, options: tuple[str, ...]):
  if value not in options:
    raise ValueError(f"model.{name}={value!r} is not one of {options}")


def validate_model_config(c: TransformerConfig) -> None:
  """Raises ValueError naming the offending field; called on every construction."""
  for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_len", "vocab_multiple"):
    if int(getattr(c, name)) <= 0:
      raise ValueError(f"model.{name} must be positive, got {getattr(c, name)}")
  if c.head_dim is None and c.d_model % c.n_heads:
    raise ValueError(f"model.d_model={c.d_model} is not divisible by model.n_heads={c.n_heads}")
  if c.n_heads % c.kv_heads:
    raise ValueError(f"model.n_heads={c.n_heads} is not divisible by model.n_kv_heads={c.kv_heads}")
  _choice("norm", c.norm, NORMS)
  _choice("activation", c.activation, ACTIVATIONS)
  _choice("position", c.position, POSITIONS)
  _choice("reward_head", c.reward_head, REWARD_HEADS)
  _choice("matmul", c.matmul, MATMULS)
  _choice("dtype", c.dtype, DTYPES)
  _choice("param_dtype", c.param_dtype, DTYPES)
  if not 0.0 < c.rotary_pct <= 1.0:
    raise ValueError(f"model.rotary_pct must be in (0, 1], got {c.rotary_pct}")
  if c.position == "rope" and c.rotary_dim % 2:
    raise ValueError(
      f"model.rotary_pct={c.rotary_pct} gives an odd rotary dimension {c.rotary_dim}"
    )
  if c.tie_embeddings and not c.lm_head:
    raise ValueError("model.tie_embeddings=True needs model.lm_head=True")
  if not (c.lm_head or c.reward_head != "none" or c.value_head):
    raise ValueError("model has no head: set model.lm_head, model.reward_head or model.value_head")
