"""The primitive registry: a user's primitive is analysed, costed and cut through one entry.

Two primitives of the user's own, each with an implementation, an abstract evaluation and a
lowering: ``my_scale`` (``2 x``, element-wise) and ``my_bias`` (``x + b``, with a ``width``
parameter its abstract evaluation checks, so the slim program needs a ``rewrite``). Their
entries go in per call (``rules=``) or for the session (``register_primitive``); the partition,
the FLOPs model and the subnet all follow them.
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest
from jax.interpreters import mlir

import oto_jax
from oto_jax.primitives import align_elementwise, all_axes


def _make_scale() -> jex.core.Primitive:
  prim = jex.core.Primitive('my_scale')
  prim.def_impl(lambda x: 2 * x)
  prim.def_abstract_eval(lambda aval: aval)
  mlir.register_lowering(prim, mlir.lower_fun(lambda x: 2 * x, multiple_results=False))
  return prim


def _bias_abstract(x, b, *, width):
  if x.shape[-1] != width or b.shape != (width,):
    raise ValueError(f'my_bias: width={width} but x has {x.shape} and b has {b.shape}')
  return x


def _make_bias() -> jex.core.Primitive:
  prim = jex.core.Primitive('my_bias')
  prim.def_impl(lambda x, b, *, width: x + b)
  prim.def_abstract_eval(_bias_abstract)
  mlir.register_lowering(prim, mlir.lower_fun(lambda x, b, *, width: x + b, multiple_results=False))
  return prim


MY_SCALE, MY_BIAS = _make_scale(), _make_bias()


def _bias_structure(ctx, eqn):
  b, out = eqn.ins[1], eqn.outs[0]
  align_elementwise(ctx, eqn)
  ctx.unite(b, 0, out, len(ctx.shape(out)) - 1)


BIAS_ENTRY = oto_jax.PrimitiveEntry(
  structure=_bias_structure,
  # x + b is zero on a channel where both are.
  zero=oto_jax.Zero('all'),
  # Deliberately not one FLOP per output, to see the cost model use the entry's own.
  cost=lambda ctx, eqn: [oto_jax.CostTerm(3.0, all_axes(ctx, eqn.outs[0]))],
  rewrite=lambda ctx, eqn: {'width': ctx.slim_shape(eqn.outs[0])[-1]},
)
SCALE_ENTRY = oto_jax.elementwise(oto_jax.Zero('keep'))


class Net(nn.Module):
  """Dense(6) → my_bias → relu → my_scale → Dense(3)."""

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(6, use_bias=False)(x)
    h = MY_BIAS.bind(h, self.param('b', nn.initializers.normal(1.0), (6,)), width=6)
    h = MY_SCALE.bind(nn.relu(h))
    return nn.Dense(3)(h)


def _setup():
  model = Net()
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 5)), jnp.float32)
  v = model.init(jax.random.key(0), x)
  return model, v, x


RULES = {'my_scale': SCALE_ENTRY, 'my_bias': BIAS_ENTRY}


def test_unknown_primitives_block_with_their_name():
  model, v, x = _setup()
  part = oto_jax.zig_partition(model.apply, v, x)
  assert part.num_zigs == 0, part.summary()
  reasons = ' '.join(g.reason for g in part.node_groups)
  assert 'unsupported primitive `my_bias`' in reasons or 'unsupported primitive `my_scale`' in reasons


def _check_analysed_costed_cut(part, model, v, x):
  # Analysed: the 6 hidden units, with my_bias's b a member and Dense_1's rows dependents.
  assert part.num_zigs == 6 and [g.size for g in part.prunable_groups] == [6], part.summary()
  (g,) = part.prunable_groups
  assert {e.path for e in g.members} == {('params', 'Dense_0', 'kernel'), ('params', 'b')}
  assert [e.path for e in g.dependents] == [('params', 'Dense_1', 'kernel')]
  # Costed by the entries: dot 2·4·5·6 + my_bias 3·4·6 + relu 4·6 + my_scale 4·6 + dot 2·4·6·3 + add 4·3.
  want = 2 * 4 * 5 * 6 + 3 * 4 * 6 + 4 * 6 + 4 * 6 + 2 * 4 * 6 * 3 + 4 * 3
  assert part.flops.total == want
  keep = np.ones(6, bool)
  keep[[1, 4]] = False
  want_slim = 2 * 4 * 5 * 4 + 3 * 4 * 4 + 4 * 4 + 4 * 4 + 2 * 4 * 4 * 3 + 4 * 3
  assert part.flops.evaluate(keep) == want_slim
  # Cut: the slim program rebinds my_bias with the rewritten width, at any batch size.
  zeroed = part.zero(v, [1, 4])
  sub = oto_jax.construct_subnet(part, zeroed)
  assert sub.variables['params']['b'].shape == (4,)
  for xb in (x, jnp.concatenate([x, x[:1]])):
    chex.assert_trees_all_close(sub.apply(sub.variables, xb), model.apply(zeroed, xb), rtol=1e-6)


def test_per_call_rules_are_analysed_costed_and_cut():
  model, v, x = _setup()
  _check_analysed_costed_cut(oto_jax.zig_partition(model.apply, v, x, rules=RULES), model, v, x)


@pytest.fixture
def registered():
  for name, entry in RULES.items():
    oto_jax.register_primitive(name, entry)
  try:
    yield
  finally:
    for name in RULES:
      oto_jax.unregister_primitive(name)


def test_session_registration(registered):
  model, v, x = _setup()
  assert oto_jax.registered_primitives()['my_bias'] is BIAS_ENTRY
  _check_analysed_costed_cut(oto_jax.zig_partition(model.apply, v, x), model, v, x)
  with pytest.raises(ValueError, match='already has an entry'):
    oto_jax.register_primitive(MY_BIAS, BIAS_ENTRY)


def test_unregistered_after_the_session_fixture():
  assert 'my_bias' not in oto_jax.registered_primitives()
  with pytest.raises(ValueError, match='already has an entry'):
    oto_jax.register_primitive('add', SCALE_ENTRY)  # built-ins are protected too


def test_a_missing_rewrite_is_a_surgery_error_naming_the_primitive():
  model, v, x = _setup()
  rules = {**RULES, 'my_bias': BIAS_ENTRY.replace(rewrite=None)}
  part = oto_jax.zig_partition(model.apply, v, x, rules=rules)
  with pytest.raises(oto_jax.SurgeryError, match='my_bias.*rewrite'):
    oto_jax.construct_subnet(part, v, zig_ids=[1])
  # Nothing removed: nothing to rewrite.
  sub = oto_jax.construct_subnet(part, v, zig_ids=[])
  chex.assert_trees_all_close(sub.apply(sub.variables, x), model.apply(v, x))


def test_a_rule_function_is_refused_with_the_fix():
  model, v, x = _setup()
  with pytest.raises(TypeError, match='PrimitiveEntry'):
    oto_jax.zig_partition(model.apply, v, x, rules={'my_scale': lambda ctx, eqn, ins, outs: None})
