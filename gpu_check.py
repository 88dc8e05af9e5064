"""gpu_check.py — does nanomix run on a GPU as it does on the CPU? Two tools, one module:

    python gpu_check.py                  # (= python bench.py --gpu-check) on a CUDA machine: every kernel config,
                                         # model, torch.compile per model family, train.py run (eager and
                                         # --compile=True) and torchrun for real; PASS/FAIL table, gpu_check.json;
                                         # without CUDA one line, exit 0; --device cpu rehearses the harness
    python bench.py --static             # the static report: every Triton kernel compiled ahead of time for sm_80 /
                                         # sm_90 (registers, shared memory, spills, tensor-core instructions) and the
                                         # roofline floor at the bench sizes; no GPU needed

The GPU check, on CUDA with compiled Triton kernels:
  kernels  every launch configuration kernels.launch_config picks on this GPU (each config of compile_specs), Triton vs
           the torch path on the same CUDA tensors, forward and every gradient, fp32 / bf16 / fp64 / complex, odd
           sizes, the sizes of tests/test_kernels.py and the bench sizes;
  timings  each kernel at the bench sizes as a fraction of its roofline floor (floors() with the ceilings measured now),
           and the selective scan beside the pure-torch path on CUDA;
  models   every registered model: one training step in bf16 autocast on CUDA vs fp32 on CPU from the same weights and
           batch (loss within LOSS_TOL), then ms/step, tokens/s and MFU against the measured bf16 matmul peak;
  train    `train.py --steps 50` per model on CUDA (loss falls, checkpoint written, eval + generation ran), then
           --resume to step 55;
  compile  per model family (COMPILE_MODELS, or --models), each in its own process: torch.compile(model) forward +
           backward vs eager in fp32 on one batch (loss within COMPILE_TOL, every gradient within COMPILE_GRAD_TOL),
           compile seconds, ms and kernels launched per forward + backward each way; and `train.py --compile=True
           --steps 50` beside the eager run of `train`: its logged losses within COMPILE_TRAIN_TOL of the eager run's at
           every logged step. On CPU (--device cpu) train.py refuses --compile (SKIP rows); --cpu_compile runs the
           forward + backward check there with inductor;
  ddp      torchrun --nproc_per_node=1 with nccl for one model (and 2 ranks when 2 GPUs are visible).
It writes gpu_check.json and prints a PASS/FAIL table; exit status 1 if anything failed. `--device cpu` rehearses the
harness on CPU at small sizes (the torch path against itself, or Triton under TRITON_INTERPRET=1);
tests/test_gpu_check.py runs it so that the first GPU run fails only for GPU reasons.
"""
import argparse
import concurrent.futures
import contextlib
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
                   measure_ceilings, scan_inputs, selective_inputs, sizes, timeit)

HERE = os.path.dirname(os.path.abspath(__file__))
KERNEL_TOL = {torch.float64: 1e-9, torch.complex128: 1e-9, torch.float32: 1e-4, torch.complex64: 1e-4,
              torch.bfloat16: 3e-2, "tf32": 1e-2}   # max |x - torch path| / max(|torch path|, 1), as tests/test_kernels
LOSS_TOL = 0.05     # |loss (CUDA, bf16 autocast) - loss (CPU, fp32)| <= LOSS_TOL * max(1, loss CPU): bf16 keeps 8 bits
COMPILE_TOL = 1e-4        # torch.compile vs eager, fp32, one batch: |loss diff| <= COMPILE_TOL * max(1, |loss|) and
COMPILE_GRAD_TOL = 1e-3   # every gradient's max |diff| <= COMPILE_GRAD_TOL * max |eager gradient| (fused kernels
                          # reorder sums)
COMPILE_TRAIN_TOL = 0.02  # train.py --compile=True vs eager, bf16 autocast, 50 steps: |loss diff| at every logged step
                          # <= COMPILE_TRAIN_TOL * max(1, eager loss) (bf16 rounding of fused kernels grows by steps)
_TAG = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float64: "fp64", torch.complex64: "cfp32",
        torch.complex128: "cfp64"}
# Roofline figures: HBM bandwidth (B/s) and dense bf16 matrix throughput (FLOP/s, achievable), from the data sheets
GPUS = {"H100 SXM": dict(target="sm_90", bw=3.35e12, flops=790e12), "A100": dict(target="sm_80", bw=2.0e12, flops=312e12)}


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


SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}   # max shared memory per block (opt-in), bytes


def static_report(targets=((8, 0), (9, 0))):
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


def static_summary():
    """python bench.py --static: print the resource report of every compiled kernel configuration for sm_80 and
    sm_90 and the roofline floors; -> the dict bench.py stores under "static"."""
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


# ------------------------------------------------------------------------------------------------ gpu check: kernels

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
    scale 'gpu') bench sizes. configs name compile_specs entries, so coverage can be checked."""
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
    configuration (compile_specs) that no case launched."""
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


# ------------------------------------------------------------------------------------------------ gpu check: timings

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
        a, b = [x.to(device).requires_grad_() for x in scan_inputs(shape, dt)]
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


# ------------------------------------------------------------------------------------------------ gpu check: models

def check_models(device, names, peak, reps=10, batch_size=None, overrides=None):
    """Every model: one step on CPU fp32 and on `device` (bf16 autocast on CUDA) from the same weights and batch,
    the losses compared; then ms/step, tokens/s, MFU (count_flops x tokens/s over the measured matmul peak)."""
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
            s = timeit(bench_step(dev_model, big, amp), reps, 2, device, statistics.median)
            tokens = big["tokens"].numel()
            row.update(ms_step=round(1e3 * s, 2), tokens_s=round(tokens / s), flops_per_token=fpt,
                       mfu=round(fpt * tokens / s / peak, 4), status="PASS" if ok else "FAIL")
            if not ok:
                row["error"] = f"loss {losses[1]:.5g} on {device} vs {losses[0]:.5g} on CPU fp32 (tol {LOSS_TOL})"
        except Exception as e:
            row.update(status="FAIL", error=f"{type(e).__name__}: {str(e)[:300]}")
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ gpu check: train.py runs

def _run(cmd, timeout=600):
    """Run a command; -> (return code, last lines of its output)."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE)
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
    """python gpu_check.py [--device cpu] [--models ...] [--jobs N] [--out gpu_check.json]. -> exit status."""
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "none")
    if device == "none" or (device.startswith("cuda") and not torch.cuda.is_available()):
        print(f"gpu-check: no CUDA GPU here (torch {torch.__version__}); nothing to check "
              "(python gpu_check.py --device cpu rehearses the harness)")
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
    ap = argparse.ArgumentParser(description="run every kernel and model on CUDA for real; PASS/FAIL table, --out json")
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu (cpu rehearses the harness at small sizes)")
    ap.add_argument("--models", nargs="*", default=None, help="model names (default: every registered model)")
    ap.add_argument("--out", default="gpu_check.json", help="the JSON file written")
    ap.add_argument("--jobs", type=int, default=4, help="train.py runs (and compile checks) at a time")
    ap.add_argument("--train_steps", type=int, default=50, help="--device cpu: train.py steps (50 on CUDA)")
    ap.add_argument("--cpu_compile", action="store_true",
                    help="--device cpu: also torch.compile every model on CPU (inductor, ~1-2 min each)")
    ap.add_argument("--_compile", default=None, help=argparse.SUPPRESS)  # internal: compile_one in a child process
    args = ap.parse_args(argv)
    if args._compile:
        with open(args.out, "w") as f:
            json.dump(compile_one(args._compile, args.device), f, default=str)
        return 0
    return gpu_check(args)


if __name__ == "__main__":
    sys.exit(main())
