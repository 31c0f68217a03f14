"""LLaVAction in JAX: SigLIP + projector + Qwen2 video LLM for action recognition (see README.md)."""

__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it)

from llavaction_jax.config import ModelConfig, TextConfig, VisionConfig  # noqa: E402

__all__ = ["ModelConfig", "TextConfig", "VisionConfig", "LlavaModel", "load_pretrained"]


def __getattr__(name):  # keep `import llavaction_jax` light: JAX-heavy modules load on first use
    if name in ("LlavaModel", "load_pretrained"):
        from llavaction_jax import api

        return getattr(api, name)
    raise AttributeError(name)
