"""Memory-efficient blockwise attention in pure JAX (the FlashAttention-2 recurrence), forward and backward.

Runs on every backend. Scores exist one (block_q, block_k) tile at a time, so memory grows as O(T + S) per head
instead of O(T * S). The forward keeps a running max and normaliser per query row (online softmax) and saves only
the output and the per-row log-sum-exp; the backward (a `jax.custom_vjp`) recomputes each tile's probabilities
from that log-sum-exp instead of storing them. Tiles with no visible key (e.g. above the causal diagonal) are
skipped with `lax.cond`.

Rows with no visible key at all (a padding query that sees nothing) give zeros and zero gradients, where the
materialised `xla` reference gives the mean of all values; the two agree on every row that sees at least one key.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Tile edge. Accelerators take 512. On CPU the fp32 score tiles of all (batch, head) pairs should stay in cache:
# the edge is the power of two whose tiles total about CPU_TILE_BYTES, within [128, 512]. Measured on 2 cores:
# eight 729-token SigLIP frames x 4 heads ran fastest at 128 (33 ms vs 44 at 256, 86 for `xla`), one 1669-token
# causal prefill x 8 heads at 256 (15 ms vs 28 at 128, 118 for `xla`).
DEFAULT_BLOCK_ACCELERATOR = 512
CPU_TILE_BYTES = 2 * 1024 * 1024
F32 = jnp.float32


def default_block(batch: int, heads: int, platform: str = "auto") -> int:
    if platform != "cpu":
        return DEFAULT_BLOCK_ACCELERATOR
    edge = 128
    while edge < 512 and batch * heads * (2 * edge) ** 2 * 4 <= CPU_TILE_BYTES:
        edge *= 2
    return edge


def balanced_blocks(length: int, block: int) -> tuple[int, int]:
    """(number of blocks, block size): at most `block` wide, a multiple of 8 where the length allows, and
    spread evenly so the padded tail stays small (729 -> 3 x 248, not 3 x 256; 1669 -> 7 x 240)."""
    if length <= block:
        return 1, length
    count = -(-length // block)
    size = -(-length // count)
    return count, min(block, -(-size // 8) * 8)


def flash_attention(q, k, v, *, q_pos=None, k_pos=None, k_valid=None, causal: bool = False,
                    block_q: int | None = None, block_k: int | None = None, platform: str = "auto"):
    """Same contract as `attention.attention`: q (B, T, N, D), k/v (B, S, K, D) -> (B, T, N, D) in q's dtype.

    Blocks default by platform and shape (`default_block`), shrink to the sequence when it is shorter and are balanced
    (`balanced_blocks`); T and S are padded up to a block multiple internally (padded keys are invisible,
    padded queries are dropped)."""
    b, t, n, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    nq, bq = balanced_blocks(t, block_q or default_block(b, n, platform))
    nk, bk = balanced_blocks(s, block_k or default_block(b, n, platform))
    if q_pos is None or k_pos is None:  # only read when causal; default: position == index
        q_pos, k_pos = jnp.broadcast_to(jnp.arange(t), (b, t)), jnp.broadcast_to(jnp.arange(s), (b, s))
    if k_valid is None:
        k_valid = jnp.ones((b, s), bool)

    def pad(x, length):  # along axis 1, with zeros / False
        return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))

    # Block layout, block index leading so `lax.scan`/`lax.map` walk it: q (nq, B, K, G, bq, D), k/v (nk, B, K, bk, D).
    # GQA: the G query heads that share a KV head are a separate axis, so K/V are never repeated.
    qb = pad(q, nq * bq).reshape(b, nq, bq, kv, n // kv, d).transpose(1, 0, 3, 4, 2, 5)
    kb, vb = (pad(x, nk * bk).reshape(b, nk, bk, kv, d).transpose(1, 0, 3, 2, 4) for x in (k, v))
    q_pos_b = pad(q_pos, nq * bq).reshape(b, nq, bq).swapaxes(0, 1)
    k_pos_b, k_valid_b = (pad(x, nk * bk).reshape(b, nk, bk).swapaxes(0, 1) for x in (k_pos, k_valid))
    # Tie the mask inputs to q: otherwise, under a scanned and differentiated stack of layers, XLA hoists every
    # tile's mask and -inf fill (they depend on positions only) out of the loop and keeps all of them: the full
    # (T, S) matrix this kernel exists to avoid (28 GiB for one 7B layer at 16k tokens).
    qb, q_pos_b, k_pos_b, k_valid_b = jax.lax.optimization_barrier((qb, q_pos_b, k_pos_b, k_valid_b))
    out = _flash(qb, kb, vb, q_pos_b, k_pos_b, k_valid_b, causal)
    return out.transpose(1, 0, 4, 2, 3, 5).reshape(b, nq * bq, n, d)[:, :t]


def _visible(q_pos, k_pos, k_valid, causal: bool):
    """The mask of one tile, (B, 1, 1, bq, bk), broadcasting over (K, G)."""
    vis = k_valid[:, None, :]
    if causal:
        vis = vis & (k_pos[:, None, :] <= q_pos[:, :, None])
    return vis[:, None, None]


def _scores(q, k, vis):
    """Scaled fp32 scores of one tile, (B, K, G, bq, bk); invisible keys get -inf (exp -> exactly 0)."""
    s = jnp.einsum("bkgqd,bkcd->bkgqc", q, k, preferred_element_type=F32) * (q.shape[-1] ** -0.5)
    return jnp.where(vis, s, -jnp.inf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, q_pos, k_pos, k_valid, causal):
    return _forward(q, k, v, q_pos, k_pos, k_valid, causal)[0]


def _forward(q, k, v, q_pos, k_pos, k_valid, causal):
    """Returns (out (nq, B, K, G, bq, D) in q's dtype, lse (nq, B, K, G, bq) fp32)."""

    def one_q_block(args):
        qi, qpi = args

        # Online softmax: after each KV tile, m is the running row max, l = sum exp(s - m) and
        # acc = sum exp(s - m) v. A new tile raises the max to m'; the old sums are rescaled by exp(m - m').
        def kv_step(carry, tile):
            kj, vj, kpj, kvj = tile
            vis = _visible(qpi, kpj, kvj, causal)

            def update(carry):
                m, l, acc = carry
                s = _scores(qi, kj, vis)
                m_new = jnp.maximum(m, s.max(-1))
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # a row with nothing visible yet stays at 0
                p = jnp.exp(s - m_safe[..., None])
                rescale = jnp.exp(m - m_safe)
                l = l * rescale + p.sum(-1)
                pv = jnp.einsum("bkgqc,bkcd->bkgqd", p.astype(vj.dtype), vj, preferred_element_type=F32)
                return m_new, l, acc * rescale[..., None] + pv

            return jax.lax.cond(vis.any(), update, lambda c: c, carry), None

        rows = qi.shape[:-1]
        init = (jnp.full(rows, -jnp.inf, F32), jnp.zeros(rows, F32), jnp.zeros(qi.shape, F32))
        (m, l, acc), _ = jax.lax.scan(kv_step, init, (k, v, k_pos, k_valid))
        seen = l > 0
        out = acc / jnp.where(seen, l, 1.0)[..., None]
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)  # finite; unused for unseen rows (p = 0)
        return out.astype(qi.dtype), lse

    return jax.lax.map(one_q_block, (q, q_pos))


def _flash_fwd(q, k, v, q_pos, k_pos, k_valid, causal):
    out, lse = _forward(q, k, v, q_pos, k_pos, k_valid, causal)
    return out, (q, k, v, q_pos, k_pos, k_valid, out, lse)


def _flash_bwd(causal, residuals, d_out):
    """FlashAttention-2 backward. Per tile, with P = exp(S - lse) recomputed:
    dV = P^T dO, dP = dO V^T, dS = P * (dP - delta) with delta = rowsum(dO * O), dQ = dS K, dK = dS^T Q
    (dS carries the 1/sqrt(D) scale). Outer scan over KV blocks accumulates dK, dV in its carry; the dQ
    contributions of every query block come out of the inner scan and are summed across KV blocks."""
    q, k, v, q_pos, k_pos, k_valid, out, lse = residuals
    scale = q.shape[-1] ** -0.5
    delta = jnp.sum(d_out.astype(F32) * out.astype(F32), axis=-1)

    def kv_block(dq_total, kv_tile):
        kj, vj, kpj, kvj = kv_tile

        def q_step(carry, q_tile):
            qi, doi, lsei, deltai, qpi = q_tile
            vis = _visible(qpi, kpj, kvj, causal)

            def grads(carry):
                dk, dv = carry
                p = jnp.exp(_scores(qi, kj, vis) - lsei[..., None])  # the forward's probabilities
                dv = dv + jnp.einsum("bkgqc,bkgqd->bkcd", p.astype(doi.dtype), doi, preferred_element_type=F32)
                dp = jnp.einsum("bkgqd,bkcd->bkgqc", doi, vj, preferred_element_type=F32)
                ds = p * (dp - deltai[..., None]) * scale
                dk = dk + jnp.einsum("bkgqc,bkgqd->bkcd", ds.astype(qi.dtype), qi, preferred_element_type=F32)
                dq = jnp.einsum("bkgqc,bkcd->bkgqd", ds.astype(kj.dtype), kj, preferred_element_type=F32)
                return (dk, dv), dq

            return jax.lax.cond(vis.any(), grads, lambda c: (c, jnp.zeros(qi.shape, F32)), carry)

        init = (jnp.zeros(kj.shape, F32), jnp.zeros(vj.shape, F32))
        (dk, dv), dq = jax.lax.scan(q_step, init, (q, d_out, lse, delta, q_pos))
        return dq_total + dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(kv_block, jnp.zeros(q.shape, F32), (k, v, k_pos, k_valid))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
