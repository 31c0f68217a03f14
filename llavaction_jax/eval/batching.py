"""Host side of evaluation: fixed batch shapes, prompt and option tokens, frames from shards, and the move of each
process's rows onto the global mesh and back.

One compiled step serves the whole run because every shape is fixed up front from the *whole* question file (so
all processes agree): the prompt length is the longest prompt rounded up, the option layout is the most options
times the longest option, every clip is padded to the run's frame count (the most frames a clip of the shards
has, or ``--num-frames``) with its own count in ``num_frames``, and a short batch is filled with copies of a real
question whose answers are dropped.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading

import numpy as np
from jax.sharding import Mesh

from llavaction_jax.data import chat
from llavaction_jax.data.option_tokens import option_token_ids, pad_options, round_up
from llavaction_jax.data.frames import FrameShards, decode_frames
from llavaction_jax.data.image import DEFAULT_PREPROCESSING, preprocess_frames
from llavaction_jax.eval.clip_failures import ClipUnreadable, describe
from llavaction_jax.eval.questions import EvalQuestion
from llavaction_jax.sharding import batch_sharding, batch_ways
from llavaction_jax.vision_towers import Preprocessing

# Upper bound for a duration in the videoqa time instruction: Qwen2 tokenizes digits one by one, so a prompt's
# length depends on the number of digits only, and 5 integer digits cover any clip shorter than a day.
_WIDEST_DURATION = 99999.99


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    batch_size: int  # questions per process per step
    prompt_len: int  # text tokens, including the one -200 placeholder
    num_frames: int  # frames per clip in the batch: a clip with fewer is zero-padded (its own count in num_frames)
    image_size: int
    num_options: int
    option_len: int  # tokens of the longest option continuation (with <|im_end|>)
    options_per_pass: int | None = None  # scoring: options sharing one pass over the broadcast cache (None: all)


class PromptBuilder:
    """Token ids of every question's prompt and option continuations."""

    def __init__(self, tokenizer, time_instruction: bool, instruction: str):
        self.tokenizer, self.time_instruction, self.instruction = tokenizer, time_instruction, instruction
        self.im_end_id = tokenizer.convert_tokens_to_ids(chat.IM_END)

    def prompt_ids(self, question: EvalQuestion, duration: float, num_frames: int,
                   frame_times: tuple[float, ...] = ()) -> list[int]:
        user = question.user_message(duration, num_frames, self.time_instruction, self.instruction, frame_times)
        return chat.tokenizer_image_token(chat.build_inference_prompt(user), self.tokenizer)

    def option_ids(self, question: EvalQuestion) -> list[list[int]]:
        return option_token_ids(self.tokenizer, list(question.options), self.im_end_id)

    def layout(self, questions: list[EvalQuestion], batch_size: int, num_frames: int, image_size: int,
               prompt_len: int | None = None, options_per_pass: int | None = None) -> BatchLayout:
        """Shapes for the whole run; the option count is rounded up to a multiple of ``options_per_pass``."""
        widest_times = (_WIDEST_DURATION,) * num_frames
        longest_prompt = max(len(self.prompt_ids(q, _WIDEST_DURATION, num_frames, widest_times)) for q in questions)
        if prompt_len is not None and prompt_len < longest_prompt:
            raise ValueError(f"--prompt-len {prompt_len} is shorter than the longest prompt ({longest_prompt} tokens)")
        longest_option = max(len(ids) for q in questions for ids in self.option_ids(q))
        num_options = max(len(q.options) for q in questions)
        if options_per_pass:
            num_options = round_up(num_options, options_per_pass)
        return BatchLayout(batch_size, prompt_len or round_up(longest_prompt, 32), num_frames, image_size,
                           num_options, round_up(longest_option, 4), options_per_pass)


class ClipLoader:
    """Model-ready frames of a question's clip: read from the shards, subsampled to at most the run's frame count,
    resized and normalised like upstream, and zero-padded to the run's frame count. Thread-safe; decoding (PIL
    releases the GIL) runs in a thread pool."""

    def __init__(self, shards: FrameShards, num_frames: int, image_size: int, threads: int = 4,
                 preprocessing: Preprocessing = DEFAULT_PREPROCESSING):  # the vision tower's (vision_towers.py)
        self.shards, self.num_frames, self.image_size = shards, num_frames, image_size
        self.preprocessing = preprocessing
        self._lock = threading.Lock()
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="frames")

    def clip_uid(self, question: EvalQuestion) -> str:
        for uid in question.clip_uids:
            if uid in self.shards:
                return uid
        raise KeyError(f"question {question.uid!r}: no clip {' / '.join(map(repr, question.clip_uids))} in "
                       f"{self.shards.directory}")

    def load(self, question: EvalQuestion) -> tuple[str, np.ndarray, float, tuple[float, ...]]:
        """(clip uid, float32 (T, 3, S, S), duration in seconds, each frame's time in the clip in seconds).

        T is the run's frame count; the clip's own frames are the first ``len(times)``, the rest zeros."""
        uid = self.clip_uid(question)
        index = self.shards.index_of(uid)
        with self._lock:  # the record reader is opened lazily and shared
            data = self.shards.read_bytes(index)
        record = self.shards.parse(data, index)
        positions = select_positions(record.num_frames, self.num_frames)
        frames = decode_frames(record)[positions]
        start = round(record.start_sec * record.fps)
        times = tuple((record.frame_indices[p] - start) / record.fps for p in positions)
        pixels = preprocess_frames(frames, self.image_size, self.preprocessing)
        padded = np.zeros((self.num_frames, *pixels.shape[1:]), pixels.dtype)
        padded[: len(pixels)] = pixels
        return uid, padded, float(record.duration_sec), times


def select_positions(n: int, num_frames: int) -> np.ndarray:
    """Which of a clip's ``n`` stored frames the model sees: all of them when there are at most ``num_frames``
    (a short video sampled at 1 fps keeps its own count, as in lmms-eval's llava_vid), else ``num_frames`` of
    them: every k-th when the count divides (upstream EK100's ``video_frames[::clip_length // num_frames]``), else
    LLaVA-Video's ``linspace(0, n - 1, num_frames)``."""
    if n <= num_frames:
        return np.arange(n)
    if n % num_frames == 0:
        return np.arange(0, n, n // num_frames)
    return np.linspace(0, n - 1, num_frames, dtype=int)


def build_batch(indices: list[int], questions: list[EvalQuestion], fill_index: int, layout: BatchLayout,
                builder: PromptBuilder, loader: ClipLoader, strict: bool = False) -> tuple[dict, list[dict]]:
    """Host arrays for one step of ``layout.batch_size`` rows and, per real row, what the prediction record needs.

    Rows past ``indices`` repeat question ``fill_index`` (a real question, so the step computes nothing odd). The
    prompt of a clip states its own frame count (lmms-eval's llava_vid: ``len(video)``), ``num_frames`` (B,) holds
    it for the model. A clip that cannot be read gives its row blank frames and its info an ``error``
    (clip_failures.py), or, with ``strict``, raises ClipUnreadable."""
    rows = indices + [fill_index] * (layout.batch_size - len(indices))

    def load(i: int):
        try:
            return loader.load(questions[i]), None
        except Exception as error:  # the decoders and shard readers raise their own types
            if strict:
                raise ClipUnreadable(f"question {questions[i].uid!r}: {describe(error)} (without --strict it is "
                                     "recorded as failed and the run goes on)") from None
            blank = np.zeros((layout.num_frames, 3, layout.image_size, layout.image_size), np.float32)
            return (questions[i].clip_uids[0], blank, 0.0, (0.0,) * layout.num_frames), describe(error)

    outcomes = list(loader.pool.map(load, rows))
    loaded = [clip for clip, _ in outcomes]
    ids = np.zeros((len(rows), layout.prompt_len), np.int32)
    mask = np.zeros(ids.shape, bool)
    counts = np.asarray([len(times) for *_, times in loaded], np.int32)
    option_lists, info = [], []
    for r, (i, (clip_uid, _, duration, times)) in enumerate(zip(rows, loaded)):
        prompt = builder.prompt_ids(questions[i], duration, len(times), times)
        if len(prompt) > layout.prompt_len:
            raise ValueError(f"question {questions[i].uid!r}: prompt of {len(prompt)} tokens is longer than the run's "
                             f"prompt length {layout.prompt_len} (set --prompt-len)")
        ids[r, : len(prompt)], mask[r, : len(prompt)] = prompt, True
        option_lists.append(builder.option_ids(questions[i]))
        if r < len(indices):
            info.append({"index": i, "clip_uid": clip_uid, "num_frames": len(times), "prompt_tokens": len(prompt)})
            if outcomes[r][1] is not None:
                info[-1]["error"] = outcomes[r][1]
    option_ids, option_mask = pad_options(option_lists, layout.num_options, layout.option_len)
    arrays = {"input_ids": ids, "attention_mask": mask, "pixel_values": np.stack([p for _, p, _, _ in loaded]),
              "num_frames": counts, "option_ids": option_ids, "option_mask": option_mask}
    return arrays, info


def check_batch_layout(mesh: Mesh, per_process_batch: int, process_count: int) -> None:
    """Each process must own its own rows of the global batch: the batch axes split it evenly, and no two
    processes hold the same rows (a mesh whose batch is replicated across hosts would need identical inputs)."""
    ways = batch_ways(mesh)
    global_batch = per_process_batch * process_count
    if global_batch % ways:
        raise ValueError(f"the global batch ({per_process_batch} per process x {process_count} processes) does not "
                         f"split over data x fsdp = {ways} mesh rows; choose --batch-size accordingly")
    rows: dict[int, set] = {}
    for device, (rows_slice, *_) in batch_sharding(mesh).devices_indices_map((global_batch,)).items():
        rows.setdefault(device.process_index, set()).update(range(*rows_slice.indices(global_batch)))
    if any(len(r) != per_process_batch for r in rows.values()):
        raise ValueError(f"mesh {dict(mesh.shape)} does not give each of the {process_count} processes its own "
                         "rows of the batch; make data x fsdp a multiple of the process count (model parallelism, "
                         "tensor, within a host)")
