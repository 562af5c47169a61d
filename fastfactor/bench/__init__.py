"""The benchmark harness behind ``fastfactor bench``.

* :mod:`.shapes` – layer shapes, model shape presets, named sweeps (one per published table);
* :mod:`.families` – how each kernel family is built, its FLOP/byte formulas and baselines;
* :mod:`.timing` – ``triton.testing.do_bench`` medians, CUDA-graph timing for small launches,
  rotated inputs, the measured roofline; a wall-clock median on the CPU;
* :mod:`.runner` – the kernel sweep; :mod:`.e2e` – whole compressed models vs dense;
* :mod:`.report` – table, JSON/CSV with commit and date, plots;
* :mod:`.cli` – the command line.

Programmatic use::

    from fastfactor.bench import BenchConfig, Runner, measure_roofline, parse_shapes
    cfg = BenchConfig(methods=["lowrank"], shapes=parse_shapes("4096"), tokens=[4096],
                      dtypes=[torch.bfloat16], params={"lowrank": (0.25,)}, device=torch.device("cuda"))
    rows = Runner(cfg, measure_roofline(cfg.device, cfg.dtypes)).run()
"""

from .families import FAMILIES, Family, load_family
from .runner import BenchConfig, Runner
from .shapes import SHAPE_PRESETS, SWEEPS, Shape, Sweep, parse_shapes
from .timing import Roofline, measure_roofline, time_calls

__all__ = [
    "FAMILIES", "Family", "load_family", "BenchConfig", "Runner", "SHAPE_PRESETS", "SWEEPS", "Shape",
    "Sweep", "parse_shapes", "Roofline", "measure_roofline", "time_calls",
]
