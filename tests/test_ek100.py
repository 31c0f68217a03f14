"""EK100 annotations: CSV loading, label maps, lexicographic action ids, representations, prediction files.

``write_fake_annotations`` (used by test_mqa / test_ek100_train too) writes a small annotation folder with invented
rows in the EK100 layout; the real CSVs are only read, through the ``ek100_dir`` fixture.
"""

import csv
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from llavaction_jax.ek100 import labels

HEADER = ["narration_id", "participant_id", "video_id", "narration_timestamp", "start_timestamp", "stop_timestamp",
          "start_frame", "stop_frame", "narration", "verb", "verb_class", "noun", "noun_class", "all_nouns",
          "all_noun_classes"]
VERBS = {0: "take", 1: "put", 2: "open", 3: "close", 4: "wash", 5: "turn-on", 10: "cut"}
NOUNS = {0: "tap", 1: "door", 2: "cup", 3: "pan:frying", 4: "hands", 5: "cupboard", 10: "knife"}
# (start s, stop s, narration, verb, verb class, noun, noun class); invented, not EK100 rows.
FAKE_TRAIN = [
    (0.5, 1.5, "take cup", "take", 0, "cup", 2), (2.0, 3.0, "pick up cup", "take", 0, "cup", 2),
    (3.5, 4.2, "open door", "open", 2, "door", 1), (4.5, 6.0, "close door", "close", 3, "door", 1),
    (7.0, 8.0, "put down", "put", 1, "cup", 2), (8.5, 9.5, "put down", "put", 1, "knife", 10),
    (20.0, 21.0, "wash hands", "wash", 4, "hands", 4), (21.5, 22.5, "turn on tap", "turn-on", 5, "tap", 0),
    (23.0, 24.0, "cut with knife", "cut", 10, "knife", 10), (24.5, 25.0, "take frying pan", "take", 0, "pan:frying", 3),
    (25.5, 26.0, "take cup", "take", 0, "cup", 2), (26.5, 27.0, "open cupboard", "open", 2, "cupboard", 5),
]
FAKE_VALIDATION = [
    (0.0, 1.03, "open door", "open", 2, "door", 1), (1.2, 2.0, "close the door", "close", 3, "door", 1),
    (2.5, 3.1, "grab cup", "take", 0, "cup", 2), (3.3, 4.0, "wash hands", "wash", 4, "hands", 4),
    (4.1, 5.5, "open cupboard", "open", 2, "cupboard", 5), (6.0, 7.25, "put down", "put", 1, "pan:frying", 3),
    (7.5, 8.0, "turn on tap", "turn-on", 5, "tap", 0), (9.0, 10.0, "cut onion", "cut", 10, "cup", 2),
    (3725.0, 3726.5, "close cupboard", "close", 3, "cupboard", 5), (12.0, 13.0, "take knife", "take", 0, "knife", 10),
]


def timestamp(seconds: float) -> str:
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{int(hours):02d}:{int(minutes):02d}:{secs:05.2f}"


def write_annotation_csv(path, rows, participant="P90", video="P90_01"):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(HEADER)
        for i, (start, stop, narration, verb, verb_class, noun, noun_class) in enumerate(rows):
            writer.writerow([f"{video}_{i}", participant, video, timestamp(start), timestamp(start), timestamp(stop),
                             int(start * 50) + 1, int(stop * 50), narration, verb, verb_class, noun, noun_class,
                             [noun], [noun_class]])


def write_fake_annotations(folder, train_rows=FAKE_TRAIN, validation_rows=FAKE_VALIDATION):
    """A fake annotation folder: class CSVs, EPIC_100_train.csv, EPIC_100_validation.csv."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, classes in (("EPIC_100_verb_classes.csv", VERBS), ("EPIC_100_noun_classes_v2.csv", NOUNS)):
        with open(folder / name, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "key", "instances", "category"])
            for class_id, key in classes.items():
                writer.writerow([class_id, key, [key], "fake"])
    write_annotation_csv(folder / "EPIC_100_train.csv", train_rows, "P90", "P90_01")
    write_annotation_csv(folder / "EPIC_100_validation.csv", validation_rows, "P91", "P91_01")
    return folder


@pytest.fixture
def fake_dir(tmp_path):
    return write_fake_annotations(tmp_path / "ann")


def test_datetime2sec():
    assert labels.datetime2sec("00:00:01.89") == 1.89
    assert labels.datetime2sec("01:02:05.50") == 3725.5


def test_action_ids_are_lexicographic_over_strings():
    # Upstream sorts the "v:n" strings with Python's sorted(): character codes, and ':' (58) sorts after the digits
    # (48-57). So "0:10" < "0:2" (numeric order would say the opposite) and "10:1" < "1:0". A chain
    # "0:2" < "1:0" < "10:1" gets the last pair wrong (docs/ek100.md); the released action heads follow sorted().
    ids = labels.action_ids_in_lexicographic_order(["10:1", "1:0", "0:2", "0:10", "0:2", "2:0"])
    assert ids == {"0:10": 0, "0:2": 1, "10:1": 2, "1:0": 3, "2:0": 4}


def test_read_annotation_csv(fake_dir):
    segments = labels.read_annotation_csv(fake_dir / "EPIC_100_validation.csv")
    assert len(segments) == len(FAKE_VALIDATION)
    first, late = segments[0], segments[8]
    assert (first.row_index, first.narration_id, first.video, first.vn) == (0, "P91_01_0", "P91-P91_01", "2:1")
    assert (first.start, first.end, first.narration) == (0.0, 1.03, "open door")
    assert (late.start, late.end) == (3725.0, 3726.5)


def test_label_maps_from_train_then_validation(fake_dir):
    maps = labels.load_label_maps(fake_dir)
    assert maps.actions == sorted(maps.actions)
    assert maps.actions[:3] == ["0:10", "0:2", "0:3"]  # "0:10" sorts before "0:2"
    # string order: "0:3" < "10:10" < "10:2" < "1:10" < ... < "2:1"
    assert (maps.vn2act["0:3"], maps.vn2act["10:10"], maps.vn2act["10:2"], maps.vn2act["1:10"]) == (2, 3, 4, 5)
    assert maps.vn2act["2:1"] == 8
    # every narration, train rows first, repeats kept (frequency-weighted draws)
    assert maps.vn2narrations["0:2"] == ["take cup", "pick up cup", "take cup", "grab cup"]
    assert maps.top_narrations("0:2") == ["take cup", "pick up cup", "grab cup"]
    assert maps.key_text("0:3") == "take frying pan"  # "pan:frying" -> "frying pan"
    assert maps.key_text("5:0") == "turn-on tap"


def test_label_space_refuses_without_train_csv_unless_uda_is_asked(fake_dir):
    assert [p.name for p in labels.default_train_csvs(fake_dir)] == ["EPIC_100_train.csv"]
    # UDA stand-ins: the train rows under another name, one row moved to a file of its own
    (fake_dir / "UDA_annotations").mkdir()
    names = [pathlib.PurePath(n).name for n in labels.UDA_TRAIN_STAND_INS]
    write_annotation_csv(fake_dir / "UDA_annotations" / names[0], FAKE_TRAIN[:-1], "P90", "P90_01")
    write_annotation_csv(fake_dir / "UDA_annotations" / names[1], FAKE_TRAIN[-1:], "P90", "P90_01")
    write_annotation_csv(fake_dir / "UDA_annotations" / names[2], [], "P90", "P90_01")
    full = labels.load_label_maps(fake_dir)
    assert [p.name for p in labels.default_train_csvs(fake_dir, "uda")] == names  # asked for: used even with train
    (fake_dir / "EPIC_100_train.csv").unlink()
    for call in (lambda: labels.default_train_csvs(fake_dir), lambda: labels.load_label_maps(fake_dir)):
        with pytest.raises(labels.AnnotationError, match=r"EPIC_100_train\.csv not found.*--label-space uda") as e:
            call()
        assert "\n" not in str(e.value)
    assert labels.load_label_maps(fake_dir, label_space="uda").vn2act == full.vn2act
    (fake_dir / "UDA_annotations" / names[2]).unlink()
    with pytest.raises(labels.AnnotationError, match=names[2]):
        labels.load_label_maps(fake_dir, label_space="uda")


def test_render_action(fake_dir):
    maps = labels.load_label_maps(fake_dir)
    rng = np.random.default_rng(0)
    render = lambda vn, rep, **kw: labels.render_action(vn, rep, maps, rng, "2:1", "open the door", **kw)  # noqa
    assert render("2:1", "GT_random_narration") == "open the door"
    assert render("2:1", "official_key") == "open door"
    assert render("0:2", "official_key") == "take cup"
    assert {render("0:2", "GT_random_narration") for _ in range(50)} == {"take cup", "pick up cup", "grab cup"}
    assert render("0:2", "GT_random_narration", avoid={"take cup", "grab cup"}) == "pick up cup"
    # every narration taken -> the official key keeps the options distinct
    assert render("1:10", "GT_random_narration", avoid={"put down"}) == "put knife"
    assert render("4:10", "GT_random_narration") == "wash knife"  # pair outside the label maps
    assert render("0:2", "top1_narration") == "take cup"
    # GT_key: the keys, the GT as its own narration (upstream's parse_vn_ids)
    assert render("2:1", "GT_key") == "open the door" and render("0:2", "GT_key") == "take cup"
    # topk_narration_cut_key: key, marker, the n most frequent narrations (0:2: "take cup" twice in train, then
    # "pick up cup" (train) before "grab cup" (validation) at one each); no GT substitution
    assert render("0:2", "topk_narration_cut_key", n_narrations=2) == (
        "take cup, example usages could be, take cup, pick up cup")
    assert render("2:1", "topk_narration_cut_key", n_narrations=3) == "open door, example usages could be, open door"
    with pytest.raises(ValueError, match="n_narrations > 0"):
        render("0:2", "topk_narration_cut_key")
    with pytest.raises(ValueError, match="representation"):
        render("0:2", "GT_random_narration_cut")


def test_item_rng_depends_on_seed_and_uid_only():
    draw = lambda *a: labels.item_rng(*a).integers(1 << 30, size=4).tolist()  # noqa: E731
    assert draw(42, "P01_11_0") == draw(42, "P01_11_0")
    assert draw(42, "P01_11_0") != draw(42, "P01_11_1")
    assert draw(42, "P01_11_0") != draw(43, "P01_11_0")
    assert draw(42, "P01_11_0", "mc") != draw(42, "P01_11_0", "detection")
    # the same in a fresh interpreter with another hash seed (a Python hash() would differ)
    code = ("from llavaction_jax.ek100 import labels; "
            "print(labels.item_rng(42, 'P01_11_0').integers(1 << 30, size=4).tolist())")
    env = dict(os.environ, PYTHONHASHSEED="123")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == str(draw(42, "P01_11_0"))


def test_bad_csv_errors_name_file_line_and_column(tmp_path, fake_dir):
    bad = tmp_path / "bad.csv"
    bad.write_text("narration_id,participant_id,video_id\nx,P01,P01_01\n")
    with pytest.raises(labels.AnnotationError, match=r"bad\.csv: missing column\(s\) \['start_timestamp'"):
        labels.read_annotation_csv(bad)
    lines = (fake_dir / "EPIC_100_validation.csv").read_text().splitlines()
    lines[3] = lines[3].replace(",take,0,cup,2,", ",take,zero,cup,2,")
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(labels.AnnotationError, match=r"bad\.csv:4 \(narration_id 'P91_01_2'\): column 'verb_class'"):
        labels.read_annotation_csv(bad)
    lines = (fake_dir / "EPIC_100_validation.csv").read_text().splitlines()
    lines[2] = lines[2].replace("00:00:01.20", "1.2s")
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(labels.AnnotationError, match=r"bad\.csv:3 .*HH:MM:SS"):
        labels.read_annotation_csv(bad)
    with pytest.raises(labels.AnnotationError, match="not found"):
        labels.read_annotation_csv(tmp_path / "missing.csv")


def test_prediction_file_errors_name_file_and_key(tmp_path, fake_dir):
    path = tmp_path / "preds.json"
    for content, message in [("[1, 2]", "JSON object"), ("{oops", "not valid JSON"),
                             ('{"a": {"predictions": []}}', "entry 'a'.*row indices"),
                             ('{"0": {"target": "1:2"}}', "entry '0'.*'predictions' list"),
                             ('{"0": {"predictions": ["1-2"]}}', "entry '0'.*'1-2'")]:
        path.write_text(content)
        with pytest.raises(labels.AnnotationError, match=message):
            labels.load_predictions(path)
    path.write_text(json.dumps({"0": {"predictions": ["2:1", "03:1"], "target": "2:1"},
                                "1": {"predictions": ["0:2", "3:1"], "target": "0:2"}}))
    predictions = labels.load_predictions(path)
    assert predictions[0].predictions == ("2:1", "3:1")  # canonical "v:n"
    segments = labels.read_annotation_csv(fake_dir / "EPIC_100_validation.csv")
    assert labels.predictions_for(segments[0], predictions, str(path), 2) == ["2:1", "3:1"]
    with pytest.raises(labels.AnnotationError, match=r"entry '1' \(uid P91_01_1.*target 0:2 differs.*3:1"):
        labels.predictions_for(segments[1], predictions, str(path), 2)
    with pytest.raises(labels.AnnotationError, match=r"entry '2' \(uid P91_01_2.*no predictions"):
        labels.predictions_for(segments[2], predictions, str(path), 2)
    with pytest.raises(labels.AnnotationError, match="2 predictions, need at least 5"):
        labels.predictions_for(segments[0], predictions, str(path), 5)


def test_real_label_maps(ek100_dir):
    """The UDA stand-ins' label space; with EPIC_100_train.csv beside them, also the released one (README of
    ../shared/data: 97 verbs, 300 nouns, 3806 actions from train + validation)."""
    if (ek100_dir / labels.TRAIN_CSV).exists():
        official = labels.load_label_maps(ek100_dir)  # label space "ek100": EPIC_100_train.csv + validation
        assert len(official.vn2act) == 3806
        verbs, nouns = zip(*map(labels.split_vn, official.vn2act))
        assert (max(verbs) + 1, max(nouns) + 1) == (97, 300)  # the released verb and noun heads
        assert list(official.vn2act) == sorted(official.vn2act)
    train_csvs = labels.default_train_csvs(ek100_dir, "uda")
    maps = labels.load_label_maps(ek100_dir, train_csvs)
    # UDA labelled train rows + validation: 2,684 verb:noun pairs (docs/ek100.md)
    assert len(maps.vn2act) == 2684
    assert (len(maps.verb_keys), len(maps.noun_keys)) == (97, 305)
    assert list(maps.vn2act) == sorted(maps.vn2act)
    assert maps.vn2act["0:10"] < maps.vn2act["0:2"] < maps.vn2act["10:1"] < maps.vn2act["1:0"]
    assert maps.vn2act["0:10"] == maps.actions.index("0:10") and maps.actions[0].startswith("0:")
    assert sum(len(v) for v in maps.vn2narrations.values()) == 16115 + 5002 + 7906 + 9668
    assert all(":" not in key for key in maps.noun_keys.values())  # "a:b" keys re-ordered to "b a"
    validation = labels.read_annotation_csv(ek100_dir / labels.VALIDATION_CSV)
    assert len(validation) == 9668 and len({s.narration_id for s in validation}) == 9668
