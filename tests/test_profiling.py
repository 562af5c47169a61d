"""fastfactor.profiling: NVTX ranges through each backend, no-ops without one, module hooks."""

import pytest
import torch
from torch import nn

from fastfactor import profiling
from fastfactor.layers.lowrank import LowRankLinear


def test_backend_is_one_of_the_known():
    assert profiling.backend() in profiling.BACKENDS
    assert "none" in profiling.available_backends()
    assert profiling.enabled() == (profiling.backend() != "none")


def test_context_manager_and_decorator_push_and_pop_in_order(recorder):
    @profiling.range("deco")
    def f(a):
        profiling.mark("inside")
        return a + 1

    with profiling.range("outer"):
        assert f(1) == 2
    assert recorder.calls == [
        ("push", "outer", "fastfactor"),
        ("push", "deco", "fastfactor"),
        ("mark", "inside", "fastfactor"),
        ("pop", "fastfactor"),
        ("pop", "fastfactor"),
    ]


def test_annotate_defaults_to_qualname_and_keeps_metadata(recorder):
    @profiling.annotate()
    def my_function():
        """doc"""
        return 7

    assert my_function() == 7
    assert my_function.__doc__ == "doc" and my_function.__name__ == "my_function"
    assert recorder.calls[0][1].endswith("my_function")


def test_range_is_popped_when_the_region_raises(recorder):
    with pytest.raises(RuntimeError, match="boom"):
        with profiling.range("failing"):
            raise RuntimeError("boom")
    assert [c[0] for c in recorder.calls] == ["push", "pop"]


def test_none_backend_records_nothing(recorder):
    with profiling.use_backend("none"):
        assert not profiling.enabled()
        with profiling.range("silent"):
            profiling.mark("silent")
        profiling.annotate("silent")(lambda: None)()
    assert recorder.calls == []
    assert profiling.backend() == "nvtx"  # restored


def test_capture_is_a_noop_without_cuda(recorder):
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    with profiling.range("cap", capture=True):
        pass
    with profiling.capture():
        pass
    assert [c[0] for c in recorder.calls] == ["push", "pop"]


def test_real_nvtx_package_ranges_do_not_raise():
    pytest.importorskip("nvtx")
    if profiling._nvtx is None:
        pytest.skip("FASTFACTOR_NVTX=0 disabled the nvtx package")
    with profiling.use_backend("nvtx"):
        for _ in range(3):
            with profiling.range("real", color="green"):
                profiling.mark("real mark")
        profiling.push("manual")
        profiling.pop()
        assert profiling.qualified("step") == "fastfactor@step"


def test_set_backend_rejects_unknown_and_unavailable():
    with pytest.raises(ValueError, match="name: expected one of"):
        profiling.set_backend("cupti")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            profiling.set_backend("torch")


def test_range_name_must_be_a_string():
    with pytest.raises(TypeError, match="name: expected a str"):
        profiling.range(3)


def test_annotate_modules_wraps_factorized_layers_and_can_be_removed(recorder):
    model = nn.Sequential(nn.Linear(12, 10), LowRankLinear(10, 9, 3), nn.ReLU(), LowRankLinear(9, 5, 2))
    x = torch.randn(4, 12)
    with profiling.annotate_modules(model) as h:
        assert len(h.names) == 2
        y = model(x)
    pushes = [c[1] for c in recorder.calls if c[0] == "push"]
    assert pushes == ["lowrank.fwd:1", "lowrank.fwd:3"]
    assert [c[0] for c in recorder.calls] == ["push", "pop", "push", "pop"]
    recorder.calls.clear()
    torch.testing.assert_close(model(x), y)
    assert recorder.calls == []  # hooks removed


def test_annotate_modules_backward_ranges(recorder):
    model = nn.Sequential(LowRankLinear(8, 6, 2))
    x = torch.randn(3, 8, requires_grad=True)
    h = profiling.annotate_modules(model, lambda n, m: isinstance(m, LowRankLinear), prefix="t/", backward=True)
    model(x).sum().backward()
    h.remove()
    names = [c[1] for c in recorder.calls if c[0] == "push"]
    assert names == ["t/lowrank.fwd:0", "t/lowrank.bwd:0"]
    assert sum(c[0] == "push" for c in recorder.calls) == sum(c[0] == "pop" for c in recorder.calls)


def test_annotate_modules_rejects_non_module():
    with pytest.raises(TypeError, match="model: expected an nn.Module"):
        profiling.annotate_modules(object())
