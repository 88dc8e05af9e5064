"""train.py: loss falls, exact resume after SIGKILL, DDP (2 gloo ranks) == one process, FLOPs counting, bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

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
    for k in ("eval_loss_text", "eval_loss_image", "gen_image_acc", "gen_image_chance", "caption_acc", "flops", "tokens"):
        assert k in ev, k
    assert ev["tokens"] == 60 * 8 * 256 and ev["flops"] > 0
    assert os.path.exists(tmp_path / "loss.png") and os.path.exists(tmp_path / "config.json")


def test_exact_resume_after_sigkill(tmp_path):
    args = TINY + ["--steps", "24", "--ckpt_every", "4", "--eval_every", "12"]
    ref, cut = str(tmp_path / "ref"), str(tmp_path / "cut")
    assert run(args + ["--out", ref]).returncode == 0
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args, "--out", cut], env=ENV, cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
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
    ev = [dict(flops=0, k=5.0), dict(flops=10, k=3.0), dict(flops=20, k=1.0)]
    assert train.flops_to_reach(ev, "k", 2.0) == 15
    assert train.flops_to_reach(ev, "k", 0.5) is None
