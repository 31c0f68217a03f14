"""Videos of different lengths, images and text-only samples in one batch.

Upstream takes a list of per-sample frame tensors of any lengths (llavaction/model/llava_arch.py:
prepare_inputs_labels_for_multimodal): every video is encoded, pooled and laid out at its own frame count, and the
spliced sequences are right-padded to the longest. We pad the frames to the longest video with a per-sample count
(`api.pack_frames`, `batching.collate`) and keep each sample's own visual tokens (`llava.keep_frames`).

References:
* transformers' LlavaOnevision run on each sample alone (its own frame count, no padding anywhere): logits, the
  token-mean LM loss and its gradients of the padded batch must match;
* for LLaVAction layouts (grid newlines, action tokens, verb/noun/action heads), which transformers lacks: the
  same model on each sample alone (batch of one, exactly its frames), whose path the fixed-length parity tests
  already check against upstream references.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_parity_hf import SIGLIP, qwen2_config, randomise, state_numpy
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, SiglipVisionConfig

from llavaction_jax import api
from llavaction_jax.api import LlavaModel, forward_with_losses, pack_frames
from llavaction_jax.config import ExecutionConfig, ModelConfig, TextConfig, VisionConfig
from llavaction_jax.convert.import_plan import torch_to_params
from llavaction_jax.convert.upstream_config import from_upstream
from llavaction_jax.data.batching import collate
from llavaction_jax.model import llava
from llavaction_jax.model.params import is_spec

IMG, IGNORE = -200, -100
HF_VIDEO = 301
EX = ExecutionConfig().resolve("cpu", 1)


@pytest.fixture(scope="module")
def onevision():
    hf_cfg = LlavaOnevisionConfig(
        text_config=qwen2_config(False), vision_config=SiglipVisionConfig(num_hidden_layers=2, **SIGLIP),
        image_token_index=300, video_token_index=HF_VIDEO, vision_feature_layer=-1,
        vision_feature_select_strategy="full", tie_word_embeddings=False)
    torch.manual_seed(0)
    model = randomise(LlavaOnevisionForConditionalGeneration(hf_cfg))
    cfg = from_upstream(hf_cfg.to_dict())
    return model, cfg, torch_to_params(state_numpy(model), cfg)


def _samples(rng, frames: list[int | None], text=((5, 4), (3, 6), (6, 2))):
    """Per sample: (ids before the video, ids after, frames or None, labels of the text tokens)."""
    out = []
    for t, (a, b) in zip(frames, text):
        before, after = rng.integers(0, 300, a), rng.integers(0, 300, b)
        pixels = None if t is None else rng.uniform(-1, 1, (t, 3, 32, 32)).astype(np.float32)
        out.append((before, after, pixels))
    return out


def _padded_batch(samples):
    """Our convention: one -200 per video sample, right padding, labels = the next text tokens (-100 on the -200)."""
    rows = [np.concatenate([b, [IMG], a]) if p is not None else np.concatenate([b, a]) for b, a, p in samples]
    length = max(map(len, rows))
    ids = np.zeros((len(rows), length), np.int64)
    mask = np.zeros((len(rows), length), bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, True
    labels = np.where(mask & (ids != IMG), ids, IGNORE)
    return ids, mask, labels


def _hf_sample(model, cfg, before, after, pixels):
    """transformers on one sample alone: (logits (S, V), labels (S,)) of its spliced sequence."""
    n = 0 if pixels is None else cfg.tokens_per_video(len(pixels))
    ids = np.concatenate([before, np.full(n, HF_VIDEO), after])
    labels = np.concatenate([before, np.full(n, IGNORE), after])
    kwargs = {} if pixels is None else {"pixel_values_videos": torch.tensor(pixels[None])}
    logits = model(input_ids=torch.tensor(ids[None]), **kwargs).logits[0]
    return logits, torch.tensor(labels)


def _token_mean_ce(pairs):
    """Upstream's LM loss over a batch: summed next-token CE of every sample / all target tokens of the batch."""
    total = sum(F.cross_entropy(lg[:-1], lb[1:], ignore_index=IGNORE, reduction="sum") for lg, lb in pairs)
    return total / sum(int((lb[1:] != IGNORE).sum()) for _, lb in pairs)


@pytest.mark.parametrize("frames", [[4, 2], [1, 3, None]], ids=["4+2 frames", "image+video+text"])
def test_padded_batch_matches_transformers_per_sample(onevision, frames):
    model, cfg, params = onevision
    rng = np.random.default_rng(len(frames))
    samples = _samples(rng, frames)
    # an image enters as (3, H, W), as a user passes it; a text-only sample as None
    pixel_list = [p[0] if p is not None and len(p) == 1 else p for _, _, p in samples]
    ids, mask, labels = _padded_batch(samples)

    model.zero_grad()
    pairs = [_hf_sample(model, cfg, *s) for s in samples]
    ref_loss = _token_mean_ce(pairs)
    ref_loss.backward()
    ref_loss = float(ref_loss.detach())
    ref_grads = torch_to_params({k: (p.grad.numpy() if p.grad is not None else np.zeros(p.shape, np.float32))
                                 for k, p in model.named_parameters()} | {
        k: np.zeros(v.shape, np.float32) for k, v in model.state_dict().items()
        if k not in dict(model.named_parameters())}, cfg)

    out = LlavaModel(cfg, params)(ids, pixel_list, attention_mask=mask, labels=labels)
    valid = np.asarray(out.valid)
    for i, (logits, lab) in enumerate(pairs):
        n = len(lab)
        assert valid[i].sum() == n, f"sample {i}: {valid[i].sum()} real positions, transformers has {n}"
        np.testing.assert_allclose(np.asarray(out.logits)[i, :n], logits.detach().numpy(), atol=1e-4, rtol=0,
                                   err_msg=f"sample {i}")
        np.testing.assert_array_equal(np.asarray(out.labels)[i, :n], lab.numpy())
    np.testing.assert_allclose(float(out.loss), ref_loss, rtol=1e-5)

    video = pack_frames(pixel_list, len(ids))
    np.testing.assert_array_equal(video.num_frames, [0 if f is None else f for f in frames])
    batch = jax.tree.map(jnp.asarray, dict(input_ids=ids, attention_mask=mask, labels=labels,
                                           pixel_values=video.pixels, has_video=video.has_video,
                                           num_frames=video.num_frames))
    grads = jax.grad(lambda p: forward_with_losses(p, actions=None, cfg=cfg, execution=EX, **batch).loss)(params)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        # relative to the tensor's largest gradient: fp32 sums over the batch in two frameworks, ~1e-6 apart
        scale = max(float(np.abs(want).max()), 1e-3)
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-5 * scale + 1e-7, rtol=0,
                                   err_msg=jax.tree_util.keystr(path))


# ----------------------------------------------------------------------------------- LLaVAction layouts and heads
N_VERB, N_NOUN, N_ACTION = 5, 7, 11


def tiny_llavaction(**kw) -> ModelConfig:
    base = dict(
        vision=VisionConfig(hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2, image_size=14, patch_size=2),
        text=TextConfig(vocab_size=40, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                        rope_theta=10000.0),
        action_types=(N_VERB, N_NOUN, N_ACTION), tokenizer_model_max_length=None,
        vision_supervision="one_token", vision_token_training="last_layer")
    base.update(kw)
    return ModelConfig(**base)


def _random_params(cfg, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape) * 0.3, jnp.float32),
                        llava.param_specs(cfg), is_leaf=is_spec)


def _run(params, cfg, ids, mask, labels, actions, pixels, has_video, num_frames):
    return forward_with_losses(params, jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(mask), jnp.asarray(labels),
                               jnp.asarray(actions), jnp.asarray(has_video), jnp.asarray(num_frames), cfg=cfg,
                               execution=EX)


LAYOUTS = {
    "LLaVAction (grid, one action token)": {},
    "three action tokens, all layers": dict(vision_supervision="three_tokens", vision_token_training="all_layers"),
    "frame newlines, newline supervision": dict(newline_position="frame", vision_supervision="newline"),
}  # the one_token / flat layouts share the same frame-then-tail structure: test_keep_frames_... covers the move
WITH_GRADIENTS = "LLaVAction (grid, one action token)"  # forward-only elsewhere: each compile of a grad costs ~10 s


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_padded_batch_equals_each_sample_alone(layout):
    cfg = tiny_llavaction(**LAYOUTS[layout])
    params = _random_params(cfg)
    rng = np.random.default_rng(3)
    frames = [3, 1]
    samples = [(rng.integers(1, 40, a), rng.integers(1, 40, b), rng.uniform(-1, 1, (t, 3, 14, 14)).astype(np.float32))
               for t, (a, b) in zip(frames, ((3, 5), (6, 2)))]
    ids, mask, labels = _padded_batch(samples)
    actions = np.array([[1, 2, 3], [4, 6, 10]], np.int32)
    with_grads = layout == WITH_GRADIENTS
    video = pack_frames([p for _, _, p in samples], len(ids))
    has_heads = cfg.vision_supervision is not None

    def batch_loss(p):
        out = _run(p, cfg, ids, mask, labels, actions, video.pixels, video.has_video, video.num_frames)
        return out.loss, out

    if with_grads:
        (loss, out), grads = jax.value_and_grad(batch_loss, has_aux=True)(params)
    else:
        loss, out = batch_loss(params)

    # Each sample alone: its exact frames, no padding. Combine as the batch reduces: LM loss = token mean over the
    # batch (weights n_i / N), vision-supervision loss = mean over the labelled samples.
    n_targets = [int((labels[i][mask[i]][1:] != IGNORE).sum()) for i in range(len(ids))]
    total = sum(n_targets)
    want_loss, want_grads = 0.0, jax.tree.map(jnp.zeros_like, params)
    for i, (before, after, pixels) in enumerate(samples):
        one = _padded_batch([(before, after, pixels)])

        def alone_parts(p, one=one, i=i, pixels=pixels):
            o = _run(p, cfg, *one, actions[i:i + 1], pixels[None], np.ones(1, bool), np.array([len(pixels)]))
            aux = o.aux_loss if has_heads else 0.0
            return o.lm_loss * n_targets[i] / total + 0.1 * aux / len(ids), o

        if with_grads:
            (part, alone), g = jax.value_and_grad(alone_parts, has_aux=True)(params)
            want_grads = jax.tree.map(jnp.add, want_grads, g)
        else:
            part, alone = alone_parts(params)
        want_loss += float(part)
        n = int(np.asarray(alone.valid).sum())
        assert int(np.asarray(out.valid)[i].sum()) == n
        assert n == mask[i].sum() - 1 + cfg.tokens_per_video(len(pixels))
        np.testing.assert_allclose(np.asarray(out.logits)[i, :n], np.asarray(alone.logits)[0, :n], atol=2e-5,
                                   err_msg=f"sample {i} ({len(pixels)} frames)")
        np.testing.assert_array_equal(np.asarray(out.labels)[i, :n], np.asarray(alone.labels)[0, :n])
        if has_heads:
            for k in range(3):
                np.testing.assert_allclose(np.asarray(out.head_logits[k])[i], np.asarray(alone.head_logits[k])[0],
                                           atol=2e-5, err_msg=f"head {k}, sample {i}")
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    if not with_grads:
        return
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-4,
                                   err_msg=jax.tree_util.keystr(path))


def test_keep_frames_moves_the_tail_after_each_videos_frames():
    cfg = tiny_llavaction()  # grid: 4 rows x (4 + 1) = 20 tokens per frame, then 1 action token
    per, tail = cfg.tokens_per_video(1) - cfg.tokens_per_video(0), cfg.tokens_per_video(0)
    assert (per, tail) == (20, 1)
    t = 3
    tokens = jnp.arange(t * per + tail, dtype=jnp.float32)[None, :, None].repeat(2, 0)
    kept, counts = llava.keep_frames(tokens, jnp.array([3, 1]), cfg)
    np.testing.assert_array_equal(counts, [61, 21])
    np.testing.assert_array_equal(kept[0, :, 0], np.arange(61))
    np.testing.assert_array_equal(kept[1, :21, 0], [*range(20), 60])  # frame 0, then the action token


# ------------------------------------------------------------------------------------------ host-side packing
def test_pack_frames_pads_and_counts():
    img = np.full((3, 4, 4), 0.5, np.float32)
    vid = np.ones((3, 3, 4, 4), np.float32)
    f = pack_frames([vid, None, img], 3)
    assert f.pixels.shape == (3, 3, 3, 4, 4)
    np.testing.assert_array_equal(f.num_frames, [3, 0, 1])
    np.testing.assert_array_equal(f.has_video, [True, False, True])
    assert (f.pixels[1] == 0).all() and (f.pixels[2, 1:] == 0).all() and (f.pixels[2, 0] == 0.5).all()


@pytest.mark.parametrize("bad,message", [
    ([np.zeros((2, 3, 4, 4)), np.zeros((1, 3, 8, 8))], r"same \(C, H, W\) size"),
    ([np.zeros((2, 3, 4, 4))], "1 entries for a batch of 2"),
    ([None, None], "every entry is None"),
    ([np.zeros((0, 3, 4, 4)), None], r"pixel_values\[0\]"),
])
def test_pack_frames_refuses_with_a_message(bad, message):
    with pytest.raises(ValueError, match=message):
        pack_frames(bad, 2)


def test_placeholder_rules_follow_each_sample():
    ids = np.array([[1, IMG, 2], [1, 2, 3]])
    api.check_placeholders(ids, np.ones_like(ids, bool), np.array([True, False]))
    with pytest.raises(ValueError, match="sample 0 has a video placeholder"):
        api.check_placeholders(ids, np.ones_like(ids, bool), np.array([False, False]))
    with pytest.raises(ValueError, match="sample 1 has 0 video placeholders"):
        api.check_placeholders(ids, np.ones_like(ids, bool), np.array([True, True]))


def test_collate_pads_short_clips_and_refuses_long_ones():
    def element(i, t):
        e = {"input_ids": np.array([5, 6, 7]), "labels": np.array([-100, 6, 7]), "actions": np.array([1, 2, 3]),
             "has_video": t > 0, "sample_id": f"s{i}"}
        if t:
            e["frames"] = np.full((t, 4, 4, 3), 255, np.uint8)
        return e

    batch = collate([element(0, 3), element(1, 1), element(2, 0)], (8,), num_frames=3, frame_size=4)
    np.testing.assert_array_equal(batch["num_frames"], [3, 1, 0])
    assert (batch["pixel_values"][0] == 1).all()  # 255 -> 1 after upstream's normalization
    assert (batch["pixel_values"][1, 0] == 1).all() and (batch["pixel_values"][1, 1:] == 0).all()
    assert (batch["pixel_values"][2] == 0).all()
    with pytest.raises(ValueError, match="sample 's0' has 3 frames, more than the batch's 2"):
        collate([element(0, 3)], (8,), num_frames=2, frame_size=4)


# --------------------------------------------------------------------------------- training on mixed batches
@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory):
    """Shards with clips of 3, 2 and 1 frames (a 1-frame clip is an image) at 1-fps sampling capped at 3 frames,
    samples for each plus a text-only one, and a tiny ChatML tokenizer."""
    from llavaction_jax.data import frames as fs
    from llavaction_jax.data.tokenizer import train_chatml_tokenizer

    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    writer = fs.ShardWriter(root / "clips.array_record")
    samples = []
    for i, t in enumerate([3, 2, 1, 3, 4]):
        pixels = rng.integers(0, 256, (t, 64, 64, 3), dtype=np.uint8)
        writer.write(fs.ClipRecord(f"c{i}", "v", 0.0, float(t), 1.0, tuple(range(t)), fs.encode_frames(pixels, "png"),
                                   "png", float(t)))
        samples.append({"id": f"s{i}", "uid": f"c{i}", "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "ABCD"[i % 4] * (i + 1)}]})
    samples.insert(2, {"id": "text", "conversations": [{"from": "human", "value": "Say B."},
                                                        {"from": "gpt", "value": "B"}]})
    fs.write_manifest(root, [writer.commit()], {"frames_upbound": 3}, frames_per_clip=None)
    train_chatml_tokenizer([str(s) for s in samples] * 4, vocab_size=300, out_dir=root / "tokenizer")
    return root, samples


def _pipeline(root, samples, shards=None, **kw):
    from llavaction_jax.data.pipeline import TrainPipelineConfig, train_dataset

    shards = root if shards is None else shards
    config = TrainPipelineConfig(batch_size=4, tokenizer_path=str(root / "tokenizer"), pad_id=0, max_length=64,
                                 length_buckets=(64,), shuffle=False, num_epochs=1, frame_size=64, **kw)
    return iter(train_dataset(samples, shards, config, process_index=0, process_count=1))


def test_pipeline_keeps_each_clips_frame_count(mixed_data):
    root, samples = mixed_data
    batch = next(_pipeline(root, samples[:4]))  # clips of 3, 2 frames, the text sample, a 1-frame clip
    assert batch["pixel_values"].shape[1] == 3  # the manifest's frames_upbound
    np.testing.assert_array_equal(batch["num_frames"], [3, 2, 0, 1])
    np.testing.assert_array_equal(batch["has_video"], [True, True, False, True])
    assert (batch["pixel_values"][1, 2:] == 0).all() and (batch["pixel_values"][3, 1:] == 0).all()
    assert not (batch["pixel_values"][3, 0] == 0).all()


def test_pipeline_refuses_a_clip_longer_than_the_batch(mixed_data):
    root, samples = mixed_data
    with pytest.raises(Exception, match=r"clip 'c4' has 4 frames, more than the pipeline's 3"):
        next(_pipeline(root, samples[2:]))
    skipped = next(_pipeline(root, samples[2:] + samples[:1], on_bad_sample="skip"))
    assert list(skipped["sample_id"]) == ["text", "s2", "s3", "s0"] and int(skipped["num_skipped"]) == 1


def test_a_mixed_image_video_text_batch_trains(mixed_data):
    from llavaction_jax.config import load_preset
    from llavaction_jax.data.batching import MODEL_KEYS
    from llavaction_jax.train.optim import OptimizerConfig, make_optimizer, param_groups
    from llavaction_jax.train.step import init_state, make_train_step

    root, samples = mixed_data
    batch = next(_pipeline(root, samples[:4]))
    batch = {k: jnp.asarray(batch[k]) for k in MODEL_KEYS}
    cfg = load_preset("tiny").replace(action_types=(8, 8, 16))
    params = llava.init(cfg, jax.random.key(0))
    opt = OptimizerConfig(learning_rate=3e-3, vision_lr=3e-3, warmup_ratio=0.0, total_steps=8)
    tx, _ = make_optimizer(params, opt)
    step = jax.jit(make_train_step(cfg, EX, tx, param_groups(params, opt)), donate_argnums=0)
    state = init_state(params, tx)
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.5 * losses[0], losses


def test_two_shard_folders_feed_one_mixture(mixed_data, tmp_path):
    """EK100 clips and LLaVA-Video-178K videos come from two extractions: `data.shards=a,b` reads both."""
    from llavaction_jax.data import frames as fs

    root, samples = mixed_data
    writer = fs.ShardWriter(tmp_path / "more.array_record")
    pixels = np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    writer.write(fs.ClipRecord("other", "w", 0.0, 2.0, 1.0, (0, 1), fs.encode_frames(pixels, "png"), "png", 2.0))
    fs.write_manifest(tmp_path, [writer.commit()], {}, frames_per_clip=2)
    extra = {"id": "o", "uid": "other", "conversations": samples[0]["conversations"]}
    shards = fs.open_shards(f"{root},{tmp_path}")
    assert isinstance(shards, fs.ShardSet) and shards.max_frames_per_clip == 3 and shards.frames_per_clip is None
    batch = next(_pipeline(root, [samples[0], extra, samples[1], samples[3]], shards=shards))
    np.testing.assert_array_equal(batch["num_frames"], [3, 2, 2, 1])
    np.testing.assert_array_equal(batch["pixel_values"][1, :2].shape, (2, 3, 64, 64))
    with pytest.raises(ValueError, match=r"clip uid 'c0' is in two shard directories"):
        fs.open_shards([root, root])
