"""Named model sizes and exact parameter counting.

A size name means the same thing everywhere ("proxy 12m" in a config, a plot legend or a sweep).
Names of the Gao et al. ladder are their *non-embedding* parameter counts (within 10%, checked in the
tests); tiny sizes exist for CPU runs; Pythia, GPT-2 and Llama names reproduce those checkpoints'
shapes so Hugging Face weights load into them.
"""

from __future__ import annotations

import dataclasses

from rmscale.models.config import TransformerConfig

# Family presets: the knobs in which GPT-NeoX/Pythia, Llama and GPT-2 differ.
FAMILIES: dict[str, dict] = {
  "neox": dict(
    norm="layernorm",
    norm_eps=1e-5,
    activation="gelu",
    position="rope",
    rotary_pct=0.25,
    parallel_residual=True,
    tie_embeddings=False,
    qkv_bias=True,
    out_bias=True,
    mlp_bias=True,
  ),
  "llama": dict(
    norm="rmsnorm",
    norm_eps=1e-5,
    activation="swiglu",
    position="rope",
    rotary_pct=1.0,
    parallel_residual=False,
    tie_embeddings=False,
    qkv_bias=False,
    out_bias=False,
    mlp_bias=False,
  ),
  "gpt2": dict(
    norm="layernorm",
    norm_eps=1e-5,
    activation="gelu_tanh",
    position="learned",
    parallel_residual=False,
    tie_embeddings=True,
    qkv_bias=True,
    out_bias=True,
    mlp_bias=True,
  ),
}


@dataclasses.dataclass(frozen=True)
class Size:
  d_model: int
  n_layers: int
  n_heads: int
  d_ff: int | None = None  # None: 4 * d_model.
  n_kv_heads: int | None = None
  family: str = "neox"
  vocab_size: int | None = None  # None: the tokenizer's; set for sizes that name a checkpoint.
  max_len: int | None = None


SIZES: dict[str, Size] = {
  # Tiny sizes for CPU experiments (the quickstart ladder).
  "25k": Size(32, 2, 4),
  "100k": Size(64, 2, 4),
  "200k": Size(64, 4, 4),
  "400k": Size(128, 2, 4),
  "800k": Size(128, 4, 4),
  "1.6m": Size(128, 8, 4),
  # Gao, Schulman & Hilton (2023) proxy ladder, named by non-embedding parameters.
  "3m": Size(256, 4, 4),
  "12m": Size(512, 4, 8),
  "25m": Size(512, 8, 8),
  "42m": Size(768, 6, 12),
  "85m": Size(768, 12, 12),
  "300m": Size(1024, 24, 16),
  "680m": Size(1536, 24, 16),
  "1.2b": Size(2048, 24, 16),
  "3b": Size(3072, 26, 24),
  # Pythia suite (GPT-NeoX): shapes of the released checkpoints.
  "pythia-14m": Size(128, 6, 4, vocab_size=50304, max_len=2048),
  "pythia-70m": Size(512, 6, 8, vocab_size=50304, max_len=2048),
  "pythia-160m": Size(768, 12, 12, vocab_size=50304, max_len=2048),
  "pythia-410m": Size(1024, 24, 16, vocab_size=50304, max_len=2048),
  "pythia-1b": Size(2048, 16, 8, vocab_size=50304, max_len=2048),
  "pythia-1.4b": Size(2048, 24, 16, vocab_size=50304, max_len=2048),
  "pythia-2.8b": Size(2560, 32, 32, vocab_size=50304, max_len=2048),
  "pythia-6.9b": Size(4096, 32, 32, vocab_size=50432, max_len=2048),
  # GPT-2 and Llama shapes.
  "gpt2": Size(768, 12, 12, family="gpt2", vocab_size=50257, max_len=1024),
  "gpt2-medium": Size(1024, 24, 16, family="gpt2", vocab_size=50257, max_len=1024),
  "gpt2-large": Size(1280, 36, 20, family="gpt2", vocab_size=50257, max_len=1024),
  "llama-7b": Size(4096, 32, 32, d_ff=11008, family="llama", vocab_size=32000, max_len=4096),
}


def model_config(
  size: str, vocab_size: int | None = None, family: str | None = None, **overrides
) -> TransformerConfig:
  """The TransformerConfig for a named size; ``overrides`` set any other field (heads, dtype...)."""
  if size not in SIZES:
    raise ValueError(f"unknown model size {size!r}; known sizes: {', '.join(SIZES)}")
  s = SIZES[size]
  family = family or s.family
  if family not in FAMILIES:
    raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
  vocab = s.vocab_size if s.vocab_size is not None else vocab_size
  if vocab is None:
    raise ValueError(f"size {size!r} needs a vocab_size (it is not tied to a checkpoint)")
  d_ff = s.d_ff or (4 * s.d_model if family != "llama" else _llama_ff(s.d_model))
  fields = dict(
    FAMILIES[family],
    vocab_size=vocab,
    d_model=s.d_model,
    n_layers=s.n_layers,
    n_heads=s.n_heads,
    n_kv_heads=s.n_kv_heads,
    d_ff=d_ff,
    max_len=s.max_len or 2048,
  )
  fields.update(overrides)
  return TransformerConfig(**fields)


def _llama_ff(d_model: int) -> int:
  """Llama's SwiGLU width: 2/3 of 4d rounded up to a multiple of 256 (keeps FLOPs of a 4d MLP)."""
  return 256 * ((int(8 * d_model / 3) + 255) // 256)


def count_params(cfg: TransformerConfig) -> dict[str, int]:
  """Exact parameter counts, split as in Kaplan/Gao: embeddings (token, position, unembedding) vs the rest.

  Returns ``embedding``, ``non_embedding`` (blocks and final norm), ``heads`` (reward and value heads)
  and ``total``; the tests check ``total`` against the initialised tree.
  """
  E, F, H, K, D = cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
  norm = E * (2 if cfg.norm == "layernorm" else 1)
  attn = E * H * D + 2 * E * K * D + H * D * E
  attn += (H * D + 2 * K * D) * cfg.qkv_bias + E * cfg.out_bias
  if cfg.activation == "swiglu":
    mlp = 3 * E * F + (2 * F + E) * cfg.mlp_bias
  else:
    mlp = 2 * E * F + (F + E) * cfg.mlp_bias
  non_embedding = cfg.n_layers * (attn + mlp + 2 * norm) + norm
  embedding = cfg.padded_vocab * E  # Padding rows are parameters too (zeros, never trained).
  if cfg.position == "learned":
    embedding += cfg.max_len * E
  if cfg.lm_head and not cfg.tie_embeddings:
    embedding += E * cfg.padded_vocab
  heads = 0
  if cfg.reward_head == "linear":
    heads += E
  elif cfg.reward_head == "mlp":
    heads += E * cfg.reward_head_hidden + 2 * cfg.reward_head_hidden + 1
  if cfg.value_head:
    heads += E + 1
  return dict(
    embedding=embedding,
    non_embedding=non_embedding,
    heads=heads,
    total=embedding + non_embedding + heads,
  )


def size_params(size: str) -> int:
  """Non-embedding parameters of a named size (what the Gao ladder's names refer to)."""
  return count_params(model_config(size, vocab_size=256))["non_embedding"]
