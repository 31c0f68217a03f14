"""`python -m llavaction_jax demo`: the whole system on a synthetic EK100-style dataset, on a laptop CPU.

Stages, each the real component a user would run:
 1. write a synthetic egocentric-action dataset: real MP4s (PyAV) + EK100 annotation CSVs (demo/synthetic.py);
 2. `extract-frames`: decode the clips once into ArrayRecord frame shards (EK100 midpoint sampling);
 3. `build-mqa`: the EK100-MQA validation question file (5 options, random distractors, time instruction);
 4. EK100 training samples (MQA with train-time distractors) + a small ChatML BPE tokenizer for the tiny model;
 5. `eval` a tiny random LLaVAction (configs/tiny.py) before training;
 6. `train` it with the real loop (mesh, Grain pipeline, AdamW groups, Orbax checkpoints);
 7. `eval` again; 8. `convert to-torch`: export to the upstream PyTorch layout;
 9. print a report: accuracy before / after, chance level, time per stage, where everything is.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import time

from llavaction_jax import cli_flags
from llavaction_jax.api import LlavaModel
from llavaction_jax.cli import main as cli_main
from llavaction_jax.config import preset_configs
from llavaction_jax.data.chat import SYSTEM_MESSAGE
from llavaction_jax.data.tokenizer import load_qwen_tokenizer, train_chatml_tokenizer
from llavaction_jax.demo.synthetic import NOUNS, VERBS, SyntheticSpec, write_dataset
from llavaction_jax.ek100 import labels, train_files
from llavaction_jax.ek100.train_prompt import EK100PromptSettings, ek100_user_prompt
from llavaction_jax.recipes import load_recipe
from llavaction_jax.train.loop import train

MARKER = ".llavaction_demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0] + (
        " Writes everything under --out (default ./demo_out); a previous demo run there is replaced.")
    cli_flags.add_out(parser, "output directory", required=False, default="demo_out")
    parser.add_argument("--segments-per-action", type=int, default=30,
                        help="training segments per verb-noun action, 16 actions")
    parser.add_argument("--steps", type=int, default=800, help="training steps")
    parser.add_argument("--batch-size", type=int, default=16, help="training batch size")
    cli_flags.add_num_frames(parser, "extracted, trained and evaluated", default=4)
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the model and training")


def prepare_out_dir(out: pathlib.Path) -> None:
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise cli_flags.CommandError(f"{out} exists and was not written by the demo; pass another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by python -m llavaction_jax demo; replaced on the next demo run\n")


class Stages:
    def __init__(self):
        self.times: dict[str, float] = {}

    def run(self, name: str, fn, *args, **kwargs):
        print(f"\n=== {name}", flush=True)
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        self.times[name] = time.perf_counter() - t0
        return result


def _cli(argv: list[str]) -> None:
    code = cli_main(argv)
    if code != 0:
        raise cli_flags.CommandError(f"stage `{' '.join(argv[:2])}` failed with exit status {code}")


def make_training_samples(annotations: pathlib.Path, out: pathlib.Path) -> int:
    """MC samples in upstream's layout; the pipeline builds the prompt (time instruction included) at load time."""
    maps = labels.load_label_maps(annotations, train_csvs=[annotations / labels.TRAIN_CSV])
    segments = labels.read_annotation_csv(annotations / labels.TRAIN_CSV)
    settings = train_files.TrainSampleSettings(n_options=5)
    samples = train_files.training_samples("mc", segments, maps, settings)
    train_files.write_samples_jsonl(samples, out)
    return len(samples)


def make_tokenizer(samples: pathlib.Path, questions: pathlib.Path, out: pathlib.Path, vocab_size: int,
                   num_frames: int) -> int:
    """A small BPE trained on the texts the model reads: the training prompts as the pipeline builds them at load
    time (not the stored option lists), the answers, and the validation prompts."""
    texts = [SYSTEM_MESSAGE, "system user assistant"]
    settings = EK100PromptSettings("first_person", "", None, 0)
    for line in samples.read_text().splitlines():
        sample = json.loads(line)
        texts += [ek100_user_prompt(sample, num_frames, settings), sample["conversations"][1]["value"]]
    for line in questions.read_text().splitlines():
        q = json.loads(line)
        texts += [q["prompt"], *q["options"]]
    train_chatml_tokenizer(texts, vocab_size, out)
    return len(load_qwen_tokenizer(out))


def accuracy(results_dir: pathlib.Path) -> dict:
    results = json.loads((results_dir / "results.json").read_text())
    gen = results["modes"]["generate"]
    score = results["modes"].get("score", {})
    return {"generate": gen.get("accuracy_text", gen.get("accuracy")), "score": score.get("accuracy_letter")}


def prepare(out: pathlib.Path, args: argparse.Namespace, stages: Stages) -> dict:
    """Stages 1-4 and the random model: the data, questions, samples, tokenizer and model_init that eval and train
    read (paths, and the segment counts)."""
    data, ann = out / "data", out / "data" / "annotations"
    spec = SyntheticSpec(segments_per_action_train=args.segments_per_action,
                         segments_per_action_val=max(2, args.segments_per_action // 3), seed=args.seed)
    counts = stages.run("1. synthetic videos (PyAV) + EK100 CSVs", write_dataset, data, spec)
    print(f"{counts['train']} training and {counts['validation']} validation segments, "
          f"{len(VERBS)} verbs x {len(NOUNS)} nouns, videos in {data / 'videos'}")

    extract = ["--video-root", str(data / "videos"), "--num-frames", str(args.num_frames), "--frame-size", "64",
               "--codec", "png", "--workers", "2"]
    stages.run("2. extract-frames", lambda: [
        _cli(["extract-frames", "--ek100-csv", str(ann / f"EPIC_100_{split}.csv"), "--out", str(out / "shards" / split),
              *extract]) for split in ("train", "validation")])

    questions = out / "mqa_validation.jsonl"
    stages.run("3. build-mqa", _cli, [
        "build-mqa", "--annotations", str(ann), "--train-csv", str(ann / "EPIC_100_train.csv"), "--out",
        str(questions), "--n-options", "5", "--time-instruction", "--num-frames", str(args.num_frames), "--seed", "0"])

    samples = out / "train_samples.jsonl"
    n_samples = stages.run("4. training samples + tokenizer", make_training_samples, ann, samples)
    # The tiny preset with 8 px patches: a 8x8 grid per frame, pooled to 4x4, so position (the verb) survives.
    cfg, execution = preset_configs("tiny", {"vision.patch_size": 8})
    vocab = make_tokenizer(samples, questions, out / "tokenizer", cfg.text.vocab_size, args.num_frames)
    print(f"{n_samples} MQA training samples; tokenizer with {vocab} tokens in {out / 'tokenizer'}")

    model_init = out / "model_init"
    LlavaModel.random(cfg, seed=args.seed, execution=execution).save_pretrained(model_init, tokenizer_dir=out / "tokenizer")
    return {"counts": counts, "questions": questions, "samples": samples, "model_init": model_init}


def train_config(out: pathlib.Path, inputs: dict, args: argparse.Namespace):
    """The demo's training recipe (configs/train.py with these overrides) for `prepare`'s inputs."""
    pad_id = load_qwen_tokenizer(out / "tokenizer").pad_token_id
    return load_recipe("train", [
        f"--config.model.init_from={inputs['model_init']}", f"--config.data.samples={inputs['samples']}",
        f"--config.data.shards={out / 'shards' / 'train'}", f"--config.data.tokenizer={out / 'tokenizer'}",
        # Every demo prompt is 131 tokens (time instruction, task prompt, five options, answer): one 136 bucket.
        f"--config.data.pad_id={pad_id}", "--config.data.max_length=256", "--config.data.length_buckets=(136,256)",
        f"--config.train.output_dir={out / 'train'}", f"--config.train.steps={args.steps}",
        f"--config.train.batch_size={args.batch_size}", f"--config.train.log_every={max(1, args.steps // 10)}",
        f"--config.train.checkpoint_every={max(1, args.steps // 2)}", f"--config.train.seed={args.seed}",
        # From scratch, the whole model learns at one rate (upstream's 2e-6 is for a pretrained SigLIP).
        "--config.optim.learning_rate=2e-3", "--config.optim.vision_lr=2e-3", "--config.optim.warmup_ratio=0.05",
        "--config.mesh.fsdp=-1",
        # Two decoder layers: unrolled, the step skips the scan's per-layer slicing of the stacked weights and
        # gradients (about a tenth of the step's CPU time here; the same outputs, tests/test_execution.py).
        "--config.model.scan_layers=false",
        # The batch's 64 frames of 64 patches in one vision step: fewer patches than one step of CPU's default (8
        # SigLIP frames of 729), and no loop slicing frames in and features out (the step 0.45 s of CPU against
        # 0.50, alternating in one process; the same outputs, tests/test_execution.py).
        "--config.model.vision_frames_per_step=-1"])


def run(args: argparse.Namespace) -> int:
    cli_flags.require_positive(args, "segments_per_action", "steps", "batch_size", "num_frames")  # before any write
    out = pathlib.Path(args.out).absolute()
    prepare_out_dir(out)
    stages = Stages()
    inputs = prepare(out, args, stages)
    counts, questions, model_init = inputs["counts"], inputs["questions"], inputs["model_init"]
    evaluate = ["--questions", str(questions), "--shards", str(out / "shards" / "validation"), "--tokenizer",
                str(out / "tokenizer"), "--batch-size", "16", "--max-new-tokens", "12", "--mode", "both"]
    stages.run("5. eval before training", _cli, ["eval", "--model", str(model_init), "--out", str(out / "eval_before"),
                                                  *evaluate])
    summary = stages.run("6. train", train, train_config(out, inputs, args))

    model_final = out / "train" / "model"
    stages.run("7. eval after training", _cli, ["eval", "--model", str(model_final), "--out", str(out / "eval_after"),
                                                 *evaluate])
    stages.run("8. export to the upstream PyTorch layout", _cli,
               ["convert", "to-torch", str(model_final), "--out", str(out / "torch_export")])

    before, after = accuracy(out / "eval_before"), accuracy(out / "eval_after")
    print("\n=== report")
    print(f"EK100-MQA on {counts['validation']} synthetic validation questions, 5 options (chance 20%):")
    print(f"  {'':28} {'before':>8} {'after':>8}")
    print(f"  {'generate (upstream metric)':28} {before['generate']:8.1%} {after['generate']:8.1%}")
    if after["score"] is not None:
        print(f"  {'option scoring':28} {before['score']:8.1%} {after['score']:8.1%}")
    print(f"training: {summary['step']} steps, loss {summary['losses'][0]:.3f} -> {summary['losses'][-1]:.3f}")
    print("time per stage:")
    for name, seconds in stages.times.items():
        print(f"  {name:42} {seconds:7.1f} s")
    print(f"  {'total':42} {sum(stages.times.values()):7.1f} s")
    print(f"artifacts in {out}: videos + CSVs (data/), frame shards (shards/), questions (mqa_validation.jsonl), "
          f"checkpoints + TensorBoard (train/), reports (eval_*/report.md), PyTorch export (torch_export/)")
    (out / "demo_summary.json").write_text(json.dumps(
        {"accuracy_before": before, "accuracy_after": after, "stage_seconds": stages.times, "steps": summary["step"],
         "first_loss": summary["losses"][0], "last_loss": summary["losses"][-1]}, indent=1) + "\n")
    return 0
