"""rundir.py -- a training run's output directory: one run at a time (lock), atomic checkpoints, exact resume.

OUT holds config.json, metrics.jsonl (one JSON record per log line or eval; read_jsonl reads it), ckpt.pt (model,
optimizer, schedule, step, config, RNG state and data position: resume is exact) and the figures. Prefetch draws the
training batches ahead in a thread. train.py uses these; a reader of the training method can skip this file.
"""
import contextlib
import json
import os
import queue
import random
import threading
import time

import numpy as np
import torch

from cli import UsageError


# --- the output directory: checked, and locked for the run's life --------------------------------------------------
def check_out(out):
    """Create OUT or raise a one-line UsageError naming why it cannot hold a run."""
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


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def lock_out(out):
    """Hold OUT/train.lock (it names the owner's pid) for the run's life, so two runs never share an output dir.
    A lock whose pid is dead (a killed run) is stale and taken over. Under torchrun the owner is the launcher, shared
    by every local rank. -> the lock path if this process must release it, else None."""
    owner = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else os.getpid()
    path = os.path.join(out, "train.lock")
    tmp = f"{path}.{os.getpid()}"
    for _ in range(3):
        with open(tmp, "w") as f:
            f.write(str(owner))
        try:
            os.link(tmp, path)  # atomic: the lock appears with its content, or not at all
            return path
        except FileExistsError:
            pass
        finally:
            os.remove(tmp)
        try:
            pid = int(open(path).read().strip() or 0)
        except (OSError, ValueError):
            continue
        if pid == owner:
            return None  # another rank of this run holds it
        if _alive(pid):
            raise UsageError(f"--out={out} is in use by a running train.py (pid {pid}); wait for it to finish "
                             f"or choose another --out")
        stale = f"{path}.stale{os.getpid()}"
        try:
            os.rename(path, stale)  # one taker wins; put back a lock that is no longer the stale one
            if open(stale).read().strip() != str(pid):
                with contextlib.suppress(OSError):
                    os.link(stale, path)
            os.remove(stale)
        except OSError:
            pass
    raise UsageError(f"--out={out}: could not take {path}; remove it if no run uses {out}")


@contextlib.contextmanager
def lock(out):
    """Check OUT, hold its lock while the block runs, release it after."""
    check_out(out)
    path = lock_out(out)
    try:
        yield
    finally:
        if path:
            with contextlib.suppress(OSError):
                os.remove(path)


def start(out, config, resume_step=None):
    """Rank 0 at the start of a run: drop a temp file a run killed while saving left (we hold the lock), write
    config.json, and on resume keep only the log lines up to the checkpoint's step (the rest is written again).
    -> metrics.jsonl, open for appending."""
    for f in os.listdir(out):
        if f.startswith("ckpt.pt.tmp"):
            os.remove(os.path.join(out, f))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    path = os.path.join(out, "metrics.jsonl")
    old = read_jsonl(path) if (resume_step is not None and os.path.exists(path)) else []
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in old if r.get("step", 0) <= resume_step)
    return open(path, "a")


@contextlib.contextmanager
def timer(spent, what):
    """Add the wall seconds of the block to spent[what] (the time outside the training steps)."""
    t = time.perf_counter()
    yield
    spent[what] += time.perf_counter() - t


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
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a killed run leaves the old checkpoint or the new one, never half of one


def load_ckpt(path):
    if not os.path.isfile(path):
        raise UsageError(f"--resume: no checkpoint at {path}; run without --resume to start fresh")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        assert isinstance(ck, dict) and {"model", "optimizer", "step", "config"} <= ck.keys()
    except Exception as e:
        raise UsageError(f"--resume: {path} is corrupt or not a nanomix checkpoint ({type(e).__name__}); "
                         f"delete it and train without --resume") from None
    return ck


def load_for_resume(path, name, tc, config):
    """The checkpoint --resume continues from, checked to be the same run (check_resume)."""
    ck = load_ckpt(path)
    check_resume(ck, path, name, tc, config)
    return ck


def resume(ck, model, opt, sched):
    """Load weights, optimizer, schedule and RNG state from a checkpoint -> (step, training seconds so far); the data
    position is the step (every batch is a function of its index)."""
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    set_rng_state(ck["rng"])
    return ck["step"], ck["time"]


def rng_state():
    return dict(torch=torch.get_rng_state(), python=json.dumps(random.getstate()),
                numpy=json.dumps([x.tolist() if hasattr(x, "tolist") else x for x in np.random.get_state()]),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    version, state, gauss = json.loads(s["python"])
    random.setstate((version, tuple(state), gauss))
    st = json.loads(s["numpy"])
    np.random.set_state((st[0], np.array(st[1], dtype=np.uint32), *st[2:]))
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _same(a, b):
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


# trainer keys a resumed run cannot change: the data stream and the optimizer (lr and weight decay would be silently
# taken from the saved optimizer state); steps, eval/log/ckpt cadence, device and micro-batching may change
RESUME_FIXED = ("seed", "batch_size", "seq_len", "data", "lr", "min_lr_ratio", "warmup", "weight_decay", "grad_clip")


def check_resume(ck, ckpt_path, name, tc, config):
    """--resume continues the same run: same model, setting, model config and data stream, or a one-line error."""
    old = ck["config"]
    if (old["model"], old["setting"]) != (name, tc.setting):
        raise UsageError(f"--resume: {ckpt_path} holds {old['model']} on {old['setting']}, not {name} on {tc.setting}; "
                         f"use another --out")
    diff = [f"{k} ({old['model_cfg'].get(k)} -> {v})" for k, v in config["model_cfg"].items()
            if not _same(old["model_cfg"].get(k), v)]
    diff += [f"{k} ({old['train'].get(k)} -> {config['train'][k]})" for k in RESUME_FIXED
             if not _same(old["train"].get(k), config["train"][k])]
    if diff:
        raise UsageError(f"--resume: {ckpt_path} was trained with other values of {', '.join(diff)}; resume with its "
                         f"values (see {os.path.join(tc.out, 'config.json')}) or use another --out")


# --- the training batches, drawn ahead ----------------------------------------------------------------------------
class Prefetch:
    """The training batches, drawn ahead by a background thread in the order the loop uses them (data off the
    critical path: the toy world is drawn in Python while the model step runs, mostly outside the GIL).
    Batch n is ds.get_batch("train", micro, n, rank, world): a pure function of its arguments (data.py seeds every
    row by (seed, split, global row) and touches no global RNG), so these are exactly the batches the loop would draw
    itself, in any thread; a resumed run starts at its step's index. On CUDA batches are pinned, so that
    .to(device, non_blocking=True) overlaps the copy with compute."""

    def __init__(self, ds, micro, rank, world, first, last, pin=False, depth=4):
        self.q, self.stop = queue.Queue(depth), threading.Event()
        args = (ds, micro, rank, world, first, last, pin)
        self.thread = threading.Thread(target=self._run, args=args, daemon=True, name="nanomix-prefetch")
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
        i, b = self.q.get()
        if i is None:
            raise b
        assert i == n, f"prefetch out of order: {i} != {n}"
        return b

    def close(self):
        self.stop.set()
        self.thread.join()
