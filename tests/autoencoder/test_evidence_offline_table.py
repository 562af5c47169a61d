"""The offline-evidence script's bookkeeping (no model): row keys keep autoencoder step counts apart,
the table shows one line per (variant, scope, steps, ratio, joint) with the seed spread, and the
generated table replaces only its own part of the markdown file."""

import pytest

from fastfactor.compress import evidence_offline as EO


def _row(task, variant, scope="module", ratio=0.5, joint="none", seed=0, steps=None, **kw):
    r = dict(task=task, variant=variant, scope=scope, ratio=ratio, joint=joint, seed=seed, ae_steps=steps,
             kept=ratio - 0.001, compress_s=10.0 + seed)
    r.update(kw)
    return r


def test_keys_separate_step_counts_and_resolve_the_default():
    a = _row("fidelity", "ae-linear", "block", steps=50)
    b = _row("fidelity", "ae-linear", "block", steps=200)
    assert EO._key(a) != EO._key(b)
    assert EO.resolved_ae_steps("ae-linear") == 200 and EO.resolved_ae_steps("ae-nonlinear", 30) == 30
    assert EO.resolved_ae_steps("svd", 30) is None
    assert EO._key(_row("fidelity", "svd")) == EO._key(dict(_row("fidelity", "svd"), ae_steps=None))


def test_table_lines_and_seed_spread():
    rows = [_row("fidelity", "ae-linear", "block", steps=50, seed=s, cosine=c, spearman=0.5)
            for s, c in ((0, 0.80), (1, 0.84))]
    rows += [_row("fidelity", "ae-linear", "block", steps=200, cosine=0.9, spearman=0.6),
             _row("classification", "ae-linear", "block", steps=50, accuracy=0.75),
             _row("fidelity", "svd", cosine=0.3, spearman=0.4)]
    md = EO.markdown(rows, {"base_accuracy": 0.779})
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")][1:]
    assert [ln.split("|")[1].strip() for ln in lines] == ["svd", "ae-linear", "ae-linear"]
    block50 = next(ln for ln in lines if "block (50 steps)" in ln)
    assert "0.8200 ± 0.0283" in block50 and "75.0" in block50 and "0,1" in block50
    assert any("block (200 steps)" in ln and "0.9000" in ln for ln in lines)
    assert md.startswith("dense: accuracy 77.9 %")


def test_with_table_keeps_the_prose():
    first = EO.with_table("", "T1")
    assert first.startswith(EO.TABLE_BEGIN) and "T1" in first
    doc = "# title\n\nprose before\n\n" + first + "\nprose after\n"
    again = EO.with_table(doc, "T2")
    assert "T2" in again and "T1" not in again
    assert again.startswith("# title\n\nprose before") and again.endswith("prose after\n")


def test_variant_config_errors():
    with pytest.raises(ValueError, match="scope: 'svd' has no scope"):
        EO.variant_config("svd", "block")
    with pytest.raises(ValueError, match="variant: expected one of"):
        EO.variant_config("pca")
    assert EO.variant_config("ae-nonlinear", "block", 50) == dict(method="autoencoder", ae_form="nonlinear",
                                                                   scope="block", ae_steps=50)
