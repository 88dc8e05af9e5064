"""The data in the training loop, as bench.py --wall measures it: the step fed by train.py's Prefetch thread drawing the
toy world, and fed by it over rows prepared before the steps (ds.prepare), against the pure model step, at several
torch thread counts in one process."""
import argparse

import pytest
import torch

import bench

TINY_RUN = dict(cmd="python train.py --model dense (tiny)", models=("dense",), setting="chameleon", steps=24,
                target_s=None, before_s=None, overrides={"dense": dict(d_model=32, n_layer=1, n_head=2)},
                train_overrides=dict(seq_len=64, batch_size=2, gen_n=2, eval_batches=1, eval_every=8, gen_every=16,
                                     ckpt_every=10))


def test_wall_ratios_prepared_and_by_thread_count(capsys, monkeypatch):
    import plots                                       # pieces other tests time: kept out of this one (speed)
    monkeypatch.setattr(plots, "plot_run", lambda out: None)
    monkeypatch.setattr(plots, "model_figures", lambda model, ds, out: None)
    monkeypatch.setattr(bench, "process_start_s", lambda: (1.0, 1.0))
    monkeypatch.setattr(bench, "matmul_peak", lambda *a, **k: 1e10)
    threads = torch.get_num_threads()
    out = bench.bench_wall(argparse.Namespace(wall=None, device="cpu", threads=[1, 2]), runs={"tiny": TINY_RUN})
    text = capsys.readouterr().out
    assert torch.get_num_threads() == threads                           # the caller's thread count, restored
    assert [w["threads"] for w in out] == [1, 2] and out[0]["models"][0] is not out[1]["models"][0]
    for w in out:
        r = w["models"][0]
        assert r["fed_prepared_step_ms"] > 0 and r["prepare_ms"] > 0 and r["prepare_cpu_ms"] > 0
        assert r["in_loop_prepared_ratio"] == r["fed_prepared_step_ms"] / r["pure_step_ms"]
        prepared_s = w["projected_s"] + 24 * (r["fed_prepared_step_ms"] + r["prepare_ms"] - r["fed_step_ms"]) / 1e3
        assert abs(w["wall_over_pure_prepared"] - prepared_s / (24 * r["pure_step_ms"] / 1e3)) < 1e-9
    table = text.split("by torch threads")[1]
    for w in out:                                                      # one row per thread count, both ratios
        r = w["models"][0]
        assert f"{w['threads']:7d} " in table and f"{r['in_loop_prepared_ratio']:.2f}x" in table
        assert f"{w['wall_over_pure']:.2f}x (the run), {w['wall_over_pure_prepared']:.2f}x" in table


@pytest.mark.parametrize("argv", [["--threads", "2"], ["--wall", "default", "--threads", "0"]])
def test_threads_needs_wall_and_a_count(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(argv + ["--out", "/nonexistent/never_written.json"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--threads" in err[0] and "--wall" in err[0]


def test_cpu_loop_draws_its_batches_in_its_own_thread(tmp_path, monkeypatch):
    """On the CPU train.py draws each batch in the loop's thread (a second thread running torch ops gets an OpenMP team
    of its own and slows every parallel region of the step): no prefetch thread lives during the run, and the batches
    are exactly those the background thread draws (Prefetch's two ways agree bit for bit)."""
    import threading

    import data
    import rundir
    import train
    ds = data.make_data("chameleon", 64, 0)
    inline = rundir.Prefetch(ds, 2, 0, 1, 5, 9, background=False)
    thread = rundir.Prefetch(ds, 2, 0, 1, 5, 9)
    try:
        for n in range(5, 9):
            a, b = inline.get(n), thread.get(n)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    finally:
        inline.close()
        thread.close()
    assert not inline.thread.is_alive() and not thread.thread.is_alive()
    seen = []
    step = train.train_step
    monkeypatch.setattr(train, "train_step", lambda *a, **k: (seen.append(
        [t.name for t in threading.enumerate() if t.name == "nanomix-prefetch"]), step(*a, **k))[1])
    train.train("dense", dict(d_model=32, n_layer=1, n_head=2, seq_len=64, batch_size=2, steps=3, gen_n=0,
                              eval_batches=1, device="cpu", out=str(tmp_path / "run")), quiet=True)
    assert seen == [[], [], []]
