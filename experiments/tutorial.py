# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # oto_jax in ten minutes: train once, prune, get the same outputs
#
# This tutorial walks through the whole library on a small CNN and scikit-learn's bundled 8×8
# digits, on CPU. It is a [jupytext](https://jupytext.readthedocs.io) "percent" script:
# `jupytext --to ipynb experiments/tutorial.py` makes it a notebook, and CI runs it as a
# script so it cannot rot.
#
# 1. **Partition** the model into zero-invariant groups (ZIGs) from its jaxpr.
# 2. **Train** with HESSO inside an ordinary optax/jit loop until the ZIGs the FLOPs budget
#    asks for are exactly zero.
# 3. **Construct the subnet**: slice the zero ZIGs out and check it computes the same outputs.
# 4. **Export** the slim model to StableHLO.

# %%
import os
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import oto_jax
from experiments import data


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


ds = data.digits(seed=0)
model = CNN()
variables = model.init(jax.random.key(0), ds.x_train[:1])

# %% [markdown]
# ## 1. The partition
# `zig_partition` traces `model.apply` and proves, for every channel, that zeroing the
# variables that produce it leaves the outputs unchanged once its consumers are sliced.
# The summary lists each node group; `to_dot` draws them (render with Graphviz).

# %%
part = oto_jax.zig_partition(model.apply, variables, ds.x_train[:1])
print(part.summary())
dot = part.to_dot()
print(dot.splitlines()[0], '…', len(dot.splitlines()), 'lines of DOT')
print(f'full model: {part.flops.total:,.0f} FLOPs per image, {part.params.total:,.0f} parameters')

# %% [markdown]
# ## 2. HESSO in an optax chain, inside jit
# HESSO is an optax `GradientTransformation`: here it keeps 35% of the FLOPs, pruning in
# 4 periods between steps 100 and 300. It composes like any optax transform, here after
# gradient clipping.

# %%
steps_per_epoch = len(ds.x_train) // 64
tx = optax.chain(
  optax.clip_by_global_norm(5.0),
  oto_jax.hesso(
    part,
    0.05,
    target=oto_jax.flops_budget(0.35),
    start_pruning_step=100,
    pruning_steps=200,
    pruning_periods=4,
    momentum=0.9,
  ),
)
params, stats = variables['params'], variables['batch_stats']
opt_state = tx.init(params)


@jax.jit
def step(params, stats, opt_state, x, y):
  def loss_fn(p):
    logits, new = model.apply({'params': p, 'batch_stats': stats}, x, train=True, mutable=['batch_stats'])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new['batch_stats']

  (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), stats, opt_state, loss


for epoch in range(20):
  for x, y in data.batches(ds.x_train, ds.y_train, 64, seed=0, epoch=epoch):
    params, stats, opt_state, loss = step(params, stats, opt_state, x, y)
  if epoch % 5 == 4:
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
full_logits = model.apply(trained, ds.x_test)
slim_logits = jax.jit(subnet.apply)(subnet.variables, ds.x_test)
print('max |full - slim| =', float(jnp.max(jnp.abs(full_logits - slim_logits))))
print(
  'test accuracy, full vs slim:',
  float(jnp.mean(full_logits.argmax(-1) == ds.y_test)),
  float(jnp.mean(slim_logits.argmax(-1) == ds.y_test)),
)
print(subnet.report())
assert jnp.allclose(full_logits, slim_logits, atol=1e-4)

# %% [markdown]
# ## 4. Save and export
# `save_subnet` writes the slim variables (Orbax) and `apply` as serialized StableHLO, which
# runs in a process that has never heard of oto_jax.

# %%
directory = os.path.join(tempfile.mkdtemp(), 'slim')
oto_jax.save_subnet(directory, subnet, ds.x_test)
exported = oto_jax.load_subnet(directory)
again = exported.apply(exported.variables, ds.x_test)
print('exported == slim:', bool(jnp.allclose(again, slim_logits, atol=1e-5)))
