"""``fastfactor sol`` (speed of light): what a launch really costs, judged without a GPU.

* :mod:`.record`: the launches the real op code makes (forward, backward, dispatcher path, autotune
  candidates, runtime specialization), recorded without running them; the aten ops of plain
  PyTorch paths (dense, unfused) with their shapes;
* :mod:`.count`: exact bytes / sectors / access widths per tensor and tensor-core FLOPs issued,
  under the Triton interpreter, one program per class scaled to the grid;
* :mod:`.model`: a lower bound per launch and per row on a device of :mod:`.device`, and the same
  for dense ``F.linear`` and the unfused PyTorch path. Every figure is **predicted, not measured**;
* :mod:`.rows`: one bench row end to end; :mod:`.budgets`: the perf tier's budgets;
* :mod:`.cli`: the ``fastfactor sol`` command.
"""

PREDICTED = "predicted, not measured"
