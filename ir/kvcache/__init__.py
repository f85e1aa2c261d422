"""The KV cache as two orthogonal choices per layer: a storage format and a slot policy.

    format.py  what a storage format is      dense.py  int8.py  kivi.py
    policy.py  what a slot policy is         full.py   sinks.py h2o.py
    core.py    the cache of one layer as format x policy: its arrays and the
               reference attention (attend, encode what leaves staging, place it)

The `attention` primitive (ir/primitives/attention.py) takes a format and a policy as
parameters; kernels register lowerings per format (pallas_kernels/, cpu_kernels/) and
read the policy as slot positions. Adding a format or a policy is one file here (plus
its kernels): see docs/DESIGN.md, with the int8 format as the worked example.
"""

from __future__ import annotations

from pallax.ir.kvcache.core import first_size, layer_parts, part_names
from pallax.ir.kvcache.dense import DENSE, Dense
from pallax.ir.kvcache.format import Format, ring_positions
from pallax.ir.kvcache.full import FULL, Full
from pallax.ir.kvcache.h2o import H2O
from pallax.ir.kvcache.int8 import Int8
from pallax.ir.kvcache.kivi import BITS, Kivi
from pallax.ir.kvcache.policy import Policy
from pallax.ir.kvcache.sinks import Sinks

FORMATS = {"dense": Dense, "int8": Int8, "kivi": Kivi}
POLICIES = {"full": Full, "sinks": Sinks, "h2o": H2O}

__all__ = [
    "BITS", "DENSE", "FORMATS", "FULL", "POLICIES", "Dense", "Format", "Full", "H2O", "Int8",
    "Kivi", "Policy", "Sinks", "first_size", "layer_parts", "part_names", "ring_positions",
]  # fmt: skip
