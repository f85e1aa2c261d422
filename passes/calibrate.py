"""Calibration: run a model's graph on real text and look at every `linear`'s input.

Passes that need activation statistics (GPTQ's Hessians, LLM.int8()'s outlier
features) call `run_calibration`. It traces the model's forward at the
calibration shape (sequences of `seq_len` tokens), then evaluates that jaxpr
eagerly, equation by equation, and hands each `linear` to a callback with the
weight's name, its concrete input activations and its current weight. The
callback returns the weight to multiply with, so a pass can quantize layer by
layer and let later layers see the quantized model's activations, as GPTQ does.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from pallax.ir import primitives
from pallax.ir.graph import Graph, StepSpec, capture
from pallax.ir.rewrite import eval_with_rules

DEFAULT_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "calibration")
DEFAULT_SEQ_LEN = 256
MAX_TOKENS = 8192
HELD_OUT = 4  # every 4th calibration sequence is held out (GPTQ chooses its dampening on it)


def default_calibration() -> tuple[str, ...]:
    """The built-in calibration texts, one per genre (data/calibration/*.txt: narrative,
    dialogue, code, technical, encyclopedic, lists and tables, math, news; original
    writing, CC0, see LICENSE.txt there). None of them is used for evaluation."""
    names = sorted(n for n in os.listdir(DEFAULT_DIR) if n.endswith(".txt") and n != "LICENSE.txt")
    out = []
    for n in names:
        with open(os.path.join(DEFAULT_DIR, n), encoding="utf-8") as f:
            out.append(f.read())
    return tuple(out)


def check_calibration(calibration) -> tuple:
    """Normalize `calibration=` (strings and/or token-id sequences) into a hashable tuple."""
    if isinstance(calibration, (str, np.ndarray)) or not isinstance(calibration, Sequence):
        raise ValueError(
            "calibration must be a list of strings or token-id arrays, "
            f"got {type(calibration).__name__}"
        )
    if len(calibration) == 0:
        raise ValueError("calibration is empty: GPTQ and outlier detection need calibration data")
    out = []
    for i, item in enumerate(calibration):
        if isinstance(item, str):
            if not item.strip():
                raise ValueError(f"calibration[{i}] is an empty string")
            out.append(item)
            continue
        arr = np.asarray(item)
        if arr.ndim != 1 or arr.size < 2 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(
                f"calibration[{i}] must be a string or a 1-D array of at least 2 token ids, "
                f"got {arr.dtype}{list(arr.shape)}"
            )
        out.append(tuple(int(t) for t in arr))
    return tuple(out)


def calibration_batch(calibration: tuple, tokenizer, vocab: int, seq_len: int) -> np.ndarray:
    """Token ids [N, seq_len]: every item tokenized, concatenated, cut into whole sequences.

    Items shorter than one sequence are joined with the others; a remainder shorter than
    seq_len is kept as its own (shorter) final sequence only if nothing else exists.
    Past MAX_TOKENS, evenly spaced sequences are kept, so every part of the
    calibration (every genre of the default) is still represented.
    """
    ids: list[int] = []
    for i, item in enumerate(calibration):
        toks = tokenizer.encode(item) if isinstance(item, str) else list(item)
        bad = [t for t in toks if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"calibration[{i}] has token id {bad[0]} outside [0, {vocab})")
        ids.extend(toks)
    if len(ids) < seq_len:
        return np.asarray([ids], np.int32)
    n = len(ids) // seq_len
    seqs = np.asarray(ids[: n * seq_len], np.int32).reshape(n, seq_len)
    keep = MAX_TOKENS // seq_len
    if n > keep:
        seqs = seqs[np.linspace(0, n - 1, keep).round().astype(int)]
    return seqs


def held_out_rows(n: int, t: int) -> np.ndarray:
    """Which of the N * T activation rows of a calibration batch [N, T] are held out
    (bool [N * T], row-major): every HELD_OUT-th sequence; with fewer than HELD_OUT
    sequences, the last 1 / HELD_OUT of each sequence's positions; none when a
    sequence is too short to split (fewer than 2 * HELD_OUT tokens in all)."""
    held = np.zeros((n, t), bool)
    if n >= HELD_OUT:
        held[HELD_OUT - 1 :: HELD_OUT] = True
    elif n * t >= 2 * HELD_OUT:
        held[:, t - max(1, t // HELD_OUT) :] = True
    return held.reshape(-1)


LinearHook = Callable[[str, np.ndarray, object], object]


def run_calibration(graph: Graph, tokens: np.ndarray, on_linear: LinearHook) -> None:
    """Evaluate the model on `tokens` [N, T]; call on_linear(name, x [rows, I], w) per linear.

    `on_linear` returns the weight the linear multiplies with (the same `w`, or a
    quantized-dequantized one). Linears whose weight is not a named graph weight
    are evaluated as they are.
    """
    forward = graph.meta.get("forward")
    if forward is None:
        raise ValueError("this graph was captured without its forward; it cannot be calibrated")
    n, t = tokens.shape
    weights = graph.weights
    calib = capture(forward, weights, graph.cache, [StepSpec("chunk", n, t, t)], {})
    step = calib.steps["chunk"]
    names = {id(v): k for k, v in weights.items()}
    replaced: dict[str, object] = {}

    last: list = [None, None]  # (x, its rows): q/k/v (gate/up) get the very same array

    def rows_of(x):
        if last[0] is not x:
            last[:] = [x, np.asarray(x, np.float32).reshape(-1, x.shape[-1])]
        return last[1]

    def linear_rule(eqn, x, w):
        name = names.get(id(w))
        if name is not None:
            if name not in replaced:
                replaced[name] = on_linear(name, rows_of(x), w)
            w = replaced[name]
        return primitives.linear_p.bind(x, w)

    def head_rule(eqn, x, table):
        # The head's input is seen like a linear's; the logits ([N, T, V]: gigabytes for a
        # large vocabulary) are never computed: nothing after the head needs calibrating.
        name = names.get(id(table))
        if name is not None:
            on_linear(name, rows_of(x), table)
        raise _Done

    cache = graph.cache.allocate(n, t)
    flat = [
        *[weights[k] for k in sorted(weights)],
        *[cache[k] for k in sorted(cache)],
        jnp.asarray(tokens),
        jnp.zeros((n,), jnp.int32),
    ]
    _check_order(step, weights, cache)
    rules = {primitives.linear_p: linear_rule, primitives.lm_head_p: head_rule}
    try:
        eval_with_rules(step.jaxpr.jaxpr, step.jaxpr.consts, flat, rules)
    except _Done:
        pass


class _Done(Exception):
    pass


def _check_order(step, weights, cache) -> None:
    want = [*sorted(weights), *("cache:" + k for k in sorted(cache)), "tokens", "pos"]
    if list(step.input_names) != want:
        raise AssertionError(f"calibration step inputs {step.input_names} != {want}")
