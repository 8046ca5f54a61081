"""Hostile and unlucky files given to the conversions: each is one ``error:`` line naming the file, exit
status 2, and nothing written.

The Hugging Face folders here are made by hand (a real config.json, crafted weights and indexes), and
the commands run in-process through their ``main`` (one through ``python -m mesh_transformer.hf``).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mesh_transformer.cli import hf, to_hf
from mesh_transformer.convert.safetensors import INDEX_FILE, SINGLE_FILE
from mesh_transformer.models.registry import load_config
from tests.convert.test_hf import (TRAINING_KEYS, gptj_config, read_safetensors_dir, save_hf_model,
                                   write_native_checkpoint, write_tokenizer)
from tests.helpers import REPO

DEEP = 100_000  # nesting beyond Python's recursion limit


def hf_folder(directory: Path) -> Path:
    """A model folder with a real GPT-J config.json and tokenizer, and no weights yet."""
    gptj_config(n_layer=1, bos_token_id=0, eos_token_id=0).save_pretrained(str(directory))
    write_tokenizer(directory, 60)
    return directory


def safetensors_bytes(header, data: bytes = b"") -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def run_import(source: Path, output: Path, capsys) -> str:
    """``mtj-hf import`` on ``source``; asserts it ended with one error line, status 2, nothing written."""
    status = hf.main(["import", "--hf-path", str(source), "--output", str(output), "--no-progress"])
    return one_error_line(status, capsys, output)


def one_error_line(status: int, capsys, output: Path) -> str:
    err = capsys.readouterr().err
    assert status == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert not output.exists()
    return err


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return hf_folder(tmp_path_factory.mktemp("hostile") / "hf")


# ------------------------------------------------------------------------------------------------
# config.json
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content,what", [
    (b'{"model_type": "gptj",', "not valid JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b"\xff\xfe{}", "not valid JSON"),
    (b"[" * DEEP + b"]" * DEEP, "nested too deeply"),
    (b'{"model_type": ["gptj"]}', "model_type"),
    (b'{"model_type": "gptj", "architectures": 5}', "architectures"),
], ids=["cut", "array", "not-utf8", "deep", "model_type-list", "architectures-int"])
def test_an_hf_config_json_that_is_not_a_config_object_is_one_line(tmp_path, capsys, content, what):
    source = hf_folder(tmp_path / "hf")
    (source / "config.json").write_bytes(content)
    err = run_import(source, tmp_path / "out", capsys)
    assert f"{source / 'config.json'}: " in err and what in err


# ------------------------------------------------------------------------------------------------
# safetensors headers
# ------------------------------------------------------------------------------------------------

TENSOR = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
BAD_HEADERS = {
    "a list": ([TENSOR], "not a JSON object"),
    "string offsets": ({"w": {**TENSOR, "data_offsets": ["0", "8"]}}, "data_offsets"),
    "boolean offsets": ({"w": {**TENSOR, "data_offsets": [False, True]}}, "data_offsets"),
    "three offsets": ({"w": {**TENSOR, "data_offsets": [0, 4, 8]}}, "data_offsets"),
    "offsets out of order": ({"w": {**TENSOR, "data_offsets": [8, 0]}}, "data_offsets"),
    "negative offsets": ({"w": {**TENSOR, "data_offsets": [-8, 0]}}, "data_offsets"),
    "a negative shape": ({"w": {**TENSOR, "shape": [-1, -2]}}, "shape"),
    "a float shape": ({"w": {**TENSOR, "shape": [2.0]}}, "shape"),
    "a shape not spanning its bytes": ({"w": {**TENSOR, "shape": [3]}}, "12 bytes"),
    "an unknown dtype": ({"w": {**TENSOR, "dtype": "F33"}}, "dtype"),
    "an entry that is not an object": ({"w": [0, 8]}, "tensor 'w'"),
    "a missing key": ({"w": {"dtype": "F32", "shape": [2]}}, "data_offsets"),
    "metadata that is not an object": ({"__metadata__": ["pt"], "w": TENSOR}, "__metadata__"),
    "metadata values that are not strings": ({"__metadata__": {"format": 1}, "w": TENSOR}, "__metadata__"),
    "offsets beyond the file": ({"w": {**TENSOR, "shape": [4], "data_offsets": [0, 16]}}, "truncated"),
    "nesting 100,000 deep": (b'{"w": ' + b"[" * DEEP + b"]" * DEEP + b"}", "nested too deeply"),
    "bytes that are not UTF-8": (b'{"w\xff": 1}', "not valid JSON"),
}


@pytest.mark.parametrize("case", BAD_HEADERS)
def test_a_lying_safetensors_header_is_one_line_naming_the_file(folder, tmp_path, capsys, case):
    header, what = BAD_HEADERS[case]
    source = Path(shutil.copytree(folder, tmp_path / "hf"))
    (source / SINGLE_FILE).write_bytes(safetensors_bytes(header, bytes(8)))
    err = run_import(source, tmp_path / "out", capsys)
    assert f"{source / SINGLE_FILE}: " in err and what in err, err


# ------------------------------------------------------------------------------------------------
# model.safetensors.index.json: its shape, and entries that leave the model folder
# ------------------------------------------------------------------------------------------------

def sharded_folder(directory: Path, index) -> Path:
    """A model folder whose weights are one valid shard, with ``index`` as its index file."""
    source = hf_folder(directory)
    (source / "model-00001-of-00001.safetensors").write_bytes(safetensors_bytes({"w": TENSOR}, bytes(8)))
    text = index if isinstance(index, bytes) else json.dumps(index).encode()
    (source / INDEX_FILE).write_bytes(text)
    return source


@pytest.mark.parametrize("index,what", [
    (b"{", "not valid JSON"),
    ([], "not a JSON object"),
    ({"metadata": {}}, "no weight_map"),
    ({"weight_map": ["model-00001-of-00001.safetensors"]}, "weight_map"),
    ({"weight_map": {"w": 1}}, "weight_map"),
    ({"weight_map": {"w": "model-00002-of-00002.safetensors"}}, "does not exist"),
    ({"weight_map": {"w": ""}}, "not a file"),
], ids=["cut", "array", "no-weight_map", "list", "int-file", "missing-file", "empty-name"])
def test_an_index_that_is_not_a_weight_map_is_one_line(tmp_path, capsys, index, what):
    source = sharded_folder(tmp_path / "hf", index)
    err = run_import(source, tmp_path / "out", capsys)
    assert f"{source / INDEX_FILE}: " in err and what in err, err


@pytest.mark.parametrize("entry", ["../../../../etc/passwd", "/etc/passwd", "sub/../../outside.safetensors",
                                   "..\\outside.safetensors"])
def test_an_index_entry_outside_the_model_folder_is_never_opened(tmp_path, capsys, entry):
    (tmp_path / "outside.safetensors").write_bytes(safetensors_bytes({"w": TENSOR}, bytes(8)))
    source = sharded_folder(tmp_path / "hf", {"weight_map": {"w": entry}})
    err = run_import(source, tmp_path / "out", capsys)
    assert f"{source / INDEX_FILE}: " in err and repr(entry) in err and "outside" in err, err


def test_a_weights_file_linking_outside_the_model_folder_is_refused(tmp_path, capsys):
    (tmp_path / "outside.safetensors").write_bytes(safetensors_bytes({"w": TENSOR}, bytes(8)))
    source = sharded_folder(tmp_path / "hf", {"weight_map": {"w": "linked.safetensors"}})
    os.symlink(tmp_path / "outside.safetensors", source / "linked.safetensors")
    err = run_import(source, tmp_path / "out", capsys)
    assert "'linked.safetensors'" in err and "outside" in err, err


def test_a_single_weights_file_or_tokenizer_file_linking_outside_is_refused(tmp_path, capsys):
    source = hf_folder(tmp_path / "hf")
    (tmp_path / "secret").write_text("not for copying")
    os.symlink(tmp_path / "secret", source / SINGLE_FILE)
    assert "outside" in run_import(source, tmp_path / "out", capsys)
    os.remove(source / SINGLE_FILE)
    os.remove(source / "tokenizer.json")
    os.symlink(tmp_path / "secret", source / "tokenizer.json")
    assert "tokenizer.json" in run_import(source, tmp_path / "out", capsys)


def test_a_hub_cache_snapshot_whose_files_link_into_its_blobs_imports(tmp_path):
    """The Hugging Face cache keeps each file once under blobs/ and links to it from snapshots/REV/."""
    made = save_hf_model(tmp_path / "made", gptj_config(n_layer=1), seed=2, tokenizer_vocab=60)
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for name in os.listdir(made):
        os.rename(made / name, blobs / f"blob-{name}")
        os.symlink(f"../../blobs/blob-{name}", snapshot / name)
    assert hf.main(["import", "--hf-path", str(snapshot), "--output", str(tmp_path / "out"), "--no-progress"]) == 0
    assert (tmp_path / "out" / "tokenizer" / "tokenizer.json").is_file()


def test_the_python_m_command_ends_an_escaping_index_with_status_2(tmp_path):
    source = sharded_folder(tmp_path / "hf", {"weight_map": {"w": "../../../../etc/passwd"}})
    result = subprocess.run([sys.executable, "-m", "mesh_transformer.hf", "import", "--hf-path", str(source),
                             "--output", str(tmp_path / "out"), "--no-progress"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert "'../../../../etc/passwd'" in result.stderr and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# to_hf_weights.py: its config, and an output folder that is not empty
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_export")
    raw = dict(layers=1, d_model=32, n_heads=4, n_vocab=264, seq=32, pe_rotary_dims=4, tokenizer="bytes",
               model_dir=str(root / "run"), **TRAINING_KEYS)
    (root / "config.json").write_text(json.dumps(raw))
    write_native_checkpoint(load_config(str(root / "config.json")), seed=4)
    return root


def export(run: Path, output: Path, *extra: str, config: Path | None = None) -> int:
    return to_hf.main(["--input-ckpt", str(run / "run"), "--config", str(config or run / "config.json"),
                       "--output-path", str(output), "--dtype", "fp32", "--no-progress", *extra])


@pytest.mark.parametrize("content,what", [(b"\xff\xfe{}", "not UTF-8"), (b"[" * DEEP, "nested too deeply")],
                         ids=["not-utf8", "deep"])
def test_to_hf_weights_with_a_config_that_is_not_json_text_is_one_line(tiny_run, tmp_path, capsys, content, what):
    (tmp_path / "config.json").write_bytes(content)
    err = one_error_line(export(tiny_run, tmp_path / "out", config=tmp_path / "config.json"), capsys, tmp_path / "out")
    assert f"{tmp_path / 'config.json'}: " in err and what in err, err


def test_to_hf_weights_with_no_checkpoint_writes_nothing(tiny_run, tmp_path, capsys):
    status = to_hf.main(["--input-ckpt", str(tmp_path / "nothing"), "--config", str(tiny_run / "config.json"),
                         "--output-path", str(tmp_path / "out"), "--no-progress"])
    assert "no complete checkpoint" in one_error_line(status, capsys, tmp_path / "out")


def test_to_hf_weights_refuses_a_non_empty_output_folder_unless_overwrite(tiny_run, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    assert export(tiny_run, output) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {output} ") and "--overwrite" in err and len(err.splitlines()) == 1, err
    assert os.listdir(output) == ["notes.txt"]

    # An earlier export's single file would win over a new sharded index: --overwrite removes it.
    (output / SINGLE_FILE).write_bytes(b"an earlier export")
    assert export(tiny_run, output, "--overwrite", "--max-shard-size", "20KB") == 0
    assert not (output / SINGLE_FILE).exists() and (output / INDEX_FILE).exists()
    assert (output / "notes.txt").read_text() == "mine"
    expected = read_safetensors_dir(output)
    assert export(tiny_run, output, "--overwrite") == 0
    assert not (output / INDEX_FILE).exists()
    for name, tensor in read_safetensors_dir(output).items():
        np.testing.assert_array_equal(tensor, expected[name], err_msg=name)


def test_to_hf_weights_into_an_existing_empty_folder_needs_no_overwrite(tiny_run, tmp_path):
    (tmp_path / "out").mkdir()
    assert export(tiny_run, tmp_path / "out") == 0
