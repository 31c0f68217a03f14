"""Upstream frame preprocessing (image.py) and the frame-shard format (frames.py)."""

import json
import pickle

import numpy as np
import pytest
from PIL import Image

from llavaction_jax.data import frames as fs
from llavaction_jax.data.image import normalize_frames, preprocess_frames, resize_frames


def random_frames(t=3, h=48, w=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def literal_upstream_pixels(frames, height, width):
    """Upstream SigLipImageProcessor.preprocess (siglip_encoder.py), written out: PIL bicubic, x*(1/255) in float64
    -> float32, (x-0.5)/0.5."""
    out = []
    for f in frames:
        x = np.asarray(Image.fromarray(f).resize((width, height), Image.BICUBIC)).astype(np.float64) * (1 / 255)
        x = x.astype(np.float32)
        out.append(((x - np.float32(0.5)) / np.float32(0.5)).transpose(2, 0, 1))
    return np.stack(out)


def test_preprocess_equals_literal_reference_bitwise():
    frames = random_frames()
    got = preprocess_frames(frames, (32, 40))
    assert got.shape == (3, 3, 32, 40) and got.dtype == np.float32
    np.testing.assert_array_equal(got, literal_upstream_pixels(frames, 32, 40))
    assert got.min() >= -1.0 and got.max() <= 1.0


def test_preprocess_equals_transformers_siglip_processor():
    # The PIL-backed HF processor runs offline from a locally built config (no torchvision, no hub access).
    transformers = pytest.importorskip("transformers")
    processor = transformers.SiglipImageProcessorPil(
        size={"height": 384, "width": 384}, resample=Image.Resampling.BICUBIC, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3,
    )
    frames = random_frames(t=2)
    want = processor(list(frames), return_tensors="np")["pixel_values"]
    got = preprocess_frames(frames)  # default 384x384 squash
    assert got.shape == want.shape == (2, 3, 384, 384)
    np.testing.assert_array_equal(got, want)


def test_resize_squashes_and_keeps_target_sized_frames():
    frames = random_frames(t=2, h=20, w=50)
    resized = resize_frames(frames, 16)
    assert resized.shape == (2, 16, 16, 3) and resized.dtype == np.uint8
    assert resize_frames(resized, 16) is resized
    # Normalizing target-sized frames equals full preprocessing: the two halves compose.
    np.testing.assert_array_equal(normalize_frames(resized), preprocess_frames(frames, 16))
    with pytest.raises(ValueError, match=r"uint8 frames of shape \(T, H, W, 3\)"):
        resize_frames(frames.astype(np.float32), 16)


def make_record(uid, t=4, codec="png", seed=0, **overrides):
    frames = random_frames(t=t, h=12, w=16, seed=seed)
    fields = dict(uid=uid, video_id="P01-P01_01", start_sec=1.5, end_sec=2.25, fps=30.0,
                  frame_indices=tuple(range(45, 45 + 2 * t, 2)), frames=fs.encode_frames(frames, codec),
                  codec=codec, duration_sec=0.75, extra={"narration": "open door"})
    fields.update(overrides)
    return fs.ClipRecord(**fields), frames


def write_shards(directory, groups, frames_per_clip):
    entries = []
    for i, records in enumerate(groups):
        writer = fs.ShardWriter(directory / f"shard-{i:05d}{fs.SHARD_SUFFIX}")
        for record in records:
            writer.write(record)
        entries.append(writer.commit())
    fs.write_manifest(directory, entries, {"codec": "png"}, frames_per_clip)
    return entries


def test_record_round_trip_png_is_lossless_and_jpeg_is_close():
    record, frames = make_record("a")
    back = fs.parse_record(fs.serialize_record(record))
    assert back == record
    np.testing.assert_array_equal(fs.decode_frames(back), frames)
    smooth = np.broadcast_to(np.linspace(0, 255, 16, dtype=np.uint8)[None, None, :, None], (1, 12, 16, 3)).copy()
    jpeg = fs.ClipRecord("j", "v", 0.0, 1.0, 30.0, (0,), fs.encode_frames(smooth, "jpeg", 95), "jpeg", 1.0)
    decoded = fs.decode_frames(fs.parse_record(fs.serialize_record(jpeg)))
    # Quality 95, 4:4:4 on a smooth ramp: JPEG error stays within a few levels.
    assert np.abs(decoded.astype(int) - smooth).max() <= 3


def test_parse_record_rejects_damage_with_location():
    record, _ = make_record("uid-7")
    data = fs.serialize_record(record)
    with pytest.raises(ValueError, match="shard-3 record 9: not a frame-shard record"):
        fs.parse_record(b"XXXX" + data[4:], "shard-3 record 9")
    with pytest.raises(ValueError, match=r"clip 'uid-7'.*frame bytes"):
        fs.parse_record(data[:-10])
    broken = record.frames[:1] + (b"\x89PNG garbage",) + record.frames[2:]
    with pytest.raises(ValueError, match=r"clip 'uid-7': frame 1 \(video frame 47\) is not a decodable png"):
        fs.decode_frames(dataclass_replace(record, frames=broken))


def dataclass_replace(record, **changes):
    import dataclasses

    return dataclasses.replace(record, **changes)


def test_frame_shards_len_getitem_lookup_and_pickle(tmp_path):
    groups = [[make_record(f"c{i}", seed=i)[0] for i in range(3)], [make_record("c3", seed=3)[0]]]
    entries = write_shards(tmp_path, groups, frames_per_clip=4)
    assert [e["num_records"] for e in entries] == [3, 1]
    assert not list(tmp_path.glob("*.tmp-*"))  # temporary names were renamed away
    shards = fs.FrameShards(tmp_path)
    assert len(shards) == 4 and shards.uids == ["c0", "c1", "c2", "c3"]
    assert shards[3].uid == "c3" and shards[3].extra == {"narration": "open door"}
    np.testing.assert_array_equal(fs.decode_frames(shards.lookup("c1")), make_record("c1", seed=1)[1])
    assert "c2" in shards and "zz" not in shards
    with pytest.raises(KeyError, match="'zz' is not in"):
        shards.lookup("zz")
    with pytest.raises(IndexError, match="clip index 4 out of range"):
        shards[4]
    clone = pickle.loads(pickle.dumps(shards))
    assert clone[2] == shards[2]
    manifest = json.loads((tmp_path / fs.MANIFEST_NAME).read_text())
    assert manifest["num_clips"] == 4 and manifest["frames_per_clip"] == 4


def test_truncated_shard_fails_at_open_naming_the_file(tmp_path):
    write_shards(tmp_path, [[make_record("a")[0]], [make_record("b")[0]]], frames_per_clip=4)
    victim = tmp_path / f"shard-00001{fs.SHARD_SUFFIX}"
    victim.write_bytes(victim.read_bytes()[:-200])
    with pytest.raises(ValueError, match=f"frame shard {victim} is .* bytes.*truncated"):
        fs.FrameShards(tmp_path)
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=f"frame shard {victim} listed in manifest.json is missing"):
        fs.FrameShards(tmp_path)


def test_shard_with_right_size_but_garbage_content_fails_at_open(tmp_path):
    write_shards(tmp_path, [[make_record("a")[0]]], frames_per_clip=4)
    victim = tmp_path / f"shard-00000{fs.SHARD_SUFFIX}"
    victim.write_bytes(b"\0" * victim.stat().st_size)
    with pytest.raises(ValueError, match=f"frame shard {victim} is unreadable or holds 0 records"):
        fs.FrameShards(tmp_path)


def test_record_with_wrong_frame_count_names_the_uid(tmp_path):
    write_shards(tmp_path, [[make_record("good")[0], make_record("short", t=3)[0]]], frames_per_clip=4)
    shards = fs.FrameShards(tmp_path)  # opening only checks files; the record is checked when read
    assert shards[0].num_frames == 4
    with pytest.raises(ValueError, match=r"clip 'short' .* has 3 frames, manifest.json says every clip has 4"):
        shards[1]


def test_missing_manifest_explains(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a frame-shard directory, or its extraction has not finished"):
        fs.FrameShards(tmp_path)


def test_interrupted_writer_leaves_no_final_file(tmp_path):
    writer = fs.ShardWriter(tmp_path / "shard-00000.array_record")
    writer.write(make_record("a")[0])
    writer.abort()
    assert list(tmp_path.iterdir()) == []
