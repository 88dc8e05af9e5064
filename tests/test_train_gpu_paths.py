"""The trainer's GPU paths, tested on a CPU: what a first run on a T4, a V100, an A100/H100, a Mac or two GPUs meets.

Precision by compute capability (mocked), fp16 + GradScaler trained on the CPU (its autocast has fp16): loss near
fp32's, exact resume with the scaler's state, an overflowing step skipped (not a divergence), a collapsed scale or a
non-finite loss still stopping the run; --device mps refused where there is none; the process group's backends;
FLOPs the same on every kernel backend; evaluation leaving the device generator as it found it; one host read per
optimizer step. The DDP collectives' devices are checked in tests/test_train_ddp.py (its torchrun run records them).
"""
import json
import os
import sys

import pytest
import torch

import cli
import kernels
import train

TINY = ["--model", "dense", "--d_model", "32", "--n_layer", "1", "--n_head", "2", "--seq_len", "64",
        "--batch_size", "4", "--eval_batches", "1", "--gen_n", "4", "--warmup", "5", "--device", "cpu"]


def rows(out, key="loss"):
    return [r for r in train.read_jsonl(os.path.join(out, "metrics.jsonl")) if key in r]


def tiny_step_setup():
    model, cfg, tc, ds = train.build("dense", overrides=dict(d_model=32, n_layer=1, n_head=2),
                                     train_overrides=dict(seq_len=64, batch_size=4, warmup=1))
    opt, sched = train.make_optimizer(model, tc)
    return model, tc, opt, sched, [ds.get_batch("train", 4, i) for i in range(3)]


def fp16_autocast():
    return torch.autocast("cpu", dtype=torch.float16)


def inf_grad_once(p):
    """A hook that makes p's gradient inf for one backward pass (an fp16 overflow), then removes itself."""
    def hook(g):
        handle.remove()
        return torch.full_like(g, float("inf"))
    handle = p.register_hook(hook)


# --- precision by capability ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("cap, auto", [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((8, 6), "bf16"),
                                       ((9, 0), "bf16")])
def test_precision_auto_by_compute_capability(monkeypatch, cap, auto):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    assert cli.resolve_precision("auto", "cuda:0") == auto
    assert cli.resolve_precision("fp32", "cuda:0") == "fp32" and cli.resolve_precision("fp16", "cuda:0") == "fp16"
    scaler = cli.grad_scaler("cuda:0", "auto")
    assert (scaler is not None) == (auto == "fp16")             # loss scaling exactly where fp16 runs
    if cap < (8, 0):                                             # bf16 there is emulated: refused, fp16 named
        with pytest.raises(cli.UsageError, match=r"no native bf16; use --precision=fp16"):
            cli.resolve_precision("bf16", "cuda:0")
    else:
        assert cli.resolve_precision("bf16", "cuda:0") == "bf16"


def test_precision_on_cpu_and_mps():
    assert cli.resolve_precision("auto", "cpu") == "fp32"                       # the default: unchanged
    assert train.autocast_for("cpu") is train.autocast_for("cpu", "fp32")       # no autocast at all
    assert cli.grad_scaler("cpu") is None
    for p, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):        # forced on the CPU: for testing
        with train.autocast_for("cpu", p)():
            assert torch.get_autocast_dtype("cpu") == dtype and torch.is_autocast_enabled("cpu")
    assert isinstance(cli.grad_scaler("cpu", "fp16"), torch.amp.GradScaler)
    assert cli.resolve_precision("auto", "mps") == "fp32"
    with pytest.raises(cli.UsageError, match="not supported on mps"):
        cli.resolve_precision("fp16", "mps")


def test_precision_bad_value_one_line(tmp_path, capsys):
    assert train.main(TINY + ["--precision", "fp8", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--precision=fp8 is out of range; valid: one of auto|fp32|bf16|fp16" in err and len(err.splitlines()) == 1


# --- fp16 + GradScaler, trained on the CPU ----------------------------------------------------------------------------
def test_fp16_run_close_to_fp32_and_its_resume_is_exact(tmp_path, killed_after):
    args = TINY + ["--steps", "20", "--eval_every", "20", "--ckpt_every", "10", "--log_every", "1"]
    fp32, fp16, cut = (str(tmp_path / d) for d in ("fp32", "fp16", "cut"))
    assert train.main(args + ["--out", fp32]) == 0
    assert train.main(args + ["--out", fp16, "--precision", "fp16"]) == 0
    a, b = rows(fp32)[-1]["loss"], rows(fp16)[-1]["loss"]
    assert rows(fp16)[0]["loss"] > b and abs(b - a) / a < 0.02, (a, b)  # it learns, and like fp32
    ref = torch.load(os.path.join(fp16, "ckpt.pt"), weights_only=True)
    assert ref["scaler"]["scale"] > 0 and torch.load(os.path.join(fp32, "ckpt.pt"), weights_only=True)["scaler"] is None

    killed_after(10, args + ["--out", cut, "--precision", "fp16"])   # the run dies after its step-10 checkpoint
    assert torch.load(os.path.join(cut, "ckpt.pt"), weights_only=True)["step"] == 10
    assert train.main(args + ["--out", cut, "--precision", "fp16", "--resume"]) == 0
    got = torch.load(os.path.join(cut, "ckpt.pt"), weights_only=True)
    assert all(torch.equal(ref["model"][k], got["model"][k]) for k in ref["model"])   # 10 + resume 10 == 20, bits
    assert got["scaler"] == ref["scaler"]
    assert [r["loss"] for r in rows(cut)] == [r["loss"] for r in rows(fp16)]


def overflow_at_step(n, monkeypatch):
    """train.train_step with an inf gradient put into the n-th call; -> the list counting the calls."""
    step, calls = train.train_step, []

    def overflowing(model, *a, **k):
        calls.append(1)
        if len(calls) == n:
            inf_grad_once(next(model.parameters()))
        return step(model, *a, **k)
    monkeypatch.setattr(train, "train_step", overflowing)
    return calls


def test_fp16_resume_restores_the_scale(tmp_path, monkeypatch):
    # a skipped step at 3 halves the scale; a resume from step 5 must carry the halved scale, not start afresh
    args = TINY + ["--steps", "8", "--eval_every", "8", "--ckpt_every", "5", "--precision", "fp16"]
    overflow_at_step(3, monkeypatch)
    assert train.main(args + ["--out", str(tmp_path), "--steps", "5"]) == 0
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["scaler"]["scale"] == 2.0 ** 15
    assert train.main(args + ["--out", str(tmp_path), "--resume"]) == 0
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ck["step"] == 8 and ck["scaler"]["scale"] == 2.0 ** 15 and ck["scaler"]["_growth_tracker"] == 5


def test_an_overflowing_fp16_step_is_skipped_not_a_divergence(tmp_path, monkeypatch, capsys):
    calls = overflow_at_step(3, monkeypatch)
    args = TINY + ["--steps", "6", "--eval_every", "6", "--log_every", "1"]
    assert train.main(args + ["--out", str(tmp_path / "fp16"), "--precision", "fp16"]) == 0
    assert [r["step"] for r in rows(str(tmp_path / "fp16"))] == [1, 2, 3, 4, 5, 6]
    assert torch.load(tmp_path / "fp16" / "ckpt.pt", weights_only=True)["scaler"]["scale"] == 2.0 ** 15  # halved once
    calls.clear()
    capsys.readouterr()
    assert train.main(args + ["--out", str(tmp_path / "fp32")]) == 2   # without a scaler the same gradient stops it
    assert "step 3: the loss" in capsys.readouterr().err


def test_train_step_with_a_scaler_skips_then_stops_when_the_scale_collapses():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0)
    model, tc, opt, sched, batches = tiny_step_setup()
    p = next(model.parameters())
    before = p.detach().clone()
    inf_grad_once(p)
    loss, parts, gnorm, ok = train.train_step(model, batches[:1], opt, sched, tc, fp16_autocast, scaler=scaler)
    assert ok and not torch.isfinite(torch.tensor(gnorm)) and torch.equal(p, before)     # skipped: not a divergence
    assert scaler.get_scale() == 1.0 and isinstance(loss, float) and all(isinstance(v, float) for v in parts.values())
    loss, parts, gnorm, ok = train.train_step(model, batches[1:2], opt, sched, tc, fp16_autocast, scaler=scaler)
    assert ok and gnorm < float("inf") and not torch.equal(p, before)                   # the next step trains
    inf_grad_once(p)                                                                     # 1.0 -> 0.5: collapsed
    assert not train.train_step(model, batches[2:], opt, sched, tc, fp16_autocast, scaler=scaler)[3]


def test_fp16_real_divergence_still_stops_the_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(train.TrainConfig.RANGES, "lr", "float > 0")   # past the sane range, to blow up on purpose
    argv = TINY + ["--precision", "fp16", "--warmup", "1", "--lr", "1e9", "--steps", "20", "--ckpt_every", "1",
                   "--eval_every", "100", "--out", str(tmp_path)]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not finite" in err and "lower --lr" in err, err


@pytest.mark.parametrize("name", ["dense", "mot", "moma", "mamba", "mom", "transfusion", "megabyte", "blt", "megalodon",
                                  "megalodon-scan"])
def test_every_family_trains_under_fp16_with_a_scaler(name, tmp_path):
    # what `--precision auto` picks on a T4 or a V100, here on the CPU: every model file, two steps, an eval
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_train_ddp import COMMON, FAMILIES
    model = name.split("-")[0]
    over = dict(COMMON, **FAMILIES[model], steps="2", eval_every="2", precision="fp16", device="cpu", out=str(tmp_path))
    if model == "blt":  # no entropy model needed
        over.pop("entropy_ckpt")
        over["patching"] = "space"
    if name == "megalodon-scan":
        over["cema_impl"] = "scan"
    assert train.main(["--model", model] + [x for k, v in over.items() for x in (f"--{k}", v)]) == 0
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["scaler"]["scale"] > 0


# --- Apple silicon ----------------------------------------------------------------------------------------------------
def test_device_mps_is_refused_in_one_line_where_there_is_none(tmp_path, capsys):
    assert not torch.backends.mps.is_available()
    assert train.main(TINY[:-2] + ["--device", "mps", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--device=mps" in err and "is_available() is False" in err and len(err.splitlines()) == 1, err


def test_mps_by_name_only_and_its_gaps_named_before_training(monkeypatch, capsys):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.resolve_device("auto", 0) == "cpu" and cli.resolve_device("mps", 0) == "mps"
    model, cfg, tc, ds = train.build("megalodon", overrides=dict(d_model=32, n_layers=1, chunk_size=32),
                                     train_overrides=dict(seq_len=64, batch_size=4))
    cli.check_run("megalodon", model, tc, ds, 1, "mps")
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1 and "complex FFTs" in out and "--cema_impl=scan" in out
    cfg.cema_impl = "scan"
    cli.check_run("megalodon", model, tc, ds, 1, "mps")
    assert capsys.readouterr().out == ""
    with pytest.raises(cli.UsageError, match="one process"):
        cli.check_run("megalodon", model, tc, ds, 2, "mps")


# --- the process group ------------------------------------------------------------------------------------------------
def test_process_group_has_a_cpu_backend_beside_nccl(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: calls.append(backend))
    cli.init_process_group("cuda:0")
    cli.init_process_group("cpu")
    assert calls == ["cpu:gloo,cuda:nccl", "gloo"]


def test_train_starts_the_process_group_through_cli(tmp_path, monkeypatch):
    seen = []

    def init(dev):
        seen.append(dev)
        raise RuntimeError("stop here")
    monkeypatch.setattr(cli, "init_process_group", init)
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0").items():
        monkeypatch.setenv(k, v)
    with pytest.raises(RuntimeError, match="stop here"):
        train.main(TINY + ["--steps", "1", "--out", str(tmp_path)])
    assert seen == ["cpu"]


# --- FLOPs independent of the kernels' backend ------------------------------------------------------------------------
FLOP_MODELS = {  # name -> (model overrides, the Config fields that select the kernels' backend, or None: patched)
    "mot": (dict(d_model=32, n_layer=1, n_head=2), None),
    "moma": (dict(d_model=32, n_layer=1, n_head=2), None),
    "mom": (dict(d_model=32, n_layer=1), "backend"),
    "mamba": (dict(d_model=32, n_layer=1), "backend"),
    "megalodon": (dict(d_model=32, n_layers=1, chunk_size=32, cema_impl="scan"), "scan_backend"),
}


@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("name", list(FLOP_MODELS))
def test_count_flops_is_the_same_on_every_backend(name, backend, monkeypatch):
    over, field = FLOP_MODELS[name]

    def flops(b):
        with monkeypatch.context() as m:
            if field is None:  # mot and moma call kernels.grouped_matmul with the default backend: force it
                gmm = kernels.grouped_matmul
                m.setattr(kernels, "grouped_matmul", lambda x, w, s, backend="auto": gmm(x, w, s, backend=b))
            model, cfg, tc, ds = train.build(name, overrides=dict(over, **({field: b} if field else {})),
                                             train_overrides=dict(seq_len=64))
            return train.count_flops(model, ds.get_batch("train", 2, 0), parts=True)
    assert flops(backend) == flops("torch")


# --- evaluation leaves the generators as it found them ----------------------------------------------------------------
def eval_setup():
    model, cfg, tc, ds = train.build("moma", overrides=dict(d_model=32, n_layer=1, n_head=2),
                                     train_overrides=dict(seq_len=64, batch_size=4, eval_batches=1))
    return model, tc, ds


def test_eval_leaves_the_training_rng_stream_alone():
    model, tc, ds = eval_setup()
    torch.manual_seed(7)
    want = torch.rand(4)
    torch.manual_seed(7)
    train.evaluate(model, ds, tc, 0, 1, "cpu", train.autocast_for("cpu"))
    assert torch.equal(torch.rand(4), want)


def test_eval_restores_the_cuda_generator_through_the_same_path(monkeypatch):
    # a fake CUDA generator: torch.manual_seed (inside the eval) reseeds it as it would the real one
    state = {0: torch.tensor([1], dtype=torch.uint8), 1: torch.tensor([2], dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=0: state[device].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device=0: state.__setitem__(device, s.clone()))
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: state.update({d: torch.tensor([seed % 256],
                                                                                   dtype=torch.uint8) for d in state}))
    monkeypatch.setattr(train, "to", lambda batch, device: batch)  # the model stays on the CPU
    model, tc, ds = eval_setup()
    before = {d: s.clone() for d, s in state.items()}
    train.evaluate(model, ds, tc, 0, 1, "cuda:1", train.autocast_for("cpu"))
    assert torch.equal(state[1], before[1])                       # the training device's generator: as found
    state[0] = before[0].clone()                                  # (device 0, not in use, was reseeded: a real one too)
    with cli.fork_rng("cuda"):                                    # no index: device 0
        torch.manual_seed(3)
    assert torch.equal(state[0], before[0])


# --- the loop's overhead: one host read per optimizer step ------------------------------------------------------------
def test_train_step_reads_the_device_once(monkeypatch):
    model, tc, opt, sched, batches = tiny_step_setup()
    reads = []
    here = os.path.abspath(train.__file__)
    for name in ("item", "tolist", "__float__", "__bool__", "__int__", "__index__"):
        orig = getattr(torch.Tensor, name)

        def spy(self, *a, _orig=orig, _name=name, **k):
            if os.path.abspath(sys._getframe(1).f_code.co_filename) == here:   # train.py's own reads only
                reads.append(_name)
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, spy)
    loss, parts, gnorm, ok = train.train_step(model, batches[:2], opt, sched, tc, train.autocast_for("cpu"))
    assert reads == ["tolist"], reads
    assert ok and isinstance(loss, float) and isinstance(gnorm, float) and set(parts) >= {"loss_text"}


def test_train_step_values_equal_the_python_sums():
    # the device sums are float64: exactly what summing float(loss) / accum in Python gave, bit for bit
    model, tc, opt, sched, batches = tiny_step_setup()
    want, parts = 0.0, {}
    with torch.no_grad():
        for b in batches:
            _, l, p = model(b)
            want += float(l) / 3
            for k, v in p.items():
                parts[k] = parts.get(k, 0.0) + float(v) / 3
    loss, got, _, _ = train.train_step(model, batches, opt, sched, tc, train.autocast_for("cpu"))
    assert loss == want and got == parts


def test_metrics_rows_are_plain_json(tmp_path):
    assert train.main(TINY + ["--steps", "2", "--eval_every", "2", "--log_every", "1", "--out", str(tmp_path)]) == 0
    for line in open(tmp_path / "metrics.jsonl"):
        assert all(isinstance(v, (int, float)) for v in json.loads(line).values())
