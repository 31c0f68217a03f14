"""What a training run refuses, and why: recipe values checked up front, and a rerun compared with the run its
checkpoints belong to.

A run is defined by its state (the model config minus runtime-only fields, `model.init_from`, the optimizer
settings and `train.seed`) and its data (global batch, the samples and shards, the data seed and the settings
that shape the data order). A rerun in an output directory whose checkpoints were written with a different state
is refused; one with different data is refused unless `train.allow_changed_data` is set, and then continues with
the data order restarted. `train.steps` is not part of either: more steps extend a finished run.
"""

from __future__ import annotations

import json
import math

from llavaction_jax.config import EXECUTION_FIELDS, ConfigError

# Fields of a model section that change how the step runs, not what the state is: the execution choices (also in
# the model configs stored by checkpoints written before ModelConfig and ExecutionConfig were split) and the
# upstream keys carried in `extra`
RUNTIME_MODEL_FIELDS = EXECUTION_FIELDS + ("extra",)
DATA_FIELDS = ("train.batch_size", "data.samples", "data.shards", "data.seed", "data.num_frames", "data.max_length",
               "data.length_buckets", "data.group_by_modality_length", "data.length_group_steps",
               "data.add_time_instruction", "data.tokenizer", "data.pad_id", "data.perspective",
               "data.learn_neighbor_actions", "data.ek100_annotations", "data.action_representation",
               "data.label_space")
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
        if value is not None:
            checks.append((math.isfinite(value) and value >= 0, f"optim.{name}={value}: must be a finite value >= 0"))
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


def identity(config: dict, model_config: dict, num_samples) -> tuple[dict, dict]:
    """(state fields, data fields) of a run, from its config dicts as stored in checkpoint metadata."""
    config, model_config = json.loads(json.dumps(config)), json.loads(json.dumps(model_config))  # tuples -> lists
    model = {k: v for k, v in model_config.items() if k not in RUNTIME_MODEL_FIELDS}
    state = {**_flatten(model, "model."), "model.init_from": config["model"]["init_from"],
             **_flatten(config["optim"], "optim."), "train.seed": config["train"]["seed"]}
    flat = _flatten(config, "")
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
