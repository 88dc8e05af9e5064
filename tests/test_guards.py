"""Sizes and combinations refused before anything is made: the up-front memory estimate (cli.check_size), expert
choice's capacity, and each model's rule between its fields (its Config's __post_init__). Every attack runs through
train.main in a memory-limited child process, as `python train.py ARGS --out TMP` runs it: exit status 2, one stderr
line naming the rule, nothing written, fast (the sizes under 2 CPU seconds: no model, data or step made first)."""
import glob
import json
import os
import subprocess
import sys
import time
from dataclasses import fields

import pytest

import cli
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# attack -> a word its one-line error must hold (the rule it breaks)
ATTACKS = {
    "layers": (["--n_layer", "100000000"], "--force_memory"),
    "batch": (["--batch_size", "100000000"], "--force_memory"),
    "seq_len": (["--seq_len", "1000000"], "--force_memory"),
    "moma_experts": (["--model", "moma", "--experts", "1000", "--seq_len", "16", "--gen_n", "0"], "capacity"),
    "megabyte_patch": (["--model", "megabyte", "--seq_len", "12", "--patch_size", "16"], "pad patch"),
    "megalodon_chunk7": (["--model", "megalodon", "--chunk_size", "7"], "must divide seq_len"),
    "megalodon_chunk1000": (["--model", "megalodon", "--setting", "text", "--chunk_size", "1000"], "must divide"),
    "mom_d_conv": (["--model", "mom", "--d_conv", "1000"], "d_conv"),
    "blt_cross_k": (["--model", "blt", "--patching", "static", "--local_window", "1", "--cross_k", "1000"], "cross_k"),
}
SIZES = ("layers", "batch", "seq_len", "moma_experts")

# One interpreter runs every attack through train.main, as `python train.py ARGS` does (one start instead of nine):
# per attack a JSON line with main's exit status, its stderr and the CPU seconds it took (the machine's load aside).
DRIVER = """
import contextlib, io, json, sys, time
import train
for name, args, out in json.loads(sys.argv[1]):
    err, t0 = io.StringIO(), time.process_time()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = train.main(args + ["--steps", "2", "--out", out])
    print(json.dumps(dict(name=name, rc=rc, err=err.getvalue(), cpu=time.process_time() - t0)), flush=True)
"""


def _mapped():
    """This process's address space in bytes (it has imported torch, as the child will; 0 where unknown)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (OSError, StopIteration, ValueError):
        return 0


# A regression must not take the machine with it: the child may map 3 GiB beyond what importing torch maps (a CUDA
# build of torch maps several GB of libraries before any tensor exists, so a fixed limit would fail at import).
LIMIT = _mapped() + (3 << 30)


def _limit_memory():
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))
    except (ImportError, ValueError, OSError):
        pass


def _run(cmd, timeout):
    """cmd in a memory-limited child -> (exit status, stdout, stderr); a child that outlives timeout is killed."""
    p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=_limit_memory if os.name == "posix" else None)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:   # a run the guards let through trains on (or fills memory)
        p.kill()
        out, err = p.communicate()
    return p.returncode, out, err


@pytest.fixture(scope="module")
def refusals(tmp_path_factory):
    """{attack: (exit status, stderr, CPU seconds, its --out)} from one child running every attack in turn."""
    base = tmp_path_factory.mktemp("attacks")
    jobs = [(name, args, str(base / name)) for name, (args, _) in ATTACKS.items()]
    _, out, _ = _run([sys.executable, "-c", DRIVER, json.dumps(jobs)], timeout=600)
    rows = {r["name"]: r for r in map(json.loads, out.splitlines()) if r.get("name")}
    return {name: (rows[name]["rc"], rows[name]["err"], rows[name]["cpu"], o) if name in rows else None
            for name, _, o in jobs}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_refused_before_anything_is_written(name, refusals):
    assert refusals[name] is not None, f"{name}: no answer (it trained on or the child died)"
    rc, err, cpu, out = refusals[name]
    lines = err.strip().splitlines()
    assert rc == 2, f"{name}: exit {rc}, stderr tail {lines[-3:]}"
    assert len(lines) == 1 and lines[0].startswith("error: ") and ATTACKS[name][1] in lines[0], lines
    assert not os.path.exists(out), f"{name} wrote {os.listdir(out)}"
    # the sizes are refused from the config, before data or model (a 1e6-token chameleon set alone takes 7 s); a
    # model's rule when its Config is checked, after the data, before the model is built
    limit = 2 if name in SIZES else 10
    assert cpu < limit, f"{name}: {cpu:.1f} CPU seconds before the refusal"


def test_refusal_is_one_line_and_exit_2_from_the_command_line(tmp_path):
    """The same through `python train.py`: the process exits with status 2 after one stderr line, writing nothing."""
    rc, _, err = _run([sys.executable, os.path.join(ROOT, "train.py"), "--n_layer", "100000000",
                       "--out", str(tmp_path / "run")], timeout=300)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "up-front estimate" in err, err[-500:]
    assert not os.path.exists(tmp_path / "run")


def _tc(**kw):
    tc = train.TrainConfig(**kw)
    for k, v in train.SETTING_DEFAULTS["chameleon"].items():
        setattr(tc, k, getattr(tc, k) or v)
    return tc


def test_memory_estimate_refuses_from_the_config_alone_and_can_be_forced():
    """The estimate reads the Config, so a model a million times too large is refused in well under 2 s; with
    --force_memory only the memory and disk fits are skipped."""
    reg = cli.registry()
    t0 = time.perf_counter()
    with pytest.raises(cli.UsageError, match="up-front estimate"):
        cli.check_size("mot", _tc(model="mot"), dict(n_layer="100000000"), reg, "cpu")
    assert time.perf_counter() - t0 < 2
    cli.check_size("mot", _tc(model="mot", force_memory=True), dict(n_layer="100000000"), reg, "cpu")
    with pytest.raises(cli.UsageError, match="capacity"):   # a rule, not a fit: --force_memory does not lift it
        cli.check_size("moma", _tc(model="moma", seq_len=16, force_memory=True), dict(experts="1000"), reg, "cpu")
    assert cli.free_memory("cpu") is None or cli.free_memory("cpu") > 0
    assert "force_memory" in {f.name for f in fields(train.TrainConfig)} and "counted:" in cli.help_text(
        train.TrainConfig)


@pytest.mark.parametrize("name,over", [("dense", {}), ("mot", {}), ("mom", {}), ("mamba", {}), ("moma", {}),
                                       ("moma-ec8", {}), ("transfusion-mom", {}), ("megabyte", {}),
                                       ("blt", dict(patching="static")), ("megalodon", dict(chunk_size=64))])
def test_parameter_estimate_is_honest(name, over):
    """The estimate's parameter count, from the Config alone, is within 10% of the model's."""
    _, cfg_cls, model_cls, _, base = cli.registry()[name]
    cfg = cfg_cls(**{**base, **over, "seq_len": 64})
    real = sum(p.numel() for p in model_cls(cfg).parameters())
    assert abs(cli.size_estimate(cfg)[0] / real - 1) < 0.1


def test_every_default_and_shipped_config_passes():
    """The registry's defaults and every shipped run's config (docs/runs) pass the new checks."""
    reg = cli.registry()
    for name in reg:
        cli.check_size(name, _tc(model=name), {}, reg, "cpu")
    paths = glob.glob(os.path.join(ROOT, "docs", "runs", "*", "*", "config.json"))
    assert paths
    for p in paths:
        c = json.load(open(p))
        cfg_cls = reg[c["model"]][1]
        model_cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in c["model_cfg"].items()}
        cfg_cls(**model_cfg).__post_init__()
        keys = {f.name for f in fields(train.TrainConfig)}
        tc = train.TrainConfig(**{k: v for k, v in c["train"].items() if k in keys})
        cli.check_size(c["model"], tc, model_cfg, reg, "cpu")


def test_checkpoint_must_fit_the_free_disk(monkeypatch, tmp_path):
    """The checkpoint (weights and AdamW's two moments) is checked against the free disk where --out will be."""
    usage = type("Usage", (), dict(free=1000))
    monkeypatch.setattr(cli.shutil, "disk_usage", lambda path: usage)
    reg = cli.registry()
    with pytest.raises(cli.UsageError, match="checkpoint"):
        cli.check_size("mot", _tc(model="mot", out=str(tmp_path / "a" / "b")), {}, reg, "cpu")
    cli.check_size("mot", _tc(model="mot", out=str(tmp_path), force_memory=True), {}, reg, "cpu")
