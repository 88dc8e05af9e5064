"""rundir.py: one run per output directory (the lock holds while any process of a run lives), resume that checks
every file before it writes a byte, path options that accept regular files only, and one-line failures."""
import copy
import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import rundir
import train
from cli import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "dense", "--d_model", "32", "--n_layer", "1", "--n_head", "2", "--seq_len", "64",
        "--batch_size", "4", "--eval_batches", "1", "--gen_n", "4", "--warmup", "5"]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def one_line(e):
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "Traceback" not in msg, msg
    return msg


# --- the lock: real processes stand in for a run's ranks ----------------------------------------------------------
RANK = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    import rundir
    try:
        rundir.lock_out({out!r})
        print("locked", flush=True)
    except Exception as e:
        print("refused", e, flush=True)
        sys.exit(0)
    time.sleep(120)
""")


def clean_env(**launch):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return dict(env, OMP_NUM_THREADS="1", **launch)


def start_rank(out, **launch):
    """A process that takes OUT's lock and sleeps (a rank of a run): -> (Popen, its first line)."""
    p = subprocess.Popen([sys.executable, "-c", RANK.format(root=ROOT, out=out)], env=clean_env(**launch),
                         stdout=subprocess.PIPE, text=True)
    return p, p.stdout.readline().strip()


def wait_dead(pid, timeout=30):
    deadline = time.time() + timeout
    while rundir._alive(pid) and time.time() < deadline:
        time.sleep(0.05)
    assert not rundir._alive(pid), pid


@pytest.fixture
def procs():
    ps = []
    yield ps
    for p in ps:
        p.kill()
        p.wait()


def test_a_killed_launcher_whose_ranks_train_on_keeps_the_lock(tmp_path, monkeypatch):
    # torchrun, in miniature: a launcher starts two ranks that each join the lock, then the launcher is killed -9
    out = str(tmp_path)
    launcher_src = textwrap.dedent(f"""
        import os, subprocess, sys, time
        ps = [subprocess.Popen([sys.executable, "-c", {RANK.format(root=ROOT, out=out)!r}], stdout=subprocess.PIPE,
                               text=True, env=dict(os.environ, RANK=str(r), LOCAL_RANK=str(r)))
              for r in range(2)]
        print(*[p.pid for p in ps], *[p.stdout.readline().strip() for p in ps], flush=True)
        time.sleep(120)
    """)
    env = clean_env(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", TORCHELASTIC_RUN_ID="none")
    launcher = subprocess.Popen([sys.executable, "-c", launcher_src], env=env, stdout=subprocess.PIPE, text=True)
    pid0, pid1, *said = launcher.stdout.readline().split()
    workers = [int(pid0), int(pid1)]
    try:
        assert said == ["locked", "locked"]  # the ranks of one launch share the lock
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        for k in LAUNCH_VARS:
            monkeypatch.delenv(k, raising=False)
        with pytest.raises(UsageError) as e:  # the ranks still train: the lock is held
            rundir.lock_out(out)
        msg = one_line(e)
        assert "in use by a running train.py (pids" in msg and f"{pid0}" in msg and f"{pid1}" in msg
        os.kill(workers[0], signal.SIGKILL)
        wait_dead(workers[0])
        with pytest.raises(UsageError, match=f"pid {pid1}\\)"):  # one rank alive is enough
            rundir.lock_out(out)
    finally:
        for pid in workers:
            if rundir._alive(pid):
                os.kill(pid, signal.SIGKILL)
    wait_dead(workers[1])
    path = rundir.lock_out(out)  # every process of the run is dead: the lock is stale, taken over
    rundir.unlock(path)
    assert not os.path.exists(path)


def test_an_inherited_torchelastic_run_id_does_not_share_the_lock(tmp_path, procs):
    # a shell that exported TORCHELASTIC_RUN_ID: two plain runs from it are two runs, not two ranks of one
    first, said = start_rank(str(tmp_path), TORCHELASTIC_RUN_ID="abc")
    procs.append(first)
    assert said == "locked"
    second, said = start_rank(str(tmp_path), TORCHELASTIC_RUN_ID="abc")
    procs.append(second)
    assert said.startswith("refused") and f"pid {first.pid}" in said, said


def test_ranks_of_one_launch_join_and_a_second_launch_is_refused(tmp_path, procs):
    out = str(tmp_path)
    launch = dict(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29534", TORCHELASTIC_RUN_ID="r1")
    for r in range(2):
        p, said = start_rank(out, RANK=str(r), **launch)
        procs.append(p)
        assert said == "locked"
    lines = open(tmp_path / "train.lock").read().split("\n")
    assert [int(l.split()[0]) for l in lines if l] == [p.pid for p in procs]  # every rank's pid is recorded
    # the same variables exported again (a second launch from that shell): rank 0 is taken, so it is another run
    p, said = start_rank(out, RANK="0", **launch)
    procs.append(p)
    assert said.startswith("refused") and "in use by a running train.py" in said, said
    # a plain run is refused too
    p, said = start_rank(out)
    procs.append(p)
    assert said.startswith("refused"), said


def test_a_bare_pid_lock_of_an_older_run_is_honoured(tmp_path, procs):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    procs.append(sleeper)
    (tmp_path / "train.lock").write_text(str(sleeper.pid))
    with pytest.raises(UsageError, match=f"pid {sleeper.pid}"):
        rundir.lock_out(str(tmp_path))


# --- the output directory: a new run never takes over another run's checkpoint ------------------------------------
def test_a_new_run_into_a_directory_with_a_checkpoint_is_refused(tmp_path):
    out = str(tmp_path)
    rundir.check_out(out, resume=False, overwrite=False)  # empty: fine
    (tmp_path / "ckpt.pt").write_bytes(b"x")
    with pytest.raises(UsageError) as e:
        rundir.check_out(out, resume=False, overwrite=False)
    assert "--resume" in one_line(e) and "--overwrite=True" in str(e.value) and "ckpt.pt" in str(e.value)
    rundir.check_out(out, resume=True)
    rundir.check_out(out, resume=False, overwrite=True)
    with pytest.raises(UsageError, match="choose one"):
        rundir.check_out(out, resume=True, overwrite=True)
    with rundir.lock(out, resume=False, overwrite=True):  # the lock runs the same check, then the run replaces it
        rundir.start(out, {"model": "x"}).close()
    assert not os.path.exists(tmp_path / "ckpt.pt") and not os.path.exists(tmp_path / "train.lock")
    (tmp_path / "ckpt.pt").write_bytes(b"x")
    with pytest.raises(UsageError, match="--overwrite=True"):
        with rundir.lock(out, resume=False):
            pass
    assert not os.path.exists(tmp_path / "train.lock")  # released after a refusal


def test_run_files_that_are_not_regular_files_are_refused(tmp_path):
    os.mkfifo(tmp_path / "metrics.jsonl")  # opening it to write would block for ever
    with pytest.raises(UsageError) as e:
        rundir.check_out(str(tmp_path), resume=False)
    assert "metrics.jsonl is a FIFO, not a regular file" in one_line(e)


# --- files a run reads: regular files only, checked by stat; a size limit for --data -------------------------------
@pytest.mark.parametrize("kind", ["fifo", "directory", "/dev/zero"])
def test_path_options_accept_regular_files_only(kind, tmp_path):
    path = {"fifo": str(tmp_path / "f"), "directory": str(tmp_path), "/dev/zero": "/dev/zero"}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    shown = {"fifo": "a FIFO", "directory": "a directory", "/dev/zero": "a device"}[kind]
    with pytest.raises(UsageError) as e:
        rundir.check_file("--data", path)
    assert f"--data {path} is {shown}, not a regular file" in one_line(e)
    tc = train.TrainConfig(data=path)
    with pytest.raises(UsageError, match=f"--data {path} is {shown}"):
        rundir.check_paths(tc)
    import moma
    with pytest.raises(UsageError, match=f"--upcycle_from {path} is {shown}"):
        rundir.check_paths(moma.Config(upcycle_from=path))
    rundir.check_paths(train.TrainConfig(data=str(tmp_path / "missing")))  # left to its reader's message


def test_a_huge_data_file_is_refused_before_it_is_read(tmp_path):
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:  # sparse: a size, no bytes written
        f.truncate(rundir.MAX_DATA_BYTES + 1)
    with pytest.raises(UsageError) as e:
        rundir.check_paths(train.TrainConfig(data=str(big)))
    assert f"more than the {rundir.MAX_DATA_BYTES:,}" in one_line(e) and str(big) in str(e.value)


def test_data_hash_is_the_sha256_of_the_contents(tmp_path):
    f = tmp_path / "d.txt"
    f.write_bytes(b"hello " * 1000)
    assert rundir.data_hash(str(f)) == hashlib.sha256(b"hello " * 1000).hexdigest()
    assert rundir.data_hash("") is None


# --- resume: every file checked before a byte is written ------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    assert train.main(TINY + ["--steps", "2", "--eval_every", "2", "--log_every", "1", "--out", out]) == 0
    return out


@pytest.fixture
def resumed(run_dir, tmp_path):
    """A copy of the run, and what train.py builds for --resume: (out, ck, model, opt, sched, config)."""
    out = str(tmp_path / "run")
    os.makedirs(out)
    for f in ("ckpt.pt", "metrics.jsonl", "config.json"):
        with open(os.path.join(run_dir, f), "rb") as src, open(os.path.join(out, f), "wb") as dst:
            dst.write(src.read())
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    over = train.parse_args(TINY[2:])[1]
    t_over = {k: v for k, v in over.items() if k in {f.name for f in dataclasses.fields(train.TrainConfig)}}
    model, cfg, tc, ds = train.build("dense", None, {k: v for k, v in over.items() if k not in t_over}, None, "cpu",
                                     dict(t_over, steps="2", eval_every="2", log_every="1", out=out))
    config = dict(model="dense", setting=tc.setting, train=dataclasses.asdict(tc), model_cfg=dataclasses.asdict(cfg))
    opt, sched = train.make_optimizer(model, tc)
    return out, ck, model, opt, sched, config


def files(out):
    return {f: open(os.path.join(out, f), "rb").read() for f in sorted(os.listdir(out))}


def test_a_good_run_validates(resumed):
    out, ck, model, opt, sched, config = resumed
    rng = torch.get_rng_state()
    rundir.validate_resume(ck, model, out, config, opt, sched)
    assert torch.equal(rng, torch.get_rng_state())  # the trial restore of the RNG state puts it back
    rundir.resume(ck, model, opt, sched)


BAD_CKPT = {
    "no rng": (lambda ck: ck.pop("rng"), "has no 'rng' entry"),
    "no scheduler": (lambda ck: ck.pop("scheduler"), "has no 'scheduler' entry"),
    "config is a string": (lambda ck: ck.update(config="x"), "has a str as its 'config' entry"),
    "step is None": (lambda ck: ck.update(step=None), "has a NoneType as its 'step' entry"),
    "a broken rng state": (lambda ck: ck["rng"].update(torch=torch.zeros(3, dtype=torch.uint8)),
                           "RNG state that cannot be restored"),
    "a wrong tensor shape": (lambda ck: ck["model"].update({"tok_emb.weight": torch.zeros(3, 3)}),
                             "tok_emb.weight is (3, 3)"),
    "a non-tensor weight": (lambda ck: ck["model"].update({"tok_emb.weight": 1.5}), "tok_emb.weight is a float"),
    "a missing weight": (lambda ck: ck["model"].pop("tok_emb.weight"), "no weight tok_emb.weight"),
    "a NaN weight": (lambda ck: ck["model"]["tok_emb.weight"].fill_(float("nan")), "non-finite weight"),
    "an optimizer state of another shape": (lambda ck: ck["optimizer"]["state"][0].update(exp_avg=torch.zeros(2)),
                                            "optimizer exp_avg of parameter 0"),
    "an optimizer group too few": (lambda ck: ck["optimizer"]["param_groups"].pop(), "parameter groups"),
    "a scheduler of strings": (lambda ck: ck["scheduler"].update(last_epoch="x"), "scheduler.last_epoch"),
}


@pytest.mark.parametrize("case", list(BAD_CKPT))
def test_a_bad_checkpoint_is_one_line_before_anything_is_written(case, resumed):
    out, ck, model, opt, sched, config = resumed
    before, state = files(out), copy.deepcopy(model.state_dict())
    break_it, message = BAD_CKPT[case]
    break_it(ck)
    with pytest.raises(UsageError) as e:
        rundir.validate_resume(ck, model, out, config, opt, sched)
    assert message in one_line(e) and os.path.join(out, "ckpt.pt") in str(e.value)
    assert files(out) == before and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("case", ["no rng", "no scheduler", "config is a string", "step is None", "a NaN weight"])
def test_train_resume_refuses_a_bad_checkpoint_in_one_line(case, resumed, capsys):
    out, ck = resumed[:2]
    BAD_CKPT[case][0](ck)
    torch.save(ck, os.path.join(out, "ckpt.pt"))
    before = files(out)
    assert train.main(TINY + ["--steps", "4", "--out", out, "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and BAD_CKPT[case][1] in err, err
    assert files(out) == before


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", "pickled"])
def test_an_unreadable_checkpoint_is_one_line(content, tmp_path):
    path = str(tmp_path / "ckpt.pt")
    if content == "pickled":
        torch.save({"model": UsageError("x")}, path)
    else:
        open(path, "wb").write(content)
    with pytest.raises(UsageError) as e:
        rundir.load_ckpt(path)
    assert ("pickled Python objects" if content == "pickled" else "corrupt") in one_line(e)
    os.remove(path)
    os.mkfifo(path)
    with pytest.raises(UsageError, match="is a FIFO"):
        rundir.load_ckpt(path)


@pytest.mark.parametrize("line, n", [('{"step": null}', 4), ('[1, 2]', 4), ('{"step": 1, "loss": "x"}', 4),
                                     ('garbage', 4)])
def test_a_log_line_that_is_not_a_row_is_named_before_the_log_is_touched(line, n, resumed):
    out, ck, model, opt, sched, config = resumed
    log = os.path.join(out, "metrics.jsonl")
    rows = open(log).read().splitlines()
    open(log, "w").write("\n".join(rows[:3] + [line] + rows[3:]) + "\n")
    before = files(out)
    with pytest.raises(UsageError) as e:
        rundir.validate_resume(ck, model, out, config, opt, sched)
    assert f"{log} line {n} is not a metrics row" in one_line(e)
    assert files(out) == before


def test_a_partial_last_log_line_is_not_an_error(resumed):
    out, ck, model, opt, sched, config = resumed
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 5, "loss": 3.')  # a run killed mid-write
    rundir.validate_resume(ck, model, out, config, opt, sched)
    log = rundir.start(out, config, ck["step"])
    log.close()
    assert all(json.loads(l)["step"] <= ck["step"] for l in open(os.path.join(out, "metrics.jsonl")))


def test_changed_data_contents_are_refused_on_resume(resumed, tmp_path):
    out, ck, model, opt, sched, config = resumed
    data = tmp_path / "d.txt"
    data.write_bytes(b"abc " * 100)
    train_cfg = dict(config["train"], data=str(data))
    ck["config"] = dict(ck["config"], train=train_cfg, data_sha256=rundir.data_hash(str(data)))
    config = dict(config, train=train_cfg, data_sha256=rundir.data_hash(str(data)))
    rundir.validate_resume(ck, model, out, config, opt, sched)  # the same contents
    data.write_bytes(b"xyz " * 100)  # the same path, other contents
    config["data_sha256"] = rundir.data_hash(str(data))
    with pytest.raises(UsageError) as e:
        rundir.validate_resume(ck, model, out, config, opt, sched)
    assert f"the contents of --data={data} are not the ones" in one_line(e)
    ck["config"].pop("data_sha256")  # a checkpoint that recorded no hash cannot vouch for the contents either
    with pytest.raises(UsageError, match="are not the ones"):
        rundir.validate_resume(ck, model, out, config, opt, sched)


# --- a failed checkpoint write, and the last good checkpoint -------------------------------------------------------
@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")])
def test_a_failed_checkpoint_write_is_one_line_naming_the_file_and_the_kept_checkpoint(error, tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    rundir.save_ckpt(path, {"step": 10})
    real = torch.save

    def full_disk(obj, f, *a, **k):
        real(obj, f, *a, **k)  # a part of it written, then the disk is full
        raise error
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UsageError) as e:
        rundir.save_ckpt(path, {"step": 20})
    msg = one_line(e)
    assert f"cannot write the checkpoint {path}" in msg and f"the checkpoint of step 10 is kept in {path}" in msg
    assert torch.load(path, weights_only=True) == {"step": 10}  # the kept checkpoint is intact
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temp file left on the full disk
    os.remove(path)
    with pytest.raises(UsageError, match="no checkpoint was written"):
        rundir.save_ckpt(path, {"step": 20})


def test_nonfinite_names_a_weight_buffer_or_optimizer_state_that_would_not_be_a_good_checkpoint():
    model = torch.nn.BatchNorm1d(3)  # weights and buffers
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    assert rundir.nonfinite(model, opt) is None
    opt.state[model.weight]["exp_avg_sq"][0] = float("inf")
    assert rundir.nonfinite(model, opt) == "the optimizer's exp_avg_sq of weight"
    model.running_mean[1] = float("nan")  # a buffer, not a parameter: saved all the same
    assert rundir.nonfinite(model, opt) == "the weight running_mean"


# --- end to end through train.py ------------------------------------------------------------------------------------
def test_train_a_full_disk_at_a_checkpoint_is_one_line(tmp_path, monkeypatch, capsys):
    real, calls = torch.save, []

    def full_after_one(obj, f, *a, **k):
        calls.append(f)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        real(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", full_after_one)
    out = str(tmp_path)
    assert train.main(TINY + ["--steps", "4", "--ckpt_every", "2", "--eval_every", "4", "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"cannot write the checkpoint {os.path.join(out, 'ckpt.pt')}" in err, err
    assert "No space left on device" in err and "the checkpoint of step 2 is kept" in err
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == 2
    assert not [f for f in os.listdir(out) if ".tmp" in f] and not os.path.exists(tmp_path / "train.lock")


# train.py calls rundir's checks: end to end
@pytest.mark.parametrize("attack", ["a null step in the log", "a weight of another shape"])
def test_train_resume_checks_every_file_before_writing(attack, run_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    os.makedirs(out)
    for f in ("ckpt.pt", "metrics.jsonl", "config.json"):
        open(os.path.join(out, f), "wb").write(open(os.path.join(run_dir, f), "rb").read())
    if attack == "a null step in the log":
        with open(os.path.join(out, "metrics.jsonl"), "a") as f:
            f.write('{"step": null}\n')
        message = "metrics.jsonl line 4 is not a metrics row"
    else:
        ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
        ck["model"]["tok_emb.weight"] = torch.zeros(3, 3)
        torch.save(ck, os.path.join(out, "ckpt.pt"))
        message = "tok_emb.weight is (3, 3)"
    before = files(out)
    assert train.main(TINY + ["--steps", "4", "--out", out, "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert files(out) == before  # not a byte written: the log is not truncated


def test_train_resume_refuses_changed_data_contents(tmp_path, capsys):
    data, out = tmp_path / "d.txt", str(tmp_path / "run")
    data.write_bytes(b"the cat sat on the mat. " * 40)
    argv = ["--model", "megabyte", "--setting", "bytes", "--data", str(data), "--seq_len", "64", "--batch_size", "2",
            "--d_global", "8", "--n_layer_global", "1", "--d_local", "32", "--n_layer_local", "1",
            "--n_head_local", "2", "--eval_batches", "1", "--warmup", "1", "--out", out]
    assert train.main(argv + ["--steps", "2", "--eval_every", "2"]) == 0
    data.write_bytes(b"a dog ran in the fog. " * 44)  # the same path, other contents
    capsys.readouterr()
    assert train.main(argv + ["--steps", "4", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"the contents of --data={data} are not the ones" in err, err


def test_train_refuses_a_new_run_over_another_runs_checkpoint(run_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    os.makedirs(out)
    open(os.path.join(out, "ckpt.pt"), "wb").write(open(os.path.join(run_dir, "ckpt.pt"), "rb").read())
    assert train.main(TINY + ["--steps", "2", "--eval_every", "2", "--out", out]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--resume" in err and "--overwrite=True" in err, err
    assert train.main(TINY + ["--steps", "2", "--eval_every", "2", "--out", out, "--overwrite", "True"]) == 0


@pytest.mark.parametrize("kind", ["fifo", "directory", "/dev/zero", "huge"])
def test_train_path_options_take_regular_files_only(kind, tmp_path, capsys):
    path = {"fifo": str(tmp_path / "f"), "directory": str(tmp_path), "/dev/zero": "/dev/zero",
            "huge": str(tmp_path / "big")}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    if kind == "huge":
        with open(path, "wb") as f:
            f.truncate(rundir.MAX_DATA_BYTES + 1)
    argv = ["--model", "megabyte", "--setting", "bytes", "--data", path, "--out", str(tmp_path / "out")]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--data {path}" in err and "Traceback" not in err, err
    assert ("more than the" if kind == "huge" else "not a regular file") in err


def test_rng_state_carries_the_mps_generator(monkeypatch):
    """On Apple silicon the mps generator is saved and restored with the others (exact resume on --device mps)."""
    saved = {"state": torch.tensor([1, 2, 3], dtype=torch.uint8)}
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: saved["state"].clone())
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda st: saved.__setitem__("restored", st))
    s = rundir.rng_state()
    assert torch.equal(s["mps"], saved["state"])
    rundir.set_rng_state(s)
    assert torch.equal(saved["restored"], saved["state"])
