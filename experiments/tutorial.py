# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # oto_jax in ten minutes: train once, prune, get the same outputs
#
# This tutorial walks through the whole library on a small CNN and scikit-learn's bundled 8×8
# digits, on CPU, in well under a minute. `tutorial.py` (a [jupytext](https://jupytext.readthedocs.io)
# "percent" script) is the source and `tutorial.ipynb` the notebook made from it: edit the
# script, then `jupytext --sync experiments/tutorial.py`; a test checks that the two agree and
# runs the notebook. It needs only `oto_jax` (`pip install -e '.[experiments]'`), so it runs
# from any directory, as a notebook or as `python tutorial.py`.
#
# 1. **Partition** the model into zero-invariant groups (ZIGs) from its jaxpr, and look at them.
# 2. **Train** with HESSO inside an ordinary optax/jit loop until the ZIGs the FLOPs budget
#    asks for are exactly zero.
# 3. **Construct the subnet**: slice the zero ZIGs out and check it computes the same outputs.
# 4. **Export** the slim model to StableHLO that runs at any batch size.
# 5. **Keep training** the slim model, with the optimizer state sliced like it.

# %%
import os
import shutil
import subprocess
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from IPython.display import Image, display
from sklearn.datasets import load_digits

import oto_jax

digits = load_digits()
images = (digits.images / 16.0).astype(np.float32)[..., None]  # NHWC in [0, 1]
labels = digits.target.astype(np.int32)
order = np.random.default_rng(0).permutation(len(images))
train_idx, test_idx = order[:1400], order[1400:]
x_train, y_train, x_test, y_test = images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]


def batches(epoch: int, size: int = 64):
  """One epoch of shuffled minibatches (the incomplete last one dropped)."""
  perm = np.random.default_rng(epoch).permutation(len(x_train))
  for i in range(0, len(perm) - size + 1, size):
    yield x_train[perm[i : i + size]], y_train[perm[i : i + size]]


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    for width in (16, 32):
      x = nn.Conv(width, (3, 3), use_bias=False)(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
      x = nn.max_pool(x, (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(10)(x)


model = CNN()
variables = jax.jit(model.init)(jax.random.key(0), x_train[:1])

# %% [markdown]
# ## 1. The partition
# `zig_partition` traces `model.apply` and proves, for every channel, that zeroing the
# variables that produce it leaves the outputs unchanged once its consumers are sliced.
# The summary lists each node group by the layer that produces it.

# %%
part = oto_jax.zig_partition(model.apply, variables, x_train[:1])
print(part.summary())
print(f'full model: {part.flops.total:,.0f} FLOPs per image, {part.params.total:,.0f} parameters')

# %% [markdown]
# `to_dot` draws the same groups top-down: each box is a node group with the layers that
# produce its channels (a conv and the BatchNorm after it); dashed edges lead to the layers that
# consume them. Graphviz renders it; without Graphviz, here is the DOT text.

# %%
dot = part.to_dot()
if shutil.which('dot'):
  display(Image(subprocess.run(['dot', '-Tpng'], input=dot.encode(), capture_output=True, check=True).stdout))
else:
  print(dot)

# %% [markdown]
# ## 2. HESSO in an optax chain, inside jit
# HESSO is an optax `GradientTransformation`: here it keeps 35% of the FLOPs, pruning in
# 3 periods between steps 60 and 180, and then trains what is left. It composes like any optax
# transform, here after gradient clipping.

# %%
tx = optax.chain(
  optax.clip_by_global_norm(5.0),
  oto_jax.hesso(
    part,
    0.05,
    target=oto_jax.flops_budget(0.35),
    start_pruning_step=60,
    pruning_steps=120,
    pruning_periods=3,
    momentum=0.9,
  ),
)


def make_step(module, tx):
  """One jitted training step of ``module`` with ``tx``."""

  @jax.jit
  def step(params, stats, opt_state, x, y):
    def loss_fn(p):
      logits, new = module.apply({'params': p, 'batch_stats': stats}, x, train=True, mutable=['batch_stats'])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new['batch_stats']

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  return step


step = make_step(model, tx)
params, stats = variables['params'], variables['batch_stats']
opt_state = tx.init(params)
for epoch in range(12):
  for x, y in batches(epoch):
    params, stats, opt_state, loss = step(params, stats, opt_state, x, y)
  if epoch % 3 == 2:
    sparsity = float(oto_jax.group_sparsity(part, params))
    print(f'epoch {epoch + 1}: loss {float(loss):.4f}, group sparsity {sparsity:.2f}')

trained = {'params': params, 'batch_stats': stats}
keep = np.asarray(part.zig_norms(params) > 0)
print(f'FLOPs kept: {part.flops.evaluate(keep) / part.flops.total:.3f} (budget 0.35)')

# %% [markdown]
# ## 3. The subnet
# `construct_subnet` removes every all-zero ZIG from every collection (params and
# batch statistics). The slim model computes what the full one did.

# %%
subnet = oto_jax.construct_subnet(part, trained)
full_logits = jax.jit(model.apply)(trained, x_test)
slim_logits = subnet.apply(subnet.variables, x_test)
print('max |full - slim| =', float(jnp.max(jnp.abs(full_logits - slim_logits))))
print(
  'test accuracy, full vs slim:',
  float(jnp.mean(full_logits.argmax(-1) == y_test)),
  float(jnp.mean(slim_logits.argmax(-1) == y_test)),
)
print(subnet.report())
assert jnp.allclose(full_logits, slim_logits, atol=1e-4)

# %% [markdown]
# ## 4. Export
# `export_subnet` gives the slim `apply` as StableHLO with a symbolic batch dimension: one
# program that runs at every batch size, in a process that has never heard of oto_jax (it
# takes the slim variables' leaves). `save_subnet` writes it with the variables (Orbax), and
# `load_subnet` reads both back.

# %%
exported = oto_jax.export_subnet(subnet)
print('input shapes:', exported.in_avals[-1].shape)
leaves = jax.tree_util.tree_leaves(subnet.variables)
for batch in (1, 100):
  out = exported.call(leaves, (x_test[:batch],), {})
  err = float(jnp.max(jnp.abs(out - slim_logits[:batch])))
  print(f'batch {batch}: logits {out.shape}, max |exported - slim| = {err:.1e}')
  assert err < 1e-5

directory = os.path.join(tempfile.mkdtemp(), 'slim')
oto_jax.save_subnet(directory, subnet, x_test)
loaded = oto_jax.load_subnet(directory)
print('loaded == slim:', bool(jnp.allclose(loaded.apply(loaded.variables, x_test), slim_logits, atol=1e-5)))

# %% [markdown]
# ## 5. Keep training the slim model
# `subnet.slice_like` slices any tree shaped like the full variables: here HESSO's optimizer
# state, whose momentum then fits the slim parameters (the step count passes unchanged).
# `subnet.module` is the `CNN` at the slim widths, so the same training step fine-tunes it,
# with plain SGD that starts from the momentum HESSO built up.

# %%
slim_state = subnet.slice_like(opt_state)
momentum = optax.tree_utils.tree_get(slim_state, 'trace')
print(
  'Conv_0 kernel momentum:',
  optax.tree_utils.tree_get(opt_state, 'trace')['Conv_0']['kernel'].shape,
  '->',
  momentum['Conv_0']['kernel'].shape,
)
slim_model = subnet.module
tune = optax.sgd(0.01, momentum=0.9)
slim_params, slim_stats = subnet.variables['params'], subnet.variables['batch_stats']
tune_state = optax.tree_utils.tree_set(tune.init(slim_params), trace=momentum)
tune_step = make_step(slim_model, tune)
for epoch in range(12, 14):
  for x, y in batches(epoch):
    slim_params, slim_stats, tune_state, loss = tune_step(slim_params, slim_stats, tune_state, x, y)
tuned = jax.jit(slim_model.apply)({'params': slim_params, 'batch_stats': slim_stats}, x_test)
print(f'slim test accuracy after 2 more epochs: {float(jnp.mean(tuned.argmax(-1) == y_test)):.4f}')
