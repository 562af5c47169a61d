"""The compile tier's own machinery: compile-check compiles real kernels without a GPU and fails
loudly on a broken one. (The full run over every kernel x config is the second step of `make test`.)"""

import os
import subprocess
import sys
import textwrap

import pytest


def _run(code: str, tmp_path):
    # a script file, not -c: @triton.jit reads the kernel's source from its file
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(code))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env)


@pytest.mark.slow
def test_compile_check_compiles_and_reports_resources(tmp_path):
    out = _run("""
        import io, sys
        from fastfactor import compile_check
        buf = io.StringIO()
        rc = compile_check.run(targets=("sm90",), only="lowrank.gemm", out=buf, specializations=("aligned",))
        print(buf.getvalue()); sys.exit(rc)
    """, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "lowrank.gemm" in out.stdout and "0 failed" in out.stdout
    rows = [l for l in out.stdout.splitlines() if l.startswith("lowrank.gemm")]
    assert len(rows) >= 2 * 7  # two variants x the whole autotune space
    assert all(" aligned " in l for l in rows)
    # shared memory and registers are numbers, not placeholders
    smem, regs = rows[1].split()[-4], rows[1].split()[-3]
    assert int(smem) > 0 and int(regs) > 0


def test_compile_check_flags_shared_memory_beyond_the_device(tmp_path):
    out = _run("""
        import io, sys
        import triton, triton.language as tl
        from fastfactor.kernels import _config
        from fastfactor import compile_check

        @triton.jit
        def big(a_ptr, b_ptr, c_ptr, BLOCK: tl.constexpr):
            o = tl.arange(0, BLOCK)
            acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
            for k in range(0, 4096, BLOCK):
                a = tl.load(a_ptr + o[:, None] * 4096 + (k + o)[None, :])
                b = tl.load(b_ptr + (k + o)[:, None] * 4096 + o[None, :])
                acc = tl.dot(a, b, acc)
            tl.store(c_ptr + o[:, None] * BLOCK + o[None, :], acc)

        _config.register_kernel(_config.KernelSpec(
            name="zz.big", fn=big, signature=lambda dt: {"a_ptr": f"*{dt}", "b_ptr": f"*{dt}", "c_ptr": "*fp32"},
            constexprs=[{}], space=[dict(BLOCK=256, num_warps=8, num_stages=4)]))
        buf = io.StringIO()
        rc = compile_check.run(targets=("sm80",), only="zz.big", out=buf, specializations=("aligned",), jobs=1)
        print(buf.getvalue()); sys.exit(rc)
    """, tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "more than the 166912 B a block may have on sm80" in out.stdout


def test_compile_check_fails_on_broken_kernel(tmp_path):
    out = _run("""
        import io, sys
        import triton, triton.language as tl
        from fastfactor.kernels import _config
        from fastfactor import compile_check

        @triton.jit
        def broken(x_ptr, BLOCK: tl.constexpr):
            o = tl.arange(0, BLOCK)
            tl.store(x_ptr + o, tl.dot(tl.load(x_ptr + o), tl.load(x_ptr + o)))  # 1-D dot: invalid

        _config.register_kernel(_config.KernelSpec(
            name="zz.broken", fn=broken, signature=lambda dt: {"x_ptr": f"*{dt}"},
            constexprs=[{}], space=[dict(BLOCK=32, num_warps=4, num_stages=2)]))
        buf = io.StringIO()
        rc = compile_check.run(targets=("sm80",), only="zz.broken", out=buf, specializations=("generic",), jobs=1)
        print(buf.getvalue()); sys.exit(rc)
    """, tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "FAILED" in out.stdout and "0 compiled, 1 failed" in out.stdout
