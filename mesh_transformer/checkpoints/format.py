"""What a training checkpoint holds in the store's state and metadata, and the upgrade of older layouts.

The state is a train state's fields: ``step``, ``params`` and ``rng`` in every version, ``opt_state``
unless the metadata says ``OPT_STATE_SAVED`` false (conversions may leave it out), ``guard`` since bad
steps are skipped; a LoRA run saves only its adapters as ``params`` (never the frozen base). The
metadata records the data position (``TRAIN_LOADER``), the step and the config, and for a LoRA run
where its base is (``LORA_BASE``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from mesh_transformer.checkpoints.store import BadCheckpoint, Checkpointer

log = logging.getLogger(__name__)

UNGUARDED_FIELDS = ("step", "params", "rng")  # what every checkpoint holds, old or new
# Metadata key, false in checkpoints saved without an optimizer state (imports): training starts a fresh one.
OPT_STATE_SAVED = "opt_state_saved"
LORA_BASE = "lora_base"  # metadata of a LoRA run: {"path", "step", "legacy"} of its frozen base
TRAIN_LOADER = "train_loader"  # metadata: where the data stream(s) resume; absent in conversions


def restore_train_fields(checkpointer: Checkpointer, abstract_state: Any, step: int,
                         fresh_opt_state: Callable[[Any], Any], fresh_guard: Callable[[], Any]) -> tuple[dict, dict]:
    """The train state fields saved as ``step`` (all but a LoRA run's ``frozen`` base), and the metadata.

    Checkpoints written before bad steps were skipped hold no ``guard``: they get ``fresh_guard()``; those
    written without an optimizer state get ``fresh_opt_state(params)``.
    """
    fields, meta = checkpointer.restore(abstract_state, step, restore_keys=UNGUARDED_FIELDS)
    if meta.get(OPT_STATE_SAVED, True):
        fields["opt_state"] = _restored_entry(checkpointer, abstract_state, step, "opt_state")
    else:
        log.info("checkpoint step %d in %s holds no optimizer state: starting a fresh one", step,
                 checkpointer.directory)
        fields["opt_state"] = fresh_opt_state(fields["params"])
    try:
        fields["guard"] = _restored_entry(checkpointer, abstract_state, step, "guard")
    except BadCheckpoint:
        raise
    except ValueError:  # no guard was saved
        log.info("checkpoint step %d in %s predates bad-step tracking: starting its count at 0",
                 step, checkpointer.directory)
        fields["guard"] = fresh_guard()
    return fields, meta


def _restored_entry(checkpointer: Checkpointer, abstract_state: Any, step: int, key: str) -> Any:
    return checkpointer.restore(abstract_state, step, restore_keys=(key,))[0][key]
