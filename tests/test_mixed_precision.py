"""Mixed precision: fp32 master weights and moments whatever the checkpoint's dtype, compute in `compute_dtype`
("auto": bf16 on accelerators, fp32 on CPU), the final model written in the source's dtype."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _train_fixtures import make_training_data, tiny_train_config
from llavaction_jax import checkpoint_io
from llavaction_jax.api import LlavaModel, load_pretrained
from llavaction_jax.config import ExecutionConfig, load_preset
from llavaction_jax.model import llava
from llavaction_jax.train.loop import optimizer_config, train
from llavaction_jax.train.optim import param_groups
from test_train_loop import restore_state


def test_compute_dtype_auto_resolves_per_platform():
    cfg = ExecutionConfig(compute_dtype="auto")
    assert cfg.resolve("gpu", 1).compute_dtype == "bfloat16"
    assert cfg.resolve("tpu", 8).compute_dtype == "bfloat16"
    assert cfg.resolve("cpu", 1).compute_dtype == "float32"
    assert cfg.replace(compute_dtype="float32").resolve("gpu", 1).compute_dtype == "float32"  # explicit stays


@pytest.mark.watchdog(600, devices=1)  # a train run: in a child process, on one device (the claim is not sharding's)
def test_one_step_from_a_bf16_checkpoint_moves_every_trainable_tensor(tmp_path):
    """Upstream's learning rates (1e-5, vision 2e-6): bf16 weights near 0.02 are spaced ~1e-4 apart, so a bf16
    AdamW step of ~lr rounds most entries back (15% of the LLM moved); fp32 master weights take it."""
    data = make_training_data(tmp_path / "data")
    src = tmp_path / "bf16"
    cfg = load_preset("tiny").replace(param_dtype="bfloat16")
    LlavaModel.random(cfg, seed=3).save_pretrained(src)
    before = jax.tree.map(lambda x: np.asarray(x, np.float32), load_pretrained(src).params)
    out = tmp_path / "run"
    run_cfg = tiny_train_config(data, out, steps=1, **{"model.init_from": src, "optim.learning_rate": 1e-5,
                                                        "optim.vision_lr": 2e-6, "mesh.fsdp": -1, "mesh.tensor": 1})
    assert run_cfg.train.master_dtype == "float32" and run_cfg.model.param_dtype == "bfloat16"
    train(run_cfg)
    _, state = restore_state(out)
    groups = param_groups(state["params"], optimizer_config(run_cfg, 1))
    moved = {}
    for (path, new), old, group in zip(jax.tree_util.tree_leaves_with_path(state["params"]), jax.tree.leaves(before),
                                       jax.tree.leaves(groups)):
        assert new.dtype == np.float32, jax.tree_util.keystr(path)
        if group != "frozen":
            moved[jax.tree_util.keystr(path)] = float(np.mean(np.asarray(new) != old))
    assert moved and all(f > 0 for f in moved.values()), {k: v for k, v in moved.items() if v == 0}
    # Every entry with a gradient moves: all of every matrix but the embedding (rows of absent tokens get none).
    dense = {k: v for k, v in moved.items() if "embed" not in k}
    assert min(dense.values()) > 0.9, sorted(dense.items(), key=lambda kv: kv[1])[:5]
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0)
    # The final model is written in the checkpoint's dtype.
    final = out / "model"
    assert checkpoint_io.load_config(final).param_dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(load_pretrained(final).params)} == {jnp.dtype("bfloat16")}


def test_bf16_compute_logits_stay_close_to_fp32():
    """Same fp32 weights, activations in bf16 vs fp32. bf16 keeps 8 significant bits, so each rounding errs by up
    to 2^-8 (0.4%) relative; activations are rounded again at every matmul, norm and residual add from the pixels
    to the logits, and the errors add up (roughly as the square root of their number) to about 1% of the logits'
    spread on average, a few percent at the worst position (measured: mean 0.9%, max 6.0% of the std here). We
    allow mean 3% and max 15% of the logits' standard deviation, and the next-token argmax must agree at nearly
    every position (a near-tie within that error may flip)."""
    cfg = load_preset("tiny")
    params = llava.init(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    ids = rng.integers(10, cfg.text.vocab_size, (2, 24)).astype(np.int32)
    ids[:, 3] = -200
    pixels = jnp.asarray(rng.uniform(-1, 1, (2, 2, 3, cfg.vision.image_size, cfg.vision.image_size)), jnp.float32)

    def logits(dtype):
        execution = ExecutionConfig(compute_dtype=dtype).resolve("cpu", 1)

        @jax.jit  # as the model runs (the API and the train step jit it); op by op it cost a minute here
        def run(params, ids, pixels):
            out = llava.forward(params, cfg, execution, ids, pixels, jnp.ones(ids.shape, bool), None)
            return llava.lm_logits(params, out.hidden)

        return np.asarray(run(params, jnp.asarray(ids), pixels), np.float32)

    ref, low = logits("float32"), logits("bfloat16")
    scale = ref.std()
    err = np.abs(low - ref)
    assert err.mean() < 0.03 * scale and err.max() < 0.15 * scale, (err.mean(), err.max(), scale)
    assert err.max() > 0  # bf16 really ran
    assert np.mean(low.argmax(-1) == ref.argmax(-1)) > 0.95
