"""The output folder of an import (``mtj-hf import --output OUT``) is accepted wherever a checkpoint is
taken: fine-tuning (``--tune-model-path OUT``), export (``to_hf_weights.py --input-ckpt OUT``) and
loading parameters (``--checkpoint OUT`` of the sample and serve commands)."""

import json
from pathlib import Path

import numpy as np
import pytest

from mesh_transformer.checkpoints.params import load_params
from mesh_transformer.cli import to_hf
from mesh_transformer.convert.hf_import import import_hf
from mesh_transformer.convert.tensor_table import flatten_params
from mesh_transformer.data.tfrecord import open_writer
from mesh_transformer.models.registry import load_config, parse_config
from mesh_transformer.sharding import mesh_from_shape
from mesh_transformer.training.run import TrainOptions, train
from tests.convert.test_hf import gptj_config, read_safetensors_dir, restore_imported, save_hf_model


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> tuple[Path, Path]:
    """(the Hugging Face folder, the import's output folder)."""
    root = tmp_path_factory.mktemp("import_folder")
    source = save_hf_model(root / "hf", gptj_config(n_layer=1, bos_token_id=0, eos_token_id=0), seed=9,
                           tokenizer_vocab=60)
    import_hf(str(source), str(root / "out"), show_progress=False)
    return source, root / "out"


def test_to_hf_weights_exports_an_import_folder(imported, tmp_path):
    source, out = imported
    status = to_hf.main(["--input-ckpt", str(out), "--config", str(out / "config.json"), "--output-path",
                         str(tmp_path / "back"), "--dtype", "fp32", "--no-progress"])
    assert status == 0
    original, exported = read_safetensors_dir(source), read_safetensors_dir(tmp_path / "back")
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        np.testing.assert_array_equal(exported[name], tensor, err_msg=name)


def test_parameters_load_from_an_import_folder(imported):
    _, out = imported
    config, expected = restore_imported(out)
    loaded = load_params(config, str(out), mesh=mesh_from_shape((1, 1, 1)))
    for path, value in flatten_params(expected).items():
        np.testing.assert_array_equal(np.asarray(flatten_params(loaded)[path]), np.asarray(value), err_msg=path)


def test_fine_tuning_starts_from_an_import_folder(imported, tmp_path, caplog):
    _, out = imported
    with open_writer(str(tmp_path / "train_0.tfrecords")) as writer:
        for start in range(4):
            writer.write_example({"text": (start + np.arange(17)) % 60})
    (tmp_path / "train.index").write_text("train_0.tfrecords\n")
    raw = json.loads((out / "config.json").read_text())
    raw.update(model_dir=str(tmp_path / "run"), train_set=str(tmp_path / "train.index"), seq=16, total_steps=1,
               warmup_steps=0, gradient_accumulation_steps=1, mesh={"dp": 2, "fsdp": 1, "mp": 4})
    with caplog.at_level("INFO", logger="mesh_transformer.training.start"):
        result = train(parse_config(raw, source="finetune"), TrainOptions(tune_model_path=str(out),
                                                                           show_progress=False))
    assert result.step == 1
    assert f"fine-tuning from {out / 'checkpoint'} step 0" in caplog.text
    assert load_config(str(out / "config.json")).run.model_dir == str(out / "checkpoint")
