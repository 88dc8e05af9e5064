"""Shared test set-up: the Triton interpreter (fixed when @triton.jit runs, so before kernels is imported),
one thread (tiny models are dispatch-bound; fewer threads keep runs repeatable), and the repo on sys.path."""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

torch.set_num_threads(1)
