"""Benchmark: the decode loop's time per generated token with a long KV cache against a short one (same model, same
run), and the decode program's memory: the cache written in place, not copied per token.

The model is LLaVAction-0.5B's decoder (the Qwen2-0.5B sizes of config.QWEN2_SIZES: 24 layers, 14 heads, 2 KV
heads, vocabulary 151936), random weights, fp32 on CPU. `model.decode.decode_loop` generates `--tokens` tokens per
row, each row starting at `cache - tokens`, so the last token attends over the whole cache; the cache is filled
with random keys and values first, as a prefill leaves it (the prefill itself is not timed). The loop is compiled
once per cache length with the state donated, as `generate` runs it inside its program.

Reports the time per token at each length and their ratio (target: at most 1.3x from 2k to 16k tokens), and from
`compiled.memory_analysis()` the program's temporaries: a copy of the cache per token (or the cache threaded through
the layer scan as an input and a new stack out) would make them grow with the cache; written in place, they grow by
one layer's slice at most (the layer's keys and values its attention reads) while the cache grows 8x. The rest of
the temporaries is the same at both lengths (mostly one layer's weights, which the layer scan slices out).

    python -m llavaction_jax.bench.decode [--short 2048] [--long 16384] [--tokens 17] [--batch 1] [--size 0.5b]
        [--repeats 3] [--no-write]
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp

from llavaction_jax.bench.common import median, record
from llavaction_jax.config import ModelConfig, TextConfig, text_size
from llavaction_jax.model import decode, qwen2
from llavaction_jax.model.params import init_params


def decode_program(cfg: ModelConfig, gen: decode.GenerationConfig):
    return jax.jit(lambda params, state, lengths: decode.decode_loop(params, cfg, gen, state, lengths),
                   donate_argnums=1)


def filled_state(cfg: ModelConfig, gen: decode.GenerationConfig, batch: int, cache_len: int,
                 key: jax.Array) -> decode.DecodeState:
    """A cache of `cache_len` positions full of random keys and values, one first token per row."""
    t = cfg.text
    shape = (t.num_layers, batch, t.num_kv_heads, cache_len, t.head_dim)
    k1, k2 = jax.random.split(key)
    cache = decode.KVCache(jax.random.normal(k1, shape), jax.random.normal(k2, shape))
    tokens = jnp.full((batch, gen.max_new_tokens), gen.pad_id, jnp.int32).at[:, 0].set(1)
    return decode.DecodeState(jnp.int32(1), tokens, cache, jnp.zeros((batch,), bool), jax.random.key(0))


def measure(params, cfg: ModelConfig, gen: decode.GenerationConfig, batch: int, cache_len: int, repeats: int) -> dict:
    """Seconds per generated token (median of `repeats` loops) and the compiled program's memory."""
    program = decode_program(cfg, gen)
    lengths = jnp.full((batch,), cache_len - gen.max_new_tokens + 1, jnp.int32)  # the last token fills the cache
    state = filled_state(cfg, gen, batch, cache_len, jax.random.key(cache_len))
    t0 = time.perf_counter()
    compiled = program.lower(params, state, lengths).compile()
    compile_s = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    cache_bytes = state.cache.k.nbytes + state.cache.v.nbytes
    state = jax.block_until_ready(compiled(params, state, lengths))  # warm-up
    times = []
    for _ in range(repeats):
        state = decode.DecodeState(jnp.int32(1), state.tokens, state.cache, state.done, state.key)
        t0 = time.perf_counter()
        state = jax.block_until_ready(compiled(params, state, lengths))
        times.append(time.perf_counter() - t0)
    assert int(state.step) == gen.max_new_tokens  # every token was generated
    return {"per_token_s": median(times) / (gen.max_new_tokens - 1), "compile_s": compile_s,
            "cache_bytes": cache_bytes, "temp_bytes": memory.temp_size_in_bytes,
            "alias_bytes": memory.alias_size_in_bytes}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", type=int, default=2048, help="the short cache, in tokens")
    parser.add_argument("--long", type=int, default=16384, help="the long cache, in tokens")
    parser.add_argument("--tokens", type=int, default=17, help="tokens generated per loop (the first is given)")
    parser.add_argument("--batch", type=int, default=1, help="rows decoded together")
    parser.add_argument("--size", default="0.5b", help="Qwen2 size of config.QWEN2_SIZES")
    parser.add_argument("--repeats", type=int, default=3, help="timed loops per length (median)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = parser.parse_args(argv)

    cfg = ModelConfig(text=TextConfig(**text_size(args.size)), vision_supervision=None, action_types=())
    params = {"text": jax.jit(lambda k: init_params(qwen2.param_specs(cfg.text), k))(jax.random.key(0, impl="rbg"))}
    gen = decode.GenerationConfig(max_new_tokens=args.tokens, eos_ids=(-1,), pad_id=0)  # never stops early
    results = {n: measure(params, cfg, gen, args.batch, n, args.repeats) for n in (args.short, args.long)}
    short, long = results[args.short], results[args.long]
    t = cfg.text
    lines = [f"- model: Qwen2-{args.size} decoder ({t.num_layers} layers, {t.num_heads} heads, {t.num_kv_heads} KV "
             f"heads, vocabulary {t.vocab_size}), random weights, fp32; batch {args.batch}, {args.tokens - 1} "
             f"generated tokens per loop, the last at the end of the cache"]
    for n, r in results.items():
        lines.append(f"- cache {n} tokens ({r['cache_bytes'] / 2**20:.0f} MiB): {1e3 * r['per_token_s']:.1f} ms per "
                     f"token; the decode program's temporaries {r['temp_bytes'] / 2**20:.1f} MiB "
                     f"({r['temp_bytes'] / r['cache_bytes']:.2f} x the cache), the cache donated "
                     f"({r['alias_bytes'] / r['cache_bytes']:.2f} x aliased); compile {r['compile_s']:.1f} s")
    ratio = long["per_token_s"] / short["per_token_s"]
    growth = (long["temp_bytes"] - short["temp_bytes"]) / (long["cache_bytes"] - short["cache_bytes"])
    lines.append(f"- time per token, {args.long} / {args.short} tokens: **{ratio:.2f}x** (target <= 1.3x); the "
                 f"temporaries grow by {growth:.3f} x the cache's growth (a second cache: >= 1; one layer's slice: "
                 f"{1 / cfg.text.num_layers:.3f})")
    cmd = "python -m llavaction_jax.bench.decode " + " ".join(argv if argv is not None else sys.argv[1:])
    record("decode: time per token against the KV cache's length", cmd.strip(), lines, write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
