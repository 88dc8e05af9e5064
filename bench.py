"""bench.py — benchmarks for nanomix: the models (default), the kernels, and each headline run's wall time.

    python bench.py [--models dense mamba]  # each model (default: all): ms/step, tokens/s, memory, MFU, ratio to dense
    python bench.py --peers              # our models at the sizes other implementations were timed at
    python bench.py --kernels            # each kernel vs its naive baseline and the torch path (+ Triton on GPU)
    python bench.py --wall [default ...] # each headline run's wall time projected from its pieces vs its target; the
                                         # step by category; in-loop vs pure step (runs: default chameleon speech mom
                                         # transfusion bytes); --threads 1 2: at each thread count, in one process
    python bench.py --context-parallel 2 # one sequence over 2 CPU ranks: bytes sent, memory kept, time per mixer vs L
    python bench.py --static             # runs gpu_check.py --static: every Triton kernel compiled for each target
    python bench.py --gpu-check          # runs gpu_check.py: on a CUDA machine, every kernel, model and run for real

Results are merged into --out (out/bench.json; the shipped bench.json holds ours) under "models", "kernels", "static",
"peers" and "wall". On CPU the kernel benchmarks run at reduced sizes (printed with each row): the naive baselines would
take minutes and gigabytes.
"""
import argparse
import contextlib
import json
import os
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import unittest.mock

import torch

import cli
import kernels
import train

HERE = os.path.dirname(os.path.abspath(__file__))

# ------------------------------------------------------------------------------------------------ models

DEFAULT_MODELS = ("dense", "mot", "mamba", "mom", "moma", "transfusion", "transfusion-mot", "dense@bytes", "megabyte",
                  "blt", "megalodon")  # NAME@SETTING runs a model on another setting than its default


def _device(args):
    """--device, with auto resolved: cuda where there is one, else cpu."""
    return args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def matmul_peak(device, n=1024, reps=10, warmup=2, clock=time.perf_counter):
    """FLOP/s of a large fp32 (bf16 on CUDA) matmul on this device, measured now (median, by `clock`): the MFU
    denominator; by CPU time (clock=time.process_time), the rate that bounds a CPU step (--wall's floor)."""
    dt = torch.bfloat16 if device.startswith("cuda") else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dt), torch.randn(n, n, device=device, dtype=dt)
    return 2 * n ** 3 / timeit(lambda: a @ b, reps, warmup, device, statistics.median, clock)


def bench_step(model, batch, amp=contextlib.nullcontext):
    """The step bench times: one forward (in the amp context) + backward + AdamW step of model on batch, a closure."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        with amp():
            loss = model(batch)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def data_ms(ds, batch_size, n=5, start=1000):
    """Median ms to draw one training batch (batch_size rows) at n fresh indices: the data path's cost per step."""
    idx = iter(range(start, start + n))
    return 1e3 * timeit(lambda: ds.get_batch("train", batch_size, next(idx)), n, 0, stat=statistics.median)


_NO_LAUNCH = {"aten::" + op for op in (   # views, allocations and scalar reads: no kernel launch of their own
    "empty empty_strided empty_like view _unsafe_view as_strided reshape _reshape_alias t transpose permute expand "
    "unsqueeze squeeze select slice alias detach unbind split split_with_sizes chunk narrow view_as lift_fresh resize_ "
    "set_ item _local_scalar_dense is_nonzero result_type to _to_copy resolve_conj resolve_neg contiguous").split()}


def profiled_events(step, device):
    """torch.profiler's events of one call of step() (CPU ops; and CUDA kernels on a GPU)."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.startswith("cuda")
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    return prof.events()


def launch_count(step, device):
    """Kernel launches in one call of step(), from torch.profiler: CUDA kernels on a GPU; on CPU the leaf aten ops
    that compute (views and allocations excluded): each is at least one kernel launch on a GPU, where a tiny model's
    step is bound by launch overhead rather than FLOPs."""
    ev = profiled_events(step, device)
    if device.startswith("cuda"):
        return sum(e.device_type == torch.autograd.DeviceType.CUDA for e in ev)
    computes = lambda e: e.name.startswith("aten::") and e.name not in _NO_LAUNCH
    return sum(computes(e) and not any(computes(c) for c in e.cpu_children) for e in ev)   # innermost ones only


BENCH_OVERRIDES = {"blt": dict(patching="space")}  # blt's default entropy patching needs a trained entropy model


def bench_one(name, device, reps, scale_tokens):
    """One model at its default config and setting, in this (child) process. Returns a dict."""
    import resource
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    name, _, setting = name.partition("@")
    model, cfg, tc, ds = train.build(name, setting or None, device=device, overrides=BENCH_OVERRIDES.get(name))
    batch = train.to(ds.get_batch("train", tc.batch_size, 0), device)
    fpt = train.count_flops(model, batch)
    s = timeit(bench_step(model, batch), reps, 2, device, statistics.median)   # median step after 2 warm-up steps
    launches, tokens = launch_count(bench_step(model, batch), device), tc.batch_size * tc.seq_len
    mem = (torch.cuda.max_memory_allocated() if device.startswith("cuda")
           else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024)
    out = dict(model=name, setting=tc.setting, params=sum(p.numel() for p in model.parameters()), scaling={},
               batch=f"{tc.batch_size}x{tc.seq_len}", ms_step=1000 * s, tokens_s=tokens / s, peak_mem_mb=mem / 2 ** 20,
               flops_per_token=fpt, flops_s=fpt * tokens / s, data_ms=data_ms(ds, tc.batch_size), launches=launches)
    base = tc.seq_len if tc.setting != "bytes" else tc.seq_len // 2   # 256..2048 tokens; 1024..8192 bytes
    for L in (base, 2 * base, 4 * base, 8 * base):  # time per token as the sequence length doubles
        model, cfg, tc2, ds = train.build(name, setting or None, device=device, overrides=BENCH_OVERRIDES.get(name),
                                          train_overrides=dict(seq_len=L))
        b = max(1, scale_tokens // L)
        step = bench_step(model, train.to(ds.get_batch("train", b, 0), device))
        out["scaling"][L] = 1e6 * timeit(step, max(2, reps // 2), 2, device, statistics.median) / (b * L)
    return out


# The sizes at which other implementations were timed on these CPUs (batch 8 x 256, fwd + bwd): what a user gets elsewhere.
PEERS = (  # (label, model, setting, Config overrides, the peer's figure)
    ("Transformer d128 x 4", "dense", "chameleon", dict(d_model=128, n_layer=4), "93 ms/step"),
    ("Mamba d128 x 4", "mamba", "chameleon", dict(d_model=128, n_layer=4), "mamba.py 23x, HF CPU path 350x the Transformer"),
    ("MEGABYTE", "megabyte", "bytes", dict(), "MEGABYTE-pytorch 14.7k tokens/s at 2.3M"),
    ("Megalodon d128 x 2", "megalodon", "bytes", dict(d_model=128, n_layers=2, z_dim=32, v_dim=256, ffn_dim=256,
                                                     norm_groups=16, chunk_size=256), "megalodon-hf 10.5k tokens/s at 0.5M"),
)


def bench_peers(args):
    """Our models at the peers' sizes, batch 8 x 256, fwd + bwd + AdamW (median step)."""
    device = _device(args)
    rows, base = [], None
    for label, name, setting, over, peer in PEERS:
        model, cfg, tc, ds = train.build(name, setting, overrides=over, device=device, train_overrides=dict(seq_len=256))
        s = timeit(bench_step(model, train.to(ds.get_batch("train", 8, 0), device)), args.reps, 2, device, statistics.median)
        base = base or s
        r = dict(label=label, params=sum(p.numel() for p in model.parameters()), ms_step=1000 * s,
                 tokens_s=8 * 256 / s, x_transformer=s / base, peer=peer)
        rows.append(r)
        print(f"  {label:22s} {r['params'] / 1e6:5.2f}M {r['ms_step']:8.1f} ms/step {r['tokens_s']:9,.0f} tokens/s "
              f"{r['x_transformer']:5.2f}x the Transformer   peer: {peer}")
    return rows


def bench_models(args):
    device, reg, rows = _device(args), train.registry(), []
    names = args.models if args.models else [n for n in DEFAULT_MODELS if n.partition("@")[0] in reg]
    peak = matmul_peak(device)
    for n in names:  # each model in its own process, so that its peak memory is its own
        r = subprocess.run([sys.executable, __file__, "--_one", n, "--device", device, "--reps", str(args.reps),
                            "--scale_tokens", str(args.scale_tokens)], capture_output=True, text=True)
        if r.returncode:
            print(f"{n}: failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
            continue
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(f"  {n} done", file=sys.stderr, flush=True)
    dense = {r["setting"]: r for r in rows if r["model"] == "dense"}
    print(f"\ndevice {device}, {torch.get_num_threads()} threads; matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(f"{'model':16s} {'setting':12s} {'params':>8s} {'batch':>8s} {'ms/step':>9s} {'data ms':>8s} {'x dense':>8s} "
          f"{'tok/s':>9s} {'MiB':>7s} {'MFU':>6s} {'launch':>6s}   us/token at 4 doubling lengths (ratio last/first)")
    for r in rows:
        d, sc, ls = dense.get(r["setting"]), r["scaling"], sorted(r["scaling"], key=int)
        r.update(mfu=r["flops_s"] / peak, x_dense=r["ms_step"] / d["ms_step"] if d else None,
                 data_share=r["data_ms"] / (r["data_ms"] + r["ms_step"]))
        xd = f"{r['x_dense']:.2f}" if d else "-"
        print(f"{r['model']:16s} {r['setting']:12s} {r['params'] / 1e6:7.2f}M {r['batch']:>8s} {r['ms_step']:9.1f} "
              f"{r['data_ms']:8.1f} {xd:>8s} {r['tokens_s']:9,.0f} {r['peak_mem_mb']:7.0f} {100 * r['mfu']:5.1f}% "
              f"{r['launches']:6d}   "
              + " ".join(f"{L}:{sc[L]:.1f}" for L in ls) + f"  ({sc[ls[-1]] / sc[ls[0]]:.2f}x)")
    print("data ms = drawing one training batch (ds.get_batch, default batch, median of 5 fresh indices) in the step's "
          "process; launch = kernels per step (CUDA) or compute ops per step (CPU; each >= 1 launch on a GPU)")
    return dict(device=device, threads=torch.get_num_threads(), matmul_peak_flops=peak, models=rows,
                data=bench_data(rows))


def bench_data(rows=()):
    """Data ms per batch for every setting at its default batch, beside the model steps measured on it."""
    import data
    out = []
    print(f"\n{'setting':12s} {'batch':>8s} {'data ms':>8s}   share of each model's step on that setting")
    for s in data.SETTINGS:
        d = train.SETTING_DEFAULTS[s]
        ms = data_ms(data.make_data(s, seq_len=d["seq_len"]), d["batch_size"])
        share = {r["model"]: round(ms / (ms + r["ms_step"]), 3) for r in rows if r["setting"] == s}
        out.append(dict(setting=s, batch=f"{d['batch_size']}x{d['seq_len']}", data_ms=ms, share_of_step=share))
        print(f"{s:12s} {out[-1]['batch']:>8s} {ms:8.1f}   " + " ".join(f"{m} {100 * v:.0f}%" for m, v in share.items()))
    return out


# ------------------------------------------------------------------------------------------------ wall time
# `python bench.py --wall [RUN ...]`: what each headline run's wall time is made of, measured in this process with
# train.py's own pieces, and projected to the whole run. Not a training run: a few steps per model (median). Made for
# the CPU time targets (the verdict reads CPU time, robust to other jobs); on CUDA read the wall projection.

BLT_ENTROPY = "docs/runs/bytes/blt-entropy/ckpt.pt"   # the bytes compare's entropy model; patching=space without it
WALL_RUNS = {  # name: the command as a user types it, its models, setting, steps; its target (s) and time before if any
    "default": dict(cmd="python train.py", models=("mot",), setting="chameleon", steps=1800, target_s=120,
                    before_s=194, before="194 s alone"),
    "chameleon": dict(cmd="python train.py --compare dense,mot --setting chameleon", models=("dense", "mot"),
                      setting="chameleon", steps=1800, target_s=300, before_s=390, before="RESULTS: ~6.5 min"),
    "speech": dict(cmd="python train.py --compare dense,mot --setting speech", models=("dense", "mot"),
                   setting="speech", steps=1800, before_s=360, before="RESULTS: ~6 min"),
    "mom": dict(cmd="python train.py --compare mamba,mom --setting chameleon --steps 600", models=("mamba", "mom"),
                setting="chameleon", steps=600),
    "transfusion": dict(cmd="python train.py --compare transfusion,transfusion-mot --steps 600",
                        models=("transfusion", "transfusion-mot"), setting="transfusion", steps=600),
    "bytes": dict(cmd="python train.py --compare dense,megabyte,blt,megalodon --setting bytes --entropy_ckpt "
                      + BLT_ENTROPY, models=("dense", "megabyte", "blt", "megalodon"), setting="bytes", steps=400),
}

# The step's time by category: each profiled op's self time goes to the category of the OUTERMOST event around it
# (itself included) whose name matches one of these patterns (checked in order; "aten::" stripped): an op inside
# aten::linear is matmul, one inside cross_entropy is loss, one inside the optimizer is the optimizer's. The regions
# bench labels while it profiles (nanomix:REGION, split_by_category) count as events, as do torch's own labels
# (AdamW's Optimizer.step# and zero_grad#, the scans' backward nodes *Scan*Backward). Other aten ops are "elementwise
# & norms", except views and allocations (_NO_LAUNCH), which join the non-aten time (autograd engine nodes, other
# labelled Python) in "other". Python between top-level ops is in no event: shares are of the profiled total, a
# little under the step's time.
WALL_CATEGORIES = (
    ("optimizer", r"^nanomix:optimizer$|^Optimizer\.(step|zero_grad)#"),
    ("scan/FFT", r"^nanomix:scan$|Scan\w*Backward|(^|_)fft_|^_fft"),
    ("loss", r"cross_entropy|log_softmax|nll_loss|mse_loss|binary_cross_entropy|l1_loss"),
    ("attention", r"scaled_dot_product|flash_attention|efficient_attention|^_?softmax(_backward_data)?$"),
    ("matmul", r"^nanomix:grouped_matmul$|^(mm|bmm|addmm|addmv|mv|matmul|linear|baddbmm|addbmm|dot|einsum|_grouped_mm|"
               r"convolution|_convolution|convolution_backward|conv1d|conv2d|mkldnn_convolution)$"),
    ("gather/scatter/routing", r"^nanomix:routing$|^(index|index_select|index_add_?|index_put_?|_index_put_impl_|"
                               r"index_copy_?|index_fill_?|gather|scatter_?|scatter_add_?|scatter_reduce_?|embedding|"
                               r"embedding_backward|embedding_dense_backward|sort|argsort|topk|nonzero|masked_select|"
                               r"masked_scatter_?|bincount|histc|take|repeat_interleave|cat|stack|searchsorted|"
                               r"one_hot|_unique2|unique_dim|unique_consecutive)$"),
)
WALL_ORDER = ("matmul", "attention", "scan/FFT", "gather/scatter/routing", "elementwise & norms", "loss", "optimizer",
              "other")


def wall_category(chain):
    """Category of an op from its event chain [outermost, ..., the op] of profiler names (see WALL_CATEGORIES)."""
    for name in chain:
        n = name[6:] if name.startswith("aten::") else name
        for cat, pat in WALL_CATEGORIES:
            if re.search(pat, n):
                return cat
    op = chain[-1]
    return "elementwise & norms" if op.startswith("aten::") and op not in _NO_LAUNCH else "other"


def split_by_category(step, device):
    """torch.profiler over one call of step(), with bench's regions labelled: -> ({category: self time (ms)},
    profiled total (ms)); the categories add up to the total (every op's self time is in exactly one)."""
    from torch.profiler import record_function
    wrapped = {(kernels, "selective_scan"): "scan", (kernels, "linear_scan"): "scan", (kernels, "unsort"): "routing",
               (kernels, "sort_by_group"): "routing", (kernels, "grouped_matmul"): "grouped_matmul",
               (train, "clip_grads"): "optimizer"}   # a scan's region holds its Python loop too
    with contextlib.ExitStack() as labelled:   # each labelled (nanomix:REGION) while it profiles, then restored
        for (mod, k), what in wrapped.items():
            f = record_function(f"nanomix:{what}")(getattr(mod, k))
            labelled.enter_context(unittest.mock.patch.object(mod, k, f))
        events = profiled_events(step, device)
    cats = dict.fromkeys(WALL_ORDER, 0.0)
    for e in events:
        if e.device_type != torch.autograd.DeviceType.CPU:   # CUDA: each op's own kernels' time, by the op
            continue
        self_us = e.self_device_time_total if device.startswith("cuda") else e.self_cpu_time_total
        if not self_us:
            continue
        chain, p = [e.name], e.cpu_parent
        while p is not None:
            chain.append(p.name)
            p = p.cpu_parent
        cats[wall_category(chain[::-1])] += self_us / 1e3
    return cats, sum(cats.values())


def occurrences(steps, every, last=True):
    """How many of steps 1..steps train.py's loop acts at: `step % every == 0 or step == steps`."""
    return steps // every + (1 if last and steps % every else 0)


def _timed(f, *drawing, timeout_s=5.0):
    """f() -> (its result, (wall ms, CPU ms: this process, all its threads)), timed once each Prefetch thread in
    drawing has drawn as far ahead as it may (its queue full) or has ended: no drawing left over from an earlier step
    overlaps the timed one."""
    end = time.perf_counter() + timeout_s
    while any(p.thread.is_alive() and not p.q.full() for p in drawing) and time.perf_counter() < end:
        time.sleep(1e-3)
    t, c = time.perf_counter(), time.process_time()
    out = f()
    return out, (1e3 * (time.perf_counter() - t), 1e3 * (time.process_time() - c))


def wall_model(name, setting, steps, device="cpu", rounds=3, k=2, overrides=None, train_overrides=None):
    """One model of a headline run, timed with train.py's pieces, each by the wall clock and by CPU time: -> dict of
    ms per piece (key_ms wall, key_cpu_ms CPU), their counts in the run, and both projections (s)."""
    over = dict(overrides or {})
    if name == "blt" and setting == "bytes" and "patching" not in over:
        over.update(entropy_ckpt=BLT_ENTROPY) if os.path.isfile(BLT_ENTROPY) else over.update(patching="space")
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def setup():                                                        # build + the FLOPs count train.py makes first
        model, _, tc, ds = train.build(name, setting, over, device=device,
                                       train_overrides=dict(train_overrides or {}, steps=steps))
        micro = tc.micro_batch_size or tc.batch_size
        return model, tc, ds, micro, train.count_flops(
            model, [train.to(ds.get_batch("train", micro, i), device) for i in range(4)], parts=True)
    (model, tc, ds, micro, fl), start = _timed(setup)
    opt, sched = train.make_optimizer(model, tc)                       # train.py's optimizer and precision
    autocast, scaler = train.autocast_for(device, tc.precision), cli.grad_scaler(device, tc.precision)
    accum, records = tc.batch_size // micro, []

    def step(get):                                                      # train.py's own training step
        loss, parts, _, ok = train.train_step(model, [train.to(get(m), device) for m in range(accum)], opt, sched,
                                              tc, autocast, scaler=scaler)
        if not ok:
            raise RuntimeError(f"--wall: {name} diverged while timing")
        n = len(records) + 1
        records.append(dict(step=n, tokens=n * tc.batch_size * tc.seq_len, flops=n * tc.batch_size * tc.seq_len
                            * fl["total"], loss=loss, **parts))
        sync()

    fixed = [ds.get_batch("train", micro, 10_000 + i) for i in range(k * accum)]   # pre-drawn: the step alone
    pick = lambda i: (lambda m: fixed[(i * accum + m) % len(fixed)])
    on_dev = [train.to(b, device) for b in fixed]

    def pure(i):   # the pure model step: forward + backward of each micro-batch (on the device already) + AdamW
        for m in range(accum):
            with autocast():
                (model(on_dev[(i * accum + m) % len(on_dev)])[1] / accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()

    for i in range(2):                                                  # warm-up
        step(pick(i))
    cpu = [_timed(lambda: step(pick(i)))[1][1] for i in range(k + 1)]  # CPU time: no data thread alive
    ds.get_batch("train", micro, 19_999)                                # the data's first-use cost is start's
    draws = [_timed(lambda: [ds.get_batch("train", micro, 20_000 + i * accum + m) for m in range(accum)])[1]
             for i in range(3)]                                         # one training batch drawn inline
    # the rows of the steps fed prepared (ds.prepare: drawn before the steps, as a run would before its first step)
    first = 10 ** 6
    prep = _timed(lambda: ds.prepare("train", micro, first, first + rounds * k * accum))[1]
    fed, fed_prep, alone, bare, threaded = [], [], [], [], []
    pin, bg = device.startswith("cuda"), device != "cpu"     # as train.py feeds its loop: drawn in it on the CPU
    wall = lambda f, *drawing: _timed(f, *drawing)[1][0]                # wall ms, the threads settled first
    with contextlib.closing(train.Prefetch(ds, micro, 0, 1, 0, 10 ** 9, pin=pin, background=bg)) as batches, \
            contextlib.closing(train.Prefetch(ds, micro, 0, 1, first, first + rounds * k * accum, pin=pin,
                                              background=bg)) as ready:   # the prepared rows
        for rnd in range(rounds):     # wall, interleaved: fed as train.py feeds / over prepared rows / alone / pure
            for n in range(rnd * k, rnd * k + k):
                fed.append(wall(lambda: step(lambda m: batches.get(n * accum + m)), batches, ready))
                fed_prep.append(wall(lambda: step(lambda m: ready.get(first + n * accum + m)), batches, ready))
            for i in range(k):
                alone.append(wall(lambda: step(pick(i)), batches, ready))
                bare.append(wall(lambda: pure(i)))
    if not bg:   # on the CPU, the background thread train.py uses on a GPU: its cost, timed while it lives
        with contextlib.closing(train.Prefetch(ds, micro, 0, 1, 2 * 10 ** 6, 10 ** 9, pin=pin)) as thread:
            threaded = [wall(lambda: step(lambda m: thread.get(2 * 10 ** 6 + n * accum + m)), thread)
                        for n in range(rounds * k)]
    cats, prof_total = split_by_category(lambda: step(pick(0)), device)
    ev, ev_t = _timed(lambda: train.evaluate(model, ds, tc, 0, 1, device, autocast, micro))
    gen = bool(tc.gen_n and train.has_gen_eval(model, ds))
    g, gen_t = _timed(lambda: train.generation_metrics(model, ds, tc)) if gen else ({}, (0.0, 0.0))
    ev.update(g)
    with tempfile.TemporaryDirectory(prefix="nanomix_wall_", ignore_cleanup_errors=True) as tmp:
        _, ckpt_t = _timed(lambda: train.save_ckpt(os.path.join(tmp, "ckpt.pt"), dict(
            model=model.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(), step=1, time=0.0,
            config=dict(model=name), rng=train.rng_state(), data_position=1, flops_per_token=fl["total"])))
        with open(os.path.join(tmp, "metrics.jsonl"), "w") as f:      # the timed steps' log + the eval: figures
            f.writelines(json.dumps(r) + "\n" for r in records + [dict(step=len(records), tokens=records[-1]["tokens"],
                                                                       flops=records[-1]["flops"], **ev)])
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(dict(model=name, setting=tc.setting), f)
        import plots
        with contextlib.redirect_stdout(sys.stderr):
            _, fig_t = _timed(lambda: (plots.plot_run(tmp), plots.model_figures(model, ds, tmp)))
    med, per_step = statistics.median, rounds * k
    r = dict(model=name, setting=tc.setting, steps=steps, batch=f"{tc.batch_size}x{tc.seq_len}",
             step_ms=med(alone), fed_step_ms=med(fed), step_cpu_ms=med(cpu), pure_step_ms=med(bare),
             fed_prepared_step_ms=med(fed_prep), prepare_ms=prep[0] / per_step,
             thread_step_ms=med(threaded) if threaded else None, prepare_cpu_ms=prep[1] / per_step,
             data_ms=med(w for w, _ in draws), data_cpu_ms=med(c for _, c in draws),
             eval_ms=ev_t[0], eval_cpu_ms=ev_t[1], n_eval=occurrences(steps, tc.eval_every),
             gen_ms=gen_t[0], gen_cpu_ms=gen_t[1], ckpt_ms=ckpt_t[0], ckpt_cpu_ms=ckpt_t[1],
             n_ckpt=occurrences(steps, tc.ckpt_every), start_s=start[0] / 1e3, start_cpu_s=start[1] / 1e3,
             figures_s=fig_t[0] / 1e3, figures_cpu_s=fig_t[1] / 1e3, categories_ms=cats, profiled_ms=prof_total,
             flops_per_step=fl["total"] * tc.batch_size * tc.seq_len,
             timed_steps=len(fed) + len(fed_prep) + len(alone) + len(cpu) + len(threaded),
             blt_patching=over.get("patching", "entropy") if name == "blt" else None,
             n_gen=sum((s % tc.eval_every == 0 or s == steps) and (s % tc.gen_every == 0 or s == steps)
                       for s in range(1, steps + 1)) if gen else 0)   # at the evals where step % gen_every == 0
    r["data_steal_ms"] = r["fed_step_ms"] - r["step_ms"]
    r["in_loop_ratio"] = r["fed_step_ms"] / r["pure_step_ms"]          # train.py's step as it runs / the model's
    r["in_loop_prepared_ratio"] = r["fed_prepared_step_ms"] / r["pure_step_ms"]   # the same, its rows prepared
    r["thread_ratio"] = r["thread_step_ms"] / r["pure_step_ms"] if threaded else None   # a background thread (CPU)
    r["projected_s"], r["projected_cpu_s"] = wall_projection(r), wall_projection(r, cpu=True)
    return r


def wall_projection(r, cpu=False):
    """Seconds of one model's run in a train.py process: its steps, evals, generation evals, checkpoints, build +
    FLOPs count and end-of-run figures. Wall (cpu=False): each step as measured fed as train.py feeds it, under
    whatever else the machine runs now. CPU (cpu=True): CPU seconds of every piece, a step's plus one batch's draw
    (the thread's work, here charged in full): the run alone on one core with one torch thread."""
    c = "_cpu" if cpu else ""
    steps = r["steps"] * (r["step_cpu_ms"] + r["data_cpu_ms"] if cpu else r["fed_step_ms"])
    return sum((r[f"n_{k}"] * r[f"{k}{c}_ms"] for k in ("eval", "gen", "ckpt")), steps) / 1e3 + r[f"start{c}_s"] \
        + r[f"figures{c}_s"]


def process_start_s():
    """(wall, CPU) seconds of a fresh `python -c "import train"` (torch + the model files): paid once per command."""
    import resource
    ru = lambda: (lambda u: u.ru_utime + u.ru_stime)(resource.getrusage(resource.RUSAGE_CHILDREN))
    t, c = time.perf_counter(), ru()
    subprocess.run([sys.executable, "-c", "import train"], cwd=HERE, check=True)
    return time.perf_counter() - t, ru() - c


def wall_run(name, spec, measured, start, device="cpu", peak=None, **kw):
    """One headline run: its models measured (cached in `measured` across runs), projected and judged. The verdict
    and the step time needed use the CPU projection (the run alone on one core); the wall one is printed beside."""
    models = []
    for m in spec["models"]:
        key = (m, spec["setting"], spec["steps"])
        if key not in measured:
            print(f"  timing {m} on {spec['setting']} ({spec['steps']} steps) ...", file=sys.stderr, flush=True)
            measured[key] = wall_model(m, spec["setting"], spec["steps"], device, overrides=spec.get("overrides",
                                       {}).get(m), train_overrides=spec.get("train_overrides"), **kw)
        models.append(measured[key])
    steps_s = sum(r["steps"] * (r["step_cpu_ms"] + r["data_cpu_ms"]) for r in models) / 1e3
    total, wall = start[1] + sum(r["projected_cpu_s"] for r in models), start[0] + sum(r["projected_s"] for r in models)
    pure = sum(r["steps"] * r["pure_step_ms"] / 1e3 for r in models)      # the run's steps as pure model steps
    out = dict(run=name, cmd=spec["cmd"], models=models, process_start_s=start[0], process_start_cpu_s=start[1],
               projected_s=wall, projected_cpu_s=total, steps_s=steps_s, other_s=total - steps_s,
               target_s=spec.get("target_s"), wall_over_pure=wall / pure, before_s=spec.get("before_s"),
               before=spec.get("before"))
    # the same run with its rows prepared before its steps: each step fed prepared, plus the prepare (per step)
    out["wall_over_pure_prepared"] = (wall + sum(r["steps"] * (r["fed_prepared_step_ms"] + r["prepare_ms"]
                                                 - r["fed_step_ms"]) for r in models) / 1e3) / pure
    out["two_thirds_s"] = 2 / 3 * out["before_s"] if out["before_s"] else None
    goal = out["goal_s"] = out["target_s"] or out["two_thirds_s"]
    n_steps = sum(r["steps"] for r in models)
    if goal:
        room = goal - out["other_s"]            # what is left for the training steps once evals etc. are paid
        out.update(met=total <= goal, need_step_ms=1e3 * room / n_steps if room > 0 else 0.0,
                   need_speedup=steps_s / room if room > 0 else float("inf"))
    cat = out["steps_by_category_s"] = dict.fromkeys(WALL_ORDER, 0.0)   # the steps' time by category, by steps
    for r in models:
        for c, ms in r["categories_ms"].items():
            cat[c] += r["steps"] * r["step_cpu_ms"] * ms / r["profiled_ms"] / 1e3
    cat["data"] = sum(r["steps"] * r["data_cpu_ms"] for r in models) / 1e3    # the batches' draws
    if peak:   # every FLOP of the run's steps at the matmul peak: no step can be faster than this (mean ms)
        out["floor_step_ms"] = 1e3 * sum(r["steps"] * r["flops_per_step"] for r in models) / peak / n_steps
    return out


def print_wall(runs, device, threads, load=None, peak=None):
    """The table a teacher can quote, then each model's pieces and its step's split."""
    print(f"\nwall time of the headline runs, projected from pieces measured in this process (device {device}, "
          f"{threads} torch thread(s); a few steps per model, median; not a training run)"
          + (f"; load average {min(load):.1f}-{max(load):.1f} on {os.cpu_count()} cores while measuring" if load else ""))
    print(f"{'run':12s} {'1 core':>7s} {'now':>7s} {'goal':>6s} {'':6s} {'steps':>6s} {'rest':>5s}  "
          f"{'to meet the goal a step must take':42s} {'floor':>6s}  the steps' biggest part")
    for w in runs:
        goal, mean = w.get("goal_s"), 1e3 * w["steps_s"] / sum(r["steps"] for r in w["models"])
        verdict = ("MET" if w["met"] else "missed") if goal else "-"
        need = ("no goal: time before not recorded" if not goal else "impossible: evals etc. alone exceed it"
                if w["need_speedup"] == float("inf") else
                f"<= {w['need_step_ms']:.0f} ms, now {mean:.0f} ({w['need_speedup']:.1f}x faster)")
        top = max(w["steps_by_category_s"].items(), key=lambda kv: kv[1])
        floor = f"{w['floor_step_ms']:.0f}ms" if w.get("floor_step_ms") else "-"
        print(f"{w['run']:12s} {w['projected_cpu_s']:6.0f}s {w['projected_s']:6.0f}s "
              f"{(f'{goal:.0f}s' if goal else '-'):>6s} {verdict:6s} {w['steps_s']:5.0f}s {w['other_s']:4.0f}s  "
              f"{need:42s} {floor:>6s}  {top[0]} {100 * top[1] / w['steps_s']:.0f}%")
    print("1 core = CPU seconds of every piece (steps x (a step + one batch's draw); evals, generation evals, "
          "checkpoints x their counts; build + FLOPs count, end figures, process start): the run alone on one core and "
          "thread, whatever else runs (the verdict uses it); now = the same from wall times now, steps fed as train.py "
          "feeds them; steps / rest = 1-core seconds in training steps / in the rest; goal = the run's target (default "
          "2 min, chameleon compare 5 min) or 2/3 of the time before; floor = the mean step's FLOPs (count_flops: "
          "forward + backward, all work) at this core's fp32 matmul peak"
          + (f" ({peak / 1e9:.0f} GFLOP/s by CPU time)" if peak else "") + ": no step is faster. Commands:")
    for w in runs:
        print(f"  {w['run']:12s} {w['cmd']}" + (f"   (before: {w['before']})" if w["before"] else ""))
    print(f"\n{'run':12s} {'model':16s} {'steps':>5s} {'step ms':>8s} {'cpu ms':>7s} {'fed ms':>7s} {'data':>6s} "
          f"{'eval ms x n':>11s} {'gen ms x n':>12s} {'ckpt x n':>9s} {'start+figs':>10s} {'1 core':>7s} {'now':>7s}")
    for w in runs:
        for r in w["models"]:
            print(f"{w['run']:12s} {r['model']:16s} {r['steps']:5d} {r['step_ms']:8.1f} {r['step_cpu_ms']:7.1f} "
                  f"{r['fed_step_ms']:7.1f} {r['data_cpu_ms']:6.1f} {r['eval_cpu_ms']:6.0f} x{r['n_eval']:3d} "
                  f"{r['gen_cpu_ms']:7.0f} x{r['n_gen']:3d} {r['ckpt_cpu_ms']:4.0f} x{r['n_ckpt']:3d} "
                  f"{r['start_cpu_s'] + r['figures_cpu_s']:9.1f}s {r['projected_cpu_s']:6.0f}s {r['projected_s']:6.0f}s")
    print("step ms = forward + backward + clip + AdamW + lr step, wall, pre-drawn batches; cpu ms = its CPU time; fed "
          "ms = wall, batches fed as train.py feeds them (rundir.Prefetch: drawn in the loop on the CPU, by a background "
          "thread on a GPU); data = CPU ms to draw one batch; eval, gen, ckpt, start+figs: CPU")
    print_loop_ratios(runs)
    print("\nthe step's time by category (torch.profiler self time, % of the profiled step; bench.WALL_CATEGORIES)")
    print(f"{'model':16s} {'setting':11s} {'prof ms':>8s} " + " ".join(f"{c[:12]:>12s}" for c in WALL_ORDER))
    first = {}                                  # each model and setting once, as first measured
    for r in (r for w in runs for r in w["models"]):
        first.setdefault((r["model"], r["setting"]), r)
    for r in first.values():
        print(f"{r['model']:16s} {r['setting']:11s} {r['profiled_ms']:8.1f} "
              + " ".join(f"{100 * r['categories_ms'][c] / r['profiled_ms']:11.1f}%" for c in WALL_ORDER))


def print_loop_ratios(runs, threads=None):
    """The in-loop step against the pure model step, per model, and the run's wall against its steps x pure step."""
    t = f"{'threads':>7s} " if threads else ""
    print(f"\n{'run':12s} {'model':16s} {t}{'pure ms':>8s} {'in-loop ms':>10s} {'in-loop/pure':>12s} "
          f"{'prepared':>9s} {'thread':>7s}  wall/(steps x pure): in-loop, prepared")
    for w, i, r in ((w, i, r) for w in runs for i, r in enumerate(w["models"])):
        t = f"{w['threads']:7d} " if threads else ""
        th = f"{r['thread_ratio']:6.2f}x" if r.get("thread_ratio") else f"{'-':>7s}"
        print(f"{w['run']:12s} {r['model']:16s} {t}{r['pure_step_ms']:8.1f} {r['fed_step_ms']:10.1f} "
              f"{r['in_loop_ratio']:11.2f}x {r['in_loop_prepared_ratio']:8.2f}x {th}  "
              + (f"{w['wall_over_pure']:.2f}x (the run), {w['wall_over_pure_prepared']:.2f}x" if i == 0 else ""))
    print("pure = forward + backward + AdamW, batches on the device, no data thread alive; in-loop = train.train_step "
          "fed as train.py feeds it (fed ms; on the CPU each batch drawn in the loop); prepared = the same over rows "
          "drawn before the steps (ds.prepare; the run's wall then counts it); thread = fed by a background drawing "
          "thread (a GPU run's), timed while it lives; goals: in-loop <= 1.05x pure, wall (now) <= 1.15x steps x pure")


def bench_wall(args, runs=None):
    """python bench.py --wall [RUN ...]: -> list of run dicts (also printed)."""
    runs = runs or WALL_RUNS
    names = args.wall or list(runs)
    bad = [n for n in names if n not in runs]
    if bad:
        print(f"bench.py --wall: unknown run {', '.join(bad)}; choose from {', '.join(runs)}", file=sys.stderr)
        raise SystemExit(2)
    device, start = _device(args), process_start_s()
    by_threads, threads_before = {}, torch.get_num_threads()
    for threads in getattr(args, "threads", None) or [threads_before]:   # one process, each thread count in turn
        torch.set_num_threads(threads)
        load = [os.getloadavg()[0]]
        peak = matmul_peak("cpu", reps=7, warmup=1, clock=time.process_time) if device == "cpu" else None
        measured, out = {}, []
        for n in names:
            out.append(wall_run(n, runs[n], measured, start, device, peak))
            load.append(os.getloadavg()[0])
        for w in out:
            w.update(load_average=(min(load), max(load)), matmul_peak_flops=peak, threads=threads)
        print_wall(out, device, threads, load, peak)
        by_threads[threads] = out
    torch.set_num_threads(threads_before)
    if len(by_threads) > 1:
        print(f"\nin-loop and wall ratios by torch threads (one process; {', '.join(map(str, by_threads))} threads)")
        print_loop_ratios([w for out in by_threads.values() for w in out], threads=True)
    return [w for out in by_threads.values() for w in out]


# ------------------------------------------------------------------------------------------------ helpers

def timeit(fn, reps=5, warmup=1, device="cpu", stat=min, clock=time.perf_counter):
    """stat (minimum, or e.g. statistics.median) of fn()'s time by `clock` (wall; time.process_time: CPU) over reps
    after warmup, in seconds; synchronises CUDA around each call."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        t = clock()
        fn()
        sync()
        times.append(clock() - t)
    return stat(times)


def fwd_bwd(f, inputs):
    """A closure running f(*inputs) forward and backward (sum of outputs) with fresh grads."""
    def run():
        for t in inputs:
            t.grad = None
        out = f(*inputs)
        out = out[0] if isinstance(out, tuple) else out
        (out.real if out.is_complex() else out).float().sum().backward()
    return run


def fwd_only(f, inputs):
    """A closure running f(*inputs) forward only (no autograd)."""
    return lambda: torch.no_grad()(f)(*inputs)


def sizes(device):
    """Benchmark sizes: realistic GPU sizes; reduced on CPU where the naive baseline needs them."""
    if device == "cuda":
        return dict(selective=dict(b=8, d=1536, n=16, L=2048), scan=dict(b=8, d=1536, L=2048),
                    cema=dict(b=8, d=128, n=16, L=2048), gmm=dict(groups=(2048, 1536, 512), K=1024, M=1024),
                    naive_selective=dict(b=1, d=256, n=16, L=256))
    return dict(selective=dict(b=8, d=256, n=16, L=256), scan=dict(b=8, d=256, L=1024),
                cema=dict(b=2, d=64, n=16, L=512), gmm=dict(groups=(2048, 1536, 512), K=1024, M=1024),
                naive_selective=dict(b=8, d=256, n=16, L=256))


def selective_inputs(b, d, n, L, device, dtype=torch.float32, grad=True):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(device, dtype).requires_grad_(grad)
    u, delta, B, C, z = mk(b, d, L), mk(b, d, L), mk(b, n, L), mk(b, n, L), mk(b, d, L)
    A = (-torch.rand(d, n, generator=g) - 0.5).to(device).requires_grad_(grad)
    D, bias = mk(d), mk(d)
    return [u, delta, A, B, C, D, z, bias]


def scan_inputs(shape, dt):
    """a (magnitude 0.45-0.95; complex: a small phase) and b for linear_scan, on the CPU."""
    g = torch.Generator().manual_seed(0)
    mag = torch.rand(shape, generator=g) * 0.5 + 0.45
    a = torch.polar(mag, torch.randn(shape, generator=g) * 0.1) if dt.is_complex else mag
    return a, torch.randn(shape, generator=g, dtype=dt)


def gmm_inputs(groups, K, M, device, dtype):
    g = torch.Generator().manual_seed(0)
    T = sum(groups)
    x = (torch.randn(T, K, generator=g) / K ** 0.5).to(device, dtype).requires_grad_()
    w = torch.randn(len(groups), K, M, generator=g).to(device, dtype).requires_grad_()
    return x, w, torch.tensor(groups, device=device)


# ------------------------------------------------------------------------------------------------ kernels

def bench_kernels(args):
    """Each kernel against its naive baseline and the torch path, forward and forward+backward; on a GPU also the
    Triton kernels with achieved GB/s or TFLOP/s as a fraction of the measured ceiling (copy bandwidth, dense mm)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    S, reps, rows = sizes(device), args.reps, []

    def row(kernel, impl, size, fwd_s, fb_s, note="", work=None):
        r = dict(kernel=kernel, impl=impl, size=size, fwd_ms=round(fwd_s * 1e3, 2) if fwd_s else None,
                 fwd_bwd_ms=round(fb_s * 1e3, 2) if fb_s else None, note=note)
        if work and fwd_s:   # achieved rate of the forward
            r.update({k: round(v / fwd_s / 1e9, 1) for k, v in work.items()})
        rows.append(r)
        print(f"  {kernel:16s} {impl:28s} {size:34s} fwd {r['fwd_ms']!s:>9} ms  fwd+bwd {r['fwd_bwd_ms']!s:>9} ms  {note}",
              flush=True)

    impls = [("torch", "torch path")] + ([("triton", "triton")] if device == "cuda" else [])

    def times(f, ins, fb_reps=reps):   # (forward, forward + backward) seconds, the minimum of reps (fb_reps)
        return timeit(fwd_only(f, ins), reps, device=device), timeit(fwd_bwd(f, ins), fb_reps, device=device)

    # --- selective scan (Mamba's S6) ---
    p, q = S["selective"], S["naive_selective"]
    size, ins = "b={b} d={d} N={n} L={L}".format(**p), selective_inputs(**p, device=device)
    f_bytes = 4 * (3 * p["b"] * p["d"] * p["L"] + 2 * p["b"] * p["n"] * p["L"])      # u, delta, y; B, C (fp32)
    nins = selective_inputs(**q, device=device)
    naive = lambda *x: kernels.selective_scan_ref(*x, delta_softplus=True)
    row("selective_scan", "naive: loop + autograd, (b,d,L,N)", "b={b} d={d} N={n} L={L}".format(**q),
        *times(naive, nins, max(1, reps // 2)), "mamba_ssm selective_scan_ref semantics")
    for backend, name in impls:
        f = lambda *x, backend=backend: kernels.selective_scan(*x, delta_softplus=True, backend=backend)
        row("selective_scan", name, size, *times(f, ins), work=dict(GBps=f_bytes) if device == "cuda" else None)
        if q == p and device == "cpu" and backend == "torch":
            rows[-1]["speedup_vs_naive_fwd_bwd"] = round(rows[-2]["fwd_bwd_ms"] / rows[-1]["fwd_bwd_ms"], 1)

    # --- linear scan, real (Mamba-style diagonal recurrence) and complex (Megalodon's CEMA) ---
    for kind, dt, size in (("scan", torch.float32, "real fp32 b={b} d={d} L={L}"),
                           ("cema", torch.complex64, "complex64 b={b} d={d} N={n} L={L}")):
        p = S[kind]
        shape, size = tuple(p[k] for k in ("b", "d", "n", "L") if k in p), size.format(**p)
        a, b = [x.to(device).requires_grad_() for x in scan_inputs(shape, dt)]
        nbytes = 3 * a.numel() * a.element_size()                                  # read a, b; write h
        if device == "cpu":
            row("linear_scan", "naive: loop + autograd", size, *times(kernels.linear_scan_ref, [a, b], max(1, reps // 2)))
        for backend, name in impls:
            f = lambda a, b, backend=backend: kernels.linear_scan(a, b, backend=backend)
            row("linear_scan", name, size, *times(f, [a, b]), work=dict(GBps=nbytes) if device == "cuda" else None)

    # --- grouped matmul: 3 uneven groups ---
    p = S["gmm"]
    for dt in ([torch.float32] if device == "cpu" else [torch.bfloat16, torch.float32]):
        x, w, gs = gmm_inputs(p["groups"], p["K"], p["M"], device, dt)
        T = x.shape[0]
        size = f"{str(dt)[6:]} T={T} groups={list(p['groups'])} K={p['K']} M={p['M']}"
        flops = 2 * T * p["K"] * p["M"]
        dense = lambda x, w: x @ w[0]
        row("grouped_matmul", "dense x @ w[0] (same shape)", size, *times(dense, [x, w]), "the ceiling to compare with",
            work=dict(TFLOPs=flops / 1e3))
        rows_group = torch.repeat_interleave(torch.arange(len(p["groups"]), device=device), gs)
        masked = lambda x, w: torch.einsum("tk,gkm->gtm", x, w)[rows_group, torch.arange(T, device=device)]
        row("grouped_matmul", "naive: every group on all rows", size, *times(masked, [x, w], max(1, reps // 2)),
            "G x the FLOPs", work=dict(TFLOPs=flops / 1e3))
        if device == "cpu":
            row("grouped_matmul", "per-group loop (= torch path)", size,
                *times(lambda x, w: kernels.grouped_matmul_ref(x, w, gs), [x, w]), work=dict(TFLOPs=flops / 1e3))
        for backend, name in impls:
            f = lambda x, w, backend=backend: kernels.grouped_matmul(x, w, gs, backend=backend)
            row("grouped_matmul", name, size, *times(f, [x, w]), work=dict(TFLOPs=flops / 1e3))

    result = dict(device=device, machine=machine(), rows=rows)
    if device == "cuda":
        result["ceilings"] = ceilings()   # the measured copy bandwidth and bf16 matmul rate
        for r in rows:
            if "GBps" in r:
                r["frac_of_copy_bw"] = round(r["GBps"] / result["ceilings"]["copy_GBps"], 2)
            if "TFLOPs" in r:
                r["frac_of_dense_mm"] = round(r["TFLOPs"] / result["ceilings"]["mm_bf16_TFLOPs"], 2)
    return result


def ceilings(dtype=torch.bfloat16):
    """Measured ceilings of this GPU: copy bandwidth (copy_GBps) and a large matmul in dtype (mm_bf16/fp16_TFLOPs)."""
    x, y = (torch.empty(256 * 2 ** 20, dtype=torch.float32, device="cuda") for _ in range(2))
    t, a = timeit(lambda: y.copy_(x), 10, device="cuda"), torch.randn(8192, 8192, dtype=dtype, device="cuda")
    tm = timeit(lambda: a @ a, 10, device="cuda")
    return {"copy_GBps": round(2 * x.numel() * 4 / t / 1e9, 1),
            f"mm_{'bf16' if dtype == torch.bfloat16 else 'fp16'}_TFLOPs": round(2 * 8192 ** 3 / tm / 1e12, 1)}


def machine():
    gpu = dict(gpu=torch.cuda.get_device_name()) if torch.cuda.is_available() else {}
    return dict(python=platform.python_version(), torch=torch.__version__, cpu=platform.processor() or platform.machine(),
                threads=torch.get_num_threads(), **gpu)


# ------------------------------------------------------------------------------------------------ main

def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--gpu-check" in argv:   # the GPU check lives in gpu_check.py, with its own arguments (--help there)
        return subprocess.call([sys.executable, os.path.join(HERE, "gpu_check.py")] + [a for a in argv if a != "--gpu-check"])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=None, help="model names to benchmark (default mode)")
    ap.add_argument("--kernels", action="store_true", help="kernel benchmarks")
    ap.add_argument("--static", action="store_true", help="gpu_check.py's static GPU resource report (no GPU needed)")
    ap.add_argument("--peers", action="store_true", help="our models at the sizes other implementations were timed at")
    ap.add_argument("--reps", type=int, default=5, help="timing repetitions (the minimum is reported)")
    ap.add_argument("--out", default="out/bench.json", help="JSON file the results are merged into (bench.json: ours)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda (model benchmarks)")
    ap.add_argument("--scale_tokens", type=int, default=4096, help="tokens per batch in the length-scaling runs")
    ap.add_argument("--gpu-check", action="store_true",
                    help="run gpu_check.py (the other arguments are its: python gpu_check.py --help)")
    ap.add_argument("--context-parallel", dest="context_parallel", type=int, default=0, metavar="R",
                    help="context_parallel.py's table over R gloo ranks: per mixer and sequence length, the bytes a "
                         "rank sends, what autograd keeps for backward, ms per forward + backward, error vs 1 process")
    ap.add_argument("--wall", nargs="*", default=None, metavar="RUN",
                    help="what each headline run's wall time is made of, projected vs its target: runs "
                         + ", ".join(WALL_RUNS) + " (default all)")
    ap.add_argument("--threads", nargs="+", type=int, default=None, metavar="N",
                    help="--wall: measure at each of these torch thread counts, in this process (e.g. --threads 1 2)")
    ap.add_argument("--_one", default=None, help=argparse.SUPPRESS)  # internal: one model, in a child process
    args = ap.parse_args(argv)
    if args.threads is not None and (args.wall is None or min(args.threads) < 1):
        print("bench.py --threads N ...: thread counts >= 1, for --wall (e.g. --wall default --threads 1 2)",
              file=sys.stderr)
        raise SystemExit(2)
    if args.context_parallel:   # the method and its table live in context_parallel.py; this runs it where benches run
        return subprocess.call([sys.executable, os.path.join(HERE, "context_parallel.py"), str(args.context_parallel)])
    if args._one:
        print(json.dumps(bench_one(args._one, args.device, args.reps, args.scale_tokens)))
        return
    results = json.loads(pathlib.Path(args.out).read_text()) if os.path.exists(args.out) else {}
    if args.wall is not None:
        print("== wall ==")
        runs = bench_wall(args)
        results["wall"] = dict(device=_device(args), threads=sorted({w["threads"] for w in runs}), runs=runs)
    if args.kernels:
        print("== kernels ==")
        results["kernels"] = bench_kernels(args)
    if args.static:
        print("== static ==")
        with tempfile.TemporaryDirectory() as d:   # gpu_check.py's report, run as its own program
            subprocess.check_call([sys.executable, os.path.join(HERE, "gpu_check.py"), "--static", "--out", f"{d}/s.json"])
            results["static"] = json.loads(pathlib.Path(d, "s.json").read_text())
    if args.peers:
        print("== peers (batch 8 x 256) ==")
        results["peers"] = bench_peers(args)
    if not (args.kernels or args.static or args.peers or args.wall is not None) or args.models is not None:
        print("== models ==")
        results["models"] = bench_models(args)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
