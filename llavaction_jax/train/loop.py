"""The training loop, one linear script: distributed -> mesh -> model -> optimizer -> data -> restore -> loop.

Everything the run needs is in one ml_collections config (configs/train.py). The loop is resumable: a restart
with the same config restores params, optimizer state, step and the data iterator from the newest good checkpoint
and continues exactly where the interrupted run was. SIGTERM (preemption) writes a checkpoint and exits 0 (during the
final model's save: the save completes, then exit 0); a NaN/Inf loss stops the run with an error naming the last
good checkpoint. The run holds the lock of its output directory (locks.py), so a second run on it is refused. A
restart with a config that defines a different run is refused (train/guard.py); broken checkpoints are moved aside,
and a failed save stops the run with its own error (train/checkpoint.py); the final `model/` is always the final
step's, swapped in only once complete (checkpoint_io.publish_model).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import signal

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils

from llavaction_jax import checkpoint_io, distributed, integrity, locks, model_files, vision_towers
from llavaction_jax.config import ConfigError, ModelConfig
from llavaction_jax.data.batching import make_global_batch
from llavaction_jax.data.frames import open_shards
from llavaction_jax.data.mixture import load_mixture
from llavaction_jax.data.pipeline import TrainPipelineConfig, train_dataset
from llavaction_jax.data.tokenizer import has_tokenizer
from llavaction_jax.ek100.labels import AnnotationError
from llavaction_jax.ek100.train_prompt import EK100PromptSettings, load_prior_table
from llavaction_jax.model import llava
from llavaction_jax.model.params import abstract_params, init_params
from llavaction_jax.recipes import execution_config, model_config
from llavaction_jax.sharding import make_mesh, resolve_execution
from llavaction_jax.train import checkpoint, guard, metrics
from llavaction_jax.train.optim import OptimizerConfig, make_optimizer, param_groups
from llavaction_jax.train.step import init_state, jit_train_step, make_train_step, state_shardings


class NonFiniteLoss(RuntimeError):
    pass


FINAL_STEP_FILE = "train_step.json"  # in output_dir/model: the step its weights are from


def final_model_step(final: pathlib.Path) -> int | None:
    """The step the complete, checksum-verified final model holds; None if there is none (or a partial one)."""
    try:
        integrity.verify_manifest(final)
        return json.loads((final / FINAL_STEP_FILE).read_text())["step"]
    except (integrity.IntegrityError, OSError, ValueError, KeyError):
        return None


def total_skipped(skipped: int) -> int:
    """The skip counts of all processes' data iterators, summed."""
    if jax.process_count() == 1:
        return skipped

    return int(multihost_utils.process_allgather(jnp.asarray(skipped, jnp.int32)).sum())


def maybe_initialize_distributed(cfg) -> None:
    """`jax.distributed.initialize()` when asked, or when a cluster (TPU pod, SLURM, Open MPI) is detected."""
    distributed.maybe_initialize(cfg.get("distributed", "auto"))


# What a config may add to its `init_from` checkpoint: LLaVAction's action token(s) and verb / noun / action heads,
# when LLaVA-Video is fine-tuned into LLaVAction (upstream builds them at model construction and trains them from
# there: llavaction/model/llava_arch.py: LlavaMetaModel.__init__, llava_qwen.py: LlavaQwenForCausalLM.__init__).
NEW_PARTS = ("action_tokens", "heads")


def initial_params(cfg, model_cfg: ModelConfig, shardings, log=print) -> dict:
    """The source's params (checkpoint or random init) cast to `train.master_dtype`. Parts of `NEW_PARTS` that the
    config has and the checkpoint lacks start from the model's random init (logged); anything else missing, or a
    stored shape that differs, is refused naming the parameter."""
    master = cfg.train.master_dtype
    specs = llava.param_specs(model_cfg)
    if not cfg.model.init_from:
        init = jax.jit(lambda key: llava.init(model_cfg.replace(param_dtype=master), key), out_shardings=shardings)
        return init(jax.random.key(cfg.train.seed))
    stored = checkpoint_io.stored_param_shapes(cfg.model.init_from)
    new = sorted(k for k in specs if k in NEW_PARTS and not any(p.split("/")[0] == k for p in stored))
    kept = {k: v for k, v in specs.items() if k not in new}
    abstract = abstract_params(kept, jnp.dtype(model_cfg.param_dtype))
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract):
        name = checkpoint_io.param_path(path)
        if stored.get(name) != tuple(leaf.shape):
            found = "is missing" if name not in stored else f"has shape {stored[name]}"
            raise ConfigError(f"model.init_from={cfg.model.init_from}: parameter {name} {found}, the model config "
                              f"needs {tuple(leaf.shape)}")
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                            {k: shardings[k] for k in kept})
    params = checkpoint_io.restore_params(cfg.model.init_from, abstract)
    params = jax.jit(lambda p: cast_tree(p, master), out_shardings={k: shardings[k] for k in kept})(params)
    if new:
        fresh_specs = llava.new_part_specs(model_cfg, new)
        fresh = jax.jit(lambda key: init_params(fresh_specs, key, jnp.dtype(master)),
                        out_shardings={k: shardings[k] for k in new})(jax.random.key(cfg.train.seed))
        params = {**params, **fresh}
        log(f"not in {cfg.model.init_from}, initialised randomly for this config: {', '.join(new)} "
            "(fine-tuning into LLaVAction adds the action token and heads, as upstream does)")
    return params


def cast_tree(tree, dtype: str):
    return jax.tree.map(lambda x: x.astype(dtype), tree)


def optimizer_config(cfg, total_steps: int) -> OptimizerConfig:
    fields = {f.name for f in dataclasses.fields(OptimizerConfig)}
    return OptimizerConfig(**{k: v for k, v in cfg.optim.items() if k in fields}, total_steps=total_steps)


def tokenizer_dir(cfg) -> str | None:
    """The tokenizer training uses: `data.tokenizer`, else init_from's own (a converted or trained model carries
    one), else None (Qwen2's, data/tokenizer.qwen2_tokenizer). The final model carries the same one."""
    if cfg.data.tokenizer:
        return cfg.data.tokenizer
    return cfg.model.init_from if has_tokenizer(cfg.model.init_from or None) else None


def trained_num_frames(cfg) -> int | None:
    """The most frames per clip the run trains on: `data.num_frames`, else the shards' (None without shards)."""
    if cfg.data.num_frames or not cfg.data.shards:
        return cfg.data.num_frames or None
    return open_shards(cfg.data.shards).max_frames_per_clip


def make_data(cfg, model_cfg: ModelConfig, per_process_batch: int):
    d = cfg.data
    samples = load_mixture(d.samples, seed=d.seed)
    pipeline = TrainPipelineConfig(
        batch_size=per_process_batch, num_frames=d.num_frames or None, frame_size=model_cfg.vision.image_size,
        max_length=d.max_length, length_buckets=tuple(d.length_buckets) or None, seed=d.seed,
        group_by_length=d.group_by_modality_length, length_group_steps=d.length_group_steps,
        on_bad_sample=d.on_bad_sample, add_time_instruction=d.add_time_instruction,
        tokenizer_path=tokenizer_dir(cfg), pad_id=d.pad_id, worker_count=d.worker_count,
        read_threads=d.read_threads,
        question_prompts=ek100_prompt_settings(d),
        preprocessing=vision_towers.lookup(model_cfg.vision_tower).preprocessing)
    return train_dataset(samples, d.shards or None, pipeline), len(samples)


def ek100_prompt_settings(d) -> EK100PromptSettings:
    """How EK100 samples stored as questions become prompts (data.perspective, data.learn_neighbor_actions, ...)."""
    table = None
    if d.learn_neighbor_actions == "prior":
        try:
            table = load_prior_table(d.ek100_annotations, d.action_representation, d.label_space)
        except AnnotationError as error:
            raise ConfigError(f"data.ek100_annotations: {error}") from None
    return EK100PromptSettings(d.perspective, d.learn_neighbor_actions, table, d.seed)


def save_final_model(cfg, model_cfg: ModelConfig, execution, state: dict, step: int, final: pathlib.Path,
                     log) -> None:
    """Publish the final step's params as `final` (our model format), unless it already holds that step."""
    if final_model_step(final) == step:  # complete and verified; else absent, partial, corrupt or older: write it
        return
    save_dtype = cfg.train.save_dtype or model_cfg.param_dtype  # the source's dtype unless asked
    params = jax.jit(lambda p: cast_tree(p, save_dtype))(state["params"])
    save_cfg = model_cfg.replace(param_dtype=save_dtype)
    files = model_files.companion_files(save_cfg, tokenizer_dir(cfg), cfg.model.init_from or None,
                                        trained_num_frames(cfg))
    checkpoint_io.publish_model(final, save_cfg, params,
                                extra_files={**files, FINAL_STEP_FILE: json.dumps({"step": step}) + "\n"},
                                execution=execution)
    log(f"final model (step {step}) written to {final}")


class Preemption:
    """Turns SIGTERM into a flag the loop checks between steps."""
    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def train(cfg) -> dict:
    """Run (or resume) training as configured, holding the lock of its output directory (locks.py: a second run
    on it is refused); returns a summary dict."""
    guard.validate(cfg)
    maybe_initialize_distributed(cfg)
    with locks.output_lock(cfg.train.output_dir, "train", log=print if jax.process_index() == 0 else None):
        return _train(cfg)


def _train(cfg) -> dict:
    # ----------------------------------------------------------------- distributed, mesh
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    out_dir = pathlib.Path(cfg.train.output_dir).absolute()
    is_main = jax.process_index() == 0
    log = (lambda *a: print(*a, flush=True)) if is_main else (lambda *a: None)

    # ----------------------------------------------------------------- model, optimizer, step
    model_cfg, execution = model_config(cfg), execution_config(cfg)
    total_steps = cfg.train.steps
    opt_cfg = optimizer_config(cfg, total_steps)
    specs = llava.param_specs(model_cfg)
    abstract = abstract_params(specs, jnp.dtype(cfg.train.master_dtype))  # the train state's params and moments
    tx, schedules = make_optimizer(abstract, opt_cfg)
    abstract_state = jax.eval_shape(lambda p: init_state(p, tx), abstract)
    shardings = state_shardings(abstract_state, model_cfg, mesh)
    groups = param_groups(abstract, opt_cfg)
    resolved = resolve_execution(execution, mesh)  # execution choices fixed for these devices

    # ----------------------------------------------------------------- data
    global_batch = cfg.train.batch_size
    if global_batch % jax.process_count():
        raise ValueError(f"train.batch_size={global_batch} must divide over {jax.process_count()} processes")
    data, n_samples = make_data(cfg, model_cfg, global_batch // jax.process_count())
    data_iter = iter(data)

    # ----------------------------------------------------------------- restore or initialise
    ckpts = checkpoint.Checkpoints(out_dir / "checkpoints", keep=cfg.train.keep_checkpoints,
                                   async_save=cfg.train.async_checkpoint)
    abstract_sharded = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    abstract_state, shardings)
    run_identity = guard.identity(cfg.to_dict(), model_cfg.to_dict(), n_samples)
    allow_changed_data = cfg.train.get("allow_changed_data", False)
    restored = ckpts.restore_latest(abstract_sharded, data_iter,
                                    check_meta=guard.meta_checker(run_identity, allow_changed_data, ckpts.directory, log),
                                    allow_missing_data=allow_changed_data, same_run=guard.same_run(run_identity),
                                    restart_if_all_broken=cfg.train.get("restart_if_all_broken", False))
    if restored is not None:
        start, state, _ = restored
        log(f"resumed from step {start} ({out_dir / 'checkpoints' / str(start)})")
    else:
        start = 0
        params = initial_params(cfg, model_cfg, shardings["params"], log)
        state = jax.jit(lambda p: init_state(p, tx), out_shardings=shardings)(params)
        log(f"starting from {'checkpoint ' + cfg.model.init_from if cfg.model.init_from else 'random init'}")

    run_step = jit_train_step(make_train_step(model_cfg, resolved, tx, groups, cfg.train.micro_batches, schedules,
                                              cfg.train.loss_reduction),
                              abstract_state, model_cfg, mesh)  # compiles once per length bucket

    # ----------------------------------------------------------------- metrics
    writer = (metrics.MetricsWriter(out_dir / "tensorboard", cfg.train.wandb_project, cfg.train.wandb_run,
                                    cfg.to_dict()) if is_main else None)
    peak = cfg.train.peak_flops or metrics.peak_flops_per_device(jax.devices()[0])
    if peak is None and jax.devices()[0].platform == "cpu":
        peak = metrics.measure_matmul_peak()
    meta = {"config": cfg.to_dict(), "model_config": model_cfg.to_dict(), "samples": n_samples}
    progress = None
    log(f"{n_samples} samples, global batch {global_batch}, {total_steps} steps, mesh {dict(mesh.shape)}, "
        f"{jax.process_count()} process(es)")

    # ----------------------------------------------------------------- loop
    # The jitted step returns before it has run. Its metrics stay on the device until a sync point (a log line or a
    # checkpoint: one transfer for all steps since the last), and the next global batch is loaded and placed while
    # the step runs. A checkpoint step syncs first (a non-finite loss stops the run before its state is saved) and
    # loads the next batch after the save, so the saved data-iterator state is the one the next step starts from.
    preemption = Preemption()
    history, step, stopped = [], start, "completed"
    skipped = 0  # bad samples this process's iterator has skipped (on_bad_sample="skip"), carried over a resume
    last = min(total_steps, cfg.train.stop_at_step or total_steps)
    outputs, clock = metrics.StepOutputs(), metrics.LoopClock()

    def next_batch():
        nonlocal skipped
        host_batch = next(data_iter)
        skipped = int(host_batch.get("num_skipped", skipped))
        return make_global_batch(host_batch, mesh, pad_id=cfg.data.pad_id)

    def sync() -> dict[str, float]:
        """Every step's metrics since the last sync, checked and recorded; the newest step's."""
        for s, m in outputs.fetch():
            if not math.isfinite(m["loss"]):
                good = ckpts.newest_good()
                raise NonFiniteLoss(f"loss is {m['loss']} at step {s}; stopping. The last good checkpoint (the "
                                    "newest that is sealed, verifies and whose state was finite when saved) is "
                                    f"{'step ' + str(good) if good is not None else 'none'} in {out_dir / 'checkpoints'}")
            history.append(m["loss"])
        return m

    failed = True
    try:
        batch = next_batch() if step < last else None
        while step < last:
            probe = clock.probe_starts(step + 1)
            state, m = run_step(state, batch)
            step += 1
            outputs.add(step, m)
            clock.probe_ends(probe, m)
            ckpts.check()  # an async save that failed stops the run here, with that save's own error
            if progress is None:
                flops = metrics.train_flops(model_cfg, batch["input_ids"].shape[1], batch["pixel_values"].shape[1]) * global_batch
                progress = metrics.Progress(total_steps, flops / jax.device_count(), peak)
            preempted = preemption.requested
            save = step % cfg.train.checkpoint_every == 0 or step == last or preempted
            logged = step % cfg.train.log_every == 0 or step == total_steps
            if not save and step < last:
                batch = next_batch()  # while the step runs
            if save or logged:
                m = sync()
                if is_main and logged:
                    rates = progress.rates(step, m)
                    log(progress.line(step, m, rates))
                    writer.scalars(step, {**m, **rates})
                clock.synced(step, logged, save)
            if save:
                ckpts.save(step, state, dict(meta, step=step, loss=m["loss"]), data_iter)
            if preempted:
                stopped = "preempted"
                log(f"SIGTERM: checkpoint written at step {step}; exiting")
                break
            if save and step < last:
                batch = next_batch()
        if clock.summary():
            log(clock.line(clock.summary()))
        failed = False
    finally:
        ckpts.close(raise_errors=not failed)  # the last checkpoint is sealed before the run ends
        if failed:
            preemption.restore()
        if writer is not None:
            try:
                writer.close()
            except OSError:  # e.g. the full disk that stopped the run: its error is the one reported
                if not failed:
                    raise

    if stopped == "completed" and step < total_steps:
        stopped = "paused"  # stop_at_step: a later run with the same config resumes here
    # ----------------------------------------------------------------- final model
    try:  # SIGTERM during the final model's save only sets the flag: the save completes, and the run exits 0
        if stopped == "completed" and cfg.train.save_model:
            save_final_model(cfg, model_cfg, execution, state, step, out_dir / "model", log)
    finally:
        preemption.restore()
    if preemption.requested and stopped == "completed":
        log("SIGTERM during the final model save: the save was completed first; exiting")
    skipped = total_skipped(skipped)
    if skipped:
        log(f"skipped {skipped} bad sample(s) in all (data.on_bad_sample=skip); each is named in the log above")
    summary = {"stopped": stopped, "step": step, "losses": history, "output_dir": str(out_dir),
               "skipped_samples": skipped, **clock.summary()}
    if is_main:
        (out_dir / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "losses"}) + "\n")
    return summary
