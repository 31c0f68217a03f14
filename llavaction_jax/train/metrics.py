"""Training metrics: a progress line on stdout, scalars for TensorBoard (and Weights & Biases), FLOPs and MFU.

The loop keeps the step's metrics on the device (`StepOutputs`) and fetches them at sync points only (log lines,
checkpoints), and `LoopClock` measures what the loop itself costs on top of the jitted step.

Scalars go through tensorboardX's `SummaryWriter` (a maintained writer of TensorBoard's event files, no TensorFlow
needed) under grouped tags, so TensorBoard shows one section per group:

    train/   loss, lm_loss, aux_loss, tokens (LM target tokens in the step's global batch)
    optim/   grad_norm, lr_<group> (one learning rate per optimizer group)
    perf/    tokens_per_s, step_time_s, mfu (measured between two logged steps, as on the progress line)

With `train.wandb_project` set, the same scalars also go to Weights & Biases (`wandb`, not a dependency: installed
by the user when wanted; asking for it without it installed is refused before training starts).
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from llavaction_jax.config import ConfigError, ModelConfig, ResolvedExecution, require_resolved

# ----------------------------------------------------------------------------------------------- scalar writers
GROUPS = {"loss": "train", "lm_loss": "train", "aux_loss": "train", "tokens": "train", "grad_norm": "optim",
          "tokens_per_s": "perf", "step_time_s": "perf", "mfu": "perf"}


def tag(name: str) -> str:
    """"loss" -> "train/loss", "lr_vision" -> "optim/lr_vision"; a name not in GROUPS goes to train/."""
    group = "optim" if name.startswith("lr_") else GROUPS.get(name, "train")
    return f"{group}/{name}"


def check_wandb(project: str) -> None:
    if project and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"train.wandb_project={project!r} asks for Weights & Biases, but wandb is not installed "
                          "(pip install wandb), or leave train.wandb_project empty")


class MetricsWriter:
    """Grouped scalars to `<logdir>` (TensorBoard event files) and, when `wandb_project` is set, to W&B."""

    def __init__(self, logdir: str | os.PathLike, wandb_project: str = "", wandb_run: str = "",
                 config: dict | None = None):
        # tensorboardX is pinned in requirements.txt; imported here so the FLOPs helpers below also load on machines
        # without it (the device benchmarks import this module).
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(logdir))
        self._wandb = None
        if wandb_project:
            check_wandb(wandb_project)
            import wandb  # optional, checked above

            self._wandb = wandb.init(project=wandb_project, name=wandb_run or None, dir=str(logdir),
                                     config=config, resume="allow")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        tagged = {tag(k): float(v) for k, v in values.items()}
        for name, value in tagged.items():
            self._tb.add_scalar(name, value, step)
        self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(tagged, step=step)

    def close(self) -> None:
        self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


# ----------------------------------------------------------------------------------------------- FLOPs and MFU

# Dense bf16 peak FLOP/s per device for the MFU estimate; others can be passed in the config.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
              "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12}


def peak_flops_per_device(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops
    return None


def measure_matmul_peak(size: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a jitted square matmul on the default device (the CPU 'peak' used for MFU on this machine)."""
    x = jnp.ones((size, size), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(repeats):
        f(x).block_until_ready()
    return 2 * size**3 * repeats / (time.perf_counter() - t0)


def train_flops(cfg: ModelConfig, text_tokens: int, frames: int, vision_trained: bool = True,
                lm_head_tokens: int | None = None) -> float:
    """Model FLOPs of one forward + backward for one sample: 6 x params x tokens for the matmuls, plus attention.

    The LLM sees the spliced sequence; the vision tower sees frames x patches, counted 2x (forward only) when it
    is frozen, since nothing below it needs gradients. The LM head is counted on `lm_head_tokens` positions (where
    the step computes logits, `lm_head_positions`), on every position when None.
    """
    v, t = cfg.vision, cfg.text
    seq = text_tokens - 1 + cfg.tokens_per_video(frames)
    head = seq if lm_head_tokens is None else lm_head_tokens
    llm_params = t.num_layers * (t.hidden_size * (t.num_heads + 2 * t.num_kv_heads) * t.head_dim
                                 + t.num_heads * t.head_dim * t.hidden_size + 3 * t.hidden_size * t.intermediate_size)
    llm = 6 * seq * llm_params + 6 * head * t.hidden_size * t.vocab_size + 12 * t.num_layers * seq * seq * t.hidden_size / 2
    patches = frames * v.num_patches
    vis_params = v.num_layers * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
    proj_params = v.hidden_size * t.hidden_size + (cfg.projector_depth - 1) * t.hidden_size**2
    vision = (6 if vision_trained else 2) * patches * (vis_params + proj_params) + 12 * v.num_layers * frames * v.num_patches**2 * v.hidden_size
    return float(llm + vision)


def lm_head_positions(execution: ResolvedExecution, seq: int, targets) -> int:
    """Positions of a `seq`-long spliced sequence whose LM-head logits the train step computes under `execution`,
    when the tokens at positions `targets` are its only targets: with the chunked loss that skips target-free chunks
    (losses.chunked_lm_row_sums: the seq - 1 predicting positions cut into balanced chunks), the chunks that hold a
    target; otherwise every position."""
    execution = require_resolved(execution, "metrics.lm_head_positions")
    n = seq - 1
    if execution.loss_chunk_tokens <= 0 or execution.loop_collectives == "off" or not execution.loss_skip_empty_chunks:
        return seq
    num = -(-n // execution.loss_chunk_tokens)
    if num == 1:
        return seq
    chunk = -(-n // num)
    return chunk * len({(t - 1) // chunk for t in targets})


class Progress:
    """The stdout progress line: step, loss, aux, grad norm, LR, tokens/s, MFU, ETA."""

    def __init__(self, total_steps: int, flops_per_step: float | None, peak_flops: float | None):
        self.total, self.flops, self.peak = total_steps, flops_per_step, peak_flops
        self.t_last, self.step_last = time.perf_counter(), None

    def rates(self, step: int, m: dict) -> dict[str, float]:
        """tokens_per_s, step_time_s and mfu since the previous call; empty on the first call (it includes
        compiling) and when no step was taken since."""
        now = time.perf_counter()
        out = {}
        if self.step_last is not None and step > self.step_last:
            dt = (now - self.t_last) / (step - self.step_last)
            out = {"tokens_per_s": m["tokens"] / dt, "step_time_s": dt}
            if self.flops and self.peak:
                out["mfu"] = self.flops / dt / self.peak
        self.t_last, self.step_last = now, step
        return out

    def line(self, step: int, m: dict, rates: dict[str, float]) -> str:
        parts = [f"step {step}/{self.total}", f"loss {m['loss']:.4f}", f"lm {m['lm_loss']:.4f}",
                 f"aux {m['aux_loss']:.4f}", f"gnorm {m['grad_norm']:.3f}", f"lr {m.get('lr_llm', np.nan):.2e}"]
        if rates:
            parts += [f"tok/s {rates['tokens_per_s']:,.0f}", f"{rates['step_time_s']:.2f} s/step"]
            if "mfu" in rates:
                parts.append(f"MFU {rates['mfu']:.1%}")
            parts.append(f"ETA {rates['step_time_s'] * (self.total - step) / 60:.1f} min")
        return " | ".join(parts)


# ----------------------------------------------------------------------------------------------- step outputs
class StepOutputs:
    """The metrics dicts the jitted step returns (device scalars), kept on the device until a sync point: `fetch`
    brings all of them to the host in one transfer. Reading one per step (`float(m["loss"])`) would wait for every
    step to finish before the next batch is loaded."""

    def __init__(self):
        self._pending: list[tuple[int, dict]] = []

    def add(self, step: int, m: dict) -> None:
        self._pending.append((step, m))

    def fetch(self) -> list[tuple[int, dict[str, float]]]:
        """(step, {name: float}) for every step since the last fetch, oldest first (waits for them to finish)."""
        steps = [step for step, _ in self._pending]
        values = jax.device_get([m for _, m in self._pending])
        self._pending = []
        return [(step, {k: float(v) for k, v in m.items()}) for step, m in zip(steps, values)]


class LoopClock:
    """What the loop costs on top of the jitted step: wall seconds per step between log lines against the jitted
    step's own time, both as medians over the run (so the interval that compiles, or one that writes a checkpoint,
    does not count). The same in this process's CPU time (all its threads): the loop's own work as it would cost
    where no core is idle to hide it, which a machine busy with other jobs does not change.

    The jitted step is timed alone on the first step after a log line (the sync there waited for the device, so it
    is idle; the clock waits for that step's outputs before the next batch is loaded), at most once every
    `probe_every` steps: a timed step gives up its overlap with data loading.
    """

    def __init__(self, probe_every: int = 10):
        self.probe_every = probe_every
        self.walls: list[tuple[float, float]] = []  # (wall, CPU) seconds per step of each log interval but the first
        self.alone: list[tuple[float, float]] = []  # (wall, CPU) seconds of each step timed alone
        self._last_probe = None
        self._mark = None  # (wall, CPU, step) at the previous log line
        self._probe_next = False

    @staticmethod
    def _now() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def probe_starts(self, step: int) -> tuple[float, float] | None:
        """Before dispatching step `step` (1-based): the start when this step is to be timed alone, else None."""
        if not self._probe_next or (self._last_probe is not None and step - self._last_probe < self.probe_every):
            return None
        self._probe_next, self._last_probe = False, step
        return self._now()

    def probe_ends(self, started: tuple[float, float] | None, outputs) -> None:
        """After dispatching the step `probe_starts` gave `started` for: wait for its outputs and record its time."""
        if started is not None:
            jax.block_until_ready(outputs)
            self.alone.append(tuple(b - a for a, b in zip(started, self._now())))

    def synced(self, step: int, logged: bool, saved: bool) -> None:
        """After a sync point at `step` (its outputs fetched): a log line closes a wall-time interval; the next step
        is timed alone unless a checkpoint is being written beside it."""
        now = self._now()
        if logged:
            if self._mark is not None and step > self._mark[2]:
                self.walls.append(tuple((b - a) / (step - self._mark[2]) for a, b in zip(self._mark[:2], now)))
            self._mark = (*now, step)
        self._probe_next = not saved

    def summary(self) -> dict[str, float]:
        """step_time_s, jitted_step_s and loop_overhead = (wall - alone) / alone, and the same in CPU seconds
        (step_cpu_s, jitted_step_cpu_s, loop_cpu_overhead); empty until both have been measured."""
        if not self.walls or not self.alone:
            return {}
        out = {}
        for i, (loop, alone, overhead) in enumerate((("step_time_s", "jitted_step_s", "loop_overhead"),
                                                     ("step_cpu_s", "jitted_step_cpu_s", "loop_cpu_overhead"))):
            out[loop] = statistics.median(w[i] for w in self.walls)
            out[alone] = statistics.median(a[i] for a in self.alone)
            out[overhead] = (out[loop] - out[alone]) / out[alone] if out[alone] > 0 else float("nan")
        return out

    @staticmethod
    def line(s: dict[str, float]) -> str:
        return (f"loop: {s['step_time_s']:.3f} s per step between log lines, the jitted step alone "
                f"{s['jitted_step_s']:.3f} s (medians): loop overhead {s['loop_overhead']:+.1%} of the step; in CPU "
                f"time {s['step_cpu_s']:.3f} s against {s['jitted_step_cpu_s']:.3f} s ({s['loop_cpu_overhead']:+.1%})")
