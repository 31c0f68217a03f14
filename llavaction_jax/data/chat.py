"""Qwen ChatML conversations: the prompt template, image-placeholder tokenization, and training labels.

Everything here reproduces upstream LLaVAction byte for byte (llavaction/conversation.py: conv_qwen,
llavaction/mm_utils.py: tokenizer_image_token, llavaction/train/train.py: preprocess_multimodal, preprocess_qwen):

* the ``qwen_1_5`` conversation template: system "You are a helpful assistant.", each message rendered as
  ``<|im_start|>{role}\\n{content}<|im_end|>\\n``, the generation prompt ``<|im_start|>assistant\\n``;
* ``tokenizer_image_token``: the prompt is split on ``<image>``, every chunk tokenized on its own, chunks joined
  with the placeholder id -200 (the model later splices the visual tokens there);
* ``llava_video_time_prompt``: LLaVA-Video's time instruction on a generic video question;
* ``preprocess_qwen``: training ids and labels, including upstream's quirk that every standalone ``"\\n"``,
  ``<|im_start|>`` and ``<|im_end|>`` token stays a target even inside system and user turns.

Upstream's ``preprocess_qwen`` adds ``<image>`` to a copy of the tokenizer as a special token and lets
``apply_chat_template`` split the text around it; splitting the text on ``<image>`` ourselves and tokenizing the
pieces gives the same ids (added special tokens always split pre-tokenization) without copying a 150k-entry
tokenizer per sample.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

IMAGE_TOKEN_INDEX = -200  # placeholder id in input_ids where the visual tokens are spliced
IGNORE_INDEX = -100  # label of a position that contributes no loss
IMAGE_PLACEHOLDER = "<image>"  # DEFAULT_IMAGE_TOKEN: where the video goes in a message's text
SYSTEM_MESSAGE = "You are a helpful assistant."
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
GENERATION_PROMPT = IM_START + "assistant\n"

# LLaVA JSON uses "from": human/gpt; chat-style data uses "role": user/assistant. Upstream accepts both.
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant", "system": "system"}
_UNTRAINED_ROLES = ("user", "system")  # their tokens are masked (except the unmasked specials, see above)


class TokenizedConversation(NamedTuple):
    input_ids: np.ndarray  # int32 (L,), IMAGE_TOKEN_INDEX at the placeholder
    labels: np.ndarray  # int32 (L,), IGNORE_INDEX where no loss is taken


def chatml_message(role: str, content: str) -> str:
    """One rendered ChatML message: ``<|im_start|>{role}\\n{content}<|im_end|>\\n``."""
    return f"{IM_START}{role}\n{content}{IM_END}\n"


def build_inference_prompt(user_text: str, system_message: str = SYSTEM_MESSAGE) -> str:
    """Upstream's ``conv_qwen.get_prompt()`` for one user message and an open assistant turn."""
    return chatml_message("system", system_message) + chatml_message("user", user_text) + GENERATION_PROMPT


def llava_video_time_prompt(human_value: str, video_time: float, num_frames: int) -> str:
    """LLaVA-Video's time instruction for generic (non-EK100) video QA (llavaction/train/train.py:1303-1306 @bd9f465).

    ``human_value`` is the first human turn; its own ``<image>`` is removed but the newline after it stays, which
    leaves a blank line (upstream's behaviour).
    """
    return (f"{IMAGE_PLACEHOLDER}\nThe video lasts for {video_time:.2f} seconds, and {num_frames} frames are "
            "uniformly sampled from it. Please answer the following questions related to this video.\n"
            + human_value.replace(IMAGE_PLACEHOLDER, ""))


def tokenizer_image_token(prompt: str, tokenizer, image_token_index: int = IMAGE_TOKEN_INDEX) -> list[int]:
    """Token ids of ``prompt`` with each ``<image>`` replaced by ``image_token_index`` (upstream mm_utils).

    Chunks are tokenized independently with the tokenizer's default special tokens; a BOS (none for Qwen2) is
    kept once at the very start, as upstream does.
    """
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(IMAGE_PLACEHOLDER)]
    bos = getattr(tokenizer, "bos_token_id", None)
    keep_bos = bos is not None and chunks[0][:1] == [bos]
    ids: list[int] = [bos] if keep_bos else []
    for i, chunk in enumerate(chunks):
        if i > 0:
            ids.append(image_token_index)
        ids.extend(chunk[1:] if keep_bos and chunk[:1] == [bos] else chunk)
    return ids


def move_placeholder_to_front(conversations: Sequence[Mapping]) -> list[dict]:
    """Upstream ``preprocess_multimodal``: a message holding exactly one ``<image>`` that is not at its start gets
    the placeholder moved to the front, followed by ``"\\n"``; the videoInstruct noise tag is removed.

    Returns new message dicts; the input is not modified.
    """
    result = []
    for message in conversations:
        message = dict(message)
        key = "value" if "value" in message else "content"
        text = message[key]
        if text.count(IMAGE_PLACEHOLDER) == 1 and not text.startswith(IMAGE_PLACEHOLDER):
            text = (IMAGE_PLACEHOLDER + "\n" + text.replace(IMAGE_PLACEHOLDER, "").strip()).strip()
        message[key] = text.replace("QA_GT_caption_based_noisy", "")
        result.append(message)
    return result


def preprocess_qwen(
    conversations: Sequence[Mapping],
    tokenizer,
    has_image: bool,
    *,
    max_len: int | None = None,
    sample_id: object = None,
    system_message: str = SYSTEM_MESSAGE,
) -> TokenizedConversation:
    """Training ids and labels exactly as upstream ``preprocess_qwen`` (llavaction/train/train.py:587-660 @bd9f465).

    ``conversations``: LLaVA messages ({"from": "human"|"gpt", "value": ...} or {"role", "content"}). A leading
    message that is not from the user is dropped (upstream does the same). With ``has_image`` the user text must
    hold exactly one ``<image>``; without it, none. ``max_len`` truncates ids and labels like upstream's collator
    (upstream's own ``preprocess_qwen`` never truncates: pass None to match it); truncation that would cut the
    placeholder is an error. Errors name ``sample_id``.
    """
    where = f"sample {sample_id!r}" if sample_id is not None else "conversation"
    turns = _read_turns(conversations, where)
    if turns and turns[0][0] != "user":
        turns = turns[1:]
    _check_placeholders(turns, has_image, where)

    messages = [("system", system_message), *turns]
    encoded_messages, newline_ids = _encode_messages([chatml_message(role, text) for role, text in messages], tokenizer)
    newline_id, im_start_id, im_end_id = _unmasked_token_ids(tokenizer, newline_ids)
    ids: list[int] = []
    labels: list[int] = []
    for (role, _), encoded in zip(messages, encoded_messages):
        ids += encoded
        labels += [IGNORE_INDEX] * len(encoded) if role in _UNTRAINED_ROLES else encoded
    input_ids = np.asarray(ids, dtype=np.int32)
    label_ids = np.asarray(labels, dtype=np.int32)
    # Upstream quirk, kept for training parity: these tokens are targets wherever they occur.
    unmasked = np.isin(input_ids, [newline_id, im_start_id, im_end_id])
    label_ids[unmasked] = input_ids[unmasked]

    if max_len is not None and len(input_ids) > max_len:
        if has_image and IMAGE_TOKEN_INDEX not in input_ids[:max_len]:
            raise ValueError(
                f"{where}: truncating {len(input_ids)} tokens to max_len={max_len} drops the <image> placeholder")
        input_ids, label_ids = input_ids[:max_len], label_ids[:max_len]
    return TokenizedConversation(input_ids, label_ids)


def _read_turns(conversations: Sequence[Mapping], where: str) -> list[tuple[str, str]]:
    turns = []
    for i, message in enumerate(conversations):
        if "role" in message and "content" in message:
            role, content = message["role"], message["content"]
        elif "from" in message and "value" in message:
            role, content = message["from"], message["value"]
        else:
            raise ValueError(f"{where}: message {i} has neither from/value nor role/content keys: {sorted(message)}")
        if role not in _ROLE_ALIASES:
            raise ValueError(f"{where}: message {i} has unknown role {role!r}; expected one of {sorted(_ROLE_ALIASES)}")
        if not isinstance(content, str):
            raise ValueError(f"{where}: message {i} content is {type(content).__name__}, expected str")
        turns.append((_ROLE_ALIASES[role], content))
    return turns


def _check_placeholders(turns: list[tuple[str, str]], has_image: bool, where: str) -> None:
    counts = [content.count(IMAGE_PLACEHOLDER) for _, content in turns]
    total = sum(counts)
    if has_image and total == 0:
        raise ValueError(f"{where}: a video is attached but no message contains the {IMAGE_PLACEHOLDER} placeholder")
    if has_image and total > 1:
        raise ValueError(f"{where}: {total} {IMAGE_PLACEHOLDER} placeholders, expected exactly one for one video")
    if not has_image and total:
        raise ValueError(f"{where}: contains {IMAGE_PLACEHOLDER} but no video is attached")
    for (role, _), count in zip(turns, counts):
        if count and role != "user":
            # Upstream would leave the raw <image> id as a target here, teaching the model to emit it.
            raise ValueError(
                f"{where}: the {IMAGE_PLACEHOLDER} placeholder is in a {role} message, expected a user message")


def _encode_messages(texts: list[str], tokenizer) -> tuple[list[list[int]], list[int]]:
    """Each message's ids as apply_chat_template makes them (the rendered text without added special tokens; the
    ``<image>`` placeholder becomes IMAGE_TOKEN_INDEX), and the ids of "\\n": one tokenizer call for all of them
    (a training sample's encoding is mostly tokenization; one call per message cost 10-20% more CPU)."""
    pieces = [text.split(IMAGE_PLACEHOLDER) for text in texts]
    encoded = tokenizer([piece for parts in pieces for piece in parts] + ["\n"], add_special_tokens=False)["input_ids"]
    messages, at = [], 0
    for parts in pieces:
        ids = list(encoded[at])
        for chunk in encoded[at + 1:at + len(parts)]:
            ids.append(IMAGE_TOKEN_INDEX)
            ids.extend(chunk)
        messages.append(ids)
        at += len(parts)
    return messages, list(encoded[at])


def _unmasked_token_ids(tokenizer, newline: list[int]) -> tuple[int, int, int]:
    """Ids of "\\n" (Qwen2: 198, hard-coded upstream; `newline`: how the tokenizer encodes it), <|im_start|> and
    <|im_end|>."""
    im_start, im_end = tokenizer.convert_tokens_to_ids([IM_START, IM_END])
    unk = getattr(tokenizer, "unk_token_id", None)
    if len(newline) != 1 or im_start in (None, unk) or im_end in (None, unk):
        raise ValueError(f"tokenizer {type(tokenizer).__name__} is not a ChatML (Qwen2) tokenizer: "
                         f"'\\n' -> {newline}, {IM_START} -> {im_start}, {IM_END} -> {im_end}")
    return newline[0], im_start, im_end
