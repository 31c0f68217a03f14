"""Attention implementations against the materialised `xla` reference: values and gradients, masks, GQA, decode,
the whole Qwen2 forward, compiled memory, and the accelerator-only kernels' errors and mask translations."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llavaction_jax.config import ConfigError, ExecutionConfig, load_preset
from llavaction_jax.model import attention as attention_module
from llavaction_jax.model import qwen2
from llavaction_jax.model.attention import (attention, auto_impl, cudnn_attention, dense_mask, splash_attention,
                                            xla_attention)
from llavaction_jax.model import flash_attention as flash_module
from llavaction_jax.model.flash_attention import balanced_blocks, default_block, flash_attention
from llavaction_jax.model.params import init_params

TOL = 1e-5


def make_qkv(seed, b, t, s, n, kv, d=16):
    r = np.random.default_rng(seed)
    shapes = ((b, t, n, d), (b, s, kv, d), (b, s, kv, d))
    q, k, v = (jnp.asarray(r.standard_normal(shape), jnp.float32) for shape in shapes)
    weight = jnp.asarray(r.standard_normal((b, t, n, d)), jnp.float32)  # makes the loss below a random function
    return q, k, v, weight


def arange_pos(b, length, start=0):
    return jnp.broadcast_to(jnp.arange(length), (b, length)) + jnp.asarray(start).reshape(-1, 1)


def prefix_valid(lengths, s):
    return jnp.arange(s)[None] < jnp.asarray(lengths)[:, None]


def mask_args(b, t, s, *, causal=True, lengths=None, q_start=0, padding_at_zero=False):
    """Mask arguments as qwen2 builds them: positions == indices (queries offset by q_start, a chunk written into a
    longer KV cache), real keys a prefix of `lengths`; padding_at_zero puts padding at position 0 (llava.splice)."""
    args = dict(causal=causal)
    if causal:
        args.update(q_pos=arange_pos(b, t, q_start), k_pos=arange_pos(b, s))
    if lengths is not None:
        args["k_valid"] = prefix_valid(lengths, s)
    if padding_at_zero:
        args["q_pos"] = jnp.where(prefix_valid(lengths, t), args["q_pos"], 0)
        args["k_pos"] = jnp.where(args["k_valid"], args["k_pos"], 0)
    return args


def seen_rows(mask, b, t):
    """(B, T, 1, 1) float: 1 on rows with at least one visible key (where implementations must agree)."""
    seen = jnp.ones((b, t), bool) if mask is None else mask[:, 0].any(-1)
    return seen[:, :, None, None].astype(jnp.float32)


def reference_mask(args):
    return dense_mask(args.get("q_pos"), args.get("k_pos"), args.get("k_valid"), args["causal"])


def assert_matches_xla(fn, q, k, v, weight, mask, rows=None, tol=TOL):
    """fn(q, k, v) equals the xla reference on `rows` (default: every row that sees a key), values and grads."""
    rows = seen_rows(mask, *q.shape[:2]) if rows is None else rows

    def ref(q, k, v):
        return xla_attention(q, k, v, mask)

    def value_and_grads(f, q, k, v, weight, rows):  # arrays as arguments: closed over, XLA would constant-fold
        out, vjp = jax.vjp(f, q, k, v)
        return out * rows, vjp(weight * rows)  # the grads of sum(out * weight * rows), a random scalar function

    (got, got_grads), (want, want_grads) = (jax.jit(value_and_grads, static_argnums=0)(f, q, k, v, weight, rows)
                                            for f in (fn, ref))
    np.testing.assert_allclose(got, want, atol=tol, rtol=tol)
    for got, want, name in zip(got_grads, want_grads, "qkv"):
        np.testing.assert_allclose(got, want, atol=tol, rtol=tol, err_msg=f"d{name}")


CASES = {  # name: ((B, T, S, N, K), (block_q, block_k), mask_args keywords)
    "causal_right_padding": ((2, 37, 37, 4, 2), (8, 16), dict(lengths=[30, 37])),
    "llava_padding_positions": ((2, 33, 33, 2, 2), (16, 8), dict(lengths=[12, 33], padding_at_zero=True)),
    "non_causal_siglip": ((2, 29, 29, 2, 2), (16, 8), dict(causal=False)),
    "non_causal_padding": ((2, 20, 20, 4, 1), (8, 8), dict(causal=False, lengths=[20, 7])),
    "gqa_block_multiple": ((1, 64, 64, 4, 2), (16, 16), dict()),
    "decode_step": ((2, 1, 40, 4, 2), (512, 16), dict(q_start=[5, 39])),
    "prefill_into_cache": ((2, 8, 40, 4, 2), (4, 16), dict(q_start=[0, 20])),
    "row_without_keys": ((2, 9, 9, 2, 1), (4, 4), dict(lengths=[0, 5])),
}


@pytest.mark.parametrize("name", CASES)
def test_flash_matches_xla(name):
    (b, t, s, n, kv), (block_q, block_k), mask_kw = CASES[name]
    q, k, v, weight = make_qkv(len(name), b, t, s, n, kv)
    args = mask_args(b, t, s, **mask_kw)

    def flash(q, k, v):
        return flash_attention(q, k, v, **args, block_q=block_q, block_k=block_k)

    assert_matches_xla(flash, q, k, v, weight, reference_mask(args))


@pytest.mark.parametrize("name", CASES)
def test_per_head_matches_xla(name):
    """Values and gradients of every case (GQA, padding, causal, decode, a row without keys), one (batch row, KV head)
    at a time."""
    (b, t, s, n, kv), _, mask_kw = CASES[name]
    q, k, v, weight = make_qkv(len(name) + 1, b, t, s, n, kv)
    args = mask_args(b, t, s, **mask_kw)
    mask = reference_mask(args)
    every_row = jnp.ones((b, t, 1, 1), jnp.float32)  # materialised like xla: rows without keys agree too

    def per_head(q, k, v):
        return attention(q, k, v, **args, impl="per_head")

    assert_matches_xla(per_head, q, k, v, weight, mask, rows=every_row)


def test_rows_without_keys_are_zero_and_finite():
    (b, t, s, n, kv), _, mask_kw = CASES["row_without_keys"]
    q, k, v, _ = make_qkv(0, b, t, s, n, kv)
    args = mask_args(b, t, s, **mask_kw)

    def flash(q, k, v):
        return flash_attention(q, k, v, **args, block_q=4, block_k=4)

    @jax.jit
    def out_and_grads(q, k, v):
        out, vjp = jax.vjp(flash, q, k, v)
        return out, vjp(jnp.ones_like(out))

    out, grads = out_and_grads(q, k, v)
    np.testing.assert_array_equal(out[0], 0.0)  # batch row 0 has no real key
    assert np.isfinite(out).all() and all(np.isfinite(g).all() for g in grads)


def test_attention_dispatch_flash_and_auto_on_cpu():
    q, k, v, _ = make_qkv(1, 2, 24, 24, 4, 2)
    args = mask_args(2, 24, 24, lengths=[20, 24])
    want = attention(q, k, v, **args, impl="xla")
    rows = seen_rows(reference_mask(args), 2, 24)
    for impl in ("flash", "per_head", "auto"):
        np.testing.assert_allclose(attention(q, k, v, **args, impl=impl) * rows, want * rows, atol=TOL, rtol=TOL)
    long_q = jax.ShapeDtypeStruct((1, 4096, 4, 16), jnp.float32)
    assert auto_impl(q, k, causal=True) == "xla" and auto_impl(long_q, long_q, causal=True) == "flash"
    prefill = jax.ShapeDtypeStruct((1, 1669, 8, 64), jnp.float32)  # tiled wins early on CPU (bench.forward)
    assert auto_impl(prefill, prefill, causal=True, platform="cpu") == "flash"
    with pytest.raises(ValueError, match="not available"):
        attention(q, k, v, impl="bogus")


def test_balanced_blocks_cover_the_sequence_with_little_padding():
    for length in (1, 7, 8, 37, 129, 729, 1669, 13441):
        for block in (4, 16, 128, 256, 512):
            count, size = balanced_blocks(length, block)
            assert size <= max(block, 1) and count * size >= length, (length, block)
            assert count == -(-length // block) or length <= block  # no more blocks than the plain split
            assert count * size - length < 8 * count, (length, block)  # padding: under 8 per block
    assert balanced_blocks(729, 256) == (3, 248) and balanced_blocks(1669, 256) == (7, 240)


def test_cpu_tile_edge_follows_the_cache_budget():
    assert default_block(1, 8, "cpu") == 256 and default_block(8, 4, "cpu") == 128 and default_block(1, 1, "cpu") == 512
    for batch, heads in ((1, 1), (1, 8), (8, 4), (64, 28)):
        edge = default_block(batch, heads, "cpu")
        assert edge in (128, 256, 512)
        assert edge == 128 or batch * heads * edge**2 * 4 <= flash_module.CPU_TILE_BYTES
    for platform in ("gpu", "auto"):  # accelerators, and a config no entry point resolved
        assert default_block(64, 28, platform) == flash_module.DEFAULT_BLOCK_ACCELERATOR


def test_auto_choice_per_platform():
    def shapes(t, s, d=128, dtype=jnp.bfloat16):
        return jax.ShapeDtypeStruct((1, t, 28, d), dtype), jax.ShapeDtypeStruct((1, s, 4, d), dtype)

    assert auto_impl(*shapes(13824, 13824), causal=True, platform="gpu") == "cudnn"  # training
    assert auto_impl(*shapes(1, 16384), causal=True, platform="gpu") == "cudnn"  # decode step
    assert auto_impl(*shapes(4096, 16384), causal=True, platform="gpu") == "flash"  # prefill into a longer cache
    # cuDNN is half precision only
    assert auto_impl(*shapes(13824, 13824, dtype=jnp.float32), causal=True, platform="gpu") == "flash"
    assert auto_impl(*shapes(13824, 13824), causal=True, platform="tpu") == "splash"
    assert auto_impl(*shapes(1, 16384), causal=True, platform="tpu") == "xla"
    assert auto_impl(*shapes(729, 729, d=72), causal=False, platform="tpu") == "splash"  # SigLIP: head dim padded
    assert auto_impl(*shapes(729, 729, d=72), causal=False, platform="gpu") == "cudnn"  # 729 padded to 730
    # unresolved configs never pick a hardware kernel; CPU picks flash from 256 x 256 scores
    assert auto_impl(*shapes(13824, 13824), causal=True, platform="auto") == "flash"
    assert auto_impl(*shapes(512, 512), causal=True, platform="auto") == "xla"
    assert auto_impl(*shapes(512, 512), causal=True, platform="cpu") == "flash"
    # CPU, non-causal self-attention: one (batch row, KV head) at a time while a step's scores stay small (SigLIP's
    # 729 patches, one query head per KV head: 2.1 MB), tiled beyond; never off the CPU
    siglip = jax.ShapeDtypeStruct((8, 729, 4, 64), jnp.float32)
    assert auto_impl(siglip, siglip, causal=False, platform="cpu") == "per_head"
    assert auto_impl(siglip, siglip, causal=False, platform="auto") == "xla"
    assert auto_impl(*shapes(729, 729), causal=False, platform="cpu") == "flash"  # 7 query heads a step: 14.9 MB
    assert auto_impl(*shapes(4096, 4096), causal=False, platform="cpu") == "flash"
    assert auto_impl(*shapes(16, 16), causal=False, platform="cpu") == "xla"
    # CPU, short self-attention in a batch whose scores at once reach 2 MiB (the demo's training step: 16 x 216
    # tokens, 4 heads, 11.4 MiB; its SigLIP: 64 frames x 64 patches, 4 MiB): per_head, causal or not; xla below
    def small(b, t, heads, kv):
        return jax.ShapeDtypeStruct((b, t, heads, 32), jnp.float32), jax.ShapeDtypeStruct((b, t, kv, 32), jnp.float32)

    assert auto_impl(*small(16, 216, 4, 2), causal=True, platform="cpu") == "per_head"
    assert auto_impl(*small(64, 64, 4, 4), causal=False, platform="cpu") == "per_head"
    assert auto_impl(*small(2, 216, 4, 2), causal=True, platform="cpu") == "xla"  # 1.4 MiB
    assert auto_impl(*small(8, 64, 4, 4), causal=False, platform="cpu") == "xla"  # 0.5 MiB
    assert auto_impl(*small(16, 216, 4, 2), causal=True, platform="auto") == "xla"
    assert auto_impl(small(16, 1, 4, 2)[0], small(16, 216, 4, 2)[1], causal=True, platform="cpu") == "xla"  # decode
    # per_head loops over batch rows and heads: never where a mesh of several devices splits them
    with jax.set_mesh(jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])):
        assert auto_impl(*small(16, 216, 4, 2), causal=True, platform="cpu") == "xla"
        assert auto_impl(siglip, siglip, causal=False, platform="cpu") == "flash"
    with jax.set_mesh(jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])):
        assert auto_impl(*small(16, 216, 4, 2), causal=True, platform="cpu") == "per_head"


def test_qwen2_forward_flash_equals_xla(monkeypatch):
    # small blocks so the 45-token sequence spans several tiles (and is not a block multiple)
    monkeypatch.setattr(attention_module, "flash_attention", functools.partial(flash_attention, block_q=16, block_k=8))
    cfg = load_preset("tiny").text
    params = init_params(qwen2.param_specs(cfg), jax.random.key(0))
    # LeCun-normal init gives O(1) attention logits, sharp enough that a wrong mask would show.
    b, t = 2, 45
    valid = prefix_valid([45, 31], t)
    positions = jnp.where(valid, arange_pos(b, t), 0)
    x = jax.random.normal(jax.random.key(1), (b, t, cfg.hidden_size))
    run = jax.jit(qwen2.forward, static_argnames=("cfg", "attn_impl"))
    want, _ = run(params, x, positions, valid, cfg=cfg, attn_impl="xla")
    got, _ = run(params, x, positions, valid, cfg=cfg, attn_impl="flash")
    np.testing.assert_allclose(got, want, atol=TOL, rtol=TOL)


def test_flash_compiled_memory_is_far_below_xla():
    b, t, n, kv, d = 1, 4096, 4, 2, 64
    q = jax.ShapeDtypeStruct((b, t, n, d), jnp.float32)
    k = jax.ShapeDtypeStruct((b, t, kv, d), jnp.float32)
    pos, valid = jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b, t), bool)
    temp = {}
    for impl in ("xla", "flash"):
        def loss(q, k, v, pos, valid, impl=impl):
            return attention(q, k, v, q_pos=pos, k_pos=pos, k_valid=valid, causal=True, impl=impl).sum()

        analysis = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, k, pos, valid).compile().memory_analysis()
        if analysis is None:
            pytest.skip("no compiled memory analysis on this backend")
        temp[impl] = analysis.temp_size_in_bytes
    scores = b * n * t * t * 4  # one materialised fp32 score matrix: 256 MiB
    assert temp["xla"] >= scores and temp["flash"] * 10 < temp["xla"], temp


def test_accelerator_kernels_raise_clear_errors_off_their_platform():
    q, k, v, _ = make_qkv(2, 1, 8, 8, 2, 2)
    for platform in ("cpu", "auto"):
        with pytest.raises(ValueError, match="'cudnn' cannot run here: it needs an NVIDIA GPU"):
            attention(q, k, v, causal=True, impl="cudnn", platform=platform)
        with pytest.raises(ValueError, match="'splash' cannot run here: it needs a TPU"):
            attention(q, k, v, causal=True, impl="splash", platform=platform)


CUDNN_CASES = {  # the layouts cuDNN's is_causal + key_value_seq_lengths can express: ((B, T, S), mask_args keywords)
    "causal_right_padding": ((2, 37, 37), dict(lengths=[30, 37])),  # odd: padded to 38 (cuDNN trains even only)
    "non_causal_padding": ((2, 20, 20), dict(causal=False, lengths=[20, 7])),
    "siglip_odd_no_mask": ((2, 29, 29), dict(causal=False)),  # as 729 patches: one masked key added
    "decode_step": ((2, 1, 40), dict(q_start=[5, 39])),
}


@pytest.mark.parametrize("name", CUDNN_CASES)
def test_cudnn_mask_translation(name):
    """The cuDNN call with implementation="xla": checks our mask translation anywhere (not cuDNN itself)."""
    (b, t, s), mask_kw = CUDNN_CASES[name]
    q, k, v, weight = make_qkv(3, b, t, s, 4, 2)
    args = mask_args(b, t, s, **mask_kw)
    mask = reference_mask(args)
    real = seen_rows(mask, b, t)
    if args["causal"] and "k_valid" in args:  # padding queries may differ (index-based causal mask): compare real ones
        real = real * args["k_valid"][:, :, None, None]

    def fn(q, k, v):
        return cudnn_attention(q, k, v, q_pos=args.get("q_pos"), k_valid=args.get("k_valid"), causal=args["causal"],
                               implementation="xla")

    assert_matches_xla(fn, q, k, v, weight, mask, rows=real)


def test_cudnn_rejects_prefill_into_longer_cache():
    q, k, v, _ = make_qkv(4, 1, 8, 40, 2, 2)
    with pytest.raises(ValueError, match="not expressible"):
        cudnn_attention(q, k, v, q_pos=arange_pos(1, 8), causal=True, implementation="xla")


def test_splash_wrapper_in_interpreter():
    """Splash in the Pallas interpreter: our padding, segment ids, GQA layout and scaling against xla."""
    b, t, n, kv = 2, 200, 4, 2  # 200 is padded to 256 inside
    q, k, v, weight = make_qkv(5, b, t, t, n, kv, d=32)
    args = mask_args(b, t, t, lengths=[150, 200])
    valid = args["k_valid"]

    def fn(q, k, v):
        return splash_attention(q, k, v, k_valid=valid, causal=True, interpret=True)

    real_rows = valid[:, :, None, None].astype(jnp.float32)  # padding queries see only padding here
    assert_matches_xla(fn, q, k, v, weight, reference_mask(args), rows=real_rows)


def test_config_rejects_unknown_attention():
    cfg = ExecutionConfig()
    assert cfg.replace(attention="flash").attention == "flash"
    with pytest.raises(ConfigError, match="'attention'"):
        cfg.replace(attention="flash2")
