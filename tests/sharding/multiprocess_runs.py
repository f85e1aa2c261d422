"""One process of a multi-process run (started by test_multiprocess.py, N copies on
loopback, 4 virtual CPU devices each): joins the run, generates the unsharded reference
on its own first device, then the same prompts on meshes spanning every process, and
prints one JSON line. A mesh "lazyTxD" loads the model lazily (each process reads only
its devices' slices) and reports what it read. With model "artifact", loads the sharded
artifact at the path given in place of the meshes and generates from it."""

from __future__ import annotations

import json
import sys

from sharding_prompts import PROMPTS, TEXT  # this directory: run as a script

import pallax
from pallax import sharding


def main(address: str, n: int, i: int, model: str, meshes: str) -> None:
    sharding.initialize(address, n, i, local_cpu_devices=4)
    import jax

    if model == "artifact":  # meshes: the path of a sharded artifact
        art = pallax.load_artifact(meshes)
        texts = [o.text for o in art.generate(PROMPTS[:4], max_new_tokens=8)]
        wq = art.weights["layers.0.wq"]
        out = {"process": jax.process_index(), "texts": texts,
               "stream": "".join(art.stream(PROMPTS[0], max_new_tokens=8)),
               "score": art.score(TEXT, chunk_size=16).tolist(), "xla_cache": art.xla_cache,
               "wq_local_rows": [s.data.shape[0] for s in wq.addressable_shards]}  # fmt: skip
        print(json.dumps(out), flush=True)
        return

    m = pallax.load(model)
    base = pallax.compile(m, passes=[])
    want = [o.text for o in base.generate(PROMPTS, max_new_tokens=8)]
    out = {"process": jax.process_index(), "devices": len(jax.devices()),
           "local_devices": len(jax.local_devices()), "reference": want}  # fmt: skip
    for mesh in meshes.split(","):
        t, d = map(int, mesh.removeprefix("lazy").split("x"))
        source = pallax.load(model, lazy=True) if mesh.startswith("lazy") else m
        c = pallax.compile(source, passes=[f"shard:tensor={t}:data={d}"])
        got = [o.text for o in c.generate(PROMPTS, max_new_tokens=8)]
        scores = c.score(TEXT, chunk_size=16)
        ref_scores = base.score(TEXT, chunk_size=16)
        out[mesh] = {"texts": got,
                     "max_dlogprob": float(abs(scores - ref_scores).max())}  # fmt: skip
        if source is not m:  # what this process read of split weights, as a fraction
            out[mesh]["read"] = {k: source.weights[k].reads[0] / source.weights[k].size
                                 for k in ("embed", "layers.0.w_down")}  # fmt: skip
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
