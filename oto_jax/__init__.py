"""oto_jax: Only-Train-Once structured pruning for JAX and Flax.

Train a network once, from scratch, with a structured-sparsity optimizer, then slice the
zero groups out and get a slimmer network that computes the same outputs.
"""

from oto_jax.analysis import zig_partition as zig_partition
from oto_jax.budgets import Budget as Budget
from oto_jax.budgets import flops_budget as flops_budget
from oto_jax.budgets import params_budget as params_budget
from oto_jax.costs import CostModel as CostModel
from oto_jax.dhspg import DHSPGState as DHSPGState
from oto_jax.dhspg import dhspg as dhspg
from oto_jax.hesso import HESSOState as HESSOState
from oto_jax.hesso import hesso as hesso
from oto_jax.hspg import HSPGState as HSPGState
from oto_jax.hspg import hspg as hspg
from oto_jax.hspg import prox_sg as prox_sg
from oto_jax.metrics import count_flops as count_flops
from oto_jax.metrics import count_params as count_params
from oto_jax.metrics import group_sparsity as group_sparsity
from oto_jax.metrics import zero_zigs as zero_zigs
from oto_jax.native import NativeUnavailable as NativeUnavailable
from oto_jax.partition import GroupEntry as GroupEntry
from oto_jax.partition import NodeGroup as NodeGroup
from oto_jax.partition import ZIGPartition as ZIGPartition
from oto_jax.persistence import ExportedSubnet as ExportedSubnet
from oto_jax.persistence import export_subnet as export_subnet
from oto_jax.persistence import load_subnet as load_subnet
from oto_jax.persistence import save_subnet as save_subnet
from oto_jax.rules import Literal as Literal
from oto_jax.rules import Zero as Zero
from oto_jax.rules import elementwise as elementwise
from oto_jax.segments import ZIGSegments as ZIGSegments
from oto_jax.surgery import Subnet as Subnet
from oto_jax.surgery import SubnetReport as SubnetReport
from oto_jax.surgery import SurgeryError as SurgeryError
from oto_jax.surgery import construct_subnet as construct_subnet
from oto_jax.transforms import GroupLassoState as GroupLassoState
from oto_jax.transforms import HalfSpaceState as HalfSpaceState
from oto_jax.transforms import add_group_lasso as add_group_lasso
from oto_jax.transforms import epsilon_by_layer as epsilon_by_layer
from oto_jax.transforms import group_lasso_prox as group_lasso_prox
from oto_jax.transforms import half_space_projection as half_space_projection

__version__ = '0.1.0'
