"""oto_jax: Only-Train-Once structured pruning for JAX and Flax.

Train a network once, from scratch, with a structured-sparsity optimizer, then slice the
zero groups out and get a slimmer network that computes the same outputs.
"""

from oto_jax.analysis import zig_partition as zig_partition
from oto_jax.partition import GroupEntry as GroupEntry
from oto_jax.partition import NodeGroup as NodeGroup
from oto_jax.partition import ZIGPartition as ZIGPartition
from oto_jax.rules import Literal as Literal
from oto_jax.rules import Zero as Zero
from oto_jax.rules import elementwise as elementwise

__version__ = '0.1.0'
