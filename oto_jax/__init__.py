"""oto_jax: Only-Train-Once structured pruning for JAX and Flax.

Train a network once, from scratch, with a structured-sparsity optimizer, then slice the
zero groups out and get a slimmer network that computes the same outputs.
"""

from oto_jax.analysis import zig_partition
from oto_jax.budgets import Budget, flops_budget, params_budget
from oto_jax.costs import CostModel
from oto_jax.deploy import deploy_subnet
from oto_jax.dhspg import DHSPGState, dhspg
from oto_jax.errors import AnalysisError, NativeUnavailable, OTOError, ShapeSpecificError, SurgeryError
from oto_jax.hesso import HESSOState, hesso, hesso_cric
from oto_jax.hspg import HSPGState, hspg, prox_sg
from oto_jax.ir import Literal, Program
from oto_jax.metrics import count_flops, count_params, group_sparsity, zero_zigs
from oto_jax.partition import GroupEntry, NodeGroup, ZIGPartition
from oto_jax.persistence import ExportedSubnet, export_subnet, load_subnet, save_subnet
from oto_jax.primitives import (
  CostTerm,
  PrimitiveEntry,
  Zero,
  elementwise,
  register_primitive,
  registered_primitives,
  unregister_primitive,
)
from oto_jax.segments import ZIGSegments
from oto_jax.surgery import Subnet, SubnetPlan, SubnetReport, construct_subnet, plan_subnet
from oto_jax.transforms import (
  GroupLassoState,
  HalfSpaceState,
  add_group_lasso,
  epsilon_by_layer,
  group_lasso_prox,
  half_space_projection,
)
from oto_jax.tuning import ConvTiming, Tuning

__version__ = '0.2.0'

__all__ = [
  'AnalysisError',
  'Budget',
  'CostModel',
  'ConvTiming',
  'CostTerm',
  'DHSPGState',
  'ExportedSubnet',
  'GroupEntry',
  'GroupLassoState',
  'HESSOState',
  'HSPGState',
  'HalfSpaceState',
  'Literal',
  'NativeUnavailable',
  'NodeGroup',
  'OTOError',
  'PrimitiveEntry',
  'Program',
  'ShapeSpecificError',
  'Subnet',
  'SubnetPlan',
  'SubnetReport',
  'SurgeryError',
  'Tuning',
  'ZIGPartition',
  'ZIGSegments',
  'Zero',
  'add_group_lasso',
  'construct_subnet',
  'count_flops',
  'count_params',
  'deploy_subnet',
  'dhspg',
  'elementwise',
  'epsilon_by_layer',
  'export_subnet',
  'flops_budget',
  'group_lasso_prox',
  'group_sparsity',
  'half_space_projection',
  'hesso',
  'hesso_cric',
  'hspg',
  'load_subnet',
  'params_budget',
  'plan_subnet',
  'prox_sg',
  'register_primitive',
  'registered_primitives',
  'save_subnet',
  'unregister_primitive',
  'zero_zigs',
  'zig_partition',
]
