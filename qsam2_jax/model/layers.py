"""Leaf layers shared by every SAM2 module.

Every Linear and Conv of the model is built here, from these classes, so that quantization can
later swap them (by module path) without the model knowing. Parameters are float32; `dtype` is
the compute dtype (bfloat16 for speed). Norms and softmax always compute in float32.

Parameter names follow Flax (`kernel`, `bias`, `scale`, `embedding`); `convert/` maps them to
the PyTorch names one to one.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = Optional[jnp.dtype]


class Buffer(nnx.Variable):
  """A constant tensor stored in the checkpoint (a PyTorch buffer): never trained."""


def gelu(x: jax.Array) -> jax.Array:
  """SAM2 uses the exact (erf) GELU everywhere; JAX defaults to the tanh approximation."""
  return jax.nn.gelu(x, approximate=False)


def relu(x: jax.Array) -> jax.Array:
  return jax.nn.relu(x)


class Linear(nnx.Linear):
  """`torch.nn.Linear` equivalent; kernel stored (in, out)."""

  def __init__(self, in_features: int, out_features: int, *, dtype: Dtype = None,
               rngs: nnx.Rngs):
    super().__init__(in_features, out_features, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


class Conv(nnx.Conv):
  """`torch.nn.Conv2d` on NHWC tensors; kernel stored (kh, kw, in/groups, out)."""

  def __init__(self, in_features: int, out_features: int, kernel_size: int, *, stride: int = 1,
               padding: int = 0, groups: int = 1, dtype: Dtype = None, rngs: nnx.Rngs):
    super().__init__(
        in_features, out_features, (kernel_size, kernel_size), strides=(stride, stride),
        padding=((padding, padding), (padding, padding)), feature_group_count=groups,
        dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


class ConvTranspose2x2(nnx.Module):
  """`torch.nn.ConvTranspose2d(k=2, s=2)` as a depth-to-space einsum (outputs never overlap).

  The kernel keeps PyTorch's (in, out, 2, 2) layout, the one layout where the einsum reads
  naturally: y[2i+a, 2j+b, o] = sum_c x[i, j, c] * W[c, o, a, b] + bias[o].
  """

  def __init__(self, in_features: int, out_features: int, *, dtype: Dtype = None,
               rngs: nnx.Rngs):
    bound = 1.0 / (out_features * 4) ** 0.5
    self.kernel = nnx.Param(jax.random.uniform(
        rngs.params(), (in_features, out_features, 2, 2), jnp.float32, -bound, bound))
    self.bias = nnx.Param(jax.random.uniform(
        rngs.params(), (out_features,), jnp.float32, -bound, bound))
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or x.dtype
    b, h, w, _ = x.shape
    y = jnp.einsum("bhwc,coij->bhiwjo", x.astype(dtype), self.kernel[...].astype(dtype))
    y = y.reshape(b, 2 * h, 2 * w, -1)
    return y + self.bias[...].astype(dtype)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, computed in float32 with two-pass variance like PyTorch.

  Used both for `nn.LayerNorm` (eps 1e-5 in the SAM transformers) and SAM2's `LayerNorm2d`
  (eps 1e-6, channels last here).
  """

  def __init__(self, num_features: int, *, eps: float, rngs: nnx.Rngs | None = None):
    del rngs
    self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


class Activation(nnx.Module):
  """A parameter-free slot in a `nn.Sequential`, so that list indices match PyTorch's."""

  def __init__(self, fn: Callable[[jax.Array], jax.Array]):
    self.fn = fn

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fn(x)


class Sequential(nnx.List):
  """`nn.Sequential` with PyTorch's indices (activation slots included), so keys read `name.3`."""

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in self:
      x = layer(x)
    return x


class MLP(nnx.Module):
  """SAM2's `MLP` (sam2_utils): `num_layers` Linears, activation between, optional sigmoid."""

  def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int, *,
               activation: Callable[[jax.Array], jax.Array] = relu, sigmoid_output: bool = False,
               dtype: Dtype = None, rngs: nnx.Rngs):
    dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
    dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
    self.layers = nnx.List(
        [Linear(i, o, dtype=dtype, rngs=rngs) for i, o in zip(dims_in, dims_out)])
    self.activation = activation
    self.sigmoid_output = sigmoid_output

  def __call__(self, x: jax.Array) -> jax.Array:
    n = len(self.layers)
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < n - 1:
        x = self.activation(x)
    if self.sigmoid_output:
      x = jax.nn.sigmoid(x.astype(jnp.float32)).astype(x.dtype)
    return x


class Embedding(nnx.Module):
  """`nn.Embedding` whose rows are used directly (SAM's learned tokens)."""

  def __init__(self, num: int, features: int, *, rngs: nnx.Rngs):
    self.embedding = nnx.Param(jax.random.normal(rngs.params(), (num, features), jnp.float32))

  def __call__(self) -> jax.Array:
    return self.embedding[...]


class QuantSlot(nnx.Module):
  """An identity placeholder on an activation x activation product's input (q, k, v,
  softmax probabilities, the hypernetwork product's operands).

  The model only marks where such a tensor is; quantization code may replace the slot (by
  module path, like a layer) with a module of the same call signature. A slot has no
  variables, so checkpoints and PyTorch key maps do not see it.
  """

  def __call__(self, x: jax.Array) -> jax.Array:
    return x


def active(slot) -> Optional[Callable[[jax.Array], jax.Array]]:
  """`slot` if something replaced the identity `QuantSlot`, else None."""
  return None if slot is None or isinstance(slot, QuantSlot) else slot


class AttentionSlots:
  """Mixin for attention modules: identity slots on q, k, v (`q_quant`, ...) and on the
  softmax probabilities (`probs_quant`), applied by `_attend`."""

  def _init_slots(self) -> None:
    self.q_quant = QuantSlot()
    self.k_quant = QuantSlot()
    self.v_quant = QuantSlot()
    self.probs_quant = QuantSlot()

  def _attend(self, q: jax.Array, k: jax.Array, v: jax.Array,
              key_valid: Optional[jax.Array] = None, *,
              fast: Optional[Callable[..., jax.Array]] = None) -> jax.Array:
    """`attention` on the slotted q, k, v; `fast(q, k, v)` replaces it while `probs_quant` is
    the identity (a caller's own float path)."""
    q, k, v = self.q_quant(q), self.k_quant(k), self.v_quant(v)
    probs = active(self.probs_quant)
    if probs is None and fast is not None:
      return fast(q, k, v)
    return attention(q, k, v, key_valid, probs=probs)


def free_param(rngs: nnx.Rngs, shape: Sequence[int], std: float = 0.02) -> nnx.Param:
  """A top-level tensor such as `no_mem_embed` (PyTorch: a bare nn.Parameter)."""
  return nnx.Param(std * jax.random.normal(rngs.params(), tuple(shape), jnp.float32))


def attention(q: jax.Array, k: jax.Array, v: jax.Array,
              key_valid: Optional[jax.Array] = None,
              probs: Optional[Callable[[jax.Array], jax.Array]] = None) -> jax.Array:
  """Scaled dot-product attention, (B, L, heads, head_dim) layout, softmax in float32.

  One entry point for every SAM2 attention so that the implementation is chosen in one place:
  cuDNN's fused (flash) kernel for 16-bit inputs on GPU, where jax's default would build the
  full score matrix (2 GB at batch 8 in a 1024² global Hiera block); on CPU `_cpu_attention`
  (heads-major, query blocks); XLA's generic path elsewhere. `key_valid` (B, S) bool gives
  keys where it is False zero weight (every row needs one valid key).

  `probs`, applied to the float32 softmax probabilities (B, heads, L, S) before they multiply
  v, needs them materialised: with it the plain `_explicit_attention` runs on every backend.
  """
  if probs is not None:
    return _explicit_attention(q, k, v, key_valid, probs)
  if jax.default_backend() == "cpu":
    return _cpu_attention(q, k, v, key_valid)
  mask = None if key_valid is None else key_valid.astype(bool)[:, None, None, :]
  if mask is None and _use_cudnn(q, k):
    try:
      return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    except (ValueError, NotImplementedError, RuntimeError):
      pass  # shape or dtype the cuDNN kernel does not take: the XLA path below is exact
  return jax.nn.dot_product_attention(q, k, v, mask=mask)


def _explicit_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                        key_valid: Optional[jax.Array],
                        probs: Callable[[jax.Array], jax.Array]) -> jax.Array:
  """Attention with the full (B, heads, L, S) probability matrix, `probs` applied to it."""
  dtype = q.dtype
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  s = s * jnp.float32(q.shape[-1] ** -0.5)
  if key_valid is not None:
    s = s + _mask_bias(key_valid.astype(bool))[:, None, None, :]
  p = probs(jax.nn.softmax(s, axis=-1))
  out = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.astype(dtype)


def _use_cudnn(q: jax.Array, k: jax.Array) -> bool:
  return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
          and q.dtype == k.dtype and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128)


# Score matrices above this many bytes are computed blockwise (see `_cpu_attention`).
_CPU_SCORE_BYTES = 4 << 20
_CPU_QUERY_BLOCK = 128
_CPU_KEY_BLOCK = 4096


def _cpu_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                   key_valid: Optional[jax.Array]) -> jax.Array:
  """XLA:CPU attention that keeps the score matrix small and the layouts matmul-friendly.

  Memory bandwidth, not FLOPs, bounds attention on small CPUs: a 1024² global Hiera block
  (4 heads × 4096²) writes and rereads 256 MB of scores per pass, and jax's generic SDPA adds a
  broadcast scale and a normalised copy. Here q is pre-scaled, heads are moved to the front
  (one contiguous matmul per head) and the softmax normalisation is applied to the (L, d)
  output instead of the (L, S) weights. Large problems run as a loop over (batch·head,
  128-query) blocks, each sweeping the keys in 4096-key blocks with an online softmax, so a
  block's scores stay in cache (what PyTorch's CPU flash-attention kernel does), and key
  blocks that `key_valid` masks entirely are skipped: a padded video memory bank costs only its
  filled frames. Measured on a 2-core EPYC: 4096² × 4 heads 860 → ~340 ms.
  """
  b, lq, h, d = q.shape
  lk = k.shape[1]
  dtype = q.dtype
  qh = (q * jnp.asarray(d ** -0.5, dtype)).transpose(0, 2, 1, 3).reshape(b * h, lq, d)
  kh = k.transpose(0, 2, 1, 3).reshape(b * h, lk, d)
  vh = v.transpose(0, 2, 1, 3).reshape(b * h, lk, v.shape[-1])
  valid = None
  if key_valid is not None:
    valid = jnp.repeat(key_valid.astype(bool), h, axis=0)  # (B·h, S), batch-major like qh

  qblock = _CPU_QUERY_BLOCK
  if lq * lk * 4 * b * h <= _CPU_SCORE_BYTES or lq % qblock or lq <= qblock:
    bias = None if valid is None else _mask_bias(valid)[:, None, :]
    s, o, l = _score_block(qh, kh, vh, bias, None)
    out = o / l
  else:
    nq = lq // qblock
    qs = qh.reshape(b * h * nq, qblock, d)
    out = jax.lax.map(lambda i: _query_block(qs[i], kh[i // nq], vh[i // nq],
                                             None if valid is None else valid[i // nq]),
                      jnp.arange(b * h * nq))
  return out.astype(dtype).reshape(b, h, lq, -1).transpose(0, 2, 1, 3)


def _mask_bias(valid: jax.Array) -> jax.Array:
  # A large finite value rather than -inf: exp gives exact zeros and no NaN rows.
  return jnp.where(valid, 0.0, -1e30).astype(jnp.float32)


def _score_block(q, k, v, bias, m_prev):
  """Scores of one block: (max, unnormalised output, row sums), float32."""
  s = jnp.einsum("...qd,...kd->...qk", q, k, preferred_element_type=jnp.float32)
  if bias is not None:
    s = s + bias
  m = jnp.max(s, axis=-1, keepdims=True)
  if m_prev is not None:
    m = jnp.maximum(m, m_prev)
  e = jnp.exp(s - m)
  o = jnp.einsum("...qk,...kd->...qd", e.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return m, o, jnp.sum(e, axis=-1, keepdims=True)


def _query_block(q: jax.Array, k: jax.Array, v: jax.Array,
                 valid: Optional[jax.Array]) -> jax.Array:
  """(Q, d) queries against all (S, d) keys in key blocks, online softmax, masked blocks skipped."""
  lk = k.shape[0]
  kb = min(_CPU_KEY_BLOCK, lk)
  nkb, rest = divmod(lk, kb)

  def step(carry, start, size):
    m, o, l = carry
    kj = jax.lax.dynamic_slice_in_dim(k, start, size)
    vj = jax.lax.dynamic_slice_in_dim(v, start, size)
    bias = None
    if valid is not None:
      bias = _mask_bias(jax.lax.dynamic_slice_in_dim(valid, start, size))[None, :]
    m_new, oj, lj = _score_block(q, kj, vj, bias, m)
    corr = jnp.exp(m - m_new)
    return m_new, o * corr + oj, l * corr + lj

  def guarded(carry, start, size):
    if valid is None:
      return step(carry, start, size)
    any_valid = jnp.any(jax.lax.dynamic_slice_in_dim(valid, start, size))
    return jax.lax.cond(any_valid, lambda c: step(c, start, size), lambda c: c, carry)

  init = (jnp.full((q.shape[0], 1), -jnp.inf, jnp.float32),
          jnp.zeros((q.shape[0], v.shape[-1]), jnp.float32),
          jnp.zeros((q.shape[0], 1), jnp.float32))
  if nkb == 1:
    carry = guarded(init, 0, kb)
  else:
    carry = jax.lax.fori_loop(0, nkb, lambda j, c: guarded(c, j * kb, kb), init)
  if rest:
    carry = guarded(carry, nkb * kb, rest)
  m, o, l = carry
  return o / l
