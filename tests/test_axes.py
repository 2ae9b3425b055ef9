"""The axis union-find: layouts, their reconciliation, and index maps."""

import numpy as np

from oto_jax.axes import CAT, PROD, AxisGraph


def _leaves(g: AxisGraph, a: int) -> list[int]:
  return [g.size[x] for x in g.atoms_of(a, {})]


def test_products_refine_to_a_common_factorisation():
  g = AxisGraph()
  x = g.new(24)
  g.assign(x, PROD, [g.new(6), g.new(4)])
  g.assign(x, PROD, [g.new(2), g.new(12)])
  assert _leaves(g, x) == [2, 3, 4]
  assert not g.blocked


def test_products_without_common_refinement_block_the_axis():
  g = AxisGraph()
  x = g.new(12)
  g.assign(x, PROD, [g.new(4), g.new(3)])
  g.assign(x, PROD, [g.new(3), g.new(4)])
  assert 'share no refinement' in g.blocked[g.find(x)]


def test_concatenations_refine_and_unite_matching_parts():
  g = AxisGraph()
  x, a, b = g.new(10), g.new(4), g.new(6)
  g.assign(x, CAT, [a, b])
  c, d, e = g.new(4), g.new(2), g.new(4)
  g.assign(x, CAT, [c, d, e])
  assert g.find(a) == g.find(c)
  assert _leaves(g, b) == [2, 4]


def test_concatenation_of_whole_rows_refines_a_product():
  """(2 groups × 4) meets [4 | 4] (a channel shuffle next to a concat): each part is one row of
  the group factor times the shared inner factor."""
  g = AxisGraph()
  x, groups, inner = g.new(8), g.new(2), g.new(4)
  g.assign(x, PROD, [groups, inner])
  a, b = g.new(4), g.new(4)
  g.assign(x, CAT, [a, b])
  assert g.find(x) not in g.blocked
  assert g.find(a) == g.find(inner) == g.find(b)
  # Rows of 2 out of (3 × 2): the outer factor splits into the parts' row counts.
  y, outer, pair = g.new(6), g.new(3), g.new(2)
  g.assign(y, PROD, [outer, pair])
  c, d = g.new(4), g.new(2)
  g.assign(y, CAT, [c, d])
  assert _leaves(g, outer) == [2] and _leaves(g, c) == [2, 2] and g.find(d) == g.find(pair)


def test_product_against_concatenation_that_cuts_a_row_is_a_conflict():
  g = AxisGraph()
  x = g.new(8)
  g.assign(x, PROD, [g.new(2), g.new(4)])
  g.assign(x, CAT, [g.new(3), g.new(5)])
  assert 'both a reshape product and a concatenation' in g.blocked[g.find(x)]


def test_index_maps_follow_products_and_concatenations():
  g = AxisGraph()
  heads, dim = g.new(3), g.new(4)
  qkv = g.new(24)
  q, kv = g.new(12), g.new(12)
  g.assign(qkv, CAT, [q, kv])
  g.assign(q, PROD, [heads, dim])
  index, depth = g.index_map(qkv, heads)
  np.testing.assert_array_equal(index, np.r_[np.repeat(np.arange(3), 4), -np.ones(12, int)])
  assert depth == (0,)
  index, depth = g.index_map(q, dim)
  np.testing.assert_array_equal(index, np.tile(np.arange(4), 3))
  assert depth == (1,)
  # Nested products: the positions of every factor on the way, outermost first.
  devices, shard = g.new(2), g.new(12)
  whole = g.new(24)
  g.assign(whole, PROD, [devices, shard])
  g.assign(shard, PROD, [g.new(3), g.new(4)])
  inner_heads, inner_dim = g.children(g.find(shard))[1]
  assert g.index_map(whole, inner_heads)[1] == (1, 0) < g.index_map(whole, inner_dim)[1] == (1, 1)
  assert g.index_map(whole, whole)[1] == ()
  assert g.index_map(whole, heads)[1] is None


def test_size_one_factors_carry_nothing():
  g = AxisGraph()
  x, c = g.new(8), g.new(8)
  g.assign(x, PROD, [g.new(1), c, g.new(1)])
  assert g.find(x) == g.find(c)
