"""KV-cache generation: equals full recomputation, batching does not change answers, greedy matches transformers."""

import dataclasses

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
init = jax.jit(llava.init, static_argnums=0)  # one program for every test's parameters (rbg keys compile fast)


@pytest.fixture(scope="module")
def params():
    return init(CFG, jax.random.key(1, impl="rbg"))


def sample(rng, length, frames=2):
    ids = rng.integers(10, CFG.text.vocab_size, size=length)
    ids[2] = -200
    return ids, rng.uniform(-1, 1, size=(frames, 3, 64, 64)).astype(np.float32)


def greedy_by_recompute(params, ids, pixels, steps):
    """Reference: run the full forward on the growing sequence and take the argmax at its last token, every step.
    The sequence is held in a buffer of its final length (one program for every step): the positions after its
    last token come later, so causal attention keeps them out of that token's logits."""
    out = []
    fwd = jax.jit(lambda i, x: llava.lm_logits(params, llava.forward(params, CFG, EX, i, x).hidden))
    buffer = np.zeros(len(ids) + steps, ids.dtype)
    buffer[:len(ids)] = ids
    for n in range(len(ids), len(ids) + steps):
        logits = fwd(jnp.asarray(buffer)[None], jnp.asarray(pixels)[None])
        last = n - 1 + CFG.tokens_per_video(len(pixels)) - 1  # the -200 became the video's tokens
        nxt = int(jnp.argmax(logits[0, last]))
        out.append(nxt)
        if nxt in GEN.eos_ids:
            break
        buffer[n] = nxt
    return out


def test_cached_decoding_equals_recomputing_the_full_forward(params):
    rng = np.random.default_rng(0)
    ids, pixels = sample(rng, 9)
    tokens, n = generate(params, CFG, EX, GEN, jnp.asarray(ids)[None], jnp.asarray(pixels)[None], jnp.ones((1, 9), bool))
    ref = greedy_by_recompute(params, ids, pixels, GEN.max_new_tokens)
    assert list(np.asarray(tokens[0, : len(ref)])) == ref
    assert int(n[0]) == len(ref)


def test_prefill_in_the_fused_kernels_form_equals_xla_attention(params):
    """The prefill attends each prompt over its own keys (T == S, the form cuDNN and splash take): with the flash
    kernel it writes the same cache and gives the same last hidden states as with plain XLA attention."""
    rng = np.random.default_rng(3)
    ids, pixels = sample(rng, 9)
    args = (jnp.asarray(ids)[None], jnp.asarray(pixels)[None], jnp.ones((1, 9), bool), 4)
    flash = resolve_execution(dataclasses.replace(preset_configs("tiny")[1], attention="flash"))
    assert EX.attention != flash.attention
    run = jax.jit(decode.prefill, static_argnums=(1, 2, 6))
    ref, got = run(params, CFG, EX, *args), run(params, CFG, flash, *args)
    np.testing.assert_allclose(got.last, ref.last, atol=1e-5, rtol=1e-5)
    for a, b in ((got.cache.k, ref.cache.k), (got.cache.v, ref.cache.v)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert float(jnp.abs(ref.cache.k).max()) > 0


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
    params = dict(init(CFG, jax.random.key(0, impl="rbg")), text=text)

    ids = np.random.default_rng(3).integers(10, CFG.text.vocab_size, size=(1, 8))
    gen = GenerationConfig(max_new_tokens=10, eos_ids=(CFG.text.vocab_size - 1,), pad_id=0)
    with torch.no_grad():
        ref = model.generate(torch.tensor(ids), max_new_tokens=10, do_sample=False,
                             eos_token_id=CFG.text.vocab_size - 1, pad_token_id=0)[0, 8:].numpy()
    tokens, n = generate(params, CFG, EX, gen, jnp.asarray(ids), None, jnp.ones((1, 8), bool))
    np.testing.assert_array_equal(np.asarray(tokens[0, : len(ref)]), ref)


def test_the_decode_loop_writes_the_cache_in_place(params):
    """The decode program holds one cache: its temporaries stay below the cache's bytes (a copy per token, or the
    cache threaded through the layer scan as an input and a new stack out, would need a second one), and the
    donated cache is the output's."""
    gen = GenerationConfig(max_new_tokens=5, eos_ids=(7,), pad_id=0)
    t, b, s = CFG.text, 2, 2048  # long enough that the cache outweighs the fixed temporaries (logits, weights)
    shape = (t.num_layers, b, t.num_kv_heads, s, t.head_dim)
    cache = decode.KVCache(jnp.zeros(shape), jnp.zeros(shape))
    state = decode.DecodeState(jnp.int32(1), jnp.zeros((b, gen.max_new_tokens), jnp.int32), cache,
                               jnp.zeros((b,), bool), jax.random.key(0))
    loop = jax.jit(lambda p, st, lengths: decode.decode_loop(p, CFG, gen, st, lengths), donate_argnums=1)
    memory = loop.lower(params, state, jnp.full((b,), 100, jnp.int32)).compile().memory_analysis()
    cache_bytes = 2 * cache.k.nbytes
    assert memory.temp_size_in_bytes < cache_bytes, (memory.temp_size_in_bytes, cache_bytes)
    assert memory.alias_size_in_bytes >= cache_bytes


def test_one_prefill_answers_both_ways_with_the_answers_of_each(params, monkeypatch):
    """`--mode both`: the video and the prompt go through the model once, generation and option scoring read that
    one cache, and each answer equals the one its own program gives."""
    rng = np.random.default_rng(4)
    samples = [sample(rng, n) for n in (11, 8)]
    ids, mask = np.zeros((2, 11), np.int64), np.zeros((2, 11), bool)
    for i, (s, _) in enumerate(samples):
        ids[i, : len(s)], mask[i, : len(s)] = s, True
    pixels = np.stack([p for _, p in samples])
    option_ids = rng.integers(10, CFG.text.vocab_size, size=(2, 3, 4)).astype(np.int32)
    option_mask = np.arange(4)[None, None] < rng.integers(1, 5, size=(2, 3, 1))
    inputs = (jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(mask))
    options = dict(option_ids=jnp.asarray(option_ids), option_mask=jnp.asarray(option_mask))
    both = jax.jit(lambda p, *x: decode.answer(p, CFG, EX, *x, gen=GEN, **options))
    scored = jax.jit(lambda p, *x: decode.answer(p, CFG, EX, *x, **options))

    calls, embed_inputs = [], llava.embed_inputs

    def counted(*args, **kwargs):
        calls.append(1)
        return embed_inputs(*args, **kwargs)

    monkeypatch.setattr(llava, "embed_inputs", counted)
    out = both(params, *inputs)
    assert len(calls) == 1  # traced once: one vision pass, one prefill
    monkeypatch.undo()

    tokens, num = generate(params, CFG, EX, GEN, *inputs)
    np.testing.assert_array_equal(np.asarray(out["generate"]["tokens"]), np.asarray(tokens))
    np.testing.assert_array_equal(np.asarray(out["generate"]["num_tokens"]), np.asarray(num))
    alone = scored(params, *inputs)["score"]
    for key in ("token_logprobs", "logprob_sum", "num_tokens"):
        np.testing.assert_array_equal(np.asarray(out["score"][key]), np.asarray(alone[key]))


def test_the_cache_is_sharded_over_the_batch_and_the_kv_heads():
    from jax.sharding import NamedSharding, PartitionSpec as P

    from llavaction_jax.sharding import make_mesh, use_mesh

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    ex = resolve_execution(preset_configs("tiny")[1], mesh)
    params = init(CFG, jax.random.key(0, impl="rbg"))
    ids = jnp.asarray(np.tile(sample(np.random.default_rng(5), 9)[0], (4, 1)))
    pixels = jnp.zeros((4, 2, 3, 64, 64))
    prefill = jax.jit(lambda p, i, x: decode.prefill(p, CFG, ex, i, x, jnp.ones(i.shape, bool), 4).cache)
    with use_mesh(mesh):
        cache = prefill(params, ids, pixels)
    assert cache.k.shape == (2, 4, 2, 9 - 1 + CFG.tokens_per_video(2) + 4, 32)
    want = NamedSharding(mesh, P(None, ("data", "fsdp"), "tensor", None, None))
    assert cache.k.sharding.is_equivalent_to(want, 5) and cache.v.sharding.is_equivalent_to(want, 5)
