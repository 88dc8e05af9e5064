"""train.py -- the one small trainer for every nanomix model: CPU, one GPU, or torchrun DDP.

    python train.py                                           # the default model (mot) on the chameleon toy data
    python train.py --model mom --setting speech --steps 300  # any registered model, setting, override
    python train.py --compare dense,mot --setting chameleon   # same data, same FLOPs count, one plot
    python train.py --model megabyte --data my.txt            # byte models on any local text file
    torchrun --nproc_per_node=2 train.py --model mot          # DistributedDataParallel (gloo on CPU, nccl on CUDA)

Every `--key=value` (or `--key value`) overrides a field of the training config below or of the model's Config,
type-checked against its default. Outputs in OUT (default out/MODEL): config.json, metrics.jsonl, ckpt.pt, loss.png.

FLOPs, one method for every model (`count_flops`): the matmul FLOPs actually executed by one forward + backward
pass on the first four training batches, counted by torch.utils.flop_counter (linear layers, grouped matmuls, attention with
the full T x T score matrix as counted for sdpa), divided by the tokens in the batch. Sparse models are charged
for what they run, frozen modules for their forward only; elementwise work (scans, norms, softmax) is not counted.
"""
import contextlib
import copy
import dataclasses
import importlib
import importlib.util
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

import data

MODEL_FILES = ("mot", "mom", "moma", "transfusion", "megabyte", "blt", "megalodon")


class UsageError(Exception):
    """Bad input: printed as one line, exit status 2."""


@dataclass
class TrainConfig:
    model: str = "mot"
    setting: str = ""          # "" = the model's default setting
    steps: int = 0             # 0 = the setting's default
    out: str = ""              # "" = out/MODEL
    seed: int = 0
    device: str = "auto"       # auto | cpu | cuda
    data: str = ""             # a local text file for the bytes setting
    batch_size: int = 0        # global batch in sequences (split across DDP ranks); 0 = setting default
    micro_batch_size: int = 0  # sequences per forward pass per rank; 0 = no accumulation
    seq_len: int = 0           # 0 = setting default
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 0        # 0 = every max(50, steps // 16) steps
    eval_batches: int = 4
    ckpt_every: int = 100
    log_every: int = 10
    gen_n: int = 32            # prompts per generation eval (models that generate)
    compile: bool = False      # torch.compile, CUDA only


# Training defaults per *setting*, never per model: compared models get identical training.
SETTING_DEFAULTS = {
    "chameleon":   dict(seq_len=256, batch_size=16, steps=1800),  # MoT's gain shows after ~3x 600 steps: README
    "speech":      dict(seq_len=256, batch_size=16, steps=1800),
    "transfusion": dict(seq_len=256, batch_size=16, steps=4000),   # diffusion learns to read the caption late: README
    "text":        dict(seq_len=256, batch_size=16, steps=300),
    "bytes":       dict(seq_len=2048, batch_size=4, steps=400),
}


def registry():
    """name -> (module, ConfigClass, ModelClass, default setting, Config overrides), from every model file present."""
    reg = {}
    for f in MODEL_FILES:
        if importlib.util.find_spec(f) is not None:
            mod = importlib.import_module(f)
            for name, (cfg_cls, model_cls, setting, over) in getattr(mod, "MODELS", {}).items():
                reg[name] = (mod, cfg_cls, model_cls, setting, over)
    return reg


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


def apply(obj, over, what):
    names = {f.name: getattr(obj, f.name) for f in fields(obj)}
    for k, v in over.items():
        if k not in names:
            raise UsageError(f"unknown key --{k} for {what}; valid keys: {', '.join(sorted(names))}")
        setattr(obj, k, convert(k, v, names[k]) if isinstance(v, str) else v)


def build(name, setting=None, overrides=None, data_file=None, device="cpu", train_overrides=None):
    """-> (model, model_cfg, train_cfg, ds).  overrides: model Config fields; train_overrides: TrainConfig fields."""
    reg = registry()
    if name not in reg:
        raise UsageError(f"unknown model {name!r}; choose one of {', '.join(sorted(reg))}")
    mod, cfg_cls, model_cls, default_setting, base = reg[name]
    tc = TrainConfig(model=name)
    apply(tc, dict(train_overrides or {}), "the trainer")
    tc.setting = setting or tc.setting or default_setting
    if tc.setting not in data.SETTINGS:
        raise UsageError(f"unknown setting {tc.setting!r}; choose one of {', '.join(data.SETTINGS)}")
    for k, v in SETTING_DEFAULTS[tc.setting].items():
        if not getattr(tc, k):
            setattr(tc, k, v)
    tc.eval_every = tc.eval_every or max(50, tc.steps // 16)
    data_file = data_file or tc.data or None
    try:
        ds = data.make_data(tc.setting, seq_len=tc.seq_len, seed=tc.seed, data_file=data_file)
    except ValueError as e:
        raise UsageError(str(e)) from None
    cfg = cfg_cls(**base)
    names = {f.name for f in fields(cfg)}
    for k, v in ds.model_fields().items():
        if k in names:
            setattr(cfg, k, v)
    apply(cfg, dict(overrides or {}), f"model {name}")
    torch.manual_seed(tc.seed)
    try:
        if hasattr(cfg, "__post_init__"):
            cfg.__post_init__()  # derived fields and checks, after the overrides
        model = model_cls(cfg).to(device)
    except ValueError as e:
        raise UsageError(f"model {name}: {e}") from None
    return model, cfg, tc, ds


# --- FLOPs: one counting method for all models ------------------------------------------------------------------
def _register_cpu_sdpa_flops():
    """torch's FLOP counter knows the CUDA attention kernels but not the CPU one. Count it as the math path
    would: 2*T*S*hd for Q K^T and as much for P V forward, twice that backward (like any matmul)."""
    from torch.utils import flop_counter as fc
    aten = torch.ops.aten
    if aten._scaled_dot_product_flash_attention_for_cpu in fc.flop_registry:
        return
    fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu, get_raw=True)(
        lambda q, k, v, *a, **kw: fc.sdpa_flop_count(q.shape, k.shape, v.shape))
    fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward, get_raw=True)(
        lambda g, q, k, v, *a, **kw: 2 * fc.sdpa_flop_count(q.shape, k.shape, v.shape))  # 2x fwd, as for any matmul


def count_flops(model, batches, backward=True):
    """Matmul FLOPs per input token of one forward (+ backward) pass, counted on a copy of the model and averaged
    over the batches given (a batch or a list: a model whose work depends on the data, like BLT's patches, needs a few)."""
    from torch.utils.flop_counter import FlopCounterMode
    _register_cpu_sdpa_flops()
    batches = [batches] if isinstance(batches, dict) else batches
    m = copy.deepcopy(model)
    m.train(backward)
    with torch.random.fork_rng(devices=[]), FlopCounterMode(display=False) as counter:
        for batch in batches:
            if backward:
                m(batch)[1].backward()
            else:
                with torch.no_grad():
                    m(batch)
    return counter.get_total_flops() / sum(b["tokens"].numel() for b in batches)


# --- distributed helpers ----------------------------------------------------------------------------------------
def setup_ddp(device):
    if "RANK" not in os.environ:
        return 0, 1, 0
    backend = "nccl" if device.startswith("cuda") else "gloo"
    torch.distributed.init_process_group(backend)
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def all_mean(x, world):
    if world > 1:
        torch.distributed.all_reduce(x)
        x /= world
    return x


def to(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


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


def evaluate(model, ds, tc, rank, world, device, autocast):
    """Mean eval loss and parts over tc.eval_batches fixed validation batches, averaged over ranks."""
    model.eval()
    sums = {}
    with torch.no_grad(), torch.random.fork_rng(devices=[]), autocast():
        torch.manual_seed(1234)
        for i in range(tc.eval_batches):
            _, loss, parts = model(to(ds.get_batch("val", tc.batch_size // world, i, rank, world), device))
            for k, v in {"loss": loss, **parts}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
    mine = {k: v / tc.eval_batches for k, v in sums.items()}
    if world > 1:  # average each key over the ranks that report it (a model may log a part on some ranks only)
        every = [None] * world
        torch.distributed.all_gather_object(every, mine)
        mine = {k: sum(d[k] for d in every if k in d) / sum(k in d for d in every) for k in set().union(*every)}
    out = {f"eval_{k}": float(v) for k, v in sorted(mine.items())}
    if ds.setting == "bytes":
        out["eval_bpb"] = out["eval_loss"] / math.log(2)
    model.train()
    return out


def generation_metrics(model, ds, tc):
    model.eval()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(4321)
        if hasattr(model, "gen_metrics"):
            m = model.gen_metrics(ds)
        elif hasattr(model, "generate") and hasattr(ds, "eval_generation"):
            dev = next(model.parameters()).device
            m = ds.eval_generation(lambda p, n, temp: model.generate(p.to(dev), n, temperature=temp)[:, p.shape[1]:],
                                   n=tc.gen_n)
        else:
            m = {}
    model.train()
    return m


def train(name, over, resume=False, quiet=False):
    """Train one model. over: every --key=value (trainer and model keys mixed). Returns the output dir."""
    tc_keys = {f.name for f in fields(TrainConfig)}
    t_over = {k: v for k, v in over.items() if k in tc_keys}
    m_over = {k: v for k, v in over.items() if k not in tc_keys}
    dev = t_over.get("device", "auto")
    if dev not in ("auto", "cpu", "cuda") and not dev.startswith("cuda:"):
        raise UsageError(f"--device={dev}: choose auto, cpu or cuda")
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device=cuda but no CUDA GPU is visible; use --device=cpu (or auto)")
    rank, world, local = setup_ddp(dev)
    if dev == "cuda":
        dev = f"cuda:{local}"
        torch.cuda.set_device(dev)
    model, cfg, tc, ds = build(name, None, m_over, None, dev, t_over)
    tc.device = dev
    out = tc.out or os.path.join("out", name)
    tc.out = out
    if tc.batch_size % world:
        raise UsageError(f"batch_size={tc.batch_size} does not split over {world} ranks; use a multiple of {world}")
    micro = tc.micro_batch_size or tc.batch_size // world
    if (tc.batch_size // world) % micro:
        raise UsageError(f"micro_batch_size={micro} must divide the per-rank batch {tc.batch_size // world}")
    accum = tc.batch_size // world // micro
    config = dict(model=name, setting=tc.setting, train=dataclasses.asdict(tc), model_cfg=dataclasses.asdict(cfg))
    ckpt_path = os.path.join(out, "ckpt.pt")
    ck = load_ckpt(ckpt_path) if resume else None
    if ck is not None and (ck["config"]["model"], ck["config"]["setting"]) != (name, tc.setting):
        raise UsageError(f"--resume: {ckpt_path} holds {ck['config']['model']} on {ck['config']['setting']}, "
                         f"not {name} on {tc.setting}; use another --out")
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        for f in os.listdir(out):  # a run killed while saving leaves its temp file: remove it
            if f.startswith("ckpt.pt.tmp"):
                os.remove(os.path.join(out, f))
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
        if not quiet:
            print(json.dumps(config))
    use_bf16 = dev.startswith("cuda") and torch.cuda.is_bf16_supported()
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    raw = model
    n_params = sum(p.numel() for p in model.parameters())
    flops_per_token = count_flops(model, [to(ds.get_batch("train", micro, i), dev) for i in range(4)])
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=tc.lr, betas=(0.9, 0.95), fused=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, tc) / tc.lr)
    step, elapsed = 0, 0.0
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        step, elapsed = ck["step"], ck["time"]
        set_rng_state(ck["rng"])
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local] if dev.startswith("cuda") else None,
                                                          find_unused_parameters=True)
    if tc.compile and dev.startswith("cuda"):
        model = torch.compile(model)
    metrics_path = os.path.join(out, "metrics.jsonl")
    if rank == 0:  # on resume, drop log lines written after the checkpoint (they will be written again)
        old = open(metrics_path).read().splitlines() if (ck is not None and os.path.exists(metrics_path)) else []
        with open(metrics_path, "w") as f:
            f.writelines(l + "\n" for l in old if json.loads(l)["step"] <= step)
    log = open(metrics_path, "a") if rank == 0 else None
    tokens_per_step = tc.batch_size * tc.seq_len

    def write(rec):
        if log:
            log.write(json.dumps(rec) + "\n"); log.flush()

    def checkpoint():
        if rank == 0:
            save_ckpt(ckpt_path, dict(model=raw.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                                      step=step, time=elapsed, config=config, rng=rng_state(), data_position=step,
                                      flops_per_token=flops_per_token))
        if world > 1:
            torch.distributed.barrier()

    def eval_now():
        rec = dict(step=step, tokens=step * tokens_per_step, flops=step * tokens_per_step * flops_per_token)
        rec.update(evaluate(model, ds, tc, rank, world, dev, autocast))
        if rank == 0:
            rec.update(generation_metrics(raw, ds, tc))
        write(rec)
        return rec

    if not quiet and rank == 0:
        print(f"{name} on {tc.setting}: {n_params / 1e6:.3f}M params, {flops_per_token / 1e6:.3f} MFLOPs/token "
              f"(fwd+bwd), {world} rank(s) x {accum} micro-step(s) of {micro} x {tc.seq_len}, device {dev}")
    from tqdm import tqdm
    bar = tqdm(total=tc.steps, initial=step, disable=quiet or rank != 0 or not sys.stderr.isatty(), dynamic_ncols=True,
               leave=False)
    model.train()
    while step < tc.steps:
        t0 = time.perf_counter()
        parts_sum, loss_sum = {}, 0.0
        for m in range(accum):
            batch = to(ds.get_batch("train", micro, step * accum + m, rank, world), dev)
            sync = m == accum - 1 or world == 1
            ctx = model.no_sync() if (world > 1 and not sync) else torch.enable_grad()
            with ctx, autocast():
                _, loss, parts = model(batch)
                (loss / accum).backward()  # the mean over the global batch
            loss_sum += float(loss.detach()) / accum
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + float(v) / accum
        gnorm = float(torch.nn.utils.clip_grad_norm_(raw.parameters(), tc.grad_clip))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        dt = time.perf_counter() - t0
        elapsed += dt
        bar.update(1)
        if step % tc.log_every == 0 or step == tc.steps:
            write(dict(step=step, tokens=step * tokens_per_step, flops=step * tokens_per_step * flops_per_token,
                       time=elapsed, lr=lr_at(step - 1, tc), loss=loss_sum, **parts_sum))
            if not quiet and rank == 0:
                bar.write(f"step {step} | loss {loss_sum:.4f} | lr {lr_at(step - 1, tc):.2e} | grad norm {gnorm:.3f} | "
                          f"{dt * 1000:.1f} ms/step | {tokens_per_step / dt:,.0f} tokens/s")
        if step % tc.eval_every == 0 or step == tc.steps:
            rec = eval_now()
            if not quiet and rank == 0:
                bar.write("eval " + " | ".join(f"{k} {v:.4g}" for k, v in rec.items() if k not in ("tokens", "flops")))
        if step % tc.ckpt_every == 0 or step == tc.steps:
            checkpoint()
    bar.close()
    if rank == 0:
        log.close()
        plot_run(out)
        if hasattr(raw, "extra_plots"):
            raw.extra_plots(out)
        if not quiet:
            print(f"done: {step} steps in {elapsed:.1f}s. log: {metrics_path}  plot: {os.path.join(out, 'loss.png')}  "
                  f"checkpoint: {ckpt_path}")
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return out


# --- plots and --compare -----------------------------------------------------------------------------------------
def read_metrics(out):
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    return [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]


def plot_run(out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tr, ev = read_metrics(out)
    fig, ax = plt.subplots(figsize=(6, 4))
    for k in [k for k in tr[0] if k.startswith("loss")]:
        ax.plot([r["flops"] for r in tr], [r[k] for r in tr], label=f"train {k}", alpha=0.6)
    for k in [k for k in ev[0] if k.startswith("eval_loss")]:
        ax.plot([r["flops"] for r in ev], [r[k] for r in ev], "o-", label=k)
    ax.set_xlabel("training FLOPs"); ax.set_ylabel("loss (nats)"); ax.legend(fontsize=7); ax.set_title(out)
    fig.tight_layout(); fig.savefig(os.path.join(out, "loss.png"), dpi=110); plt.close(fig)


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
    for n in names:
        print(f"=== {n} ===", flush=True)
        train(n, {**per[n], "setting": setting, "out": os.path.join(base_out, n)})
    runs = {n: read_metrics(os.path.join(base_out, n))[1] for n in names}
    keys = [k for k in runs[names[0]][-1] if k.startswith("eval_loss") or k == "eval_bpb"]
    if "eval_bpb" in keys:  # bytes: one modality, and bpb says it all
        keys = ["eval_bpb"]
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    for ax, k in zip(axes[0], keys):
        for n in names:
            ev = [r for r in runs[n] if k in r]
            ax.plot([r["flops"] for r in ev], [r[k] for r in ev], "o-", ms=3, label=n)
        ax.set_title(k); ax.set_xlabel("training FLOPs"); ax.set_xscale("log"); ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(base_out, "compare.png"), dpi=110)
    plt.close(fig)
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
    print(f"plot: {os.path.join(base_out, 'compare.png')}")
    return summary


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        flags, over = parse_args(argv)
        if "help" in flags:
            print(__doc__)
            return 0
        if "compare" in over:
            names = [n for n in over.pop("compare").split(",") if n]
            if len(names) < 2:
                raise UsageError("--compare needs at least two models, e.g. --compare dense,mot")
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
