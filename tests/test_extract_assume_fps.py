"""``extract-frames --assume-fps 30``: upstream's EK100 training loader numbers frames at 30 fps whatever the chunks'
rate (llavaction/train/train.py calls avion_video_loader with its default fps=30, upstream @bd9f465); the
default keeps each video's own rate. Either way a video whose container disagrees is listed in the manifest."""

import pathlib

import numpy as np
from _video_fixtures import known_frames, write_mp4
from test_extract import CSV_HEADER, csv_row, whole_args

from llavaction_jax import cli
from llavaction_jax.data import sampling
from llavaction_jax.data.frames import FrameShards


def test_assume_fps_numbers_frames_as_upstreams_training_loader(tmp_path, capsys):
    root = tmp_path / "videos"
    write_mp4(root / "P02" / "videos" / "P02_01.MP4", known_frames(0, 150), fps=50)
    csv = root / "ann.csv"
    csv.write_text(CSV_HEADER + csv_row("P02_01_0", "P02", "P02_01", "00:00:01.00", "00:00:02.00"))
    for extra, rate in (((), 50.0), (("--assume-fps", "30"), 30.0)):
        out = tmp_path / f"shards{rate:g}"
        assert cli.main(whole_args(root, csv, out, *extra)) == 0
        shards = FrameShards(out)
        record = shards.lookup("P02_01_0")
        expected = sampling.whole_video_frame_ids(1.0, 2.0, rate, 8, 150).tolist()
        assert record.fps == rate and list(record.frame_indices) == expected
        mismatches = {pathlib.Path(p).name: r for p, r in shards.manifest.get("fps_mismatches", {}).items()}
        assert mismatches == ({"P02_01.MP4": 50.0} if extra else {})
        assert ("P02_01.MP4 runs at 50 fps; its frame numbers assume 30" in capsys.readouterr().err) == bool(extra)
    # 1.00-2.00 s at an assumed 30 fps is frames 30..60 of the 50 fps file: other frames than its own rate's
    assert np.all(np.asarray(FrameShards(tmp_path / "shards30").lookup("P02_01_0").frame_indices) < 60)
    assert cli.main(whole_args(root, csv, tmp_path / "bad", "--assume-fps", "30", "--sampling", "llava-video")) == 2
    assert "--assume-fps goes with the ek100 sampling rule" in capsys.readouterr().err
