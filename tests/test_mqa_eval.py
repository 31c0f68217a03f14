"""The eval command: metrics worked out by hand, question formats, and end to end on a tiny random model over
synthetic frame shards, in one process and in two real JAX processes (same predictions, same results)."""

import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from llavaction_jax.data import frames as fs
from llavaction_jax.data.tokenizer import default_tokenizer
from llavaction_jax.ek100 import prompts
from llavaction_jax.eval import batching, clip_failures, metrics, mqa_eval, questions as qs, runner
from llavaction_jax.eval.parsing import score_answer
from llavaction_jax.sharding import make_mesh
from _pause import kill_when_stopped, pause_env
from _processes import reserved_port, run_logged
from conftest import COLLECTIVE_FLAGS

REPO = pathlib.Path(__file__).resolve().parents[1]
# Meshes of 2-4 fake devices and a 2-process eval: the module runs in a child process, each test with a
# deadline (tests/_watchdog.py); the first one's includes building the module fixtures. Its eval programs execute
# more than they compile (decode loops): the child compiles at XLA's default level, not the suite's fast one (the
# whole module: 88-112 s of CPU against 141-163 s, two runs each).
pytestmark = pytest.mark.watchdog(900, fast_compile=False)
VOCAB = 151680  # the tiny preset with a vocabulary that covers the offline Qwen2 tokenizer (151646 tokens)
N_QUESTIONS, N_FRAMES = 10, 2
VERB_NAMES, NOUN_NAMES = {1: "open", 2: "take", 3: "wash"}, {10: "door", 20: "cup", 30: "mug", 40: "plate",
                                                              50: "drawer"}


# ------------------------------------------------------------------------------------------ metrics by hand


def fixture_prediction(gt_letter, options, option_vns, raw, score_letter, score_letter_norm, verb, noun):
    gt_text = options[ord(gt_letter) - 65].split(". ", 1)[1]
    texts = [o.split(". ", 1)[1] for o in options]
    return {"uid": f"q{raw[:3]}", "options": options, "option_vns": option_vns, "gt_letter": gt_letter,
            "gt_text": gt_text, "gt_vn": option_vns[ord(gt_letter) - 65], "groups": {"verb": verb, "noun": noun},
            "generate": {"raw": raw, **score_answer(raw, options, gt_letter, gt_text)},
            "score": {"letter": score_letter, "correct_letter": score_letter == gt_letter,
                      "correct_text": texts[ord(score_letter) - 65] == gt_text, "letter_normalized": score_letter_norm,
                      "correct_letter_normalized": score_letter_norm == gt_letter}}


PREDICTIONS = [
    # right by text and letter in both modes
    fixture_prediction("A", ["A. open door", "B. take cup", "C. wash plate"], ["1:10", "2:20", "3:40"],
                       "A. open door", "A", "B", 1, 10),
    # generate: right letter, wrong text ("take mug" is not the GT text); score: picks C = take mug (noun 20 -> 30)
    fixture_prediction("B", ["A. wash plate", "B. take cup", "C. take mug"], ["3:40", "2:20", "2:30"],
                       "B. take mug", "C", "B", 2, 20),
    # generate: names no option; score: picks A = open door (verb 3 -> 1, noun 40 -> 10)
    fixture_prediction("C", ["A. open door", "B. take cup", "C. wash plate"], ["1:10", "2:20", "3:40"],
                       "I cannot tell", "A", "C", 3, 40),
    # generate: the bare GT text (no letter) is right by text and, through the text, by letter
    fixture_prediction("A", ["A. open drawer", "B. take cup", "C. wash plate"], ["1:50", "2:20", "3:40"],
                       "open drawer", "A", "A", 1, 50),
]


def test_metrics_on_a_hand_written_fixture():
    m = metrics.compute_metrics(PREDICTIONS, {"verb": VERB_NAMES, "noun": NOUN_NAMES})
    assert m["num_questions"] == 4 and m["num_without_gt"] == 0
    # generate: text right for questions 1 and 4; letter right for 1, 2 and 4; question 3 names no option
    assert m["modes"]["generate"] == {"n": 4, "correct_text": 2, "accuracy_text": 0.5, "correct_letter": 3,
                                      "accuracy_letter": 0.75, "no_letter": 1}
    # score: letters A, C, A, A vs GT A, B, C, A -> 1 and 4 right; normalised B, B, C, A -> 2, 3, 4 right
    assert m["modes"]["score"] == {"n": 4, "correct_text": 2, "accuracy_text": 0.5, "correct_letter": 2,
                                   "accuracy_letter": 0.5, "correct_letter_normalized": 3,
                                   "accuracy_letter_normalized": 0.75}
    # per verb, headline = generate text: verb 1 (questions 1, 4) 2/2, verb 2 0/1, verb 3 0/1; most frequent first
    assert [(r["name"], r["n"], r["correct"]) for r in m["breakdowns"]["verb"]["generate"]] == [
        ("open", 2, 2), ("take", 1, 0), ("wash", 1, 0)]
    # per verb, headline = score letter: verb 1 2/2 (A, A), verb 2 0/1, verb 3 0/1
    assert [r["accuracy"] for r in m["breakdowns"]["verb"]["score"]] == [1.0, 0.0, 0.0]
    assert [(r["key"], r["accuracy"]) for r in m["breakdowns"]["noun"]["generate"]] == [
        (10, 1.0), (20, 0.0), (40, 0.0), (50, 1.0)]
    gen_conf = m["confusions"]["generate"]
    assert gen_conf["answer"] == [{"gt": "take cup", "predicted": "take mug", "count": 1},
                                  {"gt": "wash plate", "predicted": "I cannot tell", "count": 1}]
    # question 2 picked the GT's letter, so no verb / noun confusion; question 3 picked none
    assert gen_conf["verb"] == [{"gt": "wash", "predicted": "(none)", "count": 1}]
    assert gen_conf["noun"] == [{"gt": "plate", "predicted": "(none)", "count": 1}]
    score_conf = m["confusions"]["score"]
    assert score_conf["verb"] == [{"gt": "wash", "predicted": "open", "count": 1}]
    assert score_conf["noun"] == [{"gt": "cup", "predicted": "mug", "count": 1},
                                  {"gt": "plate", "predicted": "door", "count": 1}]
    assert m["letters"]["generate"] == {"gt": {"A": 2, "B": 1, "C": 1}, "predicted": {"(none)": 1, "A": 2, "B": 1}}


# ------------------------------------------------------------------------------------------ question formats


def test_videoqa_questions_are_normalised_and_prompted_with_the_time_instruction(tmp_path):
    path = tmp_path / "qa.jsonl"
    rows = [{"question_id": 7, "video": "v1.mp4", "question": "What is poured?", "options": ["milk", "tea"],
             "answer": 1, "type": "descriptive"},
            {"video": "v2.mp4", "start": 1, "end": 3.5, "question": "Why?", "candidates": ["(A) hungry", "(B) bored"],
             "answer": "(A) hungry"},
            {"uid": "c3", "video": "v3.mp4", "question": "Who?", "options": ["A. me", "B. you"], "answer": "B"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fmt, meta, questions = qs.load_questions(path)
    assert fmt == "videoqa" and meta is None
    assert [(q.uid, q.gt_letter, q.gt_text) for q in questions] == [("7", "B", "tea"), ("line2", "A", "hungry"),
                                                                     ("c3", "B", "you")]
    assert questions[1].options == ("A. hungry", "B. bored")
    assert questions[1].clip_uids == ("v2.mp4", "v2.mp4_1.00_3.50")
    assert questions[0].groups == {"category": "descriptive"}
    message = questions[0].user_message(12.0, 16, True, qs.DEFAULT_VIDEOQA_INSTRUCTION)
    assert message == ("<image>\nThe video lasts for 12.00 seconds, and 16 frames are uniformly sampled from it. "
                       "Please answer the following questions related to this video.\n\nWhat is poured?\nA. milk\n"
                       "B. tea\nAnswer with the option's letter from the given choices directly.")
    rows[0]["answer"] = "coffee"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"qa.jsonl:1: .*'coffee' is not a letter"):
        qs.load_questions(path)


def test_command_line_parsing_and_batch_layout_errors():
    from llavaction_jax.eval.batching import check_batch_layout

    from llavaction_jax.config import ConfigError, ExecutionConfig, load_preset
    from llavaction_jax.recipes import configs_with_overrides
    from llavaction_jax.sharding import parse_mesh

    assert parse_mesh("data=2,tensor=-1") == {"data": 2, "tensor": -1}
    with pytest.raises(ValueError, match="expected axis=N"):
        parse_mesh("dp=2")
    cfg, execution = configs_with_overrides(load_preset("tiny"), ExecutionConfig(),
                                            ["--config.model.text.vocab_size=151680",
                                             "--config.model.compute_dtype=bfloat16"])
    assert cfg.text.vocab_size == 151680 and execution.compute_dtype == "bfloat16"
    with pytest.raises(ConfigError, match="--config.model.text.vocab: no field 'vocab'"):
        configs_with_overrides(load_preset("tiny"), ExecutionConfig(), ["--config.model.text.vocab=3"])
    with pytest.raises(ValueError, match="does not split over data x fsdp = 2"):
        check_batch_layout(make_mesh(data=2, fsdp=1, tensor=1, devices=jax.devices()[:2]), 3, 1)


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """10 EK100-style questions (build-mqa schema, 3-5 options) over 10 two-frame clips in 2 shards."""
    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    (root / "shards").mkdir()
    entries, records = [], []
    verbs, nouns = list(VERB_NAMES), list(NOUN_NAMES)
    for i in range(N_QUESTIONS):
        uid = f"P01_1{i:02d}"
        frames = rng.integers(0, 256, size=(N_FRAMES, 64, 64, 3), dtype=np.uint8)
        records.append(fs.ClipRecord(uid, "P01-P01_01", i, i + 1.5, 30.0, (i * 30, i * 30 + 20),
                                     fs.encode_frames(frames, "png"), "png", 1.5))
    for s, group in enumerate((records[:6], records[6:])):
        writer = fs.ShardWriter(root / "shards" / f"shard-{s:05d}{fs.SHARD_SUFFIX}")
        for record in group:
            writer.write(record)
        entries.append(writer.commit())
    fs.write_manifest(root / "shards", entries, {"codec": "png"}, N_FRAMES)
    lines = []
    for i, record in enumerate(records):
        k = 3 + i % 3
        vns = [f"{verbs[(i + j) % 3]}:{nouns[(i + 2 * j) % 5]}" for j in range(k)]
        texts = [f"{VERB_NAMES[int(v.split(':')[0])]} {NOUN_NAMES[int(v.split(':')[1])]} {j}"
                 for j, v in enumerate(vns)]
        options = prompts.letter_options(texts)
        gt = i % k
        lines.append({"uid": record.uid, "options": options, "option_vns": vns, "gt_letter": prompts.LETTERS[gt],
                      "gt_text": texts[gt], "gt_vn": vns[gt], "verb_id": int(vns[gt].split(":")[0]),
                      "noun_id": int(vns[gt].split(":")[1]), "source": "random",
                      "prompt": prompts.mc_prompt(options)})
    (root / "q.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


def eval_args(data_dir, out, *extra):
    # A narrower tiny text model with tied embeddings: the 151680-row table dominates init and compile time.
    overrides = [f"text.vocab_size={VOCAB}", "text.tie_word_embeddings=true", "text.hidden_size=64",
                 "text.intermediate_size=128"]
    return ["eval", "--preset", "tiny", *[f"--config.model.{o}" for o in overrides], "--questions",
            str(data_dir / "q.jsonl"), "--shards", str(data_dir / "shards"), "--out", str(out), "--mode", "both",
            "--max-new-tokens", "4", "--mesh", "data=2,fsdp=1,tensor=2", *extra]


@pytest.fixture(scope="module")
def model_on_mesh(data_dir):
    """The CLI's tiny model on 4 of the test's 8 CPU devices (data 2 x tensor 2)."""
    mesh = make_mesh(data=2, fsdp=1, tensor=2, devices=jax.devices()[:4])
    parser = argparse.ArgumentParser()
    mqa_eval.add_arguments(parser)
    args, args.config_overrides = parser.parse_known_args(eval_args(data_dir, data_dir / "out1")[1:])
    params, cfg, execution, name = mqa_eval.load_model(args, mesh)
    return params, cfg, execution, name, mesh


@pytest.fixture(scope="module")
def single_process(data_dir, model_on_mesh):
    """One process, 8 questions a step."""
    params, cfg, execution, name, mesh = model_on_mesh
    settings = runner.EvalSettings(batch_size=8, modes=("generate", "score"), max_new_tokens=4)
    results = runner.evaluate(params, cfg, default_tokenizer(), data_dir / "q.jsonl", data_dir / "shards",
                                data_dir / "out1", settings, mesh, model_name=name, execution=execution,
                              log=lambda *a, **k: None)
    return data_dir / "out1", results


def read_predictions(out):
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def test_eval_also_writes_lmms_evals_layout(single_process):
    out, results = single_process
    (folder,) = (out / "lmms_eval").iterdir()
    (results_file,) = folder.glob("*_results.json")
    lmms = json.loads(results_file.read_text())
    stamp = results_file.name[: -len("_results.json")]
    for mode, task in (("generate", "ek100_mqa"), ("score", "ek100_mqa_score")):
        for metric in ("accuracy_text", "accuracy_letter"):
            assert lmms["results"][task][f"{metric},none"] == pytest.approx(results["modes"][mode][metric])
        samples = [json.loads(line) for line in (folder / f"{stamp}_samples_{task}.jsonl").read_text().splitlines()]
        assert [s["doc_id"] for s in samples] == list(range(results["num_questions"]))
        assert all(s["input"].startswith("<image>\n") and {"target", "filtered_resps", "doc_hash"} <= set(s)
                   for s in samples)


def test_single_process_eval_writes_predictions_results_and_report(single_process, data_dir):
    out, results = single_process
    preds = read_predictions(out)
    questions = [json.loads(line) for line in (data_dir / "q.jsonl").read_text().splitlines()]
    assert [p["uid"] for p in preds] == [q["uid"] for q in questions]
    for p, q in zip(preds, questions):
        assert p["clip_uid"] == q["uid"] and p["options"] == q["options"] and p["gt_letter"] == q["gt_letter"]
        assert 1 <= p["generate"]["num_tokens"] <= 4
        scores = p["score"]["logprob_sum"]
        assert len(scores) == len(q["options"]) and all(np.isfinite(scores))
        assert p["score"]["letter"] == prompts.LETTERS[int(np.argmax(scores))]
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert results["num_questions"] == N_QUESTIONS and results["modes"]["score"]["n"] == N_QUESTIONS
    assert results["settings"]["layout"]["num_options"] == 5
    assert set(results["breakdowns"]) == {"verb", "noun"}
    assert results["modes"] == metrics.compute_metrics(preds)["modes"]  # recomputable from predictions.jsonl
    report = (out / "report.md").read_text()
    assert "## Accuracy per verb" in report and "accuracy.png" in report
    with Image.open(out / "accuracy.png") as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] == 900


def test_videoqa_file_end_to_end(data_dir, model_on_mesh, single_process):
    """Generic QA over the same clips (found by "video"); same shapes as the EK100 run, so no new compilation."""
    params, cfg, execution, name, mesh = model_on_mesh
    rows = [{"id": f"v{i}", "video": f"P01_1{i:02d}", "question": "What happens?", "type": ["pour", "cut"][i % 2],
             "options": ["pour milk", "cut bread", "open jar", "stir soup", "wash cup"], "answer": i % 5}
            for i in range(5)]
    (data_dir / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = runner.EvalSettings(batch_size=8, modes=("score",), max_new_tokens=4,
                                     prompt_len=single_process[1]["settings"]["layout"]["prompt_len"])
    results = runner.evaluate(params, cfg, default_tokenizer(), data_dir / "qa.jsonl", data_dir / "shards",
                                data_dir / "out_qa", settings, mesh, model_name=name, execution=execution,
                              log=lambda *a, **k: None)
    assert results["format"] == "videoqa" and results["modes"]["score"]["n"] == 5
    assert [r["key"] for r in results["breakdowns"]["category"]["score"]] == ["pour", "cut"]
    preds = read_predictions(data_dir / "out_qa")
    assert [p["clip_uid"] for p in preds] == [f"P01_1{i:02d}" for i in range(5)]
    assert [p["gt_letter"] for p in preds] == list("ABCDE")


def test_two_processes_give_the_same_results_as_one(single_process, data_dir):
    out1, results1 = single_process
    out2 = data_dir / "out2"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2 " + COLLECTIVE_FLAGS, JAX_PLATFORMS="cpu",
               JAX_DEFAULT_MATMUL_PRECISION="highest", PYTHONPATH=str(REPO))
    with reserved_port() as port:
        procs = [subprocess.Popen([sys.executable, "-m", "llavaction_jax", *eval_args(
            data_dir, out2, "--batch-size", "4", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
            "--process-id", str(i))], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(2)]
        logs = [p.communicate()[0] for p in procs]  # bounded by the watchdog
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)
    assert "2 process(es)" in logs[0] and "questions/s" in logs[0]

    preds1, preds2 = read_predictions(out1), read_predictions(out2)
    assert len(preds2) == N_QUESTIONS
    for a, b in zip(preds1, preds2):
        for key in ("logprob_sum", "logprob_mean"):
            np.testing.assert_allclose(a["score"].pop(key), b["score"].pop(key), rtol=1e-5, atol=1e-5)
        assert a == b
    results2 = json.loads((out2 / "results.json").read_text())
    assert results2["run"]["process_count"] == 2 and results1["run"]["process_count"] == 1
    for key in ("run", "settings", "model"):
        results1.pop(key), results2.pop(key)
    assert json.loads(json.dumps(results1)) == results2


def test_a_model_vocabulary_smaller_than_the_tokenizer_is_a_clear_error(data_dir, capsys):
    from llavaction_jax.cli import main

    code = main(["eval", "--preset", "tiny", "--questions", str(data_dir / "q.jsonl"), "--shards",
                 str(data_dir / "shards"), "--out", str(data_dir / "bad"), "--mesh", "data=1,fsdp=-1,tensor=1"])
    assert code == 2
    assert "vocabulary has 512 rows but the tokenizer has 151646 tokens" in capsys.readouterr().err


def test_a_killed_eval_resumes_and_writes_what_an_uninterrupted_run_writes(data_dir, model_on_mesh):
    """SIGKILL a real eval after its first step; the rerun answers only the rest, and its outputs equal an
    uninterrupted run's with the same settings (two questions a step, so five steps)."""
    params, cfg, execution, name, mesh = model_on_mesh
    out = data_dir / "killed"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4 " + COLLECTIVE_FLAGS,
               JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest", PYTHONPATH=str(REPO))
    log = data_dir / "killed.log"
    # stopped once the first step's two answers are on disk, then killed there
    proc = run_logged([sys.executable, "-m", "llavaction_jax", *eval_args(data_dir, out, "--batch-size", "2")], log,
                      env=pause_env(env, "eval-step-written:0"), cwd=REPO)
    kill_when_stopped(proc, log)
    partial = out / runner.PARTIAL_NAME.format(0)
    answered = [json.loads(line)["index"] for line in partial.read_text().splitlines()[1:]]
    assert answered == [0, 1] and not (out / "results.json").exists()

    settings = runner.EvalSettings(batch_size=2, modes=("generate", "score"), max_new_tokens=4)
    run = lambda o: runner.evaluate(params, cfg, default_tokenizer(), data_dir / "q.jsonl", data_dir / "shards",
                                    o, settings, mesh, model_name=name, execution=execution,
                                    log=lambda *a, **k: None)
    resumed = run(out)
    assert resumed["run"]["resumed_questions"] == len(answered) and not partial.exists()
    reference = run(data_dir / "uninterrupted")
    preds_resumed, preds_reference = read_predictions(out), read_predictions(data_dir / "uninterrupted")
    for a, b in zip(preds_resumed, preds_reference, strict=True):
        for key in ("logprob_sum", "logprob_mean"):
            np.testing.assert_allclose(a["score"].pop(key), b["score"].pop(key), rtol=1e-5, atol=1e-5)
        assert a == b
    results = [json.loads((o / "results.json").read_text()) for o in (out, data_dir / "uninterrupted")]
    for r in results:
        r.pop("run")
    assert results[0] == results[1] and reference["num_questions"] == N_QUESTIONS


def test_the_run_frame_count_subsamples_longer_clips_and_keeps_shorter_ones(data_dir):
    shards = fs.FrameShards(data_dir / "shards")  # every clip 2 frames
    assert runner.run_frame_count(shards, None) == N_FRAMES and runner.run_frame_count(shards, 1) == 1
    with pytest.raises(ValueError, match=r"--num-frames 3: every clip in .*shards has 2 frames"):
        runner.run_frame_count(shards, 3)
    assert batching.select_positions(3, 4).tolist() == [0, 1, 2]  # a short clip keeps its own frames
    assert batching.select_positions(8, 4).tolist() == [0, 2, 4, 6]  # upstream EK100's stride
    assert batching.select_positions(10, 4).tolist() == [0, 3, 6, 9]  # linspace(0, 9, 4) truncated


def test_a_question_without_gt_letter_is_rejected_when_the_file_is_loaded(data_dir, tmp_path):
    lines = (data_dir / "q.jsonl").read_text().splitlines()
    broken = json.loads(lines[1])
    del broken["gt_letter"]
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join([lines[0], json.dumps(broken), *lines[2:]]) + "\n")
    with pytest.raises(ValueError) as err:
        qs.load_questions(path, "ek100")
    assert str(err.value) == (f"{path}:2: not a ek100 question (ValueError: no 'gt_letter' key (null marks a question "
                              "whose options miss the ground truth))")
    broken["gt_letter"] = None  # an explicit null (build-mqa: the top-k missed the GT) is still read
    path.write_text("\n".join([lines[0], json.dumps(broken), *lines[2:]]) + "\n")
    assert qs.load_questions(path, "ek100")[2][1].gt_letter is None


# ------------------------------------------------------------------------------------------ what a run may reuse
class Interrupted(Exception):
    pass


def interrupt_after_first_step(message, **_):
    if message.startswith("[eval] step 1/"):
        raise Interrupted  # as Ctrl-C would, once the first step's answers are in the partial file


def test_a_model_republished_at_the_same_path_does_not_reuse_the_earlier_answers(data_dir, model_on_mesh, tmp_path):
    """An eval interrupted after its first step, then the model at the same path replaced (a longer training
    published over it): the rerun's fingerprint (by the model's content) differs, so nothing is reused."""
    from llavaction_jax import checkpoint_io

    params, cfg, execution, name, mesh = model_on_mesh
    model_dir, out = tmp_path / "model", tmp_path / "out"
    checkpoint_io.publish_model(model_dir, cfg, params, execution=execution)
    settings = runner.EvalSettings(batch_size=2, modes=("generate", "score"), max_new_tokens=4, progress_every_s=0)
    run = lambda p, log: runner.evaluate(p, cfg, default_tokenizer(), data_dir / "q.jsonl", data_dir / "shards",
                                         out, settings, mesh, model_name=str(model_dir), model_dir=str(model_dir),
                                         execution=execution, log=log)
    with pytest.raises(Interrupted):
        run(params, interrupt_after_first_step)
    partial = out / runner.PARTIAL_NAME.format(0)
    assert len(partial.read_text().splitlines()) == 3  # the header and the first step's two answers
    other = jax.tree.map(lambda x: x * 0.5, params)
    checkpoint_io.publish_model(model_dir, cfg, other, execution=execution)  # same path, other weights
    logs = []
    results = run(other, lambda message, **_: logs.append(message))
    assert results["run"]["resumed_questions"] == 0
    assert any("is from a run with other settings: moved to predictions.partial.p0.jsonl.stale" in m for m in logs)


def test_unreadable_clips_are_failed_records_counted_wrong_and_a_rerun_retries_them(data_dir, model_on_mesh,
                                                                                    tmp_path):
    """One clip's record corrupted on disk, one question naming a clip the shards do not hold: both questions
    are recorded as failed (counted wrong, listed in results.json), the others answered; the partial file stays,
    and a rerun on repaired shards answers only the failed ones. --strict stops at them instead."""
    from _train_fixtures import corrupt_record

    params, cfg, execution, name, mesh = model_on_mesh
    shards, out = tmp_path / "shards", tmp_path / "out"
    shutil.copytree(data_dir / "shards", shards)
    shard = shards / f"shard-00000{fs.SHARD_SUFFIX}"
    original = shard.read_bytes()
    corrupt_record(shard, "P01_103")
    lines = (data_dir / "q.jsonl").read_text().splitlines()
    gone = json.loads(lines[7])
    gone["uid"] = "P01_999"  # an EK100 question's clip is its uid: not in the shards
    lines[7] = json.dumps(gone)
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(lines) + "\n")
    settings = runner.EvalSettings(batch_size=2, modes=("generate", "score"), max_new_tokens=4)
    run = lambda s, log=lambda *a, **k: None: runner.evaluate(
        params, cfg, default_tokenizer(), questions, shards, out, s, mesh, model_name=name, execution=execution,
        log=log)
    results = run(settings)
    failed = {f["uid"]: f["error"] for f in results["failed"]}
    assert set(failed) == {"P01_103", "P01_999"} and "KeyError" in failed["P01_999"]
    records = read_predictions(out)
    for r in records:
        assert bool(r.get("failed")) == (r["uid"] in failed)
    wrong = [r for r in records if r.get("failed")]
    assert all(not r[m]["correct_text"] and not r[m]["correct_letter"] for r in wrong for m in ("generate", "score"))
    answered = [r for r in records if not r.get("failed")]
    assert results["modes"]["score"]["n"] == N_QUESTIONS
    assert results["modes"]["score"]["correct_letter"] == sum(r["score"]["correct_letter"] for r in answered)
    assert (out / runner.PARTIAL_NAME.format(0)).is_file()  # kept for the retry

    shard.write_bytes(original)  # repaired
    retried = run(settings)
    assert retried["run"]["resumed_questions"] == N_QUESTIONS - 2
    assert [f["uid"] for f in retried["failed"]] == ["P01_999"]
    assert not read_predictions(out)[3].get("failed")

    corrupt_record(shard, "P01_103")
    strict = dataclasses.replace(settings, strict=True)
    with pytest.raises(KeyError, match="1 questions have no clip"):
        run(strict)
    lines[7] = json.dumps({**gone, "uid": "P01_107"})
    questions.write_text("\n".join(lines) + "\n")
    with pytest.raises(clip_failures.ClipUnreadable, match="question 'P01_103': .*without --strict"):
        run(strict)


def test_a_question_file_that_is_not_utf8_is_named_with_its_line(data_dir, tmp_path):
    lines = (data_dir / "q.jsonl").read_bytes().splitlines()
    bad = tmp_path / "q.jsonl"
    bad.write_bytes(b"\n".join([lines[0], lines[1].replace(b'"uid"', b'"u\xffid"', 1), *lines[2:]]) + b"\n")
    with pytest.raises(ValueError) as err:
        qs.load_questions(bad)
    assert str(err.value).startswith(f"{bad}:2: not UTF-8 text (byte 0xff at column ")
