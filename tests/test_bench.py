"""bench.py's measuring helpers (issue 19): the data path's ms per batch and the step's launch count."""
import torch

import bench
import train

TINY = dict(d_model=32, n_layer=1, n_head=2)


def test_launch_count_counts_compute_ops_not_views():
    x = torch.randn(8, 8)
    assert bench.launch_count(lambda: x.view(64).unsqueeze(0).t(), "cpu") == 0
    assert bench.launch_count(lambda: (x @ x).relu_(), "cpu") == 2          # mm, relu (matmul only wraps mm)


def test_launch_count_grows_with_depth():
    """A deeper model launches more per step: the count is the step's, not a constant."""
    counts = []
    for n_layer in (1, 2):
        model, _, _, ds = train.build("dense", None, dict(TINY, n_layer=n_layer), train_overrides=dict(seq_len=32))
        counts.append(bench.launch_count(bench._train_step(model, ds.get_batch("train", 2, 0)), "cpu"))
    assert 0 < counts[0] < counts[1]


def test_data_ms_draws_fresh_batches():
    seen = []

    class DS:
        def get_batch(self, split, batch_size, index):
            seen.append((split, batch_size, index))
    ms = bench.data_ms(DS(), 16, n=4)
    assert ms >= 0 and len(seen) == 4 and len({i for _, _, i in seen}) == 4
    assert all(s == "train" and b == 16 for s, b, _ in seen)
