"""Shared test set-up.

- The Triton interpreter on machines without CUDA: TRITON_INTERPRET=1 (fixed when @triton.jit runs, so set before
  kernels is imported), so the kernels run on CPU tensors against their torch paths. With CUDA it is NOT forced:
  compiled kernels run there (tests/test_gpu_check.py), and the interpreted tests skip themselves with a reason.
  Either choice can be made by hand: TRITON_INTERPRET=1 (or 0) in the environment wins.
- Without the triton package (macOS, Windows: no wheels) every test parametrized with backend "triton" and every
  test marked `requires_triton` is skipped with a reason; the torch paths are tested as everywhere.
- One thread (tiny models are dispatch-bound; fewer threads keep runs repeatable), and the repo on sys.path.
"""
import os
import sys

import torch

CUDA = torch.cuda.is_available()
os.environ.setdefault("TRITON_INTERPRET", "0" if CUDA else "1")   # "0", not unset: a later setdefault keeps it
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False
INTERPRET = os.environ["TRITON_INTERPRET"] == "1"

import pytest  # noqa: E402

NO_TRITON = "triton is not installed (it has wheels for Linux only): the torch paths are tested instead"
NO_INTERPRETER = ("CUDA is present, so TRITON_INTERPRET is off and Triton cannot run on CPU tensors: "
                  "tests/test_gpu_check.py runs the compiled kernels (TRITON_INTERPRET=1 runs these too)")


def pytest_configure(config):
    config.addinivalue_line("markers", "requires_triton: needs the triton package (skipped without it)")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")


def triton_skip_reason(interpreted=True):
    """Why a test that runs Triton (on CPU tensors when interpreted) cannot run here, or None."""
    if not HAS_TRITON:
        return NO_TRITON
    if interpreted and not INTERPRET:
        return NO_INTERPRETER
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if any(v == "triton" for v in params.values() if isinstance(v, str)):   # backend="triton" cases
            reason = triton_skip_reason()
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
        if item.get_closest_marker("requires_triton") and not HAS_TRITON:
            item.add_marker(pytest.mark.skip(reason=NO_TRITON))
        if item.get_closest_marker("cuda") and not CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (none here); `python bench.py --gpu-check` "
                                                    "runs the whole GPU check where there is one"))


@pytest.fixture
def killed_after(monkeypatch):
    """killed_after(n, argv): train.main(argv) dies after its n-th step (a KeyboardInterrupt as step n + 1 starts, as
    a kill after the step-n checkpoint would end it)."""
    import train

    def run(n, argv):
        step, calls = train.train_step, []

        def dying(*a, **k):
            calls.append(1)
            if len(calls) > n:
                raise KeyboardInterrupt
            return step(*a, **k)
        with monkeypatch.context() as m:
            m.setattr(train, "train_step", dying)
            with pytest.raises(KeyboardInterrupt):
                train.main(argv)
    return run
