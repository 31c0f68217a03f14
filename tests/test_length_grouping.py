"""Upstream's length-grouped order (llavaction/train/llava_trainer.py: get_length_grouped_indices) and its place in
the training pipeline."""

import numpy as np
import pytest

from llavaction_jax.data.length_grouping import length_grouped_order, modality_lengths


def test_modality_lengths_count_words_and_sign_text_only_samples():
    samples = [
        {"video": "a.mp4", "conversations": [{"from": "human", "value": "<image>\nwhat is this"},
                                             {"from": "gpt", "value": "cut onion"}]},
        {"conversations": [{"role": "user", "content": "one two three"}]},
        {"image": "x.jpg", "conversations": [{"from": "human", "value": ""}]},
    ]
    assert modality_lengths(samples).tolist() == [6, -3, 1]


def test_one_modality_megabatches_are_permutation_blocks_sorted_longest_first():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 500, size=103)
    order = length_grouped_order(lengths, step_size=8, group_steps=1, rng=np.random.default_rng(1))
    assert sorted(order.tolist()) == list(range(103))
    blocks = [order[i:i + 8] for i in range(0, 103, 8)]
    assert all((np.diff(lengths[b]) <= 0).all() for b in blocks)
    # step composition is a random draw: not the identity, and a new seed gives new steps
    other = length_grouped_order(lengths, 8, 1, np.random.default_rng(2))
    assert {frozenset(b) for b in blocks} != {frozenset(other[i:i + 8]) for i in range(0, 103, 8)}


def test_mixed_modalities_give_pure_steps_and_one_mixed_leftover():
    lengths = np.array([5] * 21 + [-7] * 13)  # 21 video samples, 13 text-only
    lengths = lengths * np.random.default_rng(3).integers(1, 4, size=34)
    order = length_grouped_order(lengths, step_size=4, group_steps=1, rng=np.random.default_rng(4))
    assert sorted(order.tolist()) == list(range(34))
    full_steps = (21 // 4) + (13 // 4)  # each modality's partial megabatch joins the leftover
    for i in range(full_steps):
        signs = np.sign(lengths[order[4 * i:4 * i + 4]])
        assert len(set(signs.tolist())) == 1, (i, signs)
    leftover = order[4 * full_steps:]
    assert len(leftover) == 34 - 4 * full_steps and leftover.tolist() == sorted(leftover.tolist())
    assert set(np.sign(lengths[leftover]).tolist()) == {-1, 1}
    # both modalities' full steps are interleaved, not all video first
    first_signs = [int(np.sign(lengths[order[4 * i]])) for i in range(full_steps)]
    assert first_signs != sorted(first_signs, reverse=True)


def test_grouping_several_steps_cuts_padding():
    rng = np.random.default_rng(5)
    lengths = rng.integers(10, 2000, size=512)

    def padded_tokens(order):  # every step pads to its longest sample
        return sum(lengths[order[i:i + 8]].max() * 8 for i in range(0, 512, 8))

    upstream = padded_tokens(length_grouped_order(lengths, 8, 1, np.random.default_rng(6)))
    grouped = padded_tokens(length_grouped_order(lengths, 8, 16, np.random.default_rng(6)))
    assert grouped < 0.8 * upstream


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="length 0"):
        length_grouped_order(np.array([3, 0, 2]), 2, 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="step_size"):
        length_grouped_order(np.array([3, 1]), 0, 1, np.random.default_rng(0))


def test_pipeline_epochs_are_disjoint_across_processes_and_reshuffled():
    """Two processes x batch 2 (step size 4): each epoch covers every sample once, steps are pure-modality."""
    import grain

    from llavaction_jax.data.pipeline import _this_process_slice

    lengths = np.array([3, 9, -4, 12, -2, 7, 1, -8, 5, 6, -1, 2, 4, 11])
    source = grain.MapDataset.source(list(range(len(lengths))))
    per_process = [list(_this_process_slice(source, 7, True, 2, p, 2, "test", (lengths, 4, 1))) for p in (0, 1)]
    per_epoch = len(lengths)  # 14 is a multiple of 2 processes
    for epoch in range(2):
        seen = [x for proc in per_process for x in proc[epoch * 7:(epoch + 1) * 7]]
        assert sorted(seen) == list(range(per_epoch))
    assert per_process[0][:7] != per_process[0][7:]  # a new order each epoch
    # step k = batch k of each process (2 elements each): the same modality everywhere until the leftover
    for k in range(2):
        step = per_process[0][2 * k:2 * k + 2] + per_process[1][2 * k:2 * k + 2]
        assert len(set(np.sign(lengths[step]).tolist())) == 1, step
