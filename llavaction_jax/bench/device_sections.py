"""The device check's sections, run by bench/device_check.py in this worker process: one section per command (a
JSON line on stdin: name, seconds it may take, the peaks for MFU), every result appended to the events file (one
JSON line each) the moment it is measured. Models are built from the configs/ presets (configs/<name>.py).

    python -m llavaction_jax.bench.device_sections --events FILE [--sizes full|smoke] [--attention auto] [--remat full]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from importlib import metadata

import jax
import jax.numpy as jnp
import numpy as np

from llavaction_jax.bench.common import median
from llavaction_jax.bench.device_check import HANG_ENV, SIZES, Sizes
from llavaction_jax.config import ModelConfig, ResolvedExecution, preset_configs
from llavaction_jax.model import attention, llava
from llavaction_jax.model.decode import GenerationConfig, generate
from llavaction_jax.model.params import abstract_params
from llavaction_jax.sharding import platform_of, resolve_execution
from llavaction_jax.train.metrics import lm_head_positions, peak_flops_per_device, train_flops
from llavaction_jax.train.optim import OptimizerConfig, make_optimizer, param_groups
from llavaction_jax.train.step import init_state, make_train_step

EK100_QUESTIONS = 9668  # EPIC-KITCHENS-100 validation segments = EK100-MQA questions
ANSWER_TOKENS = 8  # greedy answer length in the eval section (never stops early: 8 real decode steps)
PLACEHOLDER_AT = 15  # the <image> placeholder's position in the prompt (after the ChatML system turn)
GIB = 2**30


def model_config(name: str, param_dtype: str, **execution) -> tuple[ModelConfig, ResolvedExecution]:
    """configs/<name>.py with this parameter dtype, and its execution choices with these changes resolved for this
    machine's devices, as every entry point does."""
    cfg, preset_execution = preset_configs(name, {"param_dtype": param_dtype})
    return cfg, resolve_execution(preset_execution.replace(**execution))


# ============================================================================================ model entry points
# Every call into the model, eval and train code is in this section (adapt here when their signatures change).
def attention_fn(impl: str):
    platform = platform_of()
    return lambda q, k, v, q_pos, k_pos, valid: attention.attention(q, k, v, q_pos=q_pos, k_pos=k_pos, k_valid=valid,
                                                                  causal=True, impl=impl, platform=platform)


def init_params(cfg: ModelConfig, seed: int = 0):
    return jax.jit(lambda key: llava.init(cfg, key))(jax.random.key(seed))


def count_params(cfg: ModelConfig) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract_params(llava.param_specs(cfg))))


def generate_fn(cfg: ModelConfig, execution: ResolvedExecution, new_tokens: int):
    gen = GenerationConfig(max_new_tokens=new_tokens, eos_ids=(-1,), pad_id=0)  # never stops early
    return lambda params, ids, pixels, mask: generate(params, cfg, execution, gen, ids, pixels, mask)[0]


def train_step_fn(cfg: ModelConfig, execution: ResolvedExecution, params):
    """(jitted step with the state donated, initial state)."""
    opt_cfg = OptimizerConfig()  # AdamW over all parts, as upstream
    tx, schedules = make_optimizer(params, opt_cfg)
    step = make_train_step(cfg, execution, tx, param_groups(params, opt_cfg), 1, schedules)
    return jax.jit(step, donate_argnums=0), jax.jit(lambda p: init_state(p, tx))(params)
# ===============================================================================================================


def failure(error: BaseException) -> dict:
    text = str(error)
    oom = "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()
    status = "oom" if oom else "unsupported" if "cannot run here" in text else "error"
    return {"status": status, "error": f"{type(error).__name__}: {text[-600:]}"}


def compiled_bytes(compiled) -> int | None:
    ma = compiled.memory_analysis()
    if ma is None:
        return None
    return int(ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes + ma.temp_size_in_bytes)


def memory_stat(key: str) -> int | None:
    """A device memory statistic (bytes_limit, peak_bytes_in_use), None where the backend does not say."""
    return (jax.devices()[0].memory_stats() or {}).get(key)


def timed_calls(call, repeats: int) -> dict:
    """Call `call()` (it waits for its result) once, and again while a call takes under a second, `repeats` calls at
    most: the median of the calls after the first (the first alone when it was the only one)."""
    times = []
    while len(times) < repeats and (not times or times[-1] < 1.0):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return {"seconds": median(times[1:]) if len(times) > 1 else times[0], "first_call_s": times[0], "calls": len(times)}


def compile_and_time(fn, args, repeats: int) -> dict:
    """AOT-compile fn(*args) once, then `timed_calls` of the compiled program (args already on the device)."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    return {"compile_s": compile_s, "compiled_bytes": compiled_bytes(compiled),
            **timed_calls(lambda: jax.block_until_ready(compiled(*args)), repeats)}


class Section:
    """One command: its deadline, its events, the case runner with the flash fallback."""

    def __init__(self, name: str, seconds: float, sizes: Sizes, attention: str, remat: str, peaks: dict, state: dict,
                 emit):
        self.name, self.sizes, self.attention, self.remat, self.state, self.emit = name, sizes, attention, remat, \
            state, emit
        self.peak, self.spec = peaks.get("peak_flops"), peaks.get("spec_flops")
        self.end = time.monotonic() + seconds
        self.cases: list[dict] = []

    def left(self) -> float:
        return self.end - time.monotonic()

    def facts(self, facts: dict) -> None:
        self.emit({"kind": "facts", "facts": facts})

    def mfu(self, flops: float, seconds: float) -> dict:
        """MFU against the peak measured here and against the specification (None where one is unknown)."""
        return {"model_tflops": flops / 1e12, "mfu": flops / seconds / self.peak if self.peak else None,
                "mfu_spec": flops / seconds / self.spec if self.spec else None}

    def case(self, label: str, measure, expected: float = 0.0, impls=None, **fields) -> dict:
        """Run `measure(attention)` -> facts, record and emit the case. The first attempt uses --attention; one that
        fails is retried once with flash (both attempts recorded). A case that cannot start `expected` seconds
        before the deadline is recorded as skipped."""
        case = {"case": label, **fields, "attempts": []}
        if expected > self.left():
            case.update(status="skipped", error=f"needs about {expected:.0f} s, {max(self.left(), 0):.0f} s left "
                                                "before the section's deadline")
            impls = []
        for impl in [self.attention] if self.attention == "flash" else [self.attention, "flash"] if impls is None \
                else impls:
            try:
                facts, attempt = measure(impl), {"attention": impl, "status": "ok"}
            except Exception as e:  # noqa: BLE001 - recorded; the next attempt, case and section still run
                facts, attempt = {}, {"attention": impl, **failure(e)}
            finally:
                gc.collect()
            case["attempts"].append(attempt)
            case.update(facts, attention=impl, status=attempt["status"])
            case.pop("error", None)
            if attempt["status"] == "ok":
                break
            case["error"] = attempt["error"]
        self.cases.append(case)
        self.emit({"kind": "case", "case": case})
        return case

    def put(self, tree):
        """On the device before anything is timed."""
        return jax.block_until_ready(jax.device_put(tree))


# ----------------------------------------------------------------------------------------------------- sections
def check_devices(sec: Section) -> None:
    devices = jax.devices()
    dev = devices[0]
    versions = {}
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name in ("jax", "jaxlib", "flax", "optax", "ml_collections", "ml-collections") or name.startswith(
                ("jax-cuda", "jax_cuda", "nvidia-cuda-runtime", "nvidia-cudnn")):
            versions[name] = dist.version
    n, chain = sec.sizes.matmul, 10  # ten dependent matmuls per call: launch and sync overhead amortised
    a = sec.put(jnp.asarray(np.random.default_rng(0).standard_normal((n, n)) / np.sqrt(n), jnp.bfloat16))

    def matmuls(a):
        step = lambda _, x: jnp.dot(x, a, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
        return jax.lax.fori_loop(0, chain, step, a)

    timed = compile_and_time(matmuls, (a,), max(sec.sizes.repeats, 5))
    peak = 2 * n**3 * chain / timed["seconds"]
    spec = sec.spec or peak_flops_per_device(dev)
    sec.facts({"backend": jax.default_backend(), "device_count": len(devices), "device_kind": dev.device_kind,
               "platform_version": getattr(getattr(dev, "client", None), "platform_version", None),
               "jax": jax.__version__, "versions": versions, "python": sys.version.split()[0],
               "xla_flags": os.environ.get("XLA_FLAGS", ""), "memory_limit_bytes": memory_stat("bytes_limit"),
               "matmul_size": n, "bf16_matmul_tflops": peak / 1e12, "spec_flops": spec,
               "spec_tflops": spec / 1e12 if spec else None})


def video_batch(cfg: ModelConfig, batch: int, sizes: Sizes, seed: int = 0) -> dict:
    """An EK100-MQA-shaped batch: prompt ids with the <image> placeholder (-200), the frames, the answer's labels."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(100, cfg.text.vocab_size, (batch, sizes.prompt + 1)).astype(np.int32)
    ids[:, PLACEHOLDER_AT] = -200
    mask = np.arange(sizes.prompt + 1)[None].repeat(batch, 0) < sizes.prompt  # one right-padding position
    s = cfg.vision.image_size
    pixels = rng.uniform(-1, 1, (batch, sizes.frames, 3, s, s)).astype(np.float32)
    labels = np.where(np.arange(sizes.prompt + 1) >= sizes.prompt - ANSWER_TOKENS, ids, -100).astype(np.int32)
    labels[~mask] = -100
    return {"ids": ids, "mask": mask, "pixels": pixels, "labels": labels}


def spliced_length(cfg: ModelConfig, sizes: Sizes) -> int:
    return sizes.prompt - 1 + cfg.tokens_per_video(sizes.frames)


def forward_flops(cfg: ModelConfig, sizes: Sizes) -> float:
    """Model FLOPs of one prefill: a third of the train step's (forward only), with the LM head on the last
    position only (generation applies it there and nowhere else)."""
    return train_flops(cfg, sizes.prompt, sizes.frames, lm_head_tokens=1) / 3


def big_inference_model(sec: Section):
    if "big" not in sec.state:
        cfg, execution = model_config(sec.sizes.big, param_dtype="bfloat16", compute_dtype="bfloat16")
        sec.state["big"] = (cfg, execution, init_params(cfg))
    return sec.state["big"]


def check_forward(sec: Section) -> None:
    sizes = sec.sizes
    cfg, execution, params = big_inference_model(sec)
    b = sec.put(video_batch(cfg, 1, sizes))
    flops = forward_flops(cfg, sizes)
    sec.facts({"model": sizes.big, "frames": sizes.frames, "tokens": spliced_length(cfg, sizes)})

    def measure(impl):
        args = (params, b["ids"], b["pixels"], b["mask"])
        timed = compile_and_time(generate_fn(cfg, execution.replace(attention=impl), 1), args, sizes.repeats)
        return {**timed, "prefill_s": timed["seconds"], "peak_bytes": memory_stat("peak_bytes_in_use"),
                **sec.mfu(flops, timed["seconds"])}

    sec.case("prefill", measure)


def check_eval(sec: Section) -> None:
    sizes = sec.sizes
    cfg, execution, params = big_inference_model(sec)
    sec.facts({"model": sizes.big, "frames": sizes.frames, "answer_tokens": ANSWER_TOKENS,
               "questions": EK100_QUESTIONS})
    for batch in sizes.eval_batches:
        b = sec.put(video_batch(cfg, batch, sizes))

        def measure(impl):
            timed = compile_and_time(generate_fn(cfg, execution.replace(attention=impl), ANSWER_TOKENS),
                                     (params, b["ids"], b["pixels"], b["mask"]), sizes.repeats)
            qps = batch / timed["seconds"]
            return {**timed, "questions_per_s": qps, "projected_s": EK100_QUESTIONS / qps}

        sec.case(f"batch {batch}", measure, sizes.case_expected.get(f"eval_7b/batch {batch}", 0.0), batch=batch)
        del b
    done = {c["batch"]: c["questions_per_s"] for c in sec.cases if c["status"] == "ok"}
    if len(done) > 1:
        sec.facts({"batch_speedup": done[max(done)] / done[min(done)]})  # questions/s, largest batch / smallest
    sec.state.pop("big", None)  # the training sections need the memory


def check_train(sec: Section, name: str) -> None:
    sec.state.pop("big", None)
    gc.collect()
    sizes = sec.sizes
    cfg, execution = model_config(name, param_dtype="float32", compute_dtype="bfloat16", remat_policy=sec.remat)
    n_params = count_params(cfg)
    need = 16 * n_params  # fp32 params + grads + AdamW mu and nu, before any activation
    limit = sizes.assumed_memory.get(sec.name, memory_stat("bytes_limit"))
    seq = spliced_length(cfg, sizes)
    b = video_batch(cfg, 1, sizes)
    targets = [p + cfg.tokens_per_video(sizes.frames) - 1 for p in np.flatnonzero(b["labels"][0] != -100)]
    head = lm_head_positions(execution, seq, targets)
    flops = train_flops(cfg, sizes.prompt, sizes.frames, lm_head_tokens=head)
    sec.facts({"model": name, "frames": sizes.frames, "remat": sec.remat, "params": n_params, "tokens": seq,
               "lm_head_tokens": head, "state_and_grads_bytes": need, "memory_limit_bytes": limit})
    if limit is not None and need > limit:
        sec.cases.append(case := {"case": "step", "status": "does_not_fit", "attempts": [], "error": (
            f"fp32 params + grads + AdamW moments need {need / GIB:.3g} GiB, the device holds {limit / GIB:.3g} GiB")})
        sec.emit({"kind": "case", "case": case})
        return
    batch = sec.put({"input_ids": b["ids"], "attention_mask": b["mask"], "labels": b["labels"], "pixel_values": b["pixels"],
                     "actions": np.zeros((1, 3), np.int32), "has_video": np.ones((1,), bool)})

    def measure(impl):
        step, state = train_step_fn(cfg, execution.replace(attention=impl), init_params(cfg))
        t0 = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
        box = {"state": state, "loss": None}

        def call():
            box["state"], m = compiled(box["state"], batch)
            box["loss"] = float(jax.block_until_ready(m["loss"]))

        timed = timed_calls(call, sizes.repeats)
        del box["state"]
        return {**timed, "compile_s": compile_s, "compiled_bytes": compiled_bytes(compiled),
                "step_s": timed["seconds"], "loss": box["loss"], "tokens_per_s": seq / timed["seconds"],
                "peak_bytes": memory_stat("peak_bytes_in_use"), **sec.mfu(flops, timed["seconds"])}

    sec.case("step", measure, sizes.case_expected.get(f"{sec.name}/step", 0.0))


def check_attention(sec: Section) -> None:
    sizes = sec.sizes
    n, kv, d = sizes.attn_heads
    length = sizes.attn_length
    rng = np.random.default_rng(length)
    q32, k32, v32 = (sec.put(jnp.asarray(rng.standard_normal((1, length, h, d)), jnp.float32)) for h in (n, kv, kv))
    real = length - length // 10  # right padding: the last 10% are padding tokens
    valid = sec.put(jnp.arange(length)[None] < real)
    pos = sec.put(jnp.where(valid, jnp.arange(length)[None], 0).astype(jnp.int32))  # as llava.splice lays them out
    rows = np.unique(np.linspace(0, real - 1, min(sizes.reference_rows, real)).astype(int))
    ref = np.asarray(jax.jit(attention_fn("xla"))(q32[:, rows], k32, v32, pos[:, rows], pos, valid))
    q, k, v = (sec.put(x.astype(jnp.bfloat16)) for x in (q32, k32, v32))
    weight = sec.put(jnp.asarray(rng.standard_normal(q.shape), jnp.bfloat16))
    sec.facts({"heads": [n, kv, d], "tokens": length, "real_tokens": real,
               "auto": attention.auto_impl(q, k, causal=True, platform=platform_of())})

    for impl in ("cudnn", "flash"):
        def measure(_, impl=impl):
            fn = attention_fn(impl)
            fwd = compile_and_time(fn, (q, k, v, pos, pos, valid), sizes.repeats)
            got = np.asarray(jax.jit(fn)(q, k, v, pos, pos, valid)[:, rows], np.float32)
            # every array is an argument: a closed-over one becomes a constant XLA may try to fold
            loss = lambda q, k, v, w, *mask: (fn(q, k, v, *mask) * w).astype(jnp.float32).sum()
            bwd = compile_and_time(jax.grad(loss, argnums=(0, 1, 2)), (q, k, v, weight, pos, pos, valid), sizes.repeats)
            return {"max_diff": float(np.abs(got - ref).max()), "fwd_ms": fwd["seconds"] * 1e3,
                    "fwd_bwd_ms": bwd["seconds"] * 1e3, "fwd_bwd_bytes": bwd["compiled_bytes"]}

        sec.case(f"{length} tokens {impl}", measure, impls=[impl], impl=impl)


SECTIONS = {
    "devices": check_devices,
    "forward_7b": check_forward,
    "eval_7b": check_eval,
    "train_0_5b": lambda sec: check_train(sec, sec.sizes.small),
    "attention": check_attention,
    "train_7b": lambda sec: check_train(sec, sec.sizes.big),
}


def section_status(cases: list[dict]) -> str:
    """ok when every case is; partial when some are; else the cases' common status (or error)."""
    statuses = {c["status"] for c in cases}
    if statuses <= {"ok"}:
        return "ok"
    if "ok" in statuses:
        return "partial"
    return statuses.pop() if len(statuses) == 1 else "error"


def run_section(command: dict, sizes: Sizes, attention_impl: str, remat: str, state: dict, emit) -> None:
    name = command["section"]
    sec = Section(name, command["seconds"], sizes, attention_impl, remat, command, state, emit)
    if os.environ.get(HANG_ENV) == name:
        time.sleep(10**6)  # test hook (bench/device_check.py): a section that never returns, as a hung compile
    try:
        SECTIONS[name](sec)
        emit({"kind": "done", "status": section_status(sec.cases)})
    except Exception as e:  # noqa: BLE001 - recorded; the next section still runs
        emit({"kind": "done", **failure(e), "traceback": traceback.format_exc(limit=6)[-2000:]})
    finally:
        jax.clear_caches()
        gc.collect()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", required=True, help="append the events (JSON lines) to this file")
    parser.add_argument("--sizes", choices=tuple(SIZES), default="full")
    parser.add_argument("--attention", default="auto", help="attention of each model case's first attempt")
    parser.add_argument("--remat", default="full", help="remat policy of the training sections")
    args = parser.parse_args(argv)
    state: dict = {}
    with open(args.events, "a") as events:
        def emit(event: dict) -> None:
            events.write(json.dumps(event, default=str) + "\n")
            events.flush()

        for line in sys.stdin:
            if line.strip():
                run_section(json.loads(line), SIZES[args.sizes], args.attention, args.remat, state, emit)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
