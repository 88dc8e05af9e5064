"""rundir.py -- a training run's output directory: one run at a time (lock), atomic checkpoints, exact resume.

OUT holds config.json, metrics.jsonl (one JSON record per log line or eval; read_jsonl reads it), ckpt.pt (model,
optimizer, schedule, step, config, RNG state and data position: resume is exact) and the figures. Prefetch draws the
training batches ahead in a thread. The guard rails: the lock is held while any process of the run lives; a file a
run reads must be a regular file (checked by stat, never opened otherwise); --resume checks every file it reads
before a byte is written; a failed checkpoint write and a non-finite weight end in one line naming the checkpoint
kept. Every failure is a UsageError (one line, exit 2). train.py uses these; a reader of the method can skip this file.

The shipped checkpoints (docs/ckpt/NAME.pt) are exported from a finished run: its weights in fp16 (buffers, such as a
tuned threshold, as trained), the config that rebuilds the model and its eval data, and the eval loss of those fp16
weights. The paper files' demos, plots.py and tests/test_checkpoints.py load them; train.py writes them:

    python train.py export RUN_DIR docs/ckpt/NAME.pt [--KEY=VALUE ...] [--command=CMD] [--force]
    # KEY: a model Config field to change in the shipped config; CMD: the documented command that made the run
"""
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import queue
import random
import shlex
import stat
import sys
import threading
import time

import numpy as np
import torch

import cli
from cli import UsageError


# --- the files a run reads: regular files only, checked before they are opened -------------------------------------
MAX_DATA_BYTES = 1 << 30   # --data is read into memory whole; a larger file is refused before it is read


def check_file(what, path, max_bytes=None, fix="give the path of a file"):
    """Raise a one-line UsageError unless `path` is a regular file (of at most max_bytes): a FIFO, a device such as
    /dev/zero or a directory is refused from its stat, without opening it (a FIFO would block the reader for ever).
    what: how the message names the file (e.g. "--data")."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"{what} {path}: no such file; {fix}") from None
    except OSError as e:
        raise UsageError(f"{what} {path}: cannot read it ({e.strerror}); {fix}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else
                "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a plain file")
        raise UsageError(f"{what} {path} is {kind}, not a regular file; {fix}")
    if max_bytes is not None and st.st_size > max_bytes:
        raise UsageError(f"{what} {path} holds {st.st_size:,} bytes, more than the {max_bytes:,} it may (it is read "
                         f"into memory whole); use a part of it: head -c {max_bytes} FILE > PART")


def check_paths(*configs):
    """Every field whose RANGES rule is "path" and that is set names a regular file (--data at most MAX_DATA_BYTES).
    A missing file is left to its reader, whose message names how to make it."""
    for cfg in configs:
        for f in dataclasses.fields(cfg):
            path = getattr(cfg, f.name)
            rule = getattr(type(cfg), "RANGES", {}).get(f.name, "")
            if rule.split(";")[0].strip() == "path" and path and os.path.lexists(path):
                check_file(f"--{f.name}", path, MAX_DATA_BYTES if f.name == "data" else None)


def data_hash(path):
    """sha256 of a --data file's bytes (stored in the run's config, compared on --resume), or None without one."""
    if not path:
        return None
    check_file("--data", path, MAX_DATA_BYTES)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- the output directory: checked, and locked for the run's life --------------------------------------------------
RUN_FILES = ("config.json", "metrics.jsonl", "ckpt.pt")


def check_out(out, resume=None, overwrite=False):
    """Create OUT or raise a one-line UsageError naming why it cannot hold a run. With resume given (True/False):
    OUT's run files are regular files, and a new run never takes over a directory that holds another run's
    checkpoint unless overwrite is set (then it starts afresh)."""
    try:
        os.makedirs(out, exist_ok=True)
    except FileExistsError:
        raise UsageError(f"--out={out} is a file, not a directory; choose another --out") from None
    except OSError as e:
        raise UsageError(f"--out={out}: cannot create that directory ({e.strerror}); choose another --out") from None
    probe = os.path.join(out, f".write_test{os.getpid()}")
    try:
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"--out={out} is not writable ({e.strerror}); choose another --out") from None
    if resume is not None:
        _check_run_files(out, resume, overwrite)


def _check_run_files(out, resume, overwrite):
    if resume and overwrite:
        raise UsageError("--resume continues the run in --out and --overwrite=True replaces it; choose one")
    for f in RUN_FILES:
        if os.path.lexists(os.path.join(out, f)):
            check_file(f"--out={out} holds", os.path.join(out, f), fix="remove it or choose another --out")
    if not resume and not overwrite and os.path.exists(os.path.join(out, "ckpt.pt")):
        raise UsageError(f"--out={out} holds another run's checkpoint (ckpt.pt); continue it with --resume, replace "
                         f"it with --overwrite=True, or choose another --out")


def _alive(pid):
    """Is process pid running? (a zombie -- dead, not yet reaped -- is not)"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True   # no /proc (macOS): kill(pid, 0) is the answer


def run_id():
    """(key, rank): the ranks of one launch share the key and hold distinct ranks; any other process is a run of its
    own. Only a process the trainer itself treats as a rank (RANK set, cli.ddp_env) counts as one, so launcher
    variables a shell merely inherited (TORCHELASTIC_RUN_ID) change nothing; a launch is its launcher (the parent
    pid) and rendezvous."""
    if "RANK" not in os.environ:
        return f"pid {os.getpid()}", 0
    e = os.environ
    return (f"ranks of {os.getppid()} {e.get('TORCHELASTIC_RUN_ID', '')} {e.get('MASTER_ADDR', '')}:"
            f"{e.get('MASTER_PORT', '')}", int(e["RANK"]))


def _read_lock(text):
    """train.lock's lines "pid rank key" -> [(pid, rank, key)]; a bare pid (an older lock) has no rank or key."""
    entries = []
    for line in text.splitlines():
        pid, _, rest = line.strip().partition(" ")
        rank, _, key = rest.partition(" ")
        if pid.isdigit():
            entries.append((int(pid), int(rank) if rank.isdigit() else None, key or None))
    return entries


def lock_out(out):
    """Add this process to OUT/train.lock (a line "pid rank key" per process of the run) for the run's life, so two
    runs never share an output dir: the lock is held while ANY process listed in it lives (a killed launcher whose
    ranks train on keeps it held). A rank of the same launch joins it; a lock whose processes are all dead is stale
    and taken over. The file is read and rewritten under flock. -> the lock path (release it with unlock)."""
    path = os.path.join(out, "train.lock")
    key, rank = run_id()
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # a directory (or another odd file) where the lock goes
            raise UsageError(f"--out={out}: cannot take {path} ({e.strerror}); remove it if no run uses "
                             f"{out}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with contextlib.suppress(FileNotFoundError):
                if os.fstat(fd).st_ino == os.stat(path).st_ino:  # else a releaser removed it meanwhile: try again
                    break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        live = [e for e in _read_lock(os.read(fd, 1 << 20).decode(errors="replace")) if _alive(e[0])]
        if live and (any(k != key for _, _, k in live) or rank in {r for _, r, _ in live}):
            pids = ", ".join(str(p) for p, _, _ in live)
            raise UsageError(f"--out={out} is in use by a running train.py (pid{'s' if len(live) > 1 else ''} {pids}); "
                             f"wait for it to finish or choose another --out")
        text = "".join(f"{p} {r} {k}\n" for p, r, k in live + [(os.getpid(), rank, key)])
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, text.encode())
        return path
    finally:
        os.close(fd)  # and the flock with it


def unlock(path):
    """Take this process out of its lock file; the last one out removes the file."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            rest = [e for e in _read_lock(os.read(fd, 1 << 20).decode(errors="replace")) if e[0] != os.getpid()]
            if rest:
                os.lseek(fd, 0, os.SEEK_SET)
                os.ftruncate(fd, 0)
                os.write(fd, "".join(f"{p} {r} {k}\n" for p, r, k in rest).encode())
            else:
                os.remove(path)  # under the flock: a taker that opened the old file sees its inode gone and retries
        finally:
            os.close(fd)


@contextlib.contextmanager
def lock(out, resume=None, overwrite=False):
    """Check OUT, hold its lock while the block runs, release it after. With resume given, check_out's checks of the
    run already in OUT run under the lock (a live run's checkpoint is named as in use, not as another run's)."""
    check_out(out)
    path = lock_out(out)
    try:
        if resume is not None:
            check_out(out, resume, overwrite)
        yield
    finally:
        unlock(path)


def start(out, config, resume_step=None):
    """Rank 0 at the start of a run: drop a temp file a run killed while saving left (we hold the lock), write
    config.json, and on resume keep only the log lines up to the checkpoint's step (the rest is written again; the
    log was checked by validate_resume). A new run removes the ckpt.pt of the run it replaces (--overwrite).
    -> metrics.jsonl, open for appending."""
    for f in os.listdir(out):
        if f.startswith("ckpt.pt.tmp") or (f == "ckpt.pt" and resume_step is None):
            os.remove(os.path.join(out, f))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    path = os.path.join(out, "metrics.jsonl")
    old = read_jsonl(path) if (resume_step is not None and os.path.exists(path)) else []
    old = [r for r in old if isinstance(r, dict) and _is_int(r.get("step")) and r["step"] <= resume_step]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in old)
    return open(path, "a")


@contextlib.contextmanager
def timer(spent, what):
    """Add the wall seconds of the block to spent[what] (the time outside the training steps)."""
    t = time.perf_counter()
    yield
    spent[what] += time.perf_counter() - t


def header(name, config, tc, model, fl, world, accum, micro):
    """The start-of-run lines: the config, then the model's size, its FLOPs per token (count_flops' parts) and how a
    step is cut: world ranks x accum micro-steps of micro rows."""
    return (f"{json.dumps(config)}\n{name} on {tc.setting}: {sum(p.numel() for p in model.parameters()) / 1e6:.3f}M "
            f"params, {fl['total'] / 1e6:.3f} MFLOPs/token (fwd+bwd: {fl['matmul'] / 1e6:.3f} matmul + "
            f"{fl['scan_fft'] / 1e6:.3f} scan/FFT), {world} rank(s) x {accum} micro-step(s) of {micro} x "
            f"{tc.seq_len}, device {tc.device} ({cli.resolve_precision(tc.precision, tc.device)})")


def summary(out, step, steps_run, wall, spent):
    """The end-of-run lines: where the wall time went, and where the outputs are."""
    s = wall - sum(spent.values())
    return (f"done: {step} steps. this run: {wall:.1f}s wall = {steps_run} training steps {s:.1f}s "
            f"({1000 * s / max(1, steps_run):.0f} ms/step) + eval {spent['eval']:.1f}s + generation eval "
            f"{spent['generation']:.1f}s + checkpoints {spent['checkpoints']:.1f}s\n"
            f"log: {os.path.join(out, 'metrics.jsonl')}  plot: {os.path.join(out, 'loss.png')}  "
            f"checkpoint: {os.path.join(out, 'ckpt.pt')}")


def read_jsonl(path):
    """The records of a metrics.jsonl; a partial last line (a run killed mid-write) is dropped."""
    rows = []
    for line in open(path):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


# --- checkpoints: atomic write, exact resume ---------------------------------------------------------------------
def save_ckpt(path, state):
    """Write a checkpoint atomically: a killed run leaves the old checkpoint or the new one, never half of one. A failed
    write (a full disk) removes its temp file and raises a one-line UsageError naming the file and the checkpoint
    kept (its step, read from it)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a full disk as a RuntimeError
        with contextlib.suppress(OSError):
            os.remove(tmp)
        why = (getattr(e, "strerror", None) or (str(e).strip().splitlines() or [""])[0][:120]) or type(e).__name__
        raise UsageError(f"cannot write the checkpoint {path} ({why}), the run stopped; {_kept(path)}; free space "
                         f"or choose another --out") from None


def _kept(path):
    if not os.path.exists(path):
        return "no checkpoint was written"
    try:
        step = torch.load(path, map_location="cpu", weights_only=True)["step"]
        return f"the checkpoint of step {step} is kept in {path}"
    except Exception:  # noqa: BLE001 -- only the message depends on it
        return f"the previous {path} is kept"


def nonfinite(model, opt=None):
    """The first weight, buffer or optimizer state that is not finite (its name), or None. A checkpoint is saved only
    when this is None, so "the last good checkpoint" always is one."""
    for k, v in model.state_dict().items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            return f"the weight {k}"
    names = {p: k for k, p in model.named_parameters()}
    for p, st in (opt.state.items() if opt is not None else ()):
        for k, v in st.items():
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
                return f"the optimizer's {k} of {names.get(p, 'a weight')}"
    return None


def load_ckpt(path):
    if not os.path.lexists(path):
        raise UsageError(f"--resume: no checkpoint at {path}; run without --resume to start fresh")
    check_file("--resume:", path, fix="give --out a run's directory")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unreadable file gets the same one-line answer
        what = ("holds pickled Python objects, never loaded (weights_only=True)"
                if "unsupported global" in str(e).lower() else f"is corrupt or not a nanomix checkpoint "
                                                               f"({type(e).__name__})")
        raise UsageError(f"--resume: {path} {what}; delete it and train without --resume") from None
    check_checkpoint(ck, path=path)
    return ck


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# a checkpoint's entries (train.py writes them) and their types
CKPT_ENTRIES = dict(model=dict, optimizer=dict, scheduler=dict, step=int, time=(int, float), config=dict, rng=dict)
CONFIG_ENTRIES = dict(model=str, setting=str, train=dict, model_cfg=dict)
RNG_ENTRIES = dict(torch=torch.Tensor, python=str, numpy=str, cuda=list)


def _unlike(saved, fresh, where):
    """Where a saved state (plain data and tensors) differs in structure or type from a fresh one, or None. Keys
    missing on either side are left to the loader (torch fills defaults across versions)."""
    if isinstance(fresh, dict):
        if not isinstance(saved, dict):
            return where
        return next((u for k in fresh.keys() & saved.keys() if (u := _unlike(saved[k], fresh[k], f"{where}.{k}"))),
                    None)
    if isinstance(fresh, (list, tuple)):
        if not isinstance(saved, (list, tuple)) or len(saved) != len(fresh):
            return where
        return next((u for i, (s, f) in enumerate(zip(saved, fresh)) if (u := _unlike(s, f, f"{where}[{i}]"))), None)
    if torch.is_tensor(fresh):
        ok = torch.is_tensor(saved) and saved.shape == fresh.shape
    elif isinstance(fresh, bool) or isinstance(fresh, str):
        ok = type(saved) is type(fresh)
    elif _is_number(fresh):
        ok = _is_number(saved)
    else:
        ok = True
    return None if ok else where


def check_checkpoint(ck, model=None, opt=None, sched=None, path="ckpt.pt"):
    """Everything resume() will load, checked before it loads (or writes) anything: the entries and their types, the
    config's, the RNG state (tried, then put back); with model: every weight's name, shape and dtype, all finite;
    with opt / sched: the optimizer's groups and state shapes and the schedule's state. Else a one-line UsageError."""
    def bad(why):
        return UsageError(f"--resume: {path} {why}; delete it and train without --resume")

    def entries(d, kinds, what):
        for k, kind in kinds.items():
            if k not in d:
                raise bad(f"has no {what}{k!r} entry")
            if not isinstance(d[k], kind) or isinstance(d[k], bool):
                raise bad(f"has a {type(d[k]).__name__} as its {what}{k!r} entry")

    if not isinstance(ck, dict):
        raise bad(f"holds a {type(ck).__name__}, not a nanomix checkpoint")
    entries(ck, CKPT_ENTRIES, "")
    entries(ck["config"], CONFIG_ENTRIES, "config ")
    entries(ck["rng"], RNG_ENTRIES, "rng ")
    if ck["step"] < 0 or not math.isfinite(ck["time"]):
        raise bad(f"has step {ck['step']} and time {ck['time']}")
    saved = rng_state()
    try:
        set_rng_state(ck["rng"])
    except Exception as e:  # noqa: BLE001 -- a malformed state of any kind
        raise bad(f"has an RNG state that cannot be restored ({type(e).__name__})") from None
    finally:
        set_rng_state(saved)
    for k, s in ck["model"].items():
        if torch.is_tensor(s) and s.is_floating_point() and not bool(torch.isfinite(s).all()):
            raise bad(f"holds a non-finite weight ({k})")
    if model is not None:
        own, sd = model.state_dict(), ck["model"]
        for k in own.keys() | sd.keys():
            v, s = own.get(k), sd.get(k)
            if v is None or s is None:
                raise bad(f"does not fit this model: {'no weight' if s is None else 'an unknown weight'} {k}")
            if not torch.is_tensor(s) or s.shape != v.shape or s.dtype != v.dtype:
                got = f"{tuple(s.shape)} {s.dtype}" if torch.is_tensor(s) else f"a {type(s).__name__}"
                raise bad(f"does not fit this model: {k} is {got}, the model's is {tuple(v.shape)} {v.dtype}")
    o = ck["optimizer"]
    if not (isinstance(o.get("state"), dict) and isinstance(o.get("param_groups"), list)):
        raise bad("has no optimizer state and parameter groups")
    if opt is not None:
        u = _unlike(o["param_groups"], opt.state_dict()["param_groups"], "param_groups")
        if u:
            raise bad(f"has other optimizer parameter groups than this model ({u})")
        shapes = dict(zip((i for g in o["param_groups"] for i in g["params"]),
                          (p.shape for g in opt.param_groups for p in g["params"])))
        for i, st in o["state"].items():
            if i not in shapes or not isinstance(st, dict):
                raise bad(f"has optimizer state for an unknown parameter {i}")
            for k, v in st.items():
                if not torch.is_tensor(v) or (v.dim() and v.shape != shapes[i]):
                    raise bad(f"has an optimizer {k} of parameter {i} that does not fit its shape {tuple(shapes[i])}")
                if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                    raise bad(f"has a non-finite optimizer {k} of parameter {i}")
    if sched is not None and (u := _unlike(ck["scheduler"], sched.state_dict(), "scheduler")):
        raise bad(f"has a schedule state unlike this run's ({u})")


def _is_row(r):
    return (isinstance(r, dict) and _is_int(r.get("step")) and r["step"] >= 0
            and all(_is_number(v) for v in r.values()))


def check_metrics(path):
    """Every line of a metrics.jsonl is a row (a JSON object: an int step >= 0 and numbers), but for a partial last
    line (a run killed mid-write; resume drops it); else a one-line UsageError naming the file and the line."""
    if not os.path.lexists(path):
        return
    check_file("--resume:", path, fix="remove it or use another --out")
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines):
                continue  # the partial last line of a killed run
            row = None
        if not _is_row(row):
            raise UsageError(f"--resume: {path} line {i} is not a metrics row (a JSON object with an integer step "
                             f"and numbers): {line.strip()[:60]!r}; delete that line or train without --resume")


def validate_resume(ck, model, out, config, opt=None, sched=None):
    """Everything --resume reads, checked before a byte is written: the checkpoint (check_checkpoint: entries, types,
    shapes against the model, finite), the same run (check_resume: model, setting, config, the data file's hash), the
    run files in OUT and every row of metrics.jsonl. Else a one-line UsageError."""
    path = os.path.join(out, "ckpt.pt")
    check_checkpoint(ck, path=path)                    # its entries and their types
    _check_same_run(ck["config"], config, path, out)   # then the run: a changed config explains a misfit best
    check_checkpoint(ck, model, opt, sched, path)      # then the weights and optimizer state against the model
    _check_run_files(out, resume=True, overwrite=False)
    check_metrics(os.path.join(out, "metrics.jsonl"))


def resume(ck, model, opt, sched, scaler=None):
    """Load weights, optimizer, schedule, fp16's loss scale and RNG state from a checkpoint -> (step, training seconds
    so far); the data position is the step (every batch is a function of its index)."""
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    if scaler is not None and ck.get("scaler"):
        scaler.load_state_dict(ck["scaler"])
    set_rng_state(ck["rng"])
    return ck["step"], ck["time"]


def rng_state():
    return dict(torch=torch.get_rng_state(), python=json.dumps(random.getstate()),
                numpy=json.dumps([x.tolist() if hasattr(x, "tolist") else x for x in np.random.get_state()]),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                mps=torch.mps.get_rng_state() if torch.backends.mps.is_available() else None)   # Apple silicon


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    version, state, gauss = json.loads(s["python"])
    random.setstate((version, tuple(state), gauss))
    st = json.loads(s["numpy"])
    np.random.set_state((st[0], np.array(st[1], dtype=np.uint32), *st[2:]))
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    if s.get("mps") is not None and torch.backends.mps.is_available():
        torch.mps.set_rng_state(s["mps"])


def _same(a, b):
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


# trainer keys a resumed run cannot change: the data stream and the optimizer (lr and weight decay would be silently
# taken from the saved optimizer state); steps, eval/log/ckpt cadence, device and micro-batching may change
RESUME_FIXED = ("seed", "batch_size", "seq_len", "data", "lr", "min_lr_ratio", "warmup", "weight_decay", "grad_clip")


def _check_same_run(old, new, ckpt_path, out):
    if (old["model"], old["setting"]) != (new["model"], new["setting"]):
        raise UsageError(f"--resume: {ckpt_path} holds {old['model']} on {old['setting']}, not {new['model']} on "
                         f"{new['setting']}; use another --out")
    diff = [f"{k} ({old['model_cfg'].get(k)} -> {v})" for k, v in new["model_cfg"].items()
            if not _same(old["model_cfg"].get(k), v)]
    diff += [f"{k} ({old['train'].get(k)} -> {new['train'][k]})" for k in RESUME_FIXED
             if not _same(old["train"].get(k), new["train"][k])]
    if diff:
        raise UsageError(f"--resume: {ckpt_path} was trained with other values of {', '.join(diff)}; resume with its "
                         f"values (see {os.path.join(out, 'config.json')}) or use another --out")
    if "data_sha256" in new and old.get("data_sha256") != new["data_sha256"]:
        data = new["train"].get("data")
        raise UsageError(f"--resume: the contents of --data={data} are not the ones {ckpt_path} was trained on "
                         f"(sha256 {str(old.get('data_sha256'))[:12]} -> {str(new['data_sha256'])[:12]}); restore "
                         f"that file or use another --out")


# --- the training batches, drawn ahead ----------------------------------------------------------------------------
class Prefetch:
    """The training batches in the order the loop uses them: batch n is ds.get_batch("train", micro, n, rank, world),
    a pure function of its arguments (data.py seeds every row by (seed, split, global row) and touches no global RNG),
    so a resumed run starts at its step's index and any thread draws the same batches.
    On a GPU a background thread draws them ahead (data off the critical path), pinned on CUDA so that
    .to(device, non_blocking=True) overlaps the copy with compute. On the CPU (background=False) get(n) draws batch n
    in the loop's own thread: a second thread that runs torch ops gets an OpenMP team of its own, and with more
    threads than cores every parallel region of the model step waits for a core (RESULTS.md, the loop's cost)."""

    def __init__(self, ds, micro, rank, world, first, last, pin=False, depth=4, background=True):
        self.q, self.stop = queue.Queue(depth), threading.Event()
        self.draw = None if background else (lambda n: ds.get_batch("train", micro, n, rank, world))
        args = (ds, micro, rank, world, first, last, pin)
        self.thread = threading.Thread(target=self._run, args=args, daemon=True, name="nanomix-prefetch")
        if background:
            self.thread.start()

    def _put(self, item):
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return
            except queue.Full:
                pass

    def _run(self, ds, micro, rank, world, first, last, pin):
        for n in range(first, last):
            if self.stop.is_set():
                return
            try:
                b = ds.get_batch("train", micro, n, rank, world)
                if pin:
                    b = {k: v.pin_memory() for k, v in b.items()}
            except BaseException as e:  # noqa: BLE001 -- handed to the training loop, raised there
                self._put((None, e))
                return
            self._put((n, b))

    def get(self, n):
        if self.draw is not None:
            return self.draw(n)
        i, b = self.q.get()
        if i is None:
            raise b
        assert i == n, f"prefetch out of order: {i} != {n}"
        return b

    def close(self):
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()


# --- shipped checkpoints: a run's weights in fp16, with what rebuilds the model and its eval data ------------------
# This file never imports train.py (train.py imports it): the exporter gets the trainer's pieces it needs handed in,
# train.evaluate (the eval loss of the fp16 weights), train.TrainConfig and train.SETTING_DEFAULTS (the defaults the
# rebuilt command leaves out).
ROOT = os.path.dirname(os.path.abspath(__file__))   # relative paths in a shipped config name files of the repository
EXPORT_TRAIN_KEYS = ("seed", "seq_len", "batch_size", "micro_batch_size", "eval_batches", "data", "steps")
CHECK_BATCHES = 1   # eval batches of the quick check tests/test_checkpoints.py repeats (the recorded eval: the run's)
EXPORT_ENTRIES = dict(config=dict, model=dict, step=int, eval=dict, check=dict, command=str)
EXPORT_USAGE = "python train.py export RUN_DIR DST [--KEY=VALUE ...] [--command=CMD] [--force]"


def read_export(path):
    """A shipped checkpoint (export's format), loaded with weights_only=True and its entries checked, or a one-line
    UsageError."""
    check_file("checkpoint", path, fix="export one with `python train.py export RUN_DIR PATH`")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unreadable file gets the same one-line answer
        raise UsageError(f"checkpoint {path} cannot be read ({type(e).__name__}); export it again") from None
    if not isinstance(ck, dict) or any(not isinstance(ck.get(k), t) for k, t in EXPORT_ENTRIES.items()):
        raise UsageError(f"checkpoint {path} is not an exported nanomix checkpoint (entries {', '.join(EXPORT_ENTRIES)})")
    return ck


def _build(conf, device="cpu"):
    """-> (model, its Config, its data): the model of a saved config built with cli.py's checks (its weights as
    initialised from the run's seed), its model_cfg read back with lists as tuples and relative paths against the
    repository."""
    name, t, reg = conf["model"], conf["train"], cli.registry()
    cli.check_model(name, reg)
    rules, over = getattr(reg[name][1], "RANGES", {}), {}
    for k, v in conf["model_cfg"].items():
        if isinstance(v, list):
            v = tuple(v)
        if rules.get(k, "").split(";")[0].strip() == "path" and v and not os.path.isabs(v):
            v = os.path.join(ROOT, v)
        over[k] = v
    ds = cli.make_data(conf["setting"], t["seq_len"], t["seed"], t["data"] or None)
    cfg = cli.model_config(name, ds, over, reg)
    check_paths(cfg)
    torch.manual_seed(t["seed"])
    return cli.make_model(name, cfg, device, reg), cfg, ds


def load_exported(path, device="cpu"):
    """-> (model in eval mode, its data, the checkpoint): the model built from the checkpoint's config (cli.py's
    checks), its fp16 weights cast to float32 and loaded strictly: a model that no longer fits them fails here."""
    ck = read_export(path)
    model, _, ds = _build(ck["config"], device)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ck["model"].items()}, strict=True)
    return model.eval(), ds, ck


def evaluate_exported(model, ds, ck, evaluate, train_config, eval_batches=None):
    """evaluate (train.evaluate) of a loaded checkpoint's model on its run's eval batches (the first eval_batches of
    them), in fp32 on one process; train_config: train.TrainConfig."""
    conf = ck["config"]
    t = {**conf["train"], **({"eval_batches": eval_batches} if eval_batches else {})}
    tc = train_config(model=conf["model"], setting=conf["setting"], **t)
    dev = next(model.parameters()).device.type
    ev = evaluate(model, ds, tc, 0, 1, dev, contextlib.nullcontext, tc.micro_batch_size or None)   # fp32: no autocast
    model.eval()
    return ev


def _train_command(conf, run, train_config, setting_defaults):
    """The train.py command line that makes a run of this config (its keys that differ from the defaults)."""
    name, setting, t = conf["model"], conf["setting"], conf["train"]
    base = train_config(model=name, setting=setting)
    for k, v in setting_defaults[setting].items():
        setattr(base, k, getattr(base, k) or v)
    base.eval_every = max(50, t.get("steps", base.steps) // 16)    # the defaults derived from the run's own keys
    base.gen_every = 4 * t.get("eval_every", base.eval_every)
    _, cls, _, _, over = cli.registry()[name]
    default = dataclasses.asdict(cls(**over))
    fmt = (lambda v: ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v))
    args = [f"--model {name}", f"--setting {setting}"]
    args += [f"--{k} {fmt(v)}" for k, v in t.items()
             if k not in ("model", "setting", "out", "device") and hasattr(base, k) and not _same(v, getattr(base, k))]
    args += [f"--{k} {shlex.quote(fmt(v))}" for k, v in conf["model_cfg"].items()
             if k in default and k not in ("seq_len", "vocab_size", "n_modalities", "modality_names",
                                            "modality_offsets") and not _same(v, default[k])]
    return "python train.py " + " ".join(args + [f"--out {shlex.quote(t.get('out') or run)}"])


def export(run, dst, evaluate, train_config, setting_defaults, overrides=None, force=False, command=None):
    """Write RUN/ckpt.pt's model as a shipped checkpoint dst: {config (model, setting, the trainer keys that rebuild the
    eval data, model_cfg), model (weights in fp16, buffers as trained), step, eval (evaluate_exported of the fp16
    weights on the run's eval batches), check (the same on its first CHECK_BATCHES), run_eval (the run's own eval at
    that step, in its precision), command}. evaluate, train_config, setting_defaults: train.evaluate, TrainConfig and
    SETTING_DEFAULTS (`python train.py export` hands them in).
    overrides: model Config fields to change in the shipped config (a path into the repository, e.g. BLT's
    entropy_ckpt); a Config field the model keeps as a scalar buffer of the same name (BLT's tuned threshold) is
    recorded at its trained value. command: the command that made the run, as documented (default: one rebuilt from
    its config). An existing dst is replaced only with force. -> the checkpoint written."""
    if os.path.lexists(dst) and not force:
        raise UsageError(f"{dst} exists; a shipped checkpoint is replaced only with --force")
    src = os.path.join(run, "ckpt.pt")
    check_file("export:", src, fix="give a finished run's directory (it holds ckpt.pt)")
    try:
        ck = torch.load(src, map_location="cpu", weights_only=True)
        conf, state = ck["config"], ck["model"]
        name, setting = conf["model"], conf["setting"]
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"export: {src} is not a train.py checkpoint ({type(e).__name__}); give a run's directory") \
            from None
    keep = {k: conf["train"][k] for k in EXPORT_TRAIN_KEYS}
    if keep["data"]:
        raise UsageError(f"export: {run} was trained on --data={keep['data']}; only runs on the toy data are shipped")
    model, cfg, _ = _build(dict(conf, train=keep))
    model.load_state_dict(state, strict=True)
    params = {k for k, _ in model.named_parameters()}   # 16-bit weights; buffers (a tuned threshold) stay exact
    half = {k: v.detach().half() if k in params and v.is_floating_point() else v.detach()
            for k, v in model.state_dict().items()}
    bad = next((k for k, v in half.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad:
        raise UsageError(f"export: the weight {bad} does not fit fp16 (overflows); it cannot be shipped in 16 bits")
    model_cfg = dataclasses.asdict(cfg)
    buffers = dict(model.named_buffers())
    for k in model_cfg:
        if k in buffers and buffers[k].numel() == 1:
            model_cfg[k] = float(half[k])
    for k, v in (overrides or {}).items():
        if k not in model_cfg:
            raise UsageError(f"export: unknown key --{k} for model {name}; valid keys: {', '.join(sorted(model_cfg))}")
        model_cfg[k] = cli.convert(k, v, model_cfg[k]) if isinstance(v, str) else v
    metrics = os.path.join(run, "metrics.jsonl")
    evals = [r for r in read_jsonl(metrics) if "eval_loss" in r and r.get("step") == ck["step"]] \
        if os.path.isfile(metrics) else []
    out = dict(config=dict(model=name, setting=setting, train=keep, model_cfg=model_cfg), model=half, step=ck["step"],
               eval={}, check={}, run_eval=evals[-1] if evals else {},
               command=command or _train_command(conf, run, train_config, setting_defaults))
    os.makedirs(os.path.dirname(os.path.abspath(dst)) or ".", exist_ok=True)
    tmp = f"{dst}.tmp{os.getpid()}"
    try:   # the recorded losses are those of the file as a user loads it (load_exported)
        save_ckpt(tmp, out)
        m, ds, _ = load_exported(tmp)
        out["eval"] = evaluate_exported(m, ds, out, evaluate, train_config)
        out["check"] = dict(eval_batches=CHECK_BATCHES, **evaluate_exported(m, ds, out, evaluate, train_config,
                                                                            CHECK_BATCHES))
        save_ckpt(tmp, out)
        os.replace(tmp, dst)
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)
    return dst


def export_main(argv, evaluate, train_config, setting_defaults):
    """`python train.py export RUN_DIR DST [--KEY=VALUE ...] [--command="python train.py ..."] [--force]` (argv: what
    follows "export") -> the line that names what was written; bad input raises a one-line UsageError."""
    if len(argv) < 2:
        raise UsageError(f"usage: {EXPORT_USAGE}")
    rest = argv[2:]
    _, over = cli.parse_args([a for a in rest if a != "--force"])
    command = over.pop("command", None)
    dst = export(argv[0], argv[1], evaluate, train_config, setting_defaults, over, "--force" in rest, command)
    ck = read_export(dst)
    run_loss = ck["run_eval"].get("eval_loss", float("nan"))
    return (f"{dst}: {ck['config']['model']}, step {ck['step']}, {os.path.getsize(dst) / 1e6:.2f} MB, eval_loss "
            f"{ck['eval']['eval_loss']:.4f} (fp16 weights; the run's {run_loss:.4f})")


if __name__ == "__main__":   # the exporter's command is train.py's, which hands it train.evaluate
    print(f"error: usage: {EXPORT_USAGE}", file=sys.stderr)
    sys.exit(2)
