"""Upstream's length-grouped sample order (`group_by_modality_length=True`; upstream
llavaction/train/llava_trainer.py: LengthGroupedSampler, get_length_grouped_indices).

Upstream's `LengthGroupedSampler` draws a random permutation, cuts it into megabatches of one optimizer step
(world x accumulation x per-device batch), sorts each megabatch by length (longest first) and splits it into
per-device chunks of similar total length. With both multimodal and text-only samples (text-only lengths are
negative), each modality is grouped on its own, the full megabatches of both are shuffled together, and the two
partial leftovers form one final mixed megabatch. Lengths are the whitespace word counts of all turns.

Here one step's samples are a contiguous block of `step_size` elements of the epoch order, and element i goes to
process i % process_count (pipeline.py), so a megabatch sorted longest-first deals similar lengths to every
process, as upstream's even chunks do. Our batches are padded to a length bucket per step rather than per device,
so within a step the grouping balances but does not shorten; `group_steps > 1` (ours, not upstream) sorts
megabatches of several steps, so each step holds similar lengths and pads less, at the price of steps that are
no longer independent draws.
"""

from __future__ import annotations

import sys

import grain
import numpy as np


def modality_lengths(samples: list[dict]) -> np.ndarray:
    """Upstream's `modality_lengths`: the word count of all turns, negative for samples without image or video."""
    lengths = np.empty(len(samples), np.int64)
    for i, sample in enumerate(samples):
        words = sum(len(str(turn.get("value", turn.get("content", ""))).split()) for turn in sample["conversations"])
        words = max(words, 1)  # upstream asserts a non-zero length; an empty sample still needs a sign
        lengths[i] = words if (sample.get("video") or sample.get("image")) else -words
    return lengths


def _grouped(indices: np.ndarray, lengths: np.ndarray, megabatch: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One modality: permute, cut into megabatches, sort each by length, longest first (stable)."""
    order = indices[rng.permutation(len(indices))]
    groups = [order[i:i + megabatch] for i in range(0, len(order), megabatch)]
    return [g[np.argsort(-np.abs(lengths[g]), kind="stable")] for g in groups]


def length_grouped_order(lengths: np.ndarray, step_size: int, group_steps: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation of range(len(lengths)) in upstream's length-grouped order (module docstring)."""
    if step_size < 1 or group_steps < 1:
        raise ValueError(f"step_size ({step_size}) and group_steps ({group_steps}) must be >= 1")
    lengths = np.asarray(lengths)
    if (lengths == 0).any():
        raise ValueError(f"sample {int(np.argmax(lengths == 0))} has length 0; lengths must be non-zero")
    megabatch = step_size * group_steps
    multimodal, text_only = np.flatnonzero(lengths > 0), np.flatnonzero(lengths < 0)
    if len(multimodal) == 0 or len(text_only) == 0:
        return np.concatenate(_grouped(np.arange(len(lengths)), lengths, megabatch, rng))
    mm_groups = _grouped(multimodal, lengths, megabatch, rng)
    text_groups = _grouped(text_only, lengths, megabatch, rng)
    full = mm_groups[:-1] + text_groups[:-1]
    groups = [full[i] for i in rng.permutation(len(full))]
    leftover = np.concatenate([mm_groups[-1], text_groups[-1]])
    return np.concatenate(groups + [np.sort(leftover)])  # upstream keeps the leftover in index order


class LengthGroupedEpochs(grain.MapDataset):
    """`parent` in a fresh length-grouped order each epoch, cut to `per_epoch` elements, for `num_epochs` epochs
    (None: forever). Epoch e's order depends only on (seed, e), so every process computes the same one."""

    def __init__(self, parent: grain.MapDataset, lengths: np.ndarray, per_epoch: int, num_epochs: int | None,
                 step_size: int, group_steps: int, seed: int):
        super().__init__(parent)
        if len(lengths) != len(parent):
            raise ValueError(f"{len(lengths)} lengths for {len(parent)} samples")
        self._lengths, self._per_epoch, self._num_epochs = np.asarray(lengths), per_epoch, num_epochs
        self._step_size, self._group_steps, self._seed = step_size, group_steps, seed
        self._cached_epoch, self._cached_order = None, None

    def __len__(self) -> int:
        return sys.maxsize if self._num_epochs is None else self._per_epoch * self._num_epochs

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Epoch `epoch`'s order, computed once per epoch (elements are read in order)."""
        if self._cached_epoch != epoch:
            rng = np.random.default_rng([self._seed, epoch])
            order = length_grouped_order(self._lengths, self._step_size, self._group_steps, rng)
            self._cached_epoch, self._cached_order = epoch, order[:self._per_epoch]
        return self._cached_order

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, position = divmod(index, self._per_epoch)
        return self._parent[int(self.epoch_order(epoch)[position])]

    def __str__(self) -> str:
        return f"LengthGroupedEpochs(step_size={self._step_size}, group_steps={self._group_steps})"
