"""Damaged checkpoints and failed saves: checksums verified on restore, fallback to the newest intact step,
set-aside instead of deletion, a failed background save reported as soon as it completes."""

import errno
import json
import logging
import shutil
import time
from pathlib import Path

import flax.linen as nn
import fsspec
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mesh_transformer.checkpoints.store import BadCheckpoint, Checkpointer, CheckpointSaveFailed
from tests.helpers import strip_checksums

MESH = Mesh(np.array(jax.devices()).reshape(2, 4), ("dp", "mp"), axis_types=(AxisType.Auto,) * 2)


def make_state(seed: int) -> dict:
    """Random (incompressible) params, so a flipped byte reaches the array bytes and not a zstd header."""
    rng = np.random.default_rng(seed)
    put = lambda x, spec: jax.device_put(x, NamedSharding(MESH, spec))
    return {"params": {"w": put(rng.standard_normal((64, 128), dtype=np.float32), P("dp", "mp")),
                       "b": put(jnp.arange(8, dtype=jnp.bfloat16), P())},
            "opt_state": {"count": put(jnp.array(seed, jnp.int32), P())}}


def abstract_of(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def assert_trees_equal(actual, expected):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8", "bool"])
def test_the_checksum_sees_any_changed_or_moved_element_and_not_the_sharding(dtype):
    from mesh_transformer.checkpoints.integrity import checksums

    values = np.random.default_rng(0).integers(0, 2, (8, 16)).astype(jnp.dtype(dtype))

    def checksum(array, sharding=NamedSharding(MESH, P("dp", "mp"))):
        return checksums({"x": jax.device_put(array, sharding)})["x"]

    reference = checksum(values)  # rows split over devices: hashed whole
    # Rows whole on each device: hashed one row at a time (integrity._array_checksum_by_rows), the same sum.
    assert checksum(values, jax.sharding.SingleDeviceSharding(jax.devices()[5])) == reference
    assert checksum(values, NamedSharding(MESH, P(None, "mp"))) == reference
    changed, moved = values.copy(), values.copy()
    changed.reshape(-1).view(np.uint8)[37] ^= 1  # one bit of one element
    moved[[2, 5]] = moved[[5, 2]]  # two rows swapped: the same elements in other places
    assert checksum(changed) != reference and checksum(moved) != reference
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    assert checksum(changed, single) != reference and checksum(moved, single) != reference


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory) -> Path:
    """A run directory with steps 1 and 2; tests damage copies of it."""
    run = tmp_path_factory.mktemp("base") / "run"
    with Checkpointer(str(run), async_save=False) as checkpoints:
        for step in (1, 2):
            checkpoints.save(step, make_state(step), {"step": step})
    return run


@pytest.fixture
def run_dir(two_steps, tmp_path) -> Path:
    shutil.copytree(two_steps, tmp_path / "run")
    return tmp_path / "run"


def largest_file(directory: Path) -> Path:
    """The biggest OCDBT data file: it holds the params' random bytes."""
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_metadata(step_dir: Path, edit) -> None:
    path = step_dir / "metadata" / "metadata"
    metadata = json.loads(path.read_text())
    edit(metadata)
    path.write_text(json.dumps(metadata))


DAMAGE = {
    "flipped byte": (lambda step: flip_middle_byte(largest_file(step / "state")),
                     "array params/w does not match the checksum recorded at save"),
    "truncated array file": (lambda step: truncate(largest_file(step / "state")), "cannot read its arrays: "),
    "deleted array file": (lambda step: largest_file(step / "state").unlink(), "cannot read its arrays: "),
    "deleted metadata": (lambda step: (step / "metadata" / "metadata").unlink(), "cannot read its metadata: "),
    "edited metadata": (lambda step: (step / "metadata" / "metadata").write_text(
        (step / "metadata" / "metadata").read_text().replace('"step": 2', '"step": 3')),
                        "its metadata does not match the crc32c recorded at save"),
    # Written with checksums (this version says so in the metadata): without them it is damaged, not old.
    "deleted checksum record": (lambda step: edit_metadata(step, lambda metadata: metadata.pop("integrity")),
                                "its checksum record is missing"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damage_is_one_line_naming_the_step_and_the_newest_intact_step_stands_in(run_dir, damage, caplog):
    harm, expected = DAMAGE[damage]
    harm(run_dir / "step_2")
    checkpoints = Checkpointer(str(run_dir))
    abstract = abstract_of(make_state(0))
    with pytest.raises(BadCheckpoint) as raised:
        checkpoints.restore(abstract, step=2)
    message = str(raised.value)
    assert message.startswith(f"checkpoint step 2 in {run_dir} is damaged: ") and expected in message
    assert "\n" not in message and len(message) < 700

    with caplog.at_level(logging.WARNING, logger="mesh_transformer.checkpoints.store"):
        step, (state, metadata), passed_over = checkpoints.restore_newest(lambda s: checkpoints.restore(abstract, s))
    assert (step, passed_over, metadata) == (1, [2], {"step": 1})
    assert_trees_equal(state, make_state(1))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # Which read fails first may differ between two attempts: compare the parts that do not.
    assert len(warnings) == 1 and "\n" not in warnings[0] and expected in warnings[0]
    assert warnings[0].startswith(f"checkpoint step 2 in {run_dir} is damaged: ")
    assert warnings[0].endswith("; trying the checkpoint before it")
    checkpoints.close()


def test_params_only_restore_verifies_only_what_it_reads(run_dir):
    flip_middle_byte(largest_file(run_dir / "step_2" / "state"))
    with Checkpointer(str(run_dir)) as checkpoints:
        with pytest.raises(BadCheckpoint, match=r"step 2 .*array params/w does not match"):
            checkpoints.restore(abstract_of(make_state(0)), step=2, restore_keys=("params",))
        # The optimizer state was not damaged: reading only it succeeds, verified.
        restored, _ = checkpoints.restore(abstract_of(make_state(0)), step=2, restore_keys=("opt_state",))
        assert int(restored["opt_state"]["count"]) == 2


def test_a_checkpoint_restores_verified_onto_another_mesh(run_dir):
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[3])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one_device), make_state(0))
    with Checkpointer(str(run_dir)) as checkpoints:
        restored, _ = checkpoints.restore(abstract, step=2)
    assert_trees_equal(restored, make_state(2))


def test_loading_parameters_for_inference_verifies_them(tmp_path, caplog):
    from mesh_transformer.checkpoints.params import load_params
    from mesh_transformer.models.transformer import abstract_params
    from mesh_transformer.sharding import mesh_from_shape
    from tests.helpers import tiny_config

    config = tiny_config(model_dir=str(tmp_path / "run"))

    def init_params(model, seed):  # random values of the model's shapes (initialising the model takes seconds)
        rng = np.random.default_rng(seed)
        return jax.tree.map(lambda leaf: jnp.asarray(rng.standard_normal(leaf.shape, dtype=np.float32)),
                            nn.unbox(abstract_params(model)))

    with Checkpointer(config.run.checkpoint_dir, async_save=False) as checkpoints:
        for step in (1, 2):  # parameters only, as an import writes them
            checkpoints.save(step, {"params": init_params(config.model, seed=step)}, {"step": step})
    flip_middle_byte(largest_file(tmp_path / "run" / "step_2" / "state"))
    mesh = mesh_from_shape((1, 1, 2))
    for asked_for_step_2 in ((config.run.checkpoint_dir, 2), (str(tmp_path / "run" / "step_2"), None)):
        with pytest.raises(BadCheckpoint, match=rf"^checkpoint step 2 in {tmp_path / 'run'} is damaged: .*params"):
            load_params(config, *asked_for_step_2, mesh=mesh)
    with caplog.at_level(logging.WARNING):
        params = load_params(config, mesh=mesh)  # no step asked for: the newest intact one
    assert_trees_equal(params, init_params(config.model, seed=1))
    assert "checkpoint step 2" in caplog.text and "trying the checkpoint before it" in caplog.text


def test_checkpoints_without_checksums_still_restore_unverified_with_a_warning(run_dir, caplog):
    strip_checksums(run_dir / "step_2")
    with Checkpointer(str(run_dir)) as checkpoints, caplog.at_level(logging.WARNING):
        restored, metadata = checkpoints.restore(abstract_of(make_state(0)), step=2)
        checkpoints.restore(abstract_of(make_state(0)), step=2)
        assert metadata == {"step": 2}
        assert_trees_equal(restored, make_state(2))
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings == [f"checkpoint step 2 in {run_dir} has no checksums (written by a version before they "
                            "were recorded): loaded unverified"]  # once per step
        # An entry that was never saved is a mismatch, not damage (training probes for optional entries).
        with pytest.raises(ValueError, match=r"step 2 .*holds no \['guard'\]") as raised:
            checkpoints.restore({"guard": abstract_of(make_state(0))["opt_state"]}, step=2, restore_keys=("guard",))
        assert not isinstance(raised.value, BadCheckpoint)


def test_a_missing_entry_is_a_mismatch_not_damage(run_dir):
    with Checkpointer(str(run_dir)) as checkpoints:
        with pytest.raises(ValueError, match=r"step 2 .*holds no array guard/count") as raised:
            checkpoints.restore({"guard": abstract_of(make_state(0))["opt_state"]}, step=2, restore_keys=("guard",))
    assert not isinstance(raised.value, BadCheckpoint)


def test_set_aside_renames_so_the_step_can_be_saved_again_and_retention_ignores_it(run_dir):
    with Checkpointer(str(run_dir), keep_last=2, async_save=False) as checkpoints:
        checkpoints.set_aside([2])
        assert checkpoints.steps() == [1]
        checkpoints.save(2, make_state(20), {"step": 2})  # refused before: "not after the newest step 2"
        checkpoints.set_aside([2])
        checkpoints.save(2, make_state(21), {"step": 2})
        checkpoints.save(3, make_state(3), {"step": 3})
        assert checkpoints.steps() == [2, 3]
        restored, _ = checkpoints.restore(abstract_of(make_state(0)), step=2)
    assert_trees_equal(restored, make_state(21))
    assert sorted(p.name for p in run_dir.iterdir()) == ["step_2", "step_2.bad", "step_2.bad2", "step_3"]


def test_no_intact_checkpoint_is_a_one_line_error(run_dir):
    for step in (1, 2):
        (run_dir / f"step_{step}" / "metadata" / "metadata").unlink()
    with Checkpointer(str(run_dir)) as checkpoints:
        with pytest.raises(FileNotFoundError, match=r"no intact checkpoint in .*: steps \[1, 2\] are all damaged"):
            checkpoints.restore_newest(lambda s: checkpoints.restore(abstract_of(make_state(0)), s))


def test_checkpoint_in_a_bucket_is_verified_and_set_aside(gcs_bucket):
    url = f"{gcs_bucket}/run"
    with Checkpointer(url) as checkpoints:
        for step in (1, 2):
            checkpoints.save(step, make_state(step), {"step": step})
    fs = fsspec.filesystem("gs", skip_instance_cache=True)
    chunk = max(fs.find(f"{url}/step_2/state/params.w"), key=lambda p: fs.size(p))
    data = bytearray(fs.cat_file(chunk))
    data[len(data) // 2] ^= 0x01
    fs.pipe_file(chunk, bytes(data))

    with Checkpointer(url) as checkpoints:
        step, _, passed_over = checkpoints.restore_newest(lambda s: checkpoints.restore(abstract_of(make_state(0)), s))
        assert (step, passed_over) == (1, [2])
        checkpoints.set_aside(passed_over)
        assert checkpoints.steps() == [1]
    assert fs.exists(f"{url}/step_2.bad/commit_success.txt") and not fs.exists(f"{url}/step_2")


@pytest.fixture
def full_disk_at(monkeypatch):
    """``full_disk_at(step)``: the metadata file of that step's save fails with ENOSPC, below the Checkpointer
    (in Orbax's background commit), as a full disk would."""
    real_save = ocp.JsonCheckpointHandler._save_fn

    def install(step: int):
        async def save_fn(self, item, directory):
            if f"step_{step}" in str(directory):
                raise OSError(errno.ENOSPC, "No space left on device", str(directory / "metadata"))
            return await real_save(self, item, directory)

        monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", save_fn)

    return install


def test_a_failed_background_save_is_reported_by_the_next_check(tmp_path, full_disk_at):
    full_disk_at(2)
    checkpoints = Checkpointer(str(tmp_path / "run"))
    checkpoints.save(1, make_state(1), {"step": 1})
    checkpoints.wait()
    checkpoints.save(2, make_state(2), {"step": 2})
    deadline = time.monotonic() + 30
    with pytest.raises(CheckpointSaveFailed) as raised:
        while time.monotonic() < deadline:  # the save is in the background: poll as the training loop does
            checkpoints.check_save()
            time.sleep(0.01)
    assert str(raised.value).startswith("checkpoint step 2 failed: OSError: [Errno 28] No space left on device")
    assert "\n" not in str(raised.value)
    assert checkpoints.steps() == [1]
    restored, _ = checkpoints.restore(abstract_of(make_state(0)))
    assert_trees_equal(restored, make_state(1))
    checkpoints.check_save()  # reported once
    checkpoints.save(3, make_state(3), {"step": 3})  # also clears what the failed save left
    checkpoints.close()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["step_1", "step_3"]
