"""Scaled dot-product attention with grouped KV heads and fp32 softmax (as upstream), one interface for all kernels.

q: (B, T, N, D); k, v: (B, S, K, D) with N a multiple of K (GQA). The mask is described, not materialised, so
blockwise kernels never build a (T, S) array: with `causal`, key j is visible to query i when
k_pos[j] <= q_pos[i] (positions default to indices); with `k_valid`, only real (non-padding) keys are visible.
Returns (B, T, N, D) in q's dtype.

Implementations (`ModelConfig.attention`, `impl=`):
  xla     materialised (B, N, T, S) scores; the reference. Fine for short sequences.
  flash   blockwise online-softmax attention in pure JAX with a FlashAttention-2 backward (flash_attention.py);
          O(T + S) memory, runs on every backend. The choice for 64-frame (~13.5k token) contexts off-GPU/TPU.
  per_head  the `xla` computation one (batch row, KV head) at a time (`lax.map`), each step's scores recomputed in
          the backward: memory of one step's (G, T, S) scores. On CPU those stay in cache, so non-causal
          self-attention (SigLIP: 729 patches) runs about 1.7x as fast as `flash`'s tiles over every head at once.
  cudnn   `jax.nn.dot_product_attention(implementation="cudnn")`, NVIDIA GPUs, bf16/fp16 only. The mask must be
          expressible as is_causal + key_value_seq_lengths: right padding (k_valid a prefix), positions == indices
          on real tokens, and for causal masks T == S (training) or T == 1 (a decode step). Odd lengths are padded
          by one masked token (cuDNN's training kernels take even lengths only: SigLIP's 729 patches).
  splash  Pallas splash attention, TPU only; self-attention (T == S), causal by index, k_valid as segment ids.
          Runs inside `jax.shard_map` over the context mesh (`jax.set_mesh`): batch over the batch axes, heads over
          tensor (Mosaic kernels are not partitioned automatically). Head dims are zero-padded to a lane multiple
          (SigLIP's 72 -> 128: the same MXU passes, exact results).
  auto    cudnn on GPU / splash on TPU where the call fits their contract, else flash for long sequences
          (T * S >= AUTO_FLASH_MIN_SCORES; on CPU from 256 x 256, where non-causal self-attention whose per-step
          scores fit PER_HEAD_MAX_SCORE_BYTES takes per_head instead), else xla (on CPU: per_head for
          self-attention whose scores at once reach PER_HEAD_MIN_ALL_SCORE_BYTES, a batch of short sequences;
          per_head only where the call runs on one device).
          Decided per call from static shapes, dtype and `platform` (the config's, resolved at the entry point;
          "auto" = not resolved: no hardware kernel, accelerator thresholds), so one config serves training,
          SigLIP, prefill and decode. The default.
Requesting cudnn or splash explicitly where they cannot run raises a ValueError saying why.

Rows that see no key at all (only possible for padding queries) are implementation-defined (xla: the mean of all
values, flash: zeros); all implementations agree on every row that sees at least one key. With cudnn and splash,
padding-query rows may differ too (they use index-based masks): their outputs must not be used, as in qwen2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from llavaction_jax.config import ATTENTION_IMPLS
from llavaction_jax.model.flash_attention import flash_attention
from llavaction_jax.sharding import logical_to_pspec

IMPLEMENTATIONS = ATTENTION_IMPLS
# `auto` picks flash once T * S reaches this. On accelerators materialised scores are fast until they get big;
# on CPU the tiled kernel wins early (cache-resident tiles, causal tiles skipped): for a 1669-token causal
# prefill it took 15 ms against 118 ms for `xla`, for eight 729-token SigLIP frames 33-44 ms against 86 ms.
AUTO_FLASH_MIN_SCORES = 2048 * 2048
AUTO_FLASH_MIN_SCORES_CPU = 256 * 256
SPLASH_LANES = 128  # splash tiles are multiples of the TPU lane width
# `auto` on CPU: self-attention one (batch row, KV head) at a time while a step's fp32 scores stay this small.
# Non-causal (SigLIP) from flash's threshold: eight 729-patch frames x 4 heads (2.1 MB a step), forward: 104-118 ms
# against 179-193 ms tiled (`flash`) and 252-282 ms materialised at once (`xla`), alternating in one process;
# forward + backward within 3% of flash. Long causal calls stay tiled (their masked tiles are skipped).
PER_HEAD_MAX_SCORE_BYTES = 4 * 1024 * 1024
# ... and under flash's threshold, causal or not, once all the (B, N, T, S) scores at once would pass this: a batch of
# short sequences, whose materialised scores leave the cache (the demo's training batch, 16 x 216 tokens x 4 heads,
# 11.4 MiB: forward 8.9 ms against 49.6 for xla and 13.3 for flash, forward + backward 52 against 98 and 59). Below
# it xla stays ahead (2 x 216 causal, 1.4 MiB: forward + backward 5.0 ms against 7.2 for per_head).
PER_HEAD_MIN_ALL_SCORE_BYTES = 2 * 1024 * 1024


def attention(q, k, v, *, q_pos=None, k_pos=None, k_valid=None, causal: bool = False, impl: str = "xla",
              platform: str = "auto"):
    """Attention of q over k/v with the described mask, by implementation `impl` on `platform` (module docstring)."""
    if causal and (q_pos is None or k_pos is None):
        b, t, s = q.shape[0], q.shape[1], k.shape[1]
        q_pos, k_pos = jnp.broadcast_to(jnp.arange(t), (b, t)), jnp.broadcast_to(jnp.arange(s), (b, s))
    if impl == "auto":
        impl = auto_impl(q, k, causal, platform)
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {impl!r} is not available; choose one of {IMPLEMENTATIONS}")
    # The kernel is named in the program (op metadata, profiles): bench.aot reads from the compiled text which
    # kernel each tower's attention became. Attention over a longer KV cache (decode, option scoring) is told apart.
    with jax.named_scope(f"{impl}_{'attention' if q.shape[1] == k.shape[1] else 'cache_attention'}"):
        if impl == "xla":
            return xla_attention(q, k, v, dense_mask(q_pos, k_pos, k_valid, causal))
        if impl == "flash":
            return flash_attention(q, k, v, q_pos=q_pos, k_pos=k_pos, k_valid=k_valid, causal=causal,
                                   platform=platform)
        if impl == "per_head":
            return per_head_attention(q, k, v, q_pos=q_pos, k_pos=k_pos, k_valid=k_valid, causal=causal)
        if impl == "cudnn":
            return cudnn_attention(q, k, v, q_pos=q_pos, k_valid=k_valid, causal=causal, platform=platform)
        return splash_attention(q, k, v, k_valid=k_valid, causal=causal, platform=platform)


def auto_impl(q, k, causal: bool, platform: str = "auto") -> str:
    """The implementation `impl="auto"` picks for these shapes on `platform`."""
    if platform == "gpu" and cudnn_unsupported(q, k, causal, platform) is None:
        return "cudnn"
    if platform == "tpu" and splash_unsupported(q, k, platform) is None:
        return "splash"
    threshold = AUTO_FLASH_MIN_SCORES_CPU if platform == "cpu" else AUTO_FLASH_MIN_SCORES
    long = q.shape[1] * k.shape[1] >= threshold
    if platform == "cpu" and q.shape[1] == k.shape[1] and unsharded():
        step_scores = q.shape[2] // k.shape[2] * q.shape[1] * k.shape[1] * 4  # one per_head step's fp32 (G, T, S)
        all_scores = q.shape[0] * q.shape[2] * q.shape[1] * k.shape[1] * 4
        if step_scores <= PER_HEAD_MAX_SCORE_BYTES and (
                (long and not causal) or (not long and all_scores >= PER_HEAD_MIN_ALL_SCORE_BYTES)):
            return "per_head"
    return "flash" if long else "xla"


def unsharded() -> bool:
    """Whether the call is traced for one device (no context mesh, or a mesh of one): `per_head` loops over batch
    rows and heads, which a mesh would split (each step would gather its slice, inside a loop: see
    `ExecutionConfig.resolve` on loops over sharded work on CPU meshes)."""
    return jax.sharding.get_abstract_mesh().size <= 1


def dense_mask(q_pos, k_pos, k_valid, causal: bool):
    """(B, 1, T, S) bool or None: the mask the arguments describe."""
    mask = None
    if causal:
        mask = k_pos[:, None, None, :] <= q_pos[:, None, :, None]
    if k_valid is not None:
        valid = k_valid[:, None, None, :]
        mask = valid if mask is None else mask & valid
    return mask


def xla_attention(q, k, v, mask=None):
    """The reference: materialised scores, fp32 softmax."""
    b, t, n, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, n // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * (d**-0.5)
    if mask is not None:
        scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, n, d)


def per_head_attention(q, k, v, *, q_pos=None, k_pos=None, k_valid=None, causal: bool = False):
    """`xla_attention` one (batch row, KV head) at a time: a `lax.map` over B x K whose step materialises the (G, T, S)
    fp32 scores of the G query heads sharing that KV head, recomputed in the backward (`jax.checkpoint`), so neither
    pass holds more than one step's scores. The same values as `xla`, rows without a visible key included."""
    b, t, n, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    steps = b * kv

    def per_step(x):  # (B, ...) -> (B * K, ...): each batch row's array, once per KV head
        return jnp.repeat(x, kv, axis=0)

    qs = q.reshape(b, t, kv, n // kv, d).transpose(0, 2, 3, 1, 4).reshape(steps, n // kv, t, d)
    ks, vs = (x.transpose(0, 2, 1, 3).reshape(steps, s, d) for x in (k, v))
    masks = {}
    if causal:
        masks.update(q_pos=per_step(q_pos), k_pos=per_step(k_pos))
    if k_valid is not None:
        masks["k_valid"] = per_step(k_valid)

    @jax.checkpoint
    def one(step):
        qi, ki, vi, m = step
        scores = jnp.einsum("gtd,sd->gts", qi, ki, preferred_element_type=jnp.float32) * (d**-0.5)
        row = {key: x[None] for key, x in m.items()}  # this step's batch row, as a batch of one
        visible = dense_mask(row.get("q_pos"), row.get("k_pos"), row.get("k_valid"), causal)  # (1, 1, T, S) or None
        if visible is not None:
            scores = jnp.where(visible[0], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(vi.dtype)
        return jnp.einsum("gts,sd->gtd", probs, vi)

    out = jax.lax.map(one, (qs, ks, vs, masks))
    return out.reshape(b, kv, n // kv, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, n, d)


# ---------------------------------------------------------------------------------------------- cuDNN (GPU)
def cudnn_unsupported(q, k, causal: bool, platform: str | None = "gpu") -> str | None:
    """Why cuDNN attention cannot run this call on `platform`, or None. `platform=None` checks only the mask
    layout (the `implementation="xla"` translation used by tests)."""
    t, s = q.shape[1], k.shape[1]
    hardware = platform is not None
    if hardware and platform != "gpu":
        return f"it needs an NVIDIA GPU, but the model config's platform is {platform!r}"
    if hardware and q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN flash attention needs bfloat16/float16 inputs, got {q.dtype} (set compute_dtype)"
    if hardware and (q.shape[-1] % 8 or q.shape[-1] > 128):
        return f"cuDNN flash attention needs a head dim that is a multiple of 8 and <= 128, got {q.shape[-1]}"
    if causal and t not in (s, 1):
        return (f"a causal mask of {t} queries against {s} keys (e.g. a prefill into a longer KV cache) is not "
                "expressible as is_causal + key_value_seq_lengths")
    return None


def cudnn_attention(q, k, v, *, q_pos=None, k_valid=None, causal: bool = False, implementation: str = "cudnn",
                    platform: str = "gpu"):
    """`jax.nn.dot_product_attention` with the mask as is_causal + key_value_seq_lengths.

    That form only says "key index <= query index" and "the first L keys are real", which equals our mask under
    the right-padded layout: k_valid a prefix of each row, positions == indices on real tokens. T == S uses
    is_causal; a decode step (T == 1 at q_pos p) sees keys 0..p, i.e. p + 1 keys. `implementation="xla"` runs the
    same translation on any backend (for tests).

    cuDNN's training kernels take even sequence lengths only (jax's check_is_flash_attention), and a call cannot
    tell whether it will be differentiated: odd lengths (SigLIP's 729 patches) get one more key, excluded by the
    key lengths, and one more query, dropped from the output. Decode steps (T == 1) are never differentiated."""
    problem = cudnn_unsupported(q, k, causal, platform if implementation == "cudnn" else None)
    if problem:
        raise ValueError(f"attention impl 'cudnn' cannot run here: {problem}. Use 'flash' or 'auto'.")
    t, s = q.shape[1], k.shape[1]
    lengths = None if k_valid is None else k_valid.sum(-1).astype(jnp.int32)
    if causal and t == 1:
        seen = q_pos[:, 0].astype(jnp.int32) + 1
        lengths, causal = (seen if lengths is None else jnp.minimum(lengths, seen)), False
    elif t % 2 or s % 2:
        if lengths is None:
            lengths = jnp.full((q.shape[0],), s, jnp.int32)
        pad = lambda x: jnp.pad(x, ((0, 0), (0, x.shape[1] % 2), (0, 0), (0, 0)))
        q, k, v = pad(q), pad(k), pad(v)
    out = jax.nn.dot_product_attention(q, k, v, is_causal=causal, key_value_seq_lengths=lengths,
                                       implementation=implementation)
    return out[:, :t]


# ---------------------------------------------------------------------------------------------- splash (TPU)
def splash_unsupported(q, k, platform: str | None = "tpu") -> str | None:
    """Why splash attention cannot run this call on `platform`, or None. `platform=None` checks only the layout."""
    if platform is not None and platform != "tpu":
        return f"it needs a TPU, but the model config's platform is {platform!r}"
    if q.shape[1] != k.shape[1]:
        return f"it supports self-attention only (T == S), got {q.shape[1]} queries against {k.shape[1]} keys"
    return None


def splash_attention(q, k, v, *, k_valid=None, causal: bool = False, interpret: bool = False, platform: str = "tpu"):
    """Pallas splash attention over (B, T, N, D) inputs, inside `jax.shard_map` over the context mesh.

    Causal is by index (positions == indices on real tokens). k_valid becomes segment ids shared by queries and
    keys (self-attention): real tokens are segment 1, padding segment 0, so real queries never see padding and
    no row is empty (splash requires that). The sequence is padded to a lane multiple as more padding, the head
    dim to a lane multiple with zeros (q.k and the output's first D columns are unchanged).
    `interpret=True` runs the kernel in the Pallas interpreter on any backend (for tests)."""
    problem = splash_unsupported(q, k, None if interpret else platform)
    if problem:
        raise ValueError(f"attention impl 'splash' cannot run here: {problem}. Use 'flash' or 'auto'.")
    b, t, n, d = q.shape
    padded = -(-t // SPLASH_LANES) * SPLASH_LANES
    width = -(-d // SPLASH_LANES) * SPLASH_LANES
    valid = jnp.ones((b, t), bool) if k_valid is None else k_valid
    segments = jnp.pad(valid.astype(jnp.int32), ((0, 0), (0, padded - t)))

    def heads_first(x):  # (B, T, H, D) -> (B, H, T_padded, D_padded), the kernel's per-example layout
        return jnp.pad(x, ((0, 0), (0, padded - t), (0, 0), (0, width - d))).transpose(0, 2, 1, 3)

    scaled_q = q * jnp.asarray(d**-0.5, q.dtype)  # the kernel does not scale
    k, v = _kv_heads_for_mesh(k, v, n)
    args = (heads_first(scaled_q), heads_first(k), heads_first(v), segments)
    local = lambda q, k, v, seg: _splash_local(q, k, v, seg, causal, interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:  # Mosaic kernels are not partitioned by GSPMD: each device runs its own batch rows / heads
        heads = logical_to_pspec(("batch", "act_heads", None, None), args[0].shape, mesh)
        kv_heads = logical_to_pspec(("batch", "act_heads", None, None), args[1].shape, mesh)
        if kv_heads[1] != heads[1]:  # query and KV heads must split the same way
            heads = kv_heads = logical_to_pspec(("batch", None, None, None), args[0].shape, mesh)
        local = jax.shard_map(local, mesh=mesh, in_specs=(heads, kv_heads, kv_heads, P(heads[0])), out_specs=heads,
                              check_vma=False)
    out = local(*args)
    return out.transpose(0, 2, 1, 3)[:, :t, :, :d].astype(q.dtype)


def _kv_heads_for_mesh(k, v, n: int):
    """k, v with their K heads repeated so the tensor axis divides them where it divides the N query heads but
    not K (GQA 14/2 over tensor 7): each device then holds the KV heads of its own query heads."""
    mesh = jax.sharding.get_abstract_mesh()
    ways = 1 if mesh.empty or "tensor" not in mesh.shape else mesh.shape["tensor"]
    heads = k.shape[2]
    if heads % ways == 0 or n % ways:
        return k, v
    repeat = next(r for r in range(2, n // heads + 1) if (heads * r) % ways == 0 and n % (heads * r) == 0)
    return jnp.repeat(k, repeat, axis=2), jnp.repeat(v, repeat, axis=2)


def _splash_local(q, k, v, segments, causal: bool, interpret: bool):
    """The splash kernel over this device's (B, N, T, D) blocks, vmapped over its batch rows."""
    # TPU Pallas kernels: imported only when splash is chosen, so other backends never load them.
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    n, length = q.shape[1], q.shape[2]
    block = next(size for size in (512, 256, 128) if length % size == 0)
    head_mask = sm.CausalMask((length, length)) if causal else sm.FullMask((length, length))
    sizes = dict.fromkeys(("block_q", "block_kv", "block_kv_compute", "block_q_dkv", "block_kv_dkv",
                           "block_kv_dkv_compute", "block_q_dq", "block_kv_dq"), block)
    kernel = sk.make_splash_mha(sm.MultiHeadMask([head_mask] * n), block_sizes=sk.BlockSizes(**sizes),
                                head_shards=1, q_seq_shards=1, interpret=interpret)
    return jax.vmap(kernel)(q, k, v, sk.SegmentIds(segments, segments))
