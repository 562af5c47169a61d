"""Modules compressed together (issue 16): shared input basis, one launch per group, save / load,
compile, the driver and the CLI. float64 references throughout."""

import copy
import json
import math

import pytest
import torch
from torch import nn

import fastfactor
from fastfactor.compress import joint as J
from fastfactor.compress._tiny import tiny_data, tiny_model
from fastfactor.compress.targets import select_targets
from fastfactor.factorize.svd import rank_for_ratio
from fastfactor.layers import JointLowRankLinear, JointMemberLinear, LowRankLinear, link_joint


class Attn(nn.Module):
    """Three projections reading one input, odd sizes, one without bias; the output mixes them."""

    def __init__(self, d=29, outs=(29, 13, 17), bias=(True, False, True), dtype=torch.float32):
        super().__init__()
        self.query = nn.Linear(d, outs[0], bias=bias[0], dtype=dtype)
        self.key = nn.Linear(d, outs[1], bias=bias[1], dtype=dtype)
        self.value = nn.Linear(d, outs[2], bias=bias[2], dtype=dtype)

    def forward(self, x):
        q, k, v = self.query(x), self.key(x), self.value(x)
        return torch.cat([q.tanh(), k * 2, v.sin()], -1)


class Model(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.layers = nn.ModuleList([Attn(**kw) for _ in range(2)])

    def forward(self, x):
        return torch.cat([blk(x) for blk in self.layers], -1)


def _joint(model, ratio=0.5, init="svd", stats=None, kinds=("qkv",)):
    targets = select_targets(model, None, (), ratio)
    groups, _ = J.find_groups(model, targets, list(kinds))
    by = {t.name: t for t in targets}
    cfg = fastfactor.CompressionConfig(method="lowrank", ratio=ratio, joint=list(kinds))
    for g in groups:
        J.swap_group(model, g, by, "lowrank", init, cfg, stats)
    return groups


def _w_cat(attn):
    return torch.cat([attn.query.weight, attn.key.weight, attn.value.weight], 0).double()


# --------------------------------------------------------------------------------------------
# the joint factorization against float64
# --------------------------------------------------------------------------------------------

def test_joint_svd_is_the_optimal_rank_r_fit_of_the_stacked_weight():
    torch.manual_seed(0)
    m = Model().double()
    w = _w_cat(m.layers[0])
    _joint(m)
    lead = m.layers[0].query
    r = lead.rank
    s = torch.linalg.svdvals(w)
    err = (lead.group_dense_weight().double() - w).norm() ** 2
    assert abs(err.item() - (s[r:] ** 2).sum().item()) < 1e-8 * (s ** 2).sum().item()  # Eckart–Young
    # each member's dense weight is its block of rows, bias carried per member
    for i, name in enumerate(("query", "key", "value")):
        mod = getattr(m.layers[0], name)
        assert torch.equal(mod.dense_weight(), lead.group_dense_weight()[sum(lead.splits[:i]): sum(lead.splits[:i + 1])])
    # the key had no bias: it gets a zero slice of the concatenated bias (trainable from then on)
    assert torch.equal(m.layers[0].key.bias, torch.zeros(13, dtype=torch.float64))
    assert lead.factor_config()["bias"] == [True, False, True]


def test_joint_activation_aware_minimizes_the_shared_input_loss():
    torch.manual_seed(1)
    m = Model().double()
    x = torch.randn(200, 29, dtype=torch.float64) @ torch.randn(29, 29, dtype=torch.float64)  # correlated input
    gram = x.t() @ x
    names = [f"layers.0.{n}" for n in ("query", "key", "value")] + [f"layers.1.{n}" for n in ("query", "key", "value")]
    w = _w_cat(m.layers[0])
    _joint(m, init="activation", stats={n: {"gram": gram} for n in names})
    lead = m.layers[0].query
    r = lead.rank
    L = torch.linalg.cholesky(gram)
    opt = (torch.linalg.svdvals(w @ L)[r:] ** 2).sum()
    got = ((lead.group_dense_weight().double() - w) @ L).norm() ** 2
    assert abs(got.item() - opt.item()) < 1e-7 * (w @ L).norm().item() ** 2
    # and it beats the plain SVD on that loss
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    svd = ((u[:, :r] * s[:r]) @ vh[:r] - w) @ L
    assert got < svd.norm() ** 2


def test_joint_fisher_weights_the_stacked_rows():
    torch.manual_seed(2)
    m = Model().double()
    w = _w_cat(m.layers[0])
    fish = {f"layers.{b}.{n}": {"fisher": torch.rand(getattr(m.layers[b], n).out_features, 29, dtype=torch.float64)}
            for b in (0, 1) for n in ("query", "key", "value")}
    f_cat = torch.cat([fish[f"layers.0.{n}"]["fisher"] for n in ("query", "key", "value")], 0)
    _joint(m, init="fisher", stats=fish)
    lead = m.layers[0].query
    d = f_cat.sum(1).sqrt()[:, None]
    opt = (torch.linalg.svdvals(d * w)[lead.rank:] ** 2).sum()
    got = (d * (lead.group_dense_weight().double() - w)).norm() ** 2
    assert abs(got.item() - opt.item()) < 1e-7 * (d * w).norm().item() ** 2


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.7, 0.95])
@pytest.mark.parametrize("outs", [(29, 13, 17), (29, 29, 29), (40, 8, 8)])
def test_budget_equals_the_separate_factors(ratio, outs):
    """r·(in + N) <= Σ r_i·(in + n_i) < (r + 1)·(in + N): the same total budget, as many ranks as fit."""
    m = Model(outs=outs)
    _joint(m, ratio=ratio)
    lead = m.layers[0].query
    sep = sum(rank_for_ratio(29, n, ratio) * (29 + n) for n in outs)
    n_all = sum(outs)
    assert lead.num_weight_params == lead.rank * (29 + n_all) <= sep
    assert lead.rank == min(29, n_all) or (lead.rank + 1) * (29 + n_all) > sep
    assert m.layers[0].key.num_weight_params == 0
    stored = sum(p.numel() for n, p in m.named_parameters() if not n.endswith("bias"))
    assert stored == 2 * lead.num_weight_params


# --------------------------------------------------------------------------------------------
# the layers: forward against float64, one launch per group, the cache's safety
# --------------------------------------------------------------------------------------------

def _count_inner_calls(model):
    n = {"calls": 0}
    for mod in model.modules():
        if isinstance(mod, JointLowRankLinear):
            inner = mod.inner
            fwd = type(inner).forward

            def counted(x, _inner=inner, _fwd=fwd):
                n["calls"] += 1
                return _fwd(_inner, x)

            inner.forward = counted
    return n


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_members_match_float64_and_one_launch_per_group(dtype):
    torch.manual_seed(3)
    m = Model()
    _joint(m)
    m = m.to(dtype)
    x = torch.randn(3, 5, 29, dtype=dtype)
    lead = m.layers[0].query
    u, v, b = (t.detach().double() for t in (lead.inner.u, lead.inner.v, lead.inner.bias))
    ref = (x.double() @ v.t()) @ u.t() + b
    q, k, val = torch.split(ref, lead.splits, -1)
    k = k - b[29:42]  # the key had no bias: the zeros in the concatenated bias
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.allclose(m.layers[0].query(x).double(), q, atol=tol)
    calls = _count_inner_calls(m)
    y = m(x)
    assert calls["calls"] == 2  # one launch per attention block, not three
    want = torch.cat([q.tanh(), k * 2, val.sin()], -1)
    assert torch.allclose(y[..., : want.shape[-1]].double(), want, atol=tol)
    assert all(mod._cache is None for mod in m.modules() if isinstance(mod, JointLowRankLinear))


def test_interpreter_tier_matches_float64(triton_cpu):
    """The group's one launch through the Triton kernels (interpreted), odd sizes, against float64."""
    torch.manual_seed(8)
    m = Model(d=21, outs=(21, 9, 11))
    _joint(m)
    a = m.layers[0]
    x = torch.randn(2, 7, 21)
    lead = a.query
    u, v, b = (t.detach().double() for t in (lead.inner.u, lead.inner.v, lead.inner.bias))
    ref = torch.split((x.double() @ v.t()) @ u.t() + b, lead.splits, -1)
    for got, want in zip((a.query(x), a.key(x), a.value(x)), ref):
        assert torch.allclose(got.double(), want, atol=1e-4)


def test_gradients_match_float64():
    torch.manual_seed(4)
    m = Model()
    _joint(m)
    m = m.double()
    x = torch.randn(4, 29, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 2 * 59, dtype=torch.float64)
    (m(x) * g).sum().backward()
    lead = m.layers[0].query
    u, v, b = (t.detach().clone().requires_grad_() for t in (lead.inner.u, lead.inner.v, lead.inner.bias))
    x2 = x.detach().clone().requires_grad_()
    y = x2 @ v.t() @ u.t() + b
    q, k, val = torch.split(y, lead.splits, -1)
    out0 = torch.cat([q.tanh(), k * 2, val.sin()], -1)
    (out0 * g[:, :59]).sum().backward()
    for got, want in ((lead.inner.u.grad, u.grad), (lead.inner.v.grad, v.grad), (lead.inner.bias.grad, b.grad)):
        assert torch.allclose(got, want, atol=1e-10)


def test_cache_never_returns_a_stale_output():
    torch.manual_seed(5)
    m = Model()
    _joint(m)
    a = m.layers[0]
    x = torch.randn(6, 29)
    fresh = lambda: a.key.leader_module.inner(x)[..., 29:42]
    a.query(x)  # leaves the key's and value's slices in the cache
    with torch.no_grad():
        a.query.inner.u.add_(1.0)  # an in-place update of a factor (an optimizer step)
    assert torch.allclose(a.key(x), fresh())
    a.query(x)
    x.mul_(2.0)  # an in-place change of the input
    assert torch.allclose(a.key(x), fresh())
    with torch.no_grad():
        a.query(x)
    k = a.key(x)  # grad mode changed: recomputed, so the gradient reaches the factors
    assert k.requires_grad
    a.query(x)
    y_other = torch.randn(6, 29)
    assert torch.allclose(a.key(y_other), a.key.leader_module.inner(y_other)[..., 29:42])  # another input object
    assert torch.allclose(a.key(x), fresh()) and torch.allclose(a.key(x), fresh())  # asked twice


def test_compile_fullgraph_one_op_per_group():
    torch.manual_seed(6)
    m = Model()
    _joint(m)
    x = torch.randn(3, 7, 29, requires_grad=True)
    ref = m(x)
    (gref,) = torch.autograd.grad(ref.sum(), x)
    ops = []

    def backend(gm, example_inputs):
        ops.extend(n for n in gm.graph.nodes if n.op == "call_function" and "lowrank_fwd" in str(n.target))
        return gm

    torch._dynamo.reset()
    y = torch.compile(m, fullgraph=True, backend=backend, dynamic=False)(x)
    assert len(ops) == 2
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(g, gref)
    torch._dynamo.reset()
    y2 = torch.compile(m, fullgraph=True, backend="aot_eager", dynamic=False)(x)
    torch.testing.assert_close(y2, ref)


# --------------------------------------------------------------------------------------------
# Hugging Face models: BERT, LLaMA (qkv + mlp), GPT-2 (c_attn already fused)
# --------------------------------------------------------------------------------------------

def _out(model, ids):
    o = model(input_ids=ids)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


@pytest.mark.parametrize("family,kinds,groups", [("bert", ["qkv"], 2), ("llama", ["qkv", "mlp"], 4)])
def test_hf_models_save_load_and_compile(tmp_path, family, kinds, groups):
    from transformers import AutoModel, AutoModelForCausalLM

    m = tiny_model(family)
    fastfactor.factorize_(m, dict(method="lowrank", ratio=0.4, joint=kinds))
    leaders = [x for x in m.modules() if isinstance(x, JointLowRankLinear)]
    assert len(leaders) == groups
    ids = torch.randint(3, 97, (2, 9))
    with torch.no_grad():
        y = _out(m, ids)
    calls = _count_inner_calls(m)
    with torch.no_grad():
        _out(m, ids)
    assert calls["calls"] == groups
    for mod in m.modules():  # drop the counting wrappers before saving
        if isinstance(mod, JointLowRankLinear):
            del mod.inner.forward
    # fastfactor's own format
    fastfactor.save_compressed(m, tmp_path / "ff")
    m2 = fastfactor.load_compressed(tmp_path / "ff")
    with torch.no_grad():
        assert torch.equal(_out(m2, ids), y)
    man = json.loads((tmp_path / "ff" / "fastfactor.json").read_text())
    classes = {e["class"] for e in man["modules"]}
    assert {"JointLowRankLinear", "JointMemberLinear"} <= classes
    # the model's own save_pretrained -> from_pretrained (the fastfactor quantizer)
    m.save_pretrained(tmp_path / "hf")
    cls = AutoModel if family == "bert" else AutoModelForCausalLM
    m3 = cls.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert torch.equal(_out(m3, ids), y)
    assert all(mm._joint for mm in m3.modules() if isinstance(mm, JointMemberLinear))
    # deepcopy keeps each member on its own copy's leader; merge_and_unload gives dense layers
    c = copy.deepcopy(m3)
    for name, mm in c.named_modules():
        if isinstance(mm, JointMemberLinear):
            assert mm.leader_module is c.get_submodule(name.rpartition(".")[0] + "." + mm.leader)
    merged = fastfactor.merge_and_unload(c)
    assert not any(isinstance(mm, fastfactor.FactorizedLinear) for mm in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(_out(merged, ids), y, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()
    cm = torch.compile(m2, fullgraph=True, backend="aot_eager", dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(cm(input_ids=ids).__getitem__(0), _out(m2, ids))


def test_gpt2_c_attn_is_already_joint():
    m = tiny_model("gpt2")
    lines = []
    _, rep = fastfactor.compress(m, dict(method="lowrank", ratio=0.5, schedule="offline", joint=["qkv"]), None,
                                 log=lines.append)
    assert rep.joint_groups == [] and any("c_attn already holds the group" in s for s in lines)
    assert isinstance(m.transformer.h[0].attn.c_attn, LowRankLinear)


def test_driver_activation_init_staged_layers_and_resume(tmp_path, monkeypatch):
    """Calibrated joint fit through the driver: a group is one stage even with stage_unit='layer';
    a run killed mid-way resumes from its checkpoint (the joint modules reload) bitwise."""
    from fastfactor.compress import faults

    data = tiny_data()
    cfg = dict(method="lowrank", ratio=0.5, init="activation", schedule="staged", stage_unit="layer",
               stage_steps=0, final_steps=0, calib_batches=1, batch_size=8, joint=["qkv", "mlp"], seed=1)
    m = tiny_model("llama")
    _, rep = fastfactor.compress(m, cfg, data, evaluate_stages=False)
    stage_mods = [s.modules for s in rep.stages]
    assert ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
            "model.layers.0.self_attn.v_proj"] in stage_mods
    assert len(stage_mods) == 8  # 2 x (qkv, o, gate+up, down)
    assert any("joint qkv" in v for s in rep.stages for v in s.init_info.values())
    assert len(rep.joint_groups) == 4
    monkeypatch.setenv(faults.TEST_FAULT_ENV, "5:raise")  # killed inside stage 5 (block 1's qkv... swapped)
    with pytest.raises(faults.InjectedFault):
        fastfactor.compress(tiny_model("llama"), cfg, data, checkpoint_dir=tmp_path / "ck", evaluate_stages=False)
    monkeypatch.delenv(faults.TEST_FAULT_ENV)
    m2 = tiny_model("llama")
    _, rep2 = fastfactor.compress(m2, cfg, data, checkpoint_dir=tmp_path / "ck", resume=tmp_path / "ck",
                                  evaluate_stages=False)
    assert rep2.target_weight_params_after == rep.target_weight_params_after
    for (n, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), n
    ids = torch.randint(3, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(_out(m2, ids), _out(m, ids))


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------

def test_bad_input_errors():
    with pytest.raises(ValueError, match="joint: expected"):
        J.parse_joint(["qvk"])
    with pytest.raises(ValueError, match="distinct sibling"):
        J.parse_joint("a+a")
    with pytest.raises(TypeError, match="joint: expected a list"):
        J.parse_joint(3)
    with pytest.raises(ValueError, match="joint: needs a low-rank method"):
        fastfactor.CompressionConfig(method="monarch", joint=["qkv"])
    assert fastfactor.CompressionConfig(joint="qkv,mlp").joint == ["qkv", "mlp"]
    m = tiny_model("bert")
    with pytest.raises(ValueError, match="formed no group"):
        fastfactor.factorize_(m, dict(method="lowrank", joint=["mlp"]))
    with pytest.raises(ValueError, match="splits"):
        JointLowRankLinear(8, 4, ["a", "b"], [4], True, "LowRankLinear", dict(in_features=8, out_features=8, rank=2))
    with pytest.raises(ValueError, match="inner_config: expected in_features=8, out_features=9"):
        JointLowRankLinear(8, 4, ["a", "b"], [4, 5], True, "LowRankLinear", dict(in_features=8, out_features=8, rank=2))
    with pytest.raises(ValueError, match="inner_class"):
        JointLowRankLinear(8, 4, ["a", "b"], [4, 4], True, "Nope", dict(in_features=8, out_features=8, rank=2))
    mem = JointMemberLinear(8, 4, "a", 1, 4)
    with pytest.raises(RuntimeError, match="not linked"):
        mem(torch.randn(2, 8))
    lead = JointLowRankLinear(8, 4, ["a", "b"], [4, 4], True, "LowRankLinear", dict(in_features=8, out_features=8, rank=2))
    with pytest.raises(ValueError, match="does not hold member 1 with 5 outputs"):
        JointMemberLinear(8, 5, "a", 1, 4).link(lead)
    holder = nn.Module()
    holder.b = JointMemberLinear(8, 4, "a", 1, 4)
    with pytest.raises(ValueError, match="leader a is missing"):
        link_joint(holder)
    # members that do not read the same input (different Grams) are refused
    mdl = Model()
    names = [f"layers.{b}.{n}" for b in (0, 1) for n in ("query", "key", "value")]
    stats = {n: {"gram": torch.eye(29, dtype=torch.float64) * (2.0 if n.endswith("key") else 1.0)} for n in names}
    with pytest.raises(ValueError, match="do not read the same input"):
        _joint(mdl, init="activation", stats=stats)


# --------------------------------------------------------------------------------------------
# the command line on the bundled MiniLM
# --------------------------------------------------------------------------------------------

def test_cli_joint_on_bundled_minilm(tmp_path, capsys):
    demo = pytest.importorskip("fastfactor.compress.demo")
    try:
        path = demo.minilm_path()
    except RuntimeError as e:
        pytest.skip(str(e))
    from fastfactor.cli import main

    rows = ["The parser reads one line at a time from the file.", "Return the number of items in the queue.",
            "This function is deprecated and will be removed.", "The socket is closed when the object is deleted."]
    (tmp_path / "train.csv").write_text("sentence\n" + "\n".join(rows * 3) + "\n")
    out = tmp_path / "out"
    rc = main(["compress", "--model", path, "--method", "lowrank", "--ratio", "0.5", "--init", "activation",
               "--schedule", "offline", "--joint", "qkv", "--targets", "*.query", "*.key", "*.value", "--train-file", str(tmp_path / "train.csv"),
               "--calib-batches", "1", "--batch-size", "4", "--max-length", "16", "--max-train", "8",
               "--out", str(out), "--no-progress", "--model-class", "base"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["config"]["joint"] == ["qkv"] and len(rep["joint_groups"]) == 6
    man = json.loads((out / "fastfactor.json").read_text())
    assert sum(e["class"] == "JointLowRankLinear" for e in man["modules"]) == 6
    model = fastfactor.load_compressed(out)
    ids = torch.randint(1000, 2000, (2, 8))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).last_hidden_state).all()
    q = model.encoder.layer[0].attention.self.query
    assert q.rank == math.floor(3 * rank_for_ratio(384, 384, 0.5) * 768 / (384 + 3 * 384))


# --------------------------------------------------------------------------------------------
# gpu tier (skipped without CUDA)
# --------------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_joint_matches_float64_compiles_and_captures(dtype):
    torch.manual_seed(7)
    m = Model(d=256, outs=(256, 128, 128), bias=(True, True, True))
    _joint(m)
    lead = m.layers[0].query
    u, v, b = (t.detach().double() for t in (lead.inner.u, lead.inner.v, lead.inner.bias))
    m = m.cuda().to(dtype)
    x = torch.randn(1000, 256, device="cuda", dtype=dtype)
    ref = (x.double().cpu() @ v.t()) @ u.t() + b
    q, k, val = torch.split(ref, lead.splits, -1)
    want = torch.cat([q.tanh(), k * 2, val.sin()], -1)
    with torch.no_grad():
        y = m(x)
    tol = 3e-2 if dtype == torch.bfloat16 else 5e-3
    assert (y[:, :512].double().cpu() - want).abs().max().item() <= tol * (1 + want.abs().max().item())
    torch._dynamo.reset()
    cm = torch.compile(m, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(cm(x), y, atol=tol, rtol=tol)
        g = torch.cuda.CUDAGraph()
        m(x)
        with torch.cuda.graph(g):
            yg = m(x)
        g.replay()
        torch.testing.assert_close(yg, y)


@pytest.mark.parametrize("family,kinds", [("bert", ["qkv"]), ("llama", ["qkv", "mlp"])])
def test_plan_matches_the_joint_swap(family, kinds):
    """factorize_plan (the CLI's --dry-run) shows the joint layers, factor configs and parameters
    the swap then builds."""
    from fastfactor.compress.targets import compressed_modules

    m = tiny_model(family)
    cfg = dict(method="lowrank", ratio=0.4, joint=kinds)
    plan = fastfactor.factorize_plan(m, cfg)
    fastfactor.factorize_(m, cfg)
    real = {n: (type(x).__name__, x.factor_config(), x.num_weight_params) for n, x in compressed_modules(m)}
    assert {r.name: (r.layer_class, r.factor_config, r.params_after) for r in plan.rows} == real


@pytest.mark.parametrize("form", ["linear", "nonlinear"])
def test_joint_autoencoder(tmp_path, form):
    """The autoencoder's bottleneck fitted on the group's stacked outputs (shared input), one launch
    per group, save / load bitwise."""
    if "autoencoder" not in fastfactor.families.FAMILIES:
        pytest.skip("method 'autoencoder' is not registered in this build")
    m = tiny_model("llama")
    cfg = dict(method="autoencoder", ae_form=form, ratio=0.5, schedule="offline", calib_batches=2, batch_size=8,
               joint=["qkv", "mlp"], ae_steps=10)
    _, rep = fastfactor.compress(m, cfg, tiny_data())
    leads = [x for x in m.modules() if isinstance(x, JointLowRankLinear)]
    assert len(leads) == 4 and len(rep.joint_groups) == 4
    want = "LowRankLinear" if form == "linear" else "BottleneckLinear"
    assert all(type(x.inner).__name__ == want for x in leads)
    sep = fastfactor.compress(tiny_model("llama"), dict(cfg, joint=[]), tiny_data())[1]
    assert rep.target_weight_params_after <= sep.target_weight_params_after
    ids = torch.randint(3, 97, (2, 9))
    with torch.no_grad():
        y = _out(m, ids)
    calls = _count_inner_calls(m)
    with torch.no_grad():
        _out(m, ids)
    assert calls["calls"] == 4
    for x in leads:
        del x.inner.forward
    fastfactor.save_compressed(m, tmp_path / "ae")
    with torch.no_grad():
        assert torch.equal(_out(fastfactor.load_compressed(tmp_path / "ae"), ids), y)
