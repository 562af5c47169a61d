"""Triton device code, one module per kernel family (installed as ``fastfactor.kernels``).

Each family module holds its kernels, their launchers and a pure-PyTorch ``*_ref`` reference:
``lowrank`` (fused low-rank), ``monarch`` (block-diagonal Monarch / block-wise low-rank) and
``sparse24`` (2:4 semi-structured and dense-sparse). ``_config`` holds what they share.
"""
