"""Checkpointer: round trips across meshes, partial restore, retention, atomicity under SIGKILL."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mesh_transformer.checkpoints.store import Checkpointer, resolve_checkpoint
from tests.helpers import REPO

TMP_SUFFIX = ".orbax-checkpoint-tmp"


def make_mesh(shape, devices=None):
    devices = np.array(devices if devices is not None else jax.devices()[: int(np.prod(shape))])
    return Mesh(devices.reshape(shape), ("dp", "mp"), axis_types=(AxisType.Auto, AxisType.Auto))


def sharded_state(mesh):
    """A dict state whose arrays are sharded over both mesh axes in different ways."""
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
    return {
        "params": {
            "w": put(jnp.arange(8 * 16, dtype=jnp.float32).reshape(8, 16) / 7.0, P("dp", "mp")),
            "b": put(jnp.arange(16, dtype=jnp.bfloat16), P("mp")),
        },
        "opt_state": {"mu": put(jnp.full((8, 16), 0.25, jnp.float32), P(None, "mp")),
                      "count": put(jnp.array(7, jnp.int32), P())},
    }


def abstract_on(state, mesh, specs):
    """ShapeDtypeStructs of ``state`` carrying shardings on ``mesh`` built from ``specs``."""
    return jax.tree.map(
        lambda x, spec: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec)),
        state, specs,
    )


def abstract_of(tree):
    """What a trainer passes to restore: shapes, dtypes and each array's current sharding."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def assert_trees_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert isinstance(a, jax.Array) and a.dtype == e.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


ON_DEVICE_0 = jax.sharding.SingleDeviceSharding(jax.devices()[0])
SPECS_81 = {"params": {"w": P("dp", None), "b": P()}, "opt_state": {"mu": P("dp"), "count": P()}}


@pytest.mark.parametrize("target_shape", [(8, 1), (1, 1)])
def test_restore_onto_a_different_mesh_is_exact(tmp_path, target_shape):
    state = sharded_state(make_mesh((2, 4)))
    ckpt = Checkpointer(str(tmp_path / "run"))
    ckpt.save(10, state, {"loader": {"epoch": 1, "offset": 1234}, "lr": 0.5})
    ckpt.wait()

    target_mesh = make_mesh(target_shape)
    restored, metadata = ckpt.restore(abstract_on(state, target_mesh, SPECS_81))
    ckpt.close()

    assert metadata == {"loader": {"epoch": 1, "offset": 1234}, "lr": 0.5}
    assert_trees_equal(restored, state)
    assert restored["params"]["w"].sharding == NamedSharding(target_mesh, P("dp", None))
    assert restored["opt_state"]["mu"].sharding == NamedSharding(target_mesh, P("dp"))


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState


def adam_train_state():
    params = {"dense": {"kernel": jnp.arange(12.0).reshape(3, 4), "bias": jnp.ones(4)}}
    opt_state = optax.adam(1e-3).init(params)
    opt_state = jax.tree.map(lambda x: x + 1, opt_state)  # non-trivial values to compare
    return TrainState(step=jnp.array(3, jnp.int32), params=params, opt_state=opt_state)


def test_dataclass_state_round_trip_and_params_only_restore(tmp_path):
    state = adam_train_state()
    ckpt = Checkpointer(str(tmp_path / "run"), async_save=False)
    ckpt.save(3, state, {"step": 3})

    full, _ = ckpt.restore(abstract_of(state))
    assert isinstance(full, TrainState)
    assert_trees_equal(full, state)

    # Fine-tuning with another optimizer: only the params' structure is known.
    sgd_state = TrainState(step=jnp.array(0), params=state.params, opt_state=optax.sgd(0.1).init(state.params))
    partial, metadata = ckpt.restore(abstract_of(sgd_state), restore_keys=("params",))
    assert metadata == {"step": 3}
    assert list(partial) == ["params"]
    assert_trees_equal(partial["params"], state.params)

    # The same from a plain dict naming only "params".
    only_params, _ = ckpt.restore({"params": abstract_of(state.params)}, restore_keys=["params"])
    assert_trees_equal(only_params["params"], state.params)
    ckpt.close()


def test_mismatched_structure_names_the_step(tmp_path):
    state = adam_train_state()
    ckpt = Checkpointer(str(tmp_path / "run"), async_save=False)
    ckpt.save(5, state, {})
    with pytest.raises(ValueError, match="step 5"):
        ckpt.restore({"params": abstract_of(state.params)})
    with pytest.raises(ValueError, match=r"leaf \.step has no sharding"):
        ckpt.restore(jax.eval_shape(lambda: state))
    with pytest.raises(KeyError, match="'nope'"):
        ckpt.restore(abstract_of(state), restore_keys=("nope",))
    ckpt.close()


def test_retention_keeps_last_and_every(tmp_path):
    state = {"x": jnp.arange(4)}
    ckpt = Checkpointer(str(tmp_path / "run"), keep_last=2, keep_every=3)
    for step in range(1, 9):
        ckpt.save(step, state, {"step": step})
    ckpt.wait()
    assert ckpt.steps() == [3, 6, 7, 8]
    assert ckpt.latest_step() == 8
    assert sorted(os.listdir(tmp_path / "run")) == ["step_3", "step_6", "step_7", "step_8"]
    _, metadata = ckpt.restore(abstract_of(state), step=6)
    assert metadata == {"step": 6}
    ckpt.close()


def test_save_ordering_force_and_existing_steps(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "run"), keep_last=5)
    ckpt.save(10, {"x": jnp.array(10)}, {"v": 10})
    ckpt.save(5, {"x": jnp.array(5)}, {"v": 5})  # behind the newest step: skipped
    ckpt.wait()
    assert ckpt.steps() == [10]
    ckpt.save(5, {"x": jnp.array(5)}, {"v": 5}, force=True)
    ckpt.save(10, {"x": jnp.array(99)}, {"v": 99}, force=True)  # exists: kept as it was
    ckpt.wait()
    assert ckpt.steps() == [5, 10]
    abstract = {"x": jax.ShapeDtypeStruct((), jnp.int32, sharding=ON_DEVICE_0)}
    assert ckpt.restore(abstract, step=10)[1] == {"v": 10}
    assert int(ckpt.restore(abstract, step=5)[0]["x"]) == 5
    ckpt.close()


def test_async_save_snapshots_arrays_before_returning(tmp_path):
    x = jnp.arange(1000, dtype=jnp.float32) * 3
    expected = np.asarray(x)
    ckpt = Checkpointer(str(tmp_path / "run"))
    ckpt.save(1, {"x": x}, {})
    x.delete()  # as a donated buffer would be
    ckpt.wait()
    restored, _ = ckpt.restore({"x": jax.ShapeDtypeStruct((1000,), jnp.float32, sharding=ON_DEVICE_0)})
    np.testing.assert_array_equal(np.asarray(restored["x"]), expected)
    ckpt.close()


def test_missing_checkpoints_give_clear_errors(tmp_path):
    run = str(tmp_path / "run")
    ckpt = Checkpointer(run)
    assert ckpt.latest_step() is None and ckpt.steps() == []
    abstract = {"x": jax.ShapeDtypeStruct((), jnp.int32, sharding=ON_DEVICE_0)}
    with pytest.raises(FileNotFoundError, match="no complete checkpoint in .*run"):
        ckpt.restore(abstract)
    ckpt.save(2, {"x": jnp.array(2)}, {})
    ckpt.wait()
    with pytest.raises(FileNotFoundError, match=r"step 3 .*complete steps: \[2\]"):
        ckpt.restore(abstract, step=3)
    with pytest.raises(TypeError, match="step 4 must be JSON"):
        ckpt.save(4, {"x": jnp.array(4)}, {"bad": object()})
    ckpt.close()


def test_resolve_checkpoint(tmp_path):
    run = tmp_path / "run"
    ckpt = Checkpointer(str(run), keep_last=5)
    for step in (100, 200):
        ckpt.save(step, {"x": jnp.array(step)}, {})
    ckpt.close()
    (run / f"step_300{TMP_SUFFIX}").mkdir()  # what a killed save leaves behind

    assert resolve_checkpoint(str(run)) == (str(run), 200)
    assert resolve_checkpoint(str(run) + "/") == (str(run), 200)
    assert resolve_checkpoint(str(run / "step_100")) == (str(run), 100)
    assert resolve_checkpoint("file://" + str(run / "step_200")) == (str(run), 200)
    with pytest.raises(FileNotFoundError, match="step_300 is not a complete checkpoint"):
        resolve_checkpoint(str(run / "step_300"))
    with pytest.raises(FileNotFoundError, match="no complete checkpoint in"):
        resolve_checkpoint(str(run / f"step_300{TMP_SUFFIX}"))
    with pytest.raises(FileNotFoundError, match="no complete checkpoint in"):
        resolve_checkpoint(str(tmp_path / "does-not-exist"))


def test_leftover_tmp_dirs_are_ignored_then_removed_by_the_next_save(tmp_path):
    run = tmp_path / "run"
    ckpt = Checkpointer("file://" + str(run))
    ckpt.save(1, {"x": jnp.array(1)}, {})
    ckpt.close()
    for name in (f"step_2{TMP_SUFFIX}", f"step_9{TMP_SUFFIX}"):
        (run / name).mkdir()
        (run / name / "partial").write_text("half a checkpoint")
    (run / "notes.txt").write_text("not a checkpoint")

    reader = Checkpointer(str(run))  # opening, listing and restoring must not delete anything
    assert reader.steps() == [1]
    assert int(reader.restore({"x": jax.ShapeDtypeStruct((), jnp.int32, sharding=ON_DEVICE_0)})[0]["x"]) == 1
    reader.close()
    assert (run / f"step_9{TMP_SUFFIX}").exists()

    writer = Checkpointer(str(run))
    writer.save(2, {"x": jnp.array(2)}, {})
    writer.close()
    assert sorted(os.listdir(run)) == ["notes.txt", "step_1", "step_2"]
    assert writer.latest_step() == 2


CHILD = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
    from mesh_transformer.checkpoints.store import Checkpointer

    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("dp", "mp"), axis_types=(AxisType.Auto,) * 2)
    base = np.random.default_rng(0).standard_normal((4096, 4096), dtype=np.float32)
    w = jax.device_put(base, NamedSharding(mesh, P("dp", "mp")))
    ckpt = Checkpointer(sys.argv[1], keep_last=2)
    for step in range(1, 1000):
        ckpt.save(step, {"params": {"w": w + np.float32(step)}}, {"step": step})
        ckpt.wait()
        print(f"saved {step}", flush=True)
""")


def bytes_under(path):
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except FileNotFoundError:  # renamed away while walking
                pass
    return total


def wait_for_half_written_save(run, deadline):
    """Return once a tmp checkpoint directory holds some array data (a 64 MB save is under way)."""
    while True:
        assert time.monotonic() < deadline, "no save in flight was ever observed"
        tmp_dirs = [name for name in os.listdir(run) if name.endswith(TMP_SUFFIX)]
        if tmp_dirs and bytes_under(run / tmp_dirs[0]) > 4_000_000:
            return
        time.sleep(0.001)


def test_sigkill_during_save_keeps_the_previous_checkpoint(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(run)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        # Past a few saves, so that retention has already deleted a checkpoint.
        for step in (1, 2, 3):
            assert child.stdout.readline().strip() == f"saved {step}", "child failed before saving"
        wait_for_half_written_save(run, deadline=time.monotonic() + 60)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()

    tmp_dirs = [name for name in os.listdir(run) if name.endswith(TMP_SUFFIX)]
    assert len(tmp_dirs) == 1, f"expected the interrupted save to be left unfinished: {os.listdir(run)}"
    killed_step = int(tmp_dirs[0][len("step_"):-len(TMP_SUFFIX)])

    ckpt = Checkpointer(str(run), keep_last=2)
    latest = ckpt.latest_step()
    assert latest == killed_step - 1
    assert ckpt.steps() == [killed_step - 2, killed_step - 1]
    abstract = {"params": {"w": jax.ShapeDtypeStruct((4096, 4096), jnp.float32,
                                                      sharding=NamedSharding(make_mesh((8, 1)), P("dp")))}}
    restored, metadata = ckpt.restore(abstract)
    assert metadata == {"step": latest}
    base = np.random.default_rng(0).standard_normal((4096, 4096), dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), base + np.float32(latest))

    # The next run saves the interrupted step again; the stale tmp directory is gone.
    ckpt.save(killed_step, restored, {"step": killed_step})
    ckpt.close()
    assert ckpt.latest_step() == killed_step
    assert not any(name.endswith(TMP_SUFFIX) for name in os.listdir(run))
