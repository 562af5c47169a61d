"""The perf tier: budgets on the launches the real op code makes at the bench rows, counted exactly
under the interpreter and modelled on an H200 (``fastfactor sol``; **predicted, not measured**).

Each (budget, row) is one test. A budget today's kernels miss is marked ``xfail(strict=True)`` with
its figures in the reason: the xfails *are* the performance backlog, and a kernel change that meets
a budget turns its test into an XPASS failure until the marker is removed. Rows, budgets and
thresholds: ``fastfactor/sol/tier.py`` and ``fastfactor/sol/budgets.py``. Counts are cached by
kernel source and specialization (``FASTFACTOR_SOL_CACHE``, default ``~/.cache/fastfactor/sol``).
"""

import pytest

from fastfactor.kernels import _config

pytestmark = [
    pytest.mark.perf,
    pytest.mark.skipif(not _config.is_interpreter(), reason="counting needs TRITON_INTERPRET=1"),
]

from fastfactor.sol import tier  # noqa: E402

#: today's misses: case id -> the figures found (predicted on an H200 at commit of this file)
BACKLOG = {}

_ROWS: dict = {}


def _row(rid):
    from fastfactor.sol.device import H200
    from fastfactor.sol.rows import evaluate_row

    if rid not in _ROWS:
        _ROWS[rid] = evaluate_row(tier.ROWS[rid], H200)
    return _ROWS[rid]


def _params():
    out = []
    for rid, budget, kw in tier.CASES:
        cid = tier.case_id(rid, budget, kw)
        marks = [pytest.mark.xfail(strict=True, reason=BACKLOG[cid])] if cid in BACKLOG else []
        out.append(pytest.param(rid, budget, kw, id=cid, marks=marks))
    return out


@pytest.mark.parametrize("rid,budget,kw", _params())
def test_budget(rid, budget, kw):
    from fastfactor.sol import budgets
    from fastfactor.sol.device import H200

    ok, figure, target = budgets.check(budget, _row(rid), H200, **kw)
    assert ok, f"{budget} at {rid}: {figure} (target {target}; predicted, not measured)"
