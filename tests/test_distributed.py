"""Tier 1 (cpu): distributed fine-tuning helpers on 2 CPU processes with the gloo backend.

One real ``torchrun --nproc_per_node 2`` launch (this very file run as a script, see the bottom)
does every multi-process check and writes what it saw to a folder; the tests below read it:

* k AdamW steps under DDP: both ranks hold bitwise identical parameters, equal (within rounding of
  the gradient all-reduce) to one process taking the same steps on the same global batches;
* the same under FSDP2 ``fully_shard`` (works on CPU with gloo in torch 2.13);
* the truncated SVD of the same weight is bitwise identical on both ranks, and
  ``broadcast_module`` makes differently factorized ranks identical;
* only rank 0 prints and writes files; ``shard_indices`` splits an epoch like DistributedSampler.

The model is float64 so that "within rounding" can be tight (AdamW divides by sqrt(v), which can
amplify fp32 rounding of tiny gradients); it is made of ``LowRankLinear`` and ``nn.Linear``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import torch
from torch import nn

K_STEPS = 4
GLOBAL_BATCH = 12
N_SAMPLES = 40  # 3 full global batches per epoch + a partial one (dropped): steps cross an epoch


def _model() -> nn.Module:
    """Same weights whenever the global seed is the same (float64)."""
    from fastfactor import LowRankLinear

    torch.manual_seed(1234)
    dense = nn.Linear(17, 12, dtype=torch.float64)
    return nn.Sequential(
        LowRankLinear.from_linear(dense, rank=5),
        nn.GELU(),
        LowRankLinear(12, 9, 3, dtype=torch.float64),
        nn.Tanh(),
        nn.Linear(9, 4, dtype=torch.float64),
    )


def _data():
    g = torch.Generator().manual_seed(99)
    x = torch.randn(N_SAMPLES, 3, 17, generator=g, dtype=torch.float64)  # leading dims (B, T)
    y = torch.randn(N_SAMPLES, 3, 4, generator=g, dtype=torch.float64)
    return {"x": x, "y": y}


def _train(model: nn.Module, batches, steps: int) -> list:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    losses = []
    for _ in range(steps):
        b = next(batches)
        loss = nn.functional.mse_loss(model(b["x"]), b["y"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _full_state(model: nn.Module) -> dict:
    out = {}
    for name, p in model.named_parameters():
        t = p.detach()
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        out[name.replace("module.", "", 1)] = t.clone()
    return out


# ============================================================================================
# the worker (runs under torchrun)
# ============================================================================================

def _worker(outdir: str) -> None:
    import fastfactor.distributed as D
    from fastfactor.factorize import svd_factors

    info = D.init_from_env(device="cpu")
    rank = info.rank
    res: dict = {"rank": rank, "world_size": info.world_size, "backend": info.backend}

    # --- identical SVD factorization on every rank, and broadcast of differing factors ---
    torch.manual_seed(7)
    w = torch.randn(48, 33)
    u, v = svd_factors(w, 9, name="layer")
    fp = torch.cat([u.reshape(-1), v.reshape(-1)]).double()
    gathered = [torch.empty_like(fp) for _ in range(info.world_size)]
    torch.distributed.all_gather(gathered, fp)
    res["svd_bitwise_equal"] = all(torch.equal(gathered[0], g) for g in gathered)

    m = _model()
    torch.manual_seed(100 + rank)  # ranks now hold different factors
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p))
    before = D.max_param_difference(m)
    D.broadcast_module(m)
    after = D.max_param_difference(m)
    res["broadcast_before_max"] = max(before.values())
    res["broadcast_after_max"] = max(after.values())

    # --- DDP: k AdamW steps on this rank's share of each global batch ---
    data = _data()
    model = D.wrap_ddp(_model())
    batches = D.iterate_sharded(data, GLOBAL_BATCH, shuffle=True, seed=3, epochs_forever=True)
    res["ddp_losses"] = _train(model, batches, K_STEPS)
    res["ddp_max_diff"] = D.max_param_difference(model)
    torch.save(_full_state(D.unwrap(model)), os.path.join(outdir, f"ddp_rank{rank}.pt"))

    # --- FSDP2 (fully_shard) with the same recipe ---
    if D.has_fsdp2():
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "returned a view tensor" (see report)
            model = D.wrap_fsdp(_model(), device_type="cpu")
            batches = D.iterate_sharded(data, GLOBAL_BATCH, shuffle=True, seed=3, epochs_forever=True)
            res["fsdp_losses"] = _train(model, batches, K_STEPS)
        res["fsdp_sharded"] = type(dict(model.named_parameters())["0.u"]).__name__
        res["fsdp_max_diff"] = D.max_param_difference(model)
        state = _full_state(model)
        torch.save(state, os.path.join(outdir, f"fsdp_rank{rank}.pt"))

    # --- main-process-only output ---
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        D.print0(f"hello from rank {rank}")
    res["printed"] = buf.getvalue()
    res["wrote_text"] = D.write_text0(os.path.join(outdir, "main_only.txt"), f"written by rank {rank}\n")
    res["wrote_pt"] = D.save0({"rank": rank}, os.path.join(outdir, "main_only.pt"))
    res["leftover_tmp"] = sorted(f for f in os.listdir(outdir) if ".tmp-" in f)

    # --- DistributedSampler-style split ---
    res["shard"] = D.shard_indices(11, shuffle=True, seed=5, epoch=2).tolist()

    with open(os.path.join(outdir, f"result_rank{rank}.json"), "w") as f:
        json.dump(res, f)
    D.cleanup()


# ============================================================================================
# the tests (run the worker once, then read its results)
# ============================================================================================

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp("ddp"))
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # reference CPU path: nothing here needs the interpreter
    env["FASTFACTOR_CPU_BACKEND"] = "reference"
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        os.path.abspath(__file__), outdir,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    results = []
    for r in range(2):
        with open(os.path.join(outdir, f"result_rank{r}.json")) as f:
            results.append(json.load(f))
    return outdir, results


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_reference():
    """One process, the same model and the same global batches (unsharded)."""
    data = _data()

    def batches():  # a fresh permutation per epoch from one generator, full batches only
        g = torch.Generator().manual_seed(3)
        while True:
            order = torch.randperm(N_SAMPLES, generator=g)
            for i in range(0, N_SAMPLES - GLOBAL_BATCH + 1, GLOBAL_BATCH):
                idx = order[i : i + GLOBAL_BATCH]
                yield {k: v[idx] for k, v in data.items()}

    model = _model()
    losses = _train(model, batches(), K_STEPS)
    return _full_state(model), losses


def test_launch_gives_two_gloo_ranks(launched):
    _, res = launched
    assert [r["rank"] for r in res] == [0, 1]
    assert all(r["world_size"] == 2 and r["backend"] == "gloo" for r in res)


def test_svd_factorization_is_bitwise_identical_across_ranks(launched):
    _, res = launched
    assert all(r["svd_bitwise_equal"] for r in res)


def test_broadcast_module_makes_ranks_identical(launched):
    _, res = launched
    assert res[0]["broadcast_before_max"] > 0.1  # the ranks really started different
    assert res[0]["broadcast_after_max"] == 0.0 and res[1]["broadcast_after_max"] == 0.0


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_k_steps_match_single_process_with_global_batch(launched, wrapper):
    outdir, res = launched
    if f"{wrapper}_losses" not in res[0]:
        pytest.skip("FSDP2 (torch.distributed.fsdp.fully_shard) is not available in this torch")
    states = [torch.load(os.path.join(outdir, f"{wrapper}_rank{r}.pt")) for r in range(2)]
    # both ranks: bitwise identical parameters
    assert all(d == 0.0 for d in res[0][f"{wrapper}_max_diff"].values()), res[0][f"{wrapper}_max_diff"]
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), name
    ref_state, ref_losses = _single_process_reference()
    assert set(ref_state) == set(states[0])
    for name, want in ref_state.items():
        moved = (want - _model().state_dict()[name]).abs().max()
        assert moved > 1e-4, f"{name}: the optimizer did not move it (test would be vacuous)"
        torch.testing.assert_close(states[0][name], want, rtol=1e-9, atol=1e-11, msg=name)
    # the mean of the local losses is the global-batch loss, step by step
    mean_losses = [(a + b) / 2 for a, b in zip(res[0][f"{wrapper}_losses"], res[1][f"{wrapper}_losses"])]
    torch.testing.assert_close(torch.tensor(mean_losses), torch.tensor(ref_losses), rtol=1e-9, atol=0)


def test_fsdp_really_shards(launched):
    _, res = launched
    if "fsdp_sharded" not in res[0]:
        pytest.skip("FSDP2 is not available in this torch")
    assert res[0]["fsdp_sharded"] == "DTensor"


def test_only_rank0_prints_and_writes(launched):
    outdir, res = launched
    assert res[0]["printed"] == "hello from rank 0\n" and res[1]["printed"] == ""
    assert [r["wrote_text"] for r in res] == [True, False]
    assert [r["wrote_pt"] for r in res] == [True, False]
    with open(os.path.join(outdir, "main_only.txt")) as f:
        assert f.read() == "written by rank 0\n"
    assert torch.load(os.path.join(outdir, "main_only.pt")) == {"rank": 0}
    assert res[0]["leftover_tmp"] == [] and res[1]["leftover_tmp"] == []


def test_shard_indices_cover_the_epoch_like_distributed_sampler(launched):
    _, res = launched
    a, b = res[0]["shard"], res[1]["shard"]
    assert len(a) == len(b) == 6  # 11 samples padded to 12
    assert sorted(set(a) | set(b)) == list(range(11))
    from torch.utils.data import DistributedSampler

    for r, got in enumerate((a, b)):
        s = DistributedSampler(range(11), num_replicas=2, rank=r, shuffle=True, seed=3)
        s.set_epoch(4)  # DistributedSampler seeds with seed + epoch: 3 + 4 = 5 + 2
        assert got == list(s)


# ============================================================================================
# single-process behaviour (no launcher)
# ============================================================================================

def test_single_process_helpers_are_no_ops(monkeypatch, tmp_path, capsys):
    import fastfactor.distributed as D

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    info = D.init_from_env(device="cpu")
    assert (info.rank, info.world_size, info.backend, info.distributed) == (0, 1, None, False)
    assert D.is_main_process() and not D.is_distributed()
    m = _model()
    assert D.wrap_ddp(m) is m and D.wrap_fsdp(m) is m and D.broadcast_module(m) is m
    assert D.max_param_difference(m) == {}
    D.print0("x")
    assert capsys.readouterr().out == "x\n"
    assert D.save0([1], str(tmp_path / "a" / "b.pt")) and torch.load(tmp_path / "a" / "b.pt") == [1]


def test_iterate_sharded_union_is_the_global_batch():
    import fastfactor.distributed as D
    from fastfactor.train.data import iterate

    data = {"input_ids": torch.arange(23)[:, None].repeat(1, 2), "labels": torch.arange(23)}
    glob = [b["labels"] for b in iterate(data, 6, shuffle=True, seed=1) if b["labels"].numel() == 6]
    parts = [list(D.iterate_sharded(data, 6, seed=1, rank=r, world_size=3)) for r in range(3)]
    assert len(parts[0]) == len(glob) == 3
    for i, g in enumerate(glob):
        assert torch.equal(torch.cat([p[i]["labels"] for p in parts]), g)


def test_iterate_start_skips_batches_without_changing_the_stream():
    """``start=s`` (a resumed run's data position) yields exactly the batches from the s-th on."""
    import fastfactor.distributed as D
    from fastfactor.train.data import iterate

    data = {"input_ids": torch.arange(23)[:, None].repeat(1, 2), "labels": torch.arange(23)}
    full = [b["labels"] for _, b in zip(range(11), iterate(data, 5, shuffle=True, seed=3, epochs_forever=True))]
    for s in (0, 1, 4, 5, 7):  # 5 batches per epoch: crossing epoch boundaries
        rest = [b["labels"] for _, b in zip(range(11 - s), iterate(data, 5, shuffle=True, seed=3, epochs_forever=True, start=s))]
        assert all(torch.equal(a, b) for a, b in zip(full[s:], rest)) and len(rest) == 11 - s
    sharded = lambda st: [b["labels"] for _, b in zip(range(6), D.iterate_sharded(  # noqa: E731
        data, 6, seed=3, rank=1, world_size=2, epochs_forever=True, start=st))]
    assert all(torch.equal(a, b) for a, b in zip(sharded(0)[4:], sharded(4)))
    with pytest.raises(ValueError, match=r"start: expected an int >= 0 .*got -1"):
        next(iterate(data, 5, start=-1))
    with pytest.raises(ValueError, match=r"start: expected an int >= 0"):
        next(D.iterate_sharded(data, 6, rank=0, world_size=2, start=1.5))


def test_shard_units_follow_hugging_face_blocks():
    """FSDP2 units: a Hugging Face model's ``_no_split_modules`` blocks; else the linear layers."""
    import fastfactor.distributed as D
    from fastfactor.compress._tiny import tiny_model

    bert = tiny_model("bert", intermediate=36)
    units = D.shard_units(bert)
    assert units and all(type(u).__name__ in bert._no_split_modules for u in units)
    assert {type(u).__name__ for u in units} >= {"BertLayer"}
    seq = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4)))
    assert D.shard_units(seq) == [seq[2][0], seq[0]]  # children before parents
    assert D.shard_units(seq, shard_classes=[nn.Sequential]) == [seq[2]]
    with pytest.raises(RuntimeError, match="fsdp_copy: needs an initialized process group"):
        D.fsdp_copy(seq)


def test_bad_arguments_name_themselves(monkeypatch):
    import fastfactor.distributed as D

    with pytest.raises(ValueError, match="global_batch_size"):
        next(D.iterate_sharded({"x": torch.zeros(4)}, 5, rank=0, world_size=2))
    with pytest.raises(ValueError, match="rank"):
        D.shard_indices(10, rank=2, world_size=2)
    with pytest.raises(ValueError, match="device"):
        D.init_from_env(device="tpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        D.init_from_env(device="cpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        D.init_from_env(device="cpu")


if __name__ == "__main__":  # the torchrun worker
    _worker(sys.argv[1])
