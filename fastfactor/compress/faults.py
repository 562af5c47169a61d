"""Test-only fault injection for the compression driver (kill or fail a run at a chosen point).

Unset (the default) :func:`test_fault_hook` does nothing. The environment variable
:data:`TEST_FAULT_ENV` selects where it acts:

* ``"K:sleep:S"`` sleeps S seconds in the middle of stage K (after its modules are swapped, before
  its fine-tuning), so a test can ``SIGKILL`` the process there; ``"K:raise"`` raises
  :class:`InjectedFault` there;
* ``"K@N:sleep:S"`` / ``"K@N:raise"`` do it after step N of stage K's fine-tune (K = the number of
  stages: the final fine-tune), after any checkpoint of that step is written;
* ``"K#N:sleep:S"`` / ``"K#N:raise"`` do it in stage K's calibration once its N-th fit (an
  autoencoder module or block) is finished and cached (:mod:`fastfactor.compress.fitcache`).

``tests/test_resume.py`` and ``tests/test_compress_distributed.py`` use it to check that a run
killed anywhere resumes bitwise. Nothing else in fastfactor depends on it.
"""

from __future__ import annotations

import os
import time
from typing import Optional

TEST_FAULT_ENV = "FASTFACTOR_TEST_FAULT_IN_STAGE"


class InjectedFault(RuntimeError):
    """Raised by the test-only hook (:data:`TEST_FAULT_ENV`)."""


def test_fault_hook(stage: int, step: Optional[int] = None, fit: Optional[int] = None) -> None:
    """Called by the driver in the middle of every stage (``step=None``), after every fine-tuning
    step, and after every cached fit (``fit``: how many so far in the stage); a no-op unless
    :data:`TEST_FAULT_ENV` is set."""
    spec = os.environ.get(TEST_FAULT_ENV)
    if not spec:
        return
    parts = spec.split(":")
    usage = (f"{TEST_FAULT_ENV}: expected 'STAGE[@STEP|#FIT]:sleep:SECONDS' or 'STAGE[@STEP|#FIT]:raise', "
             f"got {spec!r}")
    try:
        if "#" in parts[0]:
            at_stage, _, at_fit = parts[0].partition("#")
            at = (int(at_stage), None, int(at_fit))
        else:
            at_stage, _, at_step = parts[0].partition("@")
            at = (int(at_stage), int(at_step) if at_step else None, None)
    except ValueError:
        raise ValueError(usage) from None
    if at != (stage, step, fit):
        return
    where = f"stage {stage}" + (f" after fine-tuning step {step}" if step is not None else "")
    where += f" after fit {fit}" if fit is not None else ""
    if len(parts) == 3 and parts[1] == "sleep":
        print(f"[{TEST_FAULT_ENV}] sleeping in {where}", flush=True)
        time.sleep(float(parts[2]))
    elif len(parts) == 2 and parts[1] == "raise":
        raise InjectedFault(f"{TEST_FAULT_ENV}: injected fault in {where}")
    else:
        raise ValueError(usage)


test_fault_hook.__test__ = False  # not a pytest test despite its name

__all__ = ["TEST_FAULT_ENV", "InjectedFault", "test_fault_hook"]
