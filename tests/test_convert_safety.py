"""Malformed safetensors are rejected like the reference reader does, and one conversion plan serves every path."""

import json
import struct

import numpy as np
import pytest
from _convert_fixtures import make_upstream_checkpoint, tiny_cfg, upstream_tensors
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file

from llavaction_jax.cli import main
from llavaction_jax.convert import from_torch
from llavaction_jax.convert.import_plan import torch_to_params
from llavaction_jax.convert.keys import ConversionError, expected_keys, map_key, upstream_keys
from llavaction_jax.convert.safetensors_io import SafetensorsCheckpoint, SafetensorsError
from llavaction_jax.model import llava
from llavaction_jax.tree import flatten_paths


def write_raw(path, header: dict, data: bytes) -> None:
    """A safetensors file exactly as given: offsets are not checked or fixed here."""
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def f32(name, n, begin):
    return {name: {"dtype": "F32", "shape": [n], "data_offsets": [begin, begin + 4 * n]}}


BAD = {  # name: (header, data length, tensor the error names, what the reference reader says)
    "overlap": ({**f32("a", 2, 0), **f32("b", 2, 0)}, 8, "b", "invalid offset"),
    "partial-overlap": ({**f32("a", 2, 0), **f32("b", 2, 4)}, 12, "b", "invalid offset"),
    "gap": ({**f32("a", 2, 0), **f32("b", 2, 12)}, 20, "b", "invalid offset"),
    "uncovered-tail": (f32("a", 2, 0), 12, None, "not fully covered"),
}


@pytest.mark.parametrize("case", BAD)
def test_overlapping_gapped_or_uncovered_offsets_are_rejected_like_the_reference(case, tmp_path):
    header, size, tensor, reference = BAD[case]
    path = tmp_path / "x.safetensors"
    write_raw(path, header, bytes(size))
    with pytest.raises(SafetensorError, match=reference):  # the official reader refuses it ...
        safe_open(path, "np")
    with pytest.raises(SafetensorsError) as err:  # ... and so do we, naming the file and the tensor
        SafetensorsCheckpoint(path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    assert tensor is None or f"tensor {tensor!r}" in message


def test_offsets_listed_out_of_header_order_are_fine(tmp_path):
    path = tmp_path / "x.safetensors"
    data = np.arange(4, dtype=np.float32).tobytes()
    write_raw(path, {**f32("b", 2, 8), **f32("a", 2, 0)}, data)
    ref = load_file(path)
    with SafetensorsCheckpoint(path) as ck:
        assert all(ck.read(k).tobytes() == ref[k].tobytes() for k in ("a", "b"))


def test_an_lm_head_aliasing_the_embedding_is_refused_with_one_line(tmp_path, capsys):
    """A file whose lm_head offsets point at the embedding's bytes used to convert, lm_head silently a copy."""
    make_upstream_checkpoint(tmp_path / "src", dtype="float32", shards=1)
    file = tmp_path / "src" / "model.safetensors"
    (n,) = struct.unpack("<Q", file.read_bytes()[:8])
    header = json.loads(file.read_bytes()[8:8 + n])
    head, embed = header["lm_head.weight"], header["model.embed_tokens.weight"]
    assert head["shape"] == embed["shape"]  # [vocab, hidden] both
    data = bytearray(file.read_bytes()[8 + n:])
    begin, end = head["data_offsets"]
    del data[begin:end]  # drop lm_head's own bytes and shift what followed
    for info in header.values():
        if isinstance(info, dict) and "data_offsets" in info and info["data_offsets"][0] >= end:
            info["data_offsets"] = [o - (end - begin) for o in info["data_offsets"]]
    head["data_offsets"] = list(embed["data_offsets"])  # lm_head now reads the embedding's bytes
    write_raw(file, header, bytes(data))
    with pytest.raises(SafetensorError):
        safe_open(file, "np")
    assert main(["convert", "from-torch", str(tmp_path / "src"), "--out", str(tmp_path / "ours"), "--no-progress"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    # the source has no checksums.json: one warning says so before the error (tests/test_convert.py checks it)
    errors = [line for line in lines if not line.startswith("warning: ")]
    assert len(errors) == 1, lines
    err = errors[0]
    assert "model.safetensors" in err and "overlaps" in err
    assert "lm_head.weight" in err or "model.embed_tokens.weight" in err
    assert not (tmp_path / "ours").exists()


# ---------------------------------------------------------------------------------------- one plan
def test_expected_keys_are_derived_from_the_specs_and_map_back():
    for heads in (True, False):
        for tied in (True, False):
            cfg = tiny_cfg(heads, tied)
            specs = flatten_paths(llava.param_specs(cfg))
            table = expected_keys(specs)
            assert [k for k, *_ in table] == list(upstream_keys(cfg))
            assert len({k for k, *_ in table}) == len(table)
            assert {path for _, path, _, _ in table} == set(specs)  # every parameter, nothing else
            for key, path, layer, tf in table:
                assert map_key(key) == (path, layer, tf)
            assert ("lm_head.weight" in dict((k, 0) for k, *_ in table)) == (not tied)
    keys = list(upstream_keys(tiny_cfg()))
    assert keys[:4] == ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                        "model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.k_proj.weight"]
    assert keys[-4:] == ["lm_head.weight", "verb_head.weight", "noun_head.weight", "action_head.weight"]


def test_in_memory_state_dicts_go_through_the_same_plan(tmp_path):
    cfg = tiny_cfg()
    tensors = upstream_tensors(cfg, "float32")
    params = flatten_paths(torch_to_params(tensors, cfg))
    make_upstream_checkpoint(tmp_path / "src", dtype="float32")
    _, loaded = from_torch.load_torch(tmp_path / "src")
    assert all(np.array_equal(v, np.asarray(flatten_paths(loaded)[k])) for k, v in params.items())
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.mlp.extra_proj.weight"] = np.zeros(2, np.float32)
    with pytest.raises(ConversionError) as err:  # the same messages as a checkpoint on disk
        torch_to_params(tensors, cfg)
    assert "missing keys" in str(err.value) and "model.layers.1.mlp.up_proj.weight" in str(err.value)
    assert "unexpected keys" in str(err.value) and "model.layers.0.mlp.extra_proj.weight" in str(err.value)
