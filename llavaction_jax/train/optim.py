"""Optimizer: AdamW with upstream's parameter groups, learning rates, decay mask, schedule and clipping.

Upstream (llavaction/train/train.py: train, llavaction/train/llava_trainer.py: LLaVATrainer.create_optimizer):
`mm_tunable_parts` picks what trains — `mm_vision_tower` (SigLIP),
`mm_mlp_adapter` (the projector) and `mm_language_model` (everything else: Qwen2, embeddings, lm_head,
image_newline, action_supervision, the heads). The vision tower may have its own LR (2e-6 for LLaVAction), the
projector too (`mm_projector_lr`, None = base). Weight decay (0 by default) skips biases and LayerNorm parameters;
Qwen2's RMSNorm scales *do* decay, as in upstream's `ALL_LAYERNORM_LAYERS` test. The schedule is transformers'
cosine with linear warm-up; gradients are clipped to global norm 1.0. Frozen groups get `set_to_zero` and so
carry no optimizer state.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import optax

from llavaction_jax import vision_towers
from llavaction_jax.tree import flatten_paths, unflatten_paths

GROUPS = ("vision", "projector", "llm")
TUNABLE_PARTS = {"mm_vision_tower": "vision", "mm_mlp_adapter": "projector", "mm_language_model": "llm"}


def no_decay() -> re.Pattern:
    """Parameters upstream's Trainer excludes from weight decay: every bias and the parameters of torch
    nn.LayerNorm modules, which are the vision tower's layer norms (its registry entry's `no_weight_decay`). A model
    holds one tower's parameters under "vision/", so every registered tower's patterns together pick its own."""
    norms = [p for tower in vision_towers.TOWERS.values() for p in tower.no_weight_decay]
    return re.compile(r"(^|/)bias$" + "".join(f"|^vision/{p}" for p in norms))


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 1e-5
    vision_lr: float | None = 2e-6  # mm_vision_tower_lr
    projector_lr: float | None = None  # mm_projector_lr
    tunable_parts: str = "mm_vision_tower,mm_mlp_adapter,mm_language_model"
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    total_steps: int = 1000


def group_of(path: str) -> str:
    if path.startswith("vision/"):
        return "vision"
    if path.startswith("projector/"):
        return "projector"
    return "llm"


def trainable_groups(tunable_parts: str) -> set[str]:
    parts = [p.strip() for p in tunable_parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in TUNABLE_PARTS]
    if unknown:
        raise ValueError(f"unknown mm_tunable_parts {unknown}; expected a comma list of {sorted(TUNABLE_PARTS)}")
    return {TUNABLE_PARTS[p] for p in parts}


def param_groups(params: dict, cfg: OptimizerConfig) -> dict:
    """Tree of group names ("vision" / "projector" / "llm" / "frozen"), one per parameter."""
    trainable = trainable_groups(cfg.tunable_parts)
    flat = flatten_paths(params)
    return unflatten_paths({p: (g if (g := group_of(p)) in trainable else "frozen") for p in flat})


def decay_mask(params) -> dict:
    """True where weight decay applies. Works on the partial trees optax.partition hands each group."""
    excluded = no_decay()

    def decays(path, _):
        return not excluded.search("/".join(str(getattr(k, "key", k)) for k in path))
    return jax.tree_util.tree_map_with_path(decays, params)


def warmup_cosine(peak: float, total_steps: int, warmup_ratio: float):
    """transformers' get_cosine_schedule_with_warmup with warmup_steps = ceil(ratio * total) (HF TrainingArguments)."""
    warmup = math.ceil(warmup_ratio * total_steps)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = step / max(warmup, 1)
        progress = (step - warmup) / max(total_steps - warmup, 1)
        cosine = jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
        return peak * jnp.where(step < warmup, warm, cosine)

    return schedule


def group_learning_rates(cfg: OptimizerConfig) -> dict[str, float]:
    return {"vision": cfg.vision_lr or cfg.learning_rate, "projector": cfg.projector_lr or cfg.learning_rate,
            "llm": cfg.learning_rate}


def make_optimizer(params: dict, cfg: OptimizerConfig) -> tuple[optax.GradientTransformation, dict]:
    """The optax transformation and the per-group schedules (for logging the LR)."""
    schedules = {g: warmup_cosine(lr, cfg.total_steps, cfg.warmup_ratio) for g, lr in group_learning_rates(cfg).items()}
    transforms = {
        g: optax.adamw(schedules[g], b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
        for g in GROUPS
    }
    transforms["frozen"] = optax.set_to_zero()
    tx = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), optax.partition(transforms, param_groups(params, cfg)))
    return tx, schedules


def freeze(params: dict, groups: dict) -> dict:
    """Stop gradients into frozen groups, so their (zero) gradients cost nothing and do not enter the norm."""
    return jax.tree.map(lambda p, g: jax.lax.stop_gradient(p) if g == "frozen" else p, params, groups)
