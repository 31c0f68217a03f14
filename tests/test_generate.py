"""KV-cache generation: equals full recomputation, batching does not change answers, greedy matches transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llavaction_jax.config import preset_configs
from llavaction_jax.model import decode, llava
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


def test_batch_of_different_lengths_equals_batch_size_one(params):
    rng = np.random.default_rng(1)
    samples = [sample(rng, n) for n in (12, 7, 9)]
    width = 12
    ids = np.zeros((3, width), np.int64)
    mask = np.zeros((3, width), bool)
    for i, (s, _) in enumerate(samples):
        ids[i, : len(s)], mask[i, : len(s)] = s, True
    pixels = np.stack([p for _, p in samples])
    batched, _ = generate(params, CFG, EX, GEN, jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(mask))
    for i, (s, p) in enumerate(samples):
        single, _ = generate(params, CFG, EX, GEN, jnp.asarray(s)[None], jnp.asarray(p)[None], jnp.ones((1, len(s)), bool))
        np.testing.assert_array_equal(np.asarray(batched[i]), np.asarray(single[0]))


def test_rows_stop_at_eos_and_pad_afterwards():
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
    params = jax.jit(llava.init, static_argnums=0)(CFG, jax.random.key(0, impl="rbg"))
    ids = jnp.asarray(np.tile(sample(np.random.default_rng(5), 9)[0], (4, 1)))
    pixels = jnp.zeros((4, 2, 3, 64, 64))
    prefill = jax.jit(lambda p, i, x: decode.prefill(p, CFG, ex, i, x, jnp.ones(i.shape, bool), 4).cache)
    with use_mesh(mesh):
        cache = prefill(params, ids, pixels)
    assert cache.k.shape == (2, 4, 2, 9 - 1 + CFG.tokens_per_video(2) + 4, 32)
    want = NamedSharding(mesh, P(None, ("data", "fsdp"), "tensor", None, None))
    assert cache.k.sharding.is_equivalent_to(want, 5) and cache.v.sharding.is_equivalent_to(want, 5)
