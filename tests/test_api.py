"""The public API: upstream input convention, host-side errors, save/load, and sharding over an 8-device mesh."""

import jax
import numpy as np
import pytest

import llavaction_jax
from llavaction_jax.api import LlavaModel
from llavaction_jax.config import ConfigError, load_preset
from llavaction_jax.sharding import make_mesh

CFG = load_preset("tiny")


@pytest.fixture(scope="module")
def model():
    return LlavaModel.random(CFG, seed=0)


def batch(rng, n=2, length=9, frames=2):
    ids = rng.integers(0, CFG.text.vocab_size, size=(n, length))
    ids[:, 3] = -200
    pixels = rng.uniform(-1, 1, size=(n, frames, 3, 64, 64)).astype(np.float32)
    return ids, pixels


def test_call_returns_logits_and_loss_in_upstream_convention(model):
    rng = np.random.default_rng(0)
    ids, pixels = batch(rng)
    out = model(ids, list(pixels), labels=ids, actions=np.array([[1, 2, 3], [-1, -1, -1]]))
    n_vis = CFG.tokens_per_video(2)
    assert n_vis == 2 * 2 * 3 + 1  # 2 frames x (2 rows x (2 tokens + newline)) + action token
    assert out.logits.shape == (2, 9 - 1 + n_vis, CFG.text.vocab_size)
    assert np.isfinite(float(out.loss)) and float(out.aux_loss) > 0
    assert np.isclose(float(out.loss), float(out.lm_loss) + 0.1 * float(out.aux_loss), rtol=1e-6)


def test_torch_tensors_and_single_image_are_accepted(model):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    ids, pixels = batch(rng, n=1, frames=1)
    from_numpy = model(ids, pixels[0])  # (T, C, H, W) of one sample
    from_torch = model(torch.tensor(ids), [torch.tensor(pixels[0, 0])])  # a (C, H, W) image = 1-frame video
    np.testing.assert_allclose(np.asarray(from_torch.logits), np.asarray(from_numpy.logits), atol=1e-6)


def test_placeholder_errors_name_the_sample(model):
    rng = np.random.default_rng(2)
    ids, pixels = batch(rng)
    ids[1, 5] = -200
    with pytest.raises(ValueError, match="sample 1 has 2 video placeholders"):
        model(ids, pixels)
    ids[1, 3] = ids[1, 5] = 7
    with pytest.raises(ValueError, match="sample 1 has 0 video placeholders"):
        model(ids, pixels)


def test_token_ids_outside_the_vocabulary_are_refused_before_any_computation(model):
    """An id outside [0, vocab) would embed as NaN and make every logit NaN: the API refuses it, naming where it is
    (the -200 video placeholder aside), in __call__, generate and score_options (Qwen2's tokenizer on the tiny
    512-token model)."""
    ids, pixels = batch(np.random.default_rng(4))
    for position, bad in (((0, 0), 151644), ((1, 8), -1), ((0, 5), CFG.text.vocab_size)):
        wrong = ids.copy()
        wrong[position] = bad
        with pytest.raises(ValueError, match=rf"input_ids\[{position[0]}, {position[1]}\] = {bad} is outside the "
                                             rf"model's vocabulary \[0, {CFG.text.vocab_size}\)"):
            model(wrong, pixels)
    assert np.isfinite(np.asarray(model(ids, pixels).logits)).all()  # in range, -200 included: computed
    qwen = LlavaModel(CFG, model.params)  # no directory, so no tokenizer files: Qwen2's 151,646 tokens
    for call in (lambda: qwen.generate([pixels[0]], ["What is this?"], max_new_tokens=2),
                 lambda: qwen.score_options([pixels[0]], ["What is this?"], [["A. yes", "B. no"]])):
        with pytest.raises(ValueError, match=r"the tokenizer's prompt ids\[0, \d+\] = \d+ is outside the "
                                             r"model's vocabulary \[0, 512\)"):
            call()


def test_wrong_frame_size_is_a_clear_error(model):
    ids, _ = batch(np.random.default_rng(3))
    with pytest.raises(ValueError, match=r"vision tower expects \(3, 64, 64\)"):
        model(ids, np.zeros((2, 2, 3, 48, 64), np.float32))


def test_too_long_without_truncation_errors_and_truncation_cuts():
    cfg = CFG.replace(tokenizer_model_max_length=12)
    model = LlavaModel.random(cfg)
    ids, pixels = batch(np.random.default_rng(4))
    with pytest.raises(ValueError, match="tokenizer_model_max_length=12"):
        model(ids, pixels, truncate=False)
    assert model(ids, pixels).logits.shape[1] == 12


def test_unsupported_config_value_names_the_key():
    with pytest.raises(ConfigError, match="mm_newline_position"):
        CFG.replace(newline_position="every_other_row")


def test_save_and_load_pretrained_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    loaded = llavaction_jax.load_pretrained(tmp_path / "m")
    assert loaded.cfg == model.cfg
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(loaded.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileExistsError):
        model.save_pretrained(tmp_path / "m")  # never overwrites what was written before


@pytest.mark.watchdog(600)  # 8 fake devices: a child process with a deadline (tests/_watchdog.py)
def test_same_logits_on_8_device_mesh_as_on_one_device(model, tmp_path):
    assert jax.device_count() == 8
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    rng = np.random.default_rng(5)
    ids, pixels = batch(rng, n=4)
    ref = model(ids, pixels, labels=ids)
    sharded = LlavaModel(CFG, model.params, mesh)
    assert len(sharded.params["text"]["layers"]["mlp"]["up"]["kernel"].sharding.device_set) == 8
    out = sharded(ids, pixels, labels=ids)
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref.logits), atol=1e-5)
    np.testing.assert_allclose(float(out.loss), float(ref.loss), rtol=1e-5)
    # restoring straight into the mesh's shardings gives the same model
    model.save_pretrained(tmp_path / "m")
    restored = llavaction_jax.load_pretrained(tmp_path / "m", mesh=mesh)
    spec = restored.params["text"]["embed"].sharding.spec
    assert spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    np.testing.assert_allclose(np.asarray(restored(ids, pixels).logits), np.asarray(ref.logits), atol=1e-5)
