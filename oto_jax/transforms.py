"""Composable optax blocks of the OTO optimizers: group lasso and half-space projection.

They go into ``optax.chain`` around any base optimizer. The group-lasso term is a direction
(it goes before the learning-rate scaling, like ``optax.add_decayed_weights`` in AdamW); the
proximal step and the half-space projection act on the final update (after it)::

  tx = optax.chain(
    optax.scale_by_adam(),                                   # any base direction
    oto_jax.add_group_lasso(partition, lmbda=1e-3),          # + λ x_g / ‖x_g‖
    optax.scale_by_learning_rate(1e-3),
    oto_jax.half_space_projection(partition, epsilon=0.0, start_step=1000),
  )

All three keep their own step count, so each can switch itself on or off at a given step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from oto_jax import checks
from oto_jax.ir import Call, Eqn, Loop
from oto_jax.partition import NodeGroup, ZIGPartition

ScalarOrSchedule = float | jax.Array | optax.Schedule
NO_PARAMS = 'This transformation needs the current parameters: call `update(updates, state, params)`.'


def value_at(x: Any, count: jax.Array) -> jax.Array:
  """A hyperparameter's value at step ``count``: schedules are called, numbers pass."""
  return x(count) if callable(x) else x


def safe_norm_inv(sq: jax.Array) -> jax.Array:
  """``1 / sqrt(sq)``, and 0 where ``sq`` is 0 (a zero group gets no group-lasso term)."""
  pos = sq > 0
  return jnp.where(pos, jax.lax.rsqrt(jnp.where(pos, sq, 1.0)), 0.0)


def fraction(mask: jax.Array) -> jax.Array:
  """The fraction of true entries of a ``[num_zigs]`` mask (0 for an empty one)."""
  if mask.shape[0] == 0:
    return jnp.zeros([], jnp.float32)
  return jnp.mean(mask.astype(jnp.float32))


def in_window(count: jax.Array, start: Any, end: Any) -> jax.Array:
  on = count >= start
  return on if end is None else on & (count < end)


def per_group_epsilon(partition: ZIGPartition, epsilon: Any) -> jax.Array:
  """ε for every ZIG: a scalar (maybe traced) or ``epsilon(node_group) -> float``."""
  if callable(epsilon):
    groups = partition.prunable_groups
    vals = np.repeat([float(epsilon(g)) for g in groups], [g.size for g in groups])
    return jnp.asarray(vals, jnp.float32).reshape(partition.num_zigs)
  return jnp.broadcast_to(jnp.asarray(epsilon, jnp.float32), (partition.num_zigs,))


class GroupLassoState(NamedTuple):
  """State of :func:`add_group_lasso` and :func:`group_lasso_prox`."""

  count: chex.Array


def add_group_lasso(
  partition: ZIGPartition,
  lmbda: ScalarOrSchedule,
  *,
  start_step: Any = 0,
  end_step: Any = None,
) -> optax.GradientTransformation:
  """Adds the group-lasso (sub)gradient of every non-zero ZIG to the updates.

  .. math::
    u_g \\leftarrow u_g + \\lambda \\frac{x_g}{\\lVert x_g \\rVert_2}
    \\quad \\text{for every ZIG } g \\text{ with } x_g \\ne 0

  Zero ZIGs get no term; entries outside every ZIG are untouched. Put it before the
  learning-rate scaling (the updates are still a gradient-like direction there).

  Args:
    partition: the model's :class:`~oto_jax.ZIGPartition`.
    lmbda: λ, a float or an optax schedule of the step count.
    start_step: first step on which the term is added.
    end_step: first step on which it no longer is (None: never stops).

  Returns:
    An ``optax.GradientTransformation``; ``update`` needs ``params``.

  Example::

    tx = optax.chain(oto_jax.add_group_lasso(part, 1e-3), optax.sgd(0.1))

  References:
    Chen et al., *Only Train Once*, NeurIPS 2021 (arXiv 2107.07467), eq. (2).
  """

  checks.hyperparameters(lmbda=lmbda, start_step=start_step, end_step=end_step)

  def init_fn(params):
    checks.trainable_tree(partition, params, 'add_group_lasso')
    return GroupLassoState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(NO_PARAMS)
    seg = partition.segments(params)
    on = in_window(state.count, start_step, end_step)
    lam = jnp.where(on, value_at(lmbda, state.count), 0.0)
    coef = lam * safe_norm_inv(seg.sums((params, params))[0])
    new = seg.map(lambda u, x, c: u + (c * x).astype(u.dtype), updates, params, values=[coef], fills=[0.0])
    return new, GroupLassoState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def group_lasso_prox(
  partition: ZIGPartition,
  lmbda: ScalarOrSchedule,
  learning_rate: ScalarOrSchedule,
  *,
  start_step: Any = 0,
  end_step: Any = None,
) -> optax.GradientTransformation:
  """The proximal step of the group lasso, applied to the trial point ``x + u``.

  .. math::
    z = x + u, \\qquad
    x_g^{+} = \\max\\Big(0,\\ 1 - \\frac{\\alpha\\lambda}{\\lVert z_g\\rVert_2}\\Big)\\, z_g,
    \\qquad u_g \\leftarrow x_g^{+} - x_g

  Put it after the learning-rate scaling (``u`` is then the step ``-α d``), with the same
  learning rate α.

  Args:
    partition: the model's :class:`~oto_jax.ZIGPartition`.
    lmbda: λ, a float or a schedule.
    learning_rate: α, a float or a schedule (the one the base optimizer uses).
    start_step: first step on which the prox is applied.
    end_step: first step on which it no longer is (None: never stops).

  Returns:
    An ``optax.GradientTransformation``; ``update`` needs ``params``.

  Example::

    tx = optax.chain(optax.sgd(0.1), oto_jax.group_lasso_prox(part, 1e-3, 0.1))

  References:
    Xiao & Zhang, *A proximal stochastic gradient method with progressive variance
    reduction*, 2014; Chen et al., *Only Train Once*, NeurIPS 2021, Algorithm 1, stage 1.
  """

  checks.hyperparameters(lmbda=lmbda, learning_rate=learning_rate, start_step=start_step, end_step=end_step)

  def init_fn(params):
    checks.trainable_tree(partition, params, 'group_lasso_prox')
    return GroupLassoState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(NO_PARAMS)
    seg = partition.segments(params)
    trial = jax.tree.map(lambda x, u: x + u, params, updates)
    on = in_window(state.count, start_step, end_step)
    shrink = value_at(learning_rate, state.count) * value_at(lmbda, state.count)
    scale = jnp.maximum(0.0, 1.0 - shrink * safe_norm_inv(seg.sums((trial, trial))[0]))
    scale = jnp.where(on, scale, 1.0)
    new = seg.map(
      lambda u, z, x, s: (s * z - x).astype(u.dtype), updates, trial, params, values=[scale], fills=[1.0]
    )
    return new, GroupLassoState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


class HalfSpaceState(NamedTuple):
  """State of :func:`half_space_projection`.

  Attributes:
    count: steps taken.
    group_sparsity: the fraction of ZIGs that are zero after the last step (before
      ``start_step``: that were zero before it, since no step is taken to check).
    num_projected: how many non-zero ZIGs the last step projected onto zero.
  """

  count: chex.Array
  group_sparsity: chex.Array
  num_projected: chex.Array


def half_space_projection(
  partition: ZIGPartition,
  epsilon: float | jax.Array | Any = 0.0,
  *,
  start_step: Any = 0,
) -> optax.GradientTransformation:
  """Projects ZIGs whose trial point leaves the half-space around them onto zero.

  With ``x̃ = x + u`` the trial point of the base step, for every ZIG ``g``:

  .. math::
    \\tilde x_g \\leftarrow \\begin{cases}
      0 & \\text{if } x_g = 0 \\text{ or } \\tilde x_g^\\top x_g < \\varepsilon_g \\lVert x_g\\rVert_2^2 \\\\
      \\tilde x_g & \\text{otherwise}
    \\end{cases}

  so zero ZIGs stay zero and non-zero ones are zeroed when the step would carry them
  (nearly) across the hyperplane through the origin orthogonal to ``x_g``. Put it last in a
  chain (``u`` is then the final update).

  Args:
    partition: the model's :class:`~oto_jax.ZIGPartition`.
    epsilon: ε ∈ [0, 1): a float (which ``optax.inject_hyperparams`` can inject), or a
      function ``epsilon(node_group) -> float`` for a per-group ε (the reference uses 0 for
      convolutions and 0.9–0.99 for dense layers). A function must be passed through
      ``static_args=('epsilon',)`` to ``optax.inject_hyperparams``.
    start_step: the first step on which to project (HSPG's ``n_p``); before it the
      transform is the identity.

  Returns:
    An ``optax.GradientTransformation``; ``update`` needs ``params``.

  Example::

    tx = optax.chain(optax.sgd(0.1), oto_jax.half_space_projection(part, 0.0, start_step=500))

  References:
    Chen et al., *Only Train Once*, NeurIPS 2021 (arXiv 2107.07467), Algorithm 2;
    Chen et al., *Neural network compression via sparse optimization*, arXiv 2011.04868.
  """

  checks.hyperparameters(epsilon=epsilon, start_step=start_step)

  def init_fn(params):
    checks.trainable_tree(partition, params, 'half_space_projection')
    return HalfSpaceState(
      count=jnp.zeros([], jnp.int32),
      group_sparsity=jnp.zeros([], jnp.float32),
      num_projected=jnp.zeros([], jnp.int32),
    )

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(NO_PARAMS)
    seg = partition.segments(params)
    eps = per_group_epsilon(partition, epsilon)
    xx, xu = seg.sums((params, params), (params, updates))
    trial_dot = xx + xu  # <x + u, x>
    nonzero = xx > 0
    on = state.count >= start_step
    project = on & nonzero & (trial_dot < eps * xx)
    drop = on & (project | ~nonzero)
    new = seg.map(lambda u, x, d: jnp.where(d, -x, u), updates, params, values=[drop], fills=[False])
    zero_after = drop | ~nonzero
    return new, HalfSpaceState(
      count=optax.safe_increment(state.count),
      group_sparsity=fraction(zero_after),
      num_projected=jnp.sum(project).astype(jnp.int32),
    )

  return optax.GradientTransformation(init_fn, update_fn)


def epsilon_by_layer(partition: ZIGPartition, conv: float = 0.0, dense: float = 0.0):
  """ε per node group by the kind of layer that produces it, as the reference sets it.

  A node group counts as convolutional when one of its member variables is the kernel of a
  convolution in the analysed program, as dense otherwise.

  Returns:
    A function ``NodeGroup -> float`` for the ``epsilon`` of :func:`half_space_projection`
    and :func:`hspg`.

  Example::

    eps = oto_jax.epsilon_by_layer(part, conv=0.0, dense=0.9)
    oto_jax.hspg(part, 0.1, lmbda=5e-4, n_p=7500, epsilon=eps)
  """
  kernels = conv_kernel_paths(partition)

  def fn(group: NodeGroup) -> float:
    return conv if any(e.path in kernels for e in group.members) else dense

  return fn


def conv_kernel_paths(partition: ZIGPartition) -> frozenset:
  """Paths of the variables that reach a convolution's kernel operand (through data movement)."""
  prog = partition._program()
  kernels: set = set()
  moved: dict = {}  # value -> values it is moved into unchanged (reshape, cast, scan slicing)

  def visit(steps) -> None:
    for s in steps:
      if isinstance(s, Eqn):
        if s.name == 'conv_general_dilated':
          kernels.add(s.ins[1])
        elif s.entry is not None and s.entry.moves is not None and isinstance(s.ins[0], int):
          moved.setdefault(s.ins[0], []).append(s.outs[0])
      elif isinstance(s, Call):
        visit(s.body)
      elif isinstance(s, Loop):
        for outer, inner in (*((c.init, c.inner) for c in s.carries), *s.xs):
          if isinstance(outer, int):
            moved.setdefault(outer, []).append(inner)
        visit(s.cond + s.body)
      else:
        for b in s.branches:
          visit(b.steps)

  visit(prog.steps)
  out = set()
  for path, v in zip(partition.variable_paths, prog.variables):
    stack, seen = [v], set()
    while stack:
      x = stack.pop()
      if x in kernels:
        out.add(path)
        break
      if x not in seen:
        seen.add(x)
        stack += moved.get(x, [])
  return frozenset(out)


VARIANTS = ('sgd', 'adam', 'adamw')


def base_direction(
  variant: str | optax.GradientTransformation,
  *,
  momentum: Any = None,
  nesterov: bool = False,
  b1: Any = 0.9,
  b2: Any = 0.999,
  eps: Any = 1e-8,
  weight_decay: Any = 0.0,
) -> optax.GradientTransformationExtraArgs:
  """The base optimizer's direction ``d`` (the step is ``-α d``) of DHSPG and HESSO.

  ``'sgd'``: (L2 weight decay then) optional heavy-ball momentum; ``'adam'``: L2 weight decay
  then Adam; ``'adamw'``: Adam then decoupled weight decay. A ``GradientTransformation`` is
  used as given.
  """
  if isinstance(variant, optax.GradientTransformation):
    # Extra arguments (`value=loss` for a line search) reach the base, as in optax.chain.
    return optax.with_extra_args_support(variant)
  if variant not in VARIANTS:
    raise ValueError(
      f'variant must be one of {VARIANTS} or an optax GradientTransformation, got {variant!r}.'
    )
  no_decay = isinstance(weight_decay, (int, float)) and weight_decay == 0
  decay = [] if no_decay else [optax.add_decayed_weights(weight_decay)]
  if variant == 'sgd':
    blocks = [*decay, *([] if momentum is None else [optax.trace(decay=momentum, nesterov=nesterov)])]
    return optax.with_extra_args_support(optax.chain(*blocks) if blocks else optax.identity())
  adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
  return optax.chain(*decay, adam) if variant == 'adam' else optax.chain(adam, *decay)


def normalized(v: jax.Array, mask: jax.Array) -> jax.Array:
  """``v / ‖v[mask]‖₂`` over the masked entries (0 elsewhere), as OTO normalises criteria."""
  v = jnp.where(mask, v, 0.0)
  n = jnp.sqrt(jnp.sum(jnp.square(v)))
  return jnp.where(n > 0, v / jnp.where(n > 0, n, 1.0), 0.0)
