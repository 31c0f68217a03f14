"""The public Python API: `load_pretrained(path)` and a callable `LlavaModel` in upstream's input convention.

    model = llavaction_jax.load_pretrained("ckpt/llavaction-7b")          # or LlavaModel.random(cfg)
    out = model(input_ids, pixel_values, attention_mask=None, labels=None, actions=None)
    out.logits, out.loss

`input_ids` carry one -200 placeholder per video sample (as `tokenizer_image_token` makes them); `pixel_values`
are frames `(T_i, 3, H, W)` per sample: a list (videos of different lengths, a `(3, H, W)` image as a 1-frame video,
None for a text-only sample), or one `(B, T, 3, H, W)` array. A list is padded to its longest video with a
per-sample frame count, and each sample gets the visual tokens of its own frames, as upstream's list of videos.
Inputs are checked on the host first so mistakes fail with a message, not deep inside XLA.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from llavaction_jax import checkpoint_io, losses
from llavaction_jax.config import ModelConfig
from llavaction_jax.convert import from_torch
from llavaction_jax.model import llava
from llavaction_jax.model.params import abstract_params
from llavaction_jax.sharding import param_shardings, resolve_config, shard_batch, use_mesh

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

    `cfg` is the model's config as given (and as saved); `run_cfg` is the same config with its execution fields
    resolved for the mesh's devices, which every call uses."""

    def __init__(self, cfg: ModelConfig, params: dict, mesh: Mesh | None = None):
        self.cfg, self.mesh = cfg, mesh
        self.run_cfg = resolve_config(cfg, mesh)
        self.params = shard_params(params, cfg, mesh) if mesh is not None else params

    @classmethod
    def random(cls, cfg: ModelConfig, seed: int = 0, mesh: Mesh | None = None) -> "LlavaModel":
        return cls(cfg, llava.init(cfg, jax.random.key(seed)), mesh)

    def save_pretrained(self, path) -> None:
        checkpoint_io.save_model(path, self.cfg, self.params)

    def __call__(self, input_ids, pixel_values=None, attention_mask=None, labels=None, actions=None, *,
                 truncate: bool = True, vocab_limit: int | None = None) -> Output:
        ids = _to_numpy(input_ids)
        ids = ids[None] if ids.ndim == 1 else ids
        mask = np.ones(ids.shape, bool) if attention_mask is None else _to_numpy(attention_mask).astype(bool).reshape(ids.shape)
        video = None if pixel_values is None else pack_frames(pixel_values, len(ids))
        check_placeholders(ids, mask, has_video=np.zeros(len(ids), bool) if video is None else video.has_video)
        out_len = self._out_len(ids, mask, video, truncate)
        batch = dict(input_ids=ids, pixel_values=None if video is None else video.pixels, attention_mask=mask,
                     labels=None if labels is None else _to_numpy(labels).reshape(ids.shape),
                     actions=None if actions is None else _to_numpy(actions).reshape(len(ids), 3),
                     has_video=None if video is None else video.has_video,
                     num_frames=None if video is None else video.num_frames)
        with use_mesh(self.mesh):
            return forward_with_losses(self.params, **shard_batch(batch, self.mesh), cfg=self.run_cfg,
                                       out_len=out_len, vocab_limit=vocab_limit)

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


@functools.partial(jax.jit, static_argnames=("cfg", "out_len", "vocab_limit"))
def forward_with_losses(params: dict, input_ids, pixel_values, attention_mask, labels, actions, has_video=None,
                        num_frames=None, *, cfg: ModelConfig, out_len: int | None = None,
                        vocab_limit: int | None = None) -> Output:
    """The model's logits (and head logits) and, with labels, the losses of `llavaction_jax.losses`."""
    out = llava.forward(params, cfg, input_ids, pixel_values, attention_mask, labels, has_video, out_len=out_len,
                        num_frames=num_frames)
    logits = llava.lm_logits(params, out.hidden, vocab_limit)
    heads = None
    if out.action_states is not None:
        heads = llava.head_logits(params["heads"], out.action_states[-1], cfg.vision_supervision == "three_tokens")
    result = Output(logits=logits, labels=out.labels, valid=out.valid, head_logits=heads)
    if labels is not None:
        computed = losses.compute_losses(params, cfg, out, actions, logits=logits)
        has_aux = out.action_states is not None and actions is not None
        result.loss, result.lm_loss = computed.loss, computed.lm_loss
        result.aux_loss = computed.aux_loss if has_aux else None
    return result


def shard_params(params: dict, cfg: ModelConfig, mesh: Mesh) -> dict:
    return jax.tree.map(jax.device_put, params, param_shardings(llava.param_specs(cfg), mesh))


def load_pretrained(path, mesh: Mesh | None = None, dtype: str | None = None) -> LlavaModel:
    """Load a model saved by `save_pretrained` / the converter. With a mesh, params are restored sharded.

    A PyTorch checkpoint directory (config.json + safetensors, upstream or HF llava-onevision layout) is
    converted in memory instead (`convert from-torch` does the same once, to disk); dtype=None keeps its dtypes.
    """
    if not checkpoint_io.is_model_dir(path) and from_torch.is_torch_dir(path):
        cfg, params = from_torch.load_torch(path, mesh=mesh, dtype=dtype)
        return LlavaModel(cfg, params, mesh)  # already placed on the mesh: device_put is a no-op
    cfg = checkpoint_io.load_config(path)
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
    return LlavaModel(cfg, checkpoint_io.restore_params(path, abstract), mesh)  # already placed: device_put is a no-op


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


def check_placeholders(ids: np.ndarray, mask: np.ndarray, has_video: np.ndarray) -> None:
    """Each sample with frames has exactly one -200 placeholder; a sample without frames has none."""
    counts = ((ids == IMAGE_TOKEN_INDEX) & mask).sum(axis=1)
    for i, (c, video) in enumerate(zip(counts, has_video)):
        if video and c != 1:
            raise ValueError(f"sample {i} has {c} video placeholders ({IMAGE_TOKEN_INDEX}); each video sample needs exactly one")
        if not video and c:
            raise ValueError(f"sample {i} has a video placeholder ({IMAGE_TOKEN_INDEX}) but no frames were given")


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu()
        return x.float().numpy() if x.is_floating_point() else x.numpy()
    return np.asarray(x)

