"""README.md's Python blocks run as written, on one CPU device, the first one twice in a row (the second run must not
trip over what the first wrote). The blocks are read from README.md itself; the names they use for a user's files
("ckpt/llavaction-7b", "P01_11.MP4") are made here, in a fresh working directory: a tiny model with its own small
tokenizer, and a 15 s video."""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np

from _video_fixtures import known_frames, write_mp4

REPO = pathlib.Path(__file__).resolve().parents[1]


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (REPO / "README.md").read_text(), re.M | re.S)


def test_the_readmes_python_blocks_run_as_written_on_one_cpu(tmp_path):
    blocks = python_blocks()
    assert len(blocks) == 2 and "save_pretrained" in blocks[0] and "read_clip" in blocks[1]
    setup = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
from llavaction_jax.api import LlavaModel
from llavaction_jax.config import load_preset
from llavaction_jax.data.tokenizer import train_chatml_tokenizer
texts = ["<image>\\nWhat action are you doing? A. open door, B. take cup", "A. open door", "B. take cup",
         "You are a helpful assistant. system user assistant"]
train_chatml_tokenizer(texts * 4, 300, "tokenizer")
LlavaModel.random(load_preset("tiny"), seed=1).save_pretrained("ckpt/llavaction-7b", tokenizer_dir="tokenizer")
"""
    write_mp4(tmp_path / "P01_11.MP4", known_frames(0, 150, 64, 64), fps=10)  # 15 s: the block's clip is 12.5-14.2 s
    script = "\n".join([setup, blocks[0], "first = path", blocks[0], blocks[1],
                        "import json, numpy as np",
                        "print('RESULT', json.dumps({'loss': float(out.loss), 'paths': [first, path],",
                        "    'finite': bool(np.isfinite(np.asarray(out.logits)).all()),",
                        "    'devices': len(sharded.mesh.devices.flat)}))"])
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user has
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(run.stdout.split("RESULT", 1)[1])
    assert result["finite"] and np.isfinite(result["loss"]) and result["devices"] == 1
    assert result["paths"][0] != result["paths"][1] and all(pathlib.Path(p).is_dir() for p in result["paths"])
