"""The demo at its smallest setting, through the command line of an install without PyTorch: the whole pipeline
runs, the trained model beats chance by a wide margin, its tokenizer fits the prompts training builds, and the
output holds nothing but the demo's own messages."""

import json
import pathlib

import numpy as np
import pytest

from _cli_e2e import run_cli_child
from llavaction_jax.data.frames import FrameShards
from llavaction_jax.data.tokenizer import load_qwen_tokenizer
from llavaction_jax.data.train_sample import EncodeTrainSample
from llavaction_jax.recipes import load_recipe
from llavaction_jax.train.loop import ek100_prompt_settings

NOISE = ("ParamInfo(", "ts_context=None",  # Orbax, once per array, without a shared TensorStore context
         "PyTorch was not found",  # transformers' import-time notice
         "deprecated")  # the demo calling a command with an old spelling


@pytest.mark.cli_e2e("demo")
def test_demo_smallest_setting_learns(tmp_path):
    out = tmp_path / "demo"
    codes, output = run_cli_child([["demo", "--out", str(out), "--segments-per-action", "12", "--steps", "300"]],
                                  devices=1, without_torch=True, fast_compile=False)  # 300 steps: as users run it
    assert codes == [0], output[-4000:]
    assert not [line for line in output.splitlines() if any(n in line for n in NOISE)], output[-4000:]

    summary = json.loads((out / "demo_summary.json").read_text())
    before, after = summary["accuracy_before"], summary["accuracy_after"]
    # This setting (192 training clips, 300 steps, 64 questions, 5 options: chance 20%) measured with the demo's
    # seeds 0, 1, 2 on 8 CPU devices: generate 50.0 / 45.3 / 51.6%, option scoring 79.7 / 60.9 / 73.4%, loss 6.4 ->
    # 0.17 / 0.18 / 0.16; seed 0 on one device, as `make demo` runs it and this test does: 48.4% / 78.1%, loss 6.44 ->
    # 0.17, and 50.0% / 79.7% with per_head attention and the frames in one vision step (the default setting, 480
    # clips and 800 steps, is the one that reaches ~99%). The test runs seed 0; the bounds sit under the worst seed,
    # so a change that merely reshuffles the random draws still passes.
    assert after["generate"] >= 0.40 and after["generate"] > before["generate"] + 0.3
    assert after["score"] >= 0.55 and after["score"] > before["score"] + 0.3
    assert summary["last_loss"] < summary["first_loss"] / 25
    # results.json carries the paper's recognition metrics; with distinct options (and every GT among them) the
    # chosen option's action is right exactly when its letter is
    results = json.loads((out / "eval_after" / "results.json").read_text())
    assert results["ek100"]["candidates_recall"] == 1.0
    assert results["ek100"]["generate"]["action_top1"] == results["modes"]["generate"]["accuracy_letter"]
    assert results["ek100"]["generate"]["verb_top1"] >= results["ek100"]["generate"]["action_top1"]
    # every stage left its artifact
    for path in ("shards/train/manifest.json", "mqa_validation.jsonl", "train/model/llavaction_config.json",
                 "eval_after/report.md", "eval_after/accuracy.png", "torch_export/config.json"):
        assert (out / path).exists(), path
    for model_dir in ("train/model", "torch_export"):  # usable elsewhere: upstream's loader reads the tokenizer there
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json"):
            assert (out / model_dir / name).is_file(), f"{model_dir}/{name}"
    # (refusing a folder the demo did not write: tests/test_cli_flags.py)
    assert_tokenizer_fits_the_training_prompts(out)


def assert_tokenizer_fits_the_training_prompts(out: pathlib.Path):
    """The trained model's small BPE must fit the prompts training builds at load time (time instruction, task
    prompt, options; demo.make_tokenizer trains it on them, not on the stored option lists). Each training sample,
    encoded by the training pipeline's own transform, comes out in whole words: 131 tokens, 4.3 characters a token
    and 28% single-character tokens here. A tokenizer that never saw those prompts (trained on the stored option
    lists and answers only) gives 1.35 characters a token, 90% single characters, and the demo's data.max_length
    of 256 tokens cuts the prompt before its options and answer."""
    tokenizer = load_qwen_tokenizer(out / "train" / "model")
    # the prompts as `train` builds them for the demo's recipe (its EK100 prompt settings)
    prompts = ek100_prompt_settings(load_recipe("train").data)
    encode = EncodeTrainSample(FrameShards(out / "shards" / "train"), tokenizer, num_frames=4, frame_size=64,
                               max_length=256, question_prompts=prompts)
    samples = [json.loads(line) for line in (out / "train_samples.jsonl").read_text().splitlines()]
    for sample in samples[:: max(1, len(samples) // 24)]:
        ids = [int(i) for i in encode.encode(sample)["input_ids"] if i >= 0]  # -200: the video placeholder
        text = tokenizer.decode(ids)
        single = np.mean([len(tokenizer.decode([i])) <= 1 for i in ids])
        assert len(ids) <= 160 and len(text) / len(ids) >= 3.5 and single < 0.4, (len(ids), single, text)
        # the whole prompt and the answer are there (not cut at max_length)
        assert "seconds, and 4 frames are uniformly sampled" in text and sample["conversations"][1]["value"] in text
