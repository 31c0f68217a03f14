"""``python -m llavaction_jax eval``: a model + a question file + frame shards -> answers, metrics and a report.

Flow: every process reads the whole question file (so all agree on the fixed batch shapes), answers its contiguous
slice (``ek100.mqa.slice_bounds``) in steps of ``--batch-size`` questions on the global mesh (its rows go to its
own devices), then the prediction records are gathered to process 0 with a collective (no shared filesystem
needed), checked to cover the question file exactly once, and written with the metrics:

    OUT/predictions.jsonl   one record per question, in file order (schema: runner.py)
    OUT/results.json        settings, run facts and metrics (schema: ``metrics.compute_metrics`` + header)
    OUT/report.md           tables + OUT/accuracy.png
    OUT/lmms_eval/          the same results and per-question records in lmms-eval's layout (eval/lmms_layout.py)

Answer modes: ``generate`` (upstream: greedy decoding, parsed with upstream's rules) and ``score`` (the option
with the highest log-likelihood, model/decode.py); ``both`` runs both on the same batches.

What the question file's sidecar meta asks for, unless the command line says otherwise: its generation budget
(``max_new_tokens``, build-bench: the lmms-eval task's), its pooling (``pool_mode``, build-bench: llava_vid's
``average``; ``--config.model.pool_mode`` overrides) and its test type (``caption_then_answer`` runs two passes,
eval/caption_then_answer.py).

The run holds the lock of OUT (locks.py): a second eval into the same OUT is refused. A clip that is missing from
the shards or does not decode is recorded as failed (counted wrong, listed in results.json), unless ``--strict``.
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
from jax.experimental import multihost_utils

from llavaction_jax import cli_flags, locks
from llavaction_jax.api import load_pretrained
from llavaction_jax.checkpoint_io import is_model_dir, load_config, load_execution
from llavaction_jax.config import config_fields, preset_configs
from llavaction_jax.data.tokenizer import resolve_tokenizer
from llavaction_jax.ek100.mqa import meta_path
from llavaction_jax.eval.caption_then_answer import evaluate_caption_then_answer
from llavaction_jax.eval.runner import EvalSettings, check_tokenizer_fits, evaluate
from llavaction_jax.model import llava
from llavaction_jax.recipes import configs_with_overrides, model_overrides

DEFAULT_MAX_NEW_TOKENS = 4096  # upstream's budget (llavaction/action/llava_inference.py)
from llavaction_jax.sharding import make_mesh, param_shardings


ACCEPTS_CONFIG_OVERRIDES = True  # --config.model.<field>=value, as in `train`


CONFIG_EPILOG = ("Any model config field can be set as in `train` (ml_collections config_flags): "
                 "--config.model.<field>=VALUE, e.g. --config.model.compute_dtype=bfloat16 "
                 "--config.model.attention=flash --config.model.text.vocab_size=151680; --print-config shows them all.")


def add_model_source(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """--model / --preset, the same in eval and eval-suite."""
    model = parser.add_mutually_exclusive_group(required=required)
    model.add_argument("--model", help="model directory (save_pretrained / converter output, or a PyTorch checkpoint "
                                       "directory converted in memory)")
    model.add_argument("--preset", help="random model from configs/<NAME>.py (smoke tests), e.g. tiny")
    parser.add_argument("--seed", type=int, default=0, help="seed of a --preset model's random weights")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    add_model_source(parser)
    parser.epilog = CONFIG_EPILOG
    a("--print-config", action="store_true", help="print the model config (with overrides) and exit")
    a("--questions", required=True, help="question file: build-mqa JSONL (ek100) or generic video QA JSONL")
    a("--shards", required=True, help="frame-shard directory (extract-frames output) holding every question's clip")
    cli_flags.add_out(parser, "output directory (predictions.jsonl, results.json, report.md, accuracy.png, "
                              "lmms_eval/: the same in lmms-eval's layout)")
    a("--format", choices=("auto", "ek100", "videoqa"), default="auto", help="question-file format")
    a("--label-space", choices=("ek100", "uda"), default="ek100",
      help="uda: accept a build-mqa file built with --label-space uda (otherwise refused: its action ids are not "
           "the released head's)")
    a("--batch-size", type=int, default=8, help="questions per process per step")
    a("--mode", choices=("generate", "score", "both"), default="generate",
      help="generate: greedy answer + upstream parsing; score: option log-likelihoods; both: the two from one "
           "prefill of each batch")
    a("--max-new-tokens", type=int, default=None,
      help="generation budget (default: the question file's max_new_tokens, else upstream's 4096; 32 is plenty "
           "for MQA)")
    cli_flags.add_mesh(parser)
    a("--limit", type=int, default=None, help="evaluate only the first N questions")
    a("--tokenizer", default=None, help="tokenizer directory (default: the model directory's, else bundled Qwen2)")
    cli_flags.add_num_frames(parser, "the most fed to the model; a clip with more is subsampled, one with fewer "
                                     "keeps its own (default: the most a clip of the shards has)")
    a("--prompt-len", type=int, default=None, help="padded prompt length (default: longest prompt, rounded up)")
    a("--time-instruction", action=argparse.BooleanOptionalAction, default=True,
      help="videoqa: prepend LLaVA-Video's 'The video lasts for ...' instruction")
    a("--videoqa-instruction", default="",
      help="videoqa: line after the options (default: lmms-eval's \"Answer with the option's letter from the given "
           "choices directly.\")")
    a("--annotations", default=None, help="EK100 annotation folder for verb/noun names (default: the one the "
                                          "question file's meta names)")
    a("--threads", type=int, default=4, help="frame-decoding threads per process")
    a("--strict", action="store_true",
      help="stop at the first question whose clip is missing from the shards or does not decode (default: record it "
           "as failed, count it wrong, list it in results.json, go on; a rerun retries it)")
    a("--options-per-pass", type=int, default=None,
      help="score mode: options run through the model together, over the prompt's KV cache read in place "
           "(default: all options in one pass; 1 uses the least memory)")
    cli_flags.add_distributed(parser)


def question_meta(path) -> dict:
    """The question file's sidecar meta ({} without one)."""
    path = meta_path(path)
    return json.loads(path.read_text()) if path.is_file() else {}


def file_settings(meta: dict) -> dict:
    """What the question file asks of a run: build-bench's ``settings`` (pool_mode, max_frames_num) and its
    task's budget (``variant_spec.max_new_tokens``), build-mqa's ``settings`` (test_type)."""
    settings = dict(meta.get("settings") or {})
    if "max_new_tokens" not in settings and (meta.get("variant_spec") or {}).get("max_new_tokens"):
        settings["max_new_tokens"] = meta["variant_spec"]["max_new_tokens"]
    return settings


def with_file_pooling(cfg, asked: dict, overrides: list[str], log=print):
    """``cfg`` with the question file's pool_mode unless ``--config.model.pool_mode`` was given."""
    pool = asked.get("pool_mode")
    if pool is None or "pool_mode" in model_overrides(overrides) or pool == cfg.pool_mode:
        return cfg
    if jax.process_index() == 0:
        log(f"[eval] pooling: {pool} (the question file's; --config.model.pool_mode={cfg.pool_mode} keeps the "
            "model's)")
    return cfg.replace(pool_mode=pool)


def model_config(args):
    """(model config, execution choices) with the command line's --config.model overrides, read before any weights
    so a mismatch fails fast; None for a PyTorch checkpoint directory (load_pretrained converts it in memory and
    the config comes with the weights)."""
    if args.model and not is_model_dir(args.model):
        return None
    base = (load_config(args.model), load_execution(args.model)) if args.model else preset_configs(args.preset)
    return configs_with_overrides(*base, args.config_overrides)


@functools.lru_cache(maxsize=4)
def random_init(cfg, mesh):
    """Random weights for smoke runs, initialised inside jit straight into the mesh's shardings (identical on every
    process, no host copy); one compiled initialiser per (config, mesh), however many commands a process runs."""
    return jax.jit(lambda key: llava.init(cfg, key), out_shardings=param_shardings(llava.param_specs(cfg), mesh))


def load_model(args, mesh, configs=None):
    """(params on the mesh, cfg, execution, name); `configs`: `model_config(args)` when already read."""
    configs = configs or model_config(args)
    if args.model:
        model = load_pretrained(args.model, mesh, dtype=configs[0].param_dtype if configs is not None else None)
        params, name = model.params, str(args.model)
        cfg, execution = configs or configs_with_overrides(model.cfg, model.execution, args.config_overrides)
    else:
        cfg, execution = configs
        # The rbg generator compiles in a fraction of threefry's time on CPU.
        params = random_init(cfg, mesh)(jax.random.key(args.seed, impl="rbg"))
        name = f"preset {args.preset} (random, rbg seed {args.seed})"
    return params, cfg, execution, name


def check_inputs(args: argparse.Namespace, questions: bool = True) -> None:
    """Every argument and input path checked before a model is loaded or anything is written."""
    if not (args.model or args.preset):
        raise ValueError("give --model DIR or --preset NAME")
    cli_flags.require_positive(args, "batch_size", "limit", "num_frames", "max_new_tokens", "prompt_len", "threads",
                               "options_per_pass")
    if args.model:
        cli_flags.require_dir("--model", args.model)
    if questions:
        cli_flags.require_file("--questions", args.questions)
        cli_flags.require_dir("--shards", args.shards)
    for flag in ("tokenizer", "annotations"):
        if getattr(args, flag, None):
            cli_flags.require_dir(f"--{flag}", getattr(args, flag))


def run(args: argparse.Namespace) -> int:
    check_inputs(args)
    configs = model_config(args)
    if args.print_config:
        print(config_fields(*configs) if configs is not None else
              "a PyTorch checkpoint: its config comes with the weights")
        return 0
    cli_flags.init_distributed(args)
    with locks.output_lock(args.out, "eval", log=print if jax.process_index() == 0 else None):
        return _evaluate(args, configs)


def _evaluate(args: argparse.Namespace, configs) -> int:
    mesh = make_mesh(**args.mesh)
    tokenizer, tokenizer_name = resolve_tokenizer(args.tokenizer, args.model)
    if configs is not None:
        check_tokenizer_fits(configs[0], tokenizer)
    params, cfg, execution, name = load_model(args, mesh, configs)
    asked = file_settings(question_meta(args.questions))
    cfg = with_file_pooling(cfg, asked, args.config_overrides)
    modes = ("generate", "score") if args.mode == "both" else (args.mode,)
    settings = EvalSettings(batch_size=args.batch_size, modes=modes,
                            max_new_tokens=args.max_new_tokens or asked.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS,
                            num_frames=args.num_frames, prompt_len=args.prompt_len,
                            limit=args.limit, fmt=args.format, label_space=args.label_space,
                            time_instruction=args.time_instruction, instruction=args.videoqa_instruction,
                            threads=args.threads, options_per_pass=args.options_per_pass, strict=args.strict)
    run_eval = evaluate_caption_then_answer if asked.get("test_type") == "caption_then_answer" else evaluate
    results = run_eval(params, cfg, tokenizer, args.questions, args.shards, args.out, settings, mesh,
                       model_name=name, model_dir=args.model, tokenizer_name=tokenizer_name,
                       annotations=args.annotations, execution=execution)
    if results is not None:
        summary = ", ".join(f"{m}: text {_fmt(s.get('accuracy_text'))} letter {_fmt(s.get('accuracy_letter'))}"
                            for m, s in results["modes"].items())
        rate = results["run"]["questions_per_second"]
        print(f"[eval] {results['num_questions']} questions; {summary}; "
              f"{'n/a' if rate is None else f'{rate:.2f}'} questions/s -> {args.out}")
        if results["failed"]:
            print(f"[eval] {len(results['failed'])} questions FAILED (clip unreadable; counted wrong, listed in "
                  f"results.json); rerun the same command to retry them")
        official = results.get("benchmark", {})
        if official.get("modes"):  # a build-bench file: its score as lmms-eval computes it
            print(f"[eval] {official['variant']}: " + ", ".join(f"{m} {_fmt(stats['headline'])}"
                                                                for m, stats in official["modes"].items()))
    multihost_utils.sync_global_devices("eval finished")  # no process exits while 0 writes
    return 0


def _fmt(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"
