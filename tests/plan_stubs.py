"""Stand-in latency figures shared by the plan tests (not a test module)."""

import torch


def affine_costs(specs, floor: float, rate: float) -> list:
    """``floor + in·out/rate`` for a dense layer, ``2·floor + stored weights/rate`` for a factorized
    one (two launches): small ranks come out faster than dense and large ones slower."""
    from fastfactor.plan_latency import build_layer

    out = []
    for s in specs:
        if s["method"] == "dense":
            out.append(floor + s["in_features"] * s["out_features"] / rate)
        else:
            p = build_layer(s, torch.float32, torch.device("meta")).num_weight_params
            out.append(2 * floor + p / rate)
    return out
