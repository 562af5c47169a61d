"""Checkpoints of the compression driver: one import for the two halves.

* :mod:`fastfactor.compress.storage` — the on-disk format (``stage-NNNN/``: model, manifest,
  ``state.json``, ``train_state.pt``, ``checkpoint.json`` with checksums), writing it atomically,
  reading and validating it, fingerprints of model and data, the command line's ``--out`` guard;
* :mod:`fastfactor.compress.resume` — what a checkpoint must hold for a bitwise resume (RNG states
  of every rank, data position, optimizer state mid-fine-tune), the writer the driver calls after
  each stage, and :func:`~fastfactor.compress.resume.begin`, which restores a run;
* :mod:`fastfactor.compress.faults` — the test-only fault hook used to kill runs in tests.

This module re-exports their public names (``fastfactor.compress.checkpoint.read_checkpoint`` etc.
keep working); new code imports from the module that owns the name.
"""

from .faults import TEST_FAULT_ENV, InjectedFault, test_fault_hook
from .resume import Session, StageCheckpointer, begin, check_compatible, rng_state, set_rng_state
from .storage import (
    CHECKPOINT_FORMAT_VERSION, CHECKPOINTS, INDEX, KIND, STATE, TRAIN_STATE, data_fingerprint, list_checkpoints,
    load_model_state, model_fingerprint, output_in_use, prepare_output, check_output, prune_checkpoints, read_checkpoint,
    resolve_resume, stage_dirname, write_checkpoint,
)

test_fault_hook.__test__ = False  # not a pytest test despite its name

__all__ = [
    "CHECKPOINT_FORMAT_VERSION", "CHECKPOINTS", "TRAIN_STATE", "TEST_FAULT_ENV", "InjectedFault", "StageCheckpointer",
    "Session", "begin", "prepare_output", "output_in_use", "read_checkpoint", "resolve_resume", "list_checkpoints",
    "load_model_state", "model_fingerprint", "data_fingerprint", "rng_state", "set_rng_state", "test_fault_hook",
    "stage_dirname", "write_checkpoint", "prune_checkpoints", "check_compatible",
]
