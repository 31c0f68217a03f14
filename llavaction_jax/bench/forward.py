"""Benchmark: jitted forward of a mini LLaVA-OneVision-layout model vs the transformers PyTorch model.

Same weights, same inputs, same run: a SigLIP (4 layers, 256 wide) + mlp2x_gelu + Qwen2 (4 layers, 512 wide)
model on 8 frames at 384 px in the one_token layout (1569 visual tokens + text). Reports JAX compile time,
steady-state time of both, the ratio (target: JAX <= 0.7x PyTorch) and the max logit difference. The two are timed
in blocks of --repeats calls, alternating JAX and PyTorch for --rounds rounds with a pause before each block (so
PyTorch's OpenMP threads have stopped spinning): a host whose speed drifts moves both blocks of a round alike, and
the ratio reported is the median of the rounds' ratios, with its range. For context, the
matmul throughput of both frameworks on the model's three largest matmul shapes (each timed in its own block): where
JAX's matmuls keep up with PyTorch's, the forward's gap lies outside them (attention, copies, the runtime).

    python -m llavaction_jax.bench.forward [--repeats 5] [--rounds 3] [--batch 1] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from llavaction_jax import cli_flags
from llavaction_jax.bench.common import median, record, time_calls
from llavaction_jax.config import ExecutionConfig
from llavaction_jax.convert.import_plan import torch_to_params
from llavaction_jax.convert.upstream_config import from_upstream
from llavaction_jax.model import llava
from llavaction_jax.sharding import resolve_execution


PAUSE_S = 1.0  # before each timed block: PyTorch's OpenMP threads spin for a while after its calls


def build(batch: int, frames: int, seed: int = 0):
    # torch and transformers: heavy optional dependencies (the reference side), imported where used.
    import torch
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    text = Qwen2Config(vocab_size=32768, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=False)
    vision = SiglipVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                                image_size=384, patch_size=14)
    hf_cfg = LlavaOnevisionConfig(text_config=text, vision_config=vision, image_token_index=32000,
                                  video_token_index=32001, vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(hf_cfg).eval()
    rng = np.random.default_rng(seed)
    pixels = rng.uniform(-1, 1, size=(batch, frames, 3, 384, 384)).astype(np.float32)
    before, after = rng.integers(0, 32000, size=(batch, 40)), rng.integers(0, 32000, size=(batch, 60))
    return hf_cfg, model, pixels, before, after


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per block (its median is taken)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of one JAX and one PyTorch block")
    parser.add_argument("--batch", type=int, default=1)
    cli_flags.add_num_frames(parser, "the model input's", default=8)
    parser.add_argument("--no-write", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = parser.parse_args(argv)

    import torch  # heavy optional dependency (the PyTorch side of the comparison), imported where used

    torch.set_num_threads(os.cpu_count())
    hf_cfg, model, pixels, before, after = build(args.batch, args.num_frames)
    cfg = from_upstream(hf_cfg.to_dict())
    execution = resolve_execution(ExecutionConfig())  # this machine's execution choices
    params = jax.device_put(torch_to_params({k: v.numpy() for k, v in model.state_dict().items()}, cfg))
    n_video = cfg.tokens_per_video(args.num_frames)
    hf_ids = torch.tensor(np.concatenate([before, np.full((args.batch, n_video), 32001), after], axis=1))
    ids = jnp.asarray(np.concatenate([before, np.full((args.batch, 1), -200), after], axis=1))
    px_t, px_j = torch.tensor(pixels), jnp.asarray(pixels)

    fwd = jax.jit(lambda p, i, x: llava.lm_logits(p, llava.forward(p, cfg, execution, i, x).hidden))
    t0 = time.perf_counter()
    compiled = fwd.lower(params, ids, px_j).compile()
    compile_s = time.perf_counter() - t0
    jax_out = np.asarray(compiled(params, ids, px_j))  # warm-up
    shapes = matmul_shapes(cfg, seq=ids.shape[1] - 1 + n_video, frames=args.num_frames * args.batch)
    jax_gflops = [matmul_gflops("jax", *shape) for shape in shapes]

    rounds = []  # (JAX, PyTorch) block medians
    with torch.inference_mode():
        torch_out = model(input_ids=hf_ids, pixel_values_videos=px_t).logits.numpy()  # warm-up
        for _ in range(args.rounds):
            time.sleep(PAUSE_S)
            jax_block = median(time_calls(lambda: compiled(params, ids, px_j), args.repeats, jax.block_until_ready))
            time.sleep(PAUSE_S)
            rounds.append((jax_block, median(time_calls(lambda: model(input_ids=hf_ids, pixel_values_videos=px_t),
                                                                args.repeats))))
    time.sleep(PAUSE_S)
    torch_gflops = [matmul_gflops("torch", *shape) for shape in shapes]

    jax_s, torch_s = median([j for j, _ in rounds]), median([t for _, t in rounds])
    ratios = sorted(j / t for j, t in rounds)
    diff = float(np.abs(jax_out - torch_out).max())
    seq = ids.shape[1] - 1 + n_video
    cmd = "python -m llavaction_jax.bench.forward " + " ".join(argv if argv is not None else sys.argv[1:])
    record("forward: mini LLaVA-OneVision, 8 frames x 384 px", cmd.strip(), [
        f"- shapes: batch {args.batch}, {args.num_frames} frames, {seq} tokens ({n_video} visual); SigLIP 4x256, Qwen2 4x512, vocab 32768; fp32",
        f"- JAX compile: {compile_s:.2f} s",
        f"- steady state ({args.rounds} rounds of a JAX and a PyTorch block of {args.repeats} calls, medians): JAX "
        f"{jax_s * 1e3:.0f} ms, PyTorch {torch_s * 1e3:.0f} ms (torch {torch.__version__}, {torch.get_num_threads()} "
        "threads)",
        f"- ratio JAX / PyTorch: **{median(ratios):.2f}x** (the rounds' median; range {ratios[0]:.2f}-{ratios[-1]:.2f}x; "
        "target <= 0.7x)",
        f"- max |logit diff|: {diff:.2e}",
        "- matmul throughput, fp32 (m x k @ k x n; JAX / PyTorch): " + "; ".join(
            f"{m}x{k}@{k}x{n} {j:.0f} / {t:.0f} GFLOP/s ({j / t:.2f}x)"
            for (m, k, n), j, t in zip(shapes, jax_gflops, torch_gflops)),
    ], write=not args.no_write)
    return 0


def matmul_shapes(cfg, seq: int, frames: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of the model's three largest matmuls: the LM head, a Qwen2 MLP projection, a SigLIP MLP one."""
    vision_tokens = frames * cfg.vision.num_patches
    return [(seq, cfg.text.hidden_size, cfg.text.vocab_size), (seq, cfg.text.hidden_size, cfg.text.intermediate_size),
            (vision_tokens, cfg.vision.hidden_size, cfg.vision.intermediate_size)]


def matmul_gflops(framework: str, m: int, k: int, n: int, repeats: int = 5) -> float:
    """Best-of-`repeats` fp32 GFLOP/s of one (m, k) @ (k, n) matmul in `framework` ("jax" or "torch")."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32)
    if framework == "jax":
        matmul = jax.jit(jnp.matmul)
        a, b = jnp.asarray(a), jnp.asarray(b)
        block = jax.block_until_ready
    else:
        import torch  # the PyTorch side of the comparison

        matmul, a, b, block = torch.matmul, torch.from_numpy(a), torch.from_numpy(b), (lambda x: x)
    block(matmul(a, b))  # warm-up (and compile)
    return 2 * m * k * n / min(time_calls(lambda: matmul(a, b), repeats, block)) / 1e9


if __name__ == "__main__":
    raise SystemExit(main())
