"""Frame sampling rules (sampling.py) and the extract-frames command on real MP4s (extract.py)."""

import json
import pathlib

import numpy as np
import pytest

from _cli_e2e import run_cli
from _video_fixtures import decode_all_pyav, known_frames, write_mp4
from llavaction_jax import cli
from llavaction_jax.data import extract, sampling
from llavaction_jax.data.frames import FrameShards, decode_frames
from llavaction_jax.data.image import preprocess_frames, resize_frames

CSV_HEADER = "narration_id,participant_id,video_id,narration_timestamp,start_timestamp,stop_timestamp,start_frame," \
             "stop_frame,narration,verb,verb_class,noun,noun_class,all_nouns,all_noun_classes\n"


def csv_row(uid, pid, vid, start, stop):
    return f"{uid},{pid},{vid},{start},{start},{stop},0,0,open door,open,3,door,8,['door'],[8]\n"


# ---------------------------------------------------------------------------------------------- sampling rules
def test_ek100_frame_ids_worked_examples():
    # upstream llavaction/action/utils.py: get_frame_ids, worked example P28-P28_15 50.66-51.69 s, 30 fps, 16 frames.
    assert sampling.ek100_frame_ids(50.66, 51.69, 30, 16).tolist() == list(range(1520, 1551, 2))
    # get_frame_ids, worked example 3.00-4.00 s, 30 fps, 16 frames.
    assert sampling.ek100_frame_ids(3.0, 4.0, 30, 16).tolist() == [
        90, 92, 94, 96, 98, 100, 102, 104, 105, 107, 109, 111, 113, 115, 117, 119]
    with pytest.raises(ValueError, match="ends before it starts"):
        sampling.ek100_frame_ids(2.0, 1.0, 30, 4)


def test_jitter_stays_within_segments_and_is_seeded():
    plain = sampling.segment_midpoint_frame_ids(0, 160, 16)
    a = sampling.segment_midpoint_frame_ids(0, 160, 16, jitter=True, rng=np.random.default_rng(1))
    b = sampling.segment_midpoint_frame_ids(0, 160, 16, jitter=True, rng=np.random.default_rng(1))
    assert a.tolist() == b.tolist() and a.tolist() != plain.tolist()
    assert np.all(np.abs(a - (np.arange(16) * 10 + 5)) <= 5)  # shift < half a segment of (160-1)/16


def test_chunked_clip_splits_over_chunks_and_clamps_to_last_chunk():
    # Chunk files of 2 s at 30 fps: 0.MP4 and 2.MP4 full (60 frames), 4.MP4 short (20 frames), 6.MP4 absent.
    chunk_frames = {0: 60, 2: 60, 4: 20}
    across = sampling.chunked_clip(1.5, 2.5, 30, 8, chunk_frames.get, chunk_len=2)
    assert across.frame_ids == (46, 50, 54, 58, 61, 65, 69, 73)
    assert [(r.chunk_start, r.frame_ids) for r in across.reads] == [(0, (46, 50, 54, 58)), (2, (1, 5, 9, 13))]
    past_end = sampling.chunked_clip(4.2, 7.0, 30, 8, chunk_frames.get, chunk_len=2)
    assert past_end.end_sec == pytest.approx(4 + 19 / 30)  # chunk 6 missing: clamped to chunk 4's last frame
    assert past_end.frame_ids == (126, 128, 130, 131, 133, 134, 136, 138)
    assert [r.chunk_start for r in past_end.reads] == [4]
    with pytest.raises(FileNotFoundError, match="no chunk file"):
        sampling.chunked_clip(8.1, 9.0, 30, 4, chunk_frames.get, chunk_len=2)


def test_llava_video_rule():
    assert sampling.llava_video_frame_ids(0, 90, 30.0).tolist() == [0, 30, 60]  # ~1 fps
    assert sampling.llava_video_frame_ids(0, 300, 29.97, frames_upbound=4).tolist() == [0, 99, 199, 299]
    assert sampling.llava_video_frame_ids(0, 90, 30.0, frames_upbound=4, force_sample=True).tolist() == [0, 29, 59, 89]
    assert sampling.llava_video_frame_ids(0, 90, 30.0, video_fps=2).tolist() == [0, 15, 30, 45, 60, 75]
    assert len(sampling.llava_video_frame_ids(0, 9000, 30.0, frames_upbound=0)) == 300  # no cap


# ---------------------------------------------------------------------------------------------- extraction
@pytest.fixture(scope="module")
def ek100_whole(tmp_path_factory):
    """P01_01: 90 frames, P01_02: 60 frames, P01_03: garbage bytes, P01_04: no file."""
    root = tmp_path_factory.mktemp("whole")
    write_mp4(root / "P01" / "videos" / "P01_01.MP4", known_frames(0, 90))
    write_mp4(root / "P01" / "videos" / "P01_02.MP4", known_frames(200, 60))
    (root / "P01" / "videos" / "P01_03.MP4").write_bytes(b"this is not an mp4 file" * 100)
    csv = root / "ann.csv"
    csv.write_text(CSV_HEADER + csv_row("P01_01_0", "P01", "P01_01", "00:00:00.50", "00:00:01.20")
                   + csv_row("P01_01_1", "P01", "P01_01", "00:00:02.00", "00:00:03.50")
                   + csv_row("P01_02_0", "P01", "P01_02", "00:00:00.10", "00:00:01.90")
                   + csv_row("P01_03_0", "P01", "P01_03", "00:00:00.00", "00:00:01.00")
                   + csv_row("P01_04_0", "P01", "P01_04", "00:00:00.00", "00:00:01.00"))
    return root, csv


def whole_args(root, csv, out, *extra):
    return ["extract-frames", "--ek100-csv", str(csv), "--video-root", str(root), "--out", str(out), "--codec", "png",
            "--frame-size", "32", "--num-frames", "8", "--workers", "1", "--clips-per-shard", "1", *extra]


def test_without_decord_auto_decodes_with_pyav(ek100_whole, monkeypatch):
    # decord is only installed where it has wheels (pyproject.toml); elsewhere "auto" must still work.
    import sys

    from llavaction_jax.data import video

    monkeypatch.setitem(sys.modules, "decord", None)  # `import decord` raises ImportError
    root, _ = ek100_whole
    path = str(root / "P01" / "videos" / "P01_01.MP4")
    frames = video.VideoCache("auto").read(path, [0, 45, 89])
    np.testing.assert_array_equal(frames, decode_all_pyav(path)[[0, 45, 89]])
    with pytest.raises(RuntimeError, match="decord: ModuleNotFoundError"):
        video.VideoCache("decord").open(path)


def test_progress_is_printed_while_a_long_shard_is_written(ek100_whole, tmp_path, capsys, monkeypatch):
    # One shard holds all five clips; progress lines must not wait for it (at least every PROGRESS_EVERY_S).
    monkeypatch.setattr(extract, "PROGRESS_EVERY_S", 0.001)
    root, csv = ek100_whole
    assert cli.main(whole_args(root, csv, tmp_path / "one", "--clips-per-shard", "256")) == 3
    lines = [line for line in capsys.readouterr().err.splitlines() if "clips/s" in line]
    during = [line for line in lines if "shards 0/1" in line]
    assert during and all("written" in line and "clips/s" in line for line in during), lines
    assert "shards 1/1  clips 5/5 (3 written, 2 failed)" in lines[-1]


def test_ek100_whole_videos_end_to_end_resume_and_failures(ek100_whole, tmp_path, capsys):
    root, csv = ek100_whole
    out = tmp_path / "shards"
    assert cli.main(whole_args(root, csv, out)) == 3  # some clips failed
    assert "2 clips FAILED" in capsys.readouterr().out

    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert sorted(f["uid"] for f in failures) == ["P01_03_0", "P01_04_0"]
    assert "cannot open video" in failures[0]["error"] and "P01_03.MP4" in failures[0]["error"]
    assert "does not exist" in failures[1]["error"]

    shards = FrameShards(out)
    assert sorted(shards.uids) == ["P01_01_0", "P01_01_1", "P01_02_0"]
    assert shards.manifest["num_failed_clips"] == 2 and shards.manifest["frames_per_clip"] == 8
    expected_ids = {  # midpoint rule by hand; P01_01_1 ends past the video and is clamped to frame 89
        "P01_01_0": [16, 18, 21, 24, 26, 29, 32, 34],
        "P01_01_1": [61, 65, 69, 72, 76, 79, 83, 87],
        "P01_02_0": [6, 13, 19, 26, 33, 40, 46, 53],
    }
    for uid, ids in expected_ids.items():
        record = shards.lookup(uid)
        assert list(record.frame_indices) == ids
        video = root / "P01" / "videos" / f"{record.video_id.split('-')[1]}.MP4"
        direct = decode_all_pyav(video)[ids]
        stored = decode_frames(record)
        np.testing.assert_array_equal(stored, resize_frames(direct, 32))  # PNG: lossless
        np.testing.assert_array_equal(  # and the model input equals upstream's processing of the direct frames
            preprocess_frames(stored, 32), preprocess_frames(direct, 32))
        first = 200 if uid.startswith("P01_02") else 0
        # Flat red level 5*k identifies the frame number k (YUV round trip moves it by at most 3).
        assert np.all(np.abs(stored[:, 16, 16, 0].astype(int) - [(5 * (first + i)) % 250 for i in ids]) <= 3)
    assert shards.lookup("P01_01_0").duration_sec == pytest.approx(0.7)
    assert shards.lookup("P01_01_1").duration_sec == pytest.approx(1.5)  # requested, not clamped (upstream)
    assert shards.lookup("P01_01_0").extra == {"narration": "open door", "verb": "open", "noun": "door",
                                               "verb_class": 3, "noun_class": 8}

    # Resume: complete shards are not rewritten, the two whose clips failed are retried; after losing one shard's
    # sidecar that shard is redone too.
    shard_files = sorted(out.glob("shard-*.array_record"))
    assert len(shard_files) == 4  # one per video (P01_01's two clips share one)
    mtimes = {p.name: p.stat().st_mtime_ns for p in shard_files}
    assert cli.main(whole_args(root, csv, out)) == 3
    assert "2 shards already done, 2 to write with 1 worker(s) (2 retrying failed clips)" in capsys.readouterr().err
    good = [p.name for p in shard_files[:2]]
    assert {n: (out / n).stat().st_mtime_ns for n in good} == {n: mtimes[n] for n in good}
    redo = shard_files[1]
    redo.with_name(redo.name + ".done.json").unlink()
    assert cli.main(whole_args(root, csv, out)) == 3
    assert "1 shards already done, 3 to write" in capsys.readouterr().err
    assert (out / good[0]).stat().st_mtime_ns == mtimes[good[0]] and redo.stat().st_mtime_ns != mtimes[redo.name]
    assert len(FrameShards(out)) == 3

    # Other settings into the same directory are refused instead of mixing two extractions.
    assert cli.main(whole_args(root, csv, out, "--num-frames", "4")) == 2
    assert "holds an extraction with other inputs or settings" in capsys.readouterr().err

    # A truncated shard is reported by name when the directory is opened.
    redo.write_bytes(redo.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"frame shard {redo} is 1000 bytes"):
        FrameShards(out)


@pytest.mark.cli_e2e("extract-frames")
def test_a_rerun_retries_failed_clips_once_the_videos_are_fixed(tmp_path, capsys):
    root = tmp_path / "videos"
    write_mp4(root / "P01" / "videos" / "P01_01.MP4", known_frames(0, 60))
    csv = root / "ann.csv"
    csv.write_text(CSV_HEADER + csv_row("P01_01_0", "P01", "P01_01", "00:00:00.50", "00:00:01.20")
                   + csv_row("P01_02_0", "P01", "P01_02", "00:00:00.10", "00:00:01.00"))
    out = tmp_path / "shards"
    assert cli.main(whole_args(root, csv, out)) == 3
    assert sorted(FrameShards(out).uids) == ["P01_01_0"]
    good = sorted(out.glob("shard-*.array_record"))[0]
    mtime = good.stat().st_mtime_ns
    write_mp4(root / "P01" / "videos" / "P01_02.MP4", known_frames(100, 40))  # the missing video arrives
    capsys.readouterr()
    assert run_cli(whole_args(root, csv, out)) == 0
    err = capsys.readouterr().err
    assert "1 shards already done, 1 to write with 1 worker(s) (1 retrying failed clips)" in err
    assert "clips 1/1 (1 written, 0 failed)" in err and "ETA 0:00" in err  # progress with an ETA
    shards = FrameShards(out)
    assert sorted(shards.uids) == ["P01_01_0", "P01_02_0"] and shards.manifest["num_failed_clips"] == 0
    assert (out / "failures.jsonl").read_text() == "" and good.stat().st_mtime_ns == mtime


def test_fps_read_from_video_with_decord_forced(ek100_whole, tmp_path):
    root, csv = ek100_whole
    out = tmp_path / "shards"
    assert cli.main(whole_args(root, csv, out, "--fps", "video", "--decoder", "decord", "--limit", "1")) == 0
    record = FrameShards(out).lookup("P01_01_0")
    assert record.fps == 30.0 and list(record.frame_indices) == [16, 18, 21, 24, 26, 29, 32, 34]
    np.testing.assert_array_equal(decode_frames(record),
                                  resize_frames(decode_all_pyav(root / "P01" / "videos" / "P01_01.MP4")[
                                      list(record.frame_indices)], 32))


def test_ek100_chunked_layout_with_two_workers(tmp_path):
    root, out = tmp_path / "chunks", tmp_path / "shards"
    video = known_frames(0, 140)  # 2-second chunks at 30 fps: 0.MP4 [0, 60), 2.MP4 [60, 120), 4.MP4 [120, 140)
    for start in (0, 2, 4):
        write_mp4(root / "P02" / "P02_01.MP4" / f"{start}.MP4", video[start * 30: start * 30 + 60])
    write_mp4(root / "P02" / "P02_02.MP4" / "0.MP4", known_frames(300, 40))
    csv = tmp_path / "ann.csv"
    csv.write_text(CSV_HEADER + csv_row("a", "P02", "P02_01", "00:00:01.50", "00:00:02.50")
                   + csv_row("b", "P02", "P02_01", "00:00:04.20", "00:00:07.00")
                   + csv_row("c", "P02", "P02_02", "00:00:00.20", "00:00:01.00"))
    rc = cli.main(["extract-frames", "--ek100-csv", str(csv), "--video-root", str(root), "--out", str(out),
                   "--layout", "chunked", "--chunk-len", "2", "--num-frames", "8", "--frame-size", "0",
                   "--codec", "png", "--workers", "2", "--clips-per-shard", "1"])
    assert rc == 0
    shards = FrameShards(out)
    assert len(shards.paths) == 2 and sorted(shards.uids) == ["a", "b", "c"]
    decoded = np.concatenate([decode_all_pyav(root / "P02" / "P02_01.MP4" / f"{s}.MP4") for s in (0, 2, 4)])
    for uid, ids in {"a": [46, 50, 54, 58, 61, 65, 69, 73], "b": [126, 128, 130, 131, 133, 134, 136, 138]}.items():
        record = shards.lookup(uid)
        assert list(record.frame_indices) == ids
        np.testing.assert_array_equal(decode_frames(record), decoded[ids])  # source size, lossless
    c = shards.lookup("c")
    np.testing.assert_array_equal(decode_frames(c), decode_all_pyav(root / "P02" / "P02_02.MP4" / "0.MP4")[
        list(c.frame_indices)])


def test_jsonl_llava_video_rule_pyav_decoder_jpeg(tmp_path, capsys):
    root, out = tmp_path / "videos", tmp_path / "shards"
    write_mp4(root / "a.mp4", known_frames(0, 90))
    jsonl = tmp_path / "clips.jsonl"
    lines = [{"video": "a.mp4"}, {"video": "a.mp4", "start": 1.0, "end": 2.5, "uid": "seg", "question": "q?"},
             {"video": "a.mp4"}]  # the repeated whole-video clip is extracted once
    jsonl.write_text("".join(json.dumps(line) + "\n" for line in lines))
    rc = cli.main(["extract-frames", "--jsonl", str(jsonl), "--video-root", str(root), "--out", str(out),
                   "--frames-upbound", "2", "--decoder", "pyav", "--frame-size", "0", "--workers", "1"])
    assert rc == 0 and "no failures" in capsys.readouterr().out
    shards = FrameShards(out)
    assert sorted(shards.uids) == ["a.mp4", "seg"] and shards.manifest["frames_per_clip"] is None
    whole, seg = shards.lookup("a.mp4"), shards.lookup("seg")
    assert list(whole.frame_indices) == [0, 89]  # 3 one-per-second frames > upbound 2: linspace(0, 89, 2)
    assert list(seg.frame_indices) == [30, 60]  # frames [30, 75) every 30th
    assert whole.duration_sec == pytest.approx(3.0) and seg.extra == {"question": "q?"}
    direct = decode_all_pyav(root / "a.mp4")
    for record in (whole, seg):
        error = np.abs(decode_frames(record).astype(int) - direct[list(record.frame_indices)])
        # JPEG at the default quality 95 with 4:4:4 chroma: measured max error 2 levels, mean 0.4 on these frames
        # (quality 75 already gives max 8, so this bound also checks the default quality is applied).
        assert error.mean() < 0.6 and error.max() <= 4


def test_reads_real_ek100_validation_csv_and_plans_whole_video_shards(ek100_dir):
    clips = extract.read_ek100_csv(str(ek100_dir / "EPIC_100_validation.csv"), "/videos", "chunked")
    assert len(clips) == 9668 and len({c.uid for c in clips}) == 9668  # row count asserted upstream too
    first = next(c for c in clips if c.uid == "P01_11_0")
    assert (first.video_id, first.path, first.start_sec) == ("P01-P01_11", "/videos/P01/P01_11.MP4", 0.0)
    assert first.end_sec == pytest.approx(1.89) and first.extra["narration"] == "take plate"
    shards = extract.plan_shards(clips, 256)
    assert sum(map(len, shards)) == 9668
    video_to_shard = {}
    for i, shard in enumerate(shards):
        for clip in shard:
            assert video_to_shard.setdefault(clip.path, i) == i  # a video never spans two shards


def test_bad_inputs_exit_2_with_a_message(tmp_path, capsys):
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"video": "a.mp4", "uid": "x"}\n{"video": "b.mp4", "uid": "x"}\n')
    assert cli.main(["extract-frames", "--jsonl", str(jsonl), "--video-root", str(tmp_path), "--out",
                     str(tmp_path / "o")]) == 2
    assert f"{jsonl}:2: uid 'x' already used on line 1" in capsys.readouterr().err
    assert cli.main(["extract-frames", "--jsonl", str(jsonl), "--video-root", ".", "--out", str(tmp_path / "o"),
                     "--layout", "chunked"]) == 2
    assert "--layout chunked needs the ek100 sampling rule" in capsys.readouterr().err


def test_help_explains_the_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["extract-frames", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for phrase in ("--ek100-csv", "{pid}/videos/{vid}.MP4", "{chunk_start}.MP4", "--jsonl", "llava-video",
                   "get_frame_ids", "--frame-size", "--decoder", "--workers", "resumes", "failures.jsonl",
                   "Exit status"):
        assert phrase in text, phrase


def test_original_50_fps_videos_use_their_own_rate_and_a_disagreeing_fps_warns(tmp_path, capsys):
    """Original EK100 videos run at 50 / 59.94 fps: 1.00-2.00 s is frames 50..100 at 50 fps, not 30..60."""
    root = tmp_path / "videos"
    write_mp4(root / "P02" / "videos" / "P02_01.MP4", known_frames(0, 150), fps=50)
    write_mp4(root / "P02" / "videos" / "P02_02.MP4", known_frames(0, 150), fps=50)
    csv = root / "ann.csv"
    csv.write_text(CSV_HEADER + csv_row("P02_01_0", "P02", "P02_01", "00:00:01.00", "00:00:02.00")
                   + csv_row("P02_02_0", "P02", "P02_02", "00:00:01.00", "00:00:02.00"))
    expected = sampling.whole_video_frame_ids(1.0, 2.0, 50.0, 8, 150).tolist()
    assert min(expected) >= 50 and max(expected) < 100
    for extra, warned in (((), False), (("--fps", "30"), True), (("--fps", "50"), False)):
        out = tmp_path / f"shards{len(extra)}{warned}"
        assert cli.main(whole_args(root, csv, out, *extra)) == 0
        err = capsys.readouterr().err
        shards = FrameShards(out)
        for uid, video in (("P02_01_0", "P02_01.MP4"), ("P02_02_0", "P02_02.MP4")):
            record = shards.lookup(uid)
            assert record.fps == 50.0 and list(record.frame_indices) == expected
            stored = decode_frames(record)
            assert np.all(np.abs(stored[:, 16, 16, 0].astype(int) - [(5 * i) % 250 for i in expected]) <= 3)
            # the blue bar's width tells frames 50..99 (8 px, 4 after the 2x resize) from 0..49 (4 px)
            assert np.all(stored[:, 16, 3, 2] > 200) and np.all(stored[:, 16, 5, 2] < 50)
            assert (f"{video} runs at 50 fps, not --fps 30" in err) == warned
        mismatches = shards.manifest.get("fps_mismatches", {})
        assert sorted(pathlib.Path(p).name for p in mismatches) == (["P02_01.MP4", "P02_02.MP4"] if warned else [])
        assert all(rate == 50.0 for rate in mismatches.values())
