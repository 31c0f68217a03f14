"""The accelerator-only attention paths, run on CPU: splash through the Pallas interpreter at the block sizes a
13.8k-token sequence uses, and the cuDNN mask translation (`implementation="xla"`) at the 7B's head ratio with the
layout llava.splice produces. Values and gradients against the materialised `xla` reference on real query rows."""

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

from llavaction_jax.model.attention import SPLASH_LANES, cudnn_attention, splash_attention
from llavaction_jax.sharding import make_mesh
from test_attention import assert_matches_xla, make_qkv, mask_args, reference_mask

SPLASH_CASES = {  # name: ((B, T, N, K, D), real lengths, causal, block the kernel must pick)
    # 13.8k tokens pad to 13824 = 27 x 512: the 512 blocks of a 64-frame sequence; 1000 -> 1024 = 2 x 512
    "causal_512_blocks": ((1, 1000, 4, 2, 128), [611], True, 512),
    "causal_256_blocks": ((1, 700, 7, 1, 64), [523], True, 256),  # 700 -> 768 = 3 x 256 (GQA 7:1, as 28:4)
    "causal_128_blocks": ((2, 300, 4, 2, 32), [300, 129], True, 128),  # 300 -> 384 = 3 x 128; row 0 unpadded
    "non_causal_padding": ((2, 200, 4, 4, 32), [200, 77], False, 256),  # 200 -> 256
}


@pytest.fixture
def block_sizes_used(monkeypatch):
    """Records the BlockSizes splash_attention builds its kernel with (the real kernel still runs)."""
    seen = []
    real = sk.make_splash_mha

    def recording(*args, **kwargs):
        seen.append(kwargs["block_sizes"])
        return real(*args, **kwargs)

    monkeypatch.setattr(sk, "make_splash_mha", recording)
    return seen


@pytest.mark.parametrize("name", SPLASH_CASES)
def test_splash_in_interpreter_matches_xla(name, block_sizes_used):
    (b, t, n, kv, d), lengths, causal, block = SPLASH_CASES[name]
    q, k, v, weight = make_qkv(len(name), b, t, t, n, kv, d=d)
    args = mask_args(b, t, t, causal=causal, lengths=lengths, padding_at_zero=causal)  # llava.splice's layout
    valid = args["k_valid"]

    def fn(q, k, v):
        return splash_attention(q, k, v, k_valid=valid, causal=causal, interpret=True)

    real_rows = valid[:, :, None, None].astype(jnp.float32)  # padding queries are implementation-defined
    assert_matches_xla(fn, q, k, v, weight, reference_mask(args), rows=real_rows, tol=2e-5)
    sizes = block_sizes_used[-1]
    assert {sizes.block_q, sizes.block_kv, sizes.block_q_dkv, sizes.block_kv_dq} == {block}
    assert -(-t // SPLASH_LANES) * SPLASH_LANES % block == 0


def test_cudnn_translation_with_llava_layout_and_7b_head_ratio():
    """Right padding with padding positions at 0 (llava.splice), 7 query heads per KV head (Qwen2-7B's 28:4)."""
    b, t = 2, 45
    q, k, v, weight = make_qkv(8, b, t, t, 7, 1, d=32)
    args = mask_args(b, t, t, lengths=[45, 19], padding_at_zero=True)
    valid = args["k_valid"]

    def fn(q, k, v):
        return cudnn_attention(q, k, v, q_pos=args["q_pos"], k_valid=valid, causal=True, implementation="xla")

    assert_matches_xla(fn, q, k, v, weight, reference_mask(args), rows=valid[:, :, None, None].astype(jnp.float32))


SHARDED_SPLASH_CASES = {  # name: ((B, T, N, K, D), real lengths or None, causal, query heads each device's kernel runs)
    "gqa_heads_over_tensor": ((4, 300, 4, 2, 32), [300, 129, 77, 200], True, 2),  # 2 query / 1 KV head per device
    "kv_heads_repeated": ((4, 200, 4, 1, 32), [200, 150, 31, 64], True, 2),  # K=1 does not split over tensor=2
    "siglip_head_dim_72": ((4, 45, 4, 4, 72), None, False, 2),  # bidirectional, D 72 zero-padded to 128
}


@pytest.mark.parametrize("name", SHARDED_SPLASH_CASES)
def test_splash_inside_shard_map_matches_xla(name, monkeypatch):
    """On a (data 2, fsdp 2, tensor 2) mesh splash runs per device inside jax.shard_map (batch over data x fsdp,
    heads over tensor), as a TPU needs it: values and gradients equal xla's on real rows."""
    (b, t, n, kv, d), lengths, causal, local_heads = SHARDED_SPLASH_CASES[name]
    heads_seen = []
    real = sk.make_splash_mha
    monkeypatch.setattr(sk, "make_splash_mha", lambda mask, **kw: heads_seen.append(len(mask.masks)) or real(mask, **kw))
    q, k, v, weight = make_qkv(len(name), b, t, t, n, kv, d=d)
    args = mask_args(b, t, t, causal=causal, lengths=lengths, padding_at_zero=causal and lengths is not None)
    valid = args.get("k_valid")

    def fn(q, k, v):
        return splash_attention(q, k, v, k_valid=valid, causal=causal, interpret=True)

    rows = None if valid is None else valid[:, :, None, None].astype(jnp.float32)
    with jax.set_mesh(make_mesh(data=2, fsdp=2, tensor=2)):
        assert "shard_map" in str(jax.make_jaxpr(fn)(q, k, v))
        assert_matches_xla(fn, q, k, v, weight, reference_mask(args), rows=rows, tol=2e-5)
    assert set(heads_seen) == {local_heads}
