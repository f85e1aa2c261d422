"""Speculative decoding with a draft model (issue 17 item 6).

`Engine(target, speculate=K, draft=small)`: a second compiled model with the same
tokenizer (a smaller model of the family, or the target itself with int8 weights)
proposes K tokens per request and step by greedy decoding in a slot cache of its own,
all K in one call on the device (`engine_steps.make_slot_draft`); the engine verifies
them with the target exactly as it verifies prompt-lookup drafts
(`engine_steps.make_slot_verify`). The draft only changes how many tokens a step
gives, never which: a greedy request keeps the drafts equal to the target's greedy
tokens, and a sampling one keeps what `speculative_sample` keeps. A greedy draft is a
point mass given its context, so that rejection sampling keeps the target's
distribution here as it does for prompt lookup.

The draft's cache follows the target's: `draft_pos` is how many positions of a request
the draft cache holds, and `sync` prefills the rest in chunks (prompt chunks, a prefix
cache hit, tokens decoded while speculation paused). `propose` feeds each request's
last token (after the one token the draft missed when every draft was kept) and
decodes K tokens. Rejected drafts leave KV past the accepted position, which a
position-addressed cache overwrites before it reads: the draft's cache must be one
(dense or int8; not KIVI's staging ring, H2O or sinks).
"""

from __future__ import annotations

import numpy as np

from pallax.runtime.engine_steps import SlotSteps, chunk_args, pack_slots, prompt_lookup


class DraftModel:
    """A draft model's slot cache and steps beside an engine's (see the module docstring)."""

    def __init__(self, draft, target, rows: int, cache_len: int, k: int):
        from pallax.runtime import prefix_cache
        from pallax.runtime.compiled import CompiledModel

        if not isinstance(draft, CompiledModel):
            raise TypeError(
                f"draft takes a CompiledModel (pallax.compile(...)), got {type(draft).__name__}"
            )
        draft._check_runnable()
        mine, theirs = draft.tokenizer.backend.get_vocab(), target.tokenizer.backend.get_vocab()
        if mine != theirs:
            diff = sorted(set(mine.items()) ^ set(theirs.items()))[:3]
            raise ValueError(
                f"the draft model's tokenizer ({draft.tokenizer.vocab_size} tokens) is not the "
                f"target's ({target.tokenizer.vocab_size}): they differ at {diff}"
            )
        if cache_len > draft.config.context_length:
            raise ValueError(
                f"the engine's cache of {cache_len} tokens is longer than the draft model's "
                f"context length {draft.config.context_length}: lower max_len"
            )
        if draft.min_batch > rows:
            raise ValueError(
                f"the draft model's smallest batch {draft.min_batch} is more than the "
                f"engine's {rows} slots"
            )
        self.model, self.k, self.rows, self.cache_len = draft, k, rows, cache_len
        self.vocab = target.config.vocab_size
        # unsharded (checked below), so no data-parallel rounding
        self.chunk_rows = max(1, draft.min_batch)
        self.steps = SlotSteps(draft, rows, self.chunk_rows, cache_len)
        graph = self.steps.decode()[0]
        if not prefix_cache.addressed(graph):
            kinds = sorted({name.split(".")[-1] for name, _, _ in graph.cache.entries})
            raise ValueError(
                f"the draft model's cache ({', '.join(kinds)}) is not rows addressed by "
                "position on one device, so its rejected drafts could not be overwritten: "
                "compile the draft with a dense or int8 cache, unsharded"
            )
        self.cache = None

    def _prefill(self, live, need: int) -> None:
        """Prefill the draft cache with `live`'s known tokens up to position `need`."""
        ids = live.req.prompt_ids + live.ids
        while live.draft_pos < need:
            n, t, args = chunk_args(ids, live.draft_pos, need - live.draft_pos, live.slot,
                                    self.chunk_rows, self.rows, self.cache_len)  # fmt: skip
            args = (*args, pack_slots([None], self.chunk_rows))
            _, self.cache = self.steps.prefill(t)(self.model.weights, self.cache, *args)
            live.draft_pos += n

    def sync(self, running) -> None:
        """Bring every running request's draft cache to the positions the target's holds:
        all of a prompt mid-prefill, and a decoding request's tokens when it lags by more
        than one (`propose` feeds the one a step misses when every draft is kept)."""
        if self.cache is None:
            self.cache = self.steps.alloc()
        for live in running:
            need = live.known()
            if live.decoding and need - live.draft_pos <= 1:
                continue
            self._prefill(live, need)

    def propose(self, running, decoding) -> dict:
        """K greedy drafts {slot: [K tokens]} for each decoding request, in one call
        (`make_slot_draft`): each feeds its last token (at `last_pos`, not in the target's
        cache yet), after the one its draft cache lacks if any. Other slots write only
        where their own cache writes next."""
        b = self.rows
        queue, qlen = np.zeros((b, 2), np.int32), np.zeros((b,), np.int32)
        pos, live = np.zeros((b,), np.int32), np.zeros((b,), bool)
        for x in running:
            pos[x.slot] = x.draft_pos
        for x in decoding:
            ids = (x.req.prompt_ids + x.ids)[x.draft_pos : x.last_pos + 1]
            qlen[x.slot], live[x.slot] = len(ids), True
            queue[x.slot, : len(ids)] = ids
        steps = self.k - 1 + int(qlen.max())
        fn = self.steps.draft(self.k, steps)
        drafts, self.cache = fn(self.model.weights, self.cache, queue[:, : steps - self.k + 1],
                                qlen, pos, live)  # fmt: skip
        drafts = np.asarray(drafts)
        for x in decoding:
            x.draft_pos += int(qlen[x.slot]) - 1 + self.k
        # a token the target's vocabulary lacks (a draft with more embedding rows) would
        # be rejected anyway, as any id in range is
        return {x.slot: [int(t) if t < self.vocab else 0 for t in drafts[x.slot]] for x in decoding}

    def accepted(self, live, last_pos: int, n: int) -> None:
        """After verification kept `n` drafts of a request whose last token was at
        `last_pos`: the draft cache holds the positions up to the first rejected draft."""
        live.draft_pos = min(live.draft_pos, last_pos + n + 1)


def verify(engine, decoding: list, k: int) -> None:
    """One step of speculative decoding (`Engine._verify`): each request's K tokens
    drafted by the draft model or by prompt lookup are verified with the decode method
    (`make_slot_verify`). A greedy request keeps the drafts equal to its greedy tokens
    and one token past them; a sampling one what `speculative_sample` keeps and the
    token it draws."""
    b = engine._rows
    tokens = np.zeros((b, k + 1), np.int32)
    pos, steps, n_draft = (np.zeros((b,), np.int32) for _ in range(3))
    for x in engine._running:
        pos[x.slot] = x.prefilled
    if engine._draft is not None:
        drafts = engine._draft.propose(engine._running, decoding)
    else:
        drafts = {x.slot: prompt_lookup(x.req.prompt_ids + x.ids, k) for x in decoding}
    for x in decoding:
        d = drafts[x.slot]
        n_draft[x.slot] = len(d)
        tokens[x.slot] = [x.ids[-1], *d, *[d[-1] if d else x.ids[-1]] * (k - len(d))]
        pos[x.slot] = x.last_pos
        steps[x.slot] = len(x.ids)
    engine._ensure_sampling()
    fn = engine._steps.verify(k + 1)
    kept, after, best, engine._cache = fn(engine.compiled.weights, engine._cache_now(), tokens,
                                          pos, engine._sampling, steps, n_draft)  # fmt: skip
    kept, after, best = np.asarray(kept), np.asarray(after), np.asarray(best)
    for x in decoding:
        d, g, n = drafts[x.slot], best[x.slot], 0
        if x.req.sampling.temperature > 0:
            n, last = int(kept[x.slot]), int(after[x.slot])
        else:
            while n < len(d) and d[n] == g[n]:
                n += 1
            last = int(g[n])
        engine.metrics.add("drafted_tokens", len(d))
        engine.metrics.add("accepted_tokens", n)
        if engine._draft is not None:
            engine._draft.accepted(x, int(pos[x.slot]), n)
        for tok in [*d[:n], last]:
            if x not in engine._running:
                break  # it ended (a stop, its length) on an accepted token
            engine._emit(x, int(tok))
