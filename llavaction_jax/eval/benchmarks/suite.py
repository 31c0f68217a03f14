"""``python -m llavaction_jax eval-suite --suite paper``: one model over several benchmarks' question files, loaded
once, then one table like the paper's. ``--suite ek100`` runs the paper's EPIC-KITCHENS-100 evaluations instead
(eval/ek100_suite.py: its variants, its table OUT/ek100.md).

Model settings as the authors ran lmms-eval's llava_vid (``max_frames_num=64,mm_spatial_pool_mode=average``): the
pooling each build-bench question file records (``average`` unless built otherwise; ``--pool-mode`` overrides for
every benchmark), 64 frames at extraction.

Input layout (what ``build-bench`` + ``extract-frames`` make): ``DATA/<variant>/questions.jsonl`` and
``DATA/<variant>/shards``. Each variant's full evaluation (predictions.jsonl, results.json, report.md) goes to
``OUT/<variant>/``; the table to ``OUT/suite.md`` and ``OUT/suite.json``. A variant whose folder is missing is
listed as not run; ``--table-only`` rebuilds the table from the results already in OUT. The run holds the lock of
OUT (locks.py); a clip that cannot be read is recorded as failed and counted wrong, unless ``--strict``.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
from jax.experimental import multihost_utils

from llavaction_jax import cli_flags, locks
from llavaction_jax.config import POOL_MODES
from llavaction_jax.data.tokenizer import resolve_tokenizer
from llavaction_jax.eval import ek100_suite, mqa_eval
from llavaction_jax.eval.caption_then_answer import evaluate_caption_then_answer
from llavaction_jax.eval.benchmarks import VARIANTS, common
from llavaction_jax.eval.runner import EvalSettings, check_tokenizer_fits, evaluate
from llavaction_jax.recipes import model_overrides
from llavaction_jax.sharding import make_mesh

ACCEPTS_CONFIG_OVERRIDES = True  # --config.model.<field>=value, as in `eval`
# (variant, column title) in the paper's order; EgoSchema's full set is scored by its server.
SUITES = {
    "paper": (("egoschema", "EgoSchema (full, server)"), ("egoschema_subset", "EgoSchema (500 subset)"),
              ("perceptiontest_val_mc", "PerceptionTest (val MC)"), ("longvideobench_val_v", "LongVideoBench (val)"),
              ("videomme", "VideoMME (w/o subs)"), ("videomme_w_subtitle", "VideoMME (w/ subs)"),
              ("mvbench", "MVBench"), ("nextqa_mc_test", "NExT-QA (MC)")),
    "ek100": tuple((row.variant, row.title) for row in ek100_suite.ROWS),
}
# LLaVAction-7B in the paper's v2 (arXiv 2503.18712): the numbers found; VideoMME / LongVideoBench not found.
PAPER_LLAVACTION_7B = {"egoschema": 59.0, "perceptiontest_val_mc": 70.2, "mvbench": 61.1, "nextqa_mc_test": 82.8}


POOL_FIELD = "pool_mode"  # --pool-mode is an alias of --config.model.pool_mode


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.epilog = mqa_eval.CONFIG_EPILOG
    a = parser.add_argument
    a("--suite", choices=sorted(SUITES), default="paper", help="which benchmarks, in which order")
    a("--data", required=True, help="folder of <variant>/questions.jsonl + <variant>/shards (build-bench output)")
    cli_flags.add_out(parser, "output folder: <variant>/ per benchmark, suite.md, suite.json")
    a("--table-only", action="store_true", help="only rebuild the table from results already in --out")
    mqa_eval.add_model_source(parser, required=False)
    a("--batch-size", type=int, default=8, help="questions per process per step")
    a("--mode", choices=("generate", "score", "both"), default="generate",
      help="generate: lmms-eval's way (greedy + its answer parser); score: option log-likelihoods; both")
    a("--max-new-tokens", type=int, default=None,
      help="generation budget (default: each lmms-eval task's; ek100: upstream's 4096)")
    a("--pool-mode", choices=POOL_MODES, default=None,
      help=f"an alias of --config.model.{POOL_FIELD}: 2x2 pooling of each frame's features for every benchmark "
           "(default: what each question file records: build-bench's average, lmms-eval llava_vid's as the authors "
           "ran it; ek100: the model's)")
    cli_flags.add_mesh(parser)
    a("--limit", type=int, default=None, help="evaluate only the first N questions of each benchmark")
    a("--tokenizer", default=None, help="tokenizer directory (default: the model directory's, else bundled Qwen2)")
    cli_flags.add_num_frames(parser, "the most fed to the model; a clip with more is subsampled, one with fewer "
                                     "keeps its own (default: the most a clip of the shards has)")
    a("--prompt-len", type=int, default=None,
      help="padded prompt length for every benchmark, so one compiled step serves them all (default: each file's "
           "longest prompt, rounded up)")
    a("--time-instruction", action=argparse.BooleanOptionalAction, default=True,
      help="add the time instruction each question file asks for (build-bench --time-instruction)")
    a("--threads", type=int, default=4, help="frame-decoding threads per process")
    a("--strict", action="store_true", help="stop at the first clip that is missing or does not decode (default: "
                                            "record its question as failed, count it wrong, go on)")
    a("--options-per-pass", type=int, default=None, help="score mode: options per pass (default: all)")
    cli_flags.add_distributed(parser)


def suite_table(suite: str, out_dir) -> dict:
    """Rows of the suite table from ``OUT/<variant>/results.json`` (missing ones marked not run)."""
    rows = []
    for variant, title in SUITES[suite]:
        path = pathlib.Path(out_dir) / variant / "results.json"
        row = {"variant": variant, "title": title, "paper_llavaction_7b": PAPER_LLAVACTION_7B.get(variant)}
        if not path.is_file():
            rows.append({**row, "status": "not run"})
            continue
        section = json.loads(path.read_text()).get("benchmark")
        if section is None:
            rows.append({**row, "status": f"{path} has no benchmark section (not a build-bench file)"})
        elif not section["has_answers"]:
            rows.append({**row, "status": "submission written (score it on the EgoSchema server)"})
        else:
            scores = {m: s["headline"] for m, s in section["modes"].items()}
            n = max(s["n"] for s in section["modes"].values())
            rows.append({**row, "status": "ok", "scores": scores, "n": n})
    return {"suite": suite, "rows": rows}


def table_markdown(table: dict) -> str:
    lines = [f"# Suite {table['suite']}", "", "| benchmark | generate (lmms-eval scoring) | score (log-likelihood) | n "
             "| LLaVAction-7B (paper) | note |", "|---|---|---|---|---|---|"]
    pct = lambda x: "" if x is None else f"{100 * x:.1f}"
    for r in table["rows"]:
        scores = r.get("scores", {})
        paper = "" if r["paper_llavaction_7b"] is None else f"{r['paper_llavaction_7b']:.1f}"
        lines.append(f"| {r['title']} | {pct(scores.get('generate'))} | {pct(scores.get('score'))} | "
                     f"{r.get('n', '')} | {paper} | {'' if r['status'] == 'ok' else r['status']} |")
    return "\n".join(lines) + "\n"


def write_table(suite: str, out_dir) -> dict:
    table = suite_table(suite, out_dir)
    out_dir = pathlib.Path(out_dir)
    (out_dir / "suite.json").write_text(json.dumps(table, indent=1) + "\n")
    (out_dir / "suite.md").write_text(table_markdown(table))
    return table


def pool_mode(args) -> str | None:
    """The pooling asked for every benchmark: --pool-mode or --config.model.pool_mode (once)."""
    given = model_overrides(args.config_overrides).get(POOL_FIELD)
    if given is not None and args.pool_mode is not None:
        raise ValueError(f"--pool-mode and --config.model.{POOL_FIELD} set the same field; give it once")
    return args.pool_mode or given


def run_suite(args, params, cfg, name, mesh, tokenizer, tokenizer_name, log=print, execution=None) -> None:
    modes = ("generate", "score") if args.mode == "both" else (args.mode,)
    pool_all = pool_mode(args)
    if args.suite == "ek100":
        settings = EvalSettings(batch_size=args.batch_size, modes=modes,
                                max_new_tokens=args.max_new_tokens or mqa_eval.DEFAULT_MAX_NEW_TOKENS,
                                num_frames=args.num_frames, prompt_len=args.prompt_len, limit=args.limit, fmt="ek100",
                                threads=args.threads, options_per_pass=args.options_per_pass, strict=args.strict)
        model = cfg if pool_all is None else cfg.replace(pool_mode=pool_all)

        def evaluate_variant(questions, shards, out):
            test_type = mqa_eval.file_settings(mqa_eval.question_meta(questions)).get("test_type")
            run = evaluate_caption_then_answer if test_type == "caption_then_answer" else evaluate
            run(params, model, tokenizer, questions, shards, out, settings, mesh, model_name=name,
                model_dir=args.model, tokenizer_name=tokenizer_name, log=log, execution=execution)
        ek100_suite.run(args, evaluate_variant, log)
        return
    for variant, title in SUITES[args.suite]:
        folder = pathlib.Path(args.data) / variant
        if not (folder / common.QUESTIONS_NAME).is_file():
            log(f"[eval-suite] {title}: no {folder / common.QUESTIONS_NAME}, skipped")
            continue
        log(f"[eval-suite] {title}: {folder}")
        pool = pool_all or mqa_eval.file_settings(mqa_eval.question_meta(folder / common.QUESTIONS_NAME)).get(
            "pool_mode")
        settings = EvalSettings(batch_size=args.batch_size, modes=modes,
                                max_new_tokens=args.max_new_tokens or VARIANTS[variant].max_new_tokens,
                                num_frames=args.num_frames, prompt_len=args.prompt_len, limit=args.limit,
                                fmt="videoqa",
                                time_instruction=args.time_instruction, threads=args.threads,
                                options_per_pass=args.options_per_pass, strict=args.strict)
        evaluate(params, cfg if pool is None else cfg.replace(pool_mode=pool), tokenizer,
                 folder / common.QUESTIONS_NAME, folder / "shards",
                 pathlib.Path(args.out) / variant, settings, mesh, model_name=name, model_dir=args.model,
                 tokenizer_name=tokenizer_name, log=log, execution=execution)


def run(args: argparse.Namespace) -> int:
    """Errors (bad inputs, a held lock, an unreadable clip with --strict) are reported by cli.main in one line."""
    if not args.table_only:  # every input checked before the lock is taken or a model loaded
        cli_flags.require_dir("--data", args.data)
        mqa_eval.check_inputs(args, questions=False)
        pool_mode(args)
        cli_flags.init_distributed(args)
    with locks.output_lock(args.out, "eval-suite", log=print if jax.process_index() == 0 else None):
        _run(args)
    if not args.table_only:
        multihost_utils.sync_global_devices("eval-suite finished")
    return 0


def _run(args: argparse.Namespace) -> None:
    if not args.table_only:
        mesh = make_mesh(**args.mesh)
        tokenizer, tokenizer_name = resolve_tokenizer(args.tokenizer, args.model)
        configs = mqa_eval.model_config(args)
        if configs is not None:
            check_tokenizer_fits(configs[0], tokenizer)
        params, cfg, execution, name = mqa_eval.load_model(args, mesh, configs)
        run_suite(args, params, cfg, name, mesh, tokenizer, tokenizer_name, execution=execution)
    if jax.process_index() == 0:
        pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
        if args.suite == "ek100":
            print(ek100_suite.table_markdown(ek100_suite.write_table(args.out)))
        else:
            print(table_markdown(write_table(args.suite, args.out)))
