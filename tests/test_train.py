"""train.py: loss falls, exact resume after SIGKILL, DDP (2 gloo ranks) == one process, FLOPs counting, bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import cli
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "dense", "--d_model", "32", "--n_layer", "1", "--n_head", "2", "--seq_len", "64",
        "--batch_size", "4", "--eval_batches", "1", "--gen_n", "4", "--warmup", "5"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


def run(args, **kw):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *args], env=ENV, cwd=ROOT,
                          capture_output=True, text=True, **kw)


def weights(out):
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["model"]


def test_default_run_loss_falls(tmp_path):
    # the default model and setting, shortened: the loss must fall clearly
    assert train.main(["--steps", "60", "--eval_every", "60", "--out", str(tmp_path), "--eval_batches", "1",
                       "--gen_n", "4", "--batch_size", "8"]) == 0
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    tr = [r for r in rows if "loss" in r]
    assert tr[0]["step"] == 10 and tr[-1]["step"] == 60
    assert tr[-1]["loss"] < tr[0]["loss"] - 0.5
    ev = [r for r in rows if "eval_loss" in r][-1]
    for k in ("eval_loss_text", "eval_loss_image", "gen_image_acc", "gen_image_chance", "caption_acc", "flops", "tokens",
              "flops_matmul"):
        assert k in ev, k
    assert ev["tokens"] == 60 * 8 * 256 and ev["flops"] > 0
    assert os.path.exists(tmp_path / "loss.png") and os.path.exists(tmp_path / "config.json")


def test_exact_resume_after_sigkill(tmp_path):
    args = TINY + ["--steps", "24", "--ckpt_every", "4", "--eval_every", "12"]
    ref, cut = str(tmp_path / "ref"), str(tmp_path / "cut")
    assert run(args + ["--out", ref]).returncode == 0
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args, "--out", cut], env=ENV, cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600  # a loaded machine can take minutes to start it
    while time.time() < deadline and p.poll() is None:  # kill it mid-run, once a checkpoint exists
        if os.path.exists(os.path.join(cut, "ckpt.pt")):
            time.sleep(0.3)
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    step = torch.load(os.path.join(cut, "ckpt.pt"), weights_only=True)["step"]
    assert 0 < step <= 24
    r = run(args + ["--out", cut, "--resume"])
    assert r.returncode == 0, r.stderr
    a, b = weights(ref), weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # to the bit
    steps = [json.loads(l)["step"] for l in open(os.path.join(cut, "metrics.jsonl")) if '"loss"' in l]
    assert steps == sorted(set(steps))  # no duplicated log lines after the resume
    assert not [f for f in os.listdir(cut) if ".tmp" in f]


def test_ddp_two_ranks_equals_one_process(tmp_path):
    args = TINY + ["--steps", "6", "--eval_every", "6", "--lr", "1e-2"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert run(args + ["--out", one, "--micro_batch_size", "2"]).returncode == 0  # 2 micro-steps of 2
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                        os.path.join(ROOT, "train.py"), *args, "--out", two], env=ENV, cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = weights(one), weights(two)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    ev1 = [json.loads(l) for l in open(os.path.join(one, "metrics.jsonl")) if "eval_loss" in l][-1]
    ev2 = [json.loads(l) for l in open(os.path.join(two, "metrics.jsonl")) if "eval_loss" in l][-1]
    assert abs(ev1["eval_loss"] - ev2["eval_loss"]) < 1e-4  # eval averaged over ranks = eval on one


def test_count_flops_matches_hand_count():
    model, cfg, tc, ds = train.build("dense", overrides=dict(d_model=32, n_layer=1, n_head=2), train_overrides=dict(seq_len=64))
    b = ds.get_batch("train", 2, 0)
    fwd = train.count_flops(model, b, backward=False)
    d, T, V = 32, 64, ds.vocab_size
    ffn = model.cfg.ffn_hidden if getattr(model.cfg, "ffn_hidden", 0) else None
    if ffn:  # linear layers: 4 d^2 (attention) + 3 d ffn (SwiGLU) + d V (head); attention: 4 T d
        assert fwd == pytest.approx(2 * (4 * d * d + 3 * d * ffn + d * V) + 4 * T * d)
    assert train.count_flops(model, b) == pytest.approx(3 * fwd)


def test_count_flops_adds_the_scans_analytic_flops():
    # matmuls (FlopCounterMode) + the selective scan tallied by kernels.flop_tally, by Mamba's count
    model, cfg, tc, ds = train.build("mamba", overrides=dict(d_model=32, n_layer=1), train_overrides=dict(seq_len=64))
    b = ds.get_batch("train", 2, 0)
    f = train.count_flops(model, b, backward=False, parts=True)
    B, L, D, N = 2, 64, 2 * 32, cfg.d_state  # d_inner = expand * d_model
    assert f["scan_fft"] * B * L == pytest.approx(9 * B * L * D * N + 2 * B * L * D)  # 9 BLDN + D*u + silu(z) gate
    assert f["matmul"] > 0 and f["total"] == pytest.approx(f["matmul"] + f["scan_fft"])
    g = train.count_flops(model, b, parts=True)
    assert g["scan_fft"] == pytest.approx(3 * f["scan_fft"]) and train.count_flops(model, b) == pytest.approx(g["total"])


@pytest.mark.parametrize("argv, message", [
    (["--model", "nope"], "unknown model"),
    (["--setting", "video"], "unknown setting"),
    (["--bogus", "1"], "unknown key --bogus"),
    (["--steps", "ten"], "expected a int"),
    (["--untie_ffn", "maybe"], "expected a bool"),
    (["--setting", "bytes", "--model", "dense", "--data", "/no/such/file.txt"], "no such file"),
    (["--compare", "dense"], "at least two models"),
    (["--resume", "--out", "/tmp/nanomix_no_such_dir"], "no checkpoint"),
    (["--device", "tpu"], "choose auto, cpu or cuda"),
    (["--steps"], "needs a value"),
])
def test_bad_input_one_line_exit_2(argv, message, capsys):
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_bad_files(tmp_path, capsys):
    (tmp_path / "empty.txt").write_bytes(b"")
    assert train.main(["--model", "dense", "--setting", "bytes", "--data", str(tmp_path / "empty.txt")]) == 2
    assert "too short" in capsys.readouterr().err
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    assert train.main(TINY + ["--out", str(tmp_path), "--resume"]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_cli_exit_status():
    r = run(["--model", "nope"])
    assert r.returncode == 2 and r.stderr.startswith("error: unknown model") and "Traceback" not in r.stderr


def test_compare_fraction_interpolates():
    import plots  # the one flops_to_reach (train.py --compare and plots.py compare both use it)
    ev = [dict(flops=0, k=5.0), dict(flops=10, k=3.0), dict(flops=20, k=1.0)]
    assert plots.flops_to_reach(ev, "k", 2.0) == 15
    assert plots.flops_to_reach(ev, "k", 0.5) is None


# --- valid ranges, one rule per field; every bad value is one line and exit 2 ------------------------------------
def test_every_config_field_has_a_valid_range():
    # a new field in TrainConfig or in any registered model's Config without a rule in its RANGES fails here
    import dataclasses
    classes = {train.TrainConfig} | {c for (_, c, _, _, _) in train.registry().values()}
    missing = [f"{c.__module__}.{c.__name__}.{f.name}" for c in classes for f in dataclasses.fields(c)
               if cli.range_of(c, f.name) is None]
    assert not missing, f"add valid ranges (Config.RANGES) for: {missing}"
    for name, (mod, cfg_cls, _, setting, over) in train.registry().items():  # every default is inside its range
        train.check_ranges(cfg_cls(**over))
    train.check_ranges(train.TrainConfig())


def test_range_rules():
    assert cli.fits(1, "int >= 1") and not cli.fits(0, "int >= 1") and not cli.fits(1.5, "int >= 1")
    assert not cli.fits(True, "int >= 0") and not cli.fits(1, "bool") and cli.fits(False, "bool")
    assert cli.fits(1.0, "float in (0, 1]") and not cli.fits(0.0, "float in (0, 1]")
    assert not cli.fits(float("nan"), "float") and not cli.fits(float("inf"), "float > 0")
    assert cli.fits(float("inf"), "float in (0, inf]") and not cli.fits(1.0, "float in [0, 1)")
    assert cli.fits((1, 2), "ints >= 1") and not cli.fits((1, 0), "ints >= 1") and cli.fits((), "ints >= 1")
    assert cli.fits("post", "one of pre|post") and not cli.fits("mid", "one of pre|post")


BAD = [  # (argv, expected fragment of the one-line error); {tmp} is a fresh directory, {file} a file in it
    (["--steps", "-5"], "--steps=-5 is out of range; valid: int >= 0"),
    (["--batch_size", "-2"], "--batch_size=-2 is out of range"),
    (["--micro_batch_size", "-1"], "--micro_batch_size=-1 is out of range"),
    (["--log_every", "0"], "--log_every=0 is out of range; valid: int >= 1"),
    (["--ckpt_every", "0"], "--ckpt_every=0 is out of range"),
    (["--eval_batches", "0"], "--eval_batches=0 is out of range"),
    (["--eval_every", "-1"], "--eval_every=-1 is out of range"),
    (["--gen_n", "-1"], "--gen_n=-1 is out of range"),
    (["--lr", "-1"], "--lr=-1.0 is out of range; valid: float in (0, 10]"),
    (["--lr", "1e300"], "--lr=1e+300 is out of range; valid: float in (0, 10]"),   # AdamW's float32 overflow
    (["--lr", "11"], "--lr=11.0 is out of range"),
    (["--weight_decay", "1e300"], "--weight_decay=1e+300 is out of range; valid: float in [0, 1]"),
    (["--gen_n", "1000000000000"], "--gen_n=1000000000000 is out of range; valid: int in [0, 4096]"),   # a hang
    (["--eval_batches", "100000000000"], "--eval_batches=100000000000 is out of range; valid: int in [1, 10000]"),
    (["--lr", "nan"], "--lr=nan is out of range"),
    (["--lr", "inf"], "--lr=inf is out of range"),
    (["--seed", "-1"], "--seed=-1 is out of range"),
    (["--grad_clip", "-1"], "--grad_clip=-1.0 is out of range; valid: float in (0, inf]"),
    (["--min_lr_ratio", "-20"], "--min_lr_ratio=-20.0 is out of range; valid: float in [0, 1]"),
    (["--weight_decay", "-1"], "--weight_decay=-1.0 is out of range"),
    (["--d_model", "0"], "--d_model=0 is out of range"),
    (["--n_layer", "-1"], "--n_layer=-1 is out of range"),
    (["--norm_placement", "mid"], "valid: one of pre|post"),
    (["--model", "mamba", "--d_state", "0"], "--d_state=0 is out of range"),
    (["--model", "moma", "--routing", "xyz"], "valid: one of ec|aux"),          # same name, per-file rule
    (["--model", "dense", "--routing", "xyz"], "valid: one of grouped|masked"),
    (["--model", "moma", "--experts", "4,0"], "--experts=4,0 is out of range"),
    (["--model", "blt", "--patch_size", "0.5"], "valid: float >= 1"),
    (["--model", "megabyte", "--dropout", "1"], "valid: float in [0, 1)"),
    (["--vocab_size", "10"], "--vocab_size is set by the data"),
    (["--model", "mot", "--seq_len", "8"], "too short for the generation eval"),
    (["--model", "transfusion", "--seq_len", "16"], "too short for the generation eval"),
    (["--model", "mamba", "--setting", "transfusion"], "does not support --setting transfusion"),
    (["--batch_size", "4", "--micro_batch_size", "8"], "larger than the per-rank batch 4"),
    (["--batch_size", "6", "--micro_batch_size", "4"], "must divide the per-rank batch 6"),
    (["--compile", "True"], "CUDA only"),
    (["--out", "{file}"], "is a file, not a directory"),
    (["--out", "{file}/sub"], "cannot create that directory"),
    (["--bogus", "1"], "trainer keys: batch_size"),
    (["--compare", "dense,dense"], "names dense twice"),
    (["--model", "megabyte", "--gen_n", "4"], "--gen_n has no effect"),   # no silent flags (trainer keys)
    (["--data", "{file}"], "add --setting bytes"),
    (["--model", "megabyte", "--setting", "chameleon"], "supported: bytes"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_value_one_line_exit_2(argv, message, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    argv = [a.replace("{file}", str(tmp_path / "f")) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "out" / "ckpt.pt")


def test_resume_refuses_a_changed_model_config(tmp_path, capsys):
    out = str(tmp_path)
    assert train.main(TINY + ["--steps", "2", "--eval_every", "2", "--out", out]) == 0
    before = weights(out)
    capsys.readouterr()
    assert train.main(TINY + ["--steps", "4", "--out", out, "--resume", "--d_model", "64", "--qk_norm", "True"]) == 2
    err = capsys.readouterr().err.strip()
    assert "d_model (32 -> 64)" in err and "qk_norm (False -> True)" in err and len(err.splitlines()) == 1
    assert train.main(TINY + ["--steps", "4", "--out", out, "--resume", "--seq_len", "48"]) == 2
    assert "seq_len (64 -> 48)" in capsys.readouterr().err
    after = weights(out)
    assert all(torch.equal(before[k], after[k]) for k in before)  # untouched


def test_resume_after_a_partial_metrics_line(tmp_path):
    out = str(tmp_path)
    assert train.main(TINY + ["--steps", "4", "--log_every", "2", "--eval_every", "4", "--out", out]) == 0
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 3.')  # a kill mid-write
    assert train.main(TINY + ["--steps", "6", "--log_every", "2", "--eval_every", "4", "--out", out, "--resume"]) == 0
    steps = [json.loads(l)["step"] for l in open(tmp_path / "metrics.jsonl") if '"loss"' in l]
    assert steps == [2, 4, 6]


@pytest.mark.parametrize("model, extra, eval_every", [
    ("dense", ["--d_model", "32", "--n_layer", "1", "--n_head", "2", "--gen_n", "4"], 1),  # by the eval after step 1
    ("megalodon", ["--d_model", "32", "--n_layers", "1", "--chunk_size", "32"], 100)])  # by step 2's loss
def test_divergence_stops_and_keeps_the_last_good_checkpoint(model, extra, eval_every, tmp_path, capsys, monkeypatch):
    # lr 1e9: the weights blow up at the first step; a NaN must never reach ckpt.pt, the run must stop in one line
    monkeypatch.setitem(train.TrainConfig.RANGES, "lr", "float > 0")   # past the sane range, to blow up on purpose
    argv = ["--model", model, *extra, "--seq_len", "64", "--batch_size", "4", "--eval_batches", "1",
            "--warmup", "1", "--lr", "1e9", "--steps", "20", "--ckpt_every", "1", "--eval_every", str(eval_every),
            "--out", str(tmp_path)]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not finite" in err and "lower --lr" in err, err
    step = int(err.split("step ")[1].split(":")[0])
    if eval_every == 1:
        assert step == 1 and "eval loss" in err and not os.path.exists(tmp_path / "ckpt.pt")
        return
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert 0 < ck["step"] < step <= 20 and f"checkpoint (step {ck['step']})" in err
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_one_run_per_output_dir(tmp_path, capsys):
    out = str(tmp_path)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "train.lock").write_text(str(sleeper.pid))  # a live run holds it
        assert train.main(TINY + ["--steps", "2", "--out", out]) == 2
        assert f"in use by a running train.py (pid {sleeper.pid})" in capsys.readouterr().err
        assert not os.path.exists(tmp_path / "ckpt.pt")
    finally:
        sleeper.kill(); sleeper.wait()
    # the same lock, its run killed: stale, taken over, released at the end
    assert train.main(TINY + ["--steps", "2", "--eval_every", "2", "--out", out]) == 0
    assert not os.path.exists(tmp_path / "train.lock") and os.path.exists(tmp_path / "ckpt.pt")


def test_two_concurrent_runs_on_one_out_dir(tmp_path):
    out = str(tmp_path)
    args = TINY + ["--steps", "100000", "--eval_every", "100000", "--out", out]  # killed below
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args], env=ENV, cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not os.path.exists(tmp_path / "train.lock") and time.time() < deadline:
            time.sleep(0.05)
        r = run(TINY + ["--steps", "1", "--out", out])
        assert r.returncode == 2 and "in use by a running train.py" in r.stderr and "Traceback" not in r.stderr
    finally:
        p.kill(); p.wait()


def test_torchrun_validates_before_the_process_group(monkeypatch, capsys):
    # as torchrun sets it up, but no rendezvous exists: a bad value must fail at once, before init_process_group
    for k, v in dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(k, v)
    assert train.main(TINY + ["--lr", "-1"]) == 2
    assert "--lr=-1.0 is out of range" in capsys.readouterr().err
    assert train.main(TINY + ["--batch_size", "3"]) == 2
    assert "does not split over 2 ranks" in capsys.readouterr().err
    assert not torch.distributed.is_initialized()


# --- --help that teaches; no silent flags ----------------------------------------------------------------------
def test_help_lists_models_settings_and_trainer_keys(capsys):
    import re
    import dataclasses
    import data
    assert train.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, (_, _, _, setting, _) in train.registry().items():  # name, default setting, a description
        assert re.search(rf"^  {re.escape(name)} +{setting} +\S", out, re.M), name
    for st in data.SETTINGS:
        assert re.search(rf"^  {st} +\S", out, re.M), st
    for f in dataclasses.fields(train.TrainConfig):
        assert f"--{f.name}={f.default}" in out, f.name


def test_help_for_each_model_shows_its_keys_with_the_comments_of_its_config_source(capsys):
    import dataclasses
    import inspect
    import re
    for name, (mod, cfg_cls, _, _, over) in train.registry().items():
        assert train.main(["--help", "--model", name]) == 0
        out = capsys.readouterr().out
        src = inspect.getsource(cfg_cls)
        cfg = cfg_cls(**over)
        for f in dataclasses.fields(cfg):
            if f"--{f.name}=" not in out:
                assert f.name in out.split("set by the data")[1], (name, f.name)  # listed as a data key
                continue
            line = next(l for l in src.splitlines() if re.match(rf"\s+{f.name}\s*:", l))
            if "#" in line:
                assert line.split("#", 1)[1].strip() in out, (name, f.name)


def test_text_setting_has_no_generation_eval_and_finishes(tmp_path):
    # dense on the text setting used to train, then crash at the first eval in the chameleon generation eval
    i = TINY.index("--gen_n")
    argv = TINY[:i] + TINY[i + 2:]  # --gen_n would be refused: the text setting has no generation eval
    assert train.main(argv + ["--setting", "text", "--steps", "2", "--eval_every", "2", "--out", str(tmp_path)]) == 0
    ev = [json.loads(l) for l in open(tmp_path / "metrics.jsonl") if "eval_loss" in l][-1]
    assert "gen_image_acc" not in ev


def test_compare_checks_every_model_before_training_and_plots_with_plots_py(tmp_path, capsys):
    # a bad value for the second model fails before the first trains
    assert train.main(["--compare", "dense,moma", "--routing", "xyz", "--out", str(tmp_path / "bad")]) == 2
    assert not os.path.exists(tmp_path / "bad" / "dense")
    args = [a for a in TINY if a != "dense"][1:] + ["--steps", "2", "--eval_every", "2"]
    assert train.main(["--compare", "dense,mot", *args, "--out", str(tmp_path)]) == 0
    assert os.path.exists(tmp_path / "compare.png") and os.path.exists(tmp_path / "compare.json")
    assert os.path.exists(tmp_path / "dense" / "loss.png")


def test_resume_is_exact_with_training_noise(tmp_path, killed_after):
    # the noise of every micro-batch comes from a seed of its rows: a resumed run draws what the whole run drew
    args = ["--model", "moma", "--gumbel", "0.5", "--d_model", "32", "--n_layer", "1", "--n_head", "2", "--gen_n", "0",
            "--seq_len", "64", "--batch_size", "4", "--micro_batch_size", "2",
            "--eval_batches", "1", "--steps", "4", "--eval_every", "4", "--ckpt_every", "2"]
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    assert train.main(args + ["--out", whole]) == 0
    killed_after(2, args + ["--out", cut])   # the run dies after its step-2 checkpoint
    assert train.main(args + ["--out", cut, "--resume"]) == 0
    a, b = weights(whole), weights(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_compare_checks_every_run_dir_and_lock_before_the_first_step(tmp_path, capsys):
    args = [a for a in TINY if a != "dense"][1:] + ["--steps", "2", "--eval_every", "2", "--gen_n", "0"]
    os.makedirs(tmp_path / "mot")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:   # the second model's directory is locked by a live run: the first never trains
        (tmp_path / "mot" / "train.lock").write_text(str(sleeper.pid))
        assert train.main(["--compare", "dense,mot", *args, "--out", str(tmp_path)]) == 2
        assert f"in use by a running train.py (pid {sleeper.pid})" in capsys.readouterr().err
        assert not os.path.exists(tmp_path / "dense" / "metrics.jsonl")
        assert not os.path.exists(tmp_path / "dense" / "train.lock")           # its lock released on the way out
    finally:
        sleeper.kill(); sleeper.wait()
    torch.save({}, tmp_path / "mot" / "ckpt.pt")   # another run's checkpoint: refused without --overwrite, up front
    assert train.main(["--compare", "dense,mot", *args, "--out", str(tmp_path)]) == 2
    assert "holds another run's checkpoint" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "dense" / "metrics.jsonl")


def test_compare_refuses_model(tmp_path, capsys):
    args = [a for a in TINY if a != "dense"][1:] + ["--steps", "1", "--eval_every", "1", "--gen_n", "0"]
    assert train.main(["--compare", "dense,mot", *args, "--model", "moma", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--model" in err and not os.path.exists(tmp_path / "c")


def test_a_failing_figure_never_costs_a_finished_run(tmp_path, monkeypatch, capsys):
    import plots

    def boom(*a, **k):
        raise RuntimeError("no display")
    monkeypatch.setattr(plots, "plot_run", boom)
    monkeypatch.setattr(plots, "model_figures", boom)
    assert train.main(TINY + ["--steps", "2", "--eval_every", "2", "--out", str(tmp_path)]) == 0
    assert "warning: the loss curve figure failed (RuntimeError: no display)" in capsys.readouterr().out
    assert os.path.exists(tmp_path / "ckpt.pt")


def test_train_py_holds_no_plotting_code():
    src = open(os.path.join(ROOT, "train.py")).read()
    assert "matplotlib" not in src and "plt." not in src
