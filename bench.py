"""bench.py — benchmarks for nanomix: the models (default), the kernels, and a static GPU resource report.

    python bench.py                      # every model at its default config: ms/step, tokens/s, peak memory, MFU,
                                         # ratio to the dense Transformer, time per token at 4 doubling lengths
    python bench.py --models dense mamba # some models
    python bench.py --kernels            # each kernel vs its naive baseline and the torch path (+ Triton on GPU)
    python bench.py --static             # compile every Triton kernel for sm_80 / sm_90: registers, shared memory,
                                         # spills, tensor-core instructions, roofline floor at the bench sizes
    python bench.py --kernels --static --out bench.json
    python bench.py --context-parallel 2 # one sequence over 2 CPU ranks: bytes sent, memory kept, time per mixer vs L
    python bench.py --gpu-check          # on a CUDA machine: every kernel config, model, torch.compile per model family,
                                         # train.py run (eager and --compile=True) and torchrun for real, PASS/FAIL
                                         # table, gpu_check.json (~10-15 min on one H100-class GPU, compiles included);
                                         # without CUDA one line, exit 0; --device cpu rehearses the harness

    python bench.py --wall               # issue 19: each headline run's wall time (the default `python train.py`, the
                                         # compares) projected from its measured pieces -- ms per step (fed by
                                         # train.py's data thread, and alone), data ms, eval / generation eval /
                                         # checkpoint ms x their counts, start and figures -- vs its target, the
                                         # step's time by category (matmul, attention, scan/FFT, gather/scatter/
                                         # routing, elementwise & norms, loss, optimizer, other; WALL_CATEGORIES) and
                                         # how fast a step must be to meet it; ~3.5 CPU-min
    python bench.py --wall default speech  # some of the runs (names: default chameleon speech mom transfusion bytes)

Results are merged into --out (bench.json) under "models", "kernels", "static", "peers" and "wall".
On CPU the naive baselines (a Python loop over time with autograd; materialising (batch, dim, N, L)) would take
minutes and gigabytes at the GPU sizes, so the CPU kernel benchmarks run at reduced sizes, printed with each row.
"""
import argparse
import contextlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import kernels

# Roofline figures of issue 11: HBM bandwidth (B/s) and dense bf16 matrix throughput (FLOP/s, achievable)
GPUS = {"H100 SXM": dict(target="sm_90", bw=3.35e12, flops=790e12), "A100": dict(target="sm_80", bw=2.0e12, flops=312e12)}


# ------------------------------------------------------------------------------------------------ models (lead)

DEFAULT_MODELS = ("dense", "mot", "mamba", "mom", "moma", "transfusion", "transfusion-mot", "dense@bytes", "megabyte",
                  "blt", "megalodon")  # NAME@SETTING runs a model on another setting than its default


def matmul_peak(device, n=1024, reps=10):
    """FLOP/s of a large fp32 (bf16 on CUDA) matmul on this device, measured now: the MFU denominator."""
    dt = torch.bfloat16 if device.startswith("cuda") else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dt), torch.randn(n, n, device=device, dtype=dt)
    return 2 * n ** 3 / timeit(lambda: a @ b, reps, 2, device, statistics.median)


def _train_step(model, batch):
    """One forward + backward + AdamW step of model on batch, as a closure."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        model(batch)[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _step_time(model, batch, reps, device):
    """Median seconds of a forward + backward + AdamW step, after 2 warm-up steps."""
    return timeit(_train_step(model, batch), reps, 2, device, statistics.median)


def data_ms(ds, batch_size, n=5, start=1000):
    """Median ms to draw one training batch (batch_size rows) at n fresh indices: the data path's cost per step."""
    times = []
    for i in range(start, start + n):
        t = time.perf_counter()
        ds.get_batch("train", batch_size, i)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


_NO_LAUNCH = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::view", "aten::_unsafe_view",
              "aten::as_strided", "aten::reshape", "aten::_reshape_alias", "aten::t", "aten::transpose",
              "aten::permute", "aten::expand", "aten::unsqueeze", "aten::squeeze", "aten::select", "aten::slice",
              "aten::alias", "aten::detach", "aten::unbind", "aten::split", "aten::split_with_sizes", "aten::chunk",
              "aten::narrow", "aten::view_as", "aten::lift_fresh", "aten::resize_", "aten::set_", "aten::item",
              "aten::_local_scalar_dense", "aten::is_nonzero", "aten::result_type", "aten::to", "aten::_to_copy",
              "aten::resolve_conj", "aten::resolve_neg", "aten::contiguous"}


def launch_count(step, device):
    """Kernel launches in one call of step(), from torch.profiler: CUDA kernels on a GPU; on CPU the leaf aten ops
    that compute (views and allocations excluded): each is at least one kernel launch on a GPU, where a tiny model's
    step is bound by launch overhead (~5 us each) rather than FLOPs."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = device.startswith("cuda")
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    ev = prof.events()
    if cuda:
        return sum(e.device_type == DeviceType.CUDA for e in ev)
    computes = lambda e: e.name.startswith("aten::") and e.name not in _NO_LAUNCH
    return sum(computes(e) and not any(computes(c) for c in e.cpu_children) for e in ev)   # innermost ones only


BENCH_OVERRIDES = {"blt": dict(patching="space")}  # blt's default entropy patching needs a trained entropy model


def bench_one(name, device, reps, scale_tokens):
    """One model at its default config and setting, in this (child) process. Returns a dict."""
    import resource
    import train
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    name, _, setting = name.partition("@")
    model, cfg, tc, ds = train.build(name, setting or None, device=device, overrides=BENCH_OVERRIDES.get(name))
    batch = train.to(ds.get_batch("train", tc.batch_size, 0), device)
    fpt = train.count_flops(model, batch)
    s = _step_time(model, batch, reps, device)
    launches = launch_count(_train_step(model, batch), device)
    tokens = tc.batch_size * tc.seq_len
    mem = (torch.cuda.max_memory_allocated() if device.startswith("cuda")
           else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024)
    out = dict(model=name, setting=tc.setting, params=sum(p.numel() for p in model.parameters()),
               batch=f"{tc.batch_size}x{tc.seq_len}", ms_step=1000 * s, tokens_s=tokens / s, peak_mem_mb=mem / 2 ** 20,
               flops_per_token=fpt, flops_s=fpt * tokens / s, data_ms=data_ms(ds, tc.batch_size), launches=launches,
               scaling={})
    base = tc.seq_len if tc.setting != "bytes" else tc.seq_len // 2   # 256..2048 tokens; 1024..8192 bytes
    for L in (base, 2 * base, 4 * base, 8 * base):  # time per token as the sequence length doubles
        model, cfg, tc2, ds = train.build(name, setting or None, device=device, overrides=BENCH_OVERRIDES.get(name),
                                          train_overrides=dict(seq_len=L))
        b = max(1, scale_tokens // L)
        out["scaling"][L] = 1e6 * _step_time(model, train.to(ds.get_batch("train", b, 0), device), max(2, reps // 2),
                                             device) / (b * L)
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
    import train
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    rows, base = [], None
    for label, name, setting, over, peer in PEERS:
        model, cfg, tc, ds = train.build(name, setting, overrides=over, device=device, train_overrides=dict(seq_len=256))
        s = _step_time(model, train.to(ds.get_batch("train", 8, 0), device), args.reps, device)
        base = base or s
        r = dict(label=label, params=sum(p.numel() for p in model.parameters()), ms_step=1000 * s,
                 tokens_s=8 * 256 / s, x_transformer=s / base, peer=peer)
        rows.append(r)
        print(f"  {label:22s} {r['params'] / 1e6:5.2f}M {r['ms_step']:8.1f} ms/step {r['tokens_s']:9,.0f} tokens/s "
              f"{r['x_transformer']:5.2f}x the Transformer   peer: {peer}")
    return rows


def bench_models(args):
    import subprocess
    import train
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    reg = train.registry()
    names = args.models if args.models else [n for n in DEFAULT_MODELS if n.partition("@")[0] in reg]
    peak = matmul_peak(device)
    rows = []
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
        d = dense.get(r["setting"])
        sc = r["scaling"]
        ls = sorted(sc, key=int)
        r["mfu"] = r["flops_s"] / peak
        r["x_dense"] = r["ms_step"] / d["ms_step"] if d else None
        xd = f"{r['x_dense']:.2f}" if d else "-"
        r["data_share"] = r["data_ms"] / (r["data_ms"] + r["ms_step"])
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
    import train
    out = []
    print(f"\n{'setting':12s} {'batch':>8s} {'data ms':>8s}   share of each model's step on that setting")
    for s in data.SETTINGS:
        d = train.SETTING_DEFAULTS[s]
        ms = data_ms(data.make_data(s, seq_len=d["seq_len"]), d["batch_size"])
        steps = {r["model"]: r["ms_step"] for r in rows if r["setting"] == s}
        share = {m: round(ms / (ms + st), 3) for m, st in steps.items()}
        out.append(dict(setting=s, batch=f"{d['batch_size']}x{d['seq_len']}", data_ms=ms, share_of_step=share))
        print(f"{s:12s} {out[-1]['batch']:>8s} {ms:8.1f}   " + " ".join(f"{m} {100 * v:.0f}%" for m, v in share.items()))
    return out


# ------------------------------------------------------------------------------------------------ wall time (issue 19)
# `python bench.py --wall [RUN ...]`: what each headline run's wall time is made of, measured in this process with
# train.py's own pieces, and projected to the whole run. Not a training run: a few steps per model (median). Made for
# the CPU targets of issue 19 (the verdict reads CPU time, robust to other jobs); on CUDA read the wall projection.

WALL_RUNS = {  # name: the command as a user types it, its models, setting, steps, target (s) and its time before
    "default": dict(cmd="python train.py", models=("mot",), setting="chameleon", steps=1800, target_s=120,
                    before_s=194, before="issue 19: 194 s alone"),
    "chameleon": dict(cmd="python train.py --compare dense,mot --setting chameleon", models=("dense", "mot"),
                      setting="chameleon", steps=1800, target_s=300, before_s=390, before="RESULTS: ~6.5 min"),
    "speech": dict(cmd="python train.py --compare dense,mot --setting speech", models=("dense", "mot"),
                   setting="speech", steps=1800, target_s=None, before_s=360, before="RESULTS: ~6 min"),
    "mom": dict(cmd="python train.py --compare mamba,mom --setting chameleon --steps 600", models=("mamba", "mom"),
                setting="chameleon", steps=600, target_s=None, before_s=None, before=None),
    "transfusion": dict(cmd="python train.py --compare transfusion,transfusion-mot --steps 600",
                        models=("transfusion", "transfusion-mot"), setting="transfusion", steps=600, target_s=None,
                        before_s=None, before=None),
    "bytes": dict(cmd="python train.py --compare dense,megabyte,blt,megalodon --setting bytes --entropy_ckpt "
                      "docs/runs/bytes/blt-entropy/ckpt.pt", models=("dense", "megabyte", "blt", "megalodon"),
                  setting="bytes", steps=400, target_s=None, before_s=None, before=None),
}
BLT_ENTROPY = "docs/runs/bytes/blt-entropy/ckpt.pt"   # the bytes compare's entropy model; patching=space without it

# The step's time by category: each profiled op's self time goes to the category of the OUTERMOST event around it
# (itself included) whose name matches one of these patterns (checked in this order; "aten::" stripped), so that an
# op inside aten::linear is matmul, one inside cross_entropy is loss and one inside the optimizer region is the
# optimizer's. While it profiles, bench labels regions with torch.profiler.record_function: nanomix:optimizer
# (gradient clipping + AdamW + lr schedule + zero_grad), nanomix:scan (kernels.selective_scan / linear_scan: the
# recurrences, Python step loop included; their backward nodes are *Scan*Backward), nanomix:routing
# (kernels.sort_by_group / unsort) and nanomix:grouped_matmul (matmul). Other aten ops are "elementwise & norms"
# (activations, adds, norms, reductions, copies), except views and allocations (_NO_LAUNCH), which join the non-aten
# time (autograd engine nodes, other labelled Python) in "other". Python between top-level ops is in no event: the
# profiled total is a little under the step's time, so shares are of the profiled total.
WALL_CATEGORIES = (
    ("optimizer", r"^nanomix:optimizer$"),
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
    from torch.profiler import ProfilerActivity, profile, record_function
    cuda = device.startswith("cuda")
    wrapped = dict(selective_scan="scan", linear_scan="scan", sort_by_group="routing", unsort="routing",
                   grouped_matmul="grouped_matmul")
    orig = {k: getattr(kernels, k) for k in wrapped}

    def label(f, what):
        def g(*a, **k):
            with record_function(f"nanomix:{what}"):
                return f(*a, **k)
        return g
    try:
        for k, what in wrapped.items():
            setattr(kernels, k, label(orig[k], what))
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            step()
            if cuda:
                torch.cuda.synchronize()
    finally:
        for k, f in orig.items():
            setattr(kernels, k, f)
    cats = dict.fromkeys(WALL_ORDER, 0.0)
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CPU:   # CUDA: each op's own kernels' time, by the op
            continue
        self_us = e.self_device_time_total if cuda else e.self_cpu_time_total
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


class _Clock:
    """Wall and CPU time (this process, all its threads) since creation, in ms: .wall, .cpu."""
    def __init__(self):
        self.t, self.c = time.perf_counter(), time.process_time()

    @property
    def wall(self):
        return 1e3 * (time.perf_counter() - self.t)

    @property
    def cpu(self):
        return 1e3 * (time.process_time() - self.c)


def wall_model(name, setting, steps, device="cpu", rounds=3, k=2, overrides=None, train_overrides=None):
    """One model of a headline run, timed with train.py's pieces, each by the wall clock and by CPU time: -> dict of
    ms per piece (key_ms wall, key_cpu_ms CPU), their counts in the run, and both projections (s)."""
    import shutil
    import train
    over = dict(overrides or {})
    if name == "blt" and setting == "bytes" and "patching" not in over:
        over.update(entropy_ckpt=BLT_ENTROPY) if os.path.isfile(BLT_ENTROPY) else over.update(patching="space")
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    c = _Clock()
    model, cfg, tc, ds = train.build(name, setting, over, device=device,
                                     train_overrides=dict(train_overrides or {}, steps=steps))
    micro = tc.micro_batch_size or tc.batch_size
    fl = train.count_flops(model, [train.to(ds.get_batch("train", micro, i), device) for i in range(4)], parts=True)
    start = (c.wall, c.cpu)                                             # build + the FLOPs count train.py makes first
    raw = model
    opt, sched = train.make_optimizer(model, tc)                       # train.py's optimizer and precision
    autocast = train.autocast_for(device)
    accum = tc.batch_size // micro
    records = []

    def step(get, profiled=False):                                      # train.py's _train loop body, one step
        parts_sum, loss_sum = {}, 0.0
        for m in range(accum):
            batch = train.to(get(m), device)
            with autocast():
                _, loss, parts = model(batch)
                (loss / accum).backward()
            loss_sum += float(loss.detach()) / accum
            for key, v in parts.items():
                parts_sum[key] = parts_sum.get(key, 0.0) + float(v) / accum
        with torch.profiler.record_function("nanomix:optimizer") if profiled else contextlib.nullcontext():
            gnorm = train.clip_grads(raw, tc.grad_clip)
            if not (math.isfinite(loss_sum) and math.isfinite(gnorm)):
                raise RuntimeError(f"--wall: {name} diverged while timing")
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        n = len(records) + 1
        records.append(dict(step=n, tokens=n * tc.batch_size * tc.seq_len, flops=n * tc.batch_size * tc.seq_len
                            * fl["total"], loss=loss_sum, **parts_sum))
        sync()

    fixed = [ds.get_batch("train", micro, 10_000 + i) for i in range(k * accum)]   # pre-drawn: the step alone
    pick = lambda i: (lambda m: fixed[(i * accum + m) % len(fixed)])
    for i in range(2):                                                  # warm-up
        step(pick(i))
    cpu = []
    for i in range(k + 1):                                              # CPU time: no data thread alive yet
        c = _Clock()
        step(pick(i))
        cpu.append(c.cpu)
    ds.get_batch("train", micro, 19_999)                                # the data's first-use cost is start's
    draws = []
    for i in range(3):                                                  # one training batch drawn inline
        c = _Clock()
        for m in range(accum):
            ds.get_batch("train", micro, 20_000 + i * accum + m)
        draws.append((c.wall, c.cpu))
    fed, alone = [], []
    batches = train.Prefetch(ds, micro, 0, 1, 0, 10 ** 9, pin=cuda)     # train.py's background data thread
    n_fed = 0
    try:
        for _ in range(rounds):                                         # wall: interleaved, fed by the thread / alone
            for i in range(k):
                c = _Clock()
                step(lambda m, n=n_fed: batches.get(n * accum + m))
                fed.append(c.wall)
                n_fed += 1
            for i in range(k):
                c = _Clock()
                step(pick(i))
                alone.append(c.wall)
    finally:
        batches.close()
    cats, prof_total = split_by_category(lambda: step(pick(0), True), device)
    c = _Clock()
    ev = train.evaluate(model, ds, tc, 0, 1, device, autocast, micro)
    ev_t = (c.wall, c.cpu)
    gen = bool(tc.gen_n and train.has_gen_eval(model, ds))
    gen_t = (0.0, 0.0)
    if gen:
        c = _Clock()
        ev.update(train.generation_metrics(model, ds, tc))
        gen_t = (c.wall, c.cpu)
    tmp = tempfile.mkdtemp(prefix="nanomix_wall_")
    try:
        c = _Clock()
        train.save_ckpt(os.path.join(tmp, "ckpt.pt"), dict(
            model=raw.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(), step=1, time=0.0,
            config=dict(model=name), rng=train.rng_state(), data_position=1, flops_per_token=fl["total"]))
        ckpt_t = (c.wall, c.cpu)
        with open(os.path.join(tmp, "metrics.jsonl"), "w") as f:      # the timed steps' log + the eval: figures
            f.writelines(json.dumps(r) + "\n" for r in records + [dict(step=len(records), tokens=records[-1]["tokens"],
                                                                       flops=records[-1]["flops"], **ev)])
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(dict(model=name, setting=tc.setting), f)
        import plots
        c = _Clock()
        with contextlib.redirect_stdout(sys.stderr):
            plots.plot_run(tmp)
            plots.model_figures(raw, ds, tmp)
        fig_t = (c.wall, c.cpu)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = statistics.median
    r = dict(model=name, setting=tc.setting, steps=steps, batch=f"{tc.batch_size}x{tc.seq_len}",
             step_ms=med(alone), fed_step_ms=med(fed), step_cpu_ms=med(cpu),
             data_ms=med(w for w, _ in draws), data_cpu_ms=med(c for _, c in draws),
             eval_ms=ev_t[0], eval_cpu_ms=ev_t[1], n_eval=occurrences(steps, tc.eval_every),
             gen_ms=gen_t[0], gen_cpu_ms=gen_t[1], n_gen=0, ckpt_ms=ckpt_t[0], ckpt_cpu_ms=ckpt_t[1],
             n_ckpt=occurrences(steps, tc.ckpt_every), start_s=start[0] / 1e3, start_cpu_s=start[1] / 1e3,
             figures_s=fig_t[0] / 1e3, figures_cpu_s=fig_t[1] / 1e3, categories_ms=cats, profiled_ms=prof_total,
             flops_per_step=fl["total"] * tc.batch_size * tc.seq_len,
             timed_steps=len(fed) + len(alone) + len(cpu), blt_patching=over.get("patching", "entropy")
             if name == "blt" else None)
    if gen:  # generation runs at the evals where step % gen_every == 0, and at the last step
        r["n_gen"] = sum(1 for s in range(1, steps + 1) if (s % tc.eval_every == 0 or s == steps)
                         and (s % tc.gen_every == 0 or s == steps))
    r["data_steal_ms"] = r["fed_step_ms"] - r["step_ms"]
    r["projected_s"], r["projected_cpu_s"] = wall_projection(r), wall_projection(r, cpu=True)
    return r


def wall_projection(r, cpu=False):
    """Seconds of one model's run in a train.py process: its steps, evals, generation evals, checkpoints, build +
    FLOPs count and end-of-run figures. Wall (cpu=False): each step as measured fed by train.py's data thread, under
    whatever else the machine runs now. CPU (cpu=True): CPU seconds of every piece, a step's plus one batch's draw
    (the thread's work, here charged in full): the run alone on one core with one torch thread."""
    if cpu:
        return (r["steps"] * (r["step_cpu_ms"] + r["data_cpu_ms"]) + r["n_eval"] * r["eval_cpu_ms"]
                + r["n_gen"] * r["gen_cpu_ms"] + r["n_ckpt"] * r["ckpt_cpu_ms"]) / 1e3 + r["start_cpu_s"] + r["figures_cpu_s"]
    return (r["steps"] * r["fed_step_ms"] + r["n_eval"] * r["eval_ms"] + r["n_gen"] * r["gen_ms"]
            + r["n_ckpt"] * r["ckpt_ms"]) / 1e3 + r["start_s"] + r["figures_s"]


def cpu_matmul_peak(n=1024, reps=7):
    """FLOP/s of an n^3 fp32 matmul by CPU time (median), with this process's torch threads: the step's floor rate."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(reps):
        c = _Clock()
        a @ b
        times.append(c.cpu / 1e3)
    return 2 * n ** 3 / statistics.median(times)


def process_start_s():
    """(wall, CPU) seconds of a fresh `python -c "import train"` (torch + the model files): paid once per command."""
    import resource
    ru = lambda: (lambda u: u.ru_utime + u.ru_stime)(resource.getrusage(resource.RUSAGE_CHILDREN))
    t, c = time.perf_counter(), ru()
    subprocess.run([sys.executable, "-c", "import train"], cwd=os.path.dirname(os.path.abspath(__file__)), check=True)
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
    total = start[1] + sum(r["projected_cpu_s"] for r in models)
    out = dict(run=name, cmd=spec["cmd"], models=models, process_start_s=start[0], process_start_cpu_s=start[1],
               projected_s=start[0] + sum(r["projected_s"] for r in models), projected_cpu_s=total,
               steps_s=steps_s, other_s=total - steps_s, target_s=spec["target_s"], before_s=spec["before_s"],
               before=spec["before"])
    out["two_thirds_s"] = 2 / 3 * spec["before_s"] if spec["before_s"] else None
    goal = spec["target_s"] or out["two_thirds_s"]
    out["goal_s"] = goal
    n_steps = sum(r["steps"] for r in models)
    if goal:
        out["met"] = total <= goal
        room = goal - out["other_s"]            # what is left for the training steps once evals etc. are paid
        out["need_step_ms"] = 1e3 * room / n_steps if room > 0 else 0.0
        out["need_speedup"] = steps_s / room if room > 0 else float("inf")
    cat = dict.fromkeys(WALL_ORDER, 0.0)        # the steps' time by category, weighted by each model's steps
    for r in models:
        for c, ms in r["categories_ms"].items():
            cat[c] += r["steps"] * r["step_cpu_ms"] * ms / r["profiled_ms"] / 1e3
    cat["data"] = sum(r["steps"] * r["data_cpu_ms"] for r in models) / 1e3    # the batches' draws
    out["steps_by_category_s"] = cat
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
        goal = w.get("goal_s")
        if not goal:
            verdict, need = "-", "no goal: time before not recorded"
        else:
            verdict = "MET" if w["met"] else "missed"
            mean = 1e3 * w["steps_s"] / sum(r["steps"] for r in w["models"])
            need = (f"<= {w['need_step_ms']:.0f} ms, now {mean:.0f} ({w['need_speedup']:.1f}x faster)"
                    if w["need_speedup"] != float("inf") else "impossible: evals etc. alone exceed it")
        top = max(w["steps_by_category_s"].items(), key=lambda kv: kv[1])
        floor = f"{w['floor_step_ms']:.0f}ms" if w.get("floor_step_ms") else "-"
        print(f"{w['run']:12s} {w['projected_cpu_s']:6.0f}s {w['projected_s']:6.0f}s "
              f"{(f'{goal:.0f}s' if goal else '-'):>6s} {verdict:6s} {w['steps_s']:5.0f}s {w['other_s']:4.0f}s  "
              f"{need:42s} {floor:>6s}  "
              f"{top[0]} {100 * top[1] / w['steps_s']:.0f}%")
    print("1 core = CPU seconds of every piece (a step + one batch's draw, x steps; evals, generation evals, checkpoints "
          "x their counts; build + FLOPs count, end figures, process start): the run alone on one core, one thread, "
          "whatever else the machine runs (the verdict uses it); now = the same from wall times measured now, steps "
          "fed by train.py's data thread; steps / rest = the 1-core seconds in training steps / in all the rest; goal "
          "= issue 19's target (default 2 min, chameleon compare 5 min) or 2/3 of the time before; floor = the mean "
          "step's FLOPs (count_flops: forward + backward, all work) at this core's fp32 matmul peak"
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
          "ms = wall, batches from train.py's background Prefetch thread (the data costs only what the thread steals "
          "from the step); data = CPU ms to draw one batch; eval, gen, ckpt, start+figs: CPU")
    print(f"\nthe step's time by category (torch.profiler self time, % of the profiled step; bench.WALL_CATEGORIES)")
    print(f"{'model':16s} {'setting':11s} {'prof ms':>8s} " + " ".join(f"{c[:12]:>12s}" for c in WALL_ORDER))
    seen = set()
    for w in runs:
        for r in w["models"]:
            if (r["model"], r["setting"]) in seen:
                continue
            seen.add((r["model"], r["setting"]))
            print(f"{r['model']:16s} {r['setting']:11s} {r['profiled_ms']:8.1f} "
                  + " ".join(f"{100 * r['categories_ms'][c] / r['profiled_ms']:11.1f}%" for c in WALL_ORDER))


def bench_wall(args, runs=None):
    """python bench.py --wall [RUN ...]: -> list of run dicts (also printed)."""
    runs = runs or WALL_RUNS
    names = args.wall or list(runs)
    bad = [n for n in names if n not in runs]
    if bad:
        print(f"bench.py --wall: unknown run {', '.join(bad)}; choose from {', '.join(runs)}", file=sys.stderr)
        raise SystemExit(2)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    load = [os.getloadavg()[0]]
    start = process_start_s()
    peak = cpu_matmul_peak() if device == "cpu" else None
    measured, out = {}, []
    for n in names:
        out.append(wall_run(n, runs[n], measured, start, device, peak))
        load.append(os.getloadavg()[0])
    for w in out:
        w["load_average"] = (min(load), max(load))
    print_wall(out, device, torch.get_num_threads(), load, peak)
    for w in out:
        w["matmul_peak_flops"] = peak
    return out


# ------------------------------------------------------------------------------------------------ helpers

def timeit(fn, reps=5, warmup=1, device="cpu", stat=min):
    """stat (minimum, or e.g. statistics.median) of fn()'s wall time over reps after warmup, in seconds;
    synchronises CUDA around each call."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
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
    def run():
        with torch.no_grad():
            f(*inputs)
    return run


# ------------------------------------------------------------------------------------------------ sizes

def sizes(device):
    """Benchmark sizes: the issue's realistic GPU sizes; reduced on CPU where the naive baseline needs them."""
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
    S = sizes(device)
    reps = args.reps
    rows = []

    def row(kernel, impl, size, fwd_s, fb_s, note="", work=None):
        r = dict(kernel=kernel, impl=impl, size=size, fwd_ms=round(fwd_s * 1e3, 2) if fwd_s else None,
                 fwd_bwd_ms=round(fb_s * 1e3, 2) if fb_s else None, note=note)
        if work and fwd_s:   # achieved rate of the forward
            r.update({k: round(v / fwd_s / 1e9, 1) for k, v in work.items()})
        rows.append(r)
        print(f"  {kernel:16s} {impl:28s} {size:34s} fwd {r['fwd_ms']!s:>9} ms  fwd+bwd {r['fwd_bwd_ms']!s:>9} ms  {note}",
              flush=True)

    impls = [("torch", "torch path")]
    if device == "cuda":
        impls.append(("triton", "triton"))

    # --- selective scan (Mamba's S6) ---
    p = S["selective"]
    size = "b={b} d={d} N={n} L={L}".format(**p)
    ins = selective_inputs(p["b"], p["d"], p["n"], p["L"], device)
    f_bytes = 4 * (3 * p["b"] * p["d"] * p["L"] + 2 * p["b"] * p["n"] * p["L"])      # u, delta, y; B, C (fp32)
    q = S["naive_selective"]
    nins = selective_inputs(q["b"], q["d"], q["n"], q["L"], device)
    naive = lambda *x: kernels.selective_scan_ref(*x, delta_softplus=True)
    row("selective_scan", "naive: loop + autograd, (b,d,L,N)", "b={b} d={d} N={n} L={L}".format(**q),
        timeit(fwd_only(naive, nins), reps), timeit(fwd_bwd(naive, nins), max(1, reps // 2)),
        "mamba_ssm selective_scan_ref semantics")
    for backend, name in impls:
        f = lambda *x, backend=backend: kernels.selective_scan(*x, delta_softplus=True, backend=backend)
        row("selective_scan", name, size, timeit(fwd_only(f, ins), reps, device=device),
            timeit(fwd_bwd(f, ins), reps, device=device), work=dict(GBps=f_bytes) if device == "cuda" else None)
        if q == p and device == "cpu" and backend == "torch":
            nb = rows[-2]
            rows[-1]["speedup_vs_naive_fwd_bwd"] = round(nb["fwd_bwd_ms"] / rows[-1]["fwd_bwd_ms"], 1)

    # --- linear scan, real (Mamba-style diagonal recurrence) and complex (Megalodon's CEMA) ---
    for kind in ("scan", "cema"):
        p = S[kind]
        if kind == "scan":
            shape, dt, size = (p["b"], p["d"], p["L"]), torch.float32, "real fp32 b={b} d={d} L={L}".format(**p)
        else:
            shape, dt = (p["b"], p["d"], p["n"], p["L"]), torch.complex64
            size = "complex64 b={b} d={d} N={n} L={L}".format(**p)
        g = torch.Generator().manual_seed(0)
        mag = torch.rand(shape, generator=g) * 0.5 + 0.45
        a = (torch.polar(mag, torch.randn(shape, generator=g) * 0.1) if dt.is_complex else mag).to(device)
        b = torch.randn(shape, generator=g, dtype=dt).to(device)
        a.requires_grad_(), b.requires_grad_()
        nbytes = 3 * a.numel() * a.element_size()                                  # read a, b; write h
        if device == "cpu":
            row("linear_scan", "naive: loop + autograd", size, timeit(fwd_only(kernels.linear_scan_ref, [a, b]), reps),
                timeit(fwd_bwd(kernels.linear_scan_ref, [a, b]), max(1, reps // 2)))
        for backend, name in impls:
            f = lambda a, b, backend=backend: kernels.linear_scan(a, b, backend=backend)
            row("linear_scan", name, size, timeit(fwd_only(f, [a, b]), reps, device=device),
                timeit(fwd_bwd(f, [a, b]), reps, device=device), work=dict(GBps=nbytes) if device == "cuda" else None)

    # --- grouped matmul: 3 uneven groups ---
    p = S["gmm"]
    for dt in ([torch.float32] if device == "cpu" else [torch.bfloat16, torch.float32]):
        x, w, gs = gmm_inputs(p["groups"], p["K"], p["M"], device, dt)
        T = x.shape[0]
        size = f"{str(dt)[6:]} T={T} groups={list(p['groups'])} K={p['K']} M={p['M']}"
        flops = 2 * T * p["K"] * p["M"]
        dense = lambda x, w: x @ w[0]
        row("grouped_matmul", "dense x @ w[0] (same shape)", size, timeit(fwd_only(dense, [x, w]), reps, device=device),
            timeit(fwd_bwd(dense, [x, w]), reps, device=device), "the ceiling to compare with",
            work=dict(TFLOPs=flops / 1e3))
        masked = lambda x, w: torch.einsum("tk,gkm->gtm", x, w)[torch.repeat_interleave(torch.arange(len(p["groups"]), device=device), gs), torch.arange(T, device=device)]
        row("grouped_matmul", "naive: every group on all rows", size, timeit(fwd_only(masked, [x, w]), reps, device=device),
            timeit(fwd_bwd(masked, [x, w]), max(1, reps // 2), device=device), "G x the FLOPs",
            work=dict(TFLOPs=flops / 1e3))
        if device == "cpu":
            row("grouped_matmul", "per-group loop (= torch path)", size,
                timeit(fwd_only(kernels.grouped_matmul_ref, [x, w, gs]), reps),
                timeit(fwd_bwd(lambda x, w: kernels.grouped_matmul_ref(x, w, gs), [x, w]), reps),
                work=dict(TFLOPs=flops / 1e3))
        for backend, name in impls:
            f = lambda x, w, backend=backend: kernels.grouped_matmul(x, w, gs, backend=backend)
            row("grouped_matmul", name, size, timeit(fwd_only(f, [x, w]), reps, device=device),
                timeit(fwd_bwd(f, [x, w]), reps, device=device), work=dict(TFLOPs=flops / 1e3))

    result = dict(device=device, machine=machine(), rows=rows)
    if device == "cuda":
        result["ceilings"] = measure_ceilings()
        for r in rows:
            if "GBps" in r:
                r["frac_of_copy_bw"] = round(r["GBps"] / result["ceilings"]["copy_GBps"], 2)
            if "TFLOPs" in r:
                r["frac_of_dense_mm"] = round(r["TFLOPs"] / result["ceilings"]["mm_bf16_TFLOPs"], 2)
    return result


def measure_ceilings():
    """Measured device ceilings: device-to-device copy bandwidth and a large bf16 matmul."""
    x = torch.empty(256 * 2 ** 20, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    t = timeit(lambda: y.copy_(x), 10, device="cuda")
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    tm = timeit(lambda: a @ a, 10, device="cuda")
    return dict(copy_GBps=round(2 * x.numel() * 4 / t / 1e9, 1), mm_bf16_TFLOPs=round(2 * 8192 ** 3 / tm / 1e12, 1))


def machine():
    info = dict(python=platform.python_version(), torch=torch.__version__, cpu=platform.processor() or platform.machine(),
                threads=torch.get_num_threads())
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


# ------------------------------------------------------------------------------------------------ static

# What a GPU can launch: every (kernel, dtype, flags, config) that kernels.launch_config can pick, for the
# ahead-of-time compile (tests/test_gpu_compile.py and --static). No GPU needed: triton compiles for a target that is
# not present, and the wheel ships cuobjdump (/work/shared/papers/kernels.md, "Compiling for a GPU without one").

_TL = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def compile_specs(target):
    """Every configuration kernels.py's launchers can launch on `target` ((8, 0), (9, 0), ...): a list of dicts
    (name, fn, signature, constexprs, num_warps, num_stages) for triton.compile(ASTSource(...)). Built with the
    same launch_config, so the compile test compiles what a GPU would run."""
    specs = []

    def add(name, fn, ptrs, ints, cfg, flags, div16=()):
        # div16: the int arguments that are multiples of 16 at the bench sizes; with the pointers (torch
        # allocations are 16-byte aligned) they get the divisibility hint a real launch would specialise on
        sig = {**{p: "*" + t for p, t in ptrs.items()}, **{i: "i32" for i in ints}}
        const = {**{k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}, **flags}
        sig.update({k: "constexpr" for k in const})
        attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in list(ptrs) + list(div16)}
        specs.append(dict(name=name, fn=fn, signature=sig, constexprs=const, attrs=attrs,
                          num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))

    # linear scan: fp32 / bf16 / fp64 real, complex64 / complex128 through their real views; with and without h0
    for dt, cplx in [(torch.float32, False), (torch.bfloat16, False), (torch.float64, False),
                     (torch.float32, True), (torch.float64, True)]:
        t = _TL[dt]
        tag = f"{'c' if cplx else ''}{t}"
        cd = kernels._cd(dt)
        add(f"scan_fwd[{tag}]", kernels.scan_fwd_kernel, dict(a_ptr=t, b_ptr=t, h0_ptr=t, h_ptr=t), ["R", "L"],
            kernels.launch_config("scan_fwd", target), dict(COMPLEX=cplx, CD=cd), div16=("L",))
        add(f"scan_bwd[{tag}]", kernels.scan_bwd_kernel,
            dict(a_ptr=t, h_ptr=t, h0_ptr=t, dh_ptr=t, da_ptr=t, db_ptr=t), ["R", "L"],
            kernels.launch_config("scan_bwd", target), dict(COMPLEX=cplx, CD=cd), div16=("L",))
    # selective scan: fp32 or bf16 activations (u, delta, B, C, z, out), fp32 parameters and state; N up to 16,
    # 32, 64 (fp64 runs on the torch path on a GPU)
    for dt in (torch.float32, torch.bfloat16):
        t, f32 = _TL[dt], "fp32"
        for n in (16, 32, 64):
            add(f"selective_fwd[{t},N<={n}]", kernels.selective_fwd_kernel,
                dict(u_ptr=t, delta_ptr=t, A_ptr=f32, B_ptr=t, C_ptr=t, D_ptr=f32, z_ptr=t, bias_ptr=f32, out_ptr=t,
                     last_ptr=f32, ckpt_ptr=f32),
                ["D", "L", "N", "n_chunks", "has_z", "softplus"],
                kernels.launch_config("selective_fwd", target, n_state=n), dict(CD=kernels.tl.float32),
                div16=("D", "L", "N"))
            add(f"selective_bwd[{t},N<={n}]", kernels.selective_bwd_kernel,
                dict(u_ptr=t, delta_ptr=t, A_ptr=f32, B_ptr=t, C_ptr=t, D_ptr=f32, z_ptr=t, bias_ptr=f32, ckpt_ptr=f32,
                     dout_ptr=t, dlast_ptr=f32, du_ptr=t, ddelta_ptr=t, dA_ptr=f32, dB_ptr=f32, dC_ptr=f32,
                     dD_ptr=f32, dz_ptr=t, dbias_ptr=f32),
                ["D", "L", "N", "n_chunks", "has_z", "softplus"],
                kernels.launch_config("selective_bwd", target, n_state=n), dict(CD=kernels.tl.float32),
                div16=("D", "L", "N"))
    # grouped matmul: bf16 / fp32 (tf32 tensor cores)
    for dt in (torch.bfloat16, torch.float32):
        t = _TL[dt]
        add(f"gmm[{t}]", kernels.gmm_kernel,
            dict(x_ptr=t, w_ptr=t, y_ptr=t, tile_group_ptr="i32", tile_row_ptr="i32", group_end_ptr="i32"),
            ["K", "M", "G", "stride_wg", "stride_wk", "stride_wm"], kernels.launch_config("gmm", target, dtype=dt), {},
            div16=("K", "M", "stride_wg", "stride_wk"))
        add(f"gmm_dw[{t}]", kernels.gmm_dw_kernel,
            dict(x_ptr=t, dy_ptr=t, dw_ptr=t, group_start_ptr="i32", group_end_ptr="i32"),
            ["K", "M"], kernels.launch_config("gmm_dw", target, dtype=dt), {}, div16=("K", "M"))
    return specs


SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}   # max shared memory per block (opt-in), bytes


def static_report(targets=((8, 0), (9, 0))):
    """Compile every entry of compile_specs(target) ahead of time for each GPU target (no GPU needed) and read
    the cubin's resources with the cuobjdump shipped in the triton wheel. Returns one dict per (spec, target):
    name, kernel, target, num_warps, num_stages, regs, stack, local (spill bytes), static_shared,
    dynamic_shared, mma (mma.sync in the PTX), wgmma, compile_s, or error. Under TRITON_INTERPRET=1 the
    @triton.jit objects are interpreter stubs, so it runs itself in a child process without it."""
    if kernels._INTERPRET:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        code = f"import json, bench; print('@@REPORT@@' + json.dumps(bench.static_report({tuple(targets)!r})))"
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                           cwd=os.path.dirname(os.path.abspath(__file__)))
        if r.returncode:
            raise RuntimeError("static_report child failed:\n" + r.stderr[-3000:])
        return json.loads(r.stdout.split("@@REPORT@@")[-1])
    jobs = [(tuple(cap), i) for cap in targets for i in range(len(compile_specs(tuple(cap))))]
    workers = min(4, os.cpu_count() or 1)
    if workers > 1:   # compiles are independent: a process pool (fork keeps this non-interpreted import)
        import concurrent.futures
        import multiprocessing
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as ex:
            return list(ex.map(_compile_one, *zip(*jobs)))
    return [_compile_one(cap, i) for cap, i in jobs]


def _compile_one(cap, i):
    """Compile compile_specs(cap)[i] for the GPU target cap and read its resource usage (see static_report)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    s = compile_specs(cap)[i]
    rec = dict(name=s["name"], kernel=s["fn"].__name__, target=f"sm_{cap[0]}{cap[1]}", num_warps=s["num_warps"],
               num_stages=s["num_stages"])
    t0 = time.time()
    try:
        src = ASTSource(fn=s["fn"], signature=s["signature"], constexprs=s["constexprs"], attrs=s["attrs"])
        c = triton.compile(src, target=GPUTarget("cuda", cap[0] * 10 + cap[1], 32),
                           options=dict(num_warps=s["num_warps"], num_stages=s["num_stages"]))
    except Exception as e:  # reported, and failed on by tests/test_gpu_compile.py
        rec["error"] = f"{type(e).__name__}: {str(e)[:500]}"
        return rec
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(c.asm["cubin"])
        res = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True).stdout
    m = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", res)}
    ptx = c.asm["ptx"]
    rec.update(regs=m.get("REG"), stack=m.get("STACK"), local=m.get("LOCAL"), static_shared=m.get("SHARED"),
               dynamic_shared=c.metadata.shared, mma="mma.sync" in ptx, wgmma="wgmma.mma_async" in ptx,
               compile_s=round(time.time() - t0, 2))
    return rec


def floors():
    """Roofline floor of each kernel at the GPU bench sizes: compulsory HBM bytes / bandwidth and matmul FLOPs /
    tensor-core throughput, per GPU of GPUS. Bytes count each input read once and each output written once."""
    S = sizes("cuda")
    s, l_, c, gm = S["selective"], S["scan"], S["cema"], S["gmm"]
    b, d, n, L = s["b"], s["d"], s["n"], s["L"]
    nck = -(-L // 32)
    # fp32 activations: fwd reads u, delta, z, B, C and writes out, the chunk checkpoints and the last state;
    # bwd reads u, delta, z, dout, B, C, checkpoints and writes du, ddelta, dz, dB, dC
    sel_f = 4 * (4 * b * d * L + 2 * b * n * L + b * d * n * (nck + 1))
    sel_b = 4 * (7 * b * d * L + 4 * b * n * L + b * d * n * nck)
    R, Lr = l_["b"] * l_["d"], l_["L"]
    Rc = c["b"] * c["d"] * c["n"]
    T, K, M = sum(gm["groups"]), gm["K"], gm["M"]
    G = len(gm["groups"])
    work = {  # kernel -> (size, bytes, matmul flops)
        "scan_fwd": (f"fp32 R={R} L={Lr}", 3 * 4 * R * Lr, 0),
        "scan_bwd": (f"fp32 R={R} L={Lr}", 5 * 4 * R * Lr, 0),                           # a, h, dh in; da, db out
        "scan_fwd[complex]": (f"complex64 R={Rc} L={c['L']}", 3 * 8 * Rc * c["L"], 0),
        "selective_fwd": (f"b={b} d={d} N={n} L={L}", sel_f, 0),
        "selective_bwd": (f"b={b} d={d} N={n} L={L}", sel_b, 0),
        "gmm": (f"bf16 T={T} G={G} K={K} M={M}", 2 * (T * K + G * K * M + T * M), 2 * T * K * M),
        "gmm_dw": (f"bf16 T={T} G={G} K={K} M={M}", 2 * (T * K + T * M + G * K * M), 2 * T * K * M),
    }
    out = {}
    for k, (size, nbytes, flops) in work.items():
        out[k] = dict(size=size, bytes=nbytes, flops=flops)
        for gpu, spec in GPUS.items():
            out[k][f"floor_us_{spec['target']}"] = round(max(nbytes / spec["bw"], flops / spec["flops"]) * 1e6, 1)
    return out


def bench_static(args):
    """Resource report of every compiled kernel configuration for sm_80 and sm_90 plus the roofline floors."""
    import triton
    t = time.time()
    rep = static_report(((8, 0), (9, 0)))
    print(f"  compiled {len(rep)} kernel configurations with Triton {triton.__version__} (torch {torch.__version__}) "
          f"in {time.time() - t:.0f} s")
    print(f"  {'kernel[config]':28s} {'target':6s} {'regs':>4s} {'stack':>5s} {'spill':>5s} {'shared':>7s} "
          f"{'warps':>5s} {'mma':>4s} {'wgmma':>5s}")
    for r in rep:
        if "error" in r:
            print(f"  {r['name']:28s} {r['target']:6s} ERROR {r['error'][:80]}")
            continue
        print(f"  {r['name']:28s} {r['target']:6s} {r['regs']:4d} {r['stack']:5d} {r['local']:5d} "
              f"{r['static_shared'] + r['dynamic_shared']:7d} {r['num_warps']:5d} {str(r['mma'])[0]:>4s} "
              f"{str(r['wgmma'])[0]:>5s}")
    fl = floors()
    print(f"\n  roofline floor at the GPU bench sizes (H100 SXM {GPUS['H100 SXM']['bw'] / 1e12} TB/s, "
          f"{GPUS['H100 SXM']['flops'] / 1e12:.0f} TFLOP/s bf16; A100 {GPUS['A100']['bw'] / 1e12} TB/s, "
          f"{GPUS['A100']['flops'] / 1e12:.0f} TFLOP/s)")
    for k, v in fl.items():
        print(f"  {k:20s} {v['size']:34s} {v['bytes'] / 1e6:9.1f} MB {v['flops'] / 1e9:8.1f} GFLOP   "
              f"H100 {v['floor_us_sm_90']:8.1f} us   A100 {v['floor_us_sm_80']:8.1f} us")
    return dict(triton=triton.__version__, torch=torch.__version__, report=rep, floors=fl, gpus=GPUS)


# ------------------------------------------------------------------------------------------------ gpu check

# python bench.py --gpu-check: the whole GPU truth in one command (issue 20). On CUDA, with compiled Triton kernels:
#   kernels  every launch configuration kernels.launch_config picks on this GPU (each config of bench.compile_specs),
#            Triton vs the torch path on the same CUDA tensors, forward and every gradient, fp32 / bf16 / fp64 /
#            complex, odd sizes, the sizes of tests/test_kernels.py and the bench sizes;
#   timings  each kernel at the bench sizes as a fraction of its roofline floor (floors() with the ceilings measured
#            now), and the selective scan beside the pure-torch path on CUDA;
#   models   every registered model: one training step in bf16 autocast on CUDA vs fp32 on CPU from the same weights
#            and batch (loss within LOSS_TOL), then ms/step, tokens/s and MFU against the measured bf16 matmul peak;
#   train    `train.py --steps 50` per model on CUDA (loss falls, checkpoint written, eval + generation ran), then
#            --resume to step 55;
#   compile  (issue 19.4) per model family (COMPILE_MODELS, or --models), in its own process: torch.compile(model) forward + backward vs eager in fp32 on
#            one batch (loss within COMPILE_TOL, every gradient within COMPILE_GRAD_TOL), compile seconds, ms and
#            kernels launched per forward + backward each way; and `train.py --compile=True --steps 50` beside the
#            eager run of `train`: its logged losses within COMPILE_TRAIN_TOL of the eager run's at every logged step.
#            On CPU (--device cpu) train.py refuses --compile (SKIP rows); --cpu_compile runs the forward + backward
#            check there with inductor (~1-2 min a model on one core);
#   ddp      torchrun --nproc_per_node=1 with nccl for one model (and 2 ranks when 2 GPUs are visible).
# Writes gpu_check.json and prints a PASS/FAIL table; exit status 1 if anything failed. Without CUDA: one line, exit
# 0. `--device cpu` rehearses the harness on CPU at small sizes (the torch path against itself, or Triton under
# TRITON_INTERPRET=1); tests/test_gpu_check.py runs it so that the first GPU run fails only for GPU reasons.

KERNEL_TOL = {torch.float64: 1e-9, torch.complex128: 1e-9, torch.float32: 1e-4, torch.complex64: 1e-4,
              torch.bfloat16: 3e-2, "tf32": 1e-2}   # max |x - torch path| / max(|torch path|, 1), as tests/test_kernels
LOSS_TOL = 0.05     # |loss (CUDA, bf16 autocast) - loss (CPU, fp32)| <= LOSS_TOL * max(1, loss CPU): bf16 keeps 8 bits
COMPILE_TOL = 1e-4        # torch.compile vs eager, fp32, one batch: |loss diff| <= COMPILE_TOL * max(1, |loss|) and
COMPILE_GRAD_TOL = 1e-3   # every gradient's max |diff| <= COMPILE_GRAD_TOL * max |eager gradient| (fused kernels
                          # reorder sums: on CPU dense and MoT agree to 7e-7)
COMPILE_TRAIN_TOL = 0.02  # train.py --compile=True vs eager, bf16 autocast, 50 steps: |loss diff| at every logged step
                          # <= COMPILE_TRAIN_TOL * max(1, eager loss) (bf16 rounding of fused kernels grows by steps)
_TAG = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float64: "fp64", torch.complex64: "cfp32",
        torch.complex128: "cfp64"}


def _rel(x, ref):
    x, ref = (torch.view_as_real(t) if t.is_complex() else t for t in (x, ref))
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    if torch.isnan(x).any() or torch.isinf(x).any():
        return float("inf")
    return ((x - ref).abs().max() / ref.abs().max().clamp(min=1.0)).item() if ref.numel() else 0.0


def _run_op(op, make, backend, device, seed):
    """Outputs and the gradient of every input of op(*inputs, backend=backend) for <outputs, fixed random weights>."""
    ins = [t.to(device).requires_grad_() if t is not None and (t.is_floating_point() or t.is_complex()) else
           (t.to(device) if t is not None else None) for t in make(seed)]
    outs = op(*ins, backend=backend)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed + 1)
    loss = sum(((o * torch.randn(o.shape, generator=g, dtype=o.dtype).to(device).conj()).real if o.is_complex() else
                o.float() * torch.randn(o.shape, generator=g).to(device)).sum() for o in outs)
    leaves = [t for t in ins if t is not None and t.requires_grad]
    return list(outs) + list(torch.autograd.grad(loss, leaves))


def kernel_cases(scale):
    """(label, configs it launches, op, make(seed) -> inputs, tol): every launch configuration at odd, test and (on
    scale 'gpu') bench sizes. configs name bench.compile_specs entries, so coverage can be checked."""
    cases = []

    def scan_make(shape, dt, h0):
        def make(seed):
            g = torch.Generator().manual_seed(seed)
            real = torch.float64 if dt in (torch.float64, torch.complex128) else torch.float32
            if dt.is_complex:
                a = torch.polar(torch.rand(shape, generator=g, dtype=real) * 0.5 + 0.45,
                                torch.randn(shape, generator=g, dtype=real) * 0.1)
            else:
                a = (torch.rand(shape, generator=g, dtype=real) * 0.5 + 0.45).to(dt)
            b = torch.randn(shape, generator=g, dtype=real).to(dt) if not dt.is_complex else \
                torch.randn(shape, generator=g, dtype=dt)
            h = (torch.randn(shape[:-1], generator=g, dtype=dt if dt.is_complex else real).to(dt)) if h0 else None
            return [a, b, h]
        return make

    scan_sizes = [("odd", (3, 7, 100))] + ([("test", (2, 3, 64)), ("bench", (8, 1536, 2048))] if scale == "gpu" else [])
    dtypes = [torch.float32, torch.bfloat16, torch.float64, torch.complex64, torch.complex128]
    for dt in (dtypes if scale == "gpu" else [torch.float32, torch.complex64]):
        for where, shape in scan_sizes:
            if where == "bench" and dt not in (torch.float32, torch.complex64):
                continue
            shape = (8, 128, 16, 2048) if where == "bench" and dt.is_complex else shape
            for h0 in (False, True):
                tag = _TAG[dt]
                cases.append((f"linear_scan {tag} {where} {shape}{' +h0' if h0 else ''}",
                              [f"scan_fwd[{tag}]", f"scan_bwd[{tag}]"], kernels.linear_scan, scan_make(shape, dt, h0),
                              KERNEL_TOL[dt]))

    def ss_make(b, d, n, L, dt, flags):
        def make(seed):
            g = torch.Generator().manual_seed(seed)
            r = lambda *s: torch.randn(*s, generator=g)
            u, B, C, z = r(b, d, L), r(b, n, L), r(b, n, L), r(b, d, L)
            delta = r(b, d, L) if flags else torch.rand(b, d, L, generator=g) * 0.5 + 0.01
            A, D, bias = -torch.rand(d, n, generator=g) - 0.1, r(d), r(d) * 0.1
            act = [t.to(dt) for t in (u, delta)] + [A] + [t.to(dt) for t in (B, C)]
            return act + ([D, z.to(dt), bias] if flags else [None, None, None])
        return make

    def ss_op(flags):
        return lambda *x, backend: kernels.selective_scan(*x, delta_softplus=flags, return_last_state=True,
                                                          backend=backend)

    ss_sizes = [("odd", 2, 5, 33)] + ([("test", 2, 3, 100)] if scale == "gpu" else [])
    n_buckets = ((4, 16), (16, 16), (24, 32), (32, 32), (40, 64), (64, 64)) if scale == "gpu" else ((4, 16), (24, 32))
    for dt in ([torch.float32, torch.bfloat16] if scale == "gpu" else [torch.float32]):
        for n, bucket in n_buckets:
            for where, b, d, L in ss_sizes:
                for flags in (True, False):
                    tag = _TAG[dt]
                    cases.append((f"selective_scan {tag} {where} b={b} d={d} N={n} L={L}"
                                  f"{' +D+z+bias+softplus' if flags else ''}",
                                  [f"selective_fwd[{tag},N<={bucket}]", f"selective_bwd[{tag},N<={bucket}]"],
                                  ss_op(flags), ss_make(b, d, n, L, dt, flags), KERNEL_TOL[dt]))
        if scale == "gpu":
            p = sizes("cuda")["selective"]
            cases.append((f"selective_scan {_TAG[dt]} bench b={p['b']} d={p['d']} N={p['n']} L={p['L']} +all",
                          [f"selective_fwd[{_TAG[dt]},N<=16]", f"selective_bwd[{_TAG[dt]},N<=16]"], ss_op(True),
                          ss_make(p["b"], p["d"], p["n"], p["L"], dt, True), KERNEL_TOL[dt]))

    def gmm_make(groups, K, M, dt):
        def make(seed):
            g = torch.Generator().manual_seed(seed)
            x = (torch.randn(sum(groups), K, generator=g) / K ** 0.5).to(dt)
            return [x, torch.randn(len(groups), K, M, generator=g).to(dt), torch.tensor(groups)]
        return make

    gmm_op = lambda x, w, gs, backend: kernels.grouped_matmul(x, w, gs.to(x.device), backend=backend)
    gmm_sizes = [("test", [5, 0, 17], 20, 18)]
    if scale == "gpu":
        p = sizes("cuda")["gmm"]
        gmm_sizes += [("test", [0, 0, 9, 13], 20, 18), ("odd", [130, 0, 257], 72, 96),
                      ("bench", list(p["groups"]), p["K"], p["M"])]
    for dt in ([torch.bfloat16, torch.float32] if scale == "gpu" else [torch.float32]):
        for where, groups, K, M in gmm_sizes:
            tag = _TAG[dt]
            cases.append((f"grouped_matmul {tag} {where} groups={groups} K={K} M={M}", [f"gmm[{tag}]", f"gmm_dw[{tag}]"],
                          gmm_op, gmm_make(groups, K, M, dt), KERNEL_TOL["tf32" if dt == torch.float32 else dt]))
    return cases


def check_kernels(device, candidate, scale):
    """One row per case: the candidate backend vs the torch path on `device`; then a row per compiled
    configuration (bench.compile_specs) that no case launched."""
    rows, covered = [], set()
    for i, (label, configs, op, make, tol) in enumerate(kernel_cases(scale)):
        row = dict(section="kernels", name=label, tol=tol)
        try:
            got = _run_op(op, make, candidate, device, seed=i)
            ref = _run_op(op, make, "torch", device, seed=i)
            err = max(_rel(x, r) for x, r in zip(got, ref))
            row.update(err=err, status="PASS" if err <= tol else "FAIL")
            covered.update(configs)
        except Exception as e:   # reported in the table, never stops the check
            row.update(status="FAIL", error=f"{type(e).__name__}: {str(e)[:300]}")
        rows.append(row)
    if device.startswith("cuda") and kernels.HAS_TRITON:
        for s in compile_specs(tuple(torch.cuda.get_device_capability())):
            if s["name"] not in covered:
                rows.append(dict(section="kernels", name=s["name"], status="FAIL", error="no case launched this config"))
    return rows


def check_timings(device):
    """Each kernel's time at the bench sizes as a fraction of its roofline floor on this GPU (bytes / measured copy
    bandwidth, matmul FLOPs / measured bf16 matmul rate); the selective scan beside the pure-torch CUDA path."""
    if not device.startswith("cuda"):
        return [dict(section="timings", name="kernel timings", status="SKIP", error="needs CUDA")]
    ceil = measure_ceilings()
    fl, S, rows = floors(), sizes("cuda"), []

    def floor_us(key):
        f = fl[key]
        return 1e6 * max(f["bytes"] / (ceil["copy_GBps"] * 1e9), f["flops"] / (ceil["mm_bf16_TFLOPs"] * 1e12))

    def add(key, name, fwd_s, fb_s, note=""):
        us = {key: fwd_s * 1e6}
        if fb_s is not None and key.replace("_fwd", "_bwd") in fl:
            us[key.replace("_fwd", "_bwd")] = (fb_s - fwd_s) * 1e6
        for k, t in us.items():
            rows.append(dict(section="timings", name=f"{k} {name}", us=round(t, 1), floor_us=round(floor_us(k), 1),
                             frac_of_floor=round(floor_us(k) / t, 3), status="PASS", note=note))

    p = S["selective"]
    ins = selective_inputs(p["b"], p["d"], p["n"], p["L"], device)
    f = lambda *x: kernels.selective_scan(*x, delta_softplus=True, backend="triton")
    tf, tfb = timeit(fwd_only(f, ins), 10, 2, device), timeit(fwd_bwd(f, ins), 10, 2, device)
    add("selective_fwd", fl["selective_fwd"]["size"], tf, tfb)
    t = lambda *x: kernels.selective_scan(*x, delta_softplus=True, backend="torch")
    ft, fbt = timeit(fwd_only(t, ins), 3, 1, device), timeit(fwd_bwd(t, ins), 3, 1, device)
    rows.append(dict(section="timings", name=f"selective_scan torch path on CUDA {fl['selective_fwd']['size']}",
                     us=round(ft * 1e6, 1), fwd_bwd_us=round(fbt * 1e6, 1), status="PASS",
                     note=f"Triton {ft / tf:.1f}x faster forward, {fbt / tfb:.1f}x forward + backward"))
    for key, shape, dt in (("scan_fwd", (S["scan"]["b"], S["scan"]["d"], S["scan"]["L"]), torch.float32),
                           ("scan_fwd[complex]", (S["cema"]["b"], S["cema"]["d"], S["cema"]["n"], S["cema"]["L"]),
                            torch.complex64)):
        a, b, _ = [x.to(device).requires_grad_() if x is not None else None
                   for x in kernel_cases_scan_inputs(shape, dt)]
        g = lambda a, b: kernels.linear_scan(a, b, backend="triton")
        add(key, fl[key]["size"], timeit(fwd_only(g, [a, b]), 10, 2, device),
            timeit(fwd_bwd(g, [a, b]), 10, 2, device) if key == "scan_fwd" else None)
    x, w, gs = gmm_inputs(S["gmm"]["groups"], S["gmm"]["K"], S["gmm"]["M"], device, torch.bfloat16)
    g = lambda x, w: kernels.grouped_matmul(x, w, gs, backend="triton")
    fwd, fb = timeit(fwd_only(g, [x, w]), 10, 2, device), timeit(fwd_bwd(g, [x, w]), 10, 2, device)
    add("gmm", fl["gmm"]["size"], fwd, None)
    bwd_floor = floor_us("gmm") + floor_us("gmm_dw")                   # dX = dY W^T (gmm) and dW (gmm_dw)
    rows.append(dict(section="timings", name=f"gmm backward (dX + dW) {fl['gmm_dw']['size']}",
                     us=round((fb - fwd) * 1e6, 1), floor_us=round(bwd_floor, 1),
                     frac_of_floor=round(bwd_floor / ((fb - fwd) * 1e6), 3), status="PASS"))
    for r in rows:
        r["ceilings"] = ceil
    return rows


def kernel_cases_scan_inputs(shape, dt):
    g = torch.Generator().manual_seed(0)
    mag = torch.rand(shape, generator=g) * 0.5 + 0.45
    a = torch.polar(mag, torch.randn(shape, generator=g) * 0.1) if dt.is_complex else mag
    return [a, torch.randn(shape, generator=g, dtype=dt), None]


def check_models(device, names, peak, reps=10, batch_size=None, overrides=None):
    """Every model: one step on CPU fp32 and on `device` (bf16 autocast on CUDA) from the same weights and batch,
    the losses compared; then ms/step, tokens/s, MFU (count_flops x tokens/s over the measured matmul peak)."""
    import train
    rows = []
    cuda = device.startswith("cuda")
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    for name in names:
        row = dict(section="models", name=name)
        try:
            over = (BENCH_OVERRIDES if overrides is None else overrides).get(name)
            cpu_model, _, tc, ds = train.build(name, None, over, device="cpu")
            dev_model = train.build(name, None, over, device=device)[0]
            dev_model.load_state_dict(cpu_model.state_dict())
            batch = ds.get_batch("train", 2, 0)
            losses = []
            for model, dev, ctx in ((cpu_model, "cpu", contextlib.nullcontext), (dev_model, device, amp)):
                torch.manual_seed(0)
                model.train()
                with ctx():
                    loss = model(train.to(batch, dev))[1]
                loss.backward()
                losses.append(float(loss.detach()))
            diff = abs(losses[1] - losses[0])
            ok = diff <= LOSS_TOL * max(1.0, abs(losses[0])) and all(map(math.isfinite, losses))
            row.update(loss_cpu_fp32=losses[0], loss_device=losses[1], loss_diff=diff, tol=LOSS_TOL)
            big = train.to(ds.get_batch("train", batch_size or tc.batch_size, 1), device)
            fpt = train.count_flops(dev_model, big)
            opt = torch.optim.AdamW([p for p in dev_model.parameters() if p.requires_grad], lr=1e-4)

            def step():
                with amp():
                    loss = dev_model(big)[1]
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            s = timeit(step, reps, 2, device, statistics.median)
            tokens = big["tokens"].numel()
            row.update(ms_step=round(1e3 * s, 2), tokens_s=round(tokens / s), flops_per_token=fpt,
                       mfu=round(fpt * tokens / s / peak, 4), status="PASS" if ok else "FAIL")
            if not ok:
                row["error"] = f"loss {losses[1]:.5g} on {device} vs {losses[0]:.5g} on CPU fp32 (tol {LOSS_TOL})"
        except Exception as e:
            row.update(status="FAIL", error=f"{type(e).__name__}: {str(e)[:300]}")
        rows.append(row)
    return rows


def _run(cmd, timeout=600):
    """Run a command; -> (return code, last lines of its output)."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=os.path.dirname(os.path.abspath(__file__)))
        return r.returncode, (r.stdout + r.stderr)[-2000:]
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout} s"


def train_commands(name, device, out, steps=50):
    """The train.py runs the check makes for one model: `steps` steps, then --resume to steps + 5."""
    base = [sys.executable, "train.py", "--model", name, "--device", device, "--out", out, "--eval_every", str(steps),
            "--log_every", "10", "--ckpt_every", str(steps)]
    return [base + ["--steps", str(steps)], base + ["--steps", str(steps + 5), "--resume"]]


def _metrics(out):
    path = os.path.join(out, "metrics.jsonl")
    return [json.loads(line) for line in open(path) if line.strip()] if os.path.exists(path) else []


def check_train_run(name, device, out, run=_run, steps=50):
    """One model's train.py on `device`: the loss falls, a checkpoint and an eval (with generation metrics where the
    model generates) are written, and --resume continues to steps + 5."""
    row, problems = dict(section="train", name=name), []
    first, again = train_commands(name, device, out, steps)
    rc, log = run(first)
    if rc != 0:
        return dict(row, status="FAIL", error=f"train.py --steps {steps} exit {rc}: {log.strip()[-300:]}")
    rows = _metrics(out)
    losses = [r["loss"] for r in rows if "loss" in r and "eval_loss" not in r]
    evals = [r for r in rows if "eval_loss" in r]
    if len(losses) < 2 or not losses[-1] < losses[0]:
        problems.append(f"the training loss did not fall ({losses})")
    if not os.path.exists(os.path.join(out, "ckpt.pt")):
        problems.append("no checkpoint written")
    if not evals:
        problems.append("no eval record")
    rc, log = run(again)
    if rc != 0:
        problems.append(f"--resume exit {rc}: {log.strip()[-200:]}")
    elif max((r.get("step", 0) for r in _metrics(out)), default=0) != steps + 5:
        problems.append(f"--resume did not reach step {steps + 5}")
    row.update(first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None,
               eval_keys=sorted(k for k in (evals[-1] if evals else {}) if k not in ("step", "tokens", "flops")),
               status="FAIL" if problems else "PASS", error="; ".join(problems) or None)
    return row


def check_compile_train_run(name, device, out, eager_out, run=_run, steps=50):
    """`train.py --compile=True --steps N` (torch.compile, CUDA only) beside the eager run in eager_out: it finishes
    and its logged losses follow the eager run's within COMPILE_TRAIN_TOL at every logged step."""
    row = dict(section="compile", name=f"{name} train.py --compile=True, {steps} steps vs eager", tol=COMPILE_TRAIN_TOL)
    if not device.startswith("cuda"):
        return dict(row, status="SKIP", error="train.py --compile=True is CUDA only (it refuses it on CPU)")
    rc, log = run(train_commands(name, device, out, steps)[0] + ["--compile=True"])
    if rc != 0:
        return dict(row, status="FAIL", error=f"train.py --compile=True exit {rc}: {log.strip()[-300:]}")
    loss = lambda d: {r["step"]: r["loss"] for r in _metrics(d) if "loss" in r and "eval_loss" not in r}
    eager, comp = loss(eager_out), loss(out)
    common = sorted(set(eager) & set(comp))
    if not common or max(common) != steps:
        return dict(row, status="FAIL", error=f"no loss to compare at step {steps} (eager logged {sorted(eager)}, "
                                              f"compiled {sorted(comp)})")
    diff = max(abs(comp[s] - eager[s]) / max(1.0, abs(eager[s])) for s in common)
    ok = diff <= COMPILE_TRAIN_TOL and all(map(math.isfinite, comp.values()))
    return dict(row, loss_diff=diff, eager_loss=eager[steps], compiled_loss=comp[steps], status="PASS" if ok else "FAIL",
                error=None if ok else f"compiled loss {comp[steps]:.5g} vs eager {eager[steps]:.5g} at step {steps}; "
                                      f"max relative difference {diff:.3g} over steps {common} (tol {COMPILE_TRAIN_TOL})")


def check_train(device, names, jobs, run=_run, steps=50, compile=()):
    """check_train_run for every model, `jobs` at a time (tiny models share one GPU), in a temporary directory; for
    the models in `compile`, check_compile_train_run after it (rows: every model's train row, then the compile ones)."""
    import concurrent.futures
    import shutil
    root = tempfile.mkdtemp(prefix="nanomix_gpu_check_")

    def one(n):
        rows = [check_train_run(n, device, os.path.join(root, n), run, steps)]
        if n in compile:
            rows.append(check_compile_train_run(n, device, os.path.join(root, n + "-compile"), os.path.join(root, n),
                                                run, steps))
        return rows
    try:
        with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as ex:
            done = list(ex.map(one, names))
        return [r[0] for r in done] + [r[1] for r in done if len(r) > 1]
    finally:
        shutil.rmtree(root, ignore_errors=True)


COMPILE_MODELS = ("dense", "mot", "mamba", "mom", "moma", "transfusion", "transfusion-mot", "megabyte", "blt",
                  "megalodon")   # the compile checks: one model per family (the variants share its code)
_MODEL_FILES = ("mot.py", "mom.py", "moma.py", "transfusion.py", "megabyte.py", "blt.py", "megalodon.py", "kernels.py")


def _model_line(text):
    """The last 'File ".../<model file>.py", line N' in a traceback or a dynamo error: the model code responsible."""
    hits = re.findall(r'File "([^"]+)", line (\d+)', text)
    hits = [(f, n) for f, n in hits if os.path.basename(f) in _MODEL_FILES]
    return f"{os.path.basename(hits[-1][0])}:{hits[-1][1]}" if hits else None


def compile_one(name, device, overrides=None, batch_size=2, reps=3):
    """torch.compile(model) forward + backward vs eager, fp32 (no TF32), one batch, the same weights: -> a row with
    both losses, the largest gradient difference, compile seconds, ms per forward + backward each way and, on CUDA,
    kernels launched per forward + backward each way (the launch-bound overhead compile removes)."""
    import traceback

    import torch._inductor.config as inductor_config
    import train
    row = dict(section="compile", name=f"{name} torch.compile fwd+bwd vs eager (fp32)", tol=COMPILE_TOL)
    cuda = device.startswith("cuda")
    try:
        inductor_config.fallback_random = True            # random ops in a compiled graph draw as eager's do
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        model, _, _, ds = train.build(name, None, (BENCH_OVERRIDES if overrides is None else overrides).get(name),
                                      device=device)
        batch = train.to(ds.get_batch("train", batch_size, 0), device)
        model.train()
        sync = torch.cuda.synchronize if cuda else (lambda: None)

        def fwd_bwd(m):
            torch.manual_seed(0)
            for p in model.parameters():
                p.grad = None
            loss = m(batch)[1]
            loss.backward()
            sync()
            return loss

        def run(m):
            loss = fwd_bwd(m)
            return float(loss.detach()), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                          if p.grad is not None}
        le, ge = run(model)
        from torch._dynamo.utils import counters
        counters.clear()
        compiled = torch.compile(model)
        t = time.perf_counter()
        lc, gc = run(compiled)
        row["compile_s"] = round(time.perf_counter() - t, 1)
        breaks = counters["graph_break"]    # each break splits the step into more graphs (more launches, host syncs)
        row.update(graph_breaks=sum(breaks.values()), graph_break_reasons=[k[:200] for k in list(breaks)[:4]])
        missing = sorted(set(ge) ^ set(gc))
        grad = max((((gc[n] - ge[n]).abs().max() / ge[n].abs().max().clamp(min=1e-30)).item() for n in ge if n in gc),
                   default=0.0)
        diff = abs(lc - le)
        times = {model: [], compiled: []}
        for _ in range(reps):                               # interleaved, so that the ratio survives a noisy machine
            for m in times:
                t = time.perf_counter()
                fwd_bwd(m)
                times[m].append(time.perf_counter() - t)
        row.update(loss_eager=le, loss_compiled=lc, loss_diff=diff, grad_err=grad, grad_tol=COMPILE_GRAD_TOL,
                   ms_eager=round(1e3 * statistics.median(times[model]), 2),
                   ms_compiled=round(1e3 * statistics.median(times[compiled]), 2))
        if cuda:
            row.update(launches_eager=launch_count(lambda: fwd_bwd(model), device),
                       launches_compiled=launch_count(lambda: fwd_bwd(compiled), device))
        problems = []
        if not (math.isfinite(lc) and diff <= COMPILE_TOL * max(1.0, abs(le))):
            problems.append(f"loss {lc:.6g} compiled vs {le:.6g} eager (tol {COMPILE_TOL})")
        if not grad <= COMPILE_GRAD_TOL:
            problems.append(f"a gradient differs by {grad:.3g} of its max (tol {COMPILE_GRAD_TOL})")
        if missing:
            problems.append(f"gradients only one way: {', '.join(missing[:4])}")
        row.update(status="FAIL" if problems else "PASS", error="; ".join(problems) or None)
    except Exception as e:  # noqa: BLE001 -- a model that does not compile is a FAIL row naming its line of code
        where = _model_line(f"{e}\n{traceback.format_exc()}")
        row.update(status="FAIL", error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:240] if str(e).strip() else ''}"
                                        + (f" (at {where})" if where else ""))
    return row


def check_compile(device, names, jobs, run=_run, cpu=False):
    """compile_one per model, each in its own process (a compile's caches and a crash stay its own), `jobs` at a time;
    on CPU only with cpu=True (--cpu_compile), else SKIP rows."""
    import concurrent.futures
    if not device.startswith("cuda") and not cpu:
        return [dict(section="compile", name=f"{n} torch.compile fwd+bwd vs eager (fp32)", status="SKIP",
                     error="CPU: add --cpu_compile to compile on CPU (inductor, ~1-2 min a model)") for n in names]
    root = tempfile.mkdtemp(prefix="nanomix_compile_")

    def one(n):
        path = os.path.join(root, f"{n}.json")
        rc, log = run([sys.executable, "bench.py", "--_compile", n, "--device", device, "--out", path], timeout=900)
        if rc == 0 and os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        return dict(section="compile", name=f"{n} torch.compile fwd+bwd vs eager (fp32)", status="FAIL",
                    error=f"bench.py --_compile exit {rc}: {log.strip()[-300:]}")
    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as ex:
        return list(ex.map(one, names))


def check_ddp(device, name="mot", run=_run):
    """torchrun with 1 rank (nccl on CUDA), and 2 ranks when 2 GPUs are visible."""
    ranks = [1] + ([2] if device.startswith("cuda") and torch.cuda.device_count() >= 2 else [])
    rows = []
    for n in ranks:
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "train.py",
                   "--model", name, "--steps", "20", "--eval_every", "20", "--device", device.split(":")[0],
                   "--out", out]
            rc, log = run(cmd)
            ok = rc == 0 and os.path.exists(os.path.join(out, "ckpt.pt"))
            rows.append(dict(section="ddp", name=f"torchrun --nproc_per_node={n} {name}", status="PASS" if ok else "FAIL",
                             error=None if ok else f"exit {rc}: {log.strip()[-300:]}"))
    return rows


def print_table(rows):
    """The PASS/FAIL table and a one-line summary; -> the summary dict."""
    for r in rows:
        detail = []
        for k in ("err", "loss_diff", "grad_err", "frac_of_floor", "ms_step", "mfu", "compile_s", "graph_breaks",
                  "ms_eager", "ms_compiled", "launches_eager", "launches_compiled"):
            if r.get(k) is not None:
                detail.append(f"{k} {r[k]:.3g}")
        if r.get("tol") is not None and r.get("err", r.get("loss_diff")) is not None:
            detail.append(f"tol {r['tol']:g}")
        if r.get("error"):
            detail.append(r["error"].splitlines()[0][:160])
        print(f"  {r['status']:4s}  {r['section']:8s} {r['name'][:70]:70s} {'  '.join(detail)}")
    summary = {s: sum(r["status"] == s for r in rows) for s in ("PASS", "FAIL", "SKIP")}
    print(f"gpu-check: {summary['PASS']} passed, {summary['FAIL']} failed, {summary['SKIP']} skipped"
          + (" -- ALL PASS" if not summary["FAIL"] else " -- FAILURES above"))
    return summary


def gpu_check(args, run=_run):
    """python bench.py --gpu-check [--device cpu] [--models ...] [--jobs N] [--out gpu_check.json]. -> exit status."""
    import train
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "none")
    if device == "none" or (device.startswith("cuda") and not torch.cuda.is_available()):
        print(f"gpu-check: no CUDA GPU here (torch {torch.__version__}); nothing to check "
              "(python bench.py --gpu-check --device cpu rehearses the harness)")
        return 0
    cuda = device.startswith("cuda")
    if cuda and kernels._INTERPRET:
        raise SystemExit("gpu-check: unset TRITON_INTERPRET: the check runs the compiled kernels")
    scale = "gpu" if cuda else "cpu"
    candidate = "triton" if cuda or (kernels.HAS_TRITON and kernels._INTERPRET) else "torch"
    names = args.models or list(train.registry())
    t0 = time.time()
    info = dict(machine(), device=device, candidate_backend=candidate,
                triton=kernels.triton.__version__ if kernels.HAS_TRITON else None)
    print(f"gpu-check on {info.get('gpu', device)}: torch {info['torch']}, triton {info['triton']}, "
          f"kernels {candidate} vs torch path, {len(names)} models")
    rows = list(check_kernels(device, candidate, scale))
    print(f"  kernels checked in {time.time() - t0:.0f} s", flush=True)
    rows += check_timings(device)
    peak = measure_ceilings()["mm_bf16_TFLOPs"] * 1e12 if cuda else matmul_peak(device)   # bf16 8192^3 on CUDA
    info["matmul_peak_flops"] = peak
    rows += check_models(device, names, peak, reps=10 if cuda else 2)
    comp = args.models or [n for n in COMPILE_MODELS if n in names]   # one per family unless --models names them
    rows += check_compile(device, comp, args.jobs, run=run, cpu=args.cpu_compile)
    rows += check_train(device, names, args.jobs, run=run, steps=50 if cuda else args.train_steps, compile=comp)
    rows += check_ddp(device, "mot" if "mot" in names else names[0], run=run)
    summary = print_table(rows)
    result = dict(info, seconds=round(time.time() - t0, 1), summary=summary, ok=not summary["FAIL"], rows=rows)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"wrote {args.out} ({time.time() - t0:.0f} s)")
    return 0 if result["ok"] else 1


# ------------------------------------------------------------------------------------------------ main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=None, help="model names to benchmark (default mode)")
    ap.add_argument("--kernels", action="store_true", help="kernel benchmarks")
    ap.add_argument("--static", action="store_true", help="static GPU resource report (no GPU needed)")
    ap.add_argument("--peers", action="store_true", help="our models at the sizes other implementations were timed at")
    ap.add_argument("--reps", type=int, default=5, help="timing repetitions (the minimum is reported)")
    ap.add_argument("--out", default="bench.json", help="JSON file the results are merged into")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda (model benchmarks)")
    ap.add_argument("--scale_tokens", type=int, default=4096, help="tokens per batch in the length-scaling runs")
    ap.add_argument("--gpu-check", dest="gpu_check", action="store_true",
                    help="run every kernel and model on CUDA for real, write --out (gpu_check.json), PASS/FAIL table")
    ap.add_argument("--jobs", type=int, default=4, help="--gpu-check: train.py runs at a time")
    ap.add_argument("--train_steps", type=int, default=50, help="--gpu-check --device cpu: train.py steps (50 on CUDA)")
    ap.add_argument("--context-parallel", dest="context_parallel", type=int, default=0, metavar="R",
                    help="context_parallel.py's table over R gloo ranks: per mixer and sequence length, the bytes a "
                         "rank sends, what autograd keeps for backward, ms per forward + backward, error vs 1 process")
    ap.add_argument("--wall", nargs="*", default=None, metavar="RUN",
                    help="what each headline run's wall time is made of, projected vs its target (issue 19): runs "
                         + ", ".join(WALL_RUNS) + " (default all)")
    ap.add_argument("--cpu_compile", action="store_true",
                    help="--gpu-check --device cpu: also torch.compile every model on CPU (inductor, ~1-2 min each)")
    ap.add_argument("--_compile", default=None, help=argparse.SUPPRESS)  # internal: compile_one in a child process
    ap.add_argument("--_one", default=None, help=argparse.SUPPRESS)  # internal: one model, in a child process
    args = ap.parse_args(argv)
    if args._compile:
        row = compile_one(args._compile, args.device)
        with open(args.out, "w") as f:
            json.dump(row, f, default=str)
        return 0
    if args.gpu_check:
        if args.out == "bench.json":
            args.out = "gpu_check.json"
        return gpu_check(args)
    if args.context_parallel:   # the method and its table live in context_parallel.py; this runs it where benches run
        return subprocess.call([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                             "context_parallel.py"), str(args.context_parallel)])
    if args._one:
        print(json.dumps(bench_one(args._one, args.device, args.reps, args.scale_tokens)))
        return
    results = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            results = json.load(f)
    if args.wall is not None:
        print("== wall ==")
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        results["wall"] = dict(device=device, threads=torch.get_num_threads(), runs=bench_wall(args))
    if args.kernels:
        print("== kernels ==")
        results["kernels"] = bench_kernels(args)
    if args.static:
        print("== static ==")
        results["static"] = bench_static(args)
    if args.peers:
        print("== peers (batch 8 x 256) ==")
        results["peers"] = bench_peers(args)
    if not (args.kernels or args.static or args.peers or args.wall is not None) or args.models is not None:
        print("== models ==")
        results["models"] = bench_models(args)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
