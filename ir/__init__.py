"""The compiler core: graphs of semantic primitives and the formats they store.

    graph       capture a model step as a jaxpr (`Graph`, `StepSpec`, `CacheLayout`)
    primitives  the semantic ops, one module per op family
    qformat     packed weight formats (`QuantizedWeight`)
    kvquant     KIVI k-bit KV format and `kivi_attention`
    kvsinks     StreamingLLM sinks + window slots and `sink_attention`
    kvh2o       H2O heavy-hitter slots and `h2o_attention`
    kvkivi_*    KIVI under those slot policies
    rewrite     rewrite helpers (rules keyed by primitive, recursing into sub-jaxprs)
    verify      the graph verifier
    printer     the readable graph printer
    manager     the pass protocol and pipeline runner

The core imports nothing of pallax outside `pallax.ir` (tests/test_layering.py).
"""
