"""Training pipeline: samples + frame shards -> padded, bucketed batches; skip policy; worker processes; iterator
state; 2 JAX processes (real jax.distributed over gloo) each reading a disjoint half; global arrays."""

import json
import logging
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from _processes import reserved_port
from llavaction_jax.data import frames as fs
from llavaction_jax.data.batching import (QWEN_PAD_ID, bucket_length, make_global_batch, pad_text_to,
                                          power_of_two_buckets)
from llavaction_jax.data.chat import preprocess_qwen
from llavaction_jax.data.chat import llava_video_time_prompt
from llavaction_jax.data.image import normalize_frames, preprocess_frames
from llavaction_jax.data.mixture import load_mixture
from llavaction_jax.data.pipeline import TrainPipelineConfig, train_dataset
from llavaction_jax.data.train_sample import SampleError, cached_tokenizer, clip_uid
from llavaction_jax.ek100.train_prompt import EK100PromptSettings

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_VIDEO, NUM_TEXT = 12, 4
BUCKETS = (64, 128, 256, 512)
BASE = dict(batch_size=4, num_frames=2, frame_size=16, max_length=512, num_epochs=1, read_threads=1,
            question_prompts=EK100PromptSettings())
BAD = {  # sample id -> (what is wrong, the words its error must contain)
    "missing": ({"uid": "nope"}, "clip uid 'nope' is not in"),
    "undecodable": ({"uid": "bad_jpeg"}, "clip 'bad_jpeg': frame 0 (video frame 0) is not a decodable jpeg image"),
    "wrong_count": ({"uid": "three"}, "clip 'three' has 3 frames, more than the pipeline's 2"),
    "no_question_type": ({"uid": "c0", "human": "What?"}, "an EK100 sample needs a 'question_type' string"),
    "two_placeholders": ({"uid": "c1", "human": "<image>\n<image> What?"}, "2 <image> placeholders"),
}


def video_sample(i, uid):
    """EK100-style sample ``v{i}`` on clip ``uid``; longer text for larger ``i``; every third has no action ids."""
    sample = {"id": f"v{i}", "uid": uid, "video": "P01-P01_01", "dataset_name": "EK100", "conversations": [
        {"from": "human", "value": "<image>\nWhat is happening? " + "word " * 9 * i},
        {"from": "gpt", "value": f"A. action {i}"}]}
    if i % 3:
        sample.update(verb_id=i, noun_id=2 * i, action_id=3 * i)
    return sample


def bad_sample(name, uid, human="<image>\nWhat?"):
    return {"id": name, "uid": uid, "dataset_name": "EK100",
            "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": "A. x"}]}


def text_sample(j):
    return {"id": f"t{j}", "conversations": [{"from": "human", "value": f"Say hi {j}"}, {"from": "gpt", "value": "hi"},
                                             {"from": "human", "value": "again"}, {"from": "gpt", "value": "hi!"}]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """12 two-frame 16x16 clips (PNG and JPEG) + an undecodable one + a three-frame one; good / bad sample files."""
    root = tmp_path_factory.mktemp("train_pipeline")
    rng = np.random.default_rng(0)
    (root / "shards").mkdir()
    writer = fs.ShardWriter(root / "shards" / "clips.array_record")
    for i in range(NUM_VIDEO):
        codec = "png" if i % 2 else "jpeg"
        frames = fs.encode_frames(rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8), codec)
        writer.write(fs.ClipRecord(f"c{i}", "P01-P01_01", i, i + 1.5, 30.0, (30 * i, 30 * i + 20), frames, codec, 1.5))
    writer.write(fs.ClipRecord("bad_jpeg", "v", 0, 1, 30.0, (0, 1), (b"not a jpeg", b"nor this"), "jpeg", 1.0))
    three = fs.encode_frames(rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8), "png")
    writer.write(fs.ClipRecord("three", "v", 0, 1, 30.0, (0, 1, 2), three, "png", 1.0))
    fs.write_manifest(root / "shards", [writer.commit()], {}, frames_per_clip=None)

    good = [video_sample(i, f"c{i}") for i in range(NUM_VIDEO)] + [text_sample(j) for j in range(NUM_TEXT)]
    bad = [bad_sample(name, **change) for name, (change, _) in BAD.items()]
    for name, samples in (("good", good), ("bad", good + bad)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    return root


def run(samples, shards, **config):
    process = config.pop("process", (0, 1))
    return list(train_dataset(samples, shards, TrainPipelineConfig(**{**BASE, **config}), *process))


def test_batches_equal_preprocess_qwen_and_stored_frames(data):
    tokenizer, shards = cached_tokenizer(), fs.FrameShards(data / "shards")
    samples = load_mixture(data / "good.jsonl")
    by_id = {s["id"]: s for s in samples}
    batches = run(samples, shards)
    assert len(batches) == (NUM_VIDEO + NUM_TEXT) // 4
    assert sorted(i for b in batches for i in b["sample_id"]) == sorted(by_id)
    for batch in batches:
        lengths = batch["attention_mask"].sum(1)
        assert batch["input_ids"].shape[1] == bucket_length(lengths.max(), BUCKETS)  # smallest bucket that fits
        assert batch["pixel_values"].shape == (4, 2, 3, 16, 16) and batch["pixel_values"].dtype == np.float32
        assert batch["input_ids"].dtype == batch["labels"].dtype == batch["actions"].dtype == np.int32
        for row, sample_id in enumerate(batch["sample_id"]):
            sample = by_id[str(sample_id)]
            video = "uid" in sample
            want = preprocess_qwen(sample["conversations"], tokenizer, has_image=video)
            n = len(want.input_ids)
            assert lengths[row] == n and batch["attention_mask"][row, :n].all()
            np.testing.assert_array_equal(batch["input_ids"][row, :n], want.input_ids)
            np.testing.assert_array_equal(batch["labels"][row, :n], want.labels)
            assert (batch["input_ids"][row, n:] == QWEN_PAD_ID).all() and (batch["labels"][row, n:] == -100).all()
            assert (batch["input_ids"][row] == -200).sum() == video and batch["has_video"][row] == video
            if video:
                record = shards.lookup(sample["uid"])
                np.testing.assert_array_equal(batch["pixel_values"][row], normalize_frames(fs.decode_frames(record)))
            else:
                assert not batch["pixel_values"][row].any()  # text-only samples: zero pixels, no placeholder
            ids = [sample.get(k, -1) for k in ("verb_id", "noun_id", "action_id")]
            assert batch["actions"][row].tolist() == ids
        assert int(batch["num_skipped"]) == 0


def test_frames_resized_when_shards_hold_another_size_and_time_instruction(data):
    shards = fs.FrameShards(data / "shards")
    sample = {**video_sample(5, "c5"), "dataset_name": "LLaVA-Video-178K"}  # non-EK100: LLaVA-Video time prompt
    [batch] = run([sample], shards, batch_size=1, frame_size=8, shuffle=False)
    record = shards.lookup("c5")
    np.testing.assert_array_equal(batch["pixel_values"][0], preprocess_frames(fs.decode_frames(record), 8))
    human = llava_video_time_prompt(sample["conversations"][0]["value"], record.duration_sec, 2)
    assert human.startswith("<image>\nThe video lasts for 1.50 seconds, and 2 frames are uniformly sampled")
    want = preprocess_qwen([{"from": "human", "value": human}, sample["conversations"][1]], cached_tokenizer(), True)
    np.testing.assert_array_equal(batch["input_ids"][0, :len(want.input_ids)], want.input_ids)
    [plain] = run([sample], shards, batch_size=1, shuffle=False, add_time_instruction=False)
    assert plain["attention_mask"].sum() < batch["attention_mask"].sum()


def test_truncation_keeps_max_length_and_never_drops_the_placeholder(data):
    samples = [video_sample(9, "c9")]
    [batch] = run(samples, data / "shards", batch_size=1, max_length=40)
    assert batch["input_ids"].shape == (1, 40) and batch["attention_mask"].all()  # the only bucket is max_length
    want = preprocess_qwen(samples[0]["conversations"], cached_tokenizer(), True, max_len=40)
    np.testing.assert_array_equal(batch["input_ids"][0], want.input_ids)
    late = {"id": "late", "uid": "c2", "conversations": [
        {"from": "human", "value": "word " * 60}, {"from": "gpt", "value": "ok"},
        {"from": "human", "value": "<image>\nnow?"}, {"from": "gpt", "value": "yes"}]}
    with pytest.raises(SampleError, match="sample 'late': truncating .* to max_len=40 drops the <image>"):
        run([late], data / "shards", batch_size=1, max_length=40, add_time_instruction=False)


def test_length_buckets():
    assert power_of_two_buckets(300) == (64, 128, 256, 300)
    assert power_of_two_buckets(32768)[-3:] == (8192, 16384, 32768)
    assert bucket_length(64, BUCKETS) == 64 and bucket_length(65, BUCKETS) == 128
    with pytest.raises(ValueError, match="longer than the largest length bucket 512"):
        bucket_length(513, BUCKETS)
    assert TrainPipelineConfig(batch_size=1, max_length=100, length_buckets=(50, 100)).buckets() == (50, 100)
    with pytest.raises(ValueError, match="must increase and end at max_length 100"):
        TrainPipelineConfig(batch_size=1, max_length=100, length_buckets=(50, 80)).buckets()
    batch = {"input_ids": np.ones((2, 3), np.int32), "attention_mask": np.ones((2, 3), bool),
             "labels": np.ones((2, 3), np.int32)}
    padded = pad_text_to(batch, 5)
    assert padded["input_ids"][:, 3:].tolist() == [[QWEN_PAD_ID] * 2] * 2 and not padded["attention_mask"][:, 3:].any()
    assert (padded["labels"][:, 3:] == -100).all()


def test_clip_uid_join_rules():
    assert clip_uid({"uid": "u", "narration_id": "n", "video": "v"}) == "u"
    assert clip_uid({"narration_id": "P01_01_3", "video": "P01-P01_01", "start": 1, "end": 2}) == "P01_01_3"
    detection = {"narration_id": "P01_01_3", "video": "P01-P01_01", "start": 0.5, "end": 7.25,
                 "question_type": "temporal_detection"}
    assert clip_uid(detection) == "P01-P01_01_0.50_7.25"  # a padded window: not the segment's clip
    assert clip_uid({"video": "a/b.mp4", "start_timestamp": "3.1", "end_timestamp": 4}) == "a/b.mp4_3.10_4.00"
    assert clip_uid({"video": "a/b.mp4"}) == "a/b.mp4"
    assert clip_uid({"conversations": []}) is None


def test_order_is_seeded_and_epochs_reshuffle(data):
    samples = load_mixture(data / "good.jsonl")

    def order(seed):
        return [i for b in run(samples, data / "shards", batch_size=1, num_epochs=2, seed=seed) for i in b["sample_id"]]

    first = order(7)
    assert first == order(7) and first != order(8)
    epoch1, epoch2 = first[:len(samples)], first[len(samples):]
    assert sorted(epoch1) == sorted(epoch2) == sorted(s["id"] for s in samples) and epoch1 != epoch2


def test_iterator_state_round_trip_mid_epoch(data):
    samples = load_mixture(data / "bad.jsonl")  # skips included: the skip count is part of the state
    dataset = train_dataset(samples, data / "shards", TrainPipelineConfig(
        **{**BASE, "batch_size": 3, "num_epochs": None, "seed": 1, "on_bad_sample": "skip"}), 0, 1)
    iterator = iter(dataset)
    for _ in range(3):
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(6)]  # crosses into the second epoch
    restored = iter(dataset)
    restored.set_state(state)
    for want in expected:
        got = next(restored)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    assert int(expected[-1]["num_skipped"]) >= len(BAD)  # the whole first epoch's skips, carried through the restore


def test_skip_policy_counts_and_logs(data, caplog):
    samples = load_mixture(data / "bad.jsonl")
    with caplog.at_level(logging.WARNING, logger="llavaction_jax.data.batching"):
        batches = run(samples, data / "shards", batch_size=1, on_bad_sample="skip")
    assert sorted(i for b in batches for i in b["sample_id"]) == sorted(s["id"] for s in load_mixture(
        data / "good.jsonl"))
    assert int(batches[-1]["num_skipped"]) == len(BAD)
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == len(BAD)
    for name, (_, words) in BAD.items():
        assert any(f"skipped sample {name!r} ({data / 'bad.jsonl'}:" in m and words in m for m in logged), name


@pytest.mark.parametrize("name", list(BAD))
def test_errors_name_the_sample_and_file(data, name):
    samples = [s for s in load_mixture(data / "bad.jsonl") if s["id"] == name]
    with pytest.raises(SampleError) as error:
        run(samples, data / "shards", batch_size=1)
    message = str(error.value)
    assert message.startswith(f"sample {name!r} ({data / 'bad.jsonl'}:{NUM_VIDEO + NUM_TEXT + list(BAD).index(name) + 1})")
    assert BAD[name][1] in message
    if name in ("undecodable", "wrong_count", "missing"):
        assert str(data / "shards") in message  # and the shard directory


def test_two_worker_processes_equal_in_process(data):
    samples = load_mixture(data / "bad.jsonl")
    in_process = run(samples, data / "shards", on_bad_sample="skip", seed=5, batch_size=3)
    with_workers = run(samples, data / "shards", on_bad_sample="skip", seed=5, batch_size=3, worker_count=2)
    assert len(with_workers) == len(in_process) == (NUM_VIDEO + NUM_TEXT) // 3
    for got, want in zip(with_workers, in_process):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    assert int(with_workers[-1]["num_skipped"]) == len(BAD)


def test_make_global_batch_shards_the_batch_axis(data):  # in-process: placing arrays runs no collective that could hang
    from llavaction_jax.sharding import make_mesh

    mesh = make_mesh(data=2, fsdp=4, devices=jax.devices()[:8])
    [batch] = run(load_mixture(data / "good.jsonl")[:8], data / "shards", batch_size=8, shuffle=False)
    arrays = make_global_batch(batch, mesh)
    assert sorted(arrays) == sorted(["input_ids", "attention_mask", "labels", "pixel_values", "actions", "has_video",
                                     "num_frames"])
    for key, array in arrays.items():
        assert array.shape == batch[key].shape and array.sharding.spec[0] == ("data", "fsdp")
        np.testing.assert_array_equal(np.asarray(array), batch[key])
    with pytest.raises(ValueError, match="batch of 4 rows does not split over mesh axes data x fsdp = 8"):
        make_global_batch({k: v[:4] for k, v in batch.items() if k != "num_skipped"}, mesh)


CHILD = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2 --xla_cpu_multi_thread_eigen=false"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
import numpy as np
from jax.experimental import multihost_utils

process_id, port, data, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
from llavaction_jax.data.batching import make_global_batch
from llavaction_jax.data.mixture import load_mixture
from llavaction_jax.data.pipeline import TrainPipelineConfig, train_dataset
from llavaction_jax.ek100.train_prompt import EK100PromptSettings
from llavaction_jax.sharding import make_mesh

config = TrainPipelineConfig(batch_size=2, num_frames=2, frame_size=16, max_length=512, num_epochs=1, seed=3,
                             read_threads=1, question_prompts=EK100PromptSettings())
batches = list(train_dataset(load_mixture(data + "/good.jsonl"), data + "/shards", config))  # layout from jax
mesh = make_mesh(data=1, fsdp=-1)  # 4 devices over both processes
arrays = make_global_batch(batches[0], mesh)
gathered = {k: multihost_utils.process_allgather(v, tiled=True) for k, v in arrays.items()}
np.savez(f"{out}/process{process_id}.npz", **{"local_" + k: batches[0][k] for k in arrays},
         **{"global_" + k: v for k, v in gathered.items()})
with open(f"{out}/process{process_id}.json", "w") as f:
    json.dump({"ids": [str(i) for b in batches for i in b["sample_id"]], "devices": jax.device_count()}, f)
jax.distributed.shutdown()
"""


@pytest.mark.watchdog(300)  # 2 processes: a child process group with a deadline (tests/_watchdog.py)
def test_two_jax_processes_read_disjoint_halves(data, tmp_path):
    (tmp_path / "child.py").write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env.pop("XLA_FLAGS", None)
    with reserved_port() as port:
        children = [subprocess.Popen([sys.executable, str(tmp_path / "child.py"), str(i), str(port), str(data),
                                      str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True) for i in range(2)]
        outputs = [child.communicate()[0] for child in children]  # bounded by the watchdog
    for child, output in zip(children, outputs):
        assert child.returncode == 0, output[-3000:]
    results = [json.loads((tmp_path / f"process{i}.json").read_text()) for i in range(2)]
    halves = [r["ids"] for r in results]
    assert results[0]["devices"] == 4
    assert len(halves[0]) == len(halves[1]) == (NUM_VIDEO + NUM_TEXT) // 2
    assert not set(halves[0]) & set(halves[1])
    assert sorted(halves[0] + halves[1]) == sorted(s["id"] for s in load_mixture(data / "good.jsonl"))
    # The global batch holds process 0's rows, then process 1's, padded to the longer of the two buckets.
    local = [np.load(tmp_path / f"process{i}.npz") for i in range(2)]
    length = max(p["local_input_ids"].shape[1] for p in local)
    for key in ("input_ids", "attention_mask", "labels", "pixel_values", "actions", "has_video"):
        want = [p[f"local_{key}"] for p in local]
        if key in ("input_ids", "attention_mask", "labels"):
            want = [pad_text_to({"input_ids": p["local_input_ids"], "attention_mask": p["local_attention_mask"],
                                 "labels": p["local_labels"]}, length)[key] for p in local]
        np.testing.assert_array_equal(local[0][f"global_{key}"], np.concatenate(want))
        np.testing.assert_array_equal(local[1][f"global_{key}"], local[0][f"global_{key}"])


def test_a_corrupted_shard_record_names_the_shard_and_skip_covers_it(data, tmp_path):
    import shutil

    from _train_fixtures import corrupt_record

    shutil.copytree(data / "shards", tmp_path / "shards")
    shard = tmp_path / "shards" / "clips.array_record"
    corrupt_record(shard, "c5")  # same size, so opening the directory still succeeds
    shards = fs.FrameShards(tmp_path / "shards")
    broken = []
    for index in range(len(shards)):
        try:
            shards[index]
        except ValueError as error:
            broken.append(shards.uids[index])
            assert str(error).startswith(f"frame shard {shard} record {index}: unreadable (Corrupted Riegeli")
    assert broken == ["c5"]
    samples = load_mixture(data / "good.jsonl")
    with pytest.raises(SampleError, match=f"frame shard {shard} record"):
        run(samples, tmp_path / "shards", batch_size=1)
    batches = run(samples, tmp_path / "shards", batch_size=1, on_bad_sample="skip")
    assert int(batches[-1]["num_skipped"]) == 1
    assert sorted(i for b in batches for i in b["sample_id"]) == sorted(
        s["id"] for s in samples if s.get("uid") != "c5")


@pytest.mark.parametrize("cores, threads", [(1, 1), (2, 1), (3, 1), (4, 2), (8, 4), (96, 4)])
def test_reader_threads_default_to_half_the_cores_from_1_to_4(monkeypatch, cores, threads):
    """data.read_threads=0: readers beyond the cores the step leaves free slow the step (host.reader_threads)."""
    from llavaction_jax.host import reader_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert reader_threads(0) == threads
    assert reader_threads(3) == 3  # a number the user set is kept
