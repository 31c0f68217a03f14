"""The public Python API: `load_pretrained(path)` and a callable `LlavaModel` in upstream's input convention.

    model = llavaction_jax.load_pretrained("ckpt/llavaction-7b")          # or LlavaModel.random(cfg)
    out = model(input_ids, pixel_values, attention_mask=None, labels=None, actions=None)
    out.logits, out.loss
    model.generate([clip.pixels], ["<image>\nWhat am I doing?"])       # -> ["..."]; clip = data.clip.read_clip(...)
    model.score_options([clip.pixels], [prompt], [["A. open door", ...]])  # -> option log-likelihoods

`input_ids` carry one -200 placeholder per video sample (as `tokenizer_image_token` makes them); `pixel_values`
are frames `(T_i, 3, H, W)` per sample: a list (videos of different lengths, a `(3, H, W)` image as a 1-frame video,
None for a text-only sample), or one `(B, T, 3, H, W)` array. A list is padded to its longest video with a
per-sample frame count, and each sample gets the visual tokens of its own frames, as upstream's list of videos.
Inputs are checked on the host first so mistakes fail with a message, not deep inside XLA.

`generate` / `score_options` take user messages (upstream's ``"<image>\n" + question``; ``<image>`` is put in front
when missing), wrap them in upstream's ChatML prompt, tokenize them with the model's own tokenizer (the one in its
directory, else Qwen2's) and run the jitted answer step below (`answer_step`), which `eval` runs too: with
`forward_with_losses` it is a compile boundary over the traced functions of model/.
The model's execution choices (`ExecutionConfig`: attention kernel, compute dtype, ...) are saved with it and
resolved once for the mesh when the model is built (`LlavaModel.resolved`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from llavaction_jax import checkpoint_io, losses, model_files
from llavaction_jax.config import ExecutionConfig, ModelConfig, ResolvedExecution
from llavaction_jax.convert import from_torch
from llavaction_jax.convert.safetensors_io import pickles_not_read
from llavaction_jax.data import chat
from llavaction_jax.data.option_tokens import option_token_ids, pad_options, round_up
from llavaction_jax.data.tokenizer import QWEN2_VOCAB, has_tokenizer, resolve_tokenizer
from llavaction_jax.model import decode, llava
from llavaction_jax.model.params import abstract_params
from llavaction_jax.sharding import (constrain, local_rows, param_shardings, resolve_execution, shard_batch,
                                     use_mesh)

IMAGE_TOKEN_INDEX = llava.IMAGE_TOKEN_INDEX


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Output:
    """What `LlavaModel(...)` returns. Losses are filled when labels are given (aux_loss: also actions)."""

    logits: jax.Array  # (B, S, vocab) fp32; S = L - 1 + visual tokens (or cut at tokenizer_model_max_length)
    labels: jax.Array  # labels of the spliced sequence
    valid: jax.Array  # real-token mask of the spliced sequence
    head_logits: tuple | None = None  # (verb, noun, action) at the last hidden state, for supervised configs
    loss: jax.Array | None = None
    lm_loss: jax.Array | None = None
    aux_loss: jax.Array | None = None  # the vision-supervision loss before its 0.1 weight


class LlavaModel:
    """A config, a params tree (optionally sharded over a mesh) and the jitted forward.

    `cfg` is the model's config and `execution` its execution choices as given (and as saved); `resolved` is
    `execution` resolved for the mesh's devices, which every call uses."""

    def __init__(self, cfg: ModelConfig, params: dict, mesh: Mesh | None = None, path=None,
                 execution: ExecutionConfig | None = None):
        self.cfg, self.mesh, self.path = cfg, mesh, path  # path: the directory it was loaded from, if any
        self.execution = execution or ExecutionConfig()
        self.resolved: ResolvedExecution = resolve_execution(self.execution, mesh)
        self.params = shard_params(params, cfg, mesh) if mesh is not None else params
        self._tokenizer = None

    @property
    def tokenizer(self):
        """The model's own tokenizer (the tokenizer files in its directory), else Qwen2's; loaded on first use."""
        if self._tokenizer is None:
            self._tokenizer, _ = resolve_tokenizer(None, None if self.path is None else str(self.path))
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer) -> None:
        self._tokenizer = tokenizer

    def generate(self, videos, prompts: list[str], *, max_new_tokens: int = 4096, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, prompt_len: int | None = None) -> list[str]:
        """Answer each user message about its video: one batched prefill, then KV-cache decoding (greedy by
        default, as upstream). Returns the decoded answers, special tokens skipped.

        ``videos``: per-sample pixel values as `__call__` takes them (e.g. ``read_clip(...).pixels``);
        ``max_new_tokens`` (upstream: 4096) is capped by the positions the model has left after the prompt, and
        the KV cache holds exactly the prompt plus those tokens. ``prompt_len`` pads prompts to a fixed length
        (default: rounded up to 32), so calls with similar prompts reuse one compiled program."""
        tokenizer = self.tokenizer
        batch = self._prompt_batch(videos, prompts, prompt_len)
        n_vis = self.cfg.tokens_per_video(batch["pixel_values"].shape[1])
        out_len = llava.default_out_len(self.cfg, batch["input_ids"].shape[1], n_vis)
        room = min(self.cfg.text.max_position_embeddings, self.cfg.tokenizer_model_max_length or 1 << 62) - out_len
        if room < 1:
            raise ValueError(f"prompts of {out_len} positions (video included) leave no room to generate in the "
                             f"model's {self.cfg.text.max_position_embeddings} positions")
        gen = generation_config(tokenizer, min(max_new_tokens, room), self.cfg.text.vocab_size,
                                None if self.path is None else str(self.path))
        gen = dataclasses.replace(gen, temperature=temperature, top_p=top_p)
        with use_mesh(self.mesh):
            out = answer_step(self.params, shard_batch(batch, self.mesh), cfg=self.cfg, execution=self.resolved,
                              gen=gen, out_len=out_len, key=jax.random.key(seed))["generate"]
        tokens, num = (np.asarray(x) for x in local_rows((out["tokens"], out["num_tokens"]), self.mesh))
        return [tokenizer.decode(row[:n].tolist(), skip_special_tokens=True) for row, n in zip(tokens, num)]

    def score_options(self, videos, prompts: list[str], options: list[list[str]], *,
                      prompt_len: int | None = None) -> list[dict]:
        """The log-likelihood of each option as the answer to its prompt (model/decode.py), per sample
        ``{"logprob_sum": [...], "logprob_mean": [...], "num_tokens": [...]}`` in option order. Options are scored
        as written (``"A. open door"`` when the prompt lists lettered options, as upstream trains)."""
        tokenizer = self.tokenizer
        if len(options) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(options)} option lists")
        batch = self._prompt_batch(videos, prompts, prompt_len)
        im_end = tokenizer.convert_tokens_to_ids(chat.IM_END)
        per_sample = [option_token_ids(tokenizer, list(o), im_end) if len(o) else [] for o in options]
        longest = max((len(ids) for sample in per_sample for ids in sample), default=1)
        batch["option_ids"], batch["option_mask"] = pad_options(per_sample, max(map(len, options)),
                                                                round_up(longest, 4))
        n_vis = self.cfg.tokens_per_video(batch["pixel_values"].shape[1])
        out_len = llava.default_out_len(self.cfg, batch["input_ids"].shape[1], n_vis)
        limit = generation_config(tokenizer, 1, self.cfg.text.vocab_size, None).vocab_limit  # eval's rule
        with use_mesh(self.mesh):
            out = answer_step(self.params, shard_batch(batch, self.mesh), cfg=self.cfg, execution=self.resolved,
                              out_len=out_len, vocab_limit=limit)["score"]
        out = local_rows(out, self.mesh)
        return [{k: [float(x) for x in out[k][b, : len(o)]] for k in ("logprob_sum", "logprob_mean", "num_tokens")}
                for b, o in enumerate(options)]

    def prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of upstream's ChatML prompt around each user message, -200 where the video goes."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, one per video")
        return [chat.tokenizer_image_token(chat.build_inference_prompt(with_placeholder(p)), self.tokenizer)
                for p in prompts]

    def _prompt_batch(self, videos, prompts: list[str], prompt_len: int | None) -> dict:
        """Host arrays of `eval`'s batch layout: right-padded prompt ids, their mask, stacked frames."""
        ids = self.prompt_ids(prompts)
        width = prompt_len or round_up(max(map(len, ids)), 32)
        if width < max(map(len, ids)):
            raise ValueError(f"prompt_len={width} is shorter than the longest prompt ({max(map(len, ids))} tokens)")
        input_ids, mask = np.zeros((len(ids), width), np.int32), np.zeros((len(ids), width), bool)
        for row, tokens in enumerate(ids):
            input_ids[row, : len(tokens)], mask[row, : len(tokens)] = tokens, True
        video = pack_frames(videos, len(ids))  # videos of different lengths: padded, each keeps its own count
        check_placeholders(input_ids, mask, has_video=video.has_video)
        check_token_ids(input_ids, self.cfg.text.vocab_size, "the tokenizer's prompt ids")
        return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": video.pixels,
                "num_frames": video.num_frames}

    @classmethod
    def random(cls, cfg: ModelConfig, seed: int = 0, mesh: Mesh | None = None,
               execution: ExecutionConfig | None = None) -> "LlavaModel":
        return cls(cfg, llava.init(cfg, jax.random.key(seed)), mesh, execution=execution)

    def save_pretrained(self, path, tokenizer_dir=None) -> None:
        """Write a model directory, with its tokenizer, generation_config.json and config.json (model_files.py):
        the tokenizer of ``tokenizer_dir``, else the one of the directory this model was loaded from, else Qwen2's
        when the vocabulary holds it (a tiny random model gets no tokenizer files)."""
        own = self.path if has_tokenizer(self.path) else None
        tokenizer_dir = tokenizer_dir or own
        files = None
        if tokenizer_dir is not None or self.cfg.text.vocab_size >= QWEN2_VOCAB:
            files = model_files.companion_files(self.cfg, tokenizer_dir, self.path)
        checkpoint_io.save_model(path, self.cfg, self.params, extra_files=files, execution=self.execution)

    def __call__(self, input_ids, pixel_values=None, attention_mask=None, labels=None, actions=None, *,
                 truncate: bool = True, vocab_limit: int | None = None) -> Output:
        ids = _to_numpy(input_ids)
        ids = ids[None] if ids.ndim == 1 else ids
        mask = np.ones(ids.shape, bool) if attention_mask is None else _to_numpy(attention_mask).astype(bool).reshape(ids.shape)
        video = None if pixel_values is None else pack_frames(pixel_values, len(ids))
        check_placeholders(ids, mask, has_video=np.zeros(len(ids), bool) if video is None else video.has_video)
        check_token_ids(ids, self.cfg.text.vocab_size)
        out_len = self._out_len(ids, mask, video, truncate)
        batch = dict(input_ids=ids, pixel_values=None if video is None else video.pixels, attention_mask=mask,
                     labels=None if labels is None else _to_numpy(labels).reshape(ids.shape),
                     actions=None if actions is None else _to_numpy(actions).reshape(len(ids), 3),
                     has_video=None if video is None else video.has_video,
                     num_frames=None if video is None else video.num_frames)
        with use_mesh(self.mesh):
            return forward_with_losses(self.params, **shard_batch(batch, self.mesh), cfg=self.cfg,
                                       execution=self.resolved, out_len=out_len, vocab_limit=vocab_limit)

    def _out_len(self, ids, mask, video: "Frames | None", truncate: bool) -> int:
        if video is None:
            n_vis, lengths = 0, mask.sum(1)
        else:
            n_vis = self.cfg.tokens_per_video(video.pixels.shape[1])
            per_row = np.asarray([self.cfg.tokens_per_video(int(t)) for t in video.num_frames])
            lengths = mask.sum(1) + np.where(video.has_video, per_row - 1, 0)
        longest = int(lengths.max())
        limit = self.cfg.tokenizer_model_max_length
        if limit is not None and longest > limit and not truncate:
            raise ValueError(f"a sample has {longest} tokens after splicing the video, more than "
                             f"tokenizer_model_max_length={limit}; pass truncate=True to cut it as upstream does")
        return llava.default_out_len(self.cfg, ids.shape[1], n_vis)


@functools.partial(jax.jit, static_argnames=("cfg", "execution", "out_len", "vocab_limit"))
def forward_with_losses(params: dict, input_ids, pixel_values, attention_mask, labels, actions, has_video=None,
                        num_frames=None, *, cfg: ModelConfig, execution: ResolvedExecution, out_len: int | None = None,
                        vocab_limit: int | None = None) -> Output:
    """The model's logits (and head logits) and, with labels, the losses of `llavaction_jax.losses`."""
    out = llava.forward(params, cfg, execution, input_ids, pixel_values, attention_mask, labels, has_video,
                        out_len=out_len, num_frames=num_frames)
    logits = llava.lm_logits(params, out.hidden, vocab_limit)
    heads = None
    if out.action_states is not None:
        heads = llava.head_logits(params["heads"], out.action_states[-1], cfg.vision_supervision == "three_tokens")
    result = Output(logits=logits, labels=out.labels, valid=out.valid, head_logits=heads)
    if labels is not None:
        computed = losses.compute_losses(params, cfg, execution, out, actions, logits=logits)
        has_aux = out.action_states is not None and actions is not None
        result.loss, result.lm_loss = computed.loss, computed.lm_loss
        result.aux_loss = computed.aux_loss if has_aux else None
    return result


@functools.partial(jax.jit, static_argnames=("cfg", "execution", "gen", "out_len", "vocab_limit", "options_per_pass"))
def answer_step(params, batch, *, cfg: ModelConfig, execution: ResolvedExecution, out_len: int,
                gen: decode.GenerationConfig | None = None, vocab_limit: int | None = None,
                options_per_pass: int | None = None, key=None) -> dict:
    """Answers of a batch in `eval`'s layout (input_ids, pixel_values, attention_mask, num_frames; option_ids and
    option_mask to score): one prefill, then {"generate": {"tokens" (B, max_new_tokens), "num_tokens" (B,)}} with
    `gen` and {"score": {"logprob_sum", ...}} with options, both from its cache (model/decode.answer)."""
    out = decode.answer(params, cfg, execution, batch["input_ids"], batch["pixel_values"], batch["attention_mask"],
                        gen=gen, option_ids=batch.get("option_ids"), option_mask=batch.get("option_mask"),
                        vocab_limit=vocab_limit, options_per_pass=options_per_pass, out_len=out_len,
                        num_frames=batch["num_frames"], key=key)
    return {mode: constrain_batch(outputs) for mode, outputs in out.items()}


def constrain_batch(outputs: dict) -> dict:
    """Outputs split over the batch axes like the inputs, so each process reads back its own rows."""
    return {k: constrain(v, ("batch",) + (None,) * (v.ndim - 1)) for k, v in outputs.items()}


def generation_config(tokenizer, max_new_tokens: int, vocab_size: int, model_dir: str | None):
    """Greedy, EOS = <|im_end|> and <|endoftext|> (+ the checkpoint's generation_config.json eos ids), logits cut to
    len(tokenizer) as upstream's resize at load does (llavaction/model/builder.py:
    load_pretrained_model)."""
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    eos = [im_end, endoftext]
    gen_file = pathlib.Path(model_dir) / model_files.GENERATION_CONFIG if model_dir else None
    if gen_file is not None and gen_file.is_file():
        extra = json.loads(gen_file.read_text()).get("eos_token_id")
        eos += [extra] if isinstance(extra, int) else list(extra or [])
    limit = len(tokenizer) if len(tokenizer) < vocab_size else None
    return decode.GenerationConfig(max_new_tokens=max_new_tokens, eos_ids=tuple(dict.fromkeys(eos)),
                                   pad_id=endoftext, vocab_limit=limit)


def shard_params(params: dict, cfg: ModelConfig, mesh: Mesh) -> dict:
    return jax.tree.map(jax.device_put, params, param_shardings(llava.param_specs(cfg), mesh))


def load_pretrained(path, mesh: Mesh | None = None, dtype: str | None = None) -> LlavaModel:
    """Load a model saved by `save_pretrained` / the converter. With a mesh, params are restored sharded.

    A PyTorch checkpoint directory (config.json + safetensors, upstream or HF llava-onevision layout) is
    converted in memory instead (`convert from-torch` does the same once, to disk); dtype=None keeps its dtypes.
    Pickled PyTorch weights (pytorch_model.bin, *.pt) are refused: unpickling can run arbitrary code.
    """
    if not checkpoint_io.is_model_dir(path) and from_torch.is_torch_dir(path):
        cfg, params = from_torch.load_torch(path, mesh=mesh, dtype=dtype)
        return LlavaModel(cfg, params, mesh, path)  # already placed on the mesh: device_put is a no-op
    if not checkpoint_io.is_model_dir(path) and pickles_not_read(pathlib.Path(path)):
        raise ValueError(pickles_not_read(pathlib.Path(path)))
    cfg, execution = checkpoint_io.load_config(path), checkpoint_io.load_execution(path)
    if dtype is not None:
        cfg = cfg.replace(param_dtype=dtype)
    specs = llava.param_specs(cfg)
    abstract = abstract_params(specs, jnp.dtype(cfg.param_dtype))
    if mesh is not None:
        shardings = param_shardings(specs, mesh)
    else:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    params = checkpoint_io.restore_params(path, abstract)
    return LlavaModel(cfg, params, mesh, path, execution)  # placed: device_put is a no-op


@dataclasses.dataclass
class Frames:
    """A batch's frames on the host: pixels (B, T, C, H, W) float32 padded with zeros after each sample's frames,
    num_frames (B,) int32 (a sample's own count; 0 for a text-only sample) and has_video (B,) bool."""

    pixels: np.ndarray
    num_frames: np.ndarray
    has_video: np.ndarray


def pack_frames(pixel_values, batch: int) -> Frames:
    """Per-sample frames -> one padded `Frames` batch.

    A list holds a (T_i, C, H, W) video, a (C, H, W) image (a 1-frame video: upstream unsqueezes it) or None (a
    text-only sample) per sample; an array is (B, T, C, H, W), or (B, C, H, W) images, or the (T, C, H, W) frames of
    a single sample."""
    if isinstance(pixel_values, (list, tuple)):
        if len(pixel_values) != batch:
            raise ValueError(f"pixel_values has {len(pixel_values)} entries for a batch of {batch} samples")
        items = [None if p is None else _to_numpy(p) for p in pixel_values]
        items = [p[None] if p is not None and p.ndim == 3 else p for p in items]
        for i, p in enumerate(items):
            if p is not None and (p.ndim != 4 or len(p) == 0):
                raise ValueError(f"pixel_values[{i}] should be (T, C, H, W) or (C, H, W), got {p.shape}")
        sizes = {p.shape[1:] for p in items if p is not None}
        if len(sizes) > 1:
            raise ValueError(f"all frames of a batch need the same (C, H, W) size, got {sorted(sizes)}")
        if not sizes:
            raise ValueError("pixel_values holds no frames (every entry is None): pass pixel_values=None")
        (size,) = sizes
        counts = np.asarray([0 if p is None else len(p) for p in items], np.int32)
        pixels = np.zeros((batch, int(counts.max()), *size), np.float32)
        for i, p in enumerate(items):
            if p is not None:
                pixels[i, :len(p)] = p
        return Frames(pixels, counts, counts > 0)
    pixels = _to_numpy(pixel_values)
    if pixels.ndim == 4:  # (B, C, H, W) images, or (T, C, H, W) frames of a single sample
        pixels = pixels[:, None] if batch == len(pixels) and batch > 1 else pixels[None]
    if pixels.ndim != 5 or len(pixels) != batch:
        raise ValueError(f"pixel_values should be (B={batch}, T, C, H, W) or a list of (T, C, H, W); got {pixels.shape}")
    return Frames(pixels.astype(np.float32), np.full(batch, pixels.shape[1], np.int32), np.ones(batch, bool))


def with_placeholder(message: str) -> str:
    """A user message with the video placeholder: as given when it has one, else ``"<image>\n"`` in front
    (upstream's format_llava_prompt puts the video first)."""
    return message if chat.IMAGE_PLACEHOLDER in message else f"{chat.IMAGE_PLACEHOLDER}\n{message}"


def check_placeholders(ids: np.ndarray, mask: np.ndarray, has_video: np.ndarray) -> None:
    """Each sample with frames has exactly one -200 placeholder; a sample without frames has none."""
    counts = ((ids == IMAGE_TOKEN_INDEX) & mask).sum(axis=1)
    for i, (c, video) in enumerate(zip(counts, has_video)):
        if video and c != 1:
            raise ValueError(f"sample {i} has {c} video placeholders ({IMAGE_TOKEN_INDEX}); each video sample needs exactly one")
        if not video and c:
            raise ValueError(f"sample {i} has a video placeholder ({IMAGE_TOKEN_INDEX}) but no frames were given")


def check_token_ids(ids: np.ndarray, vocab_size: int, what: str = "input_ids") -> None:
    """Every id in [0, vocab_size) but the -200 video placeholder, padding included (an id outside the embedding
    table gives NaN embeddings, and through attention NaN logits everywhere)."""
    bad = (ids != IMAGE_TOKEN_INDEX) & ((ids < 0) | (ids >= vocab_size))
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{what}[{row}, {col}] = {int(ids[row, col])} is outside the model's vocabulary [0, "
                         f"{vocab_size}) ({int(bad.sum())} such ids; {IMAGE_TOKEN_INDEX} marks the video): use the "
                         "model's own tokenizer, or a model whose text.vocab_size covers it")


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu()
        return x.float().numpy() if x.is_floating_point() else x.numpy()
    return np.asarray(x)

