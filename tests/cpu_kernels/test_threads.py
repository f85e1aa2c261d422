"""The kernels' threads (cpu_kernels/parallel.h): each output is computed by one task, so
results are bit-identical whatever the number of threads ($PALLAX_CPU_THREADS) and when
several XLA threads call kernels at once (the spinning pool serves one call at a time,
the others run on their callers)."""

from __future__ import annotations

import concurrent.futures
import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallax import cpu_kernels
from pallax.ir import qformat

pytestmark = pytest.mark.usefixtures("kernel")

# One script computes every kernel's output for fixed inputs and prints a digest; run
# here and in a subprocess with one thread, the digests must agree.
SCRIPT = textwrap.dedent(
    """
    import hashlib, functools
    import jax, jax.numpy as jnp, numpy as np
    from pallax import cpu_kernels
    from pallax.ir import qformat
    assert cpu_kernels.available()
    rng = np.random.default_rng(0)
    outs = []
    for rows in (1, 3, 16, 64):
        x = jnp.asarray(rng.standard_normal((rows, 576)), jnp.float32)
        w = rng.standard_normal((1536, 576)).astype(np.float32) / 24
        for bits, g in ((4, 32), (4, 128), (8, None)):
            qw = qformat.quantize_rtn(w, bits, g)
            xp = jnp.pad(x, ((0, 0), (0, qw.padded_in - 576)))
            mm = functools.partial(cpu_kernels.qmatmul_cpu, bits=bits, group_size=qw.group_size)
            f = jax.jit(mm)
            outs.append(f(xp, qw.data, qw.scale, qw.offset))
        outs.append(jax.jit(cpu_kernels.bf16_matmul)(x, jnp.asarray(w, jnp.bfloat16)))
    for b, s in ((1, 4000), (2, 700)):
        q = jnp.asarray(rng.standard_normal((b, 1, 8, 64)), jnp.float32)
        k = jnp.asarray(rng.standard_normal((b, 1, 2, 64)), jnp.float32)
        kc = jnp.asarray(rng.standard_normal((b, 2, s, 64)), jnp.float32)
        pos = jnp.full((b,), s - 1, jnp.int32)
        att = functools.partial(cpu_kernels.decode_attention_cpu, scale=0.125,
                                sliding_window=None, softcap=None)
        outs.append(jax.jit(att)(q, k, k, kc, kc + 1.0, pos)[0])
    print(hashlib.sha256(b"".join(np.asarray(o).tobytes() for o in outs)).hexdigest())
    """
)


def _digest(threads=None):
    env = dict(os.environ)
    env.pop("PALLAX_CPU_THREADS", None)
    if threads is not None:
        env["PALLAX_CPU_THREADS"] = str(threads)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_results_do_not_depend_on_the_thread_count():
    assert _digest() == _digest(threads=1)


def test_concurrent_callers_get_their_own_results():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((1536, 576)).astype(np.float32) / 24
    qw = qformat.quantize_rtn(w, 4, 32)
    f = jax.jit(functools.partial(cpu_kernels.qmatmul_cpu, bits=4, group_size=32))
    xs = [jnp.asarray(rng.standard_normal((r, 576)), jnp.float32) for r in (1, 2, 8, 1, 4, 16)]
    want = [np.asarray(f(x, qw.data, qw.scale, qw.offset)) for x in xs]

    def work(i):
        for _ in range(20):
            got = np.asarray(f(xs[i], qw.data, qw.scale, qw.offset))
            np.testing.assert_array_equal(got, want[i])
        return i

    with concurrent.futures.ThreadPoolExecutor(len(xs)) as pool:
        assert sorted(pool.map(work, range(len(xs)))) == list(range(len(xs)))
