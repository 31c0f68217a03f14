"""`python -m llavaction_jax convert`: PyTorch checkpoints <-> our Orbax model directories."""

from __future__ import annotations

import argparse
import re

import jax

from llavaction_jax import cli_flags, locks
from llavaction_jax.convert import from_torch, hf_onevision, to_torch
from llavaction_jax.recipes import model_overrides
from llavaction_jax.sharding import make_mesh

DESCRIPTION = """\
Convert checkpoints between PyTorch (safetensors + config.json) and our Orbax format.

  convert from-torch SRC --out DST   import a downloaded checkpoint, e.g. MLAdaptiveIntelligence/LLaVAction-7B,
                                     lmms-lab/LLaVA-Video-7B-Qwen2 (upstream LLaVA-NeXT layout) or
                                     llava-hf/llava-onevision-qwen2-0.5b-ov-hf (HF layout)
  convert to-torch SRC --out DST     export one of our models (e.g. after fine-tuning) for the PyTorch tools
                                     (upstream demo, lmms-eval), or for transformers with --layout hf-onevision

Both directions stream: at most --buffer-size of weights (default 256MiB) is held in flight, so peak memory
stays flat whatever the model size. The import copies config.json, tokenizer files and generation_config.json
next to the converted model. Output goes to a staging folder beside DST and is renamed into place when complete;
a DST that is not empty is refused, and so is a second conversion into DST while one runs (lock file .DST.lock).
Checksums: a source with checksums.json (one of our exports or models) is verified before anything is read; the
output gets a checksums.json only when its source was verified (else a warning says so). Load the result with llavaction_jax.load_pretrained(DST);
load_pretrained(SRC) also converts a PyTorch directory in memory.

Vocabulary: all embedding rows are kept (152064 for 7B). Upstream truncates them to len(tokenizer) = 151646
at load time; pass vocab_limit=151646 to LlavaModel.__call__ / llava.forward to slice the logits the same way
(evaluation does this) so argmax can never pick an untrained padding row.
"""

FROM_TORCH_HELP = """\
Import SRC (a directory with config.json and model.safetensors or shards + model.safetensors.index.json)
into --out DST (new). The layout is read from config.json: upstream LLaVA-NeXT / LLaVAction (model_type qwen2,
llava_qwen or llava, with mm_vision_tower) or HF llava-onevision (model_type llava_onevision).

The upstream config only names the vision tower; its dimensions come from a built-in preset
(google/siglip-so400m-patch14-384), a local directory or Hugging Face cache entry of that name, or
--vision-config. Every tensor is checked against the config (names, shapes) before anything is written;
present-but-unused tensors (SigLIP post_layernorm / head, the deleted last SigLIP layer) are skipped.

Pod mode: run the same command on every host with a --mesh over all devices (--distributed auto, the default,
detects a TPU pod slice, SLURM step or Open MPI job; --distributed on forces it); each host reads only the tensor
slices its devices hold and all hosts write one sharded checkpoint.

Model config fields of the written llavaction_config.json can be set as in `train` and `eval`,
--config.model.<field>=VALUE (e.g. --config.model.compute_dtype=bfloat16 --config.model.attention=flash);
fields that would change a parameter's shape are refused.
"""


ACCEPTS_CONFIG_OVERRIDES = True  # from-torch: --config.model.<field>=value, as in `train` and `eval`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    sub = parser.add_subparsers(dest="direction", metavar="DIRECTION", required=True)

    p = sub.add_parser("from-torch", help="PyTorch safetensors -> our Orbax model directory",
                       description=FROM_TORCH_HELP, accepts_config_overrides=True)
    p.add_argument("src", metavar="SRC", help="PyTorch checkpoint directory (config.json + *.safetensors)")
    cli_flags.add_out(p, "new output directory (not needed with --check)", required=False)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="cast every parameter to this dtype (default: keep each tensor's stored dtype)")
    p.add_argument("--vision-config", metavar="PATH",
                   help="SigLIP config.json giving the vision tower's dimensions (upstream layout only)")
    p.add_argument("--check", action="store_true",
                   help="print the key mapping and every problem, write nothing; exit 1 if there are problems")
    cli_flags.add_mesh(p, default=None, detail="the output is written sharded over it (default: one device)")
    cli_flags.add_distributed(p)
    p.add_argument("--compress", action="store_true",
                   help="zstd-compress the stored arrays (smaller for real weights; slower to write)")
    p.add_argument("--buffer-size", default="256MiB", metavar="SIZE",
                   help="weights in flight at once; peak memory is about twice this (default: 256MiB)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    q = sub.add_parser("to-torch", help="our Orbax model directory -> PyTorch safetensors",
                       description="Export SRC (one of our model directories) to --out DST (new) as safetensors + "
                                   "config.json.")
    q.add_argument("src", metavar="SRC", help="our model directory (llavaction_config.json + params/)")
    cli_flags.add_out(q, "new output directory")
    q.add_argument("--layout", choices=("upstream", "hf-onevision"), default="upstream",
                   help="upstream: LLaVA-NeXT / LLaVAction state dict for the upstream loader (default); "
                        "hf-onevision: transformers LlavaOnevisionForConditionalGeneration with the processor files "
                        "AutoProcessor reads (image / video processor configs, the tokenizer with <image> / <video>, "
                        f"the onevision chat template); refused where it cannot represent the model: "
                        f"{hf_onevision.LIMITS}")
    q.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="split files above this size, with model.safetensors.index.json (e.g. 5GB, 500MB, 2GiB)")
    q.add_argument("--buffer-size", default="256MiB", metavar="SIZE",
                   help="weights in flight at once; peak memory is about twice this (default: 256MiB)")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read size {text!r}; write e.g. 5GB, 500MB or 2GiB")
    number, unit, binary = float(m.group(1)), m.group(2).upper(), bool(m.group(3))
    scale = (1024 if binary else 1000) ** "_KMGT".index(unit or "_")
    return int(number * scale)


def run(args: argparse.Namespace) -> int:
    """Errors are reported by cli.main (one line, exit 2); `--check` exits 1 when it finds problems."""
    cli_flags.require_dir("SRC", args.src)
    if getattr(args, "vision_config", None):
        cli_flags.require_file("--vision-config", args.vision_config)
    for flag in ("buffer_size", "max_shard_size"):
        if hasattr(args, flag):
            parse_size(getattr(args, flag))  # a bad size fails before anything is read
    if args.direction == "from-torch":
        model_overrides(args.config_overrides)  # a misspelled override fails before the checkpoint is read
    return _from_torch(args) if args.direction == "from-torch" else _to_torch(args)


def _from_torch(args) -> int:
    if args.check:
        source = from_torch.open_source(args.src, args.vision_config)
        plan = from_torch.plan_import(source)
        print("\n".join(from_torch.describe(source, plan)))
        return 1 if plan.problems else 0
    if args.out is None:
        raise ValueError("from-torch needs --out DST (or --check)")

    cli_flags.init_distributed(args)
    mesh = make_mesh(**args.mesh) if args.mesh else None
    with locks.output_lock(args.out, "convert from-torch", log=print if jax.process_index() == 0 else None):
        report = from_torch.import_checkpoint(args.src, args.out, dtype=args.dtype, vision_config=args.vision_config,
                                              mesh=mesh, progress=not args.no_progress, compress=args.compress,
                                              buffer_bytes=parse_size(args.buffer_size),
                                              model_overrides=args.config_overrides)
    if jax.process_index() == 0:
        skipped = f", skipped {len(report.plan.skipped)} unused tensors" if report.plan.skipped else ""
        print(f"wrote {args.out} ({report.cfg.param_dtype}{skipped}); "
              f"load it with llavaction_jax.load_pretrained({args.out!r})")
    return 0


def _to_torch(args) -> int:
    with locks.output_lock(args.out, "convert to-torch", log=print):
        files = to_torch.export_checkpoint(args.src, args.out, layout=args.layout,
                                           max_shard_bytes=parse_size(args.max_shard_size),
                                           progress=not args.no_progress, buffer_bytes=parse_size(args.buffer_size))
    print(f"wrote {len(files)} safetensors file(s) and config.json to {args.out} ({args.layout} layout)")
    return 0
