"""Accelerator readiness check: one script, at most ~8 minutes on one GPU, every result in one table and JSON.

Sections (each guarded: an error or out-of-memory is recorded and the next section runs; each has a time budget
and skips its remaining cases when the budget is spent; results are written after every section, so a run killed
by its time limit still leaves everything measured so far):

  devices     devices, JAX / jaxlib / CUDA versions, a bf16 matmul peak measured here (the MFU denominator)
  attention   7B shapes (28 query heads, 4 KV heads, head dim 128), causal with right padding, at 1.7k / 6k /
              13.8k tokens: cudnn, flash and xla in bf16; max |difference| to fp32 xla on real query rows,
              forward and forward+backward time; which one `auto` picks
  forward_7b  LLaVAction-7B (random weights, bf16) prefill of a 64-frame EK100-MQA prompt (~13.5k tokens):
              latency, compiled / peak memory, MFU
  eval_7b     batched EK100-MQA evaluation at 64 frames, batch 8 / 4 / 1: option scoring (5 options) and greedy
              answers (8 tokens); questions/s and the projected time for all 9,668 validation questions
  train_0_5b  a LLaVAction-0.5B training step at 64 frames (fp32 master params, bf16 compute, remat, AdamW):
              tokens/s, MFU
  train_7b    the same for the 7B on one device when its state fits the device's memory; otherwise why not

`--smoke` runs the same code at tiny sizes (seconds on CPU); tests/test_device_check.py runs it in CI.
The check imports only JAX, optax, numpy and the model code: no data pipeline, no ml_collections (model sizes come
from llavaction_jax.config's tables; tests/test_device_check.py checks them against configs/*.py).

    python -m llavaction_jax.bench.device_check [--out FILE.json] [--markdown FILE.md] [--time-limit S] [--smoke]
    bash launch/device_check.sh --out $OUT/device_check.json --markdown $OUT/device_check.md   # on a GPU machine
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import pathlib
import sys
import time
import traceback
from importlib import metadata

import jax
import jax.numpy as jnp
import numpy as np

from llavaction_jax.bench.common import median
from llavaction_jax.bench.device_report import format_table, markdown_block
from llavaction_jax.config import (ExecutionConfig, ModelConfig, ResolvedExecution, TextConfig, VisionConfig, text_size,
                                   vision_size)
from llavaction_jax.model import attention, llava
from llavaction_jax.model.decode import GenerationConfig, generate, score_options
from llavaction_jax.model.params import abstract_params
from llavaction_jax.sharding import platform_of, resolve_execution
from llavaction_jax.train.metrics import train_flops
from llavaction_jax.train.optim import OptimizerConfig, make_optimizer, param_groups
from llavaction_jax.train.step import init_state, make_train_step

EK100_QUESTIONS = 9668  # EPIC-KITCHENS-100 validation segments = EK100-MQA questions
# The real EK100-MQA prompt: ChatML system + user turn with <image>, the 64-frame time instruction and five lettered
# options, then "<|im_start|>assistant\n" = 127 tokens with the Qwen2 tokenizer (ek100/prompts.py, data/chat.py).
PROMPT_TOKENS, NUM_OPTIONS, OPTION_TOKENS, ANSWER_TOKENS = 127, 5, 8, 8
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Everything that differs between the real check and `--smoke`."""
    matmul: int = 8192
    attn_lengths: tuple = (1700, 6000, 13800)
    attn_heads: tuple = (28, 4, 128)  # query heads, KV heads, head dim (Qwen2-7B)
    reference_rows: int = 1024  # fp32 reference on this many sampled query rows (all rows when shorter)
    big: str = "llavaction_7b"
    small: str = "llavaction_0_5b"
    frames: int = 64
    prompt: int = PROMPT_TOKENS
    eval_batches: tuple = (8, 4, 1)
    repeats: int = 3
    assumed_memory: dict = dataclasses.field(default_factory=dict)  # section -> device bytes for the fit check
    budgets: dict = dataclasses.field(default_factory=lambda: dict(
        devices=30, attention=90, forward_7b=60, eval_7b=170, train_0_5b=70, train_7b=40))


# Smoke: every code path once, at sizes that compile in seconds; train_7b takes the does-not-fit path (as on an H100).
SMOKE = Sizes(matmul=256, attn_lengths=(48,), attn_heads=(8, 2, 16), reference_rows=24, big="tiny", small="tiny",
              frames=2, prompt=24, eval_batches=(2,), repeats=2, assumed_memory={"train_7b": 2**20},
              budgets=dict(devices=30, attention=60, forward_7b=60, eval_7b=90, train_0_5b=60, train_7b=60))

TINY_VISION = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, image_size=64, patch_size=16)
TINY_TEXT = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                 tie_word_embeddings=False, max_position_embeddings=4096)
PRESETS = {  # configs/<name>.py without ml_collections (tests/test_device_check.py keeps them equal)
    "llavaction_7b": dict(vision=vision_size(), text=text_size("7b")),
    "llavaction_0_5b": dict(vision=vision_size(), text=text_size("0.5b")),
    "tiny": dict(vision=TINY_VISION, text=TINY_TEXT, action_types=(8, 8, 16), tokenizer_model_max_length=4096),
}


def model_config(name: str, param_dtype: str = "float32", **execution) -> tuple[ModelConfig, ResolvedExecution]:
    """The preset's architecture (LLaVAction layout: grid newlines, one action token, three heads) and execution
    choices resolved for this machine's devices, as every entry point does."""
    p = dict(PRESETS[name])
    cfg = ModelConfig(vision=VisionConfig(**p.pop("vision")), text=TextConfig(**p.pop("text")), **p,
                      param_dtype=param_dtype)
    return cfg, resolve_execution(ExecutionConfig(**execution))


# ============================================================================================ model entry points
# Every call into the model, eval and train code is in this section (adapt here when their signatures change).
def attention_fn(impl: str):
    platform = platform_of()
    return lambda q, k, v, q_pos, k_pos, valid: attention.attention(q, k, v, q_pos=q_pos, k_pos=k_pos, k_valid=valid,
                                                          causal=True, impl=impl, platform=platform)


def auto_attention_choice(q, k) -> str:
    return attention.auto_impl(q, k, causal=True, platform=platform_of())


def init_params(cfg: ModelConfig, seed: int = 0):
    return jax.jit(lambda key: llava.init(cfg, key))(jax.random.key(seed))


def count_params(cfg: ModelConfig) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract_params(llava.param_specs(cfg))))


def generate_fn(cfg: ModelConfig, execution: ResolvedExecution, new_tokens: int):
    gen = GenerationConfig(max_new_tokens=new_tokens, eos_ids=(-1,), pad_id=0)  # never stops early: 8 real steps
    return lambda params, ids, pixels, mask: generate(params, cfg, execution, gen, ids, pixels, mask)[0]


def score_fn(cfg: ModelConfig, execution: ResolvedExecution):
    return lambda params, ids, pixels, mask, opt_ids, opt_mask: score_options(
        params, cfg, execution, ids, pixels, mask, opt_ids, opt_mask, options_per_pass=1)["logprob_sum"]


def train_step_fn(cfg: ModelConfig, execution: ResolvedExecution, params):
    """(jitted step with the state donated, initial state)."""
    opt_cfg = OptimizerConfig()  # AdamW over all parts, as upstream
    tx, schedules = make_optimizer(params, opt_cfg)
    step = make_train_step(cfg, execution, tx, param_groups(params, opt_cfg), 1, schedules)
    return jax.jit(step, donate_argnums=0), jax.jit(lambda p: init_state(p, tx))(params)
# ===============================================================================================================


class Section:
    """Time budget of one section: `has_time(estimate)` before each case; `save(partial)` after each case writes
    what the section has so far (a run killed mid-section keeps its finished cases)."""

    def __init__(self, budget_s: float, deadline: float, save=lambda partial: None):
        self.end = min(time.monotonic() + budget_s, deadline)
        self.save = save

    def has_time(self, estimate_s: float = 0.0) -> bool:
        return time.monotonic() + estimate_s < self.end


def is_oom(error: BaseException) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def failure(error: BaseException) -> dict:
    status = "oom" if is_oom(error) else "unsupported" if "cannot run here" in str(error) else "error"
    return {"status": status, "error": f"{type(error).__name__}: {str(error)[-600:]}"}


def mfu(flops: float, seconds: float, state: dict) -> float | None:
    peak = state.get("peak_flops")  # None when the devices section failed
    return flops / seconds / peak if peak else None


def compile_and_time(fn, args, repeats: int) -> dict:
    """AOT-compile fn(*args), run it once (warm-up), then time `repeats` calls."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    out = jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return {"compile_s": compile_s, "seconds": median(times), "compiled_bytes": compiled_bytes(compiled), "out": out}


def compiled_bytes(compiled) -> int | None:
    ma = compiled.memory_analysis()
    if ma is None:
        return None
    return int(ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes + ma.temp_size_in_bytes)


def memory_limit() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def peak_memory() -> int | None:
    """The device's peak bytes in use since the process started (None where the backend does not say)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


# ----------------------------------------------------------------------------------------------------- sections
def check_devices(sizes: Sizes, ctx: Section, state: dict) -> dict:
    devices = jax.devices()
    dev = devices[0]
    versions = {}
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name in ("jax", "jaxlib", "flax", "optax") or name.startswith(("jax-cuda", "jax_cuda", "nvidia-cuda-runtime")):
            versions[name] = dist.version
    n, chain = sizes.matmul, 10  # ten dependent matmuls per call: launch and sync overhead amortised
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)) / np.sqrt(n), jnp.bfloat16)  # keeps |x| ~ 1

    def matmuls(a):
        step = lambda _, x: jnp.dot(x, a, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
        return jax.lax.fori_loop(0, chain, step, a)

    timed = compile_and_time(matmuls, (a,), max(sizes.repeats, 5))
    peak = 2 * n**3 * chain / timed["seconds"]
    state["peak_flops"] = peak
    return {"backend": jax.default_backend(), "device_count": len(devices), "device_kind": dev.device_kind,
            "platform_version": getattr(getattr(dev, "client", None), "platform_version", None),
            "jax": jax.__version__, "versions": versions, "python": sys.version.split()[0],
            "memory_limit_bytes": memory_limit(), "matmul_size": sizes.matmul, "bf16_matmul_tflops": peak / 1e12}


def check_attention(sizes: Sizes, ctx: Section, state: dict) -> dict:
    n, kv, d = sizes.attn_heads
    cases, auto = [], {}
    for length in sizes.attn_lengths:
        rng = np.random.default_rng(length)
        q32, k32, v32 = (jnp.asarray(rng.standard_normal((1, length, h, d)), jnp.float32) for h in (n, kv, kv))
        real = length - length // 10  # right padding: the last 10% are padding tokens
        valid = jnp.arange(length)[None] < real
        pos = jnp.where(valid, jnp.arange(length)[None], 0).astype(jnp.int32)  # as llava.splice lays them out
        rows = np.unique(np.linspace(0, real - 1, min(sizes.reference_rows, real)).astype(int))
        ref = np.asarray(jax.jit(attention_fn("xla"))(q32[:, rows], k32, v32, pos[:, rows], pos, valid))
        q, k, v = (x.astype(jnp.bfloat16) for x in (q32, k32, v32))
        auto[str(length)] = auto_attention_choice(q, k)
        for impl in ("cudnn", "flash", "xla"):
            case = {"tokens": length, "real_tokens": real, "impl": impl}
            cases.append(case)
            if not ctx.has_time():
                case.update(status="skipped", error="section time budget spent")
                continue
            try:
                fn = attention_fn(impl)
                fwd = compile_and_time(fn, (q, k, v, pos, pos, valid), sizes.repeats)
                got = np.asarray(fwd.pop("out")[:, rows], np.float32)
                case.update(max_diff=float(np.abs(got - ref).max()), fwd_ms=fwd["seconds"] * 1e3)
                weight = jnp.asarray(rng.standard_normal(q.shape), jnp.bfloat16)
                # every array is an argument: a closed-over one becomes a constant XLA may try to fold
                loss = lambda q, k, v, w, *mask: (fn(q, k, v, *mask) * w).astype(jnp.float32).sum()
                bwd = compile_and_time(jax.grad(loss, argnums=(0, 1, 2)), (q, k, v, weight, pos, pos, valid),
                                       sizes.repeats)
                case.update(status="ok", fwd_bwd_ms=bwd["seconds"] * 1e3, fwd_bwd_bytes=bwd["compiled_bytes"])
            except Exception as e:  # noqa: BLE001 - unsupported here / OOM: record it, go on
                case.update(failure(e))
            finally:
                gc.collect()
                ctx.save({"heads": [n, kv, d], "auto": auto, "cases": cases})
    return {"heads": [n, kv, d], "auto": auto, "cases": cases}


def video_batch(cfg: ModelConfig, batch: int, sizes: Sizes, seed: int = 0) -> dict:
    """An EK100-MQA-shaped batch: prompt ids with the <image> placeholder (-200), 64 frames, options, labels."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(100, cfg.text.vocab_size, (batch, sizes.prompt + 1)).astype(np.int32)
    ids[:, 15] = -200
    mask = np.arange(sizes.prompt + 1)[None].repeat(batch, 0) < sizes.prompt  # one right-padding position
    s = cfg.vision.image_size
    pixels = rng.uniform(-1, 1, (batch, sizes.frames, 3, s, s)).astype(np.float32)
    opt_ids = rng.integers(100, cfg.text.vocab_size, (batch, NUM_OPTIONS, OPTION_TOKENS)).astype(np.int32)
    labels = np.where(np.arange(sizes.prompt + 1) >= sizes.prompt - ANSWER_TOKENS, ids, -100).astype(np.int32)
    labels[~mask] = -100
    return {"ids": ids, "mask": mask, "pixels": pixels, "opt_ids": opt_ids,
            "opt_mask": np.ones(opt_ids.shape, bool), "labels": labels}


def forward_flops(cfg: ModelConfig, sizes: Sizes) -> float:
    """Model FLOPs of one prefill: a third of the train step's (forward only), minus the LM head on every
    position but the last (generation applies it to the last token only)."""
    seq = sizes.prompt - 1 + cfg.tokens_per_video(sizes.frames)
    return train_flops(cfg, sizes.prompt, sizes.frames) / 3 - 2 * (seq - 1) * cfg.text.hidden_size * cfg.text.vocab_size


def big_inference_model(sizes: Sizes, state: dict):
    if "big_params" not in state:
        cfg, execution = model_config(sizes.big, param_dtype="bfloat16", compute_dtype="bfloat16")
        state["big_params"] = (cfg, execution, init_params(cfg))
    return state["big_params"]


def check_forward(sizes: Sizes, ctx: Section, state: dict) -> dict:
    cfg, execution, params = big_inference_model(sizes, state)
    b = video_batch(cfg, 1, sizes)
    timed = compile_and_time(generate_fn(cfg, execution, 1), (params, b["ids"], b["pixels"], b["mask"]), sizes.repeats)
    flops = forward_flops(cfg, sizes)
    seq = sizes.prompt - 1 + cfg.tokens_per_video(sizes.frames)
    return {"model": sizes.big, "frames": sizes.frames, "tokens": seq, "prefill_s": timed["seconds"],
            "compile_s": timed["compile_s"], "compiled_bytes": timed["compiled_bytes"], "peak_bytes": peak_memory(),
            "model_tflops": flops / 1e12, "mfu": mfu(flops, timed["seconds"], state)}


def check_eval(sizes: Sizes, ctx: Section, state: dict) -> dict:
    cfg, execution, params = big_inference_model(sizes, state)
    cases = []
    out = {"model": sizes.big, "frames": sizes.frames, "options": NUM_OPTIONS, "answer_tokens": ANSWER_TOKENS,
           "questions": EK100_QUESTIONS, "cases": cases}
    for batch in sizes.eval_batches:
        b = video_batch(cfg, batch, sizes)
        for mode in ("score", "generate"):
            case = {"batch": batch, "mode": mode}
            cases.append(case)
            if not ctx.has_time(10):
                case.update(status="skipped", error="section time budget spent")
                continue
            try:
                if mode == "score":
                    timed = compile_and_time(score_fn(cfg, execution), (params, b["ids"], b["pixels"], b["mask"], b["opt_ids"],
                                                             b["opt_mask"]), sizes.repeats)
                else:
                    timed = compile_and_time(generate_fn(cfg, execution, ANSWER_TOKENS), (params, b["ids"], b["pixels"], b["mask"]),
                                             sizes.repeats)
                qps = batch / timed["seconds"]
                case.update(status="ok", seconds=timed["seconds"], compile_s=timed["compile_s"], questions_per_s=qps,
                            projected_s=EK100_QUESTIONS / qps, compiled_bytes=timed["compiled_bytes"])
            except Exception as e:  # noqa: BLE001
                case.update(failure(e))
            finally:
                gc.collect()
                ctx.save(out)
    state.pop("big_params", None)  # the training sections need the memory
    return out


def check_train(section: str, name: str, sizes: Sizes, ctx: Section, state: dict, remat: str) -> dict:
    state.pop("big_params", None)
    gc.collect()
    cfg, execution = model_config(name, param_dtype="float32", compute_dtype="bfloat16", remat_policy=remat)
    n_params = count_params(cfg)
    need = 16 * n_params  # fp32 params + grads + AdamW mu and nu, before any activation
    limit = sizes.assumed_memory.get(section, memory_limit())
    out = {"model": name, "frames": sizes.frames, "remat": remat, "params": n_params, "state_and_grads_bytes": need,
           "memory_limit_bytes": limit}
    if limit is not None and need > limit:
        out.update(status="does_not_fit", error=f"fp32 params + grads + AdamW moments need {need / GIB:.3g} GiB, "
                                                f"the device holds {limit / GIB:.3g} GiB")
        return out
    b = video_batch(cfg, 1, sizes)
    batch = {"input_ids": b["ids"], "attention_mask": b["mask"], "labels": b["labels"], "pixel_values": b["pixels"],
             "actions": np.zeros((1, 3), np.int32), "has_video": np.ones((1,), bool)}
    step, train_state = train_step_fn(cfg, execution, init_params(cfg))
    t0 = time.perf_counter()
    compiled = step.lower(train_state, batch).compile()
    out.update(compile_s=time.perf_counter() - t0, compiled_bytes=compiled_bytes(compiled))
    times = []
    for i in range(sizes.repeats + 1):  # the first step is the warm-up
        t0 = time.perf_counter()
        train_state, metrics = compiled(train_state, batch)
        loss = float(jax.block_until_ready(metrics["loss"]))
        times.append(time.perf_counter() - t0)
        if i and not ctx.has_time(2 * times[-1]):
            break
    step_s = median(times[1:]) if len(times) > 1 else times[0]
    seq = sizes.prompt - 1 + cfg.tokens_per_video(sizes.frames)
    flops = train_flops(cfg, sizes.prompt, sizes.frames)
    out.update(status="ok", step_s=step_s, steps_timed=len(times) - 1, loss=loss, tokens=seq, tokens_per_s=seq / step_s,
               model_tflops=flops / 1e12, mfu=mfu(flops, step_s, state), peak_bytes=peak_memory())
    return out


SECTIONS = {
    "devices": check_devices,
    "attention": check_attention,
    "forward_7b": check_forward,
    "eval_7b": check_eval,
    "train_0_5b": lambda sizes, ctx, state: check_train("train_0_5b", sizes.small, sizes, ctx, state, state["remat"]),
    "train_7b": lambda sizes, ctx, state: check_train("train_7b", sizes.big, sizes, ctx, state, state["remat"]),
}


def run_checks(sizes: Sizes, time_limit: float, remat: str, write, sections=tuple(SECTIONS)) -> dict:
    """The sections in order (devices always: it measures the MFU denominator), each guarded and budgeted;
    `write(results)` after each one."""
    deadline = time.monotonic() + time_limit
    state = {"remat": remat}
    results = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "smoke": sizes == SMOKE, "time_limit_s": time_limit, "sections": {}}
    for name, fn in SECTIONS.items():
        if name != "devices" and name not in sections:
            continue
        t0 = time.monotonic()
        if deadline - t0 < 5:
            out = {"status": "skipped", "error": "the run's time limit is spent"}
        else:
            try:
                def save(partial, name=name):
                    results["sections"][name] = dict(partial, status="running", section_s=time.monotonic() - t0)
                    write(results)

                out = fn(sizes, Section(sizes.budgets[name], deadline, save), state)
                out.setdefault("status", "ok")
            except Exception as e:  # noqa: BLE001 - one section failing must not stop the others
                out = failure(e)
                out["traceback"] = traceback.format_exc(limit=6)[-2000:]
        out["section_s"] = time.monotonic() - t0
        results["sections"][name] = out
        print(f"[device_check] {name}: {out['status']} in {out['section_s']:.0f} s", flush=True)
        jax.clear_caches()
        gc.collect()
        write(results)
    results["total_s"] = sum(s["section_s"] for s in results["sections"].values())
    write(results)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, help="write the results as JSON here (after every section)")
    parser.add_argument("--markdown", type=pathlib.Path, help="write a BENCHMARKS.md-style block here")
    parser.add_argument("--time-limit", type=float, default=450.0, help="seconds for all sections together")
    parser.add_argument("--remat", default="full", help="remat policy of the training sections (default full)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma list of sections to run (a retry)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds on CPU (CI)")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    sizes = SMOKE if args.smoke else Sizes()
    command = "python -m llavaction_jax.bench.device_check " + " ".join(argv if argv is not None else sys.argv[1:])

    def write(results):
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1, default=str) + "\n")
        if args.markdown:
            args.markdown.parent.mkdir(parents=True, exist_ok=True)
            args.markdown.write_text(markdown_block(results, command.strip()) + "\n")

    results = run_checks(sizes, args.time_limit, args.remat, write, sections)
    print(format_table(results), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
