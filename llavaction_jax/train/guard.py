"""What a training run refuses, and why: recipe values checked up front, and a rerun compared with the run its
checkpoints belong to.

A run's identity has two parts, both read from the config it was started with (and stored in every checkpoint):
its data (`DATA_FIELDS`: the samples, shards, batch and the settings that shape the data order) and its state:
every other setting, the model config (but `RUNTIME_MODEL_FIELDS`) included. Only the settings in
`RUN_ONLY_FIELDS` are outside the identity, each with the reason it cannot change what the run computes. So a new
config field is part of the state unless it is added to that list on purpose (tests/test_train_recovery.py checks
every field of the recipe against the three lists). A rerun in an output directory whose checkpoints were written
with a different state is refused; one with different data is refused unless `train.allow_changed_data` is set,
and then continues with the data order restarted. A checkpoint older than a field compares as if it had held the
field's default (configs/train.py), which is what that older run computed with.
"""

from __future__ import annotations

import functools
import json
import math

import numpy as np

from llavaction_jax.config import EXECUTION_FIELDS, ConfigError
from llavaction_jax.recipes import parse, recipe_file

# Fields of a model section that change how the step runs, not what the state is: the execution choices (also in
# the model configs stored by checkpoints written before ModelConfig and ExecutionConfig were split) and the
# upstream keys carried in `extra`
RUNTIME_MODEL_FIELDS = EXECUTION_FIELDS + ("extra",)
DATA_FIELDS = ("train.batch_size", "data.samples", "data.shards", "data.seed", "data.num_frames", "data.max_length",
               "data.length_buckets", "data.group_by_modality_length", "data.length_group_steps",
               "data.add_time_instruction", "data.tokenizer", "data.pad_id", "data.perspective",
               "data.learn_neighbor_actions", "data.ek100_annotations", "data.action_representation",
               "data.label_space")
# Config fields outside the identity, and why none of them changes the trajectory of parameters a run computes
RUN_ONLY_FIELDS = {
    "distributed": "how the processes find each other",
    "mesh.data": "how the same computation is laid out over the devices",
    "mesh.fsdp": "how the same computation is laid out over the devices",
    "mesh.tensor": "how the same computation is laid out over the devices",
    "model.preset": "a name: the model fields it fills are compared one by one",
    "train.steps": "more steps extend a finished run (the schedule is recomputed for the new length)",
    "train.stop_at_step": "where this invocation pauses",
    "train.output_dir": "where the run is written",
    "train.log_every": "logging",
    "train.checkpoint_every": "when checkpoints are written",
    "train.keep_checkpoints": "how many checkpoints are kept",
    "train.allow_changed_data": "permission to continue after a data change",
    "train.restart_if_all_broken": "permission to start over when every checkpoint is broken",
    "train.async_checkpoint": "how checkpoints are written",
    "train.save_model": "whether the final model is exported",
    "train.save_dtype": "the dtype of the exported final model only",
    "train.peak_flops": "the MFU denominator in the logs",
    "train.wandb_project": "logging",
    "train.wandb_run": "logging",
    "data.worker_count": "how many processes read the same data",
    "data.read_threads": "how many threads read the same data",
    "data.on_bad_sample": "what happens at a bad sample (skipping is logged; the data settings are compared)",
}
ALLOW_FLAG = "--config.train.allow_changed_data=true"


class RunMismatch(ConfigError):
    """The output directory's checkpoints belong to a run with a different config."""


def validate(cfg) -> None:
    """One-line ConfigError for recipe values that cannot train: raised before any work starts."""
    t, o, d = cfg.train, cfg.optim, cfg.data
    checks = [
        (t.steps >= 1, f"train.steps={t.steps}: must be at least 1"),
        (t.batch_size >= 1, f"train.batch_size={t.batch_size}: must be at least 1"),
        (t.micro_batches >= 1, f"train.micro_batches={t.micro_batches}: must be at least 1"),
        (t.batch_size % max(t.micro_batches, 1) == 0,
         f"train.batch_size={t.batch_size} does not split into train.micro_batches={t.micro_batches}"),
        (t.checkpoint_every >= 1, f"train.checkpoint_every={t.checkpoint_every}: must be at least 1"),
        (t.keep_checkpoints >= 1, f"train.keep_checkpoints={t.keep_checkpoints}: must be at least 1 (0 would delete "
                                  "each checkpoint as soon as it is written)"),
        (t.log_every >= 1, f"train.log_every={t.log_every}: must be at least 1"),
        (t.stop_at_step >= 0, f"train.stop_at_step={t.stop_at_step}: must be 0 (never) or a step"),
        (d.max_length >= 1, f"data.max_length={d.max_length}: must be at least 1"),
        (d.num_frames >= 0, f"data.num_frames={d.num_frames}: must be 0 (the shards') or more"),
        (d.length_group_steps >= 1, f"data.length_group_steps={d.length_group_steps}: must be at least 1"),
        (d.worker_count >= 0, f"data.worker_count={d.worker_count}: must be 0 or more"),
        (d.read_threads >= 0, f"data.read_threads={d.read_threads}: must be 0 (half the cores, 1 to 4) or more"),
        (d.on_bad_sample in ("error", "skip"), f"data.on_bad_sample={d.on_bad_sample!r}: must be 'error' or 'skip'"),
        (d.perspective in ("first_person", "third_person"),
         f"data.perspective={d.perspective!r}: must be 'first_person' or 'third_person'"),
        (d.learn_neighbor_actions in ("", "prior"), f"data.learn_neighbor_actions={d.learn_neighbor_actions!r}: must "
                                                    "be '' or 'prior'"),
        (d.learn_neighbor_actions != "prior" or d.ek100_annotations,
         "data.learn_neighbor_actions='prior' needs data.ek100_annotations (the folder with EPIC_100_train.csv, "
         "whose consecutive actions the prompts name)"),
        (0.0 <= o.warmup_ratio <= 1.0, f"optim.warmup_ratio={o.warmup_ratio}: must be in [0, 1]"),
    ]
    for name in ("learning_rate", "vision_lr", "projector_lr", "weight_decay", "max_grad_norm"):
        value = o.get(name)
        if value is not None:  # the optimizer computes in float32: 1e39 is finite in Python, infinite there
            finite = math.isfinite(value) and bool(np.isfinite(np.float32(value)))
            checks.append((finite and value >= 0, f"optim.{name}={value}: must be a finite value >= 0 (in float32, "
                                                  f"at most {float(np.finfo(np.float32).max):.4g})"))
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _flatten(d: dict, prefix: str) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@functools.lru_cache(maxsize=1)
def recipe_defaults() -> str:
    """configs/train.py as JSON: what a field a checkpoint predates meant when that run was started."""
    return json.dumps(parse([], file=str(recipe_file("train")))[0].to_dict())


def _merged(defaults: dict, config: dict) -> dict:
    out = dict(defaults)
    for k, v in config.items():
        out[k] = _merged(defaults[k], v) if isinstance(v, dict) and isinstance(defaults.get(k), dict) else v
    return out


def identity(config: dict, model_config: dict, num_samples) -> tuple[dict, dict]:
    """(state fields, data fields) of a run, from its config dicts as stored in checkpoint metadata."""
    config, model_config = json.loads(json.dumps(config)), json.loads(json.dumps(model_config))  # tuples -> lists
    flat = _flatten(_merged(json.loads(recipe_defaults()), config), "")
    model = {k: v for k, v in model_config.items() if k not in RUNTIME_MODEL_FIELDS}
    # the model section of the config repeats the model config's fields: those are compared from model_config
    state = {**_flatten(model, "model."), "model.init_from": flat.get("model.init_from")}
    state.update({k: v for k, v in flat.items() if not k.startswith("model.") and k not in RUN_ONLY_FIELDS
                  and k not in DATA_FIELDS})
    data = {k: flat.get(k) for k in DATA_FIELDS}
    data["number of samples"] = num_samples
    return state, data


def _diff(saved: dict, now: dict) -> list[str]:
    def short(v):
        text = json.dumps(v)
        return text if len(text) <= 60 else text[:57] + "..."

    return [f"{k} {short(saved.get(k))} -> {short(now.get(k))}" for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k)]


def meta_checker(current: tuple[dict, dict], allow_changed_data: bool, where: str, log=print):
    """The `check_meta` for Checkpoints.restore_latest: refuses a changed state (always) or changed data (unless
    allowed); returns whether the data iterator may be restored (False when the data changed)."""

    def check(meta: dict) -> bool:
        saved = identity(meta["config"], meta["model_config"], meta.get("samples"))
        state, data = _diff(saved[0], current[0]), _diff(saved[1], current[1])
        step = meta.get("step")
        if state:
            raise RunMismatch(f"{where} holds checkpoints (step {step}) of a run with a different model or optimizer: "
                              f"{'; '.join(state + data)}. Use another train.output_dir, or restore the settings")
        if data and not allow_changed_data:
            raise RunMismatch(f"{where} holds checkpoints (step {step}) of a run with different data settings: "
                              f"{'; '.join(data)}. Continue with them (the data order restarts) with {ALLOW_FLAG}, "
                              "or use another train.output_dir")
        if data:
            log(f"warning: data settings changed since step {step} ({'; '.join(data)}); the data order restarts")
        return not data

    return check


def same_run(current: tuple[dict, dict]):
    """Predicate on checkpoint metadata: written with this run's state and data (rotation may delete it)."""
    return lambda meta: identity(meta["config"], meta["model_config"], meta.get("samples")) == current
