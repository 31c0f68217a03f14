"""Option scoring: the prompt prefilled once, options scored over the broadcast cache, equals a full forward of
prompt + option; the scored continuation tokenizes the same alone as after the prompt."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llavaction_jax.config import preset_configs
from llavaction_jax.data.option_tokens import option_token_ids, pad_options
from llavaction_jax.model import decode, llava
from llavaction_jax.sharding import resolve_execution

CFG, EX = preset_configs("tiny")
EX = resolve_execution(EX)
# the entry points' compile boundary (api.answer_step)
score_options = jax.jit(decode.score_options, static_argnums=(1, 2), static_argnames="options_per_pass")
FRAMES = 2


@pytest.fixture(scope="module")
def params():
    # one compile, not one per leaf; rbg compiles much faster than threefry on CPU
    return jax.jit(llava.init, static_argnums=0)(CFG, jax.random.key(2, impl="rbg"))


@pytest.fixture(scope="module")
def batch():
    """3 right-padded prompts of different lengths, up to 4 options of 1-5 tokens (question 1 has only 3)."""
    rng = np.random.default_rng(0)
    lengths, width = (12, 7, 9), 12
    ids, mask = np.zeros((3, width), np.int32), np.zeros((3, width), bool)
    for b, n in enumerate(lengths):
        ids[b, :n] = rng.integers(10, CFG.text.vocab_size, size=n)
        ids[b, 2] = -200
        mask[b, :n] = True
    options = [[list(rng.integers(10, CFG.text.vocab_size, size=rng.integers(1, 6))) for _ in range(n_opt)]
               for n_opt in (4, 3, 4)]
    pixels = rng.uniform(-1, 1, size=(3, FRAMES, 3, 64, 64)).astype(np.float32)
    return ids, mask, pixels, options


def reference_logprobs(params, ids, mask, pixels, options):
    """Every (question, option) as its own row: prompt + option through the full forward, log-probs of the option
    tokens read off the logits. One batched forward (rows right-padded), so one compile."""
    rows, row_masks, row_pixels, where = [], [], [], []
    width = ids.shape[1] + max(len(o) for opts in options for o in opts)
    for b, opts in enumerate(options):
        n = int(mask[b].sum())
        for k, tokens in enumerate(opts):
            row = np.zeros(width, np.int32)
            row[:n], row[n : n + len(tokens)] = ids[b, :n], tokens
            rows.append(row)
            row_masks.append(np.arange(width) < n + len(tokens))
            row_pixels.append(pixels[b])
            last_prompt_index = n - 1 + CFG.tokens_per_video(FRAMES) - 1  # after splicing the video in
            where.append((b, k, last_prompt_index, tokens))
    logits = jax.jit(lambda i, x, m: llava.lm_logits(params, llava.forward(params, CFG, EX, i, x, m).hidden))(
        jnp.asarray(np.stack(rows)), jnp.asarray(np.stack(row_pixels)), jnp.asarray(np.stack(row_masks)))
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    out = {}
    for r, (b, k, last, tokens) in enumerate(where):
        out[b, k] = np.array([logp[r, last + j, t] for j, t in enumerate(tokens)])
    return out


def test_scores_equal_full_forward_of_prompt_plus_option(params, batch):
    ids, mask, pixels, options = batch
    option_ids, option_mask = pad_options(options, num_options=4, max_tokens=6)
    got = score_options(params, CFG, EX, jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(mask),
                        jnp.asarray(option_ids), jnp.asarray(option_mask))
    ref = reference_logprobs(params, ids, mask, pixels, options)
    token_lp = np.asarray(got["token_logprobs"])
    for (b, k), expected in ref.items():
        np.testing.assert_allclose(token_lp[b, k, : len(expected)], expected, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(float(got["logprob_sum"][b, k]), expected.sum(), atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(float(got["logprob_mean"][b, k]), expected.mean(), atol=1e-4, rtol=1e-4)
        assert int(got["num_tokens"][b, k]) == len(expected)
    assert float(got["logprob_sum"][1, 3]) == -np.inf  # question 1 has no 4th option
    in_pairs = score_options(params, CFG, EX, jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(mask),
                             jnp.asarray(option_ids), jnp.asarray(option_mask), options_per_pass=2)
    np.testing.assert_allclose(np.asarray(in_pairs["token_logprobs"]), token_lp, atol=1e-5, rtol=1e-5)


def test_option_continuation_tokenizes_the_same_alone_and_after_the_prompt():
    from llavaction_jax.data import chat
    from llavaction_jax.ek100 import prompts
    from llavaction_jax.data.tokenizer import default_tokenizer

    tok = default_tokenizer()
    im_end = tok.convert_tokens_to_ids(chat.IM_END)
    options = prompts.letter_options(["open door", "close door", "take cup", "wash hands 2x", "put-down knife"])
    prompt = chat.build_inference_prompt(prompts.user_message(prompts.mc_prompt(options)))
    prompt_ids = chat.tokenizer_image_token(prompt, tok)
    for option, ids in zip(options, option_token_ids(tok, options, im_end)):
        together = chat.tokenizer_image_token(prompt + option + chat.IM_END, tok)
        assert prompt_ids + ids == together, option
        assert ids[-1] == 151645


def test_pad_options_rejects_what_does_not_fit():
    with pytest.raises(ValueError, match="3 tokens, more than 2"):
        pad_options([[[1, 2, 3]]], num_options=1, max_tokens=2)
    with pytest.raises(ValueError, match="2 options, the batch layout holds 1"):
        pad_options([[[1], [2]]], num_options=1, max_tokens=2)
