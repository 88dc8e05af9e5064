"""gpu_check.py (`python bench.py --gpu-check`). On CPU: its harness -- argument handling, the one-line exit without
CUDA, the kernel comparison catching a wrong kernel, the model step check, the train.py / torchrun judgements (with a
fake command runner), the torch.compile judgements (with stand-ins for torch.compile), the table and gpu_check.json --
so that the first GPU run fails only for GPU reasons.
With CUDA (skipped here with a reason): the compiled kernels against the torch path and the bf16 autocast step."""
import json
import os
import subprocess
import sys

import pytest
import torch

import bench
import gpu_check
import kernels
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_without_cuda_one_line_and_exit_0(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "g.json"
    for argv in ([], ["--device", "cuda"]):                           # in process, and as `python bench.py --gpu-check`
        assert gpu_check.main(argv + ["--out", str(out)]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert len(lines) == 1 and "no CUDA GPU" in lines[0]
        r = subprocess.run([sys.executable, "bench.py", "--gpu-check", *argv, "--out", str(out)], cwd=ROOT,
                           capture_output=True, text=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
        lines = r.stdout.strip().splitlines()
        assert r.returncode == 0 and len(lines) == 1 and "no CUDA GPU" in lines[0], r.stdout + r.stderr
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
    """The parsed arguments gpu_check.py gets from `python bench.py ARGV` (bench hands them on without --gpu-check)."""
    captured = {}
    orig = gpu_check.gpu_check
    gpu_check.gpu_check = lambda args, run=None: captured.setdefault("args", args) and 0
    try:
        gpu_check.main([a for a in argv if a != "--gpu-check"])
    finally:
        gpu_check.gpu_check = orig
    return captured["args"]


def test_default_out_is_gpu_check_json():
    assert bench_args(["--gpu-check"]).out == "gpu_check.json"
    assert bench_args(["--gpu-check", "--out", "x.json"]).out == "x.json"


# ------------------------------------------------------------------------------------------------ the plan by card

def fake_gpu(monkeypatch, cap, name, count=1):
    """torch.cuda reporting one (or `count`) GPU of compute capability `cap` named `name`."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: cap)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_plan_on_a_t4_is_the_torch_path_plan_with_the_t4_figures(monkeypatch):
    fake_gpu(monkeypatch, (7, 5), "Tesla T4")
    p = gpu_check.plan("cuda", ["dense", "mot", "mamba"], bench_args(["--gpu-check"]))
    c = p["card"]
    assert (c["key"], c["cap"], c["bw"], c["tensor"], c["fp32"], c["dtype"]) == ("T4", (7, 5), 320e9, 65e12, 8.1e12, "fp16")
    assert p["backend"] == "torch" and p["precision"] == "fp16" and not c["triton"]
    names = [(sec, name) for sec, name, _ in p["steps"]]
    skipped = [fn() for sec, name, fn in p["steps"] if name.startswith("Triton kernels")]
    assert [(r["section"], r["status"], r["error"]) for r in skipped] == [
        ("kernels", "SKIP", gpu_check.NOT_RUN), ("timings", "SKIP", gpu_check.NOT_RUN)]
    assert gpu_check.NOT_RUN == "not run: torch paths on this card (kernels.TRITON_TARGETS)"
    kernel_steps = [n for sec, n in names if sec == "kernels" and not n.startswith("Triton")]
    assert kernel_steps == [case[0] for case in gpu_check.kernel_cases("gpu", bf16=False)]
    assert not any("bf16" in n for n in kernel_steps) and any("reversed" in n for n in kernel_steps)
    assert ("kernels", "every compiled configuration launched") not in names
    assert ("train", "train.py --precision fp16") in names
    assert gpu_check.precision_flags(c) == (["--precision", "fp16"] if gpu_check.has_precision() else [])
    r = gpu_check.check_precision(c)
    assert (r["status"], r.get("error")) == (("PASS", None) if gpu_check.has_precision() else
                                             ("SKIP", "--precision: not available in this train.py (its runs used "
                                                      "its default)"))
    assert [sec for sec, _ in names if sec not in ("kernels", "models")] == [
        "determinism", "timings", "timings", "compile", "train", "train", "resume", "resume", "ddp"]
    ddp = [fn for sec, _, fn in p["steps"] if sec == "ddp"][0]()
    assert [r["error"] for r in ddp] == ["not exercised (1 GPU)"]
    # its own figures in the roofline floors
    fl = gpu_check.floors()["gmm"]
    assert fl["floor_us_T4"] == round(max(fl["bytes"] / 320e9, fl["flops"] / 65e12) * 1e6, 1)


def test_plan_on_an_a100_is_the_triton_plan(monkeypatch):
    fake_gpu(monkeypatch, (8, 0), "NVIDIA A100-SXM4-80GB")
    p = gpu_check.plan("cuda", ["dense", "mot"], bench_args(["--gpu-check"]))
    c = p["card"]
    assert (c["key"], c["tensor"], c["dtype"]) == ("A100", 312e12, "bf16") and c["triton"]
    assert p["backend"] == "triton" and p["precision"] == "bf16"
    names = [(sec, name) for sec, name, _ in p["steps"]]
    assert not any(n.startswith("Triton kernels") for _, n in names)
    kernel_steps = [n for sec, n in names if sec == "kernels"]
    assert kernel_steps == [case[0] for case in gpu_check.kernel_cases("gpu")] + ["every compiled configuration launched"]
    assert any("bf16" in n for n in kernel_steps) and ("train", "train.py --precision fp16") not in names
    assert gpu_check.precision_flags(c) == []


@pytest.mark.parametrize("cap,name,key,triton", [
    ((7, 0), "Tesla V100-SXM2-16GB", "V100", False), ((8, 6), "NVIDIA A10G", "A10", True),
    ((8, 6), "NVIDIA GeForce RTX 3090", "A10", True), ((8, 9), "NVIDIA L4", "L4", True),
    ((9, 0), "NVIDIA H100 80GB HBM3", "H100", True), ((9, 0), "NVIDIA H200", "H100", True),
    ((12, 0), "NVIDIA RTX PRO 6000", None, False)])
def test_card_by_name_then_capability(monkeypatch, cap, name, key, triton):
    fake_gpu(monkeypatch, cap, name)
    c = gpu_check.card("cuda")
    assert (c["key"], c["triton"], c["name"]) == (key, triton, name)
    assert c["triton"] == (cap in kernels.TRITON_TARGETS) and c["precision"] == ("bf16" if cap >= (8, 0) else "fp16")
    assert {g["cap"] for g in gpu_check.GPUS.values()} >= set(kernels.TRITON_TARGETS) | {(7, 5), (7, 0)}


# ------------------------------------------------------------------------------------------------ determinism, resume, FLOPs

def test_determinism_row_reports_bit_exact_or_the_difference(monkeypatch):
    r = gpu_check.check_determinism("cpu", "torch", "cpu")
    assert r["status"] == "PASS" and r["bit_exact"] and r["err"] == 0 and r["note"] == "bit-exact", r
    assert r["tol"] == gpu_check.DETERMINISM_TOL == 1e-5
    orig, calls = kernels.selective_scan, []

    def noisy(scale):   # a scan whose backward differs run to run, as fp32 atomics do on a GPU
        def f(*a, **k):
            calls.append(1)
            return orig(*a, **k) * (1 + scale * len(calls))
        return f
    monkeypatch.setattr(kernels, "selective_scan", noisy(1e-7))
    r = gpu_check.check_determinism("cpu", "torch", "cpu")
    assert r["status"] == "PASS" and not r["bit_exact"] and 0 < r["err"] <= 1e-5 and "not bit-exact" in r["note"], r
    monkeypatch.setattr(kernels, "selective_scan", noisy(1e-3))
    r = gpu_check.check_determinism("cpu", "torch", "cpu")
    assert r["status"] == "FAIL" and r["err"] > 1e-5, r


def test_resume_row_two_n_steps_vs_n_plus_resume(tmp_path):
    run = fake_runner()
    r = gpu_check.check_resume("mot", "cuda", run, n=10, extra=["--precision", "fp16"])
    assert r["status"] == "PASS" and r["bit_exact"] and r["tol"] == 0, r
    one, first, again = run.calls
    for c in run.calls:
        assert c[c.index("--min_lr_ratio") + 1] == "1" and c[c.index("--log_every") + 1] == "1"
        assert c[c.index("--gen_n") + 1] == "0" and c[c.index("--precision") + 1] == "fp16"
    assert [c[c.index("--steps") + 1] for c in run.calls] == ["20", "10", "20"] and again[-1] == "--resume"
    assert one[one.index("--out") + 1] != first[first.index("--out") + 1] == again[again.index("--out") + 1]
    off = lambda rel: fake_runner(per_step=lambda s, resumed: 3.0 / s * (1 + rel * resumed))
    r = gpu_check.check_resume("mot", "cuda", off(1e-7), n=10)       # bit-exact expected: any difference fails
    assert r["status"] == "FAIL" and not r["bit_exact"] and "tol 0" in r["error"], r
    r = gpu_check.check_resume("mamba", "cuda", off(1e-7), n=10)     # on the selective scan: within 1e-5
    assert r["status"] == "PASS" and not r["bit_exact"] and "not bit-exact" in r["note"], r
    r = gpu_check.check_resume("mamba", "cuda", off(1e-4), n=10)
    assert r["status"] == "FAIL", r
    r = gpu_check.check_resume("mot", "cuda", fake_runner(resume_rc=1), n=10)
    assert r["status"] == "FAIL" and "exit 1" in r["error"]


def test_flops_row_equal_counts_pass_different_counts_fail(monkeypatch):
    rows = gpu_check.check_model("dense", "cpu", peak=1e9, reps=1, batch_size=2, overrides=TINY)
    assert [r["section"] for r in rows] == ["models", "flops"]
    assert rows[1]["status"] == "PASS" and rows[1]["flops_per_token"] == rows[1]["flops_per_token_cpu"] > 0
    orig = train.count_flops
    seen = []

    def half_on_the_second(model, batches, *a, **k):   # the device count first, then the CPU one
        seen.append(1)
        return orig(model, batches, *a, **k) * (0.46 if len(seen) == 1 else 1)
    monkeypatch.setattr(train, "count_flops", half_on_the_second)
    r = gpu_check.check_model("dense", "cpu", peak=1e9, reps=1, batch_size=2, overrides=TINY)[1]
    assert r["status"] == "FAIL" and "0.46x" in r["error"], r


def test_reversed_scan_case_runs_forward_and_grads():
    cases = [c for c in gpu_check.kernel_cases("cpu") if "reversed" in c[0]]
    assert len(cases) == 1 and cases[0][1] == ["scan_fwd[fp32]", "scan_bwd[fp32]"]
    row = gpu_check.kernel_row(cases[0], "torch", "cpu", "cpu", 0)
    assert row["status"] == "PASS" and row["err"] == 0
    a, b, h0 = cases[0][3](0)        # the case is the reverse recurrence h_t = a_t h_{t+1} + b_t
    y = cases[0][2](a, b, h0, backend="torch")
    h = h0
    for t in reversed(range(a.shape[-1])):
        h = a[..., t] * h + b[..., t]
        assert torch.allclose(y[..., t], h, atol=1e-5)


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
