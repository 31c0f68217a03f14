"""The project's jobs as programs to compile ahead of time: jitted functions + abstract, sharded arguments.

No parameter is ever materialised: the state and batches are `jax.ShapeDtypeStruct`s carrying their shardings on
the mesh, built from the same functions the real runs use (`train.step` for the fine-tuning step; for evaluation
`api.answer_step`, which `eval.runner` jits, with a generation config and with options to score), so what compiles
here is what a run would compile. Each takes a `ModelConfig` and the `ResolvedExecution` of the target (its platform and chip count), as the runs do.

- `train_program`: the fine-tuning step of the paper's recipe (configs/train.py; llavaction/train/llava_trainer.py:
  LLaVATrainer.create_optimizer): fp32 master params, the execution's compute dtype and remat policy, AdamW over all
  three parts, a global batch of samples of `frames` frames padded to `seq` tokens, accumulated in micro-batches of
  one sample per data-parallel device (`lax.scan`).
- `eval_programs`: the batched EK100-MQA evaluation (`python -m llavaction_jax eval --mode both`): bf16 params,
  greedy generation (prefill + KV-cache decode loop) and option scoring, one program each, as the runner jits them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from llavaction_jax import api
from llavaction_jax.config import ModelConfig, ResolvedExecution, require_resolved
from llavaction_jax.model import llava
from llavaction_jax.model.decode import GenerationConfig
from llavaction_jax.model.params import abstract_params
from llavaction_jax.sharding import batch_sharding, batch_ways, param_shardings
from llavaction_jax.train.metrics import train_flops
from llavaction_jax.train.optim import OptimizerConfig, make_optimizer, param_groups
from llavaction_jax.train.step import init_state, jit_train_step, make_train_step, state_shardings

TEXT_TOKENS = 256  # text budget of a training sample beside the video (EK100-MQA prompts + answers are shorter)
PAPER_GLOBAL_BATCH = 256  # the 7B run: 128 GPUs x 1 sample x 2 accumulation steps (configs/train.py)
# The EK100-MQA question as the eval command builds it (bench/device_check.py measured the real prompt: 127 tokens
# with the Qwen2 tokenizer, padded to a multiple of 32), five options of up to 8 tokens, 8-token answers.
EVAL_PROMPT_TOKENS, EVAL_OPTIONS, EVAL_OPTION_TOKENS, EVAL_ANSWER_TOKENS = 128, 5, 8, 8


@dataclasses.dataclass
class Program:
    """One jitted function with abstract arguments, ready for `.lower(*args, **static)` under `mesh`."""

    name: str
    jitted: object
    args: tuple
    static: dict
    flops: float  # analytic model FLOPs of one call
    facts: dict


def length_bucket(tokens: int, max_length: int | None) -> int:
    """The power-of-two length bucket a sample of `tokens` tokens lands in (configs/train.py's default buckets)."""
    bucket = 1 << max(tokens - 1, 1).bit_length()
    return bucket if max_length is None else min(bucket, max_length)


def sharded(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def abstract_batch(cfg: ModelConfig, batch: int, text_len: int, frames: int) -> dict:
    """A training batch as `train.step` consumes it (pipeline layout: one -200 placeholder per row)."""
    s = cfg.vision.image_size
    shapes = {"input_ids": ((batch, text_len), jnp.int32), "attention_mask": ((batch, text_len), jnp.bool_),
              "labels": ((batch, text_len), jnp.int32), "pixel_values": ((batch, frames, 3, s, s), jnp.float32),
              "actions": ((batch, 3), jnp.int32), "has_video": ((batch,), jnp.bool_)}
    return {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in shapes.items()}


def train_program(cfg: ModelConfig, execution: ResolvedExecution, mesh: Mesh, frames: int, seq: int,
                  global_batch: int | None = None, micro_batches: int | None = None) -> Program:
    """The fine-tuning step on `mesh` for `cfg` (its param_dtype is ignored: masters are fp32, the train command's
    master_dtype) computed as `execution` says (resolved for the mesh's platform and size). Give `global_batch`
    (micro-batches of one sample per data-parallel device) or `micro_batches` (global batch = that many x the
    data-parallel devices)."""
    execution = require_resolved(execution, "aot_programs.train_program")
    dp = batch_ways(mesh)
    if micro_batches is None:
        micro_batches = max(1, -(-(global_batch or dp) // dp))
    batch = dp * micro_batches
    visual = cfg.tokens_per_video(frames)
    text_len = seq - visual + 1  # the -200 placeholder is replaced by the visual tokens
    if text_len < 2:
        raise ValueError(f"a sequence of {seq} tokens has no room for text beside {visual} visual tokens")

    params = abstract_params(llava.param_specs(cfg), jnp.float32)
    opt_cfg = OptimizerConfig()  # upstream: all three parts tunable, AdamW
    tx, schedules = make_optimizer(params, opt_cfg)
    state = jax.eval_shape(lambda p: init_state(p, tx), params)
    state = sharded(state, state_shardings(state, cfg, mesh))
    rows = batch_sharding(mesh)  # every batch array split over the batch axes on its leading dimension
    b = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rows),
                     abstract_batch(cfg, batch, text_len, frames))
    step = make_train_step(cfg, execution, tx, param_groups(params, opt_cfg), micro_batches, schedules)
    jitted = jit_train_step(step, state, cfg, mesh).jitted
    n_params = sum(x.size for x in jax.tree.leaves(params))
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    facts = dict(global_batch=batch, micro_batches=micro_batches, seq=seq, text_len=text_len, visual=visual,
                 frames=frames, n_params=n_params, state_bytes=state_bytes, remat=execution.remat_policy)
    return Program("train_step", jitted, (state, b), {}, batch * train_flops(cfg, text_len, frames), facts)


def eval_programs(cfg: ModelConfig, execution: ResolvedExecution, mesh: Mesh, frames: int, batch: int,
                  max_new_tokens: int) -> list[Program]:
    """The eval command's generate and score steps for `batch` questions of `frames` frames (`execution` resolved
    for the mesh, as eval.runner.make_step resolves it)."""
    execution = require_resolved(execution, "aot_programs.eval_programs")
    params = abstract_params(llava.param_specs(cfg), jnp.dtype(cfg.param_dtype))
    params = sharded(params, param_shardings(llava.param_specs(cfg), mesh))
    s = cfg.vision.image_size
    rows = batch_sharding(mesh)
    shapes = {"input_ids": ((batch, EVAL_PROMPT_TOKENS), jnp.int32),
              "attention_mask": ((batch, EVAL_PROMPT_TOKENS), jnp.bool_),
              "pixel_values": ((batch, frames, 3, s, s), jnp.float32), "num_frames": ((batch,), jnp.int32),
              "option_ids": ((batch, EVAL_OPTIONS, EVAL_OPTION_TOKENS), jnp.int32),
              "option_mask": ((batch, EVAL_OPTIONS, EVAL_OPTION_TOKENS), jnp.bool_)}
    arrays = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=rows) for k, (shape, dtype) in shapes.items()}
    n_vis = cfg.tokens_per_video(frames)
    out_len = llava.default_out_len(cfg, EVAL_PROMPT_TOKENS, n_vis)  # as runner.make_step
    gen = GenerationConfig(max_new_tokens=max_new_tokens)
    generate_keys = ("input_ids", "pixel_values", "attention_mask", "num_frames")
    prefill = eval_prefill_flops(cfg, frames)
    context = out_len + EVAL_ANSWER_TOKENS
    facts = dict(batch=batch, prompt_tokens=EVAL_PROMPT_TOKENS, visual=n_vis, frames=frames, out_len=out_len,
                 max_new_tokens=max_new_tokens, options=EVAL_OPTIONS, option_tokens=EVAL_OPTION_TOKENS)
    return [
        Program("generate", api.answer_step, (params, {k: arrays[k] for k in generate_keys}),
                dict(cfg=cfg, execution=execution, gen=gen, out_len=out_len),
                batch * (prefill + EVAL_ANSWER_TOKENS * decode_token_flops(cfg, context)),
                {**facts, "answer_tokens_counted": EVAL_ANSWER_TOKENS}),
        Program("score", api.answer_step, (params, arrays),
                dict(cfg=cfg, execution=execution, gen=None, out_len=out_len, vocab_limit=None,
                     options_per_pass=None),
                batch * (prefill + EVAL_OPTIONS * EVAL_OPTION_TOKENS * decode_token_flops(cfg, out_len)), facts),
    ]


def eval_prefill_flops(cfg: ModelConfig, frames: int) -> float:
    """One prefill: a third of a training sample's FLOPs (forward only), without the LM head on all but the last
    position (generation and scoring read the last prompt position only)."""
    seq = EVAL_PROMPT_TOKENS - 1 + cfg.tokens_per_video(frames)
    return train_flops(cfg, EVAL_PROMPT_TOKENS, frames) / 3 - 2 * (seq - 1) * cfg.text.hidden_size * cfg.text.vocab_size


def decode_token_flops(cfg: ModelConfig, context: int) -> float:
    """One token through the LM (matmuls and LM head: 2 x params) attending to `context` cached positions."""
    t = cfg.text
    layer = t.hidden_size * (t.num_heads + 2 * t.num_kv_heads) * t.head_dim + t.num_heads * t.head_dim * t.hidden_size
    layer += 3 * t.hidden_size * t.intermediate_size
    return 2 * (t.num_layers * layer + t.hidden_size * t.vocab_size) + 4 * t.num_layers * context * t.hidden_size
