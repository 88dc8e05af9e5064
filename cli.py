"""cli.py -- train.py's command line and guard rails: everything a user can get wrong, checked once, before training.

`--key=value` (or `--key value`) overrides a field of train.TrainConfig or of the model's Config, converted to the type
of its default (parse_args, convert, apply). Each field's valid range is written once, in its class's RANGES
("int >= 1", "one of a|b", "float in (0, 1]"; after ";" a note): check_ranges checks a config against it and --help
prints it. Relations between fields live in a model Config's __post_init__ or in check_run here. Every bad value is
one line `error: ...` and exit status 2 (UsageError). Also here: the device and precision a run gets, the FLOPs a step
costs (count_flops), and torchrun's plumbing (the process group, the context-parallel group, every collective on a
tensor on the training device). The method is in train.py and the model files; none of it is here.
"""
import contextlib
import copy
import importlib
import importlib.util
import inspect
import math
import os
import re
import shutil
import textwrap
import warnings
from dataclasses import fields

import torch

import context_parallel
import data

MODEL_FILES = ("mot", "mom", "moma", "transfusion", "megabyte", "blt", "megalodon")


class UsageError(Exception):
    """Bad input: printed as one line, exit status 2."""


class Diverged(UsageError):
    """A non-finite loss, gradient or weight: the run stops before it can overwrite a good checkpoint (exit 2)."""


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
    if s is not None and "bytes" in s:   # a byte model reads realtext too: real English instead of the synthetic bytes
        s = (*s, "realtext")
    return tuple(s) if s is not None else None


# --- valid ranges: one rule per field, in its class's RANGES ---------------------------------------------------------
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


# --- command line: --key=value overrides, type-checked ---------------------------------------------------------------
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
    """Set the fields of dataclass obj from over (strings are converted); an unknown key is a one-line error."""
    names = {f.name: getattr(obj, f.name) for f in fields(obj)}
    for k, v in over.items():
        if k not in names:
            extra = f"; trainer keys: {', '.join(sorted(also))}" if also else ""
            raise UsageError(f"unknown key --{k} for {what}; valid keys: {', '.join(sorted(names))}{extra}")
        setattr(obj, k, convert(k, v, names[k]) if isinstance(v, str) else v)


# --- building: the checks of train.build ---------------------------------------------------------------------------
def check_model(name, reg):
    if name not in reg:
        raise UsageError(f"unknown model {name!r}; choose one of {', '.join(sorted(reg))}")


def check_setting(name, setting, reg):
    if setting not in data.SETTINGS:
        raise UsageError(f"unknown setting {setting!r}; choose one of {', '.join(data.SETTINGS)}")
    ok = supported_settings(name, reg)
    if ok is not None and setting not in ok:
        raise UsageError(f"model {name} does not support --setting {setting}; supported: {', '.join(ok)}")


def make_data(setting, seq_len=None, seed=0, data_file=None):
    """data.make_data (seq_len None: the data's default), its errors as one line."""
    try:
        return data.make_data(setting, **({} if seq_len is None else dict(seq_len=seq_len)), seed=seed,
                              data_file=data_file)
    except ValueError as e:
        raise UsageError(str(e)) from None


def model_config(name, ds, overrides, reg, trainer_keys=()):
    """The checked Config of model `name`: its registered overrides, the fields the data sets (vocabulary, modalities,
    seq_len), then the user's overrides, each field inside its RANGES rule."""
    _, cfg_cls, _, _, base = reg[name]
    cfg = cfg_cls(**base)
    names = {f.name for f in fields(cfg)}
    from_data = {k: v for k, v in ds.model_fields().items() if k in names}
    for k, v in from_data.items():
        setattr(cfg, k, v)
    overrides = dict(overrides or {})
    apply(cfg, overrides, f"model {name}", also=trainer_keys)
    for k in overrides:
        if k in from_data and getattr(cfg, k) != from_data[k]:
            fix = "set --seq_len (a trainer key)" if k == "seq_len" else "it follows --setting"
            raise UsageError(f"--{k} is set by the data ({from_data[k]} for --setting {ds.setting}); {fix}")
    check_ranges(cfg)
    return cfg


def make_model(name, cfg, device, reg):
    """The model of a checked Config; a relation between fields that fails is one line naming the model."""
    try:
        if hasattr(cfg, "__post_init__"):
            cfg.__post_init__()  # derived fields and checks, after the overrides
        return reg[name][2](cfg).to(device)
    except ValueError as e:
        raise UsageError(f"model {name}: {e}") from None
    except (RuntimeError, AssertionError, IndexError, TypeError, ZeroDivisionError) as e:  # a relation no check names
        msg = str(e).splitlines()[0] if str(e) else ""
        raise UsageError(f"model {name} cannot be built with this config ({type(e).__name__}: {msg}); "
                         f"check the sizes given") from None


def diverged(step, what, last_good, ckpt_path, tc):
    """The error that stops a run whose loss, gradient or weights are not finite, before a checkpoint is written."""
    kept = (f"the last good checkpoint (step {last_good}) is kept in {ckpt_path}" if last_good is not None
            else "no checkpoint was written")
    return Diverged(f"step {step}: {what} is not finite, the run stopped; {kept}; lower --lr (now {tc.lr:g}) "
                    f"or --grad_clip (now {tc.grad_clip:g}) and start again")


def step_failure(loss, gnorm, scaler):
    """What is not finite in a training step that train_step reports not ok (for diverged)."""
    if scaler is not None and math.isfinite(loss):
        return "the fp16 gradient (it overflowed until the loss scale fell below 1)"
    return f"the loss ({loss:.4g}) or the gradient norm ({gnorm:.4g})"


RUN_ERRORS = (RuntimeError, ValueError, IndexError, AssertionError, KeyError, TypeError)


def cannot_run(name, setting, e, dev="cpu"):
    """The one-line error for a model whose first forward/backward passes fail on this setting and config."""
    msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    ok = supported_settings(name)
    return UsageError(f"{name} cannot run on --setting {setting} with this config ({type(e).__name__}: {msg})"
                      + (f"; supported settings: {', '.join(ok)}" if ok else "")
                      + ("; on mps an operation it lacks may be the cause: try --device=cpu" if dev == "mps" else ""))


# --- sizes: what a run needs, estimated from the config alone before any data, model or file is made ---------------
MEMORY_NOTE = ("counted: weights, gradients and AdamW's two moments (4 x 4 bytes a parameter) + one micro-batch's "
               "activations and backward temporaries (about 2 x (10 x width + 4 x FFN width) floats a token and layer, "
               "+ 6 x the logits); not counted: attention scores, the data, allocator slack")


def _ffn(d, hidden=0):       # SwiGLU's default hidden size: 8/3 d rounded up to 16 (mot.py, moma.py)
    return hidden or 16 * math.ceil(8 * d / 3 / 16)


def _mamba_sizes(c, d, layers, split):
    """(params, activation floats a token) of `layers` Mamba blocks of width d (mom.py); split: the copies of its
    in, x, dt and out projections (1 each = Mamba)."""
    di, n, r = getattr(c, "expand", 2) * d, getattr(c, "d_state", 16), getattr(c, "dt_rank", 0) or math.ceil(d / 16)
    s_in, s_x, s_dt, s_out = split
    per = s_in * d * 2 * di + s_x * di * (r + 2 * n) + s_dt * (r + 1) * di + s_out * di * d
    per += di * (getattr(c, "d_conv", 4) + n + 2) + d
    return layers * per, layers * (8 * di + di * n + 3 * d)


def size_estimate(cfg):
    """A model Config -> (parameters, activation floats per token of one forward + backward, vocabulary for the
    logits): a rough count of the dominant terms of each model family, from the fields alone (no model is built)."""
    c, kind = cfg, type(cfg).__module__
    g = lambda k, d=0: getattr(c, k, d)
    V = g("vocab_size", 256)
    if kind == "megabyte":
        W, DL, m = c.patch_size * c.d_global, c.d_local, c.mlp_ratio
        p = c.n_layer_global * (4 + 2 * m) * W * W + c.n_layer_local * (4 + 2 * m) * DL * DL
        p += (V + c.seq_len + c.patch_size) * c.d_global + (2 * V + c.d_global) * DL
        act = c.n_layer_global * (9 + 2 * m) * W / c.patch_size + c.n_layer_local * (9 + 2 * m) * DL
        return p, act, V
    if kind == "blt" and hasattr(c, "d_global"):
        D, G, K = c.d_local, c.d_global, c.cross_k
        local = c.n_layer_enc + c.n_layer_dec
        p = (2 * V + c.hash_functions * len(c.hash_ngrams) * c.hash_vocab) * D + local * 12 * D * D
        p += (1 + c.n_layer_dec) * 4 * D * D + K * D * (D + 2 * G) + c.n_layer_global * 12 * G * G
        act = local * 17 * D + 3 * K * D + c.n_layer_global * 17 * G / c.patch_size
        return p, act, V
    if kind == "megalodon":
        D, z, v, f = c.d_model, c.z_dim, c.v_dim, c.ffn_dim
        per = D * (z + 2 * v + D) + v * D + (3 if c.swiglu else 2) * D * f + 4 * D * c.cema_ndim
        p = c.n_layers * per + (1 if c.share_emb else 2) * V * D
        return p, c.n_layers * (8 * D + 2 * D * c.cema_ndim + 2 * z + 3 * v + 4 * f), V
    D, L, M = g("d_model", 64), g("n_layer", 2), g("n_modalities", 1)
    backbone = g("backbone", "mom" if kind == "mom" else "dense")
    if backbone in ("mamba", "mom"):
        split = [M if (g(f"split_{k}_proj") if kind == "mom" else backbone == "mom") else 1
                 for k in ("in", "x", "dt", "out")]
        p, act = _mamba_sizes(c, D, L, split)
        p += (1 if g("tie_embeddings", True) else 2) * V * D
    else:
        F = _ffn(D, g("ffn_hidden"))
        attn = (M if g("untie_attn") or backbone == "mot" else 1) * 4 * D * D
        if hasattr(c, "group_experts"):                                # moma: every group's experts + routers
            ffn = sum(c.group_experts) * (3 * D * c.d_expert + D + g("aux_hidden", 0) * (D + 1))
        else:
            ffn = (M if g("untie_ffn") or backbone == "mot" else 1) * 3 * D * F
        p, act = L * (attn + ffn) + 2 * V * D, L * (10 * D + 4 * F)
    if kind == "transfusion":                                            # the patch codec and the timestep MLP
        p += 2 * g("patch_dim") * D + 2 * D * D + g("n_patches") * D
        if g("patch_codec") == "unet":
            p += 40 * g("unet_channels") ** 2 * 9 + 4 * g("unet_channels") * D
    return p, act, V


def _free_host_memory():
    """Bytes of host memory free for a new process: /proc/meminfo's MemAvailable (Linux), within a cgroup v2 limit
    where there is one; else os.sysconf's free (or, failing that, total) pages; None where the platform tells none."""
    free = None
    with contextlib.suppress(OSError, ValueError, IndexError, StopIteration):
        with open("/proc/meminfo") as f:
            free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    for name in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):
        if free is None:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                free = os.sysconf(name) * os.sysconf("SC_PAGE_SIZE")
    with contextlib.suppress(OSError, ValueError):                      # a container's memory limit (cgroup v2)
        with open("/sys/fs/cgroup/memory.max") as lim, open("/sys/fs/cgroup/memory.current") as cur:
            left = int(lim.read()) - int(cur.read())                    # "max" (no limit) -> ValueError
            free = left if free is None else min(free, left)
    return free


def free_memory(dev):
    """Bytes free on the training device: a GPU's free memory (torch.cuda.mem_get_info), else the host's."""
    if dev.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(dev))[0]
    return _free_host_memory()


def _gb(n):
    return f"{n / 1e9:.3g} GB"


def check_size(name, tc, overrides, reg, dev):
    """Before the data and the model are made: the sizes a run asks for must make sense for expert choice and fit the
    machine: weights + gradients + AdamW moments + one micro-batch's activations within the device's free memory
    (every process on the host counted), the checkpoint within the free disk of --out. --force_memory skips the two
    fits. Fields that are out of range or unknown are left to model_config, which names them."""
    _, cfg_cls, _, _, base = reg[name]
    try:
        cfg = cfg_cls(**base)
        apply(cfg, {k: v for k, v in (overrides or {}).items() if k != "seq_len"}, f"model {name}")
        if hasattr(cfg, "seq_len"):
            cfg.seq_len = tc.seq_len
        check_ranges(cfg)
    except UsageError:
        return
    _, world, _ = ddp_env()
    dp = max(1, world // tc.context_parallel)
    rows, seq = tc.micro_batch_size or max(1, tc.batch_size // dp), max(1, tc.seq_len // tc.context_parallel)
    capacity = getattr(cfg, "capacity_factor", 0) * rows * seq
    if hasattr(cfg, "group_experts") and max(cfg.group_experts) > capacity:
        raise UsageError(f"{name}: expert choice gives each expert ceil(capacity_factor x T_m / E_m) of the T_m tokens "
                         f"of its group in a forward pass; experts={max(cfg.group_experts)} exceeds capacity_factor x "
                         f"micro-batch x seq_len = {cfg.capacity_factor:g} x {rows} x {seq} = {capacity:g}, so every "
                         f"expert takes a token past its capacity: use fewer experts or more tokens per forward pass")
    if tc.force_memory:
        return
    params, act, vocab = size_estimate(cfg)
    need = 16 * params + 8 * rows * seq * (act + 3 * vocab)   # x 2: backward's temporaries beside what it keeps
    procs = 1 if dev.startswith("cuda") else int(os.environ.get("LOCAL_WORLD_SIZE", 1))   # ranks sharing the host
    free = free_memory(dev)
    if free is not None and need * procs > free:
        what = f"{params:.3g} parameters, {rows} x {seq} tokens a micro-batch" + (f", {procs} processes" * (procs > 1))
        raise UsageError(f"{name} needs about {_gb(need * procs)} of memory by the up-front estimate ({what}) but "
                         f"{dev.split(':')[0]} has {_gb(free)} free; lower the sizes, --batch_size, --micro_batch_size "
                         f"or --seq_len, or pass --force_memory=True to start anyway (counted: weights, gradients, "
                         f"AdamW's moments, one micro-batch's activations; --help tells how)")
    out = tc.out or os.path.join("out", name)
    where = os.path.abspath(out)
    while not os.path.isdir(where) and os.path.dirname(where) != where:
        where = os.path.dirname(where)
    with contextlib.suppress(OSError):
        disk = shutil.disk_usage(where).free
        if 12 * params > disk:
            raise UsageError(f"the checkpoint of {name} (about {_gb(12 * params)}: weights and AdamW's two moments) "
                             f"does not fit the {_gb(disk)} free at {where}; choose another --out, free space, or "
                             f"pass --force_memory=True to start anyway")


# --- FLOPs: what a step costs, counted on the model (train.py records them: --compare's x axis) ----------------------
def count_flops(model, batches, backward=True, parts=False):
    """FLOPs per token of one forward (+ backward) pass on a copy of the model, averaged over the batches: the matmuls
    torch's FlopCounterMode counts (attention with its full T x T scores) + the scans' and FFTs' analytic FLOPs
    (kernels.flop_tally; backward 2x forward), on the torch paths (the counter cannot see inside a Triton kernel).
    Sparse models pay for what they run; norms, activations are not counted. parts=True: {total, matmul, scan_fft}."""
    from torch.utils import flop_counter as fc
    import kernels
    aten = torch.ops.aten  # the counter knows the CUDA attention kernels; count the CPU one as the math path would
    cpu_sdpa = {aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, **kw: fc.sdpa_flop_count(q, k, v),
                aten._scaled_dot_product_flash_attention_for_cpu_backward:
                lambda g, q, k, v, *a, **kw: 2 * fc.sdpa_flop_count(q, k, v)}   # backward: 2x forward, as any matmul
    batches = [batches] if isinstance(batches, dict) else batches
    m = copy.deepcopy(model)
    m.train(backward)
    with fork_rng(next(m.parameters()).device), kernels.torch_paths(), kernels.flop_tally() as tally, \
            fc.FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter:
        for batch in batches:
            if backward:
                m(batch)[1].backward()
            else:
                with torch.no_grad():
                    m(batch)
    tokens = sum(b["tokens"].numel() for b in batches)
    matmul, other = counter.get_total_flops() / tokens, tally.flops / tokens
    return dict(total=matmul + other, matmul=matmul, scan_fft=other) if parts else matmul + other


# --- relations between trainer keys, the device and the world size -------------------------------------------------
def ddp_env():
    """(rank, world, local rank) from torchrun's environment, known before the process group starts."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    if "RANK" not in os.environ:
        return 0, 1, 0
    return int(os.environ["RANK"]), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def resolve_device(dev, local):
    """--device (auto | cpu | cuda | cuda:N | mps) -> the device this rank uses, or a one-line error. auto picks CUDA
    where there is a GPU, else the CPU: never Apple's mps, which is asked for by name."""
    if dev not in ("auto", "cpu", "cuda", "mps") and not (dev.startswith("cuda:") and dev[5:].isdigit()):
        raise UsageError(f"--device={dev}: choose auto, cpu or cuda (cuda:N for one GPU, mps on Apple silicon)")
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device=cuda but no CUDA GPU is visible; use --device=cpu (or auto)")
    if dev == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device=mps but this machine has no Apple-silicon GPU that torch can use "
                         "(torch.backends.mps.is_available() is False); use --device=cpu (or auto)")
    if dev == "cuda":
        dev = f"cuda:{local}"
        torch.cuda.set_device(dev)
    return dev


def resolve_precision(precision, dev):
    """--precision (auto | fp32 | bf16 | fp16) on device dev -> "fp32", "bf16" or "fp16", or a one-line error.
    auto: bf16 autocast on a GPU that has bf16 natively (compute capability >= 8.0), fp16 autocast with a gradient
    scaler on older GPUs (T4 = 7.5, V100 = 7.0: their bf16 is emulated), fp32 on the CPU and on mps. fp16 and bf16
    may be forced on the CPU (its autocast has both; slow, for testing)."""
    kind = dev.split(":")[0]
    cap = tuple(torch.cuda.get_device_capability(dev)) if kind == "cuda" else None
    if precision == "auto":
        return "fp32" if cap is None else "bf16" if cap >= (8, 0) else "fp16"
    if precision == "bf16" and cap is not None and cap < (8, 0):
        raise UsageError(f"--precision=bf16: this GPU (compute capability {cap[0]}.{cap[1]}) has no native bf16; "
                         f"use --precision=fp16 (or auto)")
    if precision != "fp32" and kind == "mps":
        raise UsageError(f"--precision={precision} is not supported on mps; use --precision=fp32 (or auto)")
    return precision


def autocast_for(dev, precision="auto"):
    """The training/eval precision context: autocast to bf16 or fp16, or none (fp32), as resolve_precision says."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(precision, dev))   # fp32: None
    return (lambda: torch.autocast(torch.device(dev).type, dtype=dtype)) if dtype else contextlib.nullcontext


def grad_scaler(dev, precision="auto"):
    """fp16's loss scaling (small gradients survive fp16; an overflowing step is skipped, the scale halved), or None."""
    if resolve_precision(precision, dev) != "fp16":
        return None
    # a skipped step still steps the schedule (the lr follows the step count); torch warns when the first one is skipped
    warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`")
    return torch.amp.GradScaler(torch.device(dev).type)


def device_notes(name, cfg, dev):
    """One line per known gap of the device for this model (printed before training), with what to use instead."""
    if dev == "mps" and getattr(cfg, "cema_impl", None) == "fft":
        return [f"note: {name}'s CEMA with --cema_impl=fft runs complex FFTs, which mps has only on macOS 14 and "
                f"later; if the first step fails here, use --cema_impl=scan"]
    return []


def fork_rng(dev):
    """with fork_rng(dev): the random draws inside (an eval seeds its own) leave the CPU generator and device dev's
    as they were, so the training stream goes on as if the block had not run."""
    d = torch.device(dev)
    return torch.random.fork_rng(devices=[] if d.type == "cpu" else [d.index or 0],
                                 device_type="cuda" if d.type == "cpu" else d.type)


# --- torchrun: the process group and every collective the trainer makes, on the training device ---------------------
@contextlib.contextmanager
def process_group(dev):
    """Under torchrun (RANK set), the process group for the block, started and ended here unless a caller started it."""
    started = "RANK" in os.environ and not torch.distributed.is_initialized()
    if started:
        init_process_group(dev)
    try:
        yield
    finally:
        if started:
            torch.distributed.destroy_process_group()


def init_process_group(dev):
    """gloo on the CPU; on CUDA nccl for the device's tensors beside gloo for CPU ones (barriers, and anything a
    library gathers as Python objects), so that no collective meets a backend without its device."""
    torch.distributed.init_process_group("cpu:gloo,cuda:nccl" if dev.startswith("cuda") else "gloo")


def on_ranks(op, x, dev):
    """The one door to the other ranks: x (a tensor or numbers) moved to the training device dev, then op "max" ->
    its elementwise max over the ranks, or "gather" -> every rank's x stacked, (world, *x.shape), in rank order."""
    x = torch.as_tensor(x).to(dev)
    if op == "max":
        torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX)
        return x
    every = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(every, x)
    return torch.stack(every)


def set_cp(model, cp):
    """Hand the context-parallel group to every module that takes one (a `cp` attribute), or None to run alone."""
    for m in model.modules():
        if hasattr(m, "cp"):
            m.cp = cp


def cp_group(model, tc):
    """--context_parallel N > 1: this rank's group of N ranks sharing each sequence (every rank makes the groups),
    attending by tc.cp_attention, handed to the model's modules (set_cp); None where each rank holds whole sequences."""
    if tc.context_parallel == 1:
        return None
    cp, _ = context_parallel.make_groups(tc.context_parallel)
    cp.attention_impl = tc.cp_attention
    set_cp(model, cp)
    return cp


def cp_forward(model, batch, cp):
    """This rank's slice of every sequence through the model -> (its share of the loss, whole-sequence loss, parts)."""
    cfg = getattr(model, "module", model).cfg
    names = tuple(cfg.modality_names[m] if m < len(cfg.modality_names) else f"modality{m}"
                  for m in range(cfg.n_modalities))
    return context_parallel.model_loss(model, batch, cp, names)


def mean_over_ranks(d, world, dev="cpu"):
    """{name: number} -> each name's mean over the ranks that report it (a model may log a part on some ranks only):
    the names travel as bytes, the values as float64, both through on_ranks."""
    if world == 1:
        return d
    code = torch.tensor(list("\n".join(sorted(d)).encode()), dtype=torch.uint8)
    n = int(on_ranks("max", [len(code)], dev)[0])
    rows = on_ranks("gather", torch.cat([code, code.new_zeros(n - len(code))]), dev).tolist()
    names = sorted({k for r in rows for k in bytes(r).rstrip(b"\0").decode().split("\n") if k})
    vals = on_ranks("gather", torch.tensor([[float(d.get(k, 0.0)), float(k in d)] for k in names],
                                           dtype=torch.float64), dev).tolist()
    return {k: sum(v[i][0] for v in vals if v[i][1]) / sum(v[i][1] for v in vals) for i, k in enumerate(names)}


# The generation eval (caption -> image, image -> caption, scored against the scene) exists where there are images.
GEN_EVAL_SETTINGS = ("chameleon", "speech", "transfusion")


def has_gen_eval(model, ds):
    return ds.setting in GEN_EVAL_SETTINGS and (hasattr(model, "gen_metrics") or
                                                (hasattr(model, "generate") and hasattr(ds, "eval_generation")))


def gen_min_seq_len(ds):
    """The shortest seq_len the generation eval fits in: its longest prompt + the tokens it generates
    (image -> caption: <bos> <boi> 16 patches <eoi> + CAPTION_TOKENS; caption -> image: <bos> caption <boi> + 16)."""
    if ds.setting not in GEN_EVAL_SETTINGS:
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


def check_run(name, model, tc, ds, world, dev, given=()):
    """Relations between trainer keys (and with the device and world size): one-line UsageError on the first.
    given: the trainer keys the user set (a key that would have no effect is an error naming why). -> micro-batch rows."""
    resolve_precision(tc.precision, dev)
    if dev == "mps" and world > 1:
        raise UsageError("--device=mps trains in one process (torchrun has no mps backend); run python train.py")
    world = check_context_parallel(name, model, tc, world)   # the batch splits over the data-parallel replicas
    for note in device_notes(name, model.cfg, dev):   # a known gap of the device, and what to use instead
        print(note)
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


# --- --compare: every model's keys and values checked before the first one trains -----------------------------------
def compare_names(value, flags):
    names = [n for n in value.split(",") if n]
    if len(names) < 2:
        raise UsageError("--compare needs at least two models, e.g. --compare dense,mot")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UsageError(f"--compare names {', '.join(dup)} twice; each model runs once (into OUT/NAME)")
    if "resume" in flags:
        raise UsageError("--resume is not supported with --compare; resume each run with --model NAME --out DIR/NAME")
    return names


def split_compare_keys(names, over, trainer_keys, reg):
    """-> ({name: its keys}, the shared setting): a key goes to every model whose Config has it, trainer keys to all;
    a key nobody has, or models that default to different settings without --setting, is a one-line error."""
    for n in names:
        if n not in reg:
            raise UsageError(f"unknown model {n!r} in --compare; choose from {', '.join(sorted(reg))}")
    per = {n: {k: v for k, v in over.items() if k in trainer_keys or k in {f.name for f in fields(reg[n][1])}}
           for n in names}
    for k in over:
        if not any(k in p for p in per.values()):
            raise UsageError(f"--{k} is not a key of the trainer or of any of {', '.join(names)}")
    settings = {over.get("setting") or reg[n][3] for n in names}
    if len(settings) > 1:
        raise UsageError(f"--compare: the models default to different settings ({', '.join(sorted(settings))}); "
                         f"add --setting NAME")
    return per, settings.pop()


# --- --help: generated from the code (Config comments, MODELS lines, data's docstring), so it cannot drift ----------
def field_comments(cls):
    """field -> the comment on its line in the class source (continuation comment lines joined)."""
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


def help_text(train_config, model=None):
    """--help (train_config: train.TrainConfig, whose keys it lists) or --help --model NAME (that model's keys)."""
    reg = registry()
    usage = ["usage: python train.py [--model NAME] [--setting NAME] [--KEY=VALUE ...] [--resume]   train one model",
             "       python train.py --compare A,B[,C...] [--setting NAME] [--KEY=VALUE ...]   same data and training",
             "       python train.py --help [--model NAME]                                   this text / a model's keys",
             "       torchrun --nproc_per_node=N train.py ...   DDP (gloo on CPU, nccl on CUDA); on a bad value torchrun",
             "       prints its own failure summary after the one-line error"]
    if model is not None:
        check_model(model, reg)
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
    lines += ["", "trainer keys (default, what it does, [valid range]):"] + _key_lines(train_config, train_config())
    lines += [""] + textwrap.wrap("memory: a run whose estimate exceeds the device's free memory is refused before the "
                                  "data and the model are made (--force_memory=True starts it anyway); " + MEMORY_NOTE,
                                  118, subsequent_indent="  ")
    lines += ["", "outputs in --out (default out/MODEL): config.json, metrics.jsonl, ckpt.pt, loss.png"]
    return "\n".join(lines)
