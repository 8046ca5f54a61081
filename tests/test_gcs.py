"""gs:// end to end against a real GCS emulator: data preparation, training, resume, metrics."""

import json
import subprocess

import fsspec
import jax
import numpy as np
import pytest

from mesh_transformer import storage

from mesh_transformer.checkpoints.store import Checkpointer
from mesh_transformer.cli.create_tfrecords import main as create_tfrecords
from mesh_transformer.cli.data import main as data_main
from mesh_transformer.data.loader import TFRecordLoader
from mesh_transformer.training.metrics import MetricsLogger
from tests.data.test_sharded_prepare import write_pile_corpus
from tests.training.test_run import REPO, env_with_devices, train_command

pytestmark = pytest.mark.usefixtures("gcs_emulator")


def read_text(url: str) -> str:
    with fsspec.open(url, "r", skip_instance_cache=True) as f:
        return f.read()


def test_prepare_writes_tfrecords_and_index_to_a_bucket(tmp_path, gcs_bucket):
    (tmp_path / "a.txt").write_text("hello world " * 50)
    assert create_tfrecords([str(tmp_path / "a.txt"), "tiny", "--output-dir", f"{gcs_bucket}/data",
                             "--tokenizer", "bytes", "--seq-len", "16"]) == 0
    index = f"{gcs_bucket}/data/tiny.index"
    assert read_text(index).strip().endswith(".tfrecords")
    with TFRecordLoader(index, 17, (1, 2), shuffle=False, loop=False) as loader:
        batches = list(loader)
    assert batches and batches[0].tokens.shape == (1, 2, 17)


def test_an_atomic_writer_publishes_whole_files_or_nothing_in_a_bucket(gcs_bucket):
    check_atomic_writer(f"{gcs_bucket}/atomic")


def test_an_atomic_writer_publishes_whole_files_or_nothing_on_disk(tmp_path):
    check_atomic_writer(str(tmp_path))


def check_atomic_writer(folder: str) -> None:
    block = bytes(range(256)) * 4096  # 1 MiB: several writes, more than one upload chunk in all
    aborted = storage.AtomicWriter(f"{folder}/aborted.bin")
    for _ in range(9):
        aborted.write(block)
    aborted.abort()
    committed = storage.AtomicWriter(f"{folder}/committed.bin")
    for _ in range(9):
        committed.write(block)
    assert not storage.exists(f"{folder}/committed.bin")  # nothing visible before the commit
    committed.commit()
    fs, path = storage.filesystem(folder)
    fs.invalidate_cache()
    assert [p.rsplit("/", 1)[-1] for p in fs.ls(path)] == ["committed.bin"]  # no temporary or partial file
    with storage.open_file(f"{folder}/committed.bin") as f:
        assert f.read() == block * 9


def test_checkpoint_round_trip_in_a_bucket(gcs_bucket):
    state = {"w": jax.numpy.arange(12.0).reshape(3, 4)}
    with Checkpointer(f"{gcs_bucket}/run") as checkpoints:
        checkpoints.save(5, state, {"note": "x"})
        checkpoints.wait()
        assert checkpoints.steps() == [5]
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        restored, meta = checkpoints.restore(abstract)
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert meta == {"note": "x"}


def test_metrics_in_a_bucket_survive_reopening(gcs_bucket):
    url = f"{gcs_bucket}/run/metrics.jsonl"
    with MetricsLogger(url) as metrics:
        metrics.log(1, {"train/loss": 2.0})
    with MetricsLogger(url) as metrics:
        metrics.log(2, {"train/loss": 1.5})
    assert [json.loads(line)["step"] for line in read_text(url).splitlines()] == [1, 2]


@pytest.mark.slow
def test_training_from_and_to_a_bucket_resumes(tmp_path, gcs_bucket):
    """Trains on a mixture of a single-file source and a Pile-format one sharded by two workers, both
    prepared straight into the bucket."""
    (tmp_path / "corpus.txt").write_text("".join(f"line {i}: the quick brown fox\n" for i in range(400)))
    assert create_tfrecords([str(tmp_path / "corpus.txt"), "corpus", "--output-dir", f"{gcs_bucket}/data",
                             "--tokenizer", "bytes", "--seq-len", "32"]) == 0
    write_pile_corpus(tmp_path / "pile", n_files=2, documents=100)
    assert data_main(["prepare", str(tmp_path / "pile"), "pile", "--output-dir", f"{gcs_bucket}/pile",
                      "--tokenizer", "bytes", "--seq-len", "32", "--workers", "2", "--shard-size-mb", "0.002"]) == 0
    assert data_main(["verify", f"{gcs_bucket}/pile/pile.index"]) == 0
    bucket = gcs_bucket.removeprefix("gs://")
    raw = dict(layers=2, d_model=32, n_heads=4, n_vocab=264, seq=32, pe_rotary_dims=4, tokenizer="bytes",
               per_replica_batch=1, lr=1e-2, warmup_steps=0, anneal_steps=0, total_steps=4, ckpt_every=2,
               val_every=2, val_batches=1, bucket=bucket, model_dir="run",
               train_set={f"{gcs_bucket}/data/corpus.index": 1, f"{gcs_bucket}/pile/pile.index": 3},
               val_set={"corpus": f"{gcs_bucket}/data/corpus.index"}, mesh={"dp": 2, "fsdp": 1, "mp": 2})
    config = tmp_path / "config.json"
    for total in (4, 6):
        config.write_text(json.dumps(dict(raw, total_steps=total)))
        result = subprocess.run(train_command(config), env=env_with_devices(4), cwd=REPO, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from gs://" in result.stderr
    records = [json.loads(line) for line in read_text(f"{gcs_bucket}/run/metrics.jsonl").splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "val/loss_corpus" in r] == [2, 4, 6]
    corpus_tokens, pile_tokens = next(
        (r["train/tokens_corpus"], r["train/tokens_pile"]) for r in records if r["step"] == 6 and "train/loss" in r)
    assert corpus_tokens + pile_tokens == 6 * 2 * 32  # 6 steps of 2 rows of 32 tokens
    assert abs(corpus_tokens / 32 - 3) <= 1  # a quarter of the 12 rows, give or take one
    with Checkpointer(f"{gcs_bucket}/run") as checkpoints:
        assert checkpoints.steps()[-1] == 6


def test_export_to_hugging_face_format_into_a_bucket(tmp_path, gcs_bucket):
    from transformers import GPTJForCausalLM

    from mesh_transformer.models.registry import parse_config
    from mesh_transformer.convert.hf_export import export_to_hf
    from mesh_transformer.models.transformer import Transformer
    from mesh_transformer.sharding import make_mesh
    from mesh_transformer.training.steps import Trainer

    config = parse_config(dict(layers=2, d_model=32, n_heads=4, n_vocab=64, seq=16, pe_rotary_dims=4, lr=1e-3,
                               tokenizer="bytes", model_dir=f"{gcs_bucket}/run"))
    trainer = Trainer(config, make_mesh(config, jax.devices()[:1]))
    state = trainer.init_state(seed=0)
    with Checkpointer(f"{gcs_bucket}/run") as checkpoints:
        checkpoints.save(0, state, {})
    export_to_hf(f"{gcs_bucket}/run", config, f"{gcs_bucket}/hf", dtype="fp32", show_progress=False)

    local = tmp_path / "hf"
    fsspec.filesystem("gs").get(f"{gcs_bucket.removeprefix('gs://')}/hf", str(local), recursive=True)
    model = GPTJForCausalLM.from_pretrained(local).eval()
    tokens = np.random.RandomState(0).randint(0, 64, (2, 16))
    import torch

    with torch.no_grad():
        theirs = model(torch.as_tensor(tokens)).logits.numpy()
    ours = np.asarray(Transformer(config.model).apply({"params": state.params}, tokens))
    assert np.abs(theirs - ours).max() <= 1e-4
