"""SmolLM2 (Llama architecture) against HF transformers loading the same GGUF.

Tolerance: fp32 logits agree within atol 2e-3 on logits of magnitude ~30 (the
two implementations differ only in float32 summation order; measured max abs
difference ~1.5e-4).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import PROMPTS, chunk_logits, hf_logits

LOGIT_ATOL = 2e-3


def test_config_from_gguf(smollm2):
    c = smollm2.config
    assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.head_dim) == (30, 576, 9, 3, 64)
    assert (c.ffn_dim, c.vocab_size, c.context_length) == (1536, 49152, 8192)
    assert c.tie_embeddings and c.rope_theta == 100000.0


def test_weights_match_hf_state_dict(smollm2, hf_smollm2):
    """The Q/K row permutation of llama.cpp's converter is undone exactly like HF's loader."""
    sd = hf_smollm2[0].state_dict()
    for i in (0, 17, 29):
        for ours, theirs in (
            ("wq", "q_proj"),
            ("wk", "k_proj"),
            ("wv", "v_proj"),
            ("wo", "o_proj"),
        ):
            got = np.asarray(smollm2.weights[f"layers.{i}.{ours}"])
            want = sd[f"model.layers.{i}.self_attn.{theirs}.weight"].numpy()
            np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(
        np.asarray(smollm2.weights["embed"]), sd["model.embed_tokens.weight"].numpy()
    )


def test_prefill_logits_match_hf(compiled_fp32, hf_smollm2):
    ids = compiled_fp32.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 3)
    logits = chunk_logits(compiled_fp32, ids, 256)
    want = hf_logits(hf_smollm2[0], ids)
    np.testing.assert_allclose(np.asarray(logits), want, atol=LOGIT_ATOL, rtol=0)


def test_score_matches_hf_log_softmax(compiled_fp32, hf_smollm2):
    """score() runs through the cache in chunks (here 16 tokens) and matches a full HF forward."""
    import torch

    text = "Paris is the capital and most populous city of France. " * 4
    ids = compiled_fp32.tokenizer.encode(text)
    got = compiled_fp32.score(text, chunk_size=16)
    logits = torch.tensor(hf_logits(hf_smollm2[0], ids))
    want = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()
    assert got.shape == (len(ids) - 1,)
    np.testing.assert_allclose(got, want, atol=LOGIT_ATOL, rtol=0)


@pytest.mark.slow
def test_greedy_32_tokens_identical_to_hf(compiled_fp32, hf_smollm2):

    outs = compiled_fp32.generate(PROMPTS[:4], max_new_tokens=32, ignore_eos=True)
    for prompt, out in zip(PROMPTS[:4], outs, strict=True):
        assert out.token_ids == hf_greedy(hf_smollm2[0], out.prompt_token_ids, 32), prompt


def hf_greedy(model, ids, n):
    """Plain greedy decoding with HF's KV cache, no EOS handling (like ignore_eos)."""
    import torch

    out, past, inp = [], None, torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            res = model(inp, past_key_values=past, use_cache=True)
            past = res.past_key_values
            nxt = int(res.logits[0, -1].argmax())
            out.append(nxt)
            inp = torch.tensor([[nxt]])
    return out
