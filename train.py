"""train.py -- the one small trainer for every nanomix model: CPU, one GPU, or torchrun DDP.

    python train.py                                           # the default model (mot) on the chameleon toy data
    python train.py --model mom --setting speech --steps 300  # any registered model, setting, override
    python train.py --compare dense,mot --setting chameleon   # same data, same FLOPs count, one plot
    python train.py --model megabyte --data my.txt            # byte models on any local text file
    torchrun --nproc_per_node=2 train.py --model mot          # DistributedDataParallel (gloo on CPU, nccl on CUDA)

Every `--key=value` (or `--key value`) overrides a field of the training config below or of the model's Config,
type-checked against its default. Outputs in OUT (default out/MODEL): config.json, metrics.jsonl, ckpt.pt, loss.png.

FLOPs, one method for every model (`count_flops`): the FLOPs actually executed by one forward + backward pass on the
first four training batches, divided by the tokens in the batch: matmul FLOPs counted by torch.utils.flop_counter
(linear layers, grouped matmuls, attention with the full T x T score matrix as counted for sdpa) plus the scans' and
FFTs' analytic FLOPs tallied by kernels.flop_tally (selective scan 9 per (batch, channel, state, step), linear scan
4 real / 16 complex per element, FFT 5 N log2 N; backward 2x forward: see kernels.py). Sparse models are charged for
what they run, frozen modules for their forward only; other elementwise work (norms, softmax, activations) is not
counted. metrics.jsonl: `flops` = total, `flops_matmul` = the matmul part.
"""
import contextlib
import copy
import dataclasses
import importlib
import importlib.util
import json
import math
import os
import queue
import random
import sys
import threading
import time
from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

import context_parallel
import data

MODEL_FILES = ("mot", "mom", "moma", "transfusion", "megabyte", "blt", "megalodon")


class UsageError(Exception):
    """Bad input: printed as one line, exit status 2."""


class Diverged(UsageError):
    """A non-finite loss, gradient or weight: the run stops before it can overwrite a good checkpoint (exit 2)."""


@dataclass
class TrainConfig:
    model: str = "mot"         # a registered model (python train.py --help lists them)
    setting: str = ""          # the data; "" = the model's default setting
    steps: int = 0             # optimizer steps; 0 = the setting's default
    out: str = ""              # output directory; "" = out/MODEL
    seed: int = 0              # model init and data stream
    device: str = "auto"       # auto | cpu | cuda | cuda:N
    data: str = ""             # a local text file for the bytes setting
    batch_size: int = 0        # global batch in sequences (split across DDP ranks); 0 = setting default
    micro_batch_size: int = 0  # sequences per forward pass per rank; 0 = the whole per-rank batch (no accumulation)
    seq_len: int = 0           # tokens per sequence; 0 = setting default
    lr: float = 3e-3           # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int = 50           # linear warmup steps
    weight_decay: float = 0.1  # AdamW weight decay of matrices (norms, biases, gates: none)
    grad_clip: float = 1.0     # max global gradient norm (inf = no clipping)
    eval_every: int = 0        # steps between evals; 0 = every max(50, steps // 16) steps
    eval_batches: int = 4      # validation batches per eval
    ckpt_every: int = 100      # steps between checkpoints (and at the end)
    log_every: int = 10        # steps between training log lines
    gen_n: int = 32            # prompts per generation eval (models that generate); 0 = no generation eval
    gen_every: int = 0         # steps between generation evals; 0 = every 4th eval (and always at the last step)
    compile: bool = False      # torch.compile the model (CUDA only)
    context_parallel: int = 1  # ranks sharing each sequence (torchrun; world = data x this; context_parallel.py)
    cp_attention: str = "ring"  # attention across them: ring (Ring Attention) | allgather (the reference)
    # valid values, one rule per field ("int >= 1", "one of a|b", ...; after ";" a note); a model's fields have
    # theirs in its own Config.RANGES. build() checks every field once; tests fail on a field without a rule.
    RANGES: ClassVar[dict] = dict(
        model="str; a registered model", setting="str; a data setting", out="str",
        steps="int >= 0; 0 = the setting's default", seed="int in [0, 4294967295]",
        device="str; auto, cpu, cuda or cuda:N", data="path", batch_size="int >= 0; 0 = the setting's default",
        micro_batch_size="int >= 0; 0 = no accumulation", seq_len="int >= 0; 0 = the setting's default, else >= 8",
        lr="float > 0", min_lr_ratio="float in [0, 1]", warmup="int >= 0", weight_decay="float >= 0",
        grad_clip="float in (0, inf]; inf = no clipping", eval_every="int >= 0; 0 = every max(50, steps // 16) steps",
        eval_batches="int >= 1", ckpt_every="int >= 1", log_every="int >= 1",
        gen_n="int >= 0; 0 = no generation eval", gen_every="int >= 0; 0 = 4 x eval_every", compile="bool",
        context_parallel="int >= 1; must divide the torchrun world size", cp_attention="one of ring|allgather")


# SIZES of the evaluation (issue 19: eval + generation <= 10% of a default run, the same statistical power):
# - eval loss: eval_batches=4 batches of the training batch (4 x 16 x 256 tokens). Its standard error, logged as
#   se_eval_loss from the spread of the per-batch losses, was 0.042 nats at step 120 of the default run; the
#   compares are paired (every model sees the same fixed validation batches, whose difficulty is shared and cancels
#   in a difference), so more batches would not change a conclusion, and 4 forward passes cost ~1.3 training steps.
# - generation eval (gen_n=32 prompts per direction, the scored accuracies): the costly part (autoregressive, ~4 s
#   on the default run vs ~0.25 s per step), so it runs every 4th eval and at the last step (gen_every): the final,
#   headline numbers keep all 32 prompts; the curve has a quarter of the points.
# Training defaults per *setting*, never per model: compared models get identical training.
SETTING_DEFAULTS = {
    "chameleon":   dict(seq_len=256, batch_size=16, steps=1800),  # MoT's gain shows after ~3x 600 steps: README
    "speech":      dict(seq_len=256, batch_size=16, steps=1800),
    "transfusion": dict(seq_len=256, batch_size=16, steps=4000),   # diffusion learns to read the caption late: README
    "text":        dict(seq_len=256, batch_size=16, steps=300),
    "bytes":       dict(seq_len=2048, batch_size=4, steps=400),
}


def range_of(cls, name):
    """The rule of field `name` of dataclass `cls` (TrainConfig or a model Config: its RANGES), or None."""
    return getattr(cls, "RANGES", {}).get(name)


def _fits_number(v, kind, cond):
    if isinstance(v, bool) or not isinstance(v, int if kind == "int" else (int, float)):
        return False
    if kind == "float" and (math.isnan(v) or (math.isinf(v) and "inf" not in cond)):
        return False
    if not cond:
        return True
    op, _, rest = cond.partition(" ")
    if op in (">=", ">"):
        return v >= float(rest) if op == ">=" else v > float(rest)
    lo, hi = (float(x) for x in rest[1:-1].split(","))   # "in [lo, hi)" etc.
    return (v >= lo if rest[0] == "[" else v > lo) and (v <= hi if rest[-1] == "]" else v < hi)


def fits(value, rule):
    """Does value satisfy a RANGES rule?"""
    rule = rule.split(";")[0].strip()
    kind, _, cond = rule.partition(" ")
    if kind in ("str", "path"):
        return isinstance(value, str)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "names":
        return isinstance(value, tuple) and all(isinstance(x, str) for x in value)
    if kind == "one":
        return value in cond[len("of "):].split("|")
    if kind in ("ints", "floats"):
        return isinstance(value, tuple) and all(_fits_number(x, kind[:-1], cond) for x in value)
    return _fits_number(value, kind, cond)


def check_ranges(obj, keys=None):
    """Raise a one-line UsageError for the first field of dataclass obj (among keys) outside its RANGES rule."""
    for f in fields(obj):
        if keys is not None and f.name not in keys:
            continue
        rule, v = range_of(type(obj), f.name), getattr(obj, f.name)
        if rule is None:
            raise UsageError(f"{type(obj).__module__}.{type(obj).__name__}.{f.name} has no valid range; "
                             f"add one to {type(obj).__name__}.RANGES")
        if not fits(v, rule):
            shown = ",".join(map(str, v)) if isinstance(v, tuple) else v
            main, _, note = rule.partition(";")
            raise UsageError(f"--{f.name}={shown} is out of range; valid: {main.strip()}"
                             + (f" ({note.strip()})" if note else ""))


def registry():
    """name -> (module, ConfigClass, ModelClass, default setting, Config overrides), from every model file present."""
    reg = {}
    for f in MODEL_FILES:
        if importlib.util.find_spec(f) is not None:
            mod = importlib.import_module(f)
            for name, (cfg_cls, model_cls, setting, over) in getattr(mod, "MODELS", {}).items():
                reg[name] = (mod, cfg_cls, model_cls, setting, over)
    return reg


def supported_settings(name, reg=None):
    """The settings model `name` can use fully (its file's SUPPORTED_SETTINGS), or None when it declares none."""
    mod = (reg or registry())[name][0]
    s = getattr(mod, "SUPPORTED_SETTINGS", {}).get(name)
    return tuple(s) if s is not None else None


# --- command line: --key=value overrides, type-checked ---------------------------------------------------------
def parse_args(argv):
    """argv -> (flags, overrides): flags are the few switches without a value, overrides every --key value."""
    flags, over, i = set(), {}, 0
    while i < len(argv):
        a = argv[i]
        if not a.startswith("--") or a == "--":
            raise UsageError(f"unexpected argument {a!r}; options look like --key=value")
        k = a[2:]
        if "=" in k:
            k, v = k.split("=", 1)
        elif k in ("resume", "help"):
            flags.add(k); i += 1; continue
        elif i + 1 < len(argv):
            v = argv[i + 1]; i += 1
        else:
            raise UsageError(f"--{k} needs a value: --{k}=VALUE")
        over[k.replace("-", "_")] = v
        i += 1
    return flags, over


def convert(key, value, default):
    """Parse a string into the type of `default`, or raise a one-line UsageError."""
    try:
        if isinstance(default, bool):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if isinstance(default, tuple):
            items = [x for x in value.replace("(", "").replace(")", "").split(",") if x.strip()]
            kind = type(default[0]) if default else int
            return tuple(kind(x.strip()) for x in items)
        return type(default)(value)
    except ValueError:
        raise UsageError(f"--{key}={value}: expected a {type(default).__name__} like {default!r}") from None


def apply(obj, over, what, also=()):
    names = {f.name: getattr(obj, f.name) for f in fields(obj)}
    for k, v in over.items():
        if k not in names:
            extra = f"; trainer keys: {', '.join(sorted(also))}" if also else ""
            raise UsageError(f"unknown key --{k} for {what}; valid keys: {', '.join(sorted(names))}{extra}")
        setattr(obj, k, convert(k, v, names[k]) if isinstance(v, str) else v)


def build(name, setting=None, overrides=None, data_file=None, device="cpu", train_overrides=None):
    """-> (model, model_cfg, train_cfg, ds).  overrides: model Config fields; train_overrides: TrainConfig fields.
    Every field is checked against RANGES here, once; bad input raises a one-line UsageError."""
    reg = registry()
    if name not in reg:
        raise UsageError(f"unknown model {name!r}; choose one of {', '.join(sorted(reg))}")
    mod, cfg_cls, model_cls, default_setting, base = reg[name]
    tc = TrainConfig(model=name)
    apply(tc, dict(train_overrides or {}), "the trainer")
    check_ranges(tc)
    tc.setting = setting or tc.setting or default_setting
    if tc.setting not in data.SETTINGS:
        raise UsageError(f"unknown setting {tc.setting!r}; choose one of {', '.join(data.SETTINGS)}")
    ok = supported_settings(name, reg)
    if ok is not None and tc.setting not in ok:
        raise UsageError(f"model {name} does not support --setting {tc.setting}; supported: {', '.join(ok)}")
    for k, v in SETTING_DEFAULTS[tc.setting].items():
        if not getattr(tc, k):
            setattr(tc, k, v)
    tc.eval_every = tc.eval_every or max(50, tc.steps // 16)
    tc.gen_every = tc.gen_every or 4 * tc.eval_every
    data_file = data_file or tc.data or None
    try:
        ds = data.make_data(tc.setting, seq_len=tc.seq_len, seed=tc.seed, data_file=data_file)
    except ValueError as e:
        raise UsageError(str(e)) from None
    cfg = cfg_cls(**base)
    names = {f.name for f in fields(cfg)}
    from_data = {k: v for k, v in ds.model_fields().items() if k in names}
    for k, v in from_data.items():
        setattr(cfg, k, v)
    overrides = dict(overrides or {})
    apply(cfg, overrides, f"model {name}", also={f.name for f in fields(TrainConfig)})
    for k in overrides:
        if k in from_data and getattr(cfg, k) != from_data[k]:
            fix = "set --seq_len (a trainer key)" if k == "seq_len" else "it follows --setting"
            raise UsageError(f"--{k} is set by the data ({from_data[k]} for --setting {tc.setting}); {fix}")
    check_ranges(cfg)
    torch.manual_seed(tc.seed)
    try:
        if hasattr(cfg, "__post_init__"):
            cfg.__post_init__()  # derived fields and checks, after the overrides
        model = model_cls(cfg).to(device)
    except ValueError as e:
        raise UsageError(f"model {name}: {e}") from None
    except (RuntimeError, AssertionError, IndexError, TypeError, ZeroDivisionError) as e:  # a relation no check names
        msg = str(e).splitlines()[0] if str(e) else ""
        raise UsageError(f"model {name} cannot be built with this config ({type(e).__name__}: {msg}); "
                         f"check the sizes given") from None
    return model, cfg, tc, ds


# --- FLOPs: one counting method for all models ------------------------------------------------------------------
def _cpu_sdpa_flops():
    """torch's FLOP counter knows the CUDA attention kernels but not the CPU one. Count it as the math path
    would: 2*T*S*hd for Q K^T and as much for P V forward, twice that backward (like any matmul). Passed to
    FlopCounterMode as custom_mapping (local to train's counter: torch's global registry is left unchanged)."""
    from torch.utils import flop_counter as fc
    aten = torch.ops.aten
    return {aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *a, **kw: fc.sdpa_flop_count(q, k, v),          # shapes (FlopCounterMode's shape_wrapper)
            aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *a, **kw: 2 * fc.sdpa_flop_count(q, k, v)}   # 2x fwd, as for any matmul


def count_flops(model, batches, backward=True, parts=False):
    """FLOPs per input token of one forward (+ backward) pass, counted on a copy of the model and averaged over the
    batches given (a batch or a list: a model whose work depends on the data, like BLT's patches, needs a few):
    matmul FLOPs (torch's FlopCounterMode) + the scans' and FFTs' analytic FLOPs (kernels.flop_tally, which every
    scan entry point and megalodon's FFT convolution report to). -> the total, or with parts=True a dict
    {total, matmul, scan_fft}."""
    from torch.utils.flop_counter import FlopCounterMode
    import kernels
    batches = [batches] if isinstance(batches, dict) else batches
    m = copy.deepcopy(model)
    m.train(backward)
    with torch.random.fork_rng(devices=[]), FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_flops()) as counter, \
            kernels.flop_tally() as tally:
        for batch in batches:
            if backward:
                m(batch)[1].backward()
            else:
                with torch.no_grad():
                    m(batch)
    tokens = sum(b["tokens"].numel() for b in batches)
    matmul, other = counter.get_total_flops() / tokens, tally.flops / tokens
    return dict(total=matmul + other, matmul=matmul, scan_fft=other) if parts else matmul + other


# --- distributed helpers ----------------------------------------------------------------------------------------
def ddp_env():
    """(rank, world, local rank) from torchrun's environment, known before the process group starts."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return (torch.distributed.get_rank(), torch.distributed.get_world_size(),
                int(os.environ.get("LOCAL_RANK", 0)))
    if "RANK" not in os.environ:
        return 0, 1, 0
    return int(os.environ["RANK"]), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def setup_ddp(device):
    """Start the process group under torchrun (unless a caller already did). -> True if this call started it."""
    if "RANK" not in os.environ or torch.distributed.is_initialized():
        return False
    torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return True


def set_cp(model, cp):
    """Hand the context-parallel group to every module that takes one (a `cp` attribute), or None to run alone."""
    for m in model.modules():
        if hasattr(m, "cp"):
            m.cp = cp


def mean_over_ranks(loss, parts, world):
    """The logged train loss and parts as the mean over ranks (= the 1-process value); a part only some ranks report
    is averaged over those."""
    if world == 1:
        return loss, parts
    every = [None] * world
    torch.distributed.all_gather_object(every, dict(parts, _loss=loss))
    mean = {k: sum(d[k] for d in every if k in d) / sum(k in d for d in every) for k in set().union(*every)}
    return mean.pop("_loss"), dict(sorted(mean.items()))


def to(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


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


# --- training ----------------------------------------------------------------------------------------------------
def lr_at(step, tc):
    """Linear warmup, then cosine to lr * min_lr_ratio."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    p = min(1.0, (step - tc.warmup) / max(1, tc.steps - tc.warmup))
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def autocast_for(dev):
    """The training/eval precision context: bf16 autocast on a CUDA GPU that has it, else none (fp32)."""
    if dev.startswith("cuda") and torch.cuda.is_bf16_supported():
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def make_optimizer(model, tc):
    """AdamW (betas 0.9 / 0.95; weight decay on matrices only) and the warm-up + cosine schedule of lr_at."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.95), fused=False)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, tc) / tc.lr)


def clip_grads(model, max_norm):
    """Clip the gradient norm (a model may clip parts apart: MoMa its aux routers) -> the norm before clipping."""
    if hasattr(model, "clip_grad_norm_"):
        return float(model.clip_grad_norm_(max_norm))
    return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))


def evaluate(model, ds, tc, rank, world, device, autocast, micro=None, cp=None):
    """Mean eval loss and parts over tc.eval_batches fixed validation batches of tc.batch_size rows, run in forward
    passes of `micro` rows exactly as training cuts its batches (so 2 ranks x b rows == 1 process x micro-batches of b:
    the same rows in each forward pass, whatever a model's loss does per batch), averaged over passes and ranks."""
    model.eval()
    micro = micro or tc.batch_size // (world // tc.context_parallel)
    accum = tc.batch_size // (world // tc.context_parallel) // micro
    sums, counts, passes = {}, {}, []
    with torch.no_grad(), torch.random.fork_rng(devices=[]), autocast():
        torch.manual_seed(1234)
        for i in range(tc.eval_batches * accum):
            batch = to(ds.get_batch("val", micro, i, rank // tc.context_parallel, world // tc.context_parallel),
                       device)
            _, loss, parts = model(batch) if cp is None else (None, *cp_forward(model, batch, cp)[1:])
            passes.append(float(loss))
            for k, v in {"loss": loss, **parts}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
                counts[k] = counts.get(k, 0) + 1
    mine = {k: v / counts[k] for k, v in sums.items()}
    if world > 1:  # average each key over the ranks that report it (a model may log a part on some ranks only)
        every = [None] * world
        torch.distributed.all_gather_object(every, (mine, passes))
        passes = [x for _, p in every for x in p]
        every = [d for d, _ in every]
        mine = {k: sum(d[k] for d in every if k in d) / sum(k in d for d in every) for k in set().union(*every)}
    out = {f"eval_{k}": float(v) for k, v in sorted(mine.items())}
    if len(passes) > 1:  # the standard error of eval_loss from the spread of its forward passes' losses: how many
        out["se_eval_loss"] = float(np.std(passes, ddof=1) / math.sqrt(len(passes)))  # batches are enough (SIZES)
    if ds.setting == "bytes":
        out["eval_bpb"] = out["eval_loss"] / math.log(2)
    model.train()
    return out


# The generation eval (caption -> image, image -> caption, scored against the scene) exists where there are images.
GEN_EVAL_SETTINGS = ("chameleon", "speech", "transfusion")


def has_gen_eval(model, ds):
    return ds.setting in GEN_EVAL_SETTINGS and (hasattr(model, "gen_metrics") or
                                                (hasattr(model, "generate") and hasattr(ds, "eval_generation")))


def generation_metrics(model, ds, tc):
    if not has_gen_eval(model, ds):
        return {}
    model.eval()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(4321)
        if hasattr(model, "gen_metrics"):
            m = model.gen_metrics(ds, n=tc.gen_n)
        else:
            dev = next(model.parameters()).device
            m = ds.eval_generation(lambda p, n, temp: model.generate(p.to(dev), n, temperature=temp)[:, p.shape[1]:],
                                   n=tc.gen_n)
    model.train()
    return m


def gen_min_seq_len(ds):
    """The shortest seq_len the generation eval fits in: its longest prompt + the tokens it generates
    (image -> caption: <bos> <boi> 16 patches <eoi> + CAPTION_TOKENS; caption -> image: <bos> caption <boi> + 16)."""
    if ds.setting not in ("chameleon", "speech", "transfusion"):
        return 0
    return max(3 + data.N_PATCHES + data.CAPTION_TOKENS, 2 + max(len(e["caption"]) for e in ds.scenes(32)) + data.N_PATCHES)


CP_MODELS = ("mamba", "mom", "megalodon", "dense", "mot")   # token-mean LMs whose sequence mixers take a cp group


def check_context_parallel(name, model, tc, world):
    """--context_parallel N: N divides the world and the sequence; the model splits (and its mixers allow it)."""
    n = tc.context_parallel
    if n == 1:
        return world
    if name not in CP_MODELS:
        raise UsageError(f"--context_parallel works for {', '.join(CP_MODELS)}, not {name}; drop it")
    if world % n:
        raise UsageError(f"--context_parallel={n} must divide the number of ranks ({world}); run torchrun "
                         f"--nproc_per_node=<a multiple of {n}>")
    if tc.seq_len % n:
        raise UsageError(f"--seq_len={tc.seq_len} must be divisible by --context_parallel={n}")
    cfg = model.cfg
    if name == "megalodon" and (tc.seq_len // n) % cfg.chunk_size:
        raise UsageError(f"megalodon's chunk attention stays on one rank only if chunk_size={cfg.chunk_size} divides "
                         f"seq_len / context_parallel = {tc.seq_len // n}; lower --chunk_size or the ranks")
    if name in ("mamba", "mom") and tc.seq_len // n < cfg.d_conv - 1:
        raise UsageError(f"each rank's slice ({tc.seq_len // n} tokens) is shorter than d_conv - 1 = {cfg.d_conv - 1}")
    return world // n


def cp_forward(model, batch, cp):
    """This rank's slice of every sequence through the model -> (its share of the loss, whole-sequence loss, parts)."""
    cfg = getattr(model, "module", model).cfg
    names = tuple(cfg.modality_names[m] if m < len(cfg.modality_names) else f"modality{m}"
                  for m in range(cfg.n_modalities))
    return context_parallel.model_loss(model, batch, cp, names)


def check_run(name, model, tc, ds, world, dev, given=()):
    """Relations between trainer keys (and with the device and world size): one-line UsageError on the first.
    given: the trainer keys the user set (a key that would have no effect is an error naming why)."""
    world = check_context_parallel(name, model, tc, world)   # the batch splits over the data-parallel replicas
    if tc.batch_size % world:
        raise UsageError(f"batch_size={tc.batch_size} does not split over {world} ranks; use a multiple of {world}")
    per_rank = tc.batch_size // world
    if tc.micro_batch_size > per_rank:
        raise UsageError(f"--micro_batch_size={tc.micro_batch_size} is larger than the per-rank batch {per_rank} "
                         f"(--batch_size {tc.batch_size} over {world} rank(s)), so it has no effect; use <= {per_rank}")
    micro = tc.micro_batch_size or per_rank
    if per_rank % micro:
        raise UsageError(f"--micro_batch_size={micro} must divide the per-rank batch {per_rank}")
    if tc.compile and not dev.startswith("cuda"):
        raise UsageError("--compile=True works on CUDA only (the CPU path runs eagerly); drop it or use --device cuda")
    if "gen_n" in given and tc.gen_n and not has_gen_eval(model, ds):
        raise UsageError(f"--gen_n has no effect: {name} on --setting {tc.setting} has no generation eval (it runs "
                         f"on {', '.join(GEN_EVAL_SETTINGS)} for models that generate); drop --gen_n")
    if "gen_every" in given and not (tc.gen_n and has_gen_eval(model, ds)):
        raise UsageError(f"--gen_every has no effect: {name} on --setting {tc.setting} runs no generation eval"
                         + (" (--gen_n=0)" if not tc.gen_n else "") + "; drop --gen_every")
    need = gen_min_seq_len(ds) if tc.gen_n and has_gen_eval(model, ds) else 0
    if tc.seq_len < need:
        raise UsageError(f"--seq_len={tc.seq_len} is too short for the generation eval of setting {tc.setting} "
                         f"(its prompts + outputs take {need} tokens); use --seq_len >= {need} or --gen_n=0")
    return micro


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


def read_jsonl(path):
    """The records of a metrics.jsonl; a partial last line (a run killed mid-write) is dropped."""
    rows = []
    for line in open(path):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def all_finite(params):
    return all(bool(torch.isfinite(p).all()) for p in params)


def train_step(model, batches, opt, sched, tc, autocast, world=1, cp=None):
    """One optimizer step on this rank's micro-batches (already on the device) -> (loss, parts, grad norm, ok).
    Gradients accumulate over the micro-batches (DDP syncs them on the last only); ok: the loss and the gradient norm
    are finite on every rank, and only then do the optimizer and the schedule step."""
    accum, loss_sum, parts_sum = len(batches), 0.0, {}
    for m, batch in enumerate(batches):
        sync = m == accum - 1 or world == 1
        ctx = model.no_sync() if (world > 1 and not sync) else torch.enable_grad()
        with ctx, autocast():
            if cp is None:
                _, loss, parts = model(batch)
                (loss / accum).backward()  # the mean over the global batch
            else:                          # shares sum to the sequence's loss; DDP averages over dp x cp ranks
                share, loss, parts = cp_forward(model, batch, cp)
                (share * cp.size / accum).backward()
        loss_sum += float(loss.detach()) / accum
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0.0) + float(v) / accum
    gnorm = clip_grads(getattr(model, "module", model), tc.grad_clip)
    bad = torch.tensor(float(not (math.isfinite(loss_sum) and math.isfinite(gnorm))))
    if world > 1:  # every rank stops at the same step
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    ok = not bad.item()
    if ok:
        opt.step()
        sched.step()
    opt.zero_grad(set_to_none=True)
    return loss_sum, parts_sum, gnorm, ok


def train(name, over, resume=False, quiet=False):
    """Train one model. over: every --key=value (trainer and model keys mixed). Returns the output dir.
    Everything a user can get wrong is checked before the process group starts (torchrun) and before any file is
    written: one-line UsageError."""
    tc_keys = {f.name for f in fields(TrainConfig)}
    t_over = {k: v for k, v in over.items() if k in tc_keys}
    m_over = {k: v for k, v in over.items() if k not in tc_keys}
    dev = t_over.get("device", "auto")
    if dev not in ("auto", "cpu", "cuda") and not (dev.startswith("cuda:") and dev[5:].isdigit()):
        raise UsageError(f"--device={dev}: choose auto, cpu or cuda")
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device=cuda but no CUDA GPU is visible; use --device=cpu (or auto)")
    rank, world, local = ddp_env()
    if dev == "cuda":
        dev = f"cuda:{local}"
        torch.cuda.set_device(dev)
    t_over["device"] = dev
    model, cfg, tc, ds = build(name, None, m_over, None, dev, t_over)
    out = tc.out = tc.out or os.path.join("out", name)
    micro = check_run(name, model, tc, ds, world, dev, given=set(t_over) - {"device"})
    accum = tc.batch_size // (world // tc.context_parallel) // micro
    config = dict(model=name, setting=tc.setting, train=dataclasses.asdict(tc), model_cfg=dataclasses.asdict(cfg))
    ckpt_path = os.path.join(out, "ckpt.pt")
    ck = load_ckpt(ckpt_path) if resume else None
    if ck is not None:
        check_resume(ck, ckpt_path, name, tc, config)
    check_out(out)
    lock = lock_out(out)
    started = False
    try:
        started = setup_ddp(dev)
        _train(name, model, cfg, tc, ds, config, ck, micro, accum, rank, world, local, quiet)
    finally:
        if lock:
            with contextlib.suppress(OSError):
                os.remove(lock)
        if started:
            torch.distributed.destroy_process_group()
    return out


def _train(name, model, cfg, tc, ds, config, ck, micro, accum, rank, world, local, quiet):
    out, dev = tc.out, tc.device
    ckpt_path = os.path.join(out, "ckpt.pt")
    metrics_path = os.path.join(out, "metrics.jsonl")
    if rank == 0:
        for f in os.listdir(out):  # a run killed while saving leaves its temp file: remove it (we hold the lock)
            if f.startswith("ckpt.pt.tmp"):
                os.remove(os.path.join(out, f))
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
        if not quiet:
            print(json.dumps(config))
    autocast = autocast_for(dev)
    raw = model
    n_params = sum(p.numel() for p in model.parameters())
    try:  # the first forward/backward passes: a config or setting the model cannot run fails here, in one line
        fl = count_flops(model, [to(ds.get_batch("train", micro, i), dev) for i in range(4)], parts=True)
        flops_per_token, matmul_per_token = fl["total"], fl["matmul"]
    except (RuntimeError, ValueError, IndexError, AssertionError, KeyError, TypeError) as e:
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise UsageError(f"{name} cannot run on --setting {tc.setting} with this config ({type(e).__name__}: {msg})"
                         + (f"; supported settings: {', '.join(supported_settings(name))}" if supported_settings(name)
                            else "")) from None
    opt, sched = make_optimizer(model, tc)
    step, elapsed = 0, 0.0
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        step, elapsed = ck["step"], ck["time"]
        set_rng_state(ck["rng"])
    last_good = step if ck is not None else None
    cp = None
    if tc.context_parallel > 1:  # after count_flops (one process's FLOPs per token); every rank makes the groups
        cp, _ = context_parallel.make_groups(tc.context_parallel)
        cp.attention_impl = tc.cp_attention
        set_cp(raw, cp)
    dp_rank, dp_world = rank // tc.context_parallel, world // tc.context_parallel
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local] if dev.startswith("cuda") else None,
                                                          find_unused_parameters=True)
    if tc.compile and dev.startswith("cuda"):
        model = torch.compile(model)
    if rank == 0:  # on resume, drop log lines written after the checkpoint (they will be written again)
        old = read_jsonl(metrics_path) if (ck is not None and os.path.exists(metrics_path)) else []
        with open(metrics_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in old if r.get("step", 0) <= step)
    log = open(metrics_path, "a") if rank == 0 else None
    tokens_per_step = tc.batch_size * tc.seq_len

    def write(rec):
        if log:
            log.write(json.dumps(rec) + "\n"); log.flush()

    def diverged(what):
        kept = (f"the last good checkpoint (step {last_good}) is kept in {ckpt_path}" if last_good is not None
                else "no checkpoint was written")
        return Diverged(f"step {step}: {what} is not finite, the run stopped; {kept}; lower --lr (now {tc.lr:g}) "
                        f"or --grad_clip (now {tc.grad_clip:g}) and start again")

    spent = dict(eval=0.0, generation=0.0, checkpoints=0.0)  # wall seconds outside the training steps

    def timed(what):
        t = time.perf_counter()
        return lambda: spent.__setitem__(what, spent[what] + time.perf_counter() - t)

    def checkpoint():
        nonlocal last_good
        done = timed("checkpoints")
        if not all_finite(raw.parameters()):  # never write NaN weights over a good checkpoint
            raise diverged("a weight")
        if rank == 0:
            save_ckpt(ckpt_path, dict(model=raw.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                                      step=step, time=elapsed, config=config, rng=rng_state(), data_position=step,
                                      flops_per_token=flops_per_token, flops_matmul_per_token=matmul_per_token))
        last_good = step
        if world > 1:
            torch.distributed.barrier()
        done()

    def eval_now(gen=True):
        rec = dict(step=step, tokens=step * tokens_per_step, flops=step * tokens_per_step * flops_per_token,
                   flops_matmul=step * tokens_per_step * matmul_per_token)
        done = timed("eval")
        rec.update(evaluate(model, ds, tc, rank, world, dev, autocast, micro, cp))
        done()
        if not math.isfinite(rec["eval_loss"]):
            raise diverged("the eval loss")
        if rank == 0 and tc.gen_n and gen:
            done = timed("generation")
            set_cp(raw, None)                                       # generation runs on rank 0 alone
            rec.update(generation_metrics(raw, ds, tc))
            set_cp(raw, cp)
            done()
        write(rec)
        return rec

    if not quiet and rank == 0:
        print(f"{name} on {tc.setting}: {n_params / 1e6:.3f}M params, {flops_per_token / 1e6:.3f} MFLOPs/token "
              f"(fwd+bwd: {matmul_per_token / 1e6:.3f} matmul + {fl['scan_fft'] / 1e6:.3f} scan/FFT), "
              f"{world} rank(s) x {accum} micro-step(s) of {micro} x {tc.seq_len}, device {dev}")
    from tqdm import tqdm
    bar = tqdm(total=tc.steps, initial=step, disable=quiet or rank != 0 or not sys.stderr.isatty(), dynamic_ncols=True,
               leave=False)
    model.train()
    t_start, step0 = time.perf_counter(), step
    batches = Prefetch(ds, micro, dp_rank, dp_world, step * accum, tc.steps * accum, pin=dev.startswith("cuda"))
    try:
        while step < tc.steps:
            t0 = time.perf_counter()
            micro_batches = [to(batches.get(step * accum + m), dev) for m in range(accum)]
            loss_sum, parts_sum, gnorm, ok = train_step(model, micro_batches, opt, sched, tc, autocast, world, cp)
            if not ok:
                step += 1
                raise diverged(f"the loss ({loss_sum:.4g}) or the gradient norm ({gnorm:.4g})")
            step += 1
            dt = time.perf_counter() - t0
            elapsed += dt
            bar.update(1)
            if step % tc.log_every == 0 or step == tc.steps:
                loss_sum, parts_sum = mean_over_ranks(loss_sum, parts_sum, world)
                write(dict(step=step, tokens=step * tokens_per_step, flops=step * tokens_per_step * flops_per_token,
                           flops_matmul=step * tokens_per_step * matmul_per_token, time=elapsed, lr=lr_at(step - 1, tc),
                           loss=loss_sum, **parts_sum))
                if not quiet and rank == 0:
                    bar.write(f"step {step} | loss {loss_sum:.4f} | lr {lr_at(step - 1, tc):.2e} | "
                              f"grad norm {gnorm:.3f} | {dt * 1000:.1f} ms/step | {tokens_per_step / dt:,.0f} tokens/s")
            if step % tc.eval_every == 0 or step == tc.steps:
                rec = eval_now(gen=step % tc.gen_every == 0 or step == tc.steps)
                if not quiet and rank == 0:
                    bar.write("eval " + " | ".join(f"{k} {v:.4g}" for k, v in rec.items()
                                                 if k not in ("tokens", "flops", "flops_matmul")))
            if step % tc.ckpt_every == 0 or step == tc.steps:
                checkpoint()
    finally:
        batches.close()
    bar.close()
    set_cp(raw, None)                                               # the end-of-run figures run on rank 0 alone
    if rank == 0:
        log.close()
        figures(lambda plots: plots.plot_run(out), "loss curve")
        figures(lambda plots: plots.model_figures(raw, ds, out), "model figures")
        if not quiet:
            wall = time.perf_counter() - t_start
            steps_s = wall - sum(spent.values())
            print(f"done: {step} steps. this run: {wall:.1f}s wall = {step - step0} training steps {steps_s:.1f}s "
                  f"({1000 * steps_s / max(1, step - step0):.0f} ms/step) + eval {spent['eval']:.1f}s + generation eval "
                  f"{spent['generation']:.1f}s + checkpoints {spent['checkpoints']:.1f}s")
            print(f"log: {metrics_path}  plot: {os.path.join(out, 'loss.png')}  checkpoint: {ckpt_path}")
    if world > 1:
        torch.distributed.barrier()


# --- plots and --compare -----------------------------------------------------------------------------------------
def read_metrics(out):
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    return [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]


def figures(draw, what):
    """draw(plots) with plots.py imported lazily (its plotting library loads only to draw); a failure prints one warning
    line and never costs a finished run."""
    try:
        import plots
        draw(plots)
    except Exception as e:  # noqa: BLE001 -- the run's outputs are written already
        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        print(f"warning: the {what} figure failed ({type(e).__name__}: {msg}); the run's outputs are complete")


def flops_to_reach(ev, key, target):
    """First training FLOPs at which the eval curve reaches `target` (linear interpolation), or None."""
    prev = None
    for r in ev:
        if key in r and r[key] <= target:
            if prev is None or prev[key] == r[key]:
                return r["flops"]
            f = (prev[key] - target) / (prev[key] - r[key])
            return prev["flops"] + f * (r["flops"] - prev["flops"])
        if key in r:
            prev = r
    return None


def compare(names, over, base_out):
    reg = registry()
    for n in names:
        if n not in reg:
            raise UsageError(f"unknown model {n!r} in --compare; choose from {', '.join(sorted(reg))}")
    # each key goes to every model whose Config has it; train keys go to all; a key nobody has is an error
    tc_keys = {f.name for f in fields(TrainConfig)}
    per = {n: {k: v for k, v in over.items() if k in tc_keys or k in {f.name for f in fields(reg[n][1])}} for n in names}
    for k in over:
        if not any(k in p for p in per.values()):
            raise UsageError(f"--{k} is not a key of the trainer or of any of {', '.join(names)}")
    settings = {over.get("setting") or reg[n][3] for n in names}
    if len(settings) > 1:
        raise UsageError(f"--compare: the models default to different settings ({', '.join(sorted(settings))}); "
                         f"add --setting NAME")
    setting = settings.pop()
    for n in names:  # every model's values are checked before the first one trains for minutes
        build(n, None, {k: v for k, v in per[n].items() if k not in tc_keys}, None, "cpu",
              {**{k: v for k, v in per[n].items() if k in tc_keys and k != "device"}, "setting": setting})
    for n in names:
        print(f"=== {n} ===", flush=True)
        train(n, {**per[n], "setting": setting, "out": os.path.join(base_out, n)})
    figures(lambda plots: plots.plot_compare(base_out, names), "compare")
    summary = summarize(names, base_out)
    if os.path.exists(os.path.join(base_out, "compare.png")):
        print(f"plot: {os.path.join(base_out, 'compare.png')}")
    return summary


def summarize(names, base_out):
    """The FLOPs each of names[1:] needs to reach names[0]'s final eval losses, from the finished runs in
    base_out/NAME: printed, written to base_out/compare.json and returned. `python plots.py compare` calls it too."""
    runs = {n: read_metrics(os.path.join(base_out, n))[1] for n in names}
    for n, ev in runs.items():
        if not ev:
            raise UsageError(f"{os.path.join(base_out, n)} has no eval rows yet; let its run reach an eval")
    keys = [k for k in runs[names[0]][-1] if k.startswith("eval_loss") or k == "eval_bpb"]
    if "eval_bpb" in keys:  # bytes: one modality, and bpb says it all
        keys = ["eval_bpb"]
    first = runs[names[0]]
    total = first[-1]["flops"]
    summary = {}
    print(f"\nFLOPs each model needs to reach {names[0]}'s final eval loss (fraction of {names[0]}'s {total:.3g} FLOPs):")
    for k in keys:
        target = first[-1][k]
        for n in names[1:]:
            f = flops_to_reach(runs[n], k, target)
            summary[f"{n}/{k}"] = None if f is None else f / total
            final = runs[n][-1].get(k, float("nan"))
            print(f"  {k:18s} {n:16s} " + (f"{100 * f / total:6.1f}%" if f is not None else "not reached") +
                  f"   (final {final:.4f} vs {names[0]} {target:.4f})")
    with open(os.path.join(base_out, "compare.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


# --- --help: generated from the code (Config comments, MODELS lines, data's docstring), so it cannot drift ----------
def field_comments(cls):
    """field -> the comment on its line in the class source (continuation comment lines joined)."""
    import inspect
    import re
    out, last, indent = {}, None, 0
    for line in inspect.getsource(cls).splitlines()[1:]:
        if line.strip().startswith(("def ", "@")):
            break
        m = re.match(r"^(\s+)(\w+)\s*:\s*[^=#]+=[^#]*?(?:#\s*(.*))?$", line)
        c = re.match(r"^(\s+)#\s*(.*)$", line)
        if m:
            last, indent = m.group(2), len(m.group(1))
            out[last] = (m.group(3) or "").strip()
        elif c and last and len(c.group(1)) > indent:
            out[last] += " " + c.group(2).strip()
        else:
            last = None
    return out


def model_descriptions(reg):
    """name -> one line: the comment on the model's MODELS line, else its class docstring's first line."""
    import inspect
    import re
    out = {}
    for name, (mod, cfg_cls, model_cls, setting, over) in reg.items():
        src = inspect.getsource(mod)
        m = re.search(r'^\s*"' + re.escape(name) + r'"\s*:\s*\(.*?#\s*(.*)$', src, re.M)
        doc = (model_cls.__doc__ or model_cls.__name__).strip().split(". ")[0].splitlines()[0].rstrip(".")
        if m:
            out[name] = m.group(1).strip()
        else:  # the class's first sentence + the registered overrides that differ from the Config defaults
            base = cfg_cls()
            diff = [f"{k}={v}" for k, v in over.items() if getattr(base, k, None) != v]
            out[name] = f"{model_cls.__name__} with {', '.join(diff)}" if diff else doc
        if len(out[name]) > 86:
            out[name] = out[name][:83] + "..."
    return out


def _key_lines(cls, obj, skip=()):
    notes = field_comments(cls)
    lines = []
    for f in fields(obj):
        if f.name in skip:
            continue
        v = getattr(obj, f.name)
        shown = ",".join(map(str, v)) if isinstance(v, tuple) else v
        rule = (range_of(cls, f.name) or "").split(";")[0].strip()
        lines.append(f"  --{f.name}={shown}".ljust(34) + f" {notes.get(f.name, '')}" + (f"  [{rule}]" if rule else ""))
    return lines


def help_text(model=None):
    reg = registry()
    usage = ["usage: python train.py [--model NAME] [--setting NAME] [--KEY=VALUE ...] [--resume]   train one model",
             "       python train.py --compare A,B[,C...] [--setting NAME] [--KEY=VALUE ...]   same data and training",
             "       python train.py --help [--model NAME]                                   this text / a model's keys",
             "       torchrun --nproc_per_node=N train.py ...   DDP (gloo on CPU, nccl on CUDA); on a bad value torchrun",
             "       prints its own failure summary after the one-line error"]
    if model is not None:
        if model not in reg:
            raise UsageError(f"unknown model {model!r}; choose one of {', '.join(sorted(reg))}")
        mod, cfg_cls, model_cls, setting, over = reg[model]
        cfg = cfg_cls(**over)
        data_keys = {"vocab_size", "n_modalities", "modality_offsets", "modality_names", "seq_len", "bos_id", "boi_id",
                     "eoi_id", "sep_id", "pad_id", "patch_dim", "n_patches", "image_size", "channels"}
        if setting == "transfusion" or model.startswith(("transfusion", "lmfusion")):
            data_keys.add("patch_size")
        ok = supported_settings(model, reg) or data.SETTINGS
        return "\n".join(usage + ["", f"{model}: {model_descriptions(reg)[model]}",
                                  f"file {mod.__name__}.py, default setting {setting}, settings: {', '.join(ok)}",
                                  "", f"{model} keys (default, what it does, [valid range]):"]
                         + _key_lines(cfg_cls, cfg, skip=data_keys)
                         + ["", "set by the data (follow --setting / --seq_len): "
                            + ", ".join(f.name for f in fields(cfg) if f.name in data_keys),
                            "", "trainer keys: python train.py --help"])
    desc = model_descriptions(reg)
    lines = usage + ["", "models (default setting: what it is; python train.py --help --model NAME lists its keys):"]
    lines += [f"  {n:18s} {reg[n][3]:12s} {desc[n]}" for n in reg]
    lines += ["", "settings (--setting; data.py):"]
    for st in data.SETTINGS:
        m = [l.strip()[len(st):].strip() for l in (data.__doc__ or "").splitlines() if l.strip().startswith(st + " ")]
        lines.append(f"  {st:12s} {m[0] if m else ''}")
    lines += ["", "trainer keys (default, what it does, [valid range]):"] + _key_lines(TrainConfig, TrainConfig())
    lines += ["", "outputs in --out (default out/MODEL): config.json, metrics.jsonl, ckpt.pt, loss.png"]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        flags, over = parse_args(argv)
        if "help" in flags:
            print(help_text(over.get("model")))
            return 0
        if "compare" in over:
            names = [n for n in over.pop("compare").split(",") if n]
            if len(names) < 2:
                raise UsageError("--compare needs at least two models, e.g. --compare dense,mot")
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise UsageError(f"--compare names {', '.join(dup)} twice; each model runs once (into OUT/NAME)")
            if "resume" in flags:
                raise UsageError("--resume is not supported with --compare; resume each run with --model NAME --out DIR/NAME")
            compare(names, over, over.pop("out", "") or os.path.join("out", "compare"))
        else:
            train(over.pop("model", TrainConfig.model), over, resume="resume" in flags)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
