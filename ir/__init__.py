"""The compiler core: graphs of semantic primitives and the formats they store.

    graph       capture a model step as a jaxpr (`Graph`, `StepSpec`, `CacheLayout`)
    primitives  the semantic ops, one module per op family
    qformat     packed weight formats (`QuantizedWeight`)
    kvcache     the KV cache per layer: a storage format (dense, int8, KIVI) x a slot
                policy (full, sinks, H2O), and the reference attention over it
    kv_rewrite  giving layers a new format or policy (the KV passes' engine)
    rewrite     rewrite helpers (rules keyed by primitive, recursing into sub-jaxprs)
    verify      the graph verifier
    printer     the readable graph printer
    manager     the pass protocol and pipeline runner

The core imports nothing of pallax outside `pallax.ir` (tests/test_layering.py).
"""
