"""Key tables between PyTorch state dicts and our params tree, in both directions from one rule table.

Every source layout is first normalised to the upstream LLaVA-NeXT / LLaVAction key names (the state dict of
upstream `llavaction/model/language_model/llava_qwen.py: LlavaQwenForCausalLM`); one table of templates then maps
those onto our parameter paths. Each rule is written once, as an (upstream key template, our path template,
transform) triple, and read both ways: `map_key` matches a key and fills in our path; `expected_keys` starts
from our parameter specs (`llava.param_specs(cfg)`) and fills in the upstream keys, so the list of keys a
checkpoint must hold is derived, never written by hand. Per-layer tensors land in stacked arrays (leading
"layers" axis). Linear weights are [out, in] in torch and [in, out] here; the patch conv is [out, in, kh, kw]
in torch and [kh, kw, in, out] here.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Mapping

import numpy as np

from llavaction_jax.config import ModelConfig
from llavaction_jax.model import llava
from llavaction_jax.tree import flatten_paths

VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."

# Source-layout prefixes -> upstream prefixes (first match wins). Covers the HF llava-onevision checkpoint
# (`vision_tower.vision_model.*`, `language_model.model.*`, `multi_modal_projector.linear_{1,2}`), the
# transformers v5 in-memory / saved names (`model.language_model.*`, `model.vision_tower.*`), and the
# upstream layout itself.
_NORMALISE: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^model\.vision_tower\.vision_tower\.vision_model\."), VISION_PREFIX),
    (re.compile(r"^(?:model\.)?vision_tower\.vision_model\."), VISION_PREFIX),
    (re.compile(r"^(?:model\.)?vision_tower\."), VISION_PREFIX),
    (re.compile(r"^(?:model\.)?multi_modal_projector\.linear_(\d+)\."), "model.mm_projector.{proj}."),
    (re.compile(r"^(?:model\.)?image_newline$"), "model.image_newline"),
    (re.compile(r"^language_model\.model\."), "model."),
    (re.compile(r"^model\.language_model\."), "model."),
    (re.compile(r"^(?:language_model\.)?lm_head\."), "lm_head."),
]


def normalise_key(key: str) -> str:
    """Any supported source key -> the upstream LLaVA-NeXT key."""
    for pattern, repl in _NORMALISE:
        m = pattern.match(key)
        if m:
            if "{proj}" in repl:  # HF linear_k is Sequential index 2 * (k - 1)
                repl = repl.format(proj=2 * (int(m.group(1)) - 1))
            return repl + key[m.end():]
    return key


T = "transpose"  # Linear [out, in] -> kernel [in, out]
CONV = "conv"  # Conv2d [out, in, kh, kw] -> [kh, kw, in, out]
SAME = "same"
PERMS = {T: (1, 0), CONV: (2, 3, 1, 0)}  # ours = torch.transpose(PERM); a SAME tensor has no permutation

# (upstream key template, our path template, transform), in upstream state-dict order (which is the order the
# export writes). In templates, "V:" is VISION_PREFIX; {i} is the layer index (our stacked axis); {a|b|c} is a
# choice made the same way in the key and the path; {p} is the projector's torch Sequential index 0, 2, 4, ...
# in the key and Linear number 1, 2, 3, ... in the path (upstream `llavaction/model/multimodal_projector/builder.py:
# build_vision_projector` interleaves GELUs between the Linears).
RULES: list[tuple[str, str, str]] = [
    ("model.embed_tokens.weight", "text/embed", SAME),
    ("model.layers.{i}.self_attn.{q|k|v}_proj.weight", "text/layers/attn/{q|k|v}/kernel", T),
    ("model.layers.{i}.self_attn.{q|k|v}_proj.bias", "text/layers/attn/{q|k|v}/bias", SAME),
    ("model.layers.{i}.self_attn.o_proj.weight", "text/layers/attn/o/kernel", T),
    ("model.layers.{i}.mlp.{gate|up|down}_proj.weight", "text/layers/mlp/{gate|up|down}/kernel", T),
    ("model.layers.{i}.input_layernorm.weight", "text/layers/input_norm/scale", SAME),
    ("model.layers.{i}.post_attention_layernorm.weight", "text/layers/post_norm/scale", SAME),
    ("model.norm.weight", "text/final_norm/scale", SAME),
    ("V:embeddings.patch_embedding.weight", "vision/patch_embed/kernel", CONV),
    ("V:embeddings.patch_embedding.bias", "vision/patch_embed/bias", SAME),
    ("V:embeddings.position_embedding.weight", "vision/pos_embed", SAME),
    ("V:encoder.layers.{i}.self_attn.{q|k|v}_proj.weight", "vision/layers/attn/{q|k|v}/kernel", T),
    ("V:encoder.layers.{i}.self_attn.{q|k|v}_proj.bias", "vision/layers/attn/{q|k|v}/bias", SAME),
    ("V:encoder.layers.{i}.self_attn.out_proj.weight", "vision/layers/attn/o/kernel", T),
    ("V:encoder.layers.{i}.self_attn.out_proj.bias", "vision/layers/attn/o/bias", SAME),
    ("V:encoder.layers.{i}.layer_norm{1|2}.weight", "vision/layers/ln{1|2}/scale", SAME),
    ("V:encoder.layers.{i}.layer_norm{1|2}.bias", "vision/layers/ln{1|2}/bias", SAME),
    ("V:encoder.layers.{i}.mlp.{fc1|fc2}.weight", "vision/layers/mlp/{fc1|fc2}/kernel", T),
    ("V:encoder.layers.{i}.mlp.{fc1|fc2}.bias", "vision/layers/mlp/{fc1|fc2}/bias", SAME),
    ("model.mm_projector.{p}.weight", "projector/fc{p}/kernel", T),
    ("model.mm_projector.{p}.bias", "projector/fc{p}/bias", SAME),
    ("model.image_newline", "image_newline", SAME),
    ("model.action_supervision", "action_tokens", SAME),
    ("lm_head.weight", "text/lm_head", T),
    ("{verb|noun|action}_head.weight", "heads/{verb|noun|action}/kernel", T),
]

_FIELD = re.compile(r"\{([^{}]*)\}")


@dataclasses.dataclass(frozen=True)
class _Rule:
    index: int
    key: str  # template, "V:" expanded
    path: str
    transform: str
    key_rx: re.Pattern
    path_rx: re.Pattern

    @property
    def stacked(self) -> bool:
        return "{i}" in self.key

    def fill_key(self, choices: list[str], layer: int | None) -> str:
        """The upstream key for our path's `choices` (as matched by path_rx) and layer."""
        it = iter(choices)

        def sub(m):
            field = m.group(1)
            if field == "i":
                return str(layer)
            if field == "p":  # Linear k <- Sequential index 2 (k - 1)
                return str(2 * (int(next(it)) - 1))
            return next(it)

        return _FIELD.sub(sub, self.key)

    def fill_path(self, choices: list[str]) -> str:
        it = iter(choices)
        return _FIELD.sub(lambda m: str(int(next(it)) // 2 + 1) if m.group(1) == "p" else next(it), self.path)


def _regex(template: str, layer_group: bool) -> re.Pattern:
    out, pos = [], 0
    for m in _FIELD.finditer(template):
        out.append(re.escape(template[pos:m.start()]))
        field = m.group(1)
        out.append(r"(?P<i>\d+)" if field == "i" and layer_group else r"(\d+)" if field == "p" else f"({field})")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("^" + "".join(out) + "$")


_RULES = [_Rule(n, key.replace("V:", VISION_PREFIX), path, tf, _regex(key.replace("V:", VISION_PREFIX), True),
                _regex(path, False)) for n, (key, path, tf) in enumerate(RULES)]

# Keys that exist in some checkpoints but that upstream never reads (upstream `llavaction/model/multimodal_encoder/
# siglip_encoder.py: SigLipVisionTower` deletes the last encoder layer and the pooling head and never applies
# post_layernorm; rotary_emb.inv_freq and position_ids are buffers).
UNUSED = [
    re.compile(re.escape(VISION_PREFIX) + r"post_layernorm\."),
    re.compile(re.escape(VISION_PREFIX) + r"head\."),
    re.compile(r".*\.rotary_emb\.inv_freq$"),
    re.compile(re.escape(VISION_PREFIX) + r"embeddings\.position_ids$"),
]


class ConversionError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; print it plainly
        return str(self.args[0])


def map_key(key: str) -> tuple[str, int | None, str] | None:
    """Upstream key -> (our path, layer index or None, transform), or None if no rule matches."""
    for rule in _RULES:
        m = rule.key_rx.match(key)
        if m:
            choices = [g for name, g in zip(_group_names(rule.key_rx), m.groups()) if name != "i"]
            layer = int(m.group("i")) if rule.stacked else None
            return rule.fill_path(choices), layer, rule.transform
    return None


def _group_names(rx: re.Pattern) -> list[str | None]:
    names = {v: k for k, v in rx.groupindex.items()}
    return [names.get(n) for n in range(1, rx.groups + 1)]


@dataclasses.dataclass(frozen=True)
class Target:
    """Where one of our parameters comes from: its transform and its upstream key for each layer."""
    path: str
    transform: str
    stacked: bool
    names: tuple[str, ...]  # upstream keys, one per layer when stacked
    rank: tuple[int, ...]  # (index in RULES, index of each choice in its {a|b}): orders the keys


def targets(specs: Mapping) -> dict[str, Target]:
    """{our path: Target} for a flat spec dict ({path: ParamSpec}); a path no rule produces is a bug here."""
    out = {}
    for path, spec in specs.items():
        for rule in _RULES:
            m = rule.path_rx.match(path)
            if m:
                stacked = rule.stacked
                layers = range(spec.shape[0]) if stacked else [None]
                names = tuple(rule.fill_key(list(m.groups()), i) for i in layers)
                fields = [f for f in _FIELD.findall(rule.path)]
                rank = tuple(int(c) if f == "p" else f.split("|").index(c) for f, c in zip(fields, m.groups()))
                out[path] = Target(path, rule.transform, stacked, names, (rule.index, *rank))
                break
        else:
            raise ConversionError(f"no key rule produces our parameter {path} (convert/keys.py RULES)")
    return out


def expected_keys(specs: Mapping) -> list[tuple[str, str, int | None, str]]:
    """(upstream key, our path, layer, transform) of every tensor a checkpoint for `specs` holds, in upstream
    state-dict order: module by module as RULES lists them, layer-major inside the decoder stacks, weight before
    bias (what `torch.nn.Module.state_dict` yields)."""
    entries = [(name, t.path, i if t.stacked else None, t.transform, t.rank)
               for t in targets(specs).values() for i, name in enumerate(t.names)]
    first: dict[str, int] = {}  # module -> rank of its first appearance in RULES
    for name, _, layer, _, rank in sorted(entries, key=lambda e: (e[4], e[2] or 0)):
        first.setdefault(_module(name), len(first))
    block: dict[str, int] = {}  # a decoder stack (key text before the layer index) -> rank of its first module
    for name, _, layer, _, _ in entries:
        if layer is not None:
            prefix = _stack_prefix(name)
            block[prefix] = min(block.get(prefix, 1 << 30), first[_module(name)])

    def order(e):
        name, _, layer, _, rank = e
        module = first[_module(name)]
        return (module if layer is None else block[_stack_prefix(name)], layer or 0, module, rank)

    return [e[:4] for e in sorted(entries, key=order)]


def _module(key: str) -> str:
    return re.sub(r"\.layers\.\d+\.", ".layers.*.", key.rsplit(".", 1)[0] if key.endswith((".weight", ".bias")) else key)


def _stack_prefix(key: str) -> str:
    return key[:re.search(r"\.layers\.\d+\.", key).start()]


def upstream_keys(cfg: ModelConfig) -> Iterable[str]:
    """The upstream state-dict keys of a model with this config, derived from its parameter specs."""
    return [key for key, *_ in expected_keys(flatten_paths(llava.param_specs(cfg)))]


def to_ours(tensor: np.ndarray, transform: str) -> np.ndarray:
    perm = PERMS.get(transform)
    return tensor if perm is None else tensor.transpose(perm)


def to_torch(array: np.ndarray, transform: str) -> np.ndarray:
    perm = PERMS.get(transform)
    return array if perm is None else array.transpose(np.argsort(perm))


def torch_shape(ours: tuple[int, ...], transform: str) -> tuple[int, ...]:
    """Shape of the torch tensor whose `to_ours` has shape `ours`."""
    perm = PERMS.get(transform)
    if perm is None:
        return tuple(ours)
    out = [0] * len(ours)
    for k, p in enumerate(perm):
        out[p] = ours[k]
    return tuple(out)


def torch_row_axis(ndim: int, transform: str) -> int:
    """Our axis that is the torch tensor's first axis: slicing it selects contiguous torch bytes."""
    perm = PERMS.get(transform)
    return 0 if perm is None else list(perm).index(0)


def is_unused(key: str, cfg: ModelConfig) -> bool:
    """Present-but-unused keys: post_layernorm / head, buffers, and SigLIP layers past the selected one."""
    if any(p.match(key) for p in UNUSED):
        return True
    m = re.match(re.escape(VISION_PREFIX) + r"encoder\.layers\.(\d+)\.", key)
    return bool(m) and int(m.group(1)) >= cfg.vision.num_layers
