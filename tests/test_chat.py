"""ChatML prompt, <image> tokenization and preprocess_qwen labels on the real Qwen2 tokenizer.

The reference below is written from upstream
`llavaction/train/train.py: preprocess_qwen` and uses upstream's own mechanism (a tokenizer copy with
``<image>`` added as a special token, the reset chat template, ``apply_chat_template`` per message, then a pass
that unmasks "\\n"/<|im_start|>/<|im_end|> and swaps the image id for -200). chat.py instead splits text on
``<image>`` itself, so agreement checks the two routes give the same ids.
"""

import copy

import numpy as np
import pytest

from llavaction_jax.data import chat
from llavaction_jax.data.tokenizer import bundled_qwen_tokenizer_dir, load_qwen_tokenizer

SPEC_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The complete EK100-MQA prompt (upstream llavaction/action/llava_inference.py: llava_inference), copied literally.
MQA_USER_TEXT = (
    "<image>\nThe provided video lasts for 1.030 seconds, and 16 frames are uniformly sampled from it.You are seeing "
    "this video from egocentric view and you are the person. Your hands are sometimes interacting with objects. What "
    "action are you doing? Given multiple choices, format your answer briefly such as 'A. move knife'. \nHere are the "
    "options of actions you are selecting:\nA. open door, B. close door, C. take cup, D. open cupboard, E. wash hands"
)
MQA_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nThe provided video lasts "
    "for 1.030 seconds, and 16 frames are uniformly sampled from it.You are seeing this video from egocentric view and "
    "you are the person. Your hands are sometimes interacting with objects. What action are you doing? Given multiple "
    "choices, format your answer briefly such as 'A. move knife'. \nHere are the options of actions you are "
    "selecting:\nA. open door, B. close door, C. take cup, D. open cupboard, E. wash hands<|im_end|>\n"
    "<|im_start|>assistant\n"
)

SAMPLES = {
    "ek100_mqa": (
        [{"from": "human", "value": MQA_USER_TEXT}, {"from": "gpt", "value": "B. close door"}],
        True,
    ),
    "multi_turn_video": (
        [
            {"from": "human", "value": "<image>\nWhat is in the sink?\n\nAnswer briefly."},
            {"from": "gpt", "value": "A red pan.\nIt is wet."},
            {"from": "human", "value": "And then?  (two spaces)\n"},
            {"from": "gpt", "value": "The person rinses it:\n1. tap on\n2. rinse"},
        ],
        True,
    ),
    "no_video_text_only": (
        [
            {"from": "human", "value": "Name a kitchen tool.\n"},
            {"from": "gpt", "value": "A whisk.\n\n"},
            {"from": "human", "value": "Another?"},
            {"from": "gpt", "value": "Tongs."},
        ],
        False,
    ),
    "leading_gpt_turn_dropped": (
        [
            {"from": "gpt", "value": "This greeting is dropped."},
            {"from": "human", "value": "<image>\nDescribe."},
            {"from": "gpt", "value": "Cutting an onion."},
        ],
        True,
    ),
    "role_content_keys_and_system_turn": (
        [
            {"role": "user", "content": "<image>\nwhat now?"},
            {"role": "assistant", "content": "wash hands"},
            {"role": "system", "content": "Be brief.\n"},
            {"role": "user", "content": "ok"},
            {"role": "assistant", "content": "done"},
        ],
        True,
    ),
}


@pytest.fixture(scope="module")
def tokenizer():
    return load_qwen_tokenizer()


@pytest.fixture(scope="module")
def reference_tokenizer(tokenizer):
    ref = copy.deepcopy(tokenizer)
    ref.add_tokens(["<image>"], special_tokens=True)
    ref.chat_template = SPEC_CHAT_TEMPLATE
    return ref


def reference_preprocess_qwen(conversation, ref_tok, has_image):
    """Upstream preprocess_qwen (llavaction/train/train.py:587-660 @bd9f465), step by step, on the tokenizer that
    knows <image> as a special token."""
    image_id = ref_tok.convert_tokens_to_ids("<image>") if has_image else None
    im_start = ref_tok.convert_tokens_to_ids("<|im_start|>")
    im_end = ref_tok.convert_tokens_to_ids("<|im_end|>")
    unmask = [198, im_start, im_end]
    roles = {"human": "user", "gpt": "assistant"}

    def encode(role, content):
        return list(ref_tok.apply_chat_template([{"role": role, "content": content}], return_dict=False))

    ids = encode("system", "You are a helpful assistant.")
    tgt = [-100] * len(ids)
    first = conversation[0]
    if roles.get(first.get("from"), first.get("role")) != "user":
        conversation = conversation[1:]
    for turn in conversation:
        role = turn["role"] if "role" in turn else turn["from"]
        content = turn["content"] if "content" in turn else turn["value"]
        role = roles.get(role, role)
        enc = encode(role, content)
        ids += enc
        tgt += [-100] * len(enc) if role in ("user", "system") else enc
    for p, t in enumerate(ids):
        if t in unmask:
            tgt[p] = t
        if has_image and t == image_id:
            ids[p] = -200
    return ids, tgt


def test_bundled_tokenizer_is_qwen2(tokenizer):
    assert (bundled_qwen_tokenizer_dir() / "tokenizer.json").is_file()
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    assert tokenizer("\n").input_ids == [198]
    assert tokenizer.bos_token_id is None  # so tokenizer_image_token keeps no BOS


def test_missing_tokenizer_dir_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_qwen_tokenizer(tmp_path)


def test_inference_prompt_is_byte_exact():
    assert chat.build_inference_prompt(MQA_USER_TEXT) == MQA_PROMPT
    assert chat.build_inference_prompt("hi", system_message="S.") == (
        "<|im_start|>system\nS.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_tokenizer_image_token_splits_and_inserts_placeholder(tokenizer):
    ids = chat.tokenizer_image_token(MQA_PROMPT, tokenizer)
    before, after = MQA_PROMPT.split("<image>")
    assert before == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    assert ids == tokenizer(before).input_ids + [-200] + tokenizer(after).input_ids
    assert ids.count(-200) == 1
    assert ids[:3] == [151644, 8948, 198]  # <|im_start|> "system" "\n": no BOS in front
    assert tokenizer.decode(ids[ids.index(-200) + 1 :]) == after
    # Tokenizing the chunks separately differs from tokenizing "<image>" as text (which merges ">\n").
    assert tokenizer(MQA_PROMPT).input_ids != [t for t in ids if t != -200]


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_preprocess_qwen_matches_reference(name, tokenizer, reference_tokenizer):
    conversation, has_image = SAMPLES[name]
    got = chat.preprocess_qwen(conversation, tokenizer, has_image, sample_id=name)
    want_ids, want_labels = reference_preprocess_qwen(conversation, reference_tokenizer, has_image)
    assert got.input_ids.dtype == np.int32 and got.labels.dtype == np.int32
    assert got.input_ids.tolist() == want_ids
    assert got.labels.tolist() == want_labels
    assert (got.input_ids == -200).sum() == int(has_image)


def test_mqa_labels_are_prompt_plus_answer(tokenizer):
    answer = "B. close door"
    got = chat.preprocess_qwen(SAMPLES["ek100_mqa"][0], tokenizer, has_image=True)
    # The training sequence is the inference prompt followed by the answer and "<|im_end|>\n".
    assert got.input_ids.tolist() == chat.tokenizer_image_token(MQA_PROMPT + answer + "<|im_end|>\n", tokenizer)
    prompt_len = len(chat.tokenizer_image_token(MQA_PROMPT, tokenizer))
    header_len = len(tokenizer("<|im_start|>assistant\n").input_ids)
    # Everything after the user turn is a target: the assistant header, the answer, <|im_end|> and "\n".
    user_end = prompt_len - header_len
    assert got.labels[user_end:].tolist() == got.input_ids[user_end:].tolist()
    assert tokenizer.decode(got.labels[prompt_len:]) == answer + "<|im_end|>\n"
    # Inside system + user turns only "\n" (198), <|im_start|> and <|im_end|> are targets.
    prompt_labels = got.labels[:user_end]
    targets = prompt_labels[prompt_labels != -100]
    assert set(targets.tolist()) == {198, 151644, 151645}
    assert (prompt_labels == -100).sum() > 50
    # " \n" after "move knife'." is its own token (not 198), so it stays masked.
    assert got.labels[got.input_ids == -200].tolist() == [-100]


def test_placeholder_errors_name_the_sample(tokenizer):
    one_turn = lambda text: [{"from": "human", "value": text}, {"from": "gpt", "value": "x"}]  # noqa: E731
    with pytest.raises(ValueError, match=r"sample 'P01_11_7'.*no message contains"):
        chat.preprocess_qwen(one_turn("no placeholder"), tokenizer, True, sample_id="P01_11_7")
    with pytest.raises(ValueError, match=r"sample 'vid-2'.*2 <image> placeholders"):
        chat.preprocess_qwen(one_turn("<image>\na<image>"), tokenizer, True, sample_id="vid-2")
    with pytest.raises(ValueError, match=r"sample 3.*no video is attached"):
        chat.preprocess_qwen(one_turn("<image>\nq"), tokenizer, False, sample_id=3)
    bad_role = [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "<image>"}]
    with pytest.raises(ValueError, match=r"sample 'r'.*2 <image>"):
        chat.preprocess_qwen(bad_role, tokenizer, True, sample_id="r")
    in_answer = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "<image>"}]
    with pytest.raises(ValueError, match=r"sample 'a'.*assistant message"):
        chat.preprocess_qwen(in_answer, tokenizer, True, sample_id="a")
    with pytest.raises(ValueError, match=r"sample 'k'.*unknown role 'robot'"):
        chat.preprocess_qwen([{"from": "robot", "value": "q"}], tokenizer, False, sample_id="k")


def test_max_len_truncates_and_protects_placeholder(tokenizer):
    conversation, _ = SAMPLES["multi_turn_video"]
    full = chat.preprocess_qwen(conversation, tokenizer, True)
    cut = chat.preprocess_qwen(conversation, tokenizer, True, max_len=30)
    assert len(full.input_ids) > 30 and len(cut.input_ids) == 30
    assert cut.input_ids.tolist() == full.input_ids[:30].tolist()
    assert cut.labels.tolist() == full.labels[:30].tolist()
    with pytest.raises(ValueError, match=r"sample 's'.*drops the <image>"):
        chat.preprocess_qwen(conversation, tokenizer, True, max_len=5, sample_id="s")


def test_move_placeholder_to_front():
    conversation = [
        {"from": "human", "value": "What happens here? <image> QA_GT_caption_based_noisy"},
        {"from": "gpt", "value": "<image> stays when it starts the message"},
    ]
    moved = chat.move_placeholder_to_front(conversation)
    assert moved[0]["value"] == "<image>\nWhat happens here?  "
    assert moved[1]["value"] == conversation[1]["value"]
    assert conversation[0]["value"].startswith("What")  # input untouched
