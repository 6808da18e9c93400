"""Importance selection without recycling: iLLaVA's selection, discarded tokens simply dropped."""

from __future__ import annotations

from .base import MethodParams
from .illava import Illava


class Prune(Illava):
    """The ablation of iLLaVA's recycling: the same importance, the same kept tokens, nothing merged."""

    name = "prune"
    summary = "importance selection, discarded tokens dropped (no recycling)"
    params_type = MethodParams

    def check_params(self, params: MethodParams) -> list[str]:
        return []

    def describe_params(self, params: MethodParams) -> str:
        return ""

    def recycled(self, params: MethodParams, tokens_in: int, removed: int) -> int:
        return 0
