"""Streaming conversion: flat memory whatever the model size, Orbax-native checkpoints, old checkpoints still
load, and an interrupted conversion (a real SIGKILL) never blocks the next run."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from _convert_fixtures import make_upstream_checkpoint

import llavaction_jax
from llavaction_jax import checkpoint_io
from llavaction_jax.cli import main
from llavaction_jax.convert import from_torch, orbax_stream, staging, to_torch
from llavaction_jax.tree import flatten_paths

ROOT = pathlib.Path(__file__).resolve().parents[1]


def leaves(model) -> dict:
    return {k: np.asarray(v) for k, v in flatten_paths(model.params).items()}


def test_stored_chunks_fit_the_buffer_and_orbax_reads_the_checkpoint(tmp_path):
    import jax
    import orbax.checkpoint as ocp

    make_upstream_checkpoint(tmp_path / "src", dtype="bfloat16")
    buffer = 64 * 1024
    from_torch.import_checkpoint(tmp_path / "src", tmp_path / "ours", progress=False, buffer_bytes=buffer)
    stored = orbax_stream.StoredArrays(tmp_path / "ours" / checkpoint_io.PARAMS_DIR)
    mlp = stored.open("text/layers/mlp/up/kernel")  # [2, 128, 256] bf16: 128 KiB, more than a chunk may hold
    assert mlp.shape == (2, 128, 256)
    for path, (shape, dtype) in stored.params.items():
        chunk = stored.open(path).chunk_layout.read_chunk.shape
        assert int(np.prod(chunk)) * dtype.itemsize <= buffer // 4, (path, chunk)
    # cut across layers, then along the torch rows (the kernel's last axis), never across the contiguous axis
    assert tuple(mlp.chunk_layout.read_chunk.shape) == (1, 128, 64)

    # Orbax wrote every metadata file itself; its own readers see the parameters
    meta = ocp.StandardCheckpointer().metadata(tmp_path / "ours" / checkpoint_io.PARAMS_DIR)
    tree = flatten_paths(dict(getattr(meta, "item_metadata", meta).tree))
    assert {p: (tuple(m.shape), np.dtype(m.dtype)) for p, m in tree.items()} == stored.params
    cfg = checkpoint_io.load_config(tmp_path / "ours")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {p: jax.ShapeDtypeStruct(s, d, sharding=device) for p, (s, d) in stored.params.items()}
    from llavaction_jax.tree import unflatten_paths

    restored = flatten_paths(checkpoint_io.restore_params(tmp_path / "ours", unflatten_paths(abstract)))
    in_memory = flatten_paths(from_torch.load_torch(tmp_path / "src")[1])
    assert cfg.param_dtype == "bfloat16" and set(restored) == set(in_memory)
    for path, value in in_memory.items():
        assert np.asarray(restored[path]).tobytes() == np.asarray(value).tobytes(), path
    assert not staging.staging_dir(tmp_path / "ours").exists() and not (tmp_path / "ours" / staging.MARKER).exists()


def test_a_checkpoint_in_the_old_format_still_loads_and_exports(tmp_path):
    """Before streaming, the converter's params/ was one plain Orbax save of the whole tree (one chunk per
    array), as `checkpoint_io.save_model` still writes; such a directory must keep loading and exporting."""
    import orbax.checkpoint as ocp

    config, tensors = make_upstream_checkpoint(tmp_path / "src", dtype="float32")
    cfg, params = from_torch.load_torch(tmp_path / "src")
    old = tmp_path / "old"
    old.mkdir()
    with ocp.StandardCheckpointer() as ck:  # StandardSave of the params tree, what the old converter produced
        ck.save(old / checkpoint_io.PARAMS_DIR, params)
    cfg.save(old / checkpoint_io.CONFIG_FILE)
    (old / "config.json").write_text(json.dumps(config))

    new = tmp_path / "new"
    from_torch.import_checkpoint(tmp_path / "src", new, progress=False, buffer_bytes=4096)
    a, b = llavaction_jax.load_pretrained(old), llavaction_jax.load_pretrained(new)
    assert a.cfg == b.cfg
    assert all(np.array_equal(v, leaves(b)[k]) for k, v in leaves(a).items())
    files = to_torch.export_checkpoint(old, tmp_path / "back", progress=False, buffer_bytes=4096)
    from safetensors.numpy import load_file

    back = {k: v for f in files for k, v in load_file(f).items()}
    assert set(back) == set(tensors) and all(back[k].tobytes() == tensors[k].tobytes() for k in tensors)


# ------------------------------------------------------------------------------------ flat peak memory
def _big_config(vocab_size: int = 65536):
    from llavaction_jax.bench.convert import bench_config

    cfg = bench_config(2)  # a 65536 x 2048 bf16 embedding and lm_head: 268 MB each, the largest parameters
    import dataclasses

    return cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=vocab_size, intermediate_size=2048))


def test_peak_memory_stays_near_the_buffer_not_the_largest_parameter(tmp_path):
    from llavaction_jax.bench.convert import _BASELINE, measure, same_tensors, write_source

    size, _ = write_source(tmp_path / "torch", _big_config())
    largest = 65536 * 2048 * 2
    assert size > 2 * largest
    py = [sys.executable, "-m", "llavaction_jax", "convert"]
    _, base = measure([sys.executable, "-c", _BASELINE])
    _, rss_in = measure(py + ["from-torch", str(tmp_path / "torch"), "--out", str(tmp_path / "ours"), "--no-progress",
                              "--vision-config", str(tmp_path / "siglip.json"), "--buffer-size", "16MiB"])
    _, rss_out = measure(py + ["to-torch", str(tmp_path / "ours"), "--out", str(tmp_path / "back"), "--no-progress",
                               "--buffer-size", "16MiB"])
    # holding one whole embedding would already cost `largest` (268 MB) over the baseline
    assert rss_in - base < largest * 0.6, (rss_in - base) / 1e6
    assert rss_out - base < largest * 0.6, (rss_out - base) / 1e6
    assert same_tensors(tmp_path / "torch", tmp_path / "back", ["model.embed_tokens.weight", "lm_head.weight"])


# --------------------------------------------------------------------------------- interrupted conversion
def test_a_conversion_killed_mid_write_does_not_block_the_rerun(tmp_path):
    from llavaction_jax.bench.convert import write_source

    write_source(tmp_path / "torch", _big_config(vocab_size=16384))  # 230 MB: hundreds of 1 MiB writes to kill in
    dst = tmp_path / "ours"
    stage = staging.staging_dir(dst)
    cmd = [sys.executable, "-m", "llavaction_jax", "convert", "from-torch", str(tmp_path / "torch"), "--out", str(dst),
           "--no-progress", "--vision-config", str(tmp_path / "siglip.json"), "--buffer-size", "1MiB"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not any(stage.glob("params*/**/d/*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)  # until array data is being written under the staging folder
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        proc.kill()
    assert (stage / staging.MARKER).is_file() and any(stage.glob("params*"))  # a partial leftover, marked ours
    assert not dst.exists()  # nothing half-written where the user looks

    assert main(cmd[3:]) == 0  # the rerun recognises the leftover as ours and replaces it
    assert not stage.exists() and not (dst / staging.MARKER).exists()
    model = llavaction_jax.load_pretrained(dst)
    assert model.params["text"]["embed"].shape == (16384, 2048)

    # killed between renaming the staging folder into place and removing its marker: still ours, replaced
    (dst / staging.MARKER).write_text("{}")
    assert main(cmd[3:]) == 0 and not (dst / staging.MARKER).exists() and checkpoint_io.is_model_dir(dst)


def test_a_leftover_staging_folder_that_is_not_ours_is_left_alone(tmp_path):
    make_upstream_checkpoint(tmp_path / "src")
    stage = staging.staging_dir(tmp_path / "ours")
    stage.mkdir()
    (stage / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an interrupted conversion"):
        from_torch.import_checkpoint(tmp_path / "src", tmp_path / "ours", progress=False)
    assert (stage / "notes.txt").read_text() == "mine"


def test_from_torch_refuses_a_non_empty_destination_and_changes_nothing(tmp_path, capsys):
    make_upstream_checkpoint(tmp_path / "src")
    dst = tmp_path / "mine"
    dst.mkdir()
    files = {"config.json": '{"user": "config"}', "tokenizer.json": '{"user": "tokenizer"}', "notes.txt": "x"}
    for name, text in files.items():
        (dst / name).write_text(text)
    assert main(["convert", "from-torch", str(tmp_path / "src"), "--out", str(dst), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(dst) in err and "not empty" in err
    assert {p.name: p.read_text() for p in dst.iterdir()} == files
    assert not staging.staging_dir(dst).exists()
    # an empty folder is fine, and so is a new one
    (tmp_path / "empty").mkdir()
    assert main(["convert", "from-torch", str(tmp_path / "src"), "--out", str(tmp_path / "empty"),
                 "--no-progress"]) == 0
    assert checkpoint_io.is_model_dir(tmp_path / "empty")
    assert main(["convert", "to-torch", str(tmp_path / "empty"), "--out", str(dst), "--no-progress"]) == 2
    assert {p.name: p.read_text() for p in dst.iterdir()} == files
