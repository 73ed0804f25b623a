"""Loss terms that quantizers add to the training objective.

PACT (Choi et al. 2018) regularizes each learned clip with an L2 penalty lambda alpha^2, a term
of the loss (not the optimizer's decoupled weight decay, which the trainer does not apply to
clip factors): its gradient 2 lambda alpha pulls alpha down against the clipping gradient
1[x >= alpha] that pushes it up. lambda is each quantizer's `spec.pact_l2`, so the penalty
needs nothing but the model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qsam2_jax.quant.quantizers import PACTQuantizer


def pact_l2_penalty(model: nnx.Module) -> jax.Array:
  """sum over the PACT quantizers of `model` of spec.pact_l2 * sum(alpha^2) (float32 scalar).

  Zero (a constant) for a model without PACT quantizers or with pact_l2 = 0. Call it on the
  model being differentiated (inside the loss function) so that alpha gets the term's gradient.
  """
  total = jnp.zeros((), jnp.float32)
  for _, node in nnx.iter_graph(model):
    if isinstance(node, PACTQuantizer) and node.spec.pact_l2:
      alpha = node.alpha[...].astype(jnp.float32)
      total = total + node.spec.pact_l2 * jnp.sum(jnp.square(alpha))
  return total
