"""The training step: sharded == single device, micro-batches == one batch, frozen groups, LR groups, schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llavaction_jax.config import preset_configs
from llavaction_jax.model import llava
from llavaction_jax.sharding import make_mesh, resolve_execution
from llavaction_jax.train.optim import OptimizerConfig, make_optimizer, param_groups, warmup_cosine
from llavaction_jax.train.step import init_state, jit_train_step, loss_fn, make_train_step

CFG, EXECUTION = preset_configs("tiny")


def make_batch(rng, n=4, length=10, frames=2):
    ids = rng.integers(10, CFG.text.vocab_size, size=(n, length)).astype(np.int32)
    ids[:, 2] = -200
    labels = ids.copy()
    labels[:, :4] = -100  # same number of targets in every row, so micro-batch means equal the batch mean
    return {
        "input_ids": ids, "attention_mask": np.ones((n, length), bool), "labels": labels,
        "pixel_values": rng.uniform(-1, 1, size=(n, frames, 3, 64, 64)).astype(np.float32),
        "actions": np.stack([rng.integers(0, 8, n), rng.integers(0, 8, n), rng.integers(0, 16, n)], 1).astype(np.int32),
        "has_video": np.ones(n, bool),
    }


def run_steps(opt_cfg, batches, n_micro=1, mesh=None, seed=0, reduction="sample"):
    params = llava.init(CFG, jax.random.key(seed))
    tx, schedules = make_optimizer(params, opt_cfg)
    state = init_state(params, tx)
    step = make_train_step(CFG, resolve_execution(EXECUTION, mesh), tx, param_groups(params, opt_cfg), n_micro,
                           schedules, reduction)
    step = jit_train_step(step, state, CFG, mesh)
    metrics = []
    for b in batches:
        state, m = step(state, b)
        metrics.append(jax.device_get(m))
    return jax.device_get(state), metrics


OPT = OptimizerConfig(learning_rate=1e-3, vision_lr=2e-4, warmup_ratio=0.0, total_steps=10)
# Adam divides by |g| + eps: with eps=1e-8 a gradient entry near zero turns summation-order noise (sharded vs
# single-device, or micro-batched vs whole) into an update of order lr. Equality tests use a larger eps so they
# compare the computations, not that amplification.
OPT_STABLE = OptimizerConfig(learning_rate=1e-3, vision_lr=2e-4, warmup_ratio=0.0, total_steps=10, eps=1e-4)


def assert_trees_close(a, b, rtol=1e-3, floor=1e-6):
    """Every float tensor of `a` within `rtol` x its own largest |entry| in `b` (integers equal). Summation order
    differs (sharded vs one device, micro-batches vs one batch), and Adam divides by |g| + eps: an entry whose
    gradient is near eps moved by up to 1.1e-4 of its tensor's largest update in these tests (the embedding).

    A tensor of rounding noise is held to `floor` x the largest |entry| of its kind in `b` (all tensors of Adam's
    first moments, of its second moments, or of the rest) instead: the key bias, which softmax ignores, gets
    gradients of ~1e-11 from summation order alone, so its moments and updates differ between meshes by more than
    100% of themselves."""
    leaves_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b, (tree_a, tree_b)

    def kind(path):
        return next((k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey) and k.name in ("mu", "nu")), "")

    largest = {}
    for (path, _), y in zip(leaves_a, leaves_b):
        if np.issubdtype(np.asarray(y).dtype, np.floating):
            largest[kind(path)] = max(largest.get(kind(path), 0.0), float(np.abs(np.asarray(y)).max()))
    for (path, x), y in zip(leaves_a, leaves_b):
        x, y = np.asarray(x), np.asarray(y)
        if not np.issubdtype(y.dtype, np.floating):
            np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
            continue
        atol = max(rtol * float(np.abs(y).max()), floor * largest[kind(path)])
        np.testing.assert_allclose(x, y, rtol=0, atol=atol, err_msg=jax.tree_util.keystr(path))


def updates(state, seed=0):
    """The change of every parameter from its initial value (run_steps starts from llava.init with `seed`)."""
    init = llava.init(CFG, jax.random.key(seed))
    return jax.tree.map(lambda p, p0: np.asarray(p) - np.asarray(p0), state["params"], init)


@pytest.mark.watchdog(900)  # 8 fake devices: a child process with a deadline (tests/_watchdog.py)
def test_8_device_mesh_gives_the_same_steps_as_one_device():
    rng = np.random.default_rng(0)
    batches = [make_batch(rng) for _ in range(2)]
    single, m1 = run_steps(OPT_STABLE, batches)
    sharded, m8 = run_steps(OPT_STABLE, batches, mesh=make_mesh(data=2, fsdp=2, tensor=2))
    assert_trees_close(updates(sharded), updates(single))
    assert_trees_close(sharded["opt_state"], single["opt_state"])
    for a, b in zip(m1, m8):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)


def test_micro_batches_equal_one_batch():
    batch = make_batch(np.random.default_rng(1))
    whole, mw = run_steps(OPT_STABLE, [batch], n_micro=1)
    micro, mm = run_steps(OPT_STABLE, [batch], n_micro=2)
    np.testing.assert_allclose(mw[0]["loss"], mm[0]["loss"], rtol=1e-6)
    np.testing.assert_allclose(mw[0]["grad_norm"], mm[0]["grad_norm"], rtol=1e-5)
    assert_trees_close(updates(micro), updates(whole))


def test_frozen_groups_do_not_change_and_carry_no_optimizer_state():
    opt = OptimizerConfig(learning_rate=1e-3, warmup_ratio=0.0, total_steps=10, tunable_parts="mm_mlp_adapter")
    params0 = llava.init(CFG, jax.random.key(0))
    state, _ = run_steps(opt, [make_batch(np.random.default_rng(2))])
    np.testing.assert_array_equal(state["params"]["vision"]["pos_embed"], params0["vision"]["pos_embed"])
    np.testing.assert_array_equal(state["params"]["text"]["embed"], params0["text"]["embed"])
    assert not np.array_equal(state["params"]["projector"]["fc1"]["kernel"], params0["projector"]["fc1"]["kernel"])
    n_state = sum(x.size for x in jax.tree.leaves(state["opt_state"]))
    n_projector = sum(x.size for x in jax.tree.leaves(params0["projector"]))
    assert n_state <= 2 * n_projector + 16  # mu and nu of the projector, plus step counters


def test_group_learning_rates_show_in_the_first_adam_update():
    params0 = llava.init(CFG, jax.random.key(0))
    state, metrics = run_steps(OPT, [make_batch(np.random.default_rng(3))])
    # Adam's first update is lr * g / (|g| + eps) ~ lr for every entry with a gradient.
    vision = np.abs(state["params"]["vision"]["layers"]["mlp"]["fc1"]["kernel"] - params0["vision"]["layers"]["mlp"]["fc1"]["kernel"])
    llm = np.abs(state["params"]["text"]["layers"]["mlp"]["up"]["kernel"] - params0["text"]["layers"]["mlp"]["up"]["kernel"])
    assert np.isclose(np.median(vision), 2e-4, rtol=0.05) and np.isclose(np.median(llm), 1e-3, rtol=0.05)
    assert np.isclose(metrics[0]["lr_vision"], 2e-4) and np.isclose(metrics[0]["lr_llm"], 1e-3)


def test_schedule_matches_transformers_cosine_with_warmup():
    torch = pytest.importorskip("torch")
    from transformers import get_cosine_schedule_with_warmup

    total, ratio = 100, 0.03
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-5)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=int(np.ceil(ratio * total)), num_training_steps=total)
    ref = []
    for _ in range(total):
        ref.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ours = [float(warmup_cosine(1e-5, total, ratio)(s)) for s in range(total)]
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-12)


def test_sample_reduction_weighs_every_sample_of_the_global_batch_equally():
    """Answers of 6, 1 and 3 tokens and a padding row (no target, no action): the loss is the mean of the three
    samples' own losses whatever the micro-batching; the padding row weighs nothing. The token mean differs."""
    batch = make_batch(np.random.default_rng(2))
    batch["labels"][:] = -100
    for row, n in ((0, 6), (1, 1), (2, 3)):
        batch["labels"][row, -n:] = batch["input_ids"][row, -n:]
    batch["actions"][3] = -1
    whole, mw = run_steps(OPT_STABLE, [batch], n_micro=1)
    micro, mm = run_steps(OPT_STABLE, [batch], n_micro=2)
    np.testing.assert_allclose(mw[0]["loss"], mm[0]["loss"], rtol=1e-6)
    np.testing.assert_allclose(mw[0]["grad_norm"], mm[0]["grad_norm"], rtol=1e-5)
    assert_trees_close(updates(micro), updates(whole))
    params, execution = llava.init(CFG, jax.random.key(0)), resolve_execution(EXECUTION)
    rows = lambda r: {k: v[r:r + 1] for k, v in batch.items()}
    one_sample_loss = jax.jit(lambda p, b: loss_fn(p, CFG, execution, b, "token")[0])  # one compile for the 3 rows
    own = [float(one_sample_loss(params, rows(r))) for r in range(3)]
    np.testing.assert_allclose(mw[0]["loss"], np.mean(own), rtol=1e-5)
    _, tw = run_steps(OPT_STABLE, [batch], n_micro=1, reduction="token")
    _, tm = run_steps(OPT_STABLE, [batch], n_micro=2, reduction="token")
    assert abs(float(tw[0]["loss"]) - np.mean(own)) > 1e-3  # the 6-token answer dominates the token mean
    assert abs(float(tw[0]["loss"]) - float(tm[0]["loss"])) > 1e-3  # and it depends on the micro-batching
