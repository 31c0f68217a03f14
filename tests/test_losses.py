"""LM loss and the vision-supervision auxiliary loss vs torch references written from upstream
`llavaction/model/language_model/llava_qwen.py: LlavaQwenForCausalLM.forward` (lines 156-277 @bd9f465):

* LM loss: `CrossEntropyLoss()` on logits[:, :-1] vs labels[:, 1:], -100 ignored, mean over the whole batch.
* aux loss: heads on the hidden state(s) at the action token(s) of every entry of `all_states` (embeddings, outputs of
  layers 0..L-2, final normed output); triples filtered by `vision_token_training` (last_layer -> [-1:],
  first_layer -> [:1], all_layers -> all); per triple 0.5 CE(verb) + 0.5 CE(noun) + 0.1 CE(action), each a mean over
  rows with actions[:, 0] >= 0; summed, divided by len(triples) + 1; total loss = LM + 0.1 * that.
  one_token / newline: all heads read action position 0; three_tokens: verb 0, noun 1, action 2.

The hidden states at the action positions are computed independently of the implementation: the sequence is spliced
by a Python reference here and run through transformers' `Qwen2Model(..., output_hidden_states=True)` (upstream's
`all_states` is that tuple), with the same text weights.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llavaction_jax.config import ExecutionConfig, ModelConfig, TextConfig, VisionConfig
from llavaction_jax import losses
from llavaction_jax.api import forward_with_losses
from llavaction_jax.model import llava, qwen2
from llavaction_jax.model.params import is_spec

from _loss_reference import chunked_lm_loss, lm_loss, vision_supervision_loss

IMG, IGNORE = -200, -100
N_VERB, N_NOUN, N_ACTION = 5, 7, 11


# ---------------------------------------------------------------------------------------------- torch references
def torch_lm_loss(logits: np.ndarray, labels: np.ndarray) -> float:
    lg = torch.from_numpy(np.array(logits, np.float32))
    lb = torch.from_numpy(np.array(labels, np.int64))
    shift_logits = lg[..., :-1, :].contiguous().view(-1, lg.shape[-1])
    shift_labels = lb[..., 1:].contiguous().view(-1)
    return float(torch.nn.CrossEntropyLoss()(shift_logits, shift_labels))


def torch_aux_loss(all_states: np.ndarray, heads: dict, actions: np.ndarray, supervision: str, training: str) -> float:
    """all_states: (L + 1, B, P, H) hidden states at the action positions. Upstream's loop, literally."""
    wv, wn, wa = (torch.from_numpy(np.array(heads[k]["kernel"])).T for k in ("verb", "noun", "action"))  # [out, in]
    act = torch.from_numpy(np.array(actions, np.int64))
    pos = (0, 1, 2) if supervision == "three_tokens" else (0, 0, 0)
    triples = []
    for layer in torch.from_numpy(np.array(all_states, np.float32)):
        triples.append((layer[:, pos[0]] @ wv.T, layer[:, pos[1]] @ wn.T, layer[:, pos[2]] @ wa.T))
    if training == "last_layer":
        triples = triples[-1:]
    elif training == "first_layer":
        triples = triples[:1]
    loss_fct = torch.nn.CrossEntropyLoss()
    total = 0.0
    for v, n, a in triples:
        valid = act[:, 0] >= 0
        if valid.any():
            total += (0.5 * loss_fct(v[valid], act[valid, 0]) + 0.5 * loss_fct(n[valid], act[valid, 1])
                      + 0.1 * loss_fct(a[valid], act[valid, 2]))
        else:
            total += 0.0 * (v.sum() + n.sum() + a.sum())
    return float(total / (len(triples) + 1))


# ---------------------------------------------------------------------------------------------- unit level
@pytest.mark.parametrize("training", ["last_layer", "first_layer", "all_layers"])
@pytest.mark.parametrize("supervision", ["one_token", "three_tokens", "newline"])
def test_vision_supervision_loss_vs_torch(supervision, training):
    rng = np.random.default_rng(len(supervision) * 10 + len(training))
    n_layers, b, d = 4, 5, 6
    p = 3 if supervision == "three_tokens" else 1
    states = rng.standard_normal((n_layers + 1, b, p, d)).astype(np.float32)
    heads = {k: {"kernel": rng.standard_normal((d, n)).astype(np.float32)}
             for k, n in (("verb", N_VERB), ("noun", N_NOUN), ("action", N_ACTION))}
    actions = np.stack([rng.integers(0, N_VERB, b), rng.integers(0, N_NOUN, b), rng.integers(0, N_ACTION, b)], 1)
    actions[[1, 3]] = -1  # samples without labels
    ref = torch_aux_loss(states, heads, actions, supervision, training)
    got = vision_supervision_loss(jax.tree.map(jnp.asarray, heads), jnp.asarray(states), jnp.asarray(actions),
                                  vision_token_training=training, three_tokens=supervision == "three_tokens")
    np.testing.assert_allclose(float(got), ref, rtol=1e-5, atol=1e-6)


def test_aux_loss_ignores_unlabelled_rows_and_is_zero_without_labels():
    rng = np.random.default_rng(0)
    states = rng.standard_normal((3, 4, 1, 6)).astype(np.float32)
    heads = {k: {"kernel": jnp.asarray(rng.standard_normal((6, n)).astype(np.float32))}
             for k, n in (("verb", N_VERB), ("noun", N_NOUN), ("action", N_ACTION))}
    actions = np.array([[1, 2, 3], [-1, -1, -1], [4, 6, 10], [-1, -1, -1]])
    kw = dict(vision_token_training="all_layers", three_tokens=False)
    base = float(vision_supervision_loss(heads, jnp.asarray(states), jnp.asarray(actions), **kw))
    assert np.isfinite(base) and base > 0
    garbage = states.copy()
    garbage[:, [1, 3]] = 1e3  # unlabelled rows may hold anything
    np.testing.assert_allclose(float(vision_supervision_loss(heads, jnp.asarray(garbage), jnp.asarray(actions), **kw)),
                               base, rtol=1e-6)
    none = np.full_like(actions, -1)
    assert float(vision_supervision_loss(heads, jnp.asarray(states), jnp.asarray(none), **kw)) == 0.0


def test_lm_loss_vs_torch():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((3, 9, 13)).astype(np.float32) * 3
    labels = rng.integers(0, 13, (3, 9))
    labels[rng.random((3, 9)) < 0.4] = IGNORE
    labels[:, 1] = 5  # make sure there are targets
    np.testing.assert_allclose(float(lm_loss(jnp.asarray(logits), jnp.asarray(labels))),
                               torch_lm_loss(logits, labels), rtol=1e-6)


# ---------------------------------------------------------------------------------------------- through forward
def tiny_cfg(**kw):
    base = dict(
        vision=VisionConfig(hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2, image_size=14, patch_size=2),
        text=TextConfig(vocab_size=40, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                        rope_theta=10000.0),
        action_types=(N_VERB, N_NOUN, N_ACTION),
        tokenizer_model_max_length=None,
    )
    base.update(kw)
    return ModelConfig(**base)


def random_params(cfg, seed=0, std=0.3):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape) * std, jnp.float32),
                        llava.param_specs(cfg), is_leaf=is_spec)


EX = ExecutionConfig().resolve("cpu", 1)
FORWARD = lambda params, cfg, *args: forward_with_losses(params, *args, cfg=cfg, execution=EX)
ENCODE = jax.jit(llava.encode_videos, static_argnums=(2, 3))


def torch_text_model(cfg, seed=0):
    """A random transformers Qwen2 of `cfg.text`'s shape (norm scales and biases random too) and its weights in
    our layout (the converter's key table)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from llavaction_jax.convert.import_plan import torch_to_params

    t = cfg.text
    hf_cfg = Qwen2Config(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                         num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                         num_key_value_heads=t.num_kv_heads, rope_theta=t.rope_theta, rms_norm_eps=t.rms_norm_eps,
                         tie_word_embeddings=False, attn_implementation="eager")
    model = Qwen2ForCausalLM(hf_cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.3 * torch.randn(p.shape, generator=g))
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    text = torch_to_params(state, cfg, expected={"text": qwen2.param_specs(t)})["text"]
    return model.model, text


def torch_states_at(model, embeds, mask, positions, idx) -> np.ndarray:
    """transformers' hidden_states (embeddings, outputs of layers 0..L-2, final normed output) read at idx (B, P):
    (L + 1, B, P, H)."""
    with torch.no_grad():
        states = model(inputs_embeds=torch.from_numpy(embeds), attention_mask=torch.from_numpy(mask.astype(np.int64)),
                       position_ids=torch.from_numpy(positions.astype(np.int64)), output_hidden_states=True,
                       use_cache=False).hidden_states
    rows = np.arange(idx.shape[0])[:, None]
    return np.stack([s.numpy()[rows, idx] for s in states])


def ref_splice(embeds, ids, labels, mask, visual, out_len, n_pos):
    """Upstream 1.6 per sample (drop padding, replace the -200, labels -100 on visual rows, right-pad)."""
    b, d = ids.shape[0], embeds.shape[-1]
    e = np.zeros((b, out_len, d), np.float32)
    lab = np.full((b, out_len), IGNORE, np.int64)
    m = np.zeros((b, out_len), bool)
    pos = np.zeros((b, out_len), np.int32)
    act = np.zeros((b, n_pos), np.int32)
    for i in range(b):
        keep = mask[i]
        t_ids, t_lab, t_emb = ids[i][keep], labels[i][keep], embeds[i][keep]
        p = int(np.flatnonzero(t_ids == IMG)[0])
        rows = np.concatenate([t_emb[:p], visual[i], t_emb[p + 1 :]])
        rl = np.concatenate([t_lab[:p], np.full(visual.shape[1], IGNORE), t_lab[p + 1 :]])
        n = len(rows)
        e[i, :n], lab[i, :n], m[i, :n], pos[i, :n] = rows, rl, True, np.arange(n)
        act[i] = [p + visual.shape[1] - n_pos + k for k in range(n_pos)]  # L0 + L1 - 1 (or the last three)
    return e, lab, m, pos, act


@pytest.mark.parametrize(
    "supervision,training,actions",
    [
        ("one_token", "last_layer", [[1, 2, 3], [4, 6, 10]]),  # LLaVAction's setting
        ("one_token", "last_layer", [[1, 2, 3], [-1, -1, -1]]),  # (same config: no recompile)
        ("one_token", "last_layer", [[-1, -1, -1], [-1, -1, -1]]),
        ("one_token", "all_layers", [[-1, -1, -1], [0, 5, 7]]),
        ("three_tokens", "all_layers", [[2, 0, 9], [3, 1, 4]]),
        ("three_tokens", "all_layers", [[2, 0, 9], [-1, -1, -1]]),
        ("newline", "first_layer", [[1, 1, 1], [2, 2, 2]]),
    ],
)  # fmt: skip
def test_forward_losses_vs_torch(supervision, training, actions):
    cfg = tiny_cfg(vision_supervision=supervision, vision_token_training=training)
    hf_text, text = torch_text_model(cfg)
    params = dict(random_params(cfg), text=jax.tree.map(jnp.asarray, text))
    rng = np.random.default_rng(5)
    length = 9
    ids = rng.integers(1, cfg.text.vocab_size, (2, length))
    mask = np.ones((2, length), bool)
    mask[1, -3:] = False  # right padding
    mask[0, :1] = False  # and a left-padded sample
    ids[0, 3], ids[1, 2] = IMG, IMG
    labels = np.where(rng.random((2, length)) < 0.3, IGNORE, rng.integers(0, cfg.text.vocab_size, (2, length)))
    labels[ids == IMG] = IGNORE
    actions = np.asarray(actions)
    pix = jnp.asarray(rng.uniform(-1, 1, (2, 2, 3, 14, 14)).astype(np.float32))

    out = FORWARD(params, cfg, jnp.asarray(ids), pix, jnp.asarray(mask), jnp.asarray(labels), jnp.asarray(actions))

    # Independent route to the hidden states at the action token(s).
    n_pos = 3 if supervision == "three_tokens" else 1
    visual = np.asarray(ENCODE(params, pix, cfg, EX))
    embeds = np.asarray(params["text"]["embed"])[np.where(ids == IMG, 0, ids)]
    out_len = out.logits.shape[1]
    assert out_len == length - 1 + cfg.tokens_per_video(2)
    e, lab, m, pos, act = ref_splice(embeds, ids, labels, mask, visual, out_len, n_pos)
    np.testing.assert_array_equal(np.asarray(out.labels), lab)
    gathered = torch_states_at(hf_text, e, m, pos, act)
    assert gathered.shape == (cfg.text.num_layers + 1, 2, n_pos, cfg.text.hidden_size)
    if supervision == "one_token":  # the first entry is the embedding layer: the learned action token itself
        np.testing.assert_allclose(gathered[0, :, 0], np.broadcast_to(np.asarray(params["action_tokens"])[0], (2, 8)),
                                   rtol=0, atol=0)

    ref_aux = torch_aux_loss(gathered, params["heads"], actions, supervision, training)
    ref_lm = torch_lm_loss(np.asarray(out.logits), lab)
    got_aux = vision_supervision_loss(params["heads"], jnp.asarray(gathered), jnp.asarray(actions),
                                      vision_token_training=training, three_tokens=supervision == "three_tokens")
    np.testing.assert_allclose(float(got_aux), ref_aux, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(out.aux_loss), ref_aux, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(out.lm_loss), ref_lm, rtol=1e-5)
    np.testing.assert_allclose(float(out.loss - out.lm_loss), 0.1 * ref_aux, rtol=1e-4, atol=2e-6)
    np.testing.assert_allclose(float(out.loss), ref_lm + 0.1 * ref_aux, rtol=1e-5)
    if (actions[:, 0] < 0).all():
        assert float(out.aux_loss) == 0.0

    # Head logits at the final normed state (what the model reports for inspection).
    pos3 = (0, 1, 2) if supervision == "three_tokens" else (0, 0, 0)
    for k, (name, i) in enumerate(zip(("verb", "noun", "action"), pos3)):
        ref = torch.from_numpy(np.array(gathered[-1][:, i])) @ torch.from_numpy(np.array(params["heads"][name]["kernel"]))
        np.testing.assert_allclose(np.asarray(out.head_logits[k]), ref.numpy(), rtol=1e-4, atol=1e-5)


def test_last_layer_weight_is_0_05():
    """For LLaVAction's last_layer setting upstream's loss (LlavaQwenForCausalLM.forward) in closed form: loss = LM +
    0.05 * (0.5 CE_v + 0.5 CE_n + 0.1 CE_a)."""
    rng = np.random.default_rng(3)
    states = rng.standard_normal((3, 2, 1, 4)).astype(np.float32)
    heads = {k: {"kernel": rng.standard_normal((4, n)).astype(np.float32)}
             for k, n in (("verb", N_VERB), ("noun", N_NOUN), ("action", N_ACTION))}
    actions = np.array([[1, 2, 3], [0, 6, 10]])
    h = torch.from_numpy(states[-1, :, 0])
    a = torch.from_numpy(actions)
    ce = lambda name, col: F.cross_entropy(h @ torch.from_numpy(heads[name]["kernel"]), a[:, col])
    closed = 0.05 * float(0.5 * ce("verb", 0) + 0.5 * ce("noun", 1) + 0.1 * ce("action", 2))
    got = losses.AUX_LOSS_WEIGHT * vision_supervision_loss(
        jax.tree.map(jnp.asarray, heads), jnp.asarray(states), jnp.asarray(actions),
        vision_token_training="last_layer", three_tokens=False)
    np.testing.assert_allclose(float(got), closed, rtol=1e-5)


@pytest.mark.parametrize("chunk,skip_empty", [(1, True), (4, True), (4, False), (7, True), (64, True)])
def test_chunked_lm_loss_equals_the_full_logits_loss(chunk, skip_empty):
    """Values against torch's CE on the materialised logits, gradients against the unchunked JAX loss."""
    rng = np.random.default_rng(chunk)
    b, s, h, vocab = 2, 19, 8, 33
    hidden = jnp.asarray(rng.standard_normal((b, s, h)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((h, vocab)), jnp.float32)
    labels = rng.integers(0, vocab, size=(b, s))
    labels[0, :2] = losses.IGNORE_INDEX  # prompt positions
    labels[:, 3:14] = losses.IGNORE_INDEX  # a visual span in every row: whole chunks without targets are skipped
    labels[1, 16:] = losses.IGNORE_INDEX  # padding
    labels = jnp.asarray(labels)

    def chunked(hidden, w):
        return chunked_lm_loss(hidden, labels, lambda x: x @ w, chunk, skip_empty)

    def full(hidden, w):
        return lm_loss(hidden @ w, labels)

    want = torch_lm_loss(np.asarray(hidden @ w), np.asarray(labels))
    np.testing.assert_allclose(jax.jit(chunked)(hidden, w), want, rtol=1e-5)
    got_grads = jax.jit(jax.grad(chunked, argnums=(0, 1)))(hidden, w)
    want_grads = jax.jit(jax.grad(full, argnums=(0, 1)))(hidden, w)
    for got, ref in zip(got_grads, want_grads):
        assert np.abs(np.asarray(ref)).max() > 0
        np.testing.assert_allclose(got, ref, atol=1e-6, rtol=1e-5)


def test_training_forward_skips_the_logits_with_the_same_loss():
    from llavaction_jax.config import load_preset

    cfg, execution = load_preset("tiny"), ExecutionConfig(loss_chunk_tokens=16).resolve("cpu", 1)
    params = random_params(cfg, std=0.05)  # from numpy: llava.init's random programs would cost more than the test
    size = cfg.vision.image_size
    pixels = jax.random.uniform(jax.random.key(1), (2, 2, 3, size, size), minval=-1, maxval=1)
    ids = np.array(jax.random.randint(jax.random.key(2), (2, 12), 0, 100))
    ids[:, 3] = llava.IMAGE_TOKEN_INDEX
    labels = np.where(np.arange(12) >= 6, ids, losses.IGNORE_INDEX)
    actions = jnp.asarray([[1, 2, 3], [-1, -1, -1]])

    @functools.partial(jax.jit, static_argnames="with_logits")
    def run(with_logits):  # the API reads its logits; the train step computes them in chunks from hidden states
        out = llava.forward(params, cfg, execution, jnp.asarray(ids), pixels, labels=jnp.asarray(labels))
        logits = llava.lm_logits(params, out.hidden) if with_logits else None
        return losses.compute_losses(params, cfg, execution, out, actions, logits=logits)

    full, chunked = run(True), run(False)
    assert full.lm_loss > 0 and full.aux_loss > 0
    np.testing.assert_allclose(chunked.lm_loss, full.lm_loss, rtol=1e-6)
    np.testing.assert_allclose(chunked.loss, full.loss, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- loss reductions
def torch_upstream_loss(logits, labels, states, heads, actions, supervision, training) -> float:
    """Upstream's `LlavaQwenForCausalLM.forward` loss on one device batch: LM CE mean + 0.1 x aux loss."""
    return torch_lm_loss(logits, labels) + 0.1 * torch_aux_loss(states, heads, actions, supervision, training)


def reduction_batch(seed=11, supervision="one_token", training="all_layers"):
    """Four rows: a 30-token answer, a 3-token answer, a 6-token answer without action labels, a padding row."""
    rng = np.random.default_rng(seed)
    b, s, vocab, n_layers, d = 4, 40, 13, 3, 6
    p = 3 if supervision == "three_tokens" else 1
    logits = rng.standard_normal((b, s, vocab)).astype(np.float32) * 2
    labels = np.full((b, s), IGNORE)
    for row, (start, n) in enumerate([(5, 30), (20, 3), (10, 6)]):
        labels[row, start:start + n] = rng.integers(0, vocab, n)
    states = rng.standard_normal((n_layers + 1, b, p, d)).astype(np.float32)
    heads = {k: {"kernel": rng.standard_normal((d, n)).astype(np.float32)}
             for k, n in (("verb", N_VERB), ("noun", N_NOUN), ("action", N_ACTION))}
    actions = np.array([[1, 2, 3], [4, 6, 10], [-1, -1, -1], [-1, -1, -1]])
    return logits, labels, states, heads, actions


def ours(logits, labels, states, heads, actions, supervision, training, reduction):
    cfg = tiny_cfg(vision_supervision=supervision, vision_token_training=training)
    out = llava.ModelOutput(hidden=None, labels=jnp.asarray(labels), valid=None, action_states=jnp.asarray(states))
    return losses.compute_losses({"heads": jax.tree.map(jnp.asarray, heads)}, cfg, EX, out, jnp.asarray(actions),
                                 logits=jnp.asarray(logits), reduction=reduction)


@pytest.mark.parametrize("supervision,training", [("one_token", "last_layer"), ("three_tokens", "all_layers")])
def test_sample_reduction_is_upstreams_one_sample_per_device_mean(supervision, training):
    """Upstream's recipe runs one sample per device and averages over devices: the reference is upstream's loss
    of each sample alone, averaged over the samples with targets (the padding row weighs nothing: our rule)."""
    logits, labels, states, heads, actions = reduction_batch(supervision=supervision, training=training)
    per_device = [torch_upstream_loss(logits[i:i + 1], labels[i:i + 1], states[:, i:i + 1], heads, actions[i:i + 1],
                                      supervision, training) for i in range(3)]
    got = ours(logits, labels, states, heads, actions, supervision, training, "sample")
    np.testing.assert_allclose(float(got.loss), np.mean(per_device), rtol=1e-5)
    # The aux loss of a sample weighs 1 / (samples), not 1 / (labelled samples): 2 of the 3 samples have labels.
    aux_per_device = [torch_aux_loss(states[:, i:i + 1], heads, actions[i:i + 1], supervision, training)
                      for i in range(3)]
    np.testing.assert_allclose(float(got.aux_loss), np.mean(aux_per_device), rtol=1e-5)
    # and it is not the token mean: the 30-token answer would dominate
    token = torch_upstream_loss(logits, labels, states, heads, actions, supervision, training)
    assert abs(token - np.mean(per_device)) > 0.05


@pytest.mark.parametrize("supervision,training", [("one_token", "last_layer"), ("three_tokens", "all_layers")])
def test_token_reduction_is_upstreams_loss_of_the_whole_batch_on_one_device(supervision, training):
    logits, labels, states, heads, actions = reduction_batch(supervision=supervision, training=training)
    ref = torch_upstream_loss(logits, labels, states, heads, actions, supervision, training)
    got = ours(logits, labels, states, heads, actions, supervision, training, "token")
    np.testing.assert_allclose(float(got.loss), ref, rtol=1e-5)
    np.testing.assert_allclose(float(got.aux_loss), torch_aux_loss(states, heads, actions, supervision, training),
                               rtol=1e-5)


def test_sample_reduction_with_a_global_divisor_adds_up_over_micro_batches():
    """Two halves, each divided by the global batch's sample count, add up to the whole batch's mean; the
    chunked LM loss (training's route) gives the same per-row sums."""
    logits, labels, states, heads, actions = reduction_batch(supervision="one_token", training="last_layer")
    whole = ours(logits, labels, states, heads, actions, "one_token", "last_layer", "sample")
    cfg = tiny_cfg(vision_supervision="one_token", vision_token_training="last_layer")
    n = losses.count_samples(jnp.asarray(labels))
    assert int(n) == 3
    parts = 0.0
    for rows in ([0, 2], [1, 3]):
        out = llava.ModelOutput(hidden=None, labels=jnp.asarray(labels[rows]), valid=None,
                                action_states=jnp.asarray(states[:, rows]))
        parts += float(losses.compute_losses({"heads": jax.tree.map(jnp.asarray, heads)}, cfg, EX, out,
                                             jnp.asarray(actions[rows]), logits=jnp.asarray(logits[rows]),
                                             reduction="sample", num_samples=n).loss)
    np.testing.assert_allclose(parts, float(whole.loss), rtol=1e-6)
    # chunked per-row sums == full per-row sums (hidden = logits, identity head)
    full = losses.lm_row_sums(jnp.asarray(logits), jnp.asarray(labels))
    chunked = losses.chunked_lm_row_sums(jnp.asarray(logits), jnp.asarray(labels), lambda h: h, 7)
    np.testing.assert_allclose(np.asarray(chunked[0]), np.asarray(full[0]), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(chunked[1]), np.asarray(full[1]))
    with pytest.raises(ValueError, match="reduction"):
        ours(logits, labels, states, heads, actions, "one_token", "last_layer", "mean")
