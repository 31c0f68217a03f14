"""KV-cache generation: equals full recomputation, batching does not change answers, greedy matches transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llavaction_jax.config import preset_configs
from llavaction_jax.model import decode, llava, qwen2
from llavaction_jax.model.decode import GenerationConfig, select_token
from llavaction_jax.sharding import resolve_execution

CFG, EX = preset_configs("tiny")
EX = resolve_execution(EX)
GEN = GenerationConfig(max_new_tokens=6, eos_ids=(7,), pad_id=0)
generate = jax.jit(decode.generate, static_argnums=(1, 2, 3))  # the entry points' compile boundary


@pytest.fixture(scope="module")
def params():
    return llava.init(CFG, jax.random.key(1))


def sample(rng, length, frames=2):
    ids = rng.integers(10, CFG.text.vocab_size, size=length)
    ids[2] = -200
    return ids, rng.uniform(-1, 1, size=(frames, 3, 64, 64)).astype(np.float32)


def greedy_by_recompute(params, ids, pixels, steps):
    """Reference: run the full forward on the growing sequence and take the argmax at the end, every step."""
    out = []
    fwd = jax.jit(lambda i, x: llava.lm_logits(params, llava.forward(params, CFG, EX, i, x).hidden))
    for _ in range(steps):
        logits = fwd(jnp.asarray(ids)[None], jnp.asarray(pixels)[None])
        nxt = int(jnp.argmax(logits[0, -1]))
        out.append(nxt)
        if nxt in GEN.eos_ids:
            break
        ids = np.append(ids, nxt)
    return out


def test_cached_decoding_equals_recomputing_the_full_forward(params):
    rng = np.random.default_rng(0)
    ids, pixels = sample(rng, 9)
    tokens, n = generate(params, CFG, EX, GEN, jnp.asarray(ids)[None], jnp.asarray(pixels)[None], jnp.ones((1, 9), bool))
    ref = greedy_by_recompute(params, ids, pixels, GEN.max_new_tokens)
    assert list(np.asarray(tokens[0, : len(ref)])) == ref
    assert int(n[0]) == len(ref)


@pytest.mark.parametrize("impl", ["xla", "flash"])
def test_prefill_over_its_own_keys_equals_attending_the_whole_cache(params, impl):
    """prefill=True (T == S self-attention, what cuDNN and splash take) writes the same cache and gives the same
    hidden states as attending over the empty cache (S = T + room for new tokens)."""
    x = jax.random.normal(jax.random.key(2), (2, 12, CFG.text.hidden_size))
    cache = qwen2.init_cache(CFG.text, 2, 20)

    def run(prefill):
        return jax.jit(qwen2.forward_cached, static_argnames=("cfg", "attn_impl", "prefill"))(
            params["text"], x, jnp.zeros((2,), jnp.int32), cache, cfg=CFG.text, attn_impl=impl, prefill=prefill)

    (h_own, cache_own), (h_all, cache_all) = run(True), run(False)
    np.testing.assert_allclose(h_own, h_all, atol=1e-5, rtol=1e-5)
    for own, full in ((cache_own.k, cache_all.k), (cache_own.v, cache_all.v)):
        np.testing.assert_allclose(own, full, atol=1e-6)
    assert float(jnp.abs(cache_own.k[:, :, :12]).max()) > 0 and float(jnp.abs(cache_own.k[:, :, 12:]).max()) == 0


@pytest.fixture(scope="module")
def batch():
    """Three prompts of lengths 12, 7, 9, right-padded to 12."""
    rng = np.random.default_rng(1)
    samples = [sample(rng, n) for n in (12, 7, 9)]
    ids = np.zeros((3, 12), np.int64)
    mask = np.zeros((3, 12), bool)
    for i, (s, _) in enumerate(samples):
        ids[i, : len(s)], mask[i, : len(s)] = s, True
    return samples, ids, np.stack([p for _, p in samples]), mask


@pytest.fixture(scope="module")
def batched(params, batch):
    _, ids, pixels, mask = batch
    tokens, n = generate(params, CFG, EX, GEN, jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(mask))
    return np.asarray(tokens), np.asarray(n)


def test_batch_of_different_lengths_equals_batch_size_one(params, batch, batched):
    for i, (s, p) in enumerate(batch[0]):
        single, _ = generate(params, CFG, EX, GEN, jnp.asarray(s)[None], jnp.asarray(p)[None], jnp.ones((1, len(s)), bool))
        np.testing.assert_array_equal(batched[0][i], np.asarray(single[0]))


def swap_token_ids(params, a, b):
    """The same model with token ids a and b exchanged (their embedding rows and lm_head columns)."""
    text = dict(params["text"])
    perm = np.arange(CFG.text.vocab_size)
    perm[[a, b]] = [b, a]
    text["embed"] = text["embed"][perm]
    text["lm_head"] = text["lm_head"][:, perm]
    return dict(params, text=text), perm


def test_rows_stop_at_eos_and_pad_afterwards(params, batch, batched):
    """Relabel the token one row emits at step k as the EOS id: that row must stop there, the others go on."""
    _, ids, pixels, mask = batch
    free, n_free = batched
    eos, steps = GEN.eos_ids[0], GEN.max_new_tokens
    assert np.all(n_free == steps) and eos not in free  # without the relabelling, no row meets an EOS
    # a token that first appears in one row at a step k with tokens after it, and in no other row
    found = next(((r, k) for r in range(3) for k in range(1, steps - 1)
                  if free[r, k] not in free[r, :k] and free[r, k] not in np.delete(free, r, axis=0)
                  and np.any(free[r, k + 1:] != GEN.pad_id)), None)
    assert found is not None, free
    row, k = found
    crafted, perm = swap_token_ids(params, eos, int(free[row, k]))
    relabelled = np.where(ids == llava.IMAGE_TOKEN_INDEX, ids, perm[np.maximum(ids, 0)])
    tokens, n = generate(crafted, CFG, EX, GEN, jnp.asarray(relabelled), jnp.asarray(pixels), jnp.asarray(mask))
    tokens, n = np.asarray(tokens), np.asarray(n)
    expected = perm[free]
    np.testing.assert_array_equal(tokens[row, : k + 1], expected[row, : k + 1])  # up to and including the EOS
    assert tokens[row, k] == eos
    np.testing.assert_array_equal(tokens[row, k + 1:], GEN.pad_id)  # pad after it
    assert n[row] == k + 1 < steps
    others = [r for r in range(3) if r != row]
    np.testing.assert_array_equal(tokens[others], expected[others])  # the other rows run the whole budget
    np.testing.assert_array_equal(n[others], steps)


def test_greedy_takes_the_first_maximum():
    logits = jnp.array([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0]])
    np.testing.assert_array_equal(np.asarray(select_token(logits, GEN, None)), [1, 0])
    tied = jnp.array([[2.0, 2.0, 1.0]])
    assert int(select_token(tied, GEN, None)[0]) == 0  # first maximum, like torch.argmax


def test_top_p_keeps_only_the_nucleus():
    gen = GenerationConfig(temperature=1.0, top_p=0.5)
    logits = jnp.log(jnp.array([[0.6, 0.3, 0.1]]))
    draws = jax.vmap(lambda k: select_token(logits, gen, k))(jax.random.split(jax.random.key(0), 200))
    assert set(np.asarray(draws).ravel().tolist()) == {0}


def test_greedy_ids_equal_transformers_generate_for_text_only_qwen2():
    torch = pytest.importorskip("torch")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from llavaction_jax.convert.import_plan import torch_to_params
    from llavaction_jax.model import qwen2

    hf_cfg = Qwen2Config(vocab_size=CFG.text.vocab_size, hidden_size=CFG.text.hidden_size,
                         intermediate_size=CFG.text.intermediate_size, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    text = torch_to_params(state, CFG, expected={"text": qwen2.param_specs(CFG.text)})["text"]
    params = dict(llava.init(CFG, jax.random.key(0)), text=text)

    ids = np.random.default_rng(3).integers(10, CFG.text.vocab_size, size=(1, 8))
    gen = GenerationConfig(max_new_tokens=10, eos_ids=(CFG.text.vocab_size - 1,), pad_id=0)
    with torch.no_grad():
        ref = model.generate(torch.tensor(ids), max_new_tokens=10, do_sample=False,
                             eos_token_id=CFG.text.vocab_size - 1, pad_token_id=0)[0, 8:].numpy()
    tokens, n = generate(params, CFG, EX, gen, jnp.asarray(ids), None, jnp.ones((1, 8), bool))
    np.testing.assert_array_equal(np.asarray(tokens[0, : len(ref)]), ref)
