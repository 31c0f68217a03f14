"""Splicing the visual tokens into the text sequence vs an explicit Python port of upstream
`llavaction/model/llava_arch.py: prepare_inputs_labels_for_multimodal` (lines 437-588 @bd9f465): padding dropped
with the mask, ids split around the -200 placeholder, text/visual interleaved, labels -100 on visual positions,
action index L0 + L1 - 1 (or the last three) computed before truncation, truncation at tokenizer_model_max_length,
right padding with zeros / -100, positions arange on real tokens. Also: a jitted splice compiles once per shape,
whatever the data.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llavaction_jax.config import ExecutionConfig, ModelConfig, TextConfig, VisionConfig
from llavaction_jax.api import forward_with_losses
from llavaction_jax.model import llava, qwen2
from llavaction_jax.model.params import is_spec

IMG, IGNORE = -200, -100


# ---------------------------------------------------------------------------------------------- reference
def ref_splice(text_embeds, input_ids, labels, mask, visual, max_len, n_action_pos):
    """Upstream per-sample loop. Returns (embeds, labels, mask, positions) right-padded to the longest sample,
    and a list of action indices per sample (None for a sample without placeholder)."""
    text_embeds, input_ids, labels, mask, visual = map(np.asarray, (text_embeds, input_ids, labels, mask, visual))
    seqs, labs, actions = [], [], []
    for b in range(input_ids.shape[0]):
        keep = mask[b].astype(bool)
        ids, lab, emb = input_ids[b][keep], labels[b][keep], text_embeds[b][keep]
        holes = [i for i, t in enumerate(ids.tolist()) if t == IMG]
        if not holes:
            seq_e, seq_l, act = list(emb), list(lab), None
        else:
            assert len(holes) == 1
            p = holes[0]
            seq_e = list(emb[:p]) + list(visual[b]) + list(emb[p + 1 :])
            seq_l = list(lab[:p]) + [IGNORE] * visual.shape[1] + list(lab[p + 1 :])
            l0, l1 = p, visual.shape[1]  # len(text_0 embeds), len(image_0 features)
            act = [l0 + l1 - n_action_pos + k for k in range(n_action_pos)]  # before truncation
        if max_len is not None:
            seq_e, seq_l = seq_e[:max_len], seq_l[:max_len]
        seqs.append(seq_e)
        labs.append(seq_l)
        actions.append(act)
    longest = max(len(s) for s in seqs)
    d = text_embeds.shape[-1]
    out_e = np.zeros((len(seqs), longest, d), np.float32)
    out_l = np.full((len(seqs), longest), IGNORE, np.int64)
    out_m = np.zeros((len(seqs), longest), bool)
    out_p = np.zeros((len(seqs), longest), np.int64)
    for b, (s, l) in enumerate(zip(seqs, labs)):
        n = len(s)
        if n:
            out_e[b, :n] = np.stack(s)
        out_l[b, :n] = l
        out_m[b, :n] = True
        out_p[b, :n] = np.arange(n)
    return out_e, out_l, out_m, out_p, actions


def check_spliced(s, ref, n_action_pos):
    """Library output (padded to its static out_len) equals the reference on its width; the rest is padding."""
    e, l, m, p, actions = ref
    w = e.shape[1]
    emb, lab, valid, pos = (np.asarray(x) for x in (s.embeds, s.labels, s.valid, s.positions))
    assert emb.shape[1] >= w
    np.testing.assert_array_equal(emb[:, :w], e)
    np.testing.assert_array_equal(lab[:, :w], l)
    np.testing.assert_array_equal(valid[:, :w], m)
    np.testing.assert_array_equal(pos[:, :w], p)
    assert not valid[:, w:].any()
    assert (lab[:, w:] == IGNORE).all() and (emb[:, w:] == 0).all() and (pos[:, w:] == 0).all()
    idx = np.asarray(s.action_idx)
    assert idx.shape == (len(actions), n_action_pos)
    for b, act in enumerate(actions):
        if act is not None:
            assert idx[b].tolist() == act, (b, idx[b], act)


def make_batch(rows, d=5, v=4, seed=0, vocab=50):
    """rows: list of (mask list, placeholder position or None). Random ids/labels/embeds, -200 at the placeholder."""
    rng = np.random.default_rng(seed)
    b, length = len(rows), len(rows[0][0])
    ids = rng.integers(1, vocab, (b, length))
    labels = np.where(rng.random((b, length)) < 0.5, IGNORE, rng.integers(0, vocab, (b, length)))
    mask = np.array([r[0] for r in rows], bool)
    for i, (_, ph) in enumerate(rows):
        if ph is not None:
            ids[i, ph] = IMG
            labels[i, ph] = IGNORE  # preprocess masks the prompt incl. the placeholder
    embeds = rng.standard_normal((b, length, d)).astype(np.float32)
    visual = rng.standard_normal((b, v, d)).astype(np.float32)
    has_video = np.array([ph is not None for _, ph in rows])
    return embeds, ids, labels, mask, visual, has_video


@functools.partial(jax.jit, static_argnums=(6, 7))
def _splice_jit(embeds, ids, labels, mask, visual, has_video, out_len, n_pos):
    s = llava.splice_visual_tokens(embeds, ids, labels, mask, visual, has_video, out_len, n_pos)
    return s.embeds, s.labels, s.valid, s.positions, s.action_idx  # Spliced itself is not a pytree


def run_splice(batch, out_len, n_pos):
    return llava.Spliced(*_splice_jit(*(jnp.asarray(x) for x in batch), out_len, n_pos))


def full_len(batch):
    _, ids, _, mask, visual, _ = batch
    return max(int(m.sum()) - int((i[m] == IMG).sum()) + int((i[m] == IMG).sum()) * visual.shape[1]
               for i, m in zip(ids, mask.astype(bool)))


# ---------------------------------------------------------------------------------------------- cases
CASES = {
    # two right-padded samples of different lengths, placeholders at different positions
    "right_padded": [([1] * 9, 2), ([1] * 6 + [0] * 3, 4)],
    # left padding (and a hole in the middle): the mask removes padding wherever it is
    "left_padded": [([0, 0, 0, 1, 1, 1, 1, 1, 1], 5), ([1, 1, 0, 1, 1, 0, 1, 1, 1], 0)],
    # placeholder as the last real token, and right after left padding
    "edges": [([1] * 7 + [0, 0], 6), ([0, 0] + [1] * 7, 2)],
    # a text-only sample next to a video sample
    "no_video": [([1] * 9, 3), ([1] * 7 + [0, 0], None)],
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("n_pos", [1, 3])
def test_splice_matches_reference(case, n_pos):
    batch = make_batch(CASES[case], seed=len(case))
    ref = ref_splice(*batch[:5], max_len=None, n_action_pos=n_pos)
    n = full_len(batch)
    assert ref[0].shape[1] == n
    for out_len in (n, 16):  # exactly the longest, and a larger static bucket
        check_spliced(run_splice(batch, out_len, n_pos), ref, n_pos)


def test_no_video_sample_is_plain_text():
    batch = make_batch(CASES["no_video"], seed=3)
    embeds, ids, labels, mask, _, _ = batch
    s = run_splice(batch, full_len(batch), 1)
    n = int(mask[1].sum())
    np.testing.assert_array_equal(np.asarray(s.embeds)[1, :n], embeds[1][mask[1]])
    np.testing.assert_array_equal(np.asarray(s.labels)[1, :n], labels[1][mask[1]])
    assert np.asarray(s.valid)[1].sum() == n


@pytest.mark.parametrize("limit", [3, 6, 9, 11])
def test_truncation(limit):
    """Every sequence is cut at tokenizer_model_max_length; the action index is the pre-truncation one."""
    batch = make_batch(CASES["right_padded"], seed=7)
    assert full_len(batch) > limit
    ref = ref_splice(*batch[:5], max_len=limit, n_action_pos=1)
    assert ref[0].shape[1] == limit
    s = run_splice(batch, limit, 1)
    assert s.embeds.shape[1] == limit
    e, l, m, p, actions = ref
    np.testing.assert_array_equal(np.asarray(s.embeds), e)
    np.testing.assert_array_equal(np.asarray(s.labels), l)
    np.testing.assert_array_equal(np.asarray(s.valid), m)
    np.testing.assert_array_equal(np.asarray(s.positions), p)
    idx = np.asarray(s.action_idx)[:, 0]
    for b, act in enumerate(actions):
        if act[0] < limit:  # upstream would index out of range otherwise; only in-range indices are comparable
            assert idx[b] == act[0]


def test_jit_compiles_once_per_shape():
    """Output shapes depend only on input shapes: new data (masks, placeholder positions, has_video) of the same
    shapes reuses the compiled function."""
    traces = []

    def fn(*args):
        traces.append(1)  # Python side effect: runs only while tracing
        s = llava.splice_visual_tokens(*args, out_len=13, num_action_positions=1)
        return s.embeds, s.labels, s.valid, s.positions, s.action_idx  # Spliced itself is not a pytree

    jitted = jax.jit(fn)
    outs = []
    for case, seed in (("right_padded", 1), ("left_padded", 2), ("no_video", 3)):
        batch = make_batch(CASES[case], seed=seed)
        s = llava.Spliced(*jitted(*(jnp.asarray(x) for x in batch)))
        outs.append((batch, s))
    assert len(traces) == 1
    for batch, s in outs:
        assert s.embeds.shape == (2, 13, 5)
        check_spliced(s, ref_splice(*batch[:5], max_len=None, n_action_pos=1), 1)


# ---------------------------------------------------------------------------------------------- through forward
def tiny_cfg(**kw):
    base = dict(
        vision=VisionConfig(hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2, image_size=14, patch_size=2),
        text=TextConfig(vocab_size=40, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                        rope_theta=10000.0),
        action_types=(5, 7, 11),
        tokenizer_model_max_length=None,
    )
    base.update(kw)
    return ModelConfig(**base)


def random_params(cfg, seed=0, std=0.2):
    """numpy-random params for every spec (much faster than per-leaf jax.random init on CPU)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape) * std, jnp.float32),
                        llava.param_specs(cfg), is_leaf=is_spec)


@pytest.mark.parametrize("limit", [None, 30])
def test_forward_splices_like_reference(limit):
    cfg, execution = tiny_cfg(tokenizer_model_max_length=limit), ExecutionConfig().resolve("cpu", 1)
    params = random_params(cfg)
    rows = [([0, 0] + [1] * 8, 4), ([1] * 7 + [0] * 3, 1)]
    _, ids, labels, mask, _, _ = make_batch(rows, d=cfg.text.hidden_size, seed=11, vocab=cfg.text.vocab_size)
    frames = 2
    pix = jax.random.uniform(jax.random.key(1), (2, frames, 3, 14, 14), minval=-1, maxval=1)
    out = forward_with_losses(params, jnp.asarray(ids), pix, jnp.asarray(mask), jnp.asarray(labels), None, cfg=cfg,
                              execution=execution)

    v = cfg.tokens_per_video(frames)
    assert v == frames * 4 * 5 + 1
    visual = np.asarray(jax.jit(llava.encode_videos, static_argnums=(2, 3))(params, pix, cfg, execution))
    assert visual.shape == (2, v, cfg.text.hidden_size)
    embeds = np.asarray(params["text"]["embed"])[np.where(ids == IMG, 0, ids)]
    e, l, m, p, _ = ref_splice(embeds, ids, labels, mask, visual, max_len=limit, n_action_pos=1)
    w = e.shape[1]
    expected_len = min(10 - 1 + v, limit or 10**9)  # static: from the input shapes only
    assert out.logits.shape == (2, expected_len, cfg.text.vocab_size)
    assert w == min(8 - 1 + v, limit or 10**9)  # sample 0 (8 real tokens) is the longest here
    pad = expected_len - w
    e = np.pad(e, ((0, 0), (0, pad), (0, 0)))
    l = np.pad(l, ((0, 0), (0, pad)), constant_values=IGNORE)
    m, p = np.pad(m, ((0, 0), (0, pad))), np.pad(p, ((0, 0), (0, pad)))
    np.testing.assert_array_equal(np.asarray(out.labels), l)
    np.testing.assert_array_equal(np.asarray(out.valid), m)

    decode = jax.jit(lambda t, x, pos, val: qwen2.lm_head(t, qwen2.forward(t, x, pos, val, cfg.text)[0]))
    ref_logits = np.asarray(decode(params["text"], jnp.asarray(e), jnp.asarray(p, jnp.int32), jnp.asarray(m)))
    np.testing.assert_allclose(np.asarray(out.logits)[m], ref_logits[m], atol=1e-5, rtol=1e-5)
