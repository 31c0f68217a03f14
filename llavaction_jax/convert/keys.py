"""Key tables between PyTorch state dicts and our params tree, in both directions from one rule table.

Every source layout is first normalised to the upstream LLaVA-NeXT / LLaVAction key names (the state dict of
upstream `llavaction/model/language_model/llava_qwen.py: LlavaQwenForCausalLM`); one table of templates then maps
those onto our parameter paths: the language model's and LLaVA's rules here, the vision tower's from its registry
entry (vision_towers.py: `VisionTower.key_rules`, under its `upstream_prefix`), so the table is the tower's
(`rules(tower)`; the functions take the tower, SigLIP when none is given, or a model config). Each rule is written
once, as an (upstream key template, our path template, transform) triple, and read both ways: `map_key` matches a
key and fills in our path; `expected_keys` starts from our parameter specs (`llava.param_specs(cfg)`) and fills in
the upstream keys, so the list of keys a checkpoint must hold is derived, never written by hand. Per-layer tensors
land in stacked arrays (leading "layers" axis). Linear weights are [out, in] in torch and [in, out] here; the patch
conv is [out, in, kh, kw] in torch and [kh, kw, in, out] here.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Iterable, Mapping

import numpy as np

from llavaction_jax import vision_towers
from llavaction_jax.config import ModelConfig
from llavaction_jax.model import llava
from llavaction_jax.tree import flatten_paths
from llavaction_jax.vision_towers import VisionTower

# Source-layout prefixes -> upstream prefixes (first match wins), after the vision tower's own (its upstream
# prefix, then its `source_prefixes`). Covers the HF llava-onevision checkpoint (`language_model.model.*`,
# `multi_modal_projector.linear_{1,2}`), the transformers v5 in-memory / saved names (`model.language_model.*`),
# and the upstream layout itself.
_NORMALISE: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^(?:model\.)?multi_modal_projector\.linear_(\d+)\."), "model.mm_projector.{proj}."),
    (re.compile(r"^(?:model\.)?image_newline$"), "model.image_newline"),
    (re.compile(r"^language_model\.model\."), "model."),
    (re.compile(r"^model\.language_model\."), "model."),
    (re.compile(r"^(?:language_model\.)?lm_head\."), "lm_head."),
]


def default_tower() -> VisionTower:
    """The tower of callers that name none: the registry's default (SigLIP)."""
    return vision_towers.TOWERS[vision_towers.DEFAULT_FAMILY]


def tower_of(cfg: ModelConfig) -> VisionTower:
    """The registry entry of the tower `cfg` runs (vision_towers.lookup)."""
    return vision_towers.lookup(cfg.vision_tower)


@functools.cache
def _normalise_patterns(tower: VisionTower) -> list[tuple[re.Pattern, str]]:
    prefix = tower.upstream_prefix
    # the upstream spelling first, kept as it is: a looser source spelling could match its start too
    own = [re.escape(prefix), *tower.source_prefixes]
    return [(re.compile("^" + p), prefix) for p in own] + _NORMALISE


def normalise_key(key: str, tower: VisionTower | None = None) -> str:
    """Any supported source key -> the upstream LLaVA-NeXT key."""
    for pattern, repl in _normalise_patterns(tower or default_tower()):
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
# export writes): TEXT_RULES, the vision tower's key_rules, LLAVA_RULES. In templates, {i} is the layer index
# (our stacked axis); {a|b|c} is a choice made the same way in the key and the path; {p} is the projector's torch
# Sequential index 0, 2, 4, ... in the key and Linear number 1, 2, 3, ... in the path (upstream
# `llavaction/model/multimodal_projector/builder.py: build_vision_projector` interleaves GELUs between the Linears).
TEXT_RULES: list[tuple[str, str, str]] = [
    ("model.embed_tokens.weight", "text/embed", SAME),
    ("model.layers.{i}.self_attn.{q|k|v}_proj.weight", "text/layers/attn/{q|k|v}/kernel", T),
    ("model.layers.{i}.self_attn.{q|k|v}_proj.bias", "text/layers/attn/{q|k|v}/bias", SAME),
    ("model.layers.{i}.self_attn.o_proj.weight", "text/layers/attn/o/kernel", T),
    ("model.layers.{i}.mlp.{gate|up|down}_proj.weight", "text/layers/mlp/{gate|up|down}/kernel", T),
    ("model.layers.{i}.input_layernorm.weight", "text/layers/input_norm/scale", SAME),
    ("model.layers.{i}.post_attention_layernorm.weight", "text/layers/post_norm/scale", SAME),
    ("model.norm.weight", "text/final_norm/scale", SAME),
]
LLAVA_RULES: list[tuple[str, str, str]] = [
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

    def fill_key(self, choices: list[str], layer: int | str | None) -> str:
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


@functools.cache
def rules(tower: VisionTower) -> list[_Rule]:
    """The rule table of a model with this vision tower, in upstream state-dict order."""
    vision = [(tower.upstream_prefix + key, "vision/" + path, tf) for key, path, tf in tower.key_rules]
    return [_Rule(n, key, path, tf, _regex(key, True), _regex(path, False))
            for n, (key, path, tf) in enumerate(TEXT_RULES + vision + LLAVA_RULES)]


# Keys that exist in some checkpoints but that upstream never reads: the vision tower's (`unused_keys`, and its
# layers past the selected one) and buffers.
UNUSED = [(re.compile(r".*\.rotary_emb\.inv_freq$"), "a buffer, not a weight")]


class ConversionError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; print it plainly
        return str(self.args[0])


def map_key(key: str, tower: VisionTower | None = None) -> tuple[str, int | None, str] | None:
    """Upstream key -> (our path, layer index or None, transform), or None if no rule matches."""
    for rule in rules(tower or default_tower()):
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
    rank: tuple[int, ...]  # (index in rules(tower), index of each choice in its {a|b}): orders the keys
    stack: tuple[str, str] | None = None  # a stacked key's text before and after its layer index


def targets(specs: Mapping, tower: VisionTower | None = None) -> dict[str, Target]:
    """{our path: Target} for a flat spec dict ({path: ParamSpec}); a path no rule produces is a bug here or in
    the vision tower's key_rules."""
    out = {}
    for path, spec in specs.items():
        for rule in rules(tower or default_tower()):
            m = rule.path_rx.match(path)
            if m:
                stacked = rule.stacked
                layers = range(spec.shape[0]) if stacked else [None]
                names = tuple(rule.fill_key(list(m.groups()), i) for i in layers)
                fields = [f for f in _FIELD.findall(rule.path)]
                rank = tuple(int(c) if f == "p" else f.split("|").index(c) for f, c in zip(fields, m.groups()))
                stack = tuple(rule.fill_key(list(m.groups()), "\0").split("\0")) if stacked else None
                out[path] = Target(path, rule.transform, stacked, names, (rule.index, *rank), stack)
                break
        else:
            raise ConversionError(f"no key rule produces our parameter {path} (convert/keys.py rules, the vision "
                                  "tower's key_rules)")
    return out


def expected_keys(specs: Mapping, tower: VisionTower | None = None) -> list[tuple[str, str, int | None, str]]:
    """(upstream key, our path, layer, transform) of every tensor a checkpoint for `specs` holds, in upstream
    state-dict order: module by module as the rules list them, layer-major inside the decoder stacks, weight before
    bias (what `torch.nn.Module.state_dict` yields)."""
    entries = [(name, t.path, i if t.stacked else None, t.transform, t.rank, t.stack)
               for t in targets(specs, tower).values() for i, name in enumerate(t.names)]
    first: dict[str, int] = {}  # module -> rank of its first appearance in the rules
    for name, _, layer, _, rank, stack in sorted(entries, key=lambda e: (e[4], e[2] or 0)):
        first.setdefault(_module(name, stack), len(first))
    block: dict[str, int] = {}  # a layer stack (key text before the layer index) -> rank of its first module
    for name, _, layer, _, _, stack in entries:
        if stack is not None:
            block[stack[0]] = min(block.get(stack[0], 1 << 30), first[_module(name, stack)])

    def order(e):
        name, _, layer, _, rank, stack = e
        module = first[_module(name, stack)]
        return (module if stack is None else block[stack[0]], layer or 0, module, rank)

    return [e[:4] for e in sorted(entries, key=order)]


def _module(key: str, stack: tuple[str, str] | None) -> str:
    """The torch module holding `key` (the key without .weight / .bias), every layer of a stack as one ("*")."""
    if stack is not None:
        key = stack[0] + "*" + stack[1]
    return key.rsplit(".", 1)[0] if key.endswith((".weight", ".bias")) else key


def upstream_keys(cfg: ModelConfig) -> Iterable[str]:
    """The upstream state-dict keys of a model with this config, derived from its parameter specs."""
    return [key for key, *_ in expected_keys(flatten_paths(llava.param_specs(cfg)), tower_of(cfg))]


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


def unused_reason(key: str, cfg: ModelConfig) -> str | None:
    """Why upstream never reads the upstream key `key` (the vision tower's unused keys and its layers past the
    selected one, buffers), or None when it is read."""
    tower = tower_of(cfg)
    unused, layer_key = _unused_patterns(tower)
    for pattern, why in unused:
        if pattern.match(key):
            return why
    m = layer_key.match(key)
    if m and int(m.group(1)) >= cfg.vision.num_layers:
        return f"{tower.title} layer past mm_vision_select_layer (upstream deletes it)"
    return None


@functools.cache
def _unused_patterns(tower: VisionTower) -> tuple[list[tuple[re.Pattern, str]], re.Pattern]:
    prefix = re.escape(tower.upstream_prefix)
    unused = [(re.compile(prefix + p), why) for p, why in tower.unused_keys] + UNUSED
    return unused, re.compile(prefix + tower.layer_key)


def is_unused(key: str, cfg: ModelConfig) -> bool:
    """Present-but-unused keys (`unused_reason`)."""
    return unused_reason(key, cfg) is not None
