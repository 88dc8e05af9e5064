"""gpu_check.py (`python bench.py --gpu-check`). On CPU: its harness -- argument handling, the one-line exit without
CUDA, the kernel comparison catching a wrong kernel, the model step check, the train.py / torchrun judgements (with a
fake command runner), the torch.compile judgements (with stand-ins for torch.compile), the table and gpu_check.json --
so that the first GPU run fails only for GPU reasons.
With CUDA (skipped here with a reason): the compiled kernels against the torch path and the bf16 autocast step."""
import json
import os
import sys

import pytest
import torch

import bench
import gpu_check
import kernels


def test_without_cuda_one_line_and_exit_0(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "g.json"
    for argv in (["--gpu-check"], ["--gpu-check", "--device", "cuda"]):
        assert bench.main(argv + ["--out", str(out)]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert len(lines) == 1 and "no CUDA GPU" in lines[0]
    assert not out.exists()


def _patch_ops(monkeypatch, fault):
    """Every kernel op runs its torch path; backend 'triton' returns fault(output) instead (a stand-in kernel)."""
    for name in ("linear_scan", "selective_scan", "grouped_matmul"):
        orig = getattr(kernels, name)

        def op(*a, backend="auto", _orig=orig, _name=name, **k):
            out = _orig(*a, backend="torch", **k)
            if backend != "triton":
                return out
            outs = out if isinstance(out, tuple) else (out,)
            outs = tuple(fault(_name, o) for o in outs)
            return outs if isinstance(out, tuple) else outs[0]
        monkeypatch.setattr(kernels, name, op)


def test_kernel_check_passes_equal_kernels_and_catches_wrong_ones(monkeypatch):
    _patch_ops(monkeypatch, lambda name, o: o)
    rows = gpu_check.check_kernels("cpu", "triton", "cpu")
    assert rows and all(r["status"] == "PASS" and r["err"] == 0 for r in rows), rows
    names = {r["name"].split()[0] for r in rows}
    assert names == {"linear_scan", "selective_scan", "grouped_matmul"}
    # a scan off by 1e-3 (10x the fp32 tolerance), a NaN in the grouped matmul: FAIL rows, the rest still runs
    _patch_ops(monkeypatch, lambda name, o: o + 1e-3 if name == "linear_scan" else
               (o.index_fill(0, torch.tensor([0]), float("nan")) if name == "grouped_matmul" else o))
    rows = gpu_check.check_kernels("cpu", "triton", "cpu")
    by = {r["name"].split()[0]: [] for r in rows}
    for r in rows:
        by[r["name"].split()[0]].append(r)
    assert all(r["status"] == "FAIL" and r["tol"] < r["err"] < 1e-2 for r in by["linear_scan"]), by["linear_scan"]
    assert all(r["status"] == "FAIL" and r["err"] == float("inf") for r in by["grouped_matmul"])
    assert all(r["status"] == "PASS" for r in by["selective_scan"])


def test_kernel_cases_cover_every_compiled_config():
    """At GPU scale the cases launch every configuration gpu_check.compile_specs compiles for each target of
    kernels.TRITON_TARGETS."""
    pytest.importorskip("triton")
    if kernels._INTERPRET:   # the @triton.jit objects are interpreter stand-ins: compile_specs needs the real ones
        names = {"scan_fwd", "scan_bwd", "selective_fwd", "selective_bwd", "gmm", "gmm_dw"}
    covered = {c for case in gpu_check.kernel_cases("gpu") for c in case[1]}
    if not kernels._INTERPRET:
        for cap in kernels.TRITON_TARGETS:
            missing = {s["name"] for s in gpu_check.compile_specs(cap)} - covered
            assert not missing, missing
    else:
        assert {c.split("[")[0] for c in covered} == names
        for t in ("fp32", "bf16"):
            for n in (16, 32, 64):
                assert f"selective_bwd[{t},N<={n}]" in covered
        for t in ("fp32", "bf16", "fp64", "cfp32", "cfp64"):
            assert f"scan_fwd[{t}]" in covered


TINY = {"dense": dict(d_model=32, n_layer=1, n_head=2)}


def test_model_check_compares_losses_and_times_a_step(monkeypatch):
    rows = gpu_check.check_models("cpu", ["dense"], peak=1e9, reps=1, batch_size=2, overrides=TINY)
    r = rows[0]
    assert r["status"] == "PASS" and r["loss_diff"] == 0 and r["loss_cpu_fp32"] > 0, r
    assert r["ms_step"] > 0 and r["tokens_s"] > 0 and 0 < r["mfu"] and r["flops_per_token"] > 0
    monkeypatch.setattr(gpu_check, "LOSS_TOL", -1.0)            # any difference fails: a FAIL row, not an exception
    r = gpu_check.check_models("cpu", ["dense"], peak=1e9, reps=1, batch_size=2, overrides=TINY)[0]
    assert r["status"] == "FAIL" and "tol" in r["error"]
    r = gpu_check.check_models("cpu", ["no-such-model"], peak=1e9, reps=1)[0]
    assert r["status"] == "FAIL" and "no-such-model" in r["error"]


def fake_runner(losses=(3.0, 2.5, 2.0, 1.5, 1.2), rc=0, resume_rc=0, ckpt=True, per_step=lambda s, resumed: 3.0 / s):
    """Stands in for subprocess: writes what train.py would (metrics.jsonl, ckpt.pt) and records the commands. With
    --log_every 1 it logs every step (from the last one logged when resuming) with loss per_step(step, resumed)."""
    calls = []

    def run(cmd, timeout=600):
        calls.append(cmd)
        out = cmd[cmd.index("--out") + 1]
        steps = int(cmd[cmd.index("--steps") + 1])
        resume = "--resume" in cmd
        if rc or (resume and resume_rc):
            return rc or resume_rc, "Traceback ...\nRuntimeError: boom"
        os.makedirs(out, exist_ok=True)
        if "--log_every" in cmd and cmd[cmd.index("--log_every") + 1] == "1":
            start = max((r["step"] for r in gpu_check._metrics(out)), default=0) if resume else 0
            with open(os.path.join(out, "metrics.jsonl"), "a" if resume else "w") as f:
                f.writelines(json.dumps(dict(step=s, loss=per_step(s, resume))) + "\n" for s in range(start + 1, steps + 1))
            open(os.path.join(out, "ckpt.pt"), "wb").close()
            return 0, "done"
        with open(os.path.join(out, "metrics.jsonl"), "a" if resume else "w") as f:
            for i, loss in enumerate(losses if not resume else losses[-1:]):
                f.write(json.dumps(dict(step=steps if resume else 10 * (i + 1), loss=loss)) + "\n")
            f.write(json.dumps(dict(step=steps, eval_loss=losses[-1], gen_accuracy=0.5)) + "\n")
        if ckpt:
            open(os.path.join(out, "ckpt.pt"), "wb").close()
        return 0, "done"
    run.calls = calls
    return run


def test_train_and_ddp_judgements_with_a_fake_runner(tmp_path):
    run = fake_runner()
    rows = gpu_check.check_train("cuda", ["dense", "mot"], jobs=2, run=run)
    assert [r["status"] for r in rows] == ["PASS", "PASS"] and rows[0]["eval_keys"] == ["eval_loss", "gen_accuracy"]
    first, again = [c for c in run.calls if "dense" in c]
    assert first[:2] == [sys.executable, "train.py"] and first[first.index("--device") + 1] == "cuda"
    assert first[first.index("--steps") + 1] == "50" and "--resume" not in first
    assert again[again.index("--steps") + 1] == "55" and "--resume" in again
    bad = {"rising loss": fake_runner(losses=(2.0, 2.5, 3.0)), "crash": fake_runner(rc=1),
           "resume": fake_runner(resume_rc=1), "no ckpt": fake_runner(ckpt=False)}
    expect = {"rising loss": "did not fall", "crash": "exit 1", "resume": "--resume exit 1", "no ckpt": "no checkpoint"}
    for k, runner in bad.items():
        r = gpu_check.check_train_run("dense", "cuda", str(tmp_path / k.replace(" ", "_")), runner)
        assert r["status"] == "FAIL" and expect[k] in r["error"], (k, r)


def test_ddp_runs_two_ranks_or_says_not_exercised(monkeypatch):
    """Two GPUs: torchrun --nproc_per_node=2 with nccl's device; one GPU: a SKIP row "not exercised (1 GPU)" and no
    run (one rank skips the DDP wrap and its collectives: never a PASS); CPU: 2 gloo ranks."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    run = fake_runner()
    rows = gpu_check.check_ddp("cuda", "mot", run=run)
    assert [(r["status"], r["error"]) for r in rows] == [("SKIP", "not exercised (1 GPU)")] and not run.calls
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    rows = gpu_check.check_ddp("cuda", "mot", run=run, extra=["--precision", "fp16"])
    assert len(rows) == 1 and rows[0]["status"] == "PASS" and len(run.calls) == 1
    cmd = run.calls[0]
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node=2" in cmd and "cuda" in cmd
    assert cmd[-2:] == ["--precision", "fp16"]
    assert gpu_check.check_ddp("cuda", "mot", run=fake_runner(rc=1))[0]["status"] == "FAIL"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert gpu_check.ddp_ranks("cpu") == 2 and gpu_check.ddp_ranks("cuda") == 0


def test_gpu_check_writes_json_and_table_and_exit_status(tmp_path, capsys, monkeypatch):
    """The whole command on CPU with quick stand-ins for the slow sections: table, summary, json, exit status."""
    row = {"kernel_row": dict(section="kernels", name="k", status="PASS", err=0.0, tol=1e-4),
           "check_determinism": dict(section="determinism", name="d", status="PASS", err=0.0, tol=1e-5),
           "check_model": [dict(section="models", name="dense", status="PASS", loss_diff=0.0, tol=0.05),
                           dict(section="flops", name="dense count_flops", status="PASS")]}
    for fn, r in row.items():
        monkeypatch.setattr(gpu_check, fn, lambda *a, _r=r, **k: _r)
    monkeypatch.setattr(gpu_check, "matmul_peak", lambda device: 1e9)
    out = tmp_path / "gpu_check.json"
    argv = ["--gpu-check", "--device", "cpu", "--models", "dense", "--out", str(out)]
    monkeypatch.setattr(gpu_check, "_run", fake_runner())
    assert gpu_check.gpu_check(bench_args(argv), run=fake_runner()) == 0
    res = json.loads(out.read_text())
    # every kernel case, determinism, models, flops, train, resume, ddp (2 gloo ranks) PASS; SKIP: the CUDA timings,
    # and on CPU both compile checks (no --cpu_compile; train.py refuses --compile on CPU)
    n_kernels = len(gpu_check.kernel_cases("cpu"))
    assert res["ok"] and res["complete"] and res["device"] == "cpu"
    assert res["summary"] == {"PASS": n_kernels + 6, "FAIL": 0, "SKIP": 3}
    assert [r["section"] for r in res["rows"]][n_kernels:] == ["determinism", "timings", "models", "flops", "compile",
                                                               "train", "compile", "resume", "ddp"]
    text = capsys.readouterr().out
    assert "ALL PASS" in text and "SKIP  timings" in text
    row["check_model"][0].update(status="FAIL", error="loss 9 on cuda vs 3 on CPU fp32")
    assert gpu_check.gpu_check(bench_args(argv), run=fake_runner()) == 1
    res = json.loads(out.read_text())
    assert not res["ok"] and res["summary"]["FAIL"] == 1
    assert "FAIL  models" in capsys.readouterr().out


def test_a_failing_kernel_still_gives_the_full_table_and_json(tmp_path, capsys, monkeypatch):
    """The --device cpu rehearsal with a selective scan that raises, and a timing section that crashes: their rows
    FAIL with a one-line reason, every later section still runs, the table is printed and gpu_check.json is complete;
    the JSON on disk is rewritten after every row (a later section finds the earlier rows there)."""
    _patch_ops(monkeypatch, lambda name, o: o)

    def broken(*a, **k):
        raise RuntimeError("injected kernel failure\nsecond line")
    monkeypatch.setattr(kernels, "selective_scan", broken)
    monkeypatch.setattr(gpu_check, "check_timings", lambda *a, **k: 1 / 0)
    monkeypatch.setattr(gpu_check, "BENCH_OVERRIDES", TINY)
    monkeypatch.setattr(gpu_check, "matmul_peak", lambda device: 1e9)
    out = tmp_path / "gpu_check.json"
    seen = {}
    real_ddp = gpu_check.check_ddp

    def ddp(*a, **k):   # the last section: the rows before it are on disk already
        seen["rows"] = json.loads(out.read_text())["rows"]
        return real_ddp(*a, **k)
    monkeypatch.setattr(gpu_check, "check_ddp", ddp)
    argv = ["--gpu-check", "--device", "cpu", "--models", "dense", "--out", str(out)]
    assert gpu_check.gpu_check(bench_args(argv), run=fake_runner()) == 1
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert res["complete"] and not res["ok"]
    assert [r["section"] for r in seen["rows"]] == [r["section"] for r in rows[:-1]] and rows[-1]["section"] == "ddp"
    sel = [r for r in rows if r["section"] == "kernels" and r["name"].startswith("selective_scan")]
    assert sel and all(r["status"] == "FAIL" and r["error"] == "RuntimeError: injected kernel failure" for r in sel)
    det = [r for r in rows if r["section"] == "determinism"]
    assert [(r["status"], r["error"]) for r in det] == [("FAIL", "RuntimeError: injected kernel failure")]
    tim = [r for r in rows if r["section"] == "timings"]
    assert [(r["status"], r["error"]) for r in tim] == [("FAIL", "ZeroDivisionError: division by zero")]
    assert {r["section"] for r in rows} == {"kernels", "determinism", "timings", "models", "flops", "compile", "train",
                                            "resume", "ddp"}
    assert all(r["status"] == "PASS" for r in rows if r["name"].startswith(("linear_scan", "grouped_matmul")))
    assert res["summary"]["FAIL"] == len(sel) + 2 and res["summary"]["PASS"] == len(rows) - len(sel) - 2 - 2
    text = capsys.readouterr().out
    assert text.count("FAIL  kernels") == len(sel) and "FAIL  timings" in text and "PASS  ddp" in text
    assert "FAILURES above" in text and f"wrote {out}" in text


def bench_args(argv):
    """The parsed arguments main() would pass to gpu_check."""
    captured = {}
    orig = gpu_check.gpu_check
    gpu_check.gpu_check = lambda args, run=None: captured.setdefault("args", args) and 0
    try:
        bench.main(argv)
    finally:
        gpu_check.gpu_check = orig
    return captured["args"]


def test_default_out_is_gpu_check_json():
    assert bench_args(["--gpu-check"]).out == "gpu_check.json"
    assert bench_args(["--gpu-check", "--out", "x.json"]).out == "x.json"


# ------------------------------------------------------------------------------------------------ compile

def test_compile_check_judges_compiled_against_eager(monkeypatch):
    """compile_one with stand-ins for torch.compile: the model itself passes with zero differences; a compiled model
    whose loss is off by 2e-3 fails on the loss and its gradients; one whose compile raises is a FAIL row naming it."""
    monkeypatch.setattr(torch, "compile", lambda m: m)
    r = gpu_check.compile_one("dense", "cpu", overrides=TINY, reps=1)
    assert r["status"] == "PASS" and r["loss_diff"] == 0 and r["grad_err"] == 0 and r["loss_eager"] > 0, r
    assert r["ms_eager"] > 0 and r["ms_compiled"] > 0 and r["section"] == "compile"

    def off(m):
        def f(batch):
            logits, loss, parts = m(batch)
            return logits, loss * (1 + 2e-3), parts
        return f
    monkeypatch.setattr(torch, "compile", off)
    r = gpu_check.compile_one("dense", "cpu", overrides=TINY, reps=1)
    assert r["status"] == "FAIL" and "loss" in r["error"] and "gradient" in r["error"], r
    assert gpu_check.COMPILE_TOL < r["loss_diff"] / r["loss_eager"] < 3e-3

    def broken(m):
        raise RuntimeError("Unsupported: data-dependent operator\n\nfrom user code:\n   File \"/w/mot.py\", "
                           "line 151, in forward")
    monkeypatch.setattr(torch, "compile", broken)
    r = gpu_check.compile_one("dense", "cpu", overrides=TINY, reps=1)
    assert r["status"] == "FAIL" and r["error"].startswith("RuntimeError: Unsupported") and "(at mot.py:151)" in r["error"]


def test_model_line_names_the_last_model_file_frame():
    tb = ('File "/usr/lib/torch/_dynamo/x.py", line 9, in f\n  File "/repo/moma.py", line 162, in forward\n'
          '  File "/repo/kernels.py", line 40, in g\n  File "/usr/lib/torch/nn/functional.py", line 3, in h')
    assert gpu_check._model_line(tb) == "kernels.py:40"
    assert gpu_check._model_line('File "/usr/lib/torch/x.py", line 1') is None


def test_compile_train_run_compares_losses_step_by_step(tmp_path):
    """train.py --compile=True beside the eager run: equal logs pass; a 10% higher loss at one step fails; CPU skips
    (train.py refuses --compile there); a crashed compiled run fails with its exit."""
    eager = str(tmp_path / "eager")
    fake_runner()(gpu_check.train_commands("dense", "cuda", eager)[0])            # the eager run's metrics.jsonl
    run = fake_runner()
    r = gpu_check.check_compile_train_run("dense", "cuda", str(tmp_path / "c1"), eager, run)
    assert r["status"] == "PASS" and r["loss_diff"] == 0 and "--compile=True" in run.calls[0], r
    r = gpu_check.check_compile_train_run("dense", "cuda", str(tmp_path / "c2"), eager,
                                      fake_runner(losses=(3.0, 2.5, 2.2, 1.5, 1.2)))
    assert r["status"] == "FAIL" and abs(r["loss_diff"] - 0.2 / 2.0) < 1e-12 and "tol" in r["error"], r
    r = gpu_check.check_compile_train_run("dense", "cpu", str(tmp_path / "c3"), eager, fake_runner())
    assert r["status"] == "SKIP" and "CUDA only" in r["error"]
    r = gpu_check.check_compile_train_run("dense", "cuda", str(tmp_path / "c4"), eager, fake_runner(rc=1))
    assert r["status"] == "FAIL" and "exit 1" in r["error"]
    rows = gpu_check.check_train("cuda", ["dense", "mot"], jobs=2, run=fake_runner(), compile=("dense", "mot"))
    assert [(r["section"], r["name"].split()[0], r["status"]) for r in rows] == [
        ("train", "dense", "PASS"), ("train", "mot", "PASS"), ("compile", "dense", "PASS"), ("compile", "mot", "PASS")]


def test_compile_check_runs_each_model_in_its_own_process():
    calls = []

    def run(cmd, timeout=600):
        calls.append(cmd)
        name = cmd[cmd.index("--_compile") + 1]
        if name == "mot":
            return 1, "Traceback ...\nSegmentation fault"
        with open(cmd[cmd.index("--out") + 1], "w") as f:
            json.dump(dict(section="compile", name=f"{name} torch.compile", status="PASS"), f)
        return 0, ""
    rows = gpu_check.check_compile("cuda", ["dense", "mot", "mamba"], jobs=2, run=run)
    assert [(r["name"].split()[0], r["status"]) for r in rows] == [("dense", "PASS"), ("mot", "FAIL"), ("mamba", "PASS")]
    assert "exit 1" in rows[1]["error"] and all(c[1] == "gpu_check.py" and "cuda" in c for c in calls)
    assert all(r["status"] == "SKIP" for r in gpu_check.check_compile("cpu", ["dense"], 1, run=run)) and len(calls) == 3


# ------------------------------------------------------------------------------------------------ CUDA only

@pytest.mark.cuda
def test_compiled_kernels_match_torch_path_on_cuda():
    """Compiled Triton kernels (no interpreter) vs the torch path on CUDA tensors, at the small sizes."""
    assert not kernels._INTERPRET, "conftest must not force TRITON_INTERPRET=1 on a CUDA machine"
    rows = gpu_check.check_kernels("cuda", "triton", "cpu")
    assert all(r["status"] == "PASS" for r in rows if r["name"].split()[0] in ("linear_scan", "selective_scan",
                                                                              "grouped_matmul")), rows


@pytest.mark.cuda
def test_torch_compile_matches_eager_on_cuda():
    rows = [gpu_check.compile_one(n, "cuda") for n in ("dense", "mamba")]
    assert all(r["status"] == "PASS" for r in rows), rows


@pytest.mark.cuda
def test_bf16_autocast_step_matches_cpu_fp32():
    rows = gpu_check.check_models("cuda", ["dense", "mamba", "megalodon"], peak=1e12, reps=2, batch_size=2)
    assert all(r["status"] == "PASS" for r in rows), rows
