"""A training run's tokenizer must load: a config naming one that does not stops before anything is written."""

import subprocess

from tests.training.test_run import env_with_devices, train_command, write_config, write_dataset


def test_a_missing_tokenizer_stops_device_train_with_one_line_and_writes_nothing(tmp_path):
    write_dataset(tmp_path, "train", n_files=1, records_per_file=8, seed=0)
    config = write_config(tmp_path / "config.json", tmp_path / "run", tmp_path, tokenizer="./no-such-tokenizer",
                          val_set={})
    result = subprocess.run(train_command(config), env=env_with_devices(4), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines()[-1] == (f"error: {config}: config key 'tokenizer' is './no-such-tokenizer', "
                                              "which cannot be loaded: tokenizer file or directory "
                                              "'./no-such-tokenizer' not found")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()
