"""Moved to ``rlhfkit.accel.memory``; this name remains only for ``rlhfkit.recipes.pipeline``'s
import until that imports from there."""

from rlhfkit.accel.memory import release_memory

__all__ = ["release_memory"]
