"""`predict` and `LlavaModel.generate` on a real MP4 (PyAV), the same answers as `eval` on extracted frame shards;
model directories with their tokenizer; the offline Qwen2 tokenizer's size; a batch with an unreadable clip."""

import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
from _cli_e2e import run_cli
from _video_fixtures import known_frames, write_mp4

from llavaction_jax.api import LlavaModel, load_pretrained
from llavaction_jax.cli import main
from llavaction_jax.config import load_preset
from llavaction_jax.data.clip import read_clip
from llavaction_jax.data.tokenizer import load_qwen_tokenizer, train_chatml_tokenizer
from llavaction_jax.eval import questions as qs
from llavaction_jax.eval.runner import EvalSettings, evaluate
from llavaction_jax.model import llava
from llavaction_jax.sharding import make_mesh

FRAMES, NEW_TOKENS = 4, 8
OPTIONS = ["take cup", "open door", "close door"]
# Upstream's EK100 multiple-choice user turn with the time instruction, written out (llavaction/action/utils.py:
# format_task_related_prompt, format_llava_prompt, format_time_instruction): the code must build exactly this.
MC_MESSAGE = ("<image>\nThe provided video lasts for 1.500 seconds, and 4 frames are uniformly sampled from it."
              "You are seeing this video from egocentric view and you are the person. Your hands are sometimes "
              "interacting with objects. What action are you doing? Given multiple choices, format your answer "
              "briefly such as 'A. move knife'. \nHere are the options of actions you are selecting:\n"
              "A. take cup, B. open door, C. close door")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    write_mp4(root / "videos" / "a.mp4", known_frames(0, 90))  # 3 s at 30 fps
    write_mp4(root / "videos" / "b.mp4", known_frames(200, 60))
    texts = [MC_MESSAGE, "What is in my hand? You are a helpful assistant. system user assistant", *OPTIONS]
    train_chatml_tokenizer(texts * 4, vocab_size=400, out_dir=root / "tokenizer")
    cfg = load_preset("tiny")  # random weights initialised in jit with rbg keys: seconds instead of a minute on CPU
    model = LlavaModel(cfg, jax.jit(lambda key: llava.init(cfg, key))(jax.random.key(1, impl="rbg")))
    model.save_pretrained(root / "model", tokenizer_dir=root / "tokenizer")
    return root, load_pretrained(root / "model")


def test_a_saved_model_carries_its_tokenizer_generation_config_and_config(setup):
    root, model = setup
    files = {p.name for p in (root / "model").iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json"} <= files
    assert len(model.tokenizer) == len(load_qwen_tokenizer(root / "tokenizer"))  # its own, not Qwen2's 151646
    im_end, endoftext = model.tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    generation = json.loads((root / "model" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [im_end, endoftext] and generation["do_sample"] is False
    config = json.loads((root / "model" / "config.json").read_text())
    assert config["architectures"] == ["LlavaQwenForCausalLM"] and config["vocab_size"] == 512


def test_generate_and_score_options_equal_eval_on_extracted_frames(setup, tmp_path):
    root, model = setup
    clips = [{"video": "a.mp4", "start": 0.5, "end": 2.0, "uid": "a1"}, {"video": "b.mp4", "start": 0.2, "end": 1.9,
                                                                          "uid": "b1"}]
    (tmp_path / "clips.jsonl").write_text("".join(json.dumps(c) + "\n" for c in clips))
    assert main(["extract-frames", "--jsonl", str(tmp_path / "clips.jsonl"), "--video-root", str(root / "videos"),
                 "--out", str(tmp_path / "shards"), "--sampling", "ek100", "--num-frames", str(FRAMES),
                 "--frame-size", "64", "--codec", "png", "--workers", "1"]) == 0
    questions = [{"uid": "q1", "clip_uid": "a1", "question": "What is in my hand?", "options": OPTIONS, "answer": 1},
                 {"uid": "q2", "clip_uid": "b1", "question": "What do I do?", "options": OPTIONS[::-1], "answer": 0}]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    evaluate(model.params, model.cfg, model.tokenizer, tmp_path / "q.jsonl", tmp_path / "shards", tmp_path / "eval",
             EvalSettings(batch_size=2, modes=("generate", "score"), max_new_tokens=NEW_TOKENS), make_mesh(
                 1, 1, 1, devices=jax.devices()[:1]), model_dir=str(root / "model"), log=lambda *a, **k: None)
    records = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]

    pixels = [read_clip(str(root / "videos" / c["video"]), c["start"], c["end"], FRAMES, 64).pixels for c in clips]
    _, _, loaded = qs.load_questions(tmp_path / "q.jsonl")
    messages = [q.user_message(c["end"] - c["start"], FRAMES, True, qs.DEFAULT_VIDEOQA_INSTRUCTION)
                for q, c in zip(loaded, clips)]
    answers = model.generate(pixels, messages, max_new_tokens=NEW_TOKENS)
    assert answers == [r["generate"]["raw"] for r in records]
    scores = model.score_options(pixels, messages, [q.options for q in loaded])
    for got, r in zip(scores, records):
        np.testing.assert_allclose(got["logprob_sum"], r["score"]["logprob_sum"], rtol=1e-5, atol=1e-5)


@pytest.mark.cli_e2e("predict")
def test_predict_batch_and_single_video(setup, tmp_path, capsys):
    root, model = setup
    items = [{"video": "videos/a.mp4", "start": 0.5, "end": 2.0, "options": OPTIONS},
             {"video": "videos/b.mp4", "question": "What is in my hand?"},
             {"video": "videos/b.mp4", "start": 0.1, "end": 1.6, "options": ["A. " + OPTIONS[2], "B. " + OPTIONS[0]]}]
    batch = root / "items.jsonl"
    batch.write_text("".join(json.dumps(i) + "\n" for i in items))
    common = ["--model", str(root / "model"), "--num-frames", str(FRAMES), "--max-new-tokens", str(NEW_TOKENS)]
    assert run_cli(["predict", *common, "--batch", str(batch), "--batch-size", "2", "--out", str(tmp_path / "o.jsonl")]) == 0
    err = capsys.readouterr().err
    assert "[predict] backend cpu" in err and "step 2/2: 3/3 clips" in err
    records = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert records[0]["prompt"] == MC_MESSAGE
    assert records[1]["prompt"] == "<image>\nWhat is in my hand?"  # a free question: no time instruction
    assert records[2]["options"] == ["A. close door", "B. take cup"]
    pixels = [read_clip(str(root / i["video"]), i.get("start"), i.get("end"), FRAMES, 64).pixels for i in items]
    assert [r["answer"] for r in records] == model.generate(pixels, [r["prompt"] for r in records],
                                                            max_new_tokens=NEW_TOKENS)
    for r in (records[0], records[2]):
        assert r["best_scored_option"] == r["options"][int(np.argmax(r["logprob_sum"]))]
        assert r["chosen_option"] is None or r["chosen_option"] in r["options"]

    assert main(["predict", *common, "--video", str(root / "videos" / "a.mp4"), "--start", "0.5", "--end", "2.0",
                 "--options", *OPTIONS]) == 0
    out = capsys.readouterr().out.split("\n")  # not splitlines(): a random model's answer may hold \x1d
    assert out[0] == f"answer: {records[0]['answer']}"  # a row's answer does not depend on its batch
    assert out[1].startswith("chosen option: ") and any(line.endswith("<- best") for line in out)

    assert main(["predict", *common, "--batch", str(batch), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "o.jsonl exists and is not empty" in capsys.readouterr().err
    assert main(["predict", *common, "--video", str(root / "missing.mp4")]) == 2
    assert f"--video {root / 'missing.mp4'}: no such file" in capsys.readouterr().err


def test_offline_tokenizer_is_qwen2s_151646_entries():
    from tokenizers import Tokenizer

    from llavaction_jax.data.tokenizer import bundled_qwen_tokenizer_dir

    tokenizer = load_qwen_tokenizer()
    assert len(tokenizer) == 151646
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert len(tokenizer("<think>")["input_ids"]) > 1  # Qwen3's added token is plain text for Qwen2
    qwen3 = Tokenizer.from_file(str(bundled_qwen_tokenizer_dir() / "tokenizer.json"))  # the files as shipped
    assert qwen3.get_vocab_size(with_added_tokens=True) == 151669
    text = "<|im_start|>user\nThe video lasts for 12.345 seconds. Héllo, wörld!  \n\n<|im_end|>\n"
    assert tokenizer(text)["input_ids"] == qwen3.encode(text).ids


def test_training_uses_the_tokenizer_of_init_from_by_default(setup, tmp_path):
    from _train_fixtures import tiny_train_config

    from llavaction_jax.train.loop import tokenizer_dir

    root, _ = setup
    cfg = tiny_train_config(tmp_path, tmp_path / "out", steps=1, **{"data.tokenizer": "",
                                                                     "model.init_from": root / "model"})
    assert tokenizer_dir(cfg) == str(root / "model")  # the model's own, not Qwen2's
    cfg.data.tokenizer = str(root / "tokenizer")
    assert tokenizer_dir(cfg) == str(root / "tokenizer")  # an explicit one wins
    cfg.data.tokenizer, cfg.model.init_from = "", ""
    assert tokenizer_dir(cfg) is None  # Qwen2's (data/tokenizer.qwen2_tokenizer)


def test_an_unreadable_clip_is_recorded_the_batch_goes_on_and_a_rerun_retries_it(setup, tmp_path, capsys):
    """A file that is not a video in the middle of a batch: its record holds the error, the other clips are
    answered, exit status 3. Once the file is fixed, the same command answers only that line; a finished output
    is never overwritten. An end past the video's end is sampled to its last frame and said so."""
    root, model = setup
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(root / "videos" / "a.mp4", videos / "a.mp4")
    (videos / "broken.mp4").write_bytes(b"not a video at all")
    items = [{"video": "videos/a.mp4", "start": 0.5, "end": 2.0, "options": OPTIONS},
             {"video": "videos/broken.mp4", "question": "What is in my hand?"},
             {"video": "videos/a.mp4", "start": 1.0, "end": 99.0, "question": "What do I do?"}]
    batch = tmp_path / "items.jsonl"
    batch.write_text("".join(json.dumps(i) + "\n" for i in items))
    out = tmp_path / "answers.jsonl"
    command = ["predict", "--model", str(root / "model"), "--num-frames", str(FRAMES), "--max-new-tokens",
               str(NEW_TOKENS), "--batch", str(batch), "--batch-size", "2", "--out", str(out)]
    assert main(command) == 3
    assert "1 clip(s) FAILED" in capsys.readouterr().err
    first = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in first] == [1, 2, 3]
    assert "broken.mp4" in first[1]["error"] and "answer" not in first[1]
    assert "answer" in first[0] and "answer" in first[2]
    assert first[2]["note"].startswith(f"end 99 s is past the end of {videos / 'a.mp4'} (3.000 s)")

    shutil.copy(root / "videos" / "b.mp4", videos / "broken.mp4")  # fixed
    assert main(command) == 0
    assert "resuming" in capsys.readouterr().err
    second = [json.loads(line) for line in out.read_text().splitlines()]
    assert second[0] == first[0] and second[2] == first[2] and "answer" in second[1]
    assert not (tmp_path / ".answers.jsonl.predict-state.json").exists()
    assert main(command) == 2 and "exists and is not empty" in capsys.readouterr().err

    assert main(["predict", "--model", str(root / "model"), "--num-frames", str(FRAMES), "--max-new-tokens",
                 str(NEW_TOKENS), "--video", str(videos / "a.mp4"), "--start", "1", "--end", "99"]) == 0
    assert f"note: end 99 s is past the end of {videos / 'a.mp4'}" in capsys.readouterr().err
