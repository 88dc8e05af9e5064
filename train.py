"""train.py -- the one small trainer for every nanomix model: CPU, one GPU, or torchrun DDP.

    python train.py                                           # the default model (mot) on the chameleon toy data
    python train.py --model mom --setting speech --steps 300  # any registered model, setting, override
    python train.py --compare dense,mot --setting chameleon   # same data, same FLOPs count, one plot
    python train.py --model megabyte --data my.txt            # byte models on any local text file
    torchrun --nproc_per_node=2 train.py --model mot          # DistributedDataParallel (gloo on CPU, nccl on CUDA)
    python train.py export RUN docs/ckpt/NAME.pt --command=CMD  # a finished run as a shipped checkpoint (rundir.py)

Every `--key=value` overrides a field of TrainConfig below or of the model's Config (`python train.py --help` lists
them). Outputs in OUT (default out/MODEL): config.json, metrics.jsonl, ckpt.pt, loss.png. The command line, its
checks (cli.py) and the run directory (rundir.py: lock, checkpoints, resume) live apart; this file is the method.
"""
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np
import torch

import cli
import plots
import rundir
from cli import (UsageError, registry, parse_args, check_ranges, check_run, has_gen_eval, mean_over_ranks,  # noqa: F401
                 count_flops, autocast_for)
from rundir import Prefetch, read_jsonl, save_ckpt, rng_state, lock  # noqa: F401


@dataclass
class TrainConfig:
    model: str = "mot"         # a registered model (python train.py --help lists them)
    setting: str = ""          # the data; "" = the model's default setting
    steps: int = 0             # optimizer steps; 0 = the setting's default
    out: str = ""              # output directory; "" = out/MODEL
    seed: int = 0              # model init and data stream
    device: str = "auto"       # auto | cpu | cuda | cuda:N | mps (Apple silicon: by name only, auto never picks it)
    precision: str = "auto"    # auto | fp32 | bf16 | fp16; auto: bf16 on GPUs with it, fp16 on older ones, fp32 on CPU
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
    overwrite: bool = False    # replace the run already in --out (its ckpt.pt) instead of refusing to start
    force_memory: bool = False  # start even where the memory estimate (cli.check_size) exceeds what is free
    # valid values, one rule per field ("int >= 1", "one of a|b"; after ";" a note), checked by build() (cli.py)
    RANGES: ClassVar[dict] = dict(
        model="str; a registered model", setting="str; a data setting", out="str",
        steps="int >= 0; 0 = the setting's default", seed="int in [0, 4294967295]",
        device="str; auto, cpu, cuda, cuda:N or mps", data="path", batch_size="int >= 0; 0 = the setting's default",
        micro_batch_size="int >= 0; 0 = no accumulation", seq_len="int >= 0; 0 = the setting's default, else >= 8",
        lr="float in (0, 10]", min_lr_ratio="float in [0, 1]", warmup="int >= 0", weight_decay="float in [0, 1]",
        grad_clip="float in (0, inf]; inf = no clipping", eval_every="int >= 0; 0 = every max(50, steps // 16) steps",
        eval_batches="int in [1, 10000]", ckpt_every="int >= 1", log_every="int >= 1",
        precision="one of auto|fp32|bf16|fp16", gen_n="int in [0, 4096]; 0 = no generation eval",
        gen_every="int >= 0; 0 = 4 x eval_every", compile="bool",
        context_parallel="int >= 1; must divide the torchrun world size", cp_attention="one of ring|allgather",
        overwrite="bool", force_memory="bool")


# Training defaults per *setting*, never per model: compared models get identical training.
SETTING_DEFAULTS = {
    "chameleon":   dict(seq_len=256, batch_size=16, steps=1800),  # long enough for MoT's gain to show (RESULTS.md)
    "speech":      dict(seq_len=256, batch_size=16, steps=1800),
    "transfusion": dict(seq_len=256, batch_size=16, steps=4000),   # diffusion learns to read the caption late
    "text":        dict(seq_len=256, batch_size=16, steps=300),
    "bytes":       dict(seq_len=2048, batch_size=4, steps=400),
    "realtext":    dict(seq_len=2048, batch_size=4, steps=400),
}


def build(name, setting=None, overrides=None, data_file=None, device="cpu", train_overrides=None):
    """-> (model, model_cfg, train_cfg, ds).  overrides: model Config fields; train_overrides: TrainConfig fields.
    Every field is checked against its RANGES here, once (cli.py); bad input raises a one-line UsageError."""
    reg = registry()
    cli.check_model(name, reg)
    tc = TrainConfig(model=name)
    cli.apply(tc, dict(train_overrides or {}), "the trainer")
    check_ranges(tc)
    tc.setting = setting or tc.setting or reg[name][3]
    cli.check_setting(name, tc.setting, reg)
    for k, v in SETTING_DEFAULTS[tc.setting].items():
        if not getattr(tc, k):
            setattr(tc, k, v)
    tc.eval_every = tc.eval_every or max(50, tc.steps // 16)
    tc.gen_every = tc.gen_every or 4 * tc.eval_every
    rundir.check_paths(tc)                                   # path options: regular files, before anything reads them
    cli.check_size(name, tc, overrides, reg, device)         # memory and expert capacity, before data or model is made
    ds = cli.make_data(tc.setting, tc.seq_len, tc.seed, data_file or tc.data or None)
    cfg = cli.model_config(name, ds, overrides, reg, trainer_keys={f.name for f in fields(TrainConfig)})
    rundir.check_paths(cfg)
    torch.manual_seed(tc.seed)
    return cli.make_model(name, cfg, device, reg), cfg, tc, ds


# --- the device, the optimizer and its schedule --------------------------------------------------------------------
def to(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def lr_at(step, tc):
    """Linear warmup, then cosine to lr * min_lr_ratio."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    p = min(1.0, (step - tc.warmup) / max(1, tc.steps - tc.warmup))
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def make_optimizer(model, tc):
    """AdamW (betas 0.9 / 0.95; weight decay on matrices only) and the warm-up + cosine schedule of lr_at."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.95), fused=False)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, tc) / tc.lr)


def clip_grads(model, max_norm):
    """Clip the gradient norm (MoMa clips its aux routers apart) -> the norm before clipping (a device tensor)."""
    if hasattr(model, "clip_grad_norm_"):
        return model.clip_grad_norm_(max_norm)
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


# --- evaluation -------------------------------------------------------------------------------------------------------
def evaluate(model, ds, tc, rank, world, device, autocast, micro=None, cp=None):
    """Mean eval loss and parts over tc.eval_batches fixed validation batches (every model sees the same: a compare is
    paired, their difficulty cancels in a difference; se_eval_loss is the standard error), in forward passes of `micro`
    rows cut as training cuts them (2 ranks x b rows == 1 process x micro-batches of b), averaged over passes, ranks."""
    model.eval()
    dp_rank, dp_world = rank // tc.context_parallel, world // tc.context_parallel
    micro = micro or tc.batch_size // dp_world
    sums, counts, passes = {}, {}, []
    with torch.no_grad(), cli.fork_rng(device), autocast():
        torch.manual_seed(1234)
        for i in range(tc.eval_batches * (tc.batch_size // dp_world // micro)):
            batch = to(ds.get_batch("val", micro, i, dp_rank, dp_world), device)
            _, loss, parts = model(batch) if cp is None else (None, *cli.cp_forward(model, batch, cp)[1:])
            passes.append(float(loss))
            for k, v in {"loss": loss, **parts}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
                counts[k] = counts.get(k, 0) + 1
    mine = {k: v / counts[k] for k, v in sums.items()}
    if world > 1:  # every rank runs as many passes
        passes = cli.on_ranks("gather", torch.tensor(passes, dtype=torch.float64), device).flatten().tolist()
        mine = mean_over_ranks(mine, world, device)
    out = {f"eval_{k}": float(v) for k, v in sorted(mine.items())}
    if len(passes) > 1:  # the standard error of eval_loss, from the spread of its forward passes' losses
        out["se_eval_loss"] = float(np.std(passes, ddof=1) / math.sqrt(len(passes)))
    if ds.setting in ("bytes", "realtext"):
        out["eval_bpb"] = out["eval_loss"] / math.log(2)
    model.train()
    return out


def generation_metrics(model, ds, tc):
    """The generation eval's scores (caption -> image, image -> caption, against the scene), or {} where it has none."""
    if not has_gen_eval(model, ds):
        return {}
    model.eval()
    dev = next(model.parameters()).device
    with torch.no_grad(), cli.fork_rng(dev):
        torch.manual_seed(4321)
        if hasattr(model, "gen_metrics"):
            m = model.gen_metrics(ds, n=tc.gen_n)
        else:
            m = ds.eval_generation(lambda p, n, temp: model.generate(p.to(dev), n, temperature=temp)[:, p.shape[1]:],
                                   n=tc.gen_n)
    model.train()
    return m


# --- training ---------------------------------------------------------------------------------------------------------
# The loss of a step is the mean over the whole global batch, however it is cut into micro-batches and ranks: every
# model's loss is a mean over a count read from the batch (the scored targets; Transfusion: text targets, and images),
# so each micro-batch backpropagates its mean times its share of the global count (its count / the sum over every
# micro-batch of every rank, times the ranks DDP averages over). With equal counts the share is 1 / accum.
def loss_counts(model, batch):
    """(K,) the counts the model's loss is a mean over, from the batch alone (no forward, no host read): the scored
    targets (!= -1), or model.loss_counts(batch) where the loss is a sum of K means (Transfusion: text, images)."""
    model = getattr(model, "module", model)   # under DDP
    if hasattr(model, "loss_counts"):
        return model.loss_counts(batch)
    return (batch["targets"] != -1).sum().reshape(1)


def noise_seed(seed, batch):
    """The seed of a micro-batch's training noise (dropout, MoMa's Gumbel draws), from the run's seed and the global
    position of its first row (batch["row_id"], on the host): the same micro-batch draws the same noise on any rank,
    at any step of a resumed run."""
    return int(np.random.SeedSequence([seed, int(batch["row_id"][0])]).generate_state(1, np.uint64)[0])


def train_step(model, batches, opt, sched, tc, autocast, world=1, cp=None, scaler=None, seeds=None):
    """One optimizer step on this rank's micro-batches (on the device) -> (loss, parts, grad norm, ok), read in one host
    sync. ok: loss and gradient norm finite on every rank; only then do the optimizer and schedule step. With fp16's
    scaler an overflowing gradient skips the update and halves the scale: ok, unless the scale falls below 1.
    seeds: one per micro-batch (noise_seed), torch's RNG seeded with it before its forward; None: left as it is."""
    accum, loss_sum, parts_sum = len(batches), 0.0, {}
    scale = scaler.scale if scaler is not None else (lambda loss: loss)
    dev = batches[0]["tokens"].device
    f64 = torch.float32 if dev.type == "mps" else torch.float64  # (mps has no float64)
    counts = torch.stack([loss_counts(model, b) for b in batches]).to(f64)  # (accum, K)
    total = counts.sum(0)
    if world > 1:  # the global batch's counts (each cp rank holds the whole micro-batch: cp x the true counts)
        total = cli.on_ranks("gather", total, dev).sum(0)
    total = total.clamp(min=1)
    share = counts.float() * world / total.float()  # (accum, K) each micro-batch's share of the global mean, x ranks
    for m, batch in enumerate(batches):
        if seeds is not None:
            torch.manual_seed(seeds[m])
        sync = m == accum - 1 or world == 1
        ctx = model.no_sync() if (world > 1 and not sync) else torch.enable_grad()
        with ctx, autocast():
            if cp is not None:                  # shares sum to the sequence's loss; DDP averages over dp x cp ranks
                part, loss, parts = cli.cp_forward(model, batch, cp)
                scale(part * cp.size * share[m, 0]).backward()
            elif counts.shape[1] == 1:          # the global batch's mean: this micro-batch's mean x its share
                _, loss, parts = model(batch)
                scale(loss * share[m, 0]).backward()
            else:                               # a sum of means (Transfusion): the model weighs each by its share
                _, loss, parts = model(dict(batch, loss_share=share[m]))
                scale(loss).backward()
        if counts.shape[1] == 1:                # the logged loss: the same mean, in float64 (exact for equal counts)
            loss_sum = loss_sum + loss.detach().to(f64) * counts[m, 0] * world / total[0]
        else:
            loss_sum = loss_sum + loss.detach().to(f64)
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0.0) + torch.as_tensor(v).detach().to(dev, f64) / accum
    if scaler is not None:
        scaler.unscale_(opt)                    # clip the true gradients
    gnorm = clip_grads(getattr(model, "module", model), tc.grad_clip)
    finite = torch.isfinite(loss_sum) & (torch.isfinite(gnorm) | (scaler is not None))
    bad = (~finite).to(f64)
    if world > 1:  # every rank stops at the same step
        bad = cli.on_ranks("max", bad, loss_sum.device)
    bad, loss_sum, gnorm, *values = torch.stack([bad, loss_sum, gnorm.to(loss_sum)] + list(parts_sum.values())).tolist()
    ok = not bad
    if ok and scaler is not None:
        scaler.step(opt)                        # skipped where the gradients overflowed, and the scale lowered
        scaler.update()
        ok = math.isfinite(gnorm) or scaler.get_scale() >= 1.0  # below 1: even unscaled gradients overflow fp16
    elif ok:
        opt.step()
    if ok:
        sched.step()
    opt.zero_grad(set_to_none=True)
    return loss_sum, dict(zip(parts_sum, values)), gnorm, ok


def check(name, over, resume=False):
    """Everything a user can get wrong in one run, checked before the process group starts and before any file is
    written (cli.py) -> (model, cfg, tc, ds, micro, config, ck): the model built, the run's micro-batch rows, the
    config it records, and with resume the checkpoint (its same run, weights and log checked too)."""
    rank, world, local = cli.ddp_env()  # from torchrun's environment, before the process group starts
    t_over = {k: v for k, v in over.items() if k in {f.name for f in fields(TrainConfig)}}
    t_over["device"] = dev = cli.resolve_device(t_over.get("device", "auto"), local)
    model, cfg, tc, ds = build(name, None, {k: v for k, v in over.items() if k not in t_over}, None, dev, t_over)
    tc.out = tc.out or os.path.join("out", name)
    micro = check_run(name, model, tc, ds, world, dev, given=set(t_over) - {"device"})
    config = dict(model=name, setting=tc.setting, train=dataclasses.asdict(tc), model_cfg=dataclasses.asdict(cfg),
                  data_sha256=rundir.data_hash(tc.data))
    ck = rundir.load_ckpt(os.path.join(tc.out, "ckpt.pt")) if resume else None
    if ck is not None:  # the same run, its weights, its log: all checked before a byte is written
        rundir.validate_resume(ck, model, tc.out, config, *make_optimizer(model, tc))
    return model, cfg, tc, ds, micro, config, ck


def train(name, over, resume=False, quiet=False, locked=False):
    """Train one model. over: every --key=value (trainer and model keys mixed). Returns the output dir. Everything a
    user can get wrong is checked (check) before OUT is locked and anything written. locked: the caller holds OUT's
    lock (compare holds every model's)."""
    model, _, tc, ds, micro, config, ck = check(name, over, resume)
    rank, world, local = cli.ddp_env()
    with contextlib.nullcontext() if locked else lock(tc.out, resume, tc.overwrite), cli.process_group(tc.device):
        _train(name, model, tc, ds, config, ck, micro, rank, world, local, quiet)
    return tc.out


def _train(name, model, tc, ds, config, ck, micro, rank, world, local, quiet):
    out, dev, raw = tc.out, tc.device, model
    ckpt_path = os.path.join(out, "ckpt.pt")
    dp_rank, dp_world = rank // tc.context_parallel, world // tc.context_parallel
    accum = tc.batch_size // dp_world // micro
    autocast, scaler = autocast_for(dev, tc.precision), cli.grad_scaler(dev, tc.precision)
    try:  # the first forward/backward passes: a config or setting the model cannot run fails here, in one line
        fl = count_flops(model, [to(ds.get_batch("train", micro, i), dev) for i in range(4)], parts=True)
    except cli.RUN_ERRORS as e:
        raise cli.cannot_run(name, tc.setting, e, dev) from None
    opt, sched = make_optimizer(model, tc)
    step, elapsed = rundir.resume(ck, model, opt, sched, scaler) if ck is not None else (0, 0.0)  # exact: RNG, data
    last_good = step if ck is not None else None
    cp = cli.cp_group(raw, tc)   # --context_parallel: after count_flops (one process's FLOPs per token), else None
    if world > 1:  # torchrun: each rank trains on its own rows, DDP averages the gradients
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local] if dev.startswith("cuda") else None,
                                                          find_unused_parameters=True)
    if tc.compile:
        model = torch.compile(model)
    log = rundir.start(out, config, step if ck is not None else None) if rank == 0 else None  # metrics.jsonl
    tokens_per_step = tc.batch_size * tc.seq_len
    spent = dict(eval=0.0, generation=0.0, checkpoints=0.0)  # wall seconds outside the training steps

    def record(**rec):  # a metrics.jsonl row: step, tokens, FLOPs (total, matmul part), then the values
        t = step * tokens_per_step
        rec = dict(step=step, tokens=t, flops=t * fl["total"], flops_matmul=t * fl["matmul"], **rec)
        if log:
            log.write(json.dumps(rec) + "\n"); log.flush()
        return rec

    if not quiet and rank == 0:
        print(rundir.header(name, config, tc, raw, fl, world, accum, micro))
    from tqdm import tqdm
    bar = tqdm(total=tc.steps, initial=step, disable=quiet or rank != 0 or not sys.stderr.isatty(), dynamic_ncols=True,
               leave=False)
    model.train()
    t_start, step0 = time.perf_counter(), step
    batches = Prefetch(ds, micro, dp_rank, dp_world, step * accum, tc.steps * accum, pin=dev.startswith("cuda"),
                       background=dev != "cpu")                   # on the CPU drawn in this thread (rundir.Prefetch)
    try:
        while step < tc.steps:
            t0 = time.perf_counter()
            micro_batches = [batches.get(step * accum + m) for m in range(accum)]
            seeds = [noise_seed(tc.seed, b) for b in micro_batches]   # training noise: keyed by the rows, not the rank
            micro_batches = [to(b, dev) for b in micro_batches]
            loss, parts, gnorm, ok = train_step(model, micro_batches, opt, sched, tc, autocast, world, cp, scaler,
                                                seeds)
            step += 1
            if not ok:
                raise cli.diverged(step, cli.step_failure(loss, gnorm, scaler), last_good, ckpt_path, tc)
            dt = time.perf_counter() - t0
            elapsed += dt
            bar.update(1)
            if step % tc.log_every == 0 or step == tc.steps:
                parts = mean_over_ranks(dict(parts, _loss=loss), world, dev)  # the logged loss: the mean over ranks
                loss = parts.pop("_loss")
                record(time=elapsed, lr=lr_at(step - 1, tc), loss=loss, **parts)
                if not quiet and rank == 0:
                    bar.write(f"step {step} | loss {loss:.4f} | lr {lr_at(step - 1, tc):.2e} | grad norm {gnorm:.3f} | "
                              f"{dt * 1000:.1f} ms/step | {tokens_per_step / dt:,.0f} tokens/s")
            if step % tc.eval_every == 0 or step == tc.steps:
                with rundir.timer(spent, "eval"):
                    ev = evaluate(model, ds, tc, rank, world, dev, autocast, micro, cp)
                if not math.isfinite(ev["eval_loss"]):
                    raise cli.diverged(step, "the eval loss", last_good, ckpt_path, tc)
                if rank == 0 and tc.gen_n and (step % tc.gen_every == 0 or step == tc.steps):
                    with rundir.timer(spent, "generation"):
                        cli.set_cp(raw, None)                        # generation runs on rank 0 alone
                        ev.update(generation_metrics(raw, ds, tc))
                        cli.set_cp(raw, cp)
                ev = record(**ev)
                if not quiet and rank == 0:
                    bar.write("eval " + " | ".join(f"{k} {v:.4g}" for k, v in ev.items()
                                                 if k not in ("tokens", "flops", "flops_matmul")))
            if step % tc.ckpt_every == 0 or step == tc.steps:
                with rundir.timer(spent, "checkpoints"):
                    bad = rundir.nonfinite(raw, opt)                     # never save a NaN over a good checkpoint
                    if bad:
                        raise cli.diverged(step, bad, last_good, ckpt_path, tc)
                    if rank == 0:  # from the unwrapped module; the RNG state and data position make resume exact
                        save_ckpt(ckpt_path, dict(model=raw.state_dict(), optimizer=opt.state_dict(),
                                                  scheduler=sched.state_dict(), step=step, time=elapsed, config=config,
                                                  scaler=scaler.state_dict() if scaler is not None else None,
                                                  rng=rng_state(), data_position=step, flops_per_token=fl["total"],
                                                  flops_matmul_per_token=fl["matmul"]))
                    last_good = step
                    if world > 1:
                        torch.distributed.barrier()
    finally:
        batches.close()
    bar.close()
    cli.set_cp(raw, None)                                           # the end-of-run figures run on rank 0 alone
    if rank == 0:
        log.close()
        plots.safely(lambda: plots.plot_run(out), "loss curve")
        plots.safely(lambda: plots.model_figures(raw, ds, out), "model figures")
        if not quiet:
            print(rundir.summary(out, step, step - step0, time.perf_counter() - t_start, spent))
    if world > 1:
        torch.distributed.barrier()


# --- --compare (plots.py draws the figure and sums up the runs) ---------------------------------------------
def compare(names, over, base_out):
    """Train every model in names on the same data and training keys, into base_out/NAME, then the compare figure and
    the FLOPs each model needs to reach names[0]'s final eval losses (plots.summarize). Every model's values, run,
    output directory and lock are checked, and every lock held, before the first one trains for minutes."""
    per, setting = cli.split_compare_keys(names, over, {f.name for f in fields(TrainConfig)}, registry())
    runs = {n: {**per[n], "setting": setting, "out": os.path.join(base_out, n)} for n in names}
    tcs = {n: check(n, runs[n])[2] for n in names}
    with contextlib.ExitStack() as held:
        for n in names:
            held.enter_context(lock(tcs[n].out, False, tcs[n].overwrite))
        for n in names:
            print(f"=== {n} ===", flush=True)
            train(n, runs[n], locked=True)
    plots.safely(lambda: plots.plot_compare(base_out, names), "compare")
    return plots.summarize(names, base_out)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["export"]:   # a finished run as a shipped checkpoint (rundir.py), its eval loss by evaluate
            print(rundir.export_main(argv[1:], evaluate, TrainConfig, SETTING_DEFAULTS))
            return 0
        flags, over = parse_args(argv)
        if "help" in flags:
            print(cli.help_text(TrainConfig, over.get("model")))
        elif "compare" in over:
            if "model" in over:
                raise UsageError("--compare names the models to train; drop --model (or drop --compare)")
            names = cli.compare_names(over.pop("compare"), flags)
            compare(names, over, over.pop("out", "") or os.path.join("out", "compare"))
        else:
            train(over.pop("model", TrainConfig.model), over, resume="resume" in flags)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
