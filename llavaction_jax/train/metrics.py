"""Training metrics: a progress line on stdout, TensorBoard event files, and the FLOPs / MFU estimate.

TensorBoard's event format is written directly (TFRecord framing of `Event` protos with scalar summaries), so
training needs neither TensorFlow nor the tensorboard package; `tensorboard --logdir` reads the files.
"""

from __future__ import annotations

import os
import pathlib
import socket
import struct
import time

import jax
import jax.numpy as jnp
import numpy as np

from llavaction_jax.config import ModelConfig

# ----------------------------------------------------------------------------------------------- event files


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    return _varint((number << 3) | wire_type) + payload


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _field(number, 2, _varint(len(payload)) + payload)


def encode_event(step: int, wall_time: float, scalars: dict[str, float] | None = None,
                 file_version: str | None = None) -> bytes:
    """Event{wall_time=1 (double), step=2 (int64), file_version=3 (string), summary=5 {value=1 {tag=1, simple_value=2}}}."""
    msg = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version is not None:
        msg += _length_delimited(3, file_version.encode())
    if scalars:
        values = b"".join(
            _length_delimited(1, _length_delimited(1, tag.encode()) + _field(2, 5, struct.pack("<f", float(v))))
            for tag, v in scalars.items())
        msg += _length_delimited(5, values)
    return msg


def tfrecord(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked_crc(length)) + data + struct.pack("<I", _masked_crc(data))


class EventWriter:
    """Appends scalar summaries to `events.out.tfevents.<time>.<host>` in `logdir`."""

    def __init__(self, logdir: str | os.PathLike):
        path = pathlib.Path(logdir)
        path.mkdir(parents=True, exist_ok=True)
        self.path = path / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        self._file = open(self.path, "ab")
        self._file.write(tfrecord(encode_event(0, time.time(), file_version="brain.Event:2")))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._file.write(tfrecord(encode_event(step, time.time(), values)))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


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


def train_flops(cfg: ModelConfig, text_tokens: int, frames: int, vision_trained: bool = True) -> float:
    """Model FLOPs of one forward + backward for one sample: 6 x params x tokens for the matmuls, plus attention.

    The LLM sees the spliced sequence; the vision tower sees frames x patches, counted 2x (forward only) when it
    is frozen, since nothing below it needs gradients.
    """
    v, t = cfg.vision, cfg.text
    seq = text_tokens - 1 + cfg.tokens_per_video(frames)
    llm_params = t.num_layers * (t.hidden_size * (t.num_heads + 2 * t.num_kv_heads) * t.head_dim
                                 + t.num_heads * t.head_dim * t.hidden_size + 3 * t.hidden_size * t.intermediate_size)
    llm = 6 * seq * (llm_params + t.hidden_size * t.vocab_size) + 12 * t.num_layers * seq * seq * t.hidden_size / 2
    patches = frames * v.num_patches
    vis_params = v.num_layers * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
    proj_params = v.hidden_size * t.hidden_size + (cfg.projector_depth - 1) * t.hidden_size**2
    vision = (6 if vision_trained else 2) * patches * (vis_params + proj_params) + 12 * v.num_layers * frames * v.num_patches**2 * v.hidden_size
    return float(llm + vision)


class Progress:
    """The stdout progress line: step, loss, aux, grad norm, LR, tokens/s, MFU, ETA."""

    def __init__(self, total_steps: int, flops_per_step: float | None, peak_flops: float | None):
        self.total, self.flops, self.peak = total_steps, flops_per_step, peak_flops
        self.t_last, self.step_last = time.perf_counter(), None

    def line(self, step: int, m: dict) -> str:
        """Throughput is measured between two printed lines, so the first line (after compiling) has none."""
        now = time.perf_counter()
        parts = [f"step {step}/{self.total}", f"loss {m['loss']:.4f}", f"lm {m['lm_loss']:.4f}",
                 f"aux {m['aux_loss']:.4f}", f"gnorm {m['grad_norm']:.3f}", f"lr {m.get('lr_llm', np.nan):.2e}"]
        if self.step_last is not None and step > self.step_last:
            dt = (now - self.t_last) / (step - self.step_last)
            parts += [f"tok/s {m['tokens'] / dt:,.0f}", f"{dt:.2f} s/step"]
            if self.flops and self.peak:
                parts.append(f"MFU {self.flops / dt / self.peak:.1%}")
            parts.append(f"ETA {dt * (self.total - step) / 60:.1f} min")
        self.t_last, self.step_last = now, step
        return " | ".join(parts)
