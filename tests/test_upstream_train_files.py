"""Upstream's released training files (EK100 question files of every question type, LLaVA-Video-178K JSON, the
data YAML) -> prompts, ids, labels and masks, against a reference written in this file from upstream's code
(llavaction/action/utils.py: format_task_related_prompt, format_time_instruction, format_llava_prompt;
llavaction/train/train.py: LazySupervisedDataset._get_item, preprocess_multimodal; preprocess_qwen is
test_chat.reference_preprocess_qwen). The files are written here from the documented schema
(llavaction/action/generate_description.py, generate_temporal_detection_data.py, chatgpt_utils.py:
convert_json_to_jsonl / convert_instruct_json_to_jsonl), not by our builder. Also: the prior-action coin, and errors
that name the sample (build-train, and a training run on its YAML: test_build_train.py)."""

import ast
import copy
import json
import re

import numpy as np
import pytest
from test_chat import SPEC_CHAT_TEMPLATE, reference_preprocess_qwen
from test_ek100 import write_fake_annotations

from llavaction_jax.data import frames as fs
from llavaction_jax.data.mixture import load_mixture
from llavaction_jax.data.train_sample import EPOCH_KEY, EncodeTrainSample, SampleError, cached_tokenizer, clip_uid
from llavaction_jax.ek100.train_prompt import EK100PromptSettings, ek100_user_prompt, load_prior_table

FRAMES, SIZE = 4, 16  # the shards' frame count: the time instruction must state it (not a fixed 16)
VIDEO = "P90-P90_01"
OPTIONS = ["A. open door", "B. pick up cup", "C. take the chef's knife", "D. close door", "E. wash hands"]


# ----------------------------------------------------------------------------- reference, from upstream's code
def ref_task_prompt(question, question_type, meta_data, perspective, learn_neighbor_actions, coin):
    """format_task_related_prompt; ``coin`` is the value upstream's random.random() would return."""
    if perspective == "first_person":
        prefix = ("You are seeing this video from egocentric view and you are the person. Your hands are sometimes "
                  "interacting with objects. What action are you doing? ")
    else:
        prefix = ("The video is taken from egocentric view. The person's hands are sometimes interacting with "
                  "objects. What action is the person doing?")
    if question_type.startswith("mc_"):
        if learn_neighbor_actions == "prior" and meta_data and coin < 0.3:
            m = meta_data
            return (f"{prefix}\n" + f"{m['prev2_offset']} seconds ago, you started an action {m['prev2_narration']}. "
                    f"{m['prev1_offset']} seconds ago, you started an action {m['prev1_narration']}. What action are "
                    "you currently performing? Here are the options of actions you can select:\n" + ", ".join(question))
        return (f"{prefix}Given multiple choices, format your answer briefly such as 'A. move knife'. \n"
                + "Here are the options of actions you are selecting:\n" + ", ".join(question))
    if question_type == "direct_narration":
        return f"{prefix} What action are you performing? Give a short sentence such as 'move knife'."
    if question_type in ("temporal_detection", "gpt-gt-instruct-reason"):
        return question
    if question_type == "gpt-gt-reason":
        return (f"{prefix} Describe in details what you see from the video frames. You must talk in the first person "
                "perspective. Try to focus on what you are doing. ")
    raise NotImplementedError(question_type)


def ref_user_turns(sample, n_frames, video_time, add_time_instruction=True, perspective="first_person",
                   learn_neighbor_actions="", meta_data=None, coin=1.0):
    """_get_item's text part, then preprocess_multimodal: the conversation upstream tokenizes."""
    conversations = copy.deepcopy(sample["conversations"])
    if "EK100" in sample.get("dataset_name", ""):
        question = conversations[0]["value"]
        try:
            result = ast.literal_eval(question)
            if isinstance(result, list):
                question = result
        except Exception:  # noqa: BLE001 -- upstream's bare except
            pass
        duration = float(sample["end_timestamp"]) - float(sample["start_timestamp"])
        task = ref_task_prompt(question, sample["question_type"], meta_data, perspective, learn_neighbor_actions, coin)
        time_instruction = (f"The provided video lasts for {duration:.3f} seconds, and {n_frames} frames are "
                            "uniformly sampled from it.")
        conversations[0]["value"] = f"<image>\n{time_instruction}{task}" if add_time_instruction else f"<image>\n{task}"
    elif add_time_instruction:
        time_instruction = (f"The video lasts for {video_time:.2f} seconds, and {n_frames} frames are uniformly "
                            "sampled from it. Please answer the following questions related to this video.")
        conversations[0]["value"] = f'<image>\n{time_instruction}\n{conversations[0]["value"].replace("<image>", "")}'
    for sentence in conversations:
        value = sentence["value"]
        if len(re.findall("<image>", value)) == 1 and not value.startswith("<image>"):
            value = ("<image>\n" + value.replace("<image>", "").strip()).strip()
        sentence["value"] = value.replace("QA_GT_caption_based_noisy", "")
    return conversations


# ----------------------------------------------------------------------------- upstream-layout files
def ek100_sample(question_type, human, gpt, start, end, **ids):
    return {"video": VIDEO, "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}],
            "id": VIDEO, "split": "train", "task_instruction": "", "num_samples": 1, "question_type": question_type,
            "dataset_name": "EK100", "start_timestamp": start, "end_timestamp": end,
            **({"verb_id": 2, "noun_id": 1, "action_id": 7} if not ids else ids)}


def upstream_files(root):
    """One file per question type of the final recipe's YAML, in its layout, plus a LLaVA-Video-178K JSON."""
    reason = ("I see my hand reaching for the door handle and pulling it, so I open the door. "
              "The answer is A. open door.")
    files = {
        "avion_mc_top5_GT_random_narration/train_convs_narration_actionids.jsonl": [
            ek100_sample("mc_GT_random_narration", f"{OPTIONS}", "A. open door", 3.5, 4.2),
            ek100_sample("mc_GT_random_narration", f"{OPTIONS[::-1]}", "E. open door", 20.0, 21.0)],
        "cross_validation/tim_mc_top5_GT_random_narration/train_convs_narration_actionids.jsonl": [
            ek100_sample("mc_GT_random_narration", f"{OPTIONS[1:] + OPTIONS[:1]}", "E. open door", 3.5, 4.2)],
        "train_anno_gpt-gt-reason_4_first_person_all_action_idx.jsonl": [
            ek100_sample("gpt-gt-reason", f"{OPTIONS}", reason, 3.5, 4.2)],
        "train_anno_gpt-gt-instruct-reason_4_first_person_all_action_idx.jsonl": [
            ek100_sample("gpt-gt-instruct-reason", "What evidence suggests that the person is opening a door?",
                         "The hand grips the handle and the door swings outward.", 3.5, 4.2)],
        "temporal_detection.jsonl": [
            ek100_sample("temporal_detection", "The provided video contains an action 'open door' that lasts 0.7 "
                         "seconds. What is the relative start and end time of the action in seconds? Format it as "
                         "'start_timestamp: end_timestamp' and round to 2 decimal places.", "1.21, 1.91", "2.29",
                         "7.29")],
        "direct_narration_GT_random_narration/train_convs_narration_actionids.jsonl": [
            ek100_sample("direct_narration", "", "open door", 3.5, 4.2)],
    }
    for name, samples in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("".join(json.dumps(s) + "\n" for s in samples))
    llava_video = [{"id": "ytb_7nRmsEw7nsE", "video": "liwei_youtube_videos/videos/ytb_7nRmsEw7nsE.mp4",
                    "data_source": "0_30_s_youtube_v0_1", "conversations": [
                        {"from": "human", "value": "<image>\nWhat is the man holding?"},
                        {"from": "gpt", "value": "A red umbrella."},
                        {"from": "human", "value": "Where is he walking?"},
                        {"from": "gpt", "value": "Along a beach at sunset."}]}]
    (root / "0_30_s_youtube_v0_1_cap_processed.json").write_text(json.dumps(llava_video))
    names = list(files) + ["0_30_s_youtube_v0_1_cap_processed.json"]
    (root / "mix.yaml").write_text("datasets:\n" + "".join(
        f"  - json_path: {root / n}\n    sampling_strategy: all\n" for n in names))
    return root / "mix.yaml"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("upstream_files")
    mix = upstream_files(root)
    samples = load_mixture(mix)
    rng = np.random.default_rng(0)
    (root / "shards").mkdir()
    writer = fs.ShardWriter(root / "shards" / "clips.array_record")
    uids = {}
    for sample in samples:
        uid = clip_uid(sample)
        if uid in uids:
            continue
        start, end = float(sample.get("start_timestamp", 0.0)), float(sample.get("end_timestamp", 12.5))
        pixels = rng.integers(0, 256, (FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
        uids[uid] = pixels
        writer.write(fs.ClipRecord(uid, sample["video"], start, end, 30.0, tuple(range(FRAMES)),
                                   fs.encode_frames(pixels, "png"), "png", end - start))
    fs.write_manifest(root / "shards", [writer.commit()], {}, frames_per_clip=FRAMES)
    annotations = write_fake_annotations(root / "ann")
    return root, samples, fs.FrameShards(root / "shards"), annotations


@pytest.fixture(scope="module")
def reference_tokenizer():
    ref = copy.deepcopy(cached_tokenizer())
    ref.add_tokens(["<image>"], special_tokens=True)
    ref.chat_template = SPEC_CHAT_TEMPLATE
    return ref


def test_the_yaml_reads_every_file_in_order(data):
    _, samples, _, _ = data
    types = [s.get("question_type", "llava-video") for s in samples]
    assert types == ["mc_GT_random_narration"] * 3 + ["gpt-gt-reason", "gpt-gt-instruct-reason", "temporal_detection",
                                                      "direct_narration", "llava-video"]
    assert [clip_uid(s) for s in samples[:2]] == ["P90-P90_01_3.50_4.20", "P90-P90_01_20.00_21.00"]
    assert clip_uid(samples[5]) == "P90-P90_01_2.29_7.29"  # the detection window, times stored as strings


def test_yaml_sampling_strategies_on_upstream_files(data):
    root, samples, _, _ = data
    avion = root / "avion_mc_top5_GT_random_narration/train_convs_narration_actionids.jsonl"
    (root / "strategies.yaml").write_text("datasets:\n" + "".join(
        f"  - json_path: {avion}\n    sampling_strategy: {strategy}\n"
        for strategy in ("first:1", "end:1", "random:50%", "end:100%")))
    picked = load_mixture(root / "strategies.yaml")
    starts = [s["start_timestamp"] for s in picked]
    # first = head, end = tail, P% = ceil(P * 2 / 100) after a shuffle, 100% = all; in YAML order
    assert starts[:2] == [3.5, 20.0] and starts[2] in (3.5, 20.0) and starts[3:] == [3.5, 20.0]


def test_every_question_type_encodes_like_upstream(data, reference_tokenizer):
    """ids, labels (the mask) and frames of each sample == upstream's preprocess_qwen on upstream's prompt."""
    _, samples, shards, _ = data
    encode = EncodeTrainSample(shards, cached_tokenizer(), FRAMES, frame_size=SIZE,
                               question_prompts=EK100PromptSettings())
    for sample in samples:
        element = encode.encode(sample)
        conversation = ref_user_turns(sample, FRAMES, 12.5)
        assert f"{FRAMES} frames are uniformly sampled" in conversation[0]["value"]
        ids, labels = reference_preprocess_qwen(conversation, reference_tokenizer, has_image=True)
        np.testing.assert_array_equal(element["input_ids"], ids, err_msg=sample["_source"])
        np.testing.assert_array_equal(element["labels"], labels, err_msg=sample["_source"])
        np.testing.assert_array_equal(element["frames"].shape, (FRAMES, SIZE, SIZE, 3))
        expected_actions = [2, 1, 7] if "verb_id" in sample else [-1, -1, -1]
        np.testing.assert_array_equal(element["actions"], expected_actions)
    # without the time instruction, and in the third person
    settings = EK100PromptSettings(perspective="third_person")
    third = EncodeTrainSample(shards, cached_tokenizer(), FRAMES, frame_size=SIZE, add_time_instruction=False,
                              question_prompts=settings)
    for sample in samples[:7]:
        ids, labels = reference_preprocess_qwen(ref_user_turns(sample, FRAMES, 0, False, "third_person"),
                                                reference_tokenizer, has_image=True)
        element = third.encode(sample)
        np.testing.assert_array_equal(element["input_ids"], ids, err_msg=sample["_source"])
        np.testing.assert_array_equal(element["labels"], labels, err_msg=sample["_source"])


def test_prior_action_coin_30_percent_per_copy_and_epoch(data):
    _, samples, _, annotations = data
    table = load_prior_table(str(annotations))
    meta = table[f"{VIDEO}_3.5_4.2"]
    settings = EK100PromptSettings(learn_neighbor_actions="prior", prior_table=table)
    avion, tim, avion_later = samples[0], samples[2], samples[1]  # the first two show the same clip
    with_prior, without = (ref_user_turns(avion, FRAMES, 0, learn_neighbor_actions="prior", meta_data=meta, coin=c)
                           [0]["value"] for c in (0.0, 1.0))
    coins = {"avion": [], "tim": []}
    for epoch in range(300):
        for name, sample in (("avion", avion), ("tim", tim)):
            prompt = ek100_user_prompt(sample, FRAMES, settings, epoch=epoch)
            coins[name].append("seconds ago" in prompt)
        assert ek100_user_prompt(avion, FRAMES, settings, epoch=epoch) in (with_prior, without)
        assert "seconds ago" not in ek100_user_prompt(avion_later, FRAMES, settings, epoch=epoch)  # no prior
    a, t = np.array(coins["avion"]), np.array(coins["tim"])
    assert 0.22 < a.mean() < 0.38 and 0.22 < t.mean() < 0.38  # 300 draws: 0.3 +- 0.026 (1 sigma)
    assert 0.03 < np.mean(a & t) < 0.16  # independent copies: 0.09; a shared coin would give 0.3
    assert coins["avion"] == ["seconds ago" in ek100_user_prompt(avion, FRAMES, settings, epoch=e) for e in range(300)]
    # official_key prior actions name the keys (prior_action_table is checked in test_ek100_train)
    assert load_prior_table(str(annotations), "official_key")[f"{VIDEO}_3.5_4.2"]["prev1_narration"] == "take cup"


def test_epoch_comes_from_the_pipeline_position():
    from llavaction_jax.data.train_sample import TagEpoch

    tag = TagEpoch(per_epoch=6, process_index=1, process_count=2)  # 2 processes, 3 elements each per epoch
    assert [tag.map_with_index(i, {})[EPOCH_KEY] for i in range(7)] == [0, 0, 0, 1, 1, 1, 2]


def test_bad_upstream_samples_name_the_sample(data):
    _, samples, shards, _ = data
    encode = EncodeTrainSample(shards, cached_tokenizer(), FRAMES, frame_size=SIZE,
                               question_prompts=EK100PromptSettings())
    gpt = samples[0]["conversations"][1]
    not_a_list = {**samples[0], "conversations": [{"from": "human", "value": "open door?"}, gpt]}
    with pytest.raises(SampleError, match=r"avion_mc_top5.*:1\): question_type 'mc_GT_random_narration' needs the "
                                          r"human turn to be a Python list of options"):
        encode.encode(not_a_list)
    with pytest.raises(SampleError, match="question_type 'gpt-gt-strong' is not supported"):
        encode.encode({**samples[6], "question_type": "gpt-gt-strong"})
