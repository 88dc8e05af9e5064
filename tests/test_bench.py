"""bench.py's measuring helpers: the data path's ms per batch, the step's launch count, and --wall (each headline
run's wall time projected from its measured pieces, the step split by category)."""
import argparse
import math

import pytest
import torch

import bench
import kernels
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
        counts.append(bench.launch_count(bench.bench_step(model, ds.get_batch("train", 2, 0)), "cpu"))
    assert 0 < counts[0] < counts[1]


def test_data_ms_draws_fresh_batches():
    seen = []

    class DS:
        def get_batch(self, split, batch_size, index):
            seen.append((split, batch_size, index))
    ms = bench.data_ms(DS(), 16, n=4)
    assert ms >= 0 and len(seen) == 4 and len({i for _, _, i in seen}) == 4
    assert all(s == "train" and b == 16 for s, b, _ in seen)


# ------------------------------------------------------------------------------------------------ --wall

def _train_step_shim(model, batches, opt, sched, tc, autocast, world=1, cp=None):
    """train.train_step as the trainer adds it (the body of train.py's loop, one process), for a train.py without it."""
    accum, parts_sum, loss_sum = len(batches), {}, 0.0
    for batch in batches:
        with autocast():
            _, loss, parts = model(batch)
            (loss / accum).backward()
        loss_sum += float(loss.detach()) / accum
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0.0) + float(v) / accum
    gnorm = train.clip_grads(model, tc.grad_clip)
    ok = math.isfinite(loss_sum) and math.isfinite(gnorm)
    if ok:
        opt.step()
        sched.step()
    opt.zero_grad(set_to_none=True)
    return loss_sum, parts_sum, gnorm, ok


@pytest.fixture
def train_step(monkeypatch):
    """train.train_step (the shim above where train.py has none yet), counting its calls."""
    inner, calls = getattr(train, "train_step", _train_step_shim), []
    monkeypatch.setattr(train, "train_step", lambda *a, **k: (calls.append(1), inner(*a, **k))[1], raising=False)
    return calls

def test_wall_category_follows_the_outermost_named_event():
    cat = bench.wall_category
    assert cat(["aten::linear", "aten::t"]) == "matmul"                  # the view inside a matmul is the matmul's
    assert cat(["aten::t"]) == "other" and cat(["aten::empty"]) == "other" and cat(["Python op"]) == "other"
    assert cat(["nanomix:optimizer", "aten::_foreach_norm"]) == "optimizer"
    assert cat(["nanomix:optimizer", "aten::mm"]) == "optimizer"         # the region wins over the op's own name
    assert cat(["aten::cross_entropy_loss", "aten::_log_softmax"]) == "loss"
    assert cat(["aten::_log_softmax_backward_data"]) == "loss" and cat(["aten::_softmax"]) == "attention"
    assert cat(["aten::scaled_dot_product_attention", "aten::empty_like"]) == "attention"
    assert cat(["autograd::engine::evaluate_function: _SelectiveScanTorchBackward", "aten::mul"]) == "scan/FFT"
    assert cat(["aten::_fft_r2c"]) == "scan/FFT" and cat(["nanomix:routing", "aten::add"]) == "gather/scatter/routing"
    assert cat(["aten::index_select"]) == "gather/scatter/routing" and cat(["aten::embedding"]) == cat(["aten::sort"])
    assert cat(["aten::native_layer_norm"]) == cat(["aten::add"]) == cat(["aten::silu"]) == "elementwise & norms"


def test_split_by_category_adds_up_and_labels_the_scan():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 256, generator=g), torch.randn(256, 256, generator=g)
    x = [t.requires_grad_() for t in kernels_inputs()]

    def step():
        (a @ b @ b @ b).relu().sum()
        kernels.selective_scan(*x, backend="torch").sum().backward()
    cats, total = bench.split_by_category(step, "cpu")
    assert set(cats) == set(bench.WALL_ORDER) and abs(sum(cats.values()) - total) < 1e-9 * max(1.0, total)
    assert cats["matmul"] > 0 and cats["scan/FFT"] > 0 and cats["elementwise & norms"] > 0
    assert cats["matmul"] > cats["elementwise & norms"]                  # three 256^3 matmuls vs one relu + sum
    assert kernels.selective_scan.__name__ == "selective_scan"          # the labelling wrapper is removed again


def kernels_inputs():
    g = torch.Generator().manual_seed(1)
    b, d, n, L = 1, 8, 4, 16
    r = lambda *s: torch.randn(*s, generator=g)
    return [r(b, d, L), r(b, d, L), -torch.rand(d, n, generator=g) - 0.5, r(b, n, L), r(b, n, L)]


TINY_RUN = dict(cmd="python train.py --model dense (tiny)", models=("dense",), setting="chameleon", steps=24,
                target_s=None, before_s=3000, before="a test's", overrides={"dense": TINY},
                train_overrides=dict(seq_len=64, batch_size=2, gen_n=2, eval_batches=1, eval_every=8, gen_every=16,
                                     ckpt_every=10))


def test_wall_projects_a_tiny_run_from_its_pieces(tmp_path, capsys, monkeypatch, train_step):
    """--wall on a tiny dense run: the counts of evals, generation evals and checkpoints are those train.py makes
    (a real run of the same config), the projection is the sum of the measured pieces, the goal arithmetic holds,
    the step's categories add up to the profiled total, and the table names each run."""
    runs = {"tiny": TINY_RUN, "tiny-again": dict(TINY_RUN, cmd="the same run again", before_s=None, target_s=1e-3)}
    out = bench.bench_wall(argparse.Namespace(wall=None, device="cpu"), runs=runs)
    text = capsys.readouterr().out
    w, again = out
    r = w["models"][0]
    assert again["models"][0] is r                                        # one model measured once across runs
    assert len(train_step) == r["timed_steps"] + 3              # train.py's step: + 2 warm-up steps, 1 profiled
    # the counts train.py's loop makes for the same config
    saves = []
    orig_save = train.save_ckpt
    monkeypatch.setattr(train, "save_ckpt", lambda path, state: (saves.append(state["step"]), orig_save(path, state)))
    over = {**TINY, **TINY_RUN["train_overrides"], "steps": 24, "setting": "chameleon", "device": "cpu",
            "out": str(tmp_path / "run")}
    train.train("dense", over, quiet=True)
    recs = train.read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))
    evals = [x for x in recs if "eval_loss" in x]
    assert r["n_eval"] == len(evals) == 3 and r["n_gen"] == sum(any(k.startswith("gen_") for k in x) for x in evals) == 2
    assert r["n_ckpt"] == len(saves) == 3
    # the projections are the sums of their pieces: CPU (the run alone on one core) and wall (measured now)
    cpu = (r["steps"] * (r["step_cpu_ms"] + r["data_cpu_ms"]) + r["n_eval"] * r["eval_cpu_ms"]
           + r["n_gen"] * r["gen_cpu_ms"] + r["n_ckpt"] * r["ckpt_cpu_ms"]) / 1e3 + r["start_cpu_s"] + r["figures_cpu_s"]
    wall = (r["steps"] * r["fed_step_ms"] + r["n_eval"] * r["eval_ms"] + r["n_gen"] * r["gen_ms"]
            + r["n_ckpt"] * r["ckpt_ms"]) / 1e3 + r["start_s"] + r["figures_s"]
    assert abs(r["projected_cpu_s"] - cpu) < 1e-9 and abs(r["projected_s"] - wall) < 1e-9
    assert abs(w["projected_cpu_s"] - w["process_start_cpu_s"] - cpu) < 1e-9
    assert abs(w["projected_s"] - w["process_start_s"] - wall) < 1e-9
    assert all(r[k] > 0 for k in ("step_ms", "fed_step_ms", "step_cpu_ms", "data_cpu_ms", "eval_ms", "eval_cpu_ms",
                                  "gen_ms", "gen_cpu_ms", "ckpt_cpu_ms", "start_cpu_s", "figures_cpu_s"))
    assert abs(w["steps_s"] - 24 * (r["step_cpu_ms"] + r["data_cpu_ms"]) / 1e3) < 1e-9
    assert abs(w["steps_s"] + w["other_s"] - w["projected_cpu_s"]) < 1e-9
    assert abs(sum(w["steps_by_category_s"].values()) - w["steps_s"]) < 1e-9
    # the step's split: every category, adding up to the profiled total; a Transformer step has each of these
    assert abs(sum(r["categories_ms"].values()) - r["profiled_ms"]) < 1e-9
    assert all(r["categories_ms"][c] > 0 for c in ("matmul", "attention", "loss", "optimizer", "elementwise & norms"))
    # the FLOP floor: the step's FLOPs at the matmul peak measured now; the measured step is slower than it
    assert r["flops_per_step"] > 0 and w["matmul_peak_flops"] > 0
    assert abs(w["floor_step_ms"] - 1e3 * r["flops_per_step"] / w["matmul_peak_flops"]) < 1e-9
    assert w["floor_step_ms"] < r["step_cpu_ms"]
    # goals: 2/3 of the time before; a target of 1 ms cannot be met whatever the step
    assert w["goal_s"] == 2000 and w["met"] == (w["projected_cpu_s"] <= 2000)
    assert abs(w["need_step_ms"] * 24 / 1e3 + w["other_s"] - 2000) < 1e-6
    assert abs(w["need_speedup"] - w["steps_s"] / (2000 - w["other_s"])) < 1e-9
    assert again["goal_s"] == 1e-3 and not again["met"] and again["need_speedup"] == float("inf")
    for name, spec in runs.items():
        assert name in text and spec["cmd"] in text
    assert "impossible" in text and "matmul" in text
    # the in-loop step (train.train_step fed by Prefetch) against the pure model step, as ratios of one process
    assert r["pure_step_ms"] > 0 and r["in_loop_ratio"] == r["fed_step_ms"] / r["pure_step_ms"]
    assert r["thread_step_ms"] > 0 and r["thread_ratio"] == r["thread_step_ms"] / r["pure_step_ms"]   # CPU: both
    assert abs(w["wall_over_pure"] - w["projected_s"] / (24 * r["pure_step_ms"] / 1e3)) < 1e-9
    assert "in-loop/pure" in text and f"{r['in_loop_ratio']:.2f}x" in text and f"{w['wall_over_pure']:.2f}x (the run)" in text
    assert {"default", "chameleon", "transfusion", "bytes"} <= set(bench.WALL_RUNS)


def test_wall_unknown_run_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--wall", "nosuch", "--out", "/nonexistent/never_written.json"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nosuch" in err[0] and "default" in err[0]
