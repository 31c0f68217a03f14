"""build-train: upstream-layout EK100 files, the data YAML and clips.jsonl from annotation CSVs and AVION / TIM
prediction files; then the whole path a user takes: extract-frames on a real MP4 (PyAV) from clips.jsonl, and a
few training steps on the YAML with prior-action prompts."""

import ast
import itertools
import json
import re

import numpy as np
import pytest
from _cli_e2e import run_cli
from _video_fixtures import known_frames, write_mp4
from test_ek100 import FAKE_TRAIN, write_fake_annotations
from test_upstream_train_files import upstream_files

from _train_fixtures import tiny_train_config
from llavaction_jax import cli
from llavaction_jax.data.mixture import load_mixture
from llavaction_jax.data.tokenizer import load_qwen_tokenizer, train_chatml_tokenizer
from llavaction_jax.data.train_sample import clip_uid
from llavaction_jax.ek100 import labels
from llavaction_jax.recipes import model_config
from llavaction_jax.train.loop import make_data, train

FILES = ["avion_mc_top5_GT_random_narration/train_convs_narration_actionids.jsonl",
         "tim_mc_top5_GT_random_narration/train_convs_narration_actionids.jsonl",
         "direct_narration_GT_random_narration/train_convs_narration_actionids.jsonl", "temporal_detection.jsonl"]


def write_predictions(path, annotations, shift):
    """{"<row>": {"predictions": [...], "target": "v:n"}}: 10 ranked actions (GT at rank ``shift``)."""
    maps = labels.load_label_maps(annotations)
    segments = labels.read_annotation_csv(annotations / labels.TRAIN_CSV)
    entries = {}
    for s in segments:
        others = [vn for vn in maps.actions if vn != s.vn][:9]
        entries[str(s.row_index)] = {"predictions": others[:shift] + [s.vn] + others[shift:], "target": s.vn}
    path.write_text(json.dumps(entries))
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("build_train")
    annotations = write_fake_annotations(root / "ann")
    avion = write_predictions(root / "avion_pred_ids_train.json", annotations, 0)
    tim = write_predictions(root / "tim_pred_ids_train_cross.json", annotations, 3)
    out = root / "train_data"
    argv = ["build-train", "--annotations", str(annotations), "--out", str(out), "--avion", str(avion), "--tim",
            str(tim), "--layout", "whole", "--num-frames", "2"]
    return root, annotations, out, argv


@pytest.mark.cli_e2e("build-train")
def test_files_yaml_and_clips(built, capsys):
    root, annotations, out, argv = built
    assert run_cli(argv) == 0
    printed = capsys.readouterr().out
    assert "--num-frames 2" in printed and f"--config.data.samples={out / 'data.yaml'}" in printed
    samples = load_mixture(out / "data.yaml")
    n = len(FAKE_TRAIN)
    assert [s["_source"].rsplit(":", 1)[0] for s in samples[::n]] == [str(out / f) for f in FILES]
    assert [s["question_type"] for s in samples[::n]] == ["mc_GT_random_narration"] * 2 + ["direct_narration",
                                                                                           "temporal_detection"]
    avion, tim = samples[:n], samples[n:2 * n]
    for a, t in zip(avion, tim):
        assert a["video"] == t["video"] and a["start_timestamp"] == t["start_timestamp"]
        assert len(ast.literal_eval(a["conversations"][0]["value"])) == 5
    assert any(a["conversations"] != t["conversations"] for a, t in zip(avion, tim))
    clips = [json.loads(line) for line in (out / "clips.jsonl").read_text().splitlines()]
    assert {c["uid"] for c in clips} == {clip_uid(s) for s in samples}  # every sample finds its clip
    assert len(clips) == 2 * n  # the segments (by narration id) and the detection windows
    assert all(c["video"] == "P90/videos/P90_01.MP4" for c in clips)
    # nothing a user wrote is overwritten
    assert cli.main(argv) == 2
    assert "is not empty; choose another --out or pass --overwrite" in capsys.readouterr().err
    # action ids index the train CSV's label space: without it, a one-line refusal naming the file
    (root / "no_train").mkdir()
    for name in ("EPIC_100_verb_classes.csv", "EPIC_100_noun_classes_v2.csv", "EPIC_100_validation.csv"):
        (root / "no_train" / name).write_bytes((annotations / name).read_bytes())
    assert cli.main(["build-train", "--annotations", str(root / "no_train"), "--out", str(root / "o2")]) == 2
    assert "EPIC_100_train.csv not found" in capsys.readouterr().err


def test_clips_for_upstreams_released_files(tmp_path, capsys):
    mix = upstream_files(tmp_path)
    assert cli.main(["build-train", "--clips-for", str(mix), "--out", str(tmp_path / "c")]) == 0
    assert "--sampling llava-video --frames-upbound 64" in capsys.readouterr().out
    [video] = [json.loads(line) for line in (tmp_path / "c" / "clips_llava_video.jsonl").read_text().splitlines()]
    assert video == {"uid": "liwei_youtube_videos/videos/ytb_7nRmsEw7nsE.mp4",
                     "video": "0_30_s_youtube_v0_1/liwei_youtube_videos/videos/ytb_7nRmsEw7nsE.mp4"}
    clips = [json.loads(line) for line in (tmp_path / "c" / "clips.jsonl").read_text().splitlines()]
    ek100_samples = [s for s in load_mixture(mix) if "question_type" in s]
    assert [c["uid"] for c in clips] == list(dict.fromkeys(clip_uid(s) for s in ek100_samples))
    assert clips[-1] == {"uid": "P90-P90_01_2.29_7.29", "video": "P90/P90_01.MP4", "start": 2.29, "end": 7.29}
    assert cli.main(["build-train", "--clips-for", str(mix), "--out", str(tmp_path / "c")]) == 2
    assert "clips_llava_video.jsonl already exist; choose another --out" in capsys.readouterr().err


@pytest.mark.watchdog(900, devices=1)  # training: in a child process, on one device (the claim is not sharding's)
def test_extract_then_train_on_the_yaml_with_prior_actions(built, tmp_path):
    root, annotations, out, argv = built
    if not (out / "data.yaml").exists():
        assert cli.main(argv) == 0
    fps = 10
    write_mp4(tmp_path / "videos" / "P90" / "videos" / "P90_01.MP4", known_frames(0, 33 * fps, 64, 64), fps=fps)
    shards = tmp_path / "shards"
    assert cli.main(["extract-frames", "--jsonl", str(out / "clips.jsonl"), "--sampling", "ek100", "--layout",
                     "whole", "--num-frames", "2", "--video-root", str(tmp_path / "videos"), "--out", str(shards),
                     "--frame-size", "64", "--codec", "png", "--workers", "1"]) == 0
    samples = load_mixture(out / "data.yaml")
    texts = [t["value"] for s in samples for t in s["conversations"]] + ["You are a helpful assistant. seconds ago"]
    train_chatml_tokenizer(texts * 2, vocab_size=500, out_dir=tmp_path / "tokenizer")
    cfg = tiny_train_config(tmp_path, tmp_path / "run", steps=3, **{
        "data.samples": out / "data.yaml", "data.shards": shards, "data.tokenizer": tmp_path / "tokenizer",
        "data.max_length": 512, "data.length_buckets": (512,), "data.learn_neighbor_actions": "prior",
        "data.ek100_annotations": annotations, "mesh.fsdp": -1, "mesh.tensor": 1})
    summary = train(cfg)
    assert summary["stopped"] == "completed" and summary["step"] == 3
    assert all(np.isfinite(summary["losses"]))

    # The prompts the run's own data pipeline builds (make_data, as train() calls it), over 4 epochs: upstream's
    # coin (p = 0.3, redrawn each epoch, keyed by the sample's file:line, so by this test's tmp path) turns some MC
    # prompts into the prior-actions variant, which names the two segments before the clip in the train CSV (both
    # gaps at most 3 s) with their start offsets. 16 of the 24 MC samples have such predecessors.
    data, n_samples = make_data(cfg, model_config(cfg), cfg.train.batch_size)
    tokenizer = load_qwen_tokenizer(tmp_path / "tokenizer")
    batches = itertools.islice(iter(data), 4 * n_samples // cfg.train.batch_size)
    texts = [tokenizer.decode([int(i) for i in row if i >= 0]) for batch in batches for row in batch["input_ids"]]
    mc = [t for t in texts if "Here are the options of actions you" in t]
    named = [re.findall(r"(\S+) seconds ago, you started an action ([^.]+)\. ", t) for t in mc]
    named = [n for n in named if n]
    assert len(mc) == 4 * 24 and 0.05 < len(named) / len(mc) < 0.5, (len(named), len(mc))  # expected 0.2
    ordered = sorted(FAKE_TRAIN, key=lambda row: row[1])  # upstream's lookup: a video's segments by end time
    expected = [[(str(round(cur[0] - p2[0], 2)), p2[2]), (str(round(cur[0] - p1[0], 2)), p1[2])]
                for p2, p1, cur in zip(ordered, ordered[1:], ordered[2:]) if max(p1[0] - p2[1], cur[0] - p1[1]) <= 3]
    assert all(n in expected for n in named), named
