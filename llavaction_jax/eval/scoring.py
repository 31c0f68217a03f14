"""Option scoring: the log-likelihood of every answer option given the video and the prompt (beyond upstream).

Upstream only generates an answer and parses it (llavaction/action/llava_inference.py: llava_inference,
llavaction/action/ek_eval.py: process_raw_pred). Scoring instead asks the model how likely it is to
answer with each option, exactly as it was trained to answer: the assistant turn of an EK100 MQA training sample is
``"{letter}. {answer}"`` followed by ``<|im_end|>`` (llavaction/action/generate_description.py,
llavaction/train/train.py: preprocess_qwen). So the continuation scored for option
``"C. open door"`` is the token ids of ``"C. open door"`` then the ``<|im_end|>`` id, appended right after the
prompt (which ends with ``"<|im_start|>assistant\\n"``). Tokenizing the option on its own gives the same ids as
tokenizing prompt + option together, because Qwen2's pre-tokenizer never merges the prompt's final ``"\\n"`` into
the next word (checked in tests/test_scoring.py). Including ``<|im_end|>`` scores "this exact answer, then stop",
so an option that is a prefix of another ("take cup" / "take cup holder") is not favoured for free.

The answer is the option with the highest total log-probability (``logprob_sum``); ``logprob_mean`` (per token,
length-normalised) is reported beside it.

Cost: the video and prompt run through the model once per question (prefill into the KV cache). The options are
then scored as continuations of that cache: the prompt cache is broadcast over the options (row b*C + c continues
question b with option c) and each option is written right after its prompt, at the prompt's length, so RoPE
positions and the causal mask are those of the single sequence prompt + option. With ``options_per_pass=None`` all
options go through in one batched pass (the cache is copied K times); a smaller chunk scans over the options in
groups, trading passes for memory (the cache is then copied C times; a 16-frame 7B prompt's cache is ~0.2 GB, a
64-frame one ~0.8 GB).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from llavaction_jax.config import ModelConfig
from llavaction_jax.model import llava, qwen2


def option_token_ids(tokenizer, options: list[str], end_id: int) -> list[list[int]]:
    """The scored continuation of every option: ids of the option text as the model answers it, then ``end_id``
    (``<|im_end|>``)."""
    encoded = tokenizer(list(options), add_special_tokens=False)["input_ids"]
    return [list(ids) + [end_id] for ids in encoded]


def pad_options(per_question: list[list[list[int]]], num_options: int,
                max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Ragged option ids -> (ids int32 (B, K, M), mask bool (B, K, M)); a question with fewer than K options gets
    all-False rows (scored -inf). Raises if an option is longer than M tokens."""
    ids = np.zeros((len(per_question), num_options, max_tokens), np.int32)
    mask = np.zeros(ids.shape, bool)
    for b, options in enumerate(per_question):
        if len(options) > num_options:
            raise ValueError(f"question {b} has {len(options)} options, the batch layout holds {num_options}")
        for k, tokens in enumerate(options):
            if len(tokens) > max_tokens:
                raise ValueError(f"option {k} of question {b} has {len(tokens)} tokens, more than {max_tokens}")
            ids[b, k, : len(tokens)], mask[b, k, : len(tokens)] = tokens, True
    return ids, mask


def _token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log softmax(logits)[target], fp32, without materialising the normalised table."""
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


@functools.partial(jax.jit, static_argnames=("cfg", "out_len", "vocab_limit", "options_per_pass"))
def score_options(params: dict, cfg: ModelConfig, input_ids, pixel_values, attention_mask, option_ids, option_mask,
                  out_len: int | None = None, vocab_limit: int | None = None,
                  options_per_pass: int | None = None, num_frames=None) -> dict:
    """Log-likelihood of each option continuation.

    input_ids (B, L) prompts with one -200 each (right-padded, ``attention_mask`` marks real tokens); pixel_values
    (B, T, C, H, W) or None; option_ids / option_mask (B, K, M) from :func:`pad_options`; ``options_per_pass`` C
    (a divisor of K; default K) options share one pass over the broadcast cache; ``num_frames`` (B,) int: row i's
    video is its first num_frames[i] frames (default: all T).
    Returns {"token_logprobs" (B, K, M) (0 at padding), "logprob_sum" (B, K), "logprob_mean" (B, K),
    "num_tokens" (B, K)}; options without tokens score -inf.
    """
    s = llava.embed_inputs(params, cfg, input_ids, pixel_values, attention_mask, out_len=out_len,
                           num_frames=num_frames)
    text = params["text"]
    b, s_len = s.valid.shape
    k, m = option_ids.shape[1:]
    c = options_per_pass or k
    if k % c:
        raise ValueError(f"options_per_pass={c} does not divide the {k} options")
    lengths = s.valid.sum(axis=1).astype(jnp.int32)

    cache = qwen2.init_cache(cfg.text, b, s_len + m, s.embeds.dtype)  # room for one option after the longest prompt
    decode = functools.partial(qwen2.forward_cached, text, cfg=cfg.text, attn_impl=cfg.attention,
                               platform=cfg.platform)
    h, cache = decode(s.embeds, jnp.zeros((b,), jnp.int32), cache, prefill=True)
    # lm_head is always given (B, T, H): its sharding constraint names three axes.
    last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)  # (B, 1, H) predicts each option's 1st token
    first = _token_logprobs(qwen2.lm_head(text, last, vocab_limit), option_ids[:, :, 0])  # (B, K)

    def score_chunk(_, ids):  # ids (B, C, M): C options of every question, each continuing its prompt's cache
        x = qwen2.embed(text, ids.reshape(b * c, m), s.embeds.dtype)
        h, _ = decode(x, jnp.repeat(lengths, c), cache.repeat_rows(c))  # row b*C + j continues question b
        lp = _token_logprobs(qwen2.lm_head(text, h[:, :-1], vocab_limit), ids.reshape(b * c, m)[:, 1:])
        return None, lp.reshape(b, c, m - 1)  # token j's hidden state predicts token j + 1

    chunks = option_ids.reshape(b, k // c, c, m).transpose(1, 0, 2, 3)
    # (K/C, B, C, M-1); unrolled where sharded work must not sit inside a loop (ModelConfig.resolved)
    _, rest = jax.lax.scan(score_chunk, None, chunks, unroll=cfg.loop_collectives == "off")
    rest = rest.transpose(1, 0, 2, 3).reshape(b, k, m - 1)

    token_logprobs = jnp.where(option_mask, jnp.concatenate([first[..., None], rest], axis=-1), 0.0)
    num_tokens = option_mask.sum(axis=-1)
    total = jnp.where(num_tokens > 0, token_logprobs.sum(axis=-1), -jnp.inf)
    return {"token_logprobs": token_logprobs, "logprob_sum": total,
            "logprob_mean": total / jnp.maximum(num_tokens, 1), "num_tokens": num_tokens}
