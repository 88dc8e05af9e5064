"""gpu_check.py — does nanomix run on a GPU as it does on the CPU? Two tools, one module:

    python gpu_check.py                  # (= python bench.py --gpu-check) on a CUDA machine: every kernel config,
                                         # model, torch.compile per model family, train.py run (eager and
                                         # --compile=True), exact resume and torchrun for real; PASS/FAIL table,
                                         # gpu_check.json; without CUDA one line, exit 0; --device cpu rehearses it
    python bench.py --static             # the static report: every Triton kernel compiled ahead of time for each
                                         # target of kernels.TRITON_TARGETS (registers, shared memory, spills,
                                         # tensor-core instructions) and the roofline floor on every card of GPUS

The GPU check (plan() lists its rows from the card alone; each row is guarded, printed and written as it comes):
  kernels  on a card of kernels.TRITON_TARGETS: every launch configuration kernels.launch_config picks there (each
           config of compile_specs), Triton vs the torch path on the same CUDA tensors, forward and every gradient,
           fp32 / bf16 / fp64 / complex, odd sizes, the sizes of tests/test_kernels.py, the bench sizes and a reversed
           scan. On an older card (T4, V100: the torch paths) the Triton rows say NOT_RUN and the torch path on the
           GPU is checked against the CPU instead (no bf16 cases);
  determinism  the selective scan's backward twice on the same inputs (within DETERMINISM_TOL; bit-exact or not);
  timings  each kernel at the bench sizes as a fraction of its roofline floor with the card's own figures (GPUS), and
           the selective scan beside the pure-torch path on CUDA;
  models   every registered model: one training step in 16-bit autocast on CUDA (bf16; fp16 on a card without it) vs
           fp32 on CPU from the same weights and batch (loss within LOSS_TOL), then ms/step, tokens/s and MFU against
           the measured matmul peak;
  flops    count_flops of each model on the device equals its CPU count;
  compile  per model family (COMPILE_MODELS, or --models), each in its own process: torch.compile(model) forward +
           backward vs eager in fp32 on one batch (loss within COMPILE_TOL, every gradient within COMPILE_GRAD_TOL),
           compile seconds, ms and kernels launched per forward + backward each way; and `train.py --compile=True
           --steps 50` beside the eager run of `train`: its logged losses within COMPILE_TRAIN_TOL of the eager run's at
           every logged step. On CPU (--device cpu) train.py refuses --compile (SKIP rows); --cpu_compile runs the
           forward + backward check there with inductor;
  train    `train.py --steps 50` per model on CUDA (loss falls, checkpoint written, eval + generation ran), then
           --resume to step 55 (with --precision fp16 on a card without bf16);
  resume   20 steps in one run vs 10 + --resume 10: equal losses (bit-exact; within DETERMINISM_TOL on the scans);
  ddp      torchrun --nproc_per_node=2 train.py where 2 GPUs are visible; "not exercised (1 GPU)" otherwise.
It writes gpu_check.json (after every row) and prints the PASS/FAIL table; exit status 1 if anything failed.
`--device cpu` rehearses the harness on CPU at small sizes (the torch path against itself, or Triton under
TRITON_INTERPRET=1; DDP on 2 gloo ranks); tests/test_gpu_check.py runs it so that the first GPU run fails only for GPU
reasons.
"""
import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import torch

import kernels
import train
from bench import (BENCH_OVERRIDES, bench_step, fwd_bwd, fwd_only, gmm_inputs, launch_count, machine, matmul_peak,
                   scan_inputs, selective_inputs, sizes, timeit, ceilings)   # bench measures; this file checks

HERE = os.path.dirname(os.path.abspath(__file__))
KERNEL_TOL = {torch.float64: 1e-9, torch.complex128: 1e-9, torch.float32: 1e-4, torch.complex64: 1e-4,
              torch.bfloat16: 3e-2, "tf32": 1e-2}   # max |x - torch path| / max(|torch path|, 1), as tests/test_kernels
LOSS_TOL = 0.05     # |loss (CUDA, bf16 autocast) - loss (CPU, fp32)| <= LOSS_TOL * max(1, loss CPU): bf16 keeps 8 bits
COMPILE_TOL = 1e-4        # torch.compile vs eager, fp32, one batch: |loss diff| <= COMPILE_TOL * max(1, |loss|) and
COMPILE_GRAD_TOL = 1e-3   # every gradient's max |diff| <= COMPILE_GRAD_TOL * max |eager gradient| (fused kernels
                          # reorder sums)
COMPILE_TRAIN_TOL = 0.02  # train.py --compile=True vs eager, bf16 autocast, 50 steps: |loss diff| at every logged step
                          # <= COMPILE_TRAIN_TOL * max(1, eager loss) (bf16 rounding of fused kernels grows by steps)
_TAG = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
        torch.complex64: "cfp32", torch.complex128: "cfp64"}
DETERMINISM_TOL = 1e-5    # run-to-run on the same inputs: max |x1 - x2| / max |x1| of every gradient of the selective
                          # scan, and of the logged losses of a resumed run of a model on it (on a GPU its backward
                          # sums dB and dC with atomic adds, whose order varies); everything else must be bit-exact
SCAN_MODELS = ("mamba", "mom")   # the models on the selective scan: their resume is held to DETERMINISM_TOL

# The cards students and labs have, by compute capability: memory bandwidth (B/s), the dense tensor-core matmul rate
# in the dtype the card trains in (FLOP/s; fp16 on T4 / V100, which have no bf16; sparsity figures halved) and fp32
# without tensor cores. Source: NVIDIA's data sheets (T4; V100 SXM2; A10; L4; A100 SXM4 80 GB; H100 SXM5). An RTX 30xx
# is sm_86 like the A10 and an RTX 40xx sm_89 like the L4, with figures of their own: a card is found by name first.
GPUS = {
    "T4": dict(cap=(7, 5), bw=320e9, tensor=65e12, dtype="fp16", fp32=8.1e12),
    "V100": dict(cap=(7, 0), bw=900e9, tensor=125e12, dtype="fp16", fp32=15.7e12),
    "A10": dict(cap=(8, 6), bw=600e9, tensor=125e12, dtype="bf16", fp32=31.2e12),
    "L4": dict(cap=(8, 9), bw=300e9, tensor=121e12, dtype="bf16", fp32=30.3e12),
    "A100": dict(cap=(8, 0), bw=2.039e12, tensor=312e12, dtype="bf16", fp32=19.5e12),
    "H100": dict(cap=(9, 0), bw=3.35e12, tensor=989e12, dtype="bf16", fp32=67e12),
}
NOT_RUN = "not run: torch paths on this card (kernels.TRITON_TARGETS)"


def card(device):
    """What the check needs to know of `device`: its name and capability, the GPUS entry with its figures (by name,
    else by capability; key None if neither), whether the Triton kernels run there (kernels.TRITON_TARGETS) and the
    precision train.py trains in there (bf16 from capability 8.0, fp16 with a gradient scaler below, fp32 on CPU)."""
    if not device.startswith("cuda"):
        return dict(name="cpu", cap=None, key=None, triton=False, precision="fp32")
    name, cap = torch.cuda.get_device_name(device), tuple(torch.cuda.get_device_capability(device))
    by_cap = next((k for k, g in GPUS.items() if g["cap"] == cap), None)
    key = next((k for k in sorted(GPUS, key=len, reverse=True) if k in name and GPUS[k]["cap"] == cap), by_cap)
    return dict(GPUS.get(key, {}), name=name, cap=cap, key=key, triton=cap in kernels.TRITON_TARGETS,
                precision="bf16" if cap >= (8, 0) else "fp16")


def target_name(cap):
    return f"sm_{cap[0]}{cap[1]}"


# ------------------------------------------------------------------------------------------------ static report
# What a GPU can launch: every (kernel, dtype, flags, config) that kernels.launch_config can pick, compiled ahead of
# time (tests/test_gpu_compile.py and bench.py --static). No GPU needed: triton compiles for a target that is not
# present, and the wheel ships cuobjdump (/work/shared/papers/kernels.md, "Compiling for a GPU without one").


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
        t = _TAG[dt]
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
        t, f32 = _TAG[dt], "fp32"
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
        t = _TAG[dt]
        add(f"gmm[{t}]", kernels.gmm_kernel,
            dict(x_ptr=t, w_ptr=t, y_ptr=t, tile_group_ptr="i32", tile_row_ptr="i32", group_end_ptr="i32"),
            ["K", "M", "G", "stride_wg", "stride_wk", "stride_wm"], kernels.launch_config("gmm", target, dtype=dt), {},
            div16=("K", "M", "stride_wg", "stride_wk"))
        add(f"gmm_dw[{t}]", kernels.gmm_dw_kernel,
            dict(x_ptr=t, dy_ptr=t, dw_ptr=t, group_start_ptr="i32", group_end_ptr="i32"),
            ["K", "M"], kernels.launch_config("gmm_dw", target, dtype=dt), {}, div16=("K", "M"))
    return specs


SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_86": 99 * 1024, "sm_89": 99 * 1024, "sm_90": 227 * 1024}   # max shared
# memory per block (opt-in), bytes: one entry per target of kernels.TRITON_TARGETS (tests/test_gpu_compile.py)


def static_report(targets=kernels.TRITON_TARGETS):
    """Compile every entry of compile_specs(target) ahead of time for each GPU target (no GPU needed) and read
    the cubin's resources with the cuobjdump shipped in the triton wheel. Returns one dict per (spec, target):
    name, kernel, target, num_warps, num_stages, regs, stack, local (spill bytes), static_shared,
    dynamic_shared, mma (mma.sync in the PTX), wgmma, compile_s, or error. Under TRITON_INTERPRET=1 the
    @triton.jit objects are interpreter stubs, so it runs itself in a child process without it."""
    if kernels._INTERPRET:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        code = f"import json, gpu_check; print('@@REPORT@@' + json.dumps(gpu_check.static_report({tuple(targets)!r})))"
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=HERE)
        if r.returncode:
            raise RuntimeError("static_report child failed:\n" + r.stderr[-3000:])
        return json.loads(r.stdout.split("@@REPORT@@")[-1])
    jobs = [(tuple(cap), i) for cap in targets for i in range(len(compile_specs(tuple(cap))))]
    workers = min(4, os.cpu_count() or 1)
    if workers > 1:   # compiles are independent: a process pool (fork keeps this non-interpreted import)
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
    """Roofline floor of each kernel at the GPU bench sizes: compulsory memory bytes / bandwidth and matmul FLOPs /
    tensor-core throughput, per card of GPUS (floor_us_<card>). Bytes count each input read once and each output
    written once; the grouped matmul is 16-bit (bf16, or fp16 on a card without bf16: the same bytes)."""
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
            out[k][f"floor_us_{gpu}"] = round(max(nbytes / spec["bw"], flops / spec["tensor"]) * 1e6, 1)
    return out


def static_summary():
    """python bench.py --static: print the resource report of every compiled kernel configuration for each target of
    kernels.TRITON_TARGETS and the roofline floors on every card of GPUS; -> the dict bench.py stores under "static"."""
    import triton
    t = time.time()
    rep = static_report(kernels.TRITON_TARGETS)
    print(f"  compiled {len(rep)} kernel configurations for {', '.join(map(target_name, kernels.TRITON_TARGETS))} with "
          f"Triton {triton.__version__} (torch {torch.__version__}) in {time.time() - t:.0f} s")
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
    print("\n  roofline floor (us) at the GPU bench sizes on each card (data sheet: " + "; ".join(
        f"{k} {g['bw'] / 1e12:g} TB/s, {g['tensor'] / 1e12:g} TFLOP/s {g['dtype']}" for k, g in GPUS.items()) + ")")
    print(f"  {'kernel':20s} {'size':34s} {'MB':>7s} {'GFLOP':>6s} " + " ".join(f"{k:>7s}" for k in GPUS))
    for k, v in fl.items():
        print(f"  {k:20s} {v['size']:34s} {v['bytes'] / 1e6:7.1f} {v['flops'] / 1e9:6.1f} "
              + " ".join(f"{v['floor_us_' + g]:7.1f}" for g in GPUS))
    return dict(triton=triton.__version__, torch=torch.__version__, report=rep, floors=fl, gpus=GPUS)


# ------------------------------------------------------------------------------------------------ gpu check: kernels

def _one_line(e):
    """An exception as one line: its type and the first line of its message."""
    msg = str(e).strip()
    return f"{type(e).__name__}: {msg.splitlines()[0][:300] if msg else ''}"


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


def kernel_cases(scale, bf16=True):
    """(label, configs it launches, op, make(seed) -> inputs, tol): every launch configuration at odd, test and (on
    scale 'gpu') bench sizes, and a reversed scan. configs name compile_specs entries, so coverage can be checked.
    bf16=False (a card without bf16, on the torch paths) leaves the bf16 cases out."""
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
    dtypes = [d for d in dtypes if bf16 or d != torch.bfloat16] if scale == "gpu" else [torch.float32, torch.complex64]
    for dt in dtypes:
        for where, shape in scan_sizes:
            if where == "bench" and dt not in (torch.float32, torch.complex64):
                continue
            shape = (8, 128, 16, 2048) if where == "bench" and dt.is_complex else shape
            for h0 in (False, True):
                tag = _TAG[dt]
                cases.append((f"linear_scan {tag} {where} {shape}{' +h0' if h0 else ''}",
                              [f"scan_fwd[{tag}]", f"scan_bwd[{tag}]"], kernels.linear_scan, scan_make(shape, dt, h0),
                              KERNEL_TOL[dt]))
    # a reverse recurrence h_t = a_t h_{t+1} + b_t, written as the scan of the flipped inputs: the backward kernel's
    # reversed associative scan then runs forwards, the forward kernel's backwards
    rev = lambda a, b, h0, backend: kernels.linear_scan(a.flip(-1), b.flip(-1), h0, backend=backend).flip(-1)
    for where, shape in scan_sizes[:2]:
        cases.append((f"linear_scan fp32 reversed (flipped input) {where} {shape} +h0", ["scan_fwd[fp32]",
                      "scan_bwd[fp32]"], rev, scan_make(shape, torch.float32, True), KERNEL_TOL[torch.float32]))

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
    for dt in ([torch.float32] + [torch.bfloat16] * bf16 if scale == "gpu" else [torch.float32]):
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
    for dt in ([torch.bfloat16] * bf16 + [torch.float32] if scale == "gpu" else [torch.float32]):
        for where, groups, K, M in gmm_sizes:
            tag = _TAG[dt]
            cases.append((f"grouped_matmul {tag} {where} groups={groups} K={K} M={M}", [f"gmm[{tag}]", f"gmm_dw[{tag}]"],
                          gmm_op, gmm_make(groups, K, M, dt), KERNEL_TOL["tf32" if dt == torch.float32 else dt]))
    return cases


def kernel_row(case, candidate, device, ref_device, seed, covered=None):
    """One kernel case: `candidate` on `device` vs the torch path on `ref_device` (the same device for Triton; the CPU
    for a card on the torch paths), outputs and every gradient; the configs it launched are added to `covered`."""
    label, configs, op, make, tol = case
    row = dict(section="kernels", name=label, tol=tol)
    try:
        got = _run_op(op, make, candidate, device, seed=seed)
        ref = _run_op(op, make, "torch", ref_device, seed=seed)
        err = max(_rel(x, r) for x, r in zip(got, ref))
        row.update(err=err, status="PASS" if err <= tol else "FAIL")
        if covered is not None:
            covered.update(configs)
    except Exception as e:   # reported in the table, never stops the check
        row.update(status="FAIL", error=_one_line(e))
    return row


def coverage_rows(device, covered):
    """A FAIL row per compiled configuration (compile_specs of this GPU's target) that no kernel case launched."""
    cap = tuple(torch.cuda.get_device_capability(device))
    return [dict(section="kernels", name=s["name"], status="FAIL", error="no case launched this config")
            for s in compile_specs(cap) if s["name"] not in covered]


def check_kernels(device, candidate, scale, ref_device=None, bf16=True):
    """One row per case: the candidate backend vs the torch path (on ref_device, default `device`); then on a GPU
    running Triton a row per compiled configuration (compile_specs) that no case launched."""
    covered = set()
    rows = [kernel_row(case, candidate, device, ref_device or device, i, covered)
            for i, case in enumerate(kernel_cases(scale, bf16))]
    if device.startswith("cuda") and candidate == "triton":
        rows += coverage_rows(device, covered)
    return rows


# -------------------------------------------------------------------------------------------- gpu check: determinism

def _max_rel(x, y):
    """max |x - y| / max |x| (0 if both are zero)."""
    x, y = x.detach().double(), y.detach().double()
    return ((x - y).abs().max() / x.abs().max().clamp(min=1e-300)).item() if x.numel() else 0.0


def check_determinism(device, backend, scale):
    """The selective scan's forward + backward twice on the same inputs and cotangent: the largest relative difference
    of any gradient. PASS within DETERMINISM_TOL; the row says whether the two were bit-exact."""
    p = sizes("cuda")["selective"] if scale == "gpu" else dict(b=2, d=8, n=4, L=40)
    ins = selective_inputs(p["b"], p["d"], p["n"], p["L"], device)
    dy = torch.randn(p["b"], p["d"], p["L"], generator=torch.Generator().manual_seed(1)).to(device)

    def grads():
        for t in ins:
            t.grad = None
        kernels.selective_scan(*ins, delta_softplus=True, backend=backend).backward(dy)
        return [t.grad.clone() for t in ins]
    g1, g2 = grads(), grads()
    err = max(_max_rel(a, b) for a, b in zip(g1, g2))
    exact = all(torch.equal(a, b) for a, b in zip(g1, g2))
    return dict(section="determinism", name=f"selective_scan backward twice, same inputs ({backend}, b={p['b']} "
                f"d={p['d']} N={p['n']} L={p['L']})", err=err, tol=DETERMINISM_TOL, bit_exact=exact,
                status="PASS" if err <= DETERMINISM_TOL else "FAIL",
                note="bit-exact" if exact else f"not bit-exact (max relative difference {err:.3g})")


# ------------------------------------------------------------------------------------------------ gpu check: timings

def _dtype(c):
    """The 16-bit dtype a card computes matmuls in: bf16, or fp16 where it has no bf16 (T4, V100)."""
    return torch.float16 if c.get("precision") == "fp16" else torch.bfloat16


def check_timings(device, backend="triton", c=None):
    """Each kernel (`backend`: the Triton kernels, or the torch paths on a card without them) at the bench sizes as a
    fraction of its roofline floor on this card (floors() with the card's data-sheet figures, GPUS; the ceilings
    measured now where the card is not in GPUS); with Triton, the selective scan beside the torch path on CUDA."""
    if not device.startswith("cuda"):
        return [dict(section="timings", name="kernel timings", status="SKIP", error="needs CUDA")]
    c = c or card(device)
    half = _dtype(c)
    ceil = ceilings(half)
    bw, mm = ((c["bw"], c["tensor"]) if c.get("key") else
              (ceil["copy_GBps"] * 1e9, ceil[f"mm_{_TAG[half]}_TFLOPs"] * 1e12))
    fl, S, rows = floors(), sizes("cuda"), []

    def floor_us(key):
        return 1e6 * max(fl[key]["bytes"] / bw, fl[key]["flops"] / mm)

    def add(key, name, fwd_s, fb_s, note=""):
        us = {key: fwd_s * 1e6}
        if fb_s is not None and key.replace("_fwd", "_bwd") in fl:
            us[key.replace("_fwd", "_bwd")] = (fb_s - fwd_s) * 1e6
        for k, t in us.items():
            rows.append(dict(section="timings", name=f"{k} ({backend}) {name}", us=round(t, 1),
                             floor_us=round(floor_us(k), 1), frac_of_floor=round(floor_us(k) / t, 3), status="PASS",
                             note=note))

    p = S["selective"]
    ins = selective_inputs(p["b"], p["d"], p["n"], p["L"], device)
    f = lambda *x: kernels.selective_scan(*x, delta_softplus=True, backend=backend)
    tf, tfb = timeit(fwd_only(f, ins), 10, 2, device), timeit(fwd_bwd(f, ins), 10, 2, device)
    add("selective_fwd", fl["selective_fwd"]["size"], tf, tfb)
    if backend == "triton":
        t = lambda *x: kernels.selective_scan(*x, delta_softplus=True, backend="torch")
        ft, fbt = timeit(fwd_only(t, ins), 3, 1, device), timeit(fwd_bwd(t, ins), 3, 1, device)
        rows.append(dict(section="timings", name=f"selective_scan torch path on CUDA {fl['selective_fwd']['size']}",
                         us=round(ft * 1e6, 1), fwd_bwd_us=round(fbt * 1e6, 1), status="PASS",
                         note=f"Triton {ft / tf:.1f}x faster forward, {fbt / tfb:.1f}x forward + backward"))
    for key, shape, dt in (("scan_fwd", (S["scan"]["b"], S["scan"]["d"], S["scan"]["L"]), torch.float32),
                           ("scan_fwd[complex]", (S["cema"]["b"], S["cema"]["d"], S["cema"]["n"], S["cema"]["L"]),
                            torch.complex64)):
        a, b = [x.to(device).requires_grad_() for x in scan_inputs(shape, dt)]
        g = lambda a, b: kernels.linear_scan(a, b, backend=backend)
        add(key, fl[key]["size"], timeit(fwd_only(g, [a, b]), 10, 2, device),
            timeit(fwd_bwd(g, [a, b]), 10, 2, device) if key == "scan_fwd" else None)
    x, w, gs = gmm_inputs(S["gmm"]["groups"], S["gmm"]["K"], S["gmm"]["M"], device, half)
    g = lambda x, w: kernels.grouped_matmul(x, w, gs, backend=backend)
    fwd, fb = timeit(fwd_only(g, [x, w]), 10, 2, device), timeit(fwd_bwd(g, [x, w]), 10, 2, device)
    add("gmm", fl["gmm"]["size"].replace("bf16", _TAG[half]), fwd, None)
    bwd_floor = floor_us("gmm") + floor_us("gmm_dw")                   # dX = dY W^T (gmm) and dW (gmm_dw)
    rows.append(dict(section="timings", name=f"gmm backward (dX + dW) ({backend}) {fl['gmm_dw']['size']}",
                     us=round((fb - fwd) * 1e6, 1), floor_us=round(bwd_floor, 1),
                     frac_of_floor=round(bwd_floor / ((fb - fwd) * 1e6), 3), status="PASS"))
    for r in rows:
        r.update(ceilings=ceil, figures=c.get("key") or "measured ceilings")
    return rows


# ------------------------------------------------------------------------------------------------ gpu check: models

def check_models(device, names, peak, reps=10, batch_size=None, overrides=None, c=None):
    """check_model for every model: its models row and its flops row, one model after another."""
    return [r for name in names for r in check_model(name, device, peak, reps, batch_size, overrides, c)]


def check_model(name, device, peak, reps=10, batch_size=None, overrides=None, c=None):
    """One model: one step on CPU fp32 and on `device` (16-bit autocast on CUDA: bf16, fp16 on a card without bf16)
    from the same weights and batch, the losses compared; then ms/step, tokens/s, MFU (count_flops x tokens/s over
    `peak`, FLOP/s, or peak() when it is a function). -> [models row, flops row]: count_flops on the device must equal
    the CPU count (FLOP counting runs the torch paths, whatever the device runs)."""
    row = dict(section="models", name=name)
    cuda = device.startswith("cuda")
    half = _dtype(c or card(device))
    amp = (lambda: torch.autocast("cuda", dtype=half)) if cuda else contextlib.nullcontext
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
        row.update(loss_cpu_fp32=losses[0], loss_device=losses[1], loss_diff=diff, tol=LOSS_TOL, autocast=_TAG[half]
                   if cuda else None)
        big_cpu = ds.get_batch("train", batch_size or tc.batch_size, 1)
        big = train.to(big_cpu, device)
        fpt, fpt_cpu = train.count_flops(dev_model, big), train.count_flops(cpu_model, big_cpu)
        s = timeit(bench_step(dev_model, big, amp), reps, 2, device, statistics.median)
        tokens = big["tokens"].numel()
        peak = peak() if callable(peak) else peak
        row.update(ms_step=round(1e3 * s, 2), tokens_s=round(tokens / s), flops_per_token=fpt,
                   mfu=round(fpt * tokens / s / peak, 4), status="PASS" if ok else "FAIL")
        if not ok:
            row["error"] = f"loss {losses[1]:.5g} on {device} vs {losses[0]:.5g} on CPU fp32 (tol {LOSS_TOL})"
    except Exception as e:   # noqa: BLE001 -- a FAIL row, the other models go on
        return [dict(row, status="FAIL", error=_one_line(e))]
    same = abs(fpt - fpt_cpu) <= 1e-9 * max(1.0, fpt_cpu)
    return [row, dict(section="flops", name=f"{name} count_flops on {device} vs CPU", flops_per_token=fpt,
                      flops_per_token_cpu=fpt_cpu, status="PASS" if same else "FAIL",
                      error=None if same else f"count_flops {fpt:.6g} per token on {device} vs {fpt_cpu:.6g} on "
                                              f"CPU ({fpt / fpt_cpu:.3g}x): FLOPs, --compare and MFU would be wrong")]


# ------------------------------------------------------------------------------------------------ gpu check: train.py runs

def _run(cmd, timeout=600):
    """Run a command; -> (return code, last lines of its output)."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE)
        return r.returncode, (r.stdout + r.stderr)[-2000:]
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout} s"


def has_precision():
    """Whether this train.py takes --precision (auto | fp32 | bf16 | fp16)."""
    return "precision" in {f.name for f in dataclasses.fields(train.TrainConfig)}


def precision_flags(c):
    """The train.py flags for the card's precision: `--precision fp16` on a card without bf16 (where this train.py
    takes it), else none (train.py's auto)."""
    return ["--precision", "fp16"] if c.get("precision") == "fp16" and has_precision() else []


def check_precision(c):
    """On a card without bf16: whether the train.py runs use fp16 with a gradient scaler (--precision fp16)."""
    row = dict(section="train", name="train.py --precision fp16 (a card without bf16: fp16 autocast, gradient scaler)")
    if has_precision():
        return dict(row, status="PASS", note="the train.py, resume and torchrun rows pass --precision fp16")
    return dict(row, status="SKIP", error="--precision: not available in this train.py (its runs used its default)")


def train_commands(name, device, out, steps=50, extra=()):
    """The train.py runs the check makes for one model: `steps` steps, then --resume to steps + 5."""
    base = [sys.executable, "train.py", "--model", name, "--device", device, "--out", out, "--eval_every", str(steps),
            "--log_every", str(min(10, max(1, steps // 5))), "--ckpt_every", str(steps), *extra]
    return [base + ["--steps", str(steps)], base + ["--steps", str(steps + 5), "--resume"]]


def _metrics(out):
    path = os.path.join(out, "metrics.jsonl")
    return [json.loads(line) for line in open(path) if line.strip()] if os.path.exists(path) else []


def check_train_run(name, device, out, run=_run, steps=50, extra=()):
    """One model's train.py on `device`: the loss falls, a checkpoint and an eval (with generation metrics where the
    model generates) are written, and --resume continues to steps + 5."""
    row, problems = dict(section="train", name=name), []
    first, again = train_commands(name, device, out, steps, extra)
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


def check_compile_train_run(name, device, out, eager_out, run=_run, steps=50, extra=()):
    """`train.py --compile=True --steps N` (torch.compile, CUDA only) beside the eager run in eager_out: it finishes
    and its logged losses follow the eager run's within COMPILE_TRAIN_TOL at every logged step."""
    row = dict(section="compile", name=f"{name} train.py --compile=True, {steps} steps vs eager", tol=COMPILE_TRAIN_TOL)
    if not device.startswith("cuda"):
        return dict(row, status="SKIP", error="train.py --compile=True is CUDA only (it refuses it on CPU)")
    rc, log = run(train_commands(name, device, out, steps, extra)[0] + ["--compile=True"])
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


def check_train(device, names, jobs, run=_run, steps=50, compile=(), extra=()):
    """check_train_run for every model, `jobs` at a time (tiny models share one GPU), in a temporary directory; for
    the models in `compile`, check_compile_train_run after it (rows: every model's train row, then the compile ones)."""
    root = tempfile.mkdtemp(prefix="nanomix_gpu_check_")

    def one(n):
        rows = [check_train_run(n, device, os.path.join(root, n), run, steps, extra)]
        if n in compile:
            rows.append(check_compile_train_run(n, device, os.path.join(root, n + "-compile"), os.path.join(root, n),
                                                run, steps, extra))
        return rows
    try:
        with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as ex:
            done = list(ex.map(one, names))
        return [r[0] for r in done] + [r[1] for r in done if len(r) > 1]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def check_resume(name, device, run=_run, n=10, extra=()):
    """Exact resume on this device: train.py for 2n steps in one run vs n steps, then --resume to 2n; the losses logged
    at steps n+1..2n equal, bit-exact (or within DETERMINISM_TOL for SCAN_MODELS, whose GPU backward sums with atomic
    adds). A constant lr after a 2-step warm-up (min_lr_ratio 1) makes the n-step run's schedule the 2n-step run's."""
    tol = DETERMINISM_TOL if name in SCAN_MODELS else 0.0
    row = dict(section="resume", name=f"{name} {2 * n} steps vs {n} + --resume {n} on {device}", tol=tol)
    with tempfile.TemporaryDirectory() as root:
        one, two = os.path.join(root, "one"), os.path.join(root, "two")
        cmd = lambda out, steps: [sys.executable, "train.py", "--model", name, "--device", device, "--out", out,
                                  "--steps", str(steps), "--log_every", "1", "--eval_every", str(n), "--ckpt_every",
                                  str(n), "--gen_n", "0", "--warmup", "2", "--min_lr_ratio", "1", *extra]
        for c in (cmd(one, 2 * n), cmd(two, n), cmd(two, 2 * n) + ["--resume"]):
            rc, log = run(c)
            if rc != 0:
                return dict(row, status="FAIL", error=f"{' '.join(c[2:])} exit {rc}: {log.strip()[-300:]}")
        loss = lambda d: {r["step"]: r["loss"] for r in _metrics(d) if "loss" in r and "eval_loss" not in r}
        a, b = loss(one), loss(two)
    steps = range(n + 1, 2 * n + 1)
    if not all(s in a and s in b for s in steps):
        return dict(row, status="FAIL", error=f"steps {n + 1}..{2 * n} not all logged (one run {sorted(a)[-3:]}, "
                                              f"resumed {sorted(b)[-3:]})")
    err = max(abs(a[s] - b[s]) / max(abs(a[s]), 1e-30) for s in steps)
    exact = all(a[s] == b[s] for s in steps)
    ok = exact or err <= tol
    return dict(row, err=err, bit_exact=exact, status="PASS" if ok else "FAIL",
                note="bit-exact" if exact else f"not bit-exact (max relative difference {err:.3g})",
                error=None if ok else f"resumed losses differ by up to {err:.3g} relative (tol {tol:g})")


# ------------------------------------------------------------------------------------------------ gpu check: torch.compile

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
    import torch._inductor.config as inductor_config
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
    if not device.startswith("cuda") and not cpu:
        return [dict(section="compile", name=f"{n} torch.compile fwd+bwd vs eager (fp32)", status="SKIP",
                     error="CPU: add --cpu_compile to compile on CPU (inductor, ~1-2 min a model)") for n in names]
    root = tempfile.mkdtemp(prefix="nanomix_compile_")

    def one(n):
        path = os.path.join(root, f"{n}.json")
        rc, log = run([sys.executable, "gpu_check.py", "--_compile", n, "--device", device, "--out", path], timeout=900)
        if rc == 0 and os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        return dict(section="compile", name=f"{n} torch.compile fwd+bwd vs eager (fp32)", status="FAIL",
                    error=f"gpu_check.py --_compile exit {rc}: {log.strip()[-300:]}")
    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as ex:
        return list(ex.map(one, names))


# ------------------------------------------------------------------------------------------------ gpu check: torchrun, the table, the command

def ddp_ranks(device):
    """Ranks the DDP row runs: 2 on CPU (gloo) or where 2 GPUs are visible, else 0 (not exercised): one rank skips
    the DDP wrap, its all-reduces and the barriers, so it proves nothing about them."""
    return 2 if not device.startswith("cuda") or torch.cuda.device_count() >= 2 else 0


def check_ddp(device, name="mot", run=_run, extra=()):
    """torchrun --nproc_per_node=2 train.py (nccl on CUDA) where 2 ranks can run; else a SKIP row."""
    n = ddp_ranks(device)
    row = dict(section="ddp", name=f"torchrun --nproc_per_node=2 train.py --model {name}")
    if not n:
        return [dict(row, status="SKIP", error=f"not exercised ({torch.cuda.device_count()} GPU)")]
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "train.py",
               "--model", name, "--steps", "20", "--eval_every", "20", "--device", device.split(":")[0], "--out", out,
               *extra]
        rc, log = run(cmd)
        ok = rc == 0 and os.path.exists(os.path.join(out, "ckpt.pt"))
    return [dict(row, status="PASS" if ok else "FAIL", error=None if ok else f"exit {rc}: {log.strip()[-300:]}")]


def plan(device, names, args, run=_run):
    """The rows the check runs on `device`, in order, from the device's properties alone (nothing runs here): -> dict
    card (card()), backend ("triton" where kernels.TRITON_TARGETS has the card, or on CPU under TRITON_INTERPRET=1;
    else "torch"), precision, steps: a list of (section, name, fn), fn() -> a row or a list of rows. A card on the
    torch paths (T4, V100) checks the torch path on the GPU against the CPU, times the torch paths against its own
    figures, and trains in fp16; its Triton rows say NOT_RUN."""
    c, cuda = card(device), device.startswith("cuda")
    backend = "triton" if c["triton"] or (not cuda and kernels.HAS_TRITON and kernels._INTERPRET) else "torch"
    scale, steps, covered, cache = ("gpu" if cuda else "cpu"), [], set(), {}
    add = lambda section, name, fn: steps.append((section, name, fn))
    flags = precision_flags(c)
    not_run = lambda section, name: add(section, name, lambda: dict(section=section, name=name, status="SKIP",
                                                                     error=NOT_RUN))
    if cuda and backend == "torch":
        not_run("kernels", "Triton kernels vs the torch path")
    ref = "cpu" if cuda and backend == "torch" else device      # the torch path on this GPU vs on the CPU
    for i, case in enumerate(kernel_cases(scale, bf16=c["precision"] != "fp16")):
        add("kernels", case[0], lambda i=i, case=case: kernel_row(case, backend, device, ref, i, covered))
    if cuda and backend == "triton":
        add("kernels", "every compiled configuration launched", lambda: coverage_rows(device, covered))
    add("determinism", "selective_scan backward twice", lambda: check_determinism(device, backend, scale))
    if cuda and backend == "torch":
        not_run("timings", "Triton kernels at the bench sizes")
    add("timings", "kernel timings", lambda: check_timings(device, backend, c))

    def peak():   # the MFU denominator, measured once: a large 16-bit matmul on CUDA
        if "peak" not in cache:
            cache["peak"] = ceilings(_dtype(c))[f"mm_{_TAG[_dtype(c)]}_TFLOPs"] * 1e12 if cuda else matmul_peak(device)
        return cache["peak"]
    for n in names:
        add("models", n, lambda n=n: check_model(n, device, peak, reps=10 if cuda else 2, c=c))
    comp = args.models or [n for n in COMPILE_MODELS if n in names]   # one per family unless --models names them
    add("compile", "torch.compile per family",
        lambda: check_compile(device, comp, args.jobs, run=run, cpu=args.cpu_compile))
    if c["precision"] == "fp16":
        add("train", "train.py --precision fp16", lambda: check_precision(c))
    add("train", "train.py per model", lambda: check_train(device, names, args.jobs, run=run, compile=comp, extra=flags,
                                                           steps=50 if cuda else args.train_steps))
    for n in [m for m in ("mot", "mamba") if m in names] or names[:1]:
        add("resume", n, lambda n=n: check_resume(n, device, run, 10 if cuda else max(2, args.train_steps // 2), flags))
    add("ddp", "torchrun", lambda: check_ddp(device, "mot" if "mot" in names else names[0], run=run, extra=flags))
    return dict(card=c, backend=backend, precision=c["precision"], steps=steps)


def print_row(r):
    """One line of the PASS/FAIL table."""
    detail = []
    for k in ("err", "loss_diff", "grad_err", "frac_of_floor", "ms_step", "mfu", "compile_s", "graph_breaks",
              "ms_eager", "ms_compiled", "launches_eager", "launches_compiled"):
        if r.get(k) is not None:
            detail.append(f"{k} {r[k]:.3g}")
    if r.get("tol") is not None and r.get("err", r.get("loss_diff")) is not None:
        detail.append(f"tol {r['tol']:g}")
    for k in ("note", "error"):
        if r.get(k):
            detail.append(str(r[k]).splitlines()[0][:160])
    print(f"  {r['status']:4s}  {r['section']:11s} {r['name'][:70]:70s} {'  '.join(detail)}", flush=True)


def run_plan(p, info, out):
    """Run every step of plan() in order, each guarded (a step that raises is one FAIL row with its one-line reason,
    and the run goes on), printing each row as it comes and rewriting `out` after every step (and on an interrupt).
    -> the result dict written last."""
    rows, t0 = [], time.time()

    def write(done):
        summary = {s: sum(r["status"] == s for r in rows) for s in ("PASS", "FAIL", "SKIP")}
        result = dict(info, seconds=round(time.time() - t0, 1), complete=done, summary=summary,
                      ok=done and not summary["FAIL"], rows=rows)
        with open(out, "w") as f:
            json.dump(result, f, indent=1, default=str)
        return result
    done = False
    try:
        for section, name, fn in p["steps"]:
            try:
                got = fn()
            except Exception as e:   # noqa: BLE001 -- one FAIL row; the check goes on
                got = dict(section=section, name=name, status="FAIL", error=_one_line(e))
            for r in got if isinstance(got, list) else [got]:
                rows.append(r)
                print_row(r)
            write(False)
        done = True
    finally:
        result = write(done)
    s = result["summary"]
    print(f"gpu-check: {s['PASS']} passed, {s['FAIL']} failed, {s['SKIP']} skipped"
          + (" -- ALL PASS" if result["ok"] else " -- FAILURES above"))
    print(f"wrote {out} ({time.time() - t0:.0f} s)")
    return result


def gpu_check(args, run=_run):
    """python gpu_check.py [--device cpu] [--models ...] [--jobs N] [--out gpu_check.json]. -> exit status."""
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "none")
    if device == "none" or (device.startswith("cuda") and not torch.cuda.is_available()):
        print(f"gpu-check: no CUDA GPU here (torch {torch.__version__}); nothing to check "
              "(python gpu_check.py --device cpu rehearses the harness)")
        return 0
    if device.startswith("cuda") and kernels._INTERPRET:
        raise SystemExit("gpu-check: unset TRITON_INTERPRET: the check runs the compiled kernels")
    names = args.models or list(train.registry())
    p = plan(device, names, args, run)
    c = p["card"]
    info = dict(machine(), device=device, card=c, candidate_backend=p["backend"], precision=p["precision"],
                triton=kernels.triton.__version__ if kernels.HAS_TRITON else None)
    where = f"{c['name']} (sm_{c['cap'][0]}{c['cap'][1]}, figures of {c['key']})" if c["cap"] else device
    print(f"gpu-check on {where}: torch {info['torch']}, triton {info['triton']}, kernels {p['backend']} vs torch path, "
          f"{p['precision']} training, {len(names)} models, {len(p['steps'])} steps")
    return 0 if run_plan(p, info, args.out)["ok"] else 1


# ------------------------------------------------------------------------------------------------ main

def main(argv=None):
    ap = argparse.ArgumentParser(description="run every kernel and model on CUDA for real; PASS/FAIL table, --out json")
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu (cpu rehearses the harness at small sizes)")
    ap.add_argument("--models", nargs="*", default=None, help="model names (default: every registered model)")
    ap.add_argument("--out", default="gpu_check.json", help="the JSON file written")
    ap.add_argument("--jobs", type=int, default=4, help="train.py runs (and compile checks) at a time")
    ap.add_argument("--train_steps", type=int, default=50, help="--device cpu: train.py steps (50 on CUDA)")
    ap.add_argument("--cpu_compile", action="store_true",
                    help="--device cpu: also torch.compile every model on CPU (inductor, ~1-2 min each)")
    ap.add_argument("--static", action="store_true", help="only the static report (no GPU needed; = bench.py --static)")
    ap.add_argument("--_compile", default=None, help=argparse.SUPPRESS)  # internal: compile_one in a child process
    args = ap.parse_args(argv)
    if args.static:
        with open(args.out, "w") as f:
            json.dump(static_summary(), f, indent=1, default=str)
        return 0
    if args._compile:
        with open(args.out, "w") as f:
            json.dump(compile_one(args._compile, args.device), f, default=str)
        return 0
    return gpu_check(args)


if __name__ == "__main__":
    sys.exit(main())
