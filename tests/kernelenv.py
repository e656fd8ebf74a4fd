"""Real-kernel test helpers live in the package (the demo uses them too)."""

from oomwarden.sandbox import ChildMemcg, Hog, MemcgFactory, own_v1_memcg_dir

__all__ = ["ChildMemcg", "Hog", "MemcgFactory", "own_v1_memcg_dir"]
