"""EK100 at test time through the command line, end to end on a tiny random model over synthetic frame shards:
eval's recognition metrics (results.json, report.md, lmms-eval records), pseudo prior actions built from a real
eval run, caption_then_answer's two passes, a question file's own budget and pooling, and ``eval-suite --suite
ek100`` with its table. The commands run in one child process with one CPU device, so they share its jit cache:
two compiled generation steps (bilinear and average pooling) and one random initialiser for all of them."""

import json

import numpy as np
import pytest
from _cli_e2e import run_cli_child
from test_ek100 import write_fake_annotations
from test_mqa_protocols import ranked_predictions
from test_prior_actions import VALIDATION

from llavaction_jax.cli import main
from llavaction_jax.config import load_preset
from llavaction_jax.data import frames as fs
from llavaction_jax.ek100 import labels, mqa
from llavaction_jax.eval import mqa_eval
from llavaction_jax.eval.ek100_suite import ROWS

TINY = ["--preset", "tiny", *[f"--config.model.{o}" for o in ("text.vocab_size=151680", "text.tie_word_embeddings=true",
                                                              "text.hidden_size=64", "text.intermediate_size=128")]]
RUN = ["--batch-size", "5", "--prompt-len", "320", "--mesh", "data=-1,fsdp=1,tensor=1"]
FRAMES = 2


def write_shards(ann, folder):
    """One 2-frame 64 px PNG clip per validation row, under its narration id (extract-frames' EK100 uid)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    writer = fs.ShardWriter(folder / f"shard-00000{fs.SHARD_SUFFIX}")
    for s in labels.read_annotation_csv(ann / labels.VALIDATION_CSV):
        pixels = rng.integers(0, 256, (FRAMES, 64, 64, 3), dtype=np.uint8)
        writer.write(fs.ClipRecord(s.narration_id, s.video, s.start, s.end, 30.0, (0, 1),
                                   fs.encode_frames(pixels, "png"), "png", s.end - s.start))
    fs.write_manifest(folder, [writer.commit()], {"codec": "png"}, FRAMES)


def run_commands(root, commands):
    """The CLI commands, in order, in one child process with one device; returns their output."""
    codes, output = run_cli_child(commands, devices=1, fast_compile=False)  # eval runs: decode loops
    assert codes == [0] * len(commands), output
    return output


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ek100_eval")
    ann = write_fake_annotations(root / "ann", validation_rows=VALIDATION)
    write_shards(ann, root / "shards")
    build = ["build-mqa", "--annotations", str(ann), "--time-instruction", "--num-frames", str(FRAMES)]
    tim, _, _ = ranked_predictions(ann, root / "tim_pred_ids_val.json", lambda i: i % 5,
                                   labels.load_label_maps(ann).actions)
    data = root / "data"
    suite_builds = {"ek100_mqa_tim_16f": [], "ek100_mqa_tim_16f_prior_oracle": ["--prior-actions", "oracle"]}
    for variant in suite_builds:
        (data / variant).mkdir(parents=True)
        (data / variant / "shards").symlink_to(root / "shards")
    for argv in ([*build, "--out", str(root / "random.jsonl")],
                 [*build, "--out", str(root / "cta.jsonl"), "--test-type", "caption_then_answer"],
                 *[[*build, "--out", str(data / v / "questions.jsonl"), "--distractors", "tim", "--predictions",
                    str(tim), *extra] for v, extra in suite_builds.items()]):
        assert main(argv) == 0
    # a question file asking for its own budget and pooling (as build-bench's meta does)
    meta = json.loads(mqa.meta_path(root / "random.jsonl").read_text())
    meta["settings"].update(max_new_tokens=3, pool_mode="average")
    (root / "asks").mkdir()
    (root / "asks" / "q.jsonl").write_text((root / "random.jsonl").read_text())
    mqa.meta_path(root / "asks" / "q.jsonl").write_text(json.dumps(meta))
    logs = run_commands(root, [
        ["eval", *TINY, *RUN, "--questions", str(root / "random.jsonl"), "--shards", str(root / "shards"), "--out",
         str(root / "out_random"), "--max-new-tokens", "3"],
        ["eval", *TINY, *RUN, "--questions", str(root / "cta.jsonl"), "--shards", str(root / "shards"), "--out",
         str(root / "out_cta"), "--max-new-tokens", "3"],
        ["eval-suite", "--suite", "ek100", "--data", str(data), "--out", str(root / "suite"), *TINY, *RUN[:4],
         "--max-new-tokens", "3", "--pool-mode", "average"],
        ["eval-suite", "--suite", "ek100", "--data", str(data), "--out", str(root / "suite"), "--table-only"],
        ["eval", *TINY, *RUN, "--questions", str(root / "asks" / "q.jsonl"), "--shards", str(root / "shards"),
         "--out", str(root / "out_asks"), "--limit", "5"],
    ])
    # pseudo prior actions from the answers of the first run
    assert main([*build, "--out", str(root / "pseudo.jsonl"), "--prior-actions", "pseudo", "--pseudo-predictions",
                 str(root / "out_random" / "predictions.jsonl")]) == 0
    return root, logs


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_reports_the_recognition_metrics(runs):
    root, _ = runs
    results = json.loads((root / "out_random" / "results.json").read_text())
    ek100 = results["ek100"]
    assert ek100["n"] == 10 and ek100["candidates_recall"] == 1.0 and "action_model" not in ek100  # random options
    # distinct options: the chosen option's action is the GT's exactly when its letter is
    assert ek100["generate"]["action_top1"] == results["modes"]["generate"]["accuracy_letter"]
    assert ek100["generate"]["verb_top1"] >= ek100["generate"]["action_top1"]
    assert "## EK100 action recognition" in (root / "out_random" / "report.md").read_text()
    (lmms,) = (root / "out_random" / "lmms_eval").glob("*/*_results.json")
    assert json.loads(lmms.read_text())["results"]["ek100_mqa"]["action_top1,none"] == pytest.approx(
        ek100["generate"]["action_top1"])


def test_pseudo_prior_actions_are_the_earlier_runs_answers(runs):
    root, _ = runs
    answers = {r["uid"]: r["generate"]["parsed"] for r in read_jsonl(root / "out_random" / "predictions.jsonl")}
    _, questions = mqa.read_question_file(root / "pseudo.jsonl")
    with_prior = [q for q in questions if q["prior_actions"]]
    assert len(with_prior) == 5
    for q in with_prior:
        p = q["prior_actions"]
        assert (p["prev2_narration"], p["prev1_narration"]) == (answers[p["prev2_id"]], answers[p["prev1_id"]])
        assert (f"{p['prev2_offset']} seconds ago, you started an action {answers[p['prev2_id']]}. "
                f"{p['prev1_offset']} seconds ago, you started an action {answers[p['prev1_id']]}. What action are you "
                "currently performing?") in q["prompt"]


def test_caption_then_answer_runs_two_passes(runs):
    root, _ = runs
    captions = {r["uid"]: r["generate"]["raw"] for r in read_jsonl(root / "out_cta" / "caption_pass" /
                                                                   "predictions.jsonl")}
    _, questions = mqa.read_question_file(root / "cta.jsonl")
    answer_pass = {q["uid"]: q for q in read_jsonl(root / "out_cta" / "caption_pass" / "answer_questions.jsonl")}
    assert len(captions) == len(answer_pass) == 10
    for q in questions:
        assert answer_pass[q["uid"]]["user_message"] == (
            f"You observed the video before and wrote down the notes: {captions[q['uid']]}. Now you watch the same "
            f"video again and you can do better. <image>\n{q['prompt']}")
    (samples,) = (root / "out_cta" / "lmms_eval").glob("*/*_samples_ek100_mqa.jsonl")
    assert all(s["input"].startswith("You observed the video before") for s in read_jsonl(samples))
    caption_inputs = read_jsonl(next((root / "out_cta" / "caption_pass" / "lmms_eval").glob("*/*_samples_*.jsonl")))
    assert {s["input"] for s in caption_inputs} == {"<image>\n" + questions[0]["caption_prompt"]}
    assert json.loads((root / "out_cta" / "results.json").read_text())["num_questions"] == 10


def test_a_question_file_sets_the_budget_and_the_pooling(runs):
    root, logs = runs
    asked = json.loads((root / "out_asks" / "results.json").read_text())
    assert asked["settings"]["max_new_tokens"] == 3 and asked["num_questions"] == 5  # no --max-new-tokens given
    assert asked["model"]["pool_mode"] == "average" and "pooling: average (the question file's" in logs
    assert json.loads((root / "out_random" / "results.json").read_text())["model"]["pool_mode"] == "bilinear"


def test_a_question_files_pooling_applies_unless_the_command_line_sets_one():
    cfg = load_preset("tiny")
    asked = mqa_eval.file_settings({"format": "llavaction_jax.benchmark", "variant_spec": {"max_new_tokens": 16},
                                    "settings": {"pool_mode": "average", "max_frames_num": 64}})
    assert asked["max_new_tokens"] == 16 and asked["pool_mode"] == "average"
    logged = []
    assert mqa_eval.with_file_pooling(cfg, asked, [], logged.append).pool_mode == "average"
    assert logged == ["[eval] pooling: average (the question file's; --config.model.pool_mode=bilinear keeps the "
                      "model's)"]
    assert mqa_eval.with_file_pooling(cfg, asked, ["--config.model.pool_mode=bilinear"]).pool_mode == "bilinear"
    assert mqa_eval.with_file_pooling(cfg, {}, []) is cfg


@pytest.mark.cli_e2e("eval", "eval-suite")
def test_suite_ek100_runs_what_is_built_and_writes_one_table(runs):
    root, logs = runs
    assert "[eval] step 1/2: 5/10 questions" in logs and ", ETA " in logs  # eval's progress, with an ETA
    table = json.loads((root / "suite" / "ek100.json").read_text())
    rows = {r["variant"]: r for r in table["rows"]}
    assert list(rows) == [r.variant for r in ROWS]
    for variant in ("ek100_mqa_tim_16f", "ek100_mqa_tim_16f_prior_oracle", "ek100_mqa_tim_16f_prior_pseudo"):
        assert rows[variant]["status"] == "ok" and rows[variant]["n"] == 10, variant
        assert 0 < rows[variant]["candidates_recall"] == 1.0
        results = json.loads((root / "suite" / variant / "results.json").read_text())
        assert results["model"]["pool_mode"] == "average"  # --pool-mode (EK100 files ask for none)
    assert rows["ek100_mqa_random_16f"]["status"] == "not run"
    assert rows["ek100_mqa_tim_16f"]["paper_llavaction_7b"] == 74.1 and "Fig. 1" in rows["ek100_mqa_tim_16f"]["source"]
    # the pseudo variant was derived from the oracle questions and the suite's own TIM answers
    answers = {r["uid"]: r["generate"]["parsed"] for r in read_jsonl(root / "suite" / "ek100_mqa_tim_16f" /
                                                                      "predictions.jsonl")}
    _, pseudo = mqa.read_question_file(root / "suite" / "ek100_mqa_tim_16f_prior_pseudo" / "questions.jsonl")
    assert all(q["prior_actions"]["prev1_narration"] == answers[q["prior_actions"]["prev1_id"]]
               for q in pseudo if q["prior_actions"])
    markdown = (root / "suite" / "ek100.md").read_text()
    assert "| EK100-MQA, TIM top-5, 16 frames | 10 |" in markdown and "| 74.1 | paper Fig. 1" in markdown
