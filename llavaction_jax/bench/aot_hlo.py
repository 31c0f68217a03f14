"""What a compiled program does, read from its optimized HLO text (`compiled.as_text()`).

- `attention_kernels`: per tower, the attention kernel each of its attention calls became. `model.attention`
  names every call's scope `<impl>_attention` (self-attention, T == S) or `<impl>_cache_attention` (queries over a
  longer KV cache: decode steps, option scoring), and the towers' layers are scoped `siglip` / `qwen2`; XLA keeps
  these names in each instruction's `op_name` metadata through fusion, remat, scans and the backward pass. A
  hardware kernel counts only when its custom call is in the program: Mosaic (`tpu_custom_call`, splash's
  `splash_mha_*` kernels) or cuDNN (`__cudnn$fmha*`).
- `gpu_kernels`: library and generated kernels a GPU program calls (cuDNN attention, cuBLAS GEMMs, Triton
  fusions), counted by custom-call target and fusion kind.
- `tpu_out_of_memory`: the TPU compiler refuses a program that does not fit the chip; its message says by how much.
"""

from __future__ import annotations

import collections
import re

TOWERS = {"siglip": "vision", "qwen2": "language"}
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_SCOPE = re.compile(r"^(xla|flash|cudnn|splash)_(attention|cache_attention)$")
_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')
_FUSION_KIND = re.compile(r'"kind":"(__[A-Za-z0-9_$]+)"')
HARDWARE_KERNELS = ("splash", "cudnn")  # implementations that must show their custom call


def _scopes(op_name: str) -> list[str]:
    """Name-stack components, unwrapped from transformations: "transpose(jvp(qwen2))" -> "qwen2"."""
    out = []
    for part in re.split(r"[/;]", op_name):
        out.append(re.sub(r"^(?:[a-z_]+\()+|\)+$", "", part))
    return out


def _instructions(hlo_text: str) -> list[str]:
    """The text split into instructions (a custom call's kernel metadata can span several lines)."""
    return re.split(r"\n(?=\s*(?:ROOT\s+)?%?[\w.-]+ = )", hlo_text)  # "%name = " (optimized), "name = " (lowered)


def _hardware_kernel(instruction: str) -> str | None:
    """"splash" / "cudnn" for an instruction that calls that kernel, else None."""
    call = _CUSTOM_CALL.search(instruction)
    if call is None:
        return None
    if call.group(1) == "tpu_custom_call" and "splash_mha" in instruction:
        return "splash"
    return "cudnn" if call.group(1).startswith("__cudnn$fmha") else None


def attention_kernels(hlo_text: str, calls_in_scope: bool = True) -> dict[str, dict[str, list[str]]]:
    """{tower: {"attention" | "cache_attention": sorted kernel names}} for every tower with attention calls.
    A splash / cudnn scope without its hardware custom call is reported as "<impl> (no kernel call)". The call must
    sit in the scope in an optimized program; `calls_in_scope=False` accepts a call anywhere in the program (a
    lowered, unoptimized program names the inside of nested computations relative to them)."""
    found = collections.defaultdict(set)  # (tower, kind) -> impls named by scopes
    with_call = set()  # (tower, kind, impl) whose scope holds the hardware kernel's custom call
    anywhere = set()  # hardware kernels called somewhere in the program
    for line in _instructions(hlo_text):
        hardware = _hardware_kernel(line)
        anywhere.add(hardware)
        match = _OP_NAME.search(line)
        if not match:
            continue
        scopes = _scopes(match.group(1))
        towers = [TOWERS[s] for s in scopes if s in TOWERS]
        kernels = [m.groups() for s in scopes if (m := _SCOPE.match(s))]
        if not towers or not kernels:
            continue
        impl, kind = kernels[-1]
        found[towers[-1], kind].add(impl)
        if hardware == impl:
            with_call.add((towers[-1], kind, impl))
    out: dict[str, dict[str, list[str]]] = {}
    for (tower, kind), impls in sorted(found.items()):
        verified = lambda impl: (impl not in HARDWARE_KERNELS or (tower, kind, impl) in with_call
                                 or (not calls_in_scope and impl in anywhere))
        names = [impl if verified(impl) else f"{impl} (no kernel call)" for impl in sorted(impls)]
        out.setdefault(tower, {})[kind] = names
    return out


def gpu_kernels(hlo_text: str) -> dict[str, int]:
    """{custom-call target or fusion kind: count}, e.g. {"__cudnn$fmhaSoftmax": 2, "__cublas$gemm": 40,
    "__triton_gemm": 12}: the library calls and generated kernels of a compiled GPU program."""
    counts = collections.Counter(_CUSTOM_CALL.findall(hlo_text))
    counts.update(_FUSION_KIND.findall(hlo_text))
    return dict(sorted(counts.items()))


_TPU_OOM = (  # (pattern, what the first figure counts): the TPU compiler's two ways of saying it
    (re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm"), "total"),
    (re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)"),
     "temporaries"),
)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def tpu_out_of_memory(message: str) -> dict | None:
    """The TPU compiler's refusal of a program larger than the chip's memory ("Ran out of memory in memory space
    hbm. Used 20.50G of 15.75G hbm. ..." or "Ran out of memory on HBM, the total memory required for HLO
    temporaries (22.86G) exceeds available HBM (15.75G)") -> {"used": bytes, "counts": "total" or "temporaries"
    (then the program needs at least that), "limit": the compiler's limit in bytes, "message": its line}; None for
    any other error."""
    for pattern, counts in _TPU_OOM:
        match = pattern.search(message)
        if match:
            used, used_unit, limit, limit_unit = match.groups()
            line = next(line for line in message.splitlines() if match.group(0) in line).strip()
            return {"used": int(float(used) * _UNITS[used_unit]), "counts": counts,
                    "limit": int(float(limit) * _UNITS[limit_unit]), "message": line}
    return None
