"""The semantic ops models are written in, one module per op family.

Each op is a JAX primitive with an abstract eval and a pure-jnp reference; the
reference is also the CPU lowering, so it is written to be fast under XLA:CPU.
Kernels register other lowerings for these primitives (`pallax.pallas_kernels` for
tpu / cuda, `pallax.cpu_kernels` for CPU hot paths); model code never chooses a kernel.

    base       defining a primitive, float32 widening, the skinny-row dot
    embed      embed, lm_head
    norm       rms_norm
    linear     linear, mlp_act
    quantized  qlinear, qembed (packed weights; see `pallax.ir.qformat`)
    rope       rope
    attention  attention over a KV cache of any format x policy (`pallax.ir.kvcache`)
"""

from __future__ import annotations

from pallax.ir.primitives.attention import (  # noqa: F401
    attention,
    attention_core,
    attention_mask,
    attention_p,
    attention_params,
    attention_reference,
    decode_attention_split,
    dense_attention,
    write_kv,
)
from pallax.ir.primitives.base import (  # noqa: F401
    F32,
    MLP_KINDS,
    SKINNY_ROWS,
    _define,
    _dot_rows,
    widen,
)
from pallax.ir.primitives.embed import (  # noqa: F401
    embed,
    embed_p,
    embed_reference,
    lm_head,
    lm_head_p,
    lm_head_reference,
)
from pallax.ir.primitives.linear import (  # noqa: F401
    linear,
    linear_p,
    linear_reference,
    mlp_act,
    mlp_act_p,
    mlp_act_reference,
)
from pallax.ir.primitives.norm import (  # noqa: F401
    rms_norm,
    rms_norm_p,
    rms_norm_reference,
)
from pallax.ir.primitives.quantized import (  # noqa: F401
    INT8_MAX,
    dequantize_groups,
    qembed,
    qembed_p,
    qembed_reference,
    qlinear,
    qlinear_frame,
    qlinear_p,
    qlinear_reference,
    qmatmul_xla,
    quantize_rows,
)
from pallax.ir.primitives.rope import rope, rope_p, rope_reference  # noqa: F401

SEMANTIC_PRIMITIVES = (embed_p, rms_norm_p, linear_p, rope_p, attention_p, mlp_act_p, lm_head_p)
