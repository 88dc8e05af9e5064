"""kernels.py — the scan and grouped-matmul kernels every nanomix model shares.

Three operations, each with a plain sequential reference (`*_ref`, the test oracle), a fast torch path (what CPU
training runs) and Triton kernels (what a GPU runs; testable on a CPU under TRITON_INTERPRET=1):

  linear_scan(a, b, h0)          h_t = a_t * h_{t-1} + b_t along the last dim; real or complex (Megalodon's CEMA)
  selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
                                 Mamba's S6 scan with mamba_ssm's selective_scan_ref semantics:
                                   delta' = softplus(delta + delta_bias)          (each optional)
                                   h_t    = exp(delta'_t A) h_{t-1} + delta'_t B_t u_t     state (batch, dim, N)
                                   y_t    = (C_t . h_t + D u_t) * silu(z_t)
  grouped_matmul(x, w, sizes)    rows of x sorted by group, y[rows of g] = x[rows of g] @ w[g]   (MoT, MoMa, MoM)
  sort_by_group / unsort         the permutation that sorts tokens by group id, and its inverse

backend="auto" runs Triton on CUDA tensors of a GPU in TRITON_TARGETS and the torch path otherwise; "triton" forces
the kernels (on CPU tensors they need TRITON_INTERPRET=1); "torch" forces the torch path. Every backend is differentiable in every
input.  Layout: scans run along the LAST dimension (mamba_ssm's (batch, dim, L)); grouped matmul is (T, K) x (G, K, M).

Backward of a linear recurrence (used by all paths): with g_t = dL/dh_t (total),
    g_t = dh_t + a_{t+1} g_{t+1}        (a reverse scan with the gates shifted by one)
    db_t = g_t,   da_t = g_t h_{t-1},   dh0 = a_0 g_0        (complex: conjugate a and h, PyTorch's convention)

Torch paths (CPU): time-major loops, ONE fused addcmul per step on contiguous rows, hand-written backwards; the
selective scan runs chunks of CPU_CHUNK steps, never materialising (batch, dim, N, L). Triton paths: chunks along
L, tl.associative_scan inside a chunk, the state carried in registers; the selective scan's backward recomputes
each chunk from the forward's checkpoints; grouped-matmul tiles never straddle groups (tile table built on the
device: no host sync). launch_config() picks every launch parameter from the target (gpu_check.py compiles every
choice for every target of TRITON_TARGETS with no GPU). flop_tally(): the scans' analytic FLOPs (section 0).
Tests: tests/test_kernels.py (interpreter), tests/test_gpu_compile.py (AOT). Bench: python bench.py --kernels --static
"""
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # the torch paths work without triton
    triton, tl, HAS_TRITON = None, None, False


# The GPUs the Triton kernels are compiled and tested for, as compute capability (major, minor): A100, A10/RTX 30xx,
# L4/RTX 40xx, H100. tests/test_gpu_compile.py compiles every launch configuration for each with no spills or stack.
# Older cards (T4 = 7.5, V100 = 7.0) have no bf16 and no tf32 or cp.async: the kernels' tiles are built on those, and
# no sm_75 / sm_70 configuration has been measured on hardware, so there backend="auto" runs the torch paths
# (cuBLAS matmuls per group; the scans' time loop) and backend="triton" is refused.
TRITON_TARGETS = ((8, 0), (8, 6), (8, 9), (9, 0))


def _capability(device):
    return tuple(torch.cuda.get_device_capability(device))


class torch_paths:
    """with kernels.torch_paths(): every op takes its torch path, whatever backend it is given. For FLOP counting:
    torch's FlopCounterMode sees the torch path's matmuls, not what runs inside a Triton kernel."""
    depth = 0

    def __enter__(self):
        torch_paths.depth += 1

    def __exit__(self, *exc):
        torch_paths.depth -= 1


def _use_triton(backend, *tensors):
    """Which path runs: the Triton kernels (True) or the torch path (False)."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend={backend!r} is unknown; use 'auto', 'triton' or 'torch'")
    tensors = [t for t in tensors if t is not None]
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "torch" or torch_paths.depth:
        return False
    if backend == "auto":                        # Triton on a CUDA GPU it is tested for, when triton is installed
        return HAS_TRITON and on_cuda and _capability(tensors[0].device) in TRITON_TARGETS
    if not HAS_TRITON:
        raise ValueError("backend='triton' needs the triton package; pip install triton or use backend='torch'")
    if on_cuda and _capability(tensors[0].device) not in TRITON_TARGETS:
        cap = _capability(tensors[0].device)
        raise ValueError(f"backend='triton': the kernels are built and tested for compute capability "
                         f"{', '.join(f'{a}.{b}' for a, b in TRITON_TARGETS)}; this GPU "
                         f"({torch.cuda.get_device_name(tensors[0].device)}) is {cap[0]}.{cap[1]}; use backend='auto' "
                         f"(the torch path here)")
    if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before importing kernels")
    return True


# ==== 0. FLOP tally: the scans' FLOPs, which FlopCounterMode (matmuls only) does not see =============================
# Analytic counts per element, as Mamba's authors count the selective scan (9 B L D N, state-spaces/mamba#110): a
# scan costs what a work-efficient parallel scan does, 2 combine steps per element, each a multiply-add of the state
# (2 FLOPs real, 8 complex). linear_scan: 4 per element real, 16 complex. selective_scan: 9 per (batch, dim, state,
# step) = 1 delta A + 2 delta B u + 4 scan + 2 C . h; + 1 per (batch, dim, step) each for D u and silu(z) if given
# (exp, softplus, casts not counted). A backward counts 2x its forward (as for a matmul). megalodon.py adds its FFTs.

class flop_tally:
    """with kernels.flop_tally() as t: ... -> t.flops counts every scan (forward, and backward when autograd runs
    it inside the block) and every kernels.add_flops(n) made inside the block. Tallies nest."""
    active = []

    def __enter__(self):
        self.flops = 0
        flop_tally.active.append(self)
        return self

    def __exit__(self, *exc):
        flop_tally.active.remove(self)


def add_flops(n):
    """Add n FLOPs to every active tally (no-op when none is active)."""
    for t in flop_tally.active:
        t.flops += int(n)


class _TallyBackward(torch.autograd.Function):
    """Identity (a copy: callers may change it in place); its backward adds 2x the forward's FLOPs."""
    @staticmethod
    def forward(ctx, n, *xs):
        ctx.n = n
        return tuple(x.clone() for x in xs)

    @staticmethod
    def backward(ctx, *grads):
        add_flops(2 * ctx.n)
        return (None, *grads)


def _tally(n, *outs):
    """Count a scan's n forward FLOPs now and 2n when its backward runs; returns outs (tuple if several)."""
    if flop_tally.active:
        add_flops(n)
        if torch.is_grad_enabled() and any(o.requires_grad for o in outs):
            outs = _TallyBackward.apply(n, *outs)
    return outs if len(outs) > 1 else outs[0]


# ==== 1. Linear scan  h_t = a_t * h_{t-1} + b_t ======================================================================

def linear_scan_ref(a, b, h0=None):
    """Sequential oracle: a, b (..., L) real or complex; h0 (...) -> h (..., L). Autograd through the loop."""
    h = torch.zeros_like(b[..., 0]) if h0 is None else h0
    out = []
    for t in range(a.shape[-1]):
        h = a[..., t] * h + b[..., t]
        out.append(h)
    return torch.stack(out, -1)


def _scan_loop(a, b, h0):
    """Scan without autograd, time-major: a, b (L, R) -> hs (L + 1, R), hs[0] = h0 (or 0), hs[t+1] = a[t] hs[t] + b[t].
    One fused addcmul per step on contiguous rows: faster on CPU than chunked (cumprod) or log-depth scans, which
    read strided columns and build bigger temporaries (RESULTS.md has the measurements)."""
    L = a.shape[0]
    hs = b.new_empty(L + 1, *b.shape[1:])
    hs[0] = 0 if h0 is None else h0
    for t in range(L):
        torch.addcmul(b[t], a[t], hs[t], out=hs[t + 1])
    return hs


class _LinearScanTorch(torch.autograd.Function):
    """a, b (R, L), h0 (R,) or None -> h (R, L); runs time-major inside, hand-written backward."""

    @staticmethod
    def forward(ctx, a, b, h0):
        at = a.t().contiguous()
        hs = _scan_loop(at, b.t().contiguous(), h0)                        # (L + 1, R)
        ctx.save_for_backward(at, hs)
        ctx.has_h0 = h0 is not None
        return hs[1:].t()

    @staticmethod
    def backward(ctx, dh):
        at, hs = ctx.saved_tensors
        cplx = at.is_complex()
        ac = at.conj().resolve_conj() if cplx else at                      # PyTorch's complex convention
        g = dh.t().contiguous()                                            # (L, R), becomes dL/dh_t in place:
        for t in range(g.shape[0] - 2, -1, -1):                            # g_t = dh_t + a_{t+1} g_{t+1}
            g[t].addcmul_(ac[t + 1], g[t + 1])
        da = g * (hs[:-1].conj() if cplx else hs[:-1])                     # g_t h_{t-1}
        dh0 = ac[0] * g[0] if ctx.has_h0 else None
        return da.t(), g.t(), dh0


def _check_scan_args(a, b, h0):
    if a.shape != b.shape:
        raise ValueError(f"linear_scan: a {tuple(a.shape)} and b {tuple(b.shape)} must have the same shape (..., L)")
    if a.dtype != b.dtype:
        raise ValueError(f"linear_scan: a is {a.dtype} but b is {b.dtype}; cast both to one dtype")
    if a.dtype not in (torch.float32, torch.bfloat16, torch.float64, torch.complex64, torch.complex128):
        raise ValueError(f"linear_scan: dtype {a.dtype} unsupported; use float32/bfloat16/float64/complex64")
    if a.dim() < 1 or a.shape[-1] == 0:
        raise ValueError("linear_scan: inputs need a non-empty last (time) dimension")
    if h0 is not None and h0.shape != a.shape[:-1]:
        raise ValueError(f"linear_scan: h0 {tuple(h0.shape)} must have shape a.shape[:-1] = {tuple(a.shape[:-1])}")


@torch.compiler.disable  # under torch.compile the scan is one opaque call (dynamo would unroll its time loop)
def linear_scan(a, b, h0=None, *, backend="auto"):
    """h_t = a_t * h_{t-1} + b_t along the last dim. a, b (..., L); h0 (...) or None (zeros) -> h (..., L).
    Real (fp32, bf16, fp64; 16-bit inputs are scanned in fp32) or complex (complex64/128). Differentiable in a, b, h0."""
    _check_scan_args(a, b, h0)
    shape, dtype = a.shape, a.dtype
    R, L = a.numel() // shape[-1], shape[-1]
    flops = (16 if dtype.is_complex else 4) * a.numel()                    # see "FLOP tally" above
    use_triton = _use_triton(backend, a, b, h0)   # the kernels load 16-bit inputs and compute in fp32 themselves
    cdtype = dtype if use_triton or dtype != torch.bfloat16 else torch.float32
    a2, b2 = (t.reshape(R, L).to(cdtype).contiguous() for t in (a, b))
    h02 = None if h0 is None else h0.reshape(R).to(cdtype).contiguous()
    h = (_LinearScanTriton if use_triton else _LinearScanTorch).apply(a2, b2, h02)
    return _tally(flops, h.reshape(shape).to(dtype))


# ==== 2. Selective scan (Mamba S6) ===================================================================================

def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False):
    """Sequential oracle with mamba_ssm's selective_scan_ref semantics (materialises (batch, dim, N, L)).
    u, delta, z (b, d, L); A (d, n); B, C (b, n, L); D, delta_bias (d,). Computes in fp32 (fp64 stays fp64)."""
    dtype_in = u.dtype
    cd = torch.float64 if u.dtype == torch.float64 else torch.float32
    u, delta, A, B, C = (t.to(cd) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(cd)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    dA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    dBu = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    x = A.new_zeros(u.shape[0], A.shape[0], A.shape[1])
    ys = []
    for i in range(u.shape[2]):
        x = dA[:, :, i] * x + dBu[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, i]))
    y = torch.stack(ys, 2)
    out = y if D is None else y + u * D.to(cd)[:, None]
    if z is not None:
        out = out * F.silu(z.to(cd))
    out = out.to(dtype_in)
    return (out, x) if return_last_state else out


_LOG2E = 1.4426950408889634
CPU_CHUNK = 16   # time steps per chunk of the CPU selective scan: its (chunk, b, d, n) temporaries stay in cache


class _SelectiveScanTorch(torch.autograd.Function):
    """The recurrence core y_t = C_t . h_t with h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t, time-major.
    Inputs (L, b, d) / (L, b, n) contiguous, A (d, n). Time runs in chunks of CPU_CHUNK steps: one fused addcmul
    per step, bulk ops per chunk. Only the state entering each chunk is saved; the backward recomputes a chunk's
    states from it (the official CUDA kernel's memory choice), runs g_t = a_{t+1} g_{t+1} + C_t dy_t in the step
    loop, and takes every gradient in bulk per chunk. exp2 with A log2(e): much faster than exp on CPU."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        (L, b, d), n = u.shape, A.shape[1]
        T = min(CPU_CHUNK, L)
        nc = -(-L // T)
        A2 = A * _LOG2E
        du = delta * u
        y = u.new_empty(L, b, d)
        ck = u.new_empty(nc + 1, b, d, n)                                  # state entering chunk c; ck[nc] = last
        ck[0].zero_()
        bA, bB, bh = (u.new_empty(T, b, d, n) for _ in range(3))
        for c in range(nc):
            s, e = c * T, min(L, (c + 1) * T)
            m = e - s
            dA = torch.mul(delta[s:e, :, :, None], A2, out=bA[:m]).exp2_()        # exp(delta_t A)
            dBu = torch.mul(du[s:e, :, :, None], B[s:e, :, None, :], out=bB[:m])  # delta_t B_t u_t
            hs = bh[:m]
            h = ck[c]
            for a_t, b_t, h_t in zip(dA.unbind(0), dBu.unbind(0), hs.unbind(0)):
                h = torch.addcmul(b_t, a_t, h, out=h_t)
            # y_t = C_t . h_t as (1, n) @ (n, d) per (t, batch row)
            torch.bmm(C[s:e].reshape(m * b, 1, n), hs.view(m * b, d, n).transpose(1, 2), out=y[s:e].view(m * b, 1, d))
            ck[c + 1].copy_(h)
        ctx.save_for_backward(u, delta, A, B, C, ck)
        return y, ck[nc].clone()

    @staticmethod
    def backward(ctx, dy, dlast):
        u, delta, A, B, C, ck = ctx.saved_tensors
        (L, b, d), n = u.shape, A.shape[1]
        T = min(CPU_CHUNK, L)
        nc = ck.shape[0] - 1
        A2 = A * _LOG2E
        dy = dy.contiguous()
        du_ = delta * u
        ddelta, du = u.new_empty(L, b, d), u.new_empty(L, b, d)
        dB, dC = u.new_empty(L, b, n), u.new_empty(L, b, n)
        dAm = A.new_zeros(d, n)
        carry = dlast.clone() if dlast is not None else u.new_zeros(b, d, n)   # dL/dh at the chunk's end from later
        bA, bg = (u.new_empty(T, b, d, n) for _ in range(2))
        bh = u.new_empty(T + 1, b, d, n)
        for c in range(nc - 1, -1, -1):
            s, e = c * T, min(L, (c + 1) * T)
            m, mb = e - s, (e - s) * b
            dA = torch.mul(delta[s:e, :, :, None], A2, out=bA[:m]).exp2_()
            hs = bh[:m + 1]                                                # hs[i] = h_{s+i-1}, recomputed
            hs[0].copy_(ck[c])
            gs = torch.mul(du_[s:e, :, :, None], B[s:e, :, None, :], out=bg[:m])  # dBu (then reused for g)
            h = hs[0]
            for a_t, b_t, h_t in zip(dA.unbind(0), gs.unbind(0), hs[1:].unbind(0)):
                h = torch.addcmul(b_t, a_t, h, out=h_t)
            torch.mul(dy[s:e, :, :, None], C[s:e, :, None, :], out=gs)    # g_t = C_t dy_t ...
            gs[m - 1] += carry
            g_list, a_list = gs.unbind(0), dA.unbind(0)
            for t in range(m - 2, -1, -1):                                 # ... + a_{t+1} g_{t+1}
                g_list[t].addcmul_(a_list[t + 1], g_list[t + 1])
            carry = dA[0] * gs[0]
            torch.bmm(dy[s:e].view(mb, 1, d), hs[1:].view(mb, d, n), out=dC[s:e].view(mb, 1, n))
            gB = torch.bmm(B[s:e].reshape(mb, 1, n), gs.view(mb, d, n).transpose(1, 2)).view(m, b, d)
            torch.bmm(du_[s:e].view(mb, 1, d), gs.view(mb, d, n), out=dB[s:e].view(mb, 1, n))
            q = gs.mul_(hs[:-1]).mul_(dA)                                  # dL/d(delta_t A)
            torch.add((q * A).sum(-1), gB * u[s:e], out=ddelta[s:e])
            torch.mul(gB, delta[s:e], out=du[s:e])
            dAm += q.mul_(delta[s:e, :, :, None]).sum((0, 1))
        return du, ddelta, dAm, dB, dC


def _check_selective_args(u, delta, A, B, C, D, z, delta_bias):
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"selective_scan: u {tuple(u.shape)} and delta {tuple(delta.shape)} must both be (batch, dim, L)")
    b, d, L = u.shape
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"selective_scan: A {tuple(A.shape)} must be (dim={d}, N)")
    if A.is_complex():
        raise ValueError("selective_scan: complex A is not supported; pass a real A (Mamba's S4D-real init)")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.shape != (b, n, L):
            raise ValueError(f"selective_scan: {name} {tuple(t.shape)} must be (batch={b}, N={n}, L={L})")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan: z {tuple(z.shape)} must match u {tuple(u.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (d,):
            raise ValueError(f"selective_scan: {name} {tuple(t.shape)} must be (dim={d},)")


@torch.compiler.disable  # under torch.compile the scan is one opaque call (dynamo would unroll its time loop)
def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, *, backend="auto"):
    """Mamba's selective scan (mamba_ssm selective_scan_fn semantics).
    u, delta, z (batch, dim, L); A (dim, N); B, C (batch, N, L); D, delta_bias (dim,).
    Returns out (batch, dim, L) in u's dtype, and the last state (batch, dim, N) fp32 if return_last_state."""
    _check_selective_args(u, delta, A, B, C, D, z, delta_bias)
    (b, d, L), n = u.shape, A.shape[1]
    flops = 9 * b * d * n * L + b * d * L * ((D is not None) + (z is not None))   # see "FLOP tally" above
    dtype_in = u.dtype
    cd = torch.float64 if u.dtype == torch.float64 else torch.float32
    gpu_ok = backend != "auto" or (cd == torch.float32 and n <= 64)   # the GPU kernels: fp32 compute, N <= 64
    if gpu_ok and _use_triton(backend, u, delta, A, B, C, D, z, delta_bias):   # one fused kernel per direction
        kd = u.dtype if u.dtype in (torch.float32, torch.bfloat16, torch.float64) else torch.float32
        act = lambda t: t.to(kd).contiguous()
        par = lambda t: (torch.zeros(u.shape[1], dtype=cd, device=u.device) if t is None else t.to(cd).contiguous())
        out, last = _SelectiveScanTriton.apply(act(u), act(delta), A.to(cd).contiguous(), act(B), act(C), par(D),
                                               None if z is None else act(z), par(delta_bias), bool(delta_softplus))
    else:
        uf, deltaf = u.to(cd), delta.to(cd)
        if delta_bias is not None:
            deltaf = deltaf + delta_bias.to(cd)[:, None]
        if delta_softplus:
            deltaf = F.softplus(deltaf)
        tm = lambda t: t.to(cd).permute(2, 0, 1).contiguous()              # (b, x, L) -> (L, b, x)
        y, last = _SelectiveScanTorch.apply(tm(uf), tm(deltaf), A.to(cd).contiguous(), tm(B), tm(C))
        out = y.permute(1, 2, 0)
        out = out if D is None else out + uf * D.to(cd)[:, None]
        if z is not None:
            out = out * F.silu(z.to(cd))
    out = out.to(dtype_in)
    return _tally(flops, out, last) if return_last_state else _tally(flops, out)


# ==== 3. Grouped matmul (+ sort helpers) =============================================================================

def sort_by_group(group_ids, n_groups):
    """group_ids (...) int in [0, n_groups) -> (order (numel,) Long, group_sizes (n_groups,) Long).
    x.reshape(-1, K)[order] is sorted by group (stable: original order inside a group)."""
    flat = group_ids.reshape(-1)
    if flat.dtype.is_floating_point or flat.is_complex():
        raise ValueError(f"sort_by_group: group_ids must be integer, got {flat.dtype}")
    order = torch.argsort(flat, stable=True)
    sizes = torch.zeros(n_groups, dtype=torch.long, device=flat.device)
    return order, sizes.index_add_(0, flat, torch.ones_like(flat, dtype=torch.long))   # no host sync (bincount has one)


def unsort(y_sorted, order):
    """Inverse of x[order]: y_sorted (T, ...) -> y (T, ...) with y[order] = y_sorted. Differentiable."""
    return torch.zeros_like(y_sorted).index_copy(0, order, y_sorted)


def grouped_matmul_ref(x, w, group_sizes):
    """Per-group loop oracle: x (T, K) sorted by group, w (G, K, M), group_sizes (G,) -> (T, M)."""
    return torch.cat([x_g @ w_g for x_g, w_g in zip(x.split(group_sizes.tolist()), w)], 0)


def _check_gmm_args(x, w, group_sizes):
    if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[1]:
        raise ValueError(f"grouped_matmul: need x (T, K) and w (G, K, M), got {tuple(x.shape)} and {tuple(w.shape)}")
    if group_sizes.shape != (w.shape[0],) or group_sizes.dtype.is_floating_point:
        raise ValueError(f"grouped_matmul: group_sizes must be an integer tensor of shape (G={w.shape[0]},)")
    if x.dtype != w.dtype:
        raise ValueError(f"grouped_matmul: x is {x.dtype} but w is {w.dtype}; cast both to one dtype")


@torch.compiler.disable  # one opaque call under torch.compile (dynamo would trace the Triton autograd Function)
def grouped_matmul(x, w, group_sizes, *, backend="auto"):
    """x (T, K) with rows sorted by group, w (G, K, M), group_sizes (G,) summing to T -> (T, M).
    Any group may be empty. Differentiable in x and w. The torch path is a per-group loop of matmuls (so
    FlopCounterMode counts exactly the FLOPs executed); the Triton path never syncs with the host."""
    _check_gmm_args(x, w, group_sizes)
    gpu_ok = backend != "auto" or x.dtype in (torch.bfloat16, torch.float32)   # the GPU kernels: bf16 / fp32 (tf32)
    if gpu_ok and _use_triton(backend, x, w):
        return _GroupedMatmulTriton.apply(x, w, group_sizes)
    if not group_sizes.is_cuda and int(group_sizes.sum()) != x.shape[0]:
        raise ValueError(f"grouped_matmul: group_sizes sum to {int(group_sizes.sum())} but x has {x.shape[0]} rows")
    return grouped_matmul_ref(x, w, group_sizes.cpu())


# ==== 4. Triton kernels (GPU; on CPU tensors under TRITON_INTERPRET=1) ===============================================
# Launch parameters come from one function, launch_config(kernel, target, ...); tests/test_gpu_compile.py compiles
# every choice it can make for each target of TRITON_TARGETS (gpu_check.compile_specs).

POISON = False          # tests set True: kernel outputs start as NaN, so an element a kernel forgets to write fails


def _empty(shape, like, dtype=None):
    kw = dict(dtype=dtype or like.dtype, device=like.device)
    return torch.full(shape, float("nan"), **kw) if POISON else torch.empty(shape, **kw)


def _target(t):
    """(major, minor) compute capability of a CUDA tensor's device, or 'interpreter'."""
    return tuple(torch.cuda.get_device_capability(t.device)) if t.is_cuda else "interpreter"


def _pow2(n, lo=1):
    return max(lo, 1 << (max(1, n) - 1).bit_length())


def launch_config(kernel, target, *, dtype=torch.float32, n_state=16):
    """The launch parameters of `kernel` on `target` ((major, minor) or 'interpreter'): a dict of constexprs plus
    num_warps / num_stages. Interpreter tiles are small (each program costs ~20 ms there, a scan element ~0.1 ms)
    and short in time so that tests at L = 64 or 100 cross several chunks."""
    interp = target == "interpreter"
    major = 0 if interp else target[0]
    if not interp and major < 8:
        raise ValueError(f"kernels need compute capability >= 8.0 (bf16, cp.async); got {target}")
    if kernel in ("scan_fwd", "scan_bwd"):
        if interp:
            return dict(BLOCK_R=4, BLOCK_T=16, num_warps=1, num_stages=1)
        return dict(BLOCK_R=4, BLOCK_T=256 if kernel == "scan_fwd" else 128, num_warps=4, num_stages=1)
    if kernel in ("selective_fwd", "selective_bwd"):
        if interp:
            return dict(BLOCK_D=4, BLOCK_N=_pow2(n_state, 2), BLOCK_T=16, num_warps=1, num_stages=1)
        if n_state > 64:
            raise ValueError(f"selective_scan: the Triton kernels support N <= 64 state dims, got {n_state}")
        if dtype == torch.float64:
            raise ValueError("selective_scan: the Triton kernels on GPU compute in fp32; use backend='torch' for fp64")
        # 3-D register tiles (BLOCK_D, BLOCK_N, BLOCK_T) of 1024 elements: no stack on any target under Triton 3.8
        # and 3.9 (tests/test_gpu_compile.py; 2048 left stack in the fused fwd). The bwd holds ~3x the fwd's live
        # tiles (h, h_{t-1}, g, exp(delta A), ...): 8 warps (with 4, Triton 3.8 left 8 bytes of stack at N = 32 on
        # sm_90). fwd and bwd share BLOCK_T: the bwd reuses the fwd's checkpoints.
        bn = _pow2(n_state, 16)
        bt = 32 if bn <= 32 else 16
        elems = 1024
        return dict(BLOCK_D=max(1, elems // (bn * bt)), BLOCK_N=bn, BLOCK_T=bt,
                    num_warps=8 if kernel == "selective_bwd" else 4, num_stages=1)
    if kernel in ("gmm", "gmm_dw"):
        if interp:
            cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16) if kernel == "gmm" else dict(BLOCK_K=16, BLOCK_N=16, BLOCK_R=16)
            return dict(cfg, DOT_DTYPE=tl.float32 if dtype != torch.float64 else tl.float64, num_warps=1, num_stages=1)
        if dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"grouped_matmul: Triton on GPU takes bf16/fp32, got {dtype}; use backend='torch'")
        half = dtype == torch.bfloat16
        dot = tl.bfloat16 if half else tl.float32
        if kernel == "gmm":   # 16-bit: 128x128 tiles, K step 64 (sm_90, wgmma) or 32 (sm_80, mma.sync); fp32: tf32
            bk = (64 if major >= 9 else 32) if half else 32
            return dict(BLOCK_M=128, BLOCK_N=128 if half else 64, BLOCK_K=bk, DOT_DTYPE=dot, num_warps=8 if half else 4,
                        num_stages=3)
        return dict(BLOCK_K=128 if half else 64, BLOCK_N=128 if half else 64, BLOCK_R=32, DOT_DTYPE=dot,
                    num_warps=8 if half else 4, num_stages=3)
    raise ValueError(f"unknown kernel {kernel!r}")


def _launch_args(cfg):
    meta = {k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}
    if not _INTERPRET:
        meta.update(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return meta


_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _cd(dtype):   # the compute dtype (a triton dtype) for an input dtype
    return tl.float64 if dtype == torch.float64 else tl.float32


if HAS_TRITON:

    @triton.jit
    def _combine(a1, b1, a2, b2):
        """Compose two steps of h -> a h + b: first (a1, b1), then (a2, b2). Associative, not commutative."""
        return a2 * a1, a2 * b1 + b2

    @triton.jit
    def _combine_complex(ar1, ai1, br1, bi1, ar2, ai2, br2, bi2):
        """_combine on complex numbers held as (real, imag) pairs."""
        return (ar2 * ar1 - ai2 * ai1, ar2 * ai1 + ai2 * ar1,
                ar2 * br1 - ai2 * bi1 + br2, ar2 * bi1 + ai2 * br1 + bi2)

    @triton.jit
    def _pick(x, cols, j, AXIS: tl.constexpr):
        """Column j along AXIS of a tile (the carry between chunks)."""
        if AXIS == 1:
            return tl.sum(tl.where(cols[None, :] == j, x, 0.0), axis=1)
        else:
            return tl.sum(tl.where(cols[None, None, :] == j, x, 0.0), axis=2)

    # --- linear scan ----------------------------------------------------------------------------------
    @triton.jit
    def scan_fwd_kernel(a_ptr, b_ptr, h0_ptr, h_ptr, R, L, COMPLEX: tl.constexpr,
                        CD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr):
        """h = scan(a, b) for BLOCK_R rows of (R, L); chunks of BLOCK_T along L, the state carried in registers.
        Complex inputs come as their real view (R, L, 2); h0 (R,) is always given (zeros when absent)."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_T)
        rmask = rows < R
        rows64 = rows.to(tl.int64)
        hi = tl.zeros([BLOCK_R], dtype=CD)
        if COMPLEX:
            hr = tl.load(h0_ptr + 2 * rows64, mask=rmask, other=0.0).to(CD)
            hi = tl.load(h0_ptr + 2 * rows64 + 1, mask=rmask, other=0.0).to(CD)
        else:
            hr = tl.load(h0_ptr + rows64, mask=rmask, other=0.0).to(CD)
        for start in range(0, L, BLOCK_T):
            t = start + cols
            m = rmask[:, None] & (t < L)[None, :]
            off = rows64[:, None] * L + t[None, :]
            if COMPLEX:   # padding: a = 1, b = 0 keeps the state, so the last column is the carry
                ar = tl.load(a_ptr + 2 * off, mask=m, other=1.0).to(CD)
                ai = tl.load(a_ptr + 2 * off + 1, mask=m, other=0.0).to(CD)
                br = tl.load(b_ptr + 2 * off, mask=m, other=0.0).to(CD)
                bi = tl.load(b_ptr + 2 * off + 1, mask=m, other=0.0).to(CD)
                Ar, Ai, Br, Bi = tl.associative_scan((ar, ai, br, bi), 1, _combine_complex)
                nr = Ar * hr[:, None] - Ai * hi[:, None] + Br
                ni = Ar * hi[:, None] + Ai * hr[:, None] + Bi
                tl.store(h_ptr + 2 * off, nr, mask=m)
                tl.store(h_ptr + 2 * off + 1, ni, mask=m)
                hr = _pick(nr, cols, BLOCK_T - 1, 1)
                hi = _pick(ni, cols, BLOCK_T - 1, 1)
            else:
                a = tl.load(a_ptr + off, mask=m, other=1.0).to(CD)
                b = tl.load(b_ptr + off, mask=m, other=0.0).to(CD)
                Ac, Bc = tl.associative_scan((a, b), 1, _combine)
                h = Ac * hr[:, None] + Bc
                tl.store(h_ptr + off, h, mask=m)
                hr = _pick(h, cols, BLOCK_T - 1, 1)

    @triton.jit
    def scan_bwd_kernel(a_ptr, h_ptr, h0_ptr, dh_ptr, da_ptr, db_ptr, R, L, COMPLEX: tl.constexpr,
                        CD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr):
        """Reverse scan g_t = dh_t + a_{t+1} g_{t+1} (conj(a) for complex), chunks from the end, then
        db = g, da = g * conj(h_{t-1}) with h_{t-1} read from the forward output (h0 at t = 0)."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_T)
        rmask = rows < R
        rows64 = rows.to(tl.int64)
        gr = tl.zeros([BLOCK_R], dtype=CD)       # g at the first position of the chunk after this one
        gi = tl.zeros([BLOCK_R], dtype=CD)
        n_chunks = tl.cdiv(L, BLOCK_T)
        for k in range(0, n_chunks):
            t = (n_chunks - 1 - k) * BLOCK_T + cols
            m = rmask[:, None] & (t < L)[None, :]
            mn = rmask[:, None] & (t + 1 < L)[None, :]               # a_{t+1} exists (0 past the end)
            mp = rmask[:, None] & (t >= 1)[None, :] & (t < L)[None, :]
            off = rows64[:, None] * L + t[None, :]
            first = (t == 0)[None, :]
            if COMPLEX:
                anr = tl.load(a_ptr + 2 * (off + 1), mask=mn, other=0.0).to(CD)
                ani = -tl.load(a_ptr + 2 * (off + 1) + 1, mask=mn, other=0.0).to(CD)
                dr = tl.load(dh_ptr + 2 * off, mask=m, other=0.0).to(CD)
                di = tl.load(dh_ptr + 2 * off + 1, mask=m, other=0.0).to(CD)
                Ar, Ai, Gr, Gi = tl.associative_scan((anr, ani, dr, di), 1, _combine_complex, reverse=True)
                g_r = Gr + Ar * gr[:, None] - Ai * gi[:, None]
                g_i = Gi + Ar * gi[:, None] + Ai * gr[:, None]
                pr = tl.load(h_ptr + 2 * (off - 1), mask=mp, other=0.0).to(CD)
                pi = tl.load(h_ptr + 2 * (off - 1) + 1, mask=mp, other=0.0).to(CD)
                h0r = tl.load(h0_ptr + 2 * rows64, mask=rmask, other=0.0).to(CD)
                h0i = tl.load(h0_ptr + 2 * rows64 + 1, mask=rmask, other=0.0).to(CD)
                pr = tl.where(first, h0r[:, None], pr)
                pi = tl.where(first, h0i[:, None], pi)
                tl.store(da_ptr + 2 * off, g_r * pr + g_i * pi, mask=m)         # g * conj(h_{t-1})
                tl.store(da_ptr + 2 * off + 1, g_i * pr - g_r * pi, mask=m)
                tl.store(db_ptr + 2 * off, g_r, mask=m)
                tl.store(db_ptr + 2 * off + 1, g_i, mask=m)
                gr = _pick(g_r, cols, 0, 1)
                gi = _pick(g_i, cols, 0, 1)
            else:
                an = tl.load(a_ptr + off + 1, mask=mn, other=0.0).to(CD)
                dh = tl.load(dh_ptr + off, mask=m, other=0.0).to(CD)
                Ac, Gc = tl.associative_scan((an, dh), 1, _combine, reverse=True)
                g = Gc + Ac * gr[:, None]
                hp = tl.load(h_ptr + off - 1, mask=mp, other=0.0).to(CD)
                h0 = tl.load(h0_ptr + rows64, mask=rmask, other=0.0).to(CD)
                hp = tl.where(first, h0[:, None], hp)
                tl.store(da_ptr + off, g * hp, mask=m)
                tl.store(db_ptr + off, g, mask=m)
                gr = _pick(g, cols, 0, 1)

    # --- selective scan -------------------------------------------------------------------------------
    @triton.jit
    def _delta(delta_ptr, bias_ptr, off, dd, D, mask, softplus, CD: tl.constexpr):
        """delta' = softplus(delta + delta_bias) (softplus if asked; torch's threshold 20) and d delta'/d delta."""
        bias = tl.load(bias_ptr + dd, mask=dd < D, other=0.0).to(CD)
        x = tl.load(delta_ptr + off, mask=mask, other=0.0).to(CD) + bias[:, None]
        e = tl.exp(tl.minimum(x, 20.0))
        sp = tl.where(x > 20.0, x, tl.log(1.0 + e))
        dl = tl.where(mask, tl.where(softplus != 0, sp, x), 0.0)       # padding: delta' = 0 -> a = 1, b = 0
        ddl = tl.where(softplus != 0, tl.where(x > 20.0, 1.0, e / (1.0 + e)), 1.0)
        return dl, ddl

    @triton.jit
    def selective_fwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, last_ptr,
                             ckpt_ptr, D, L, N, n_chunks, has_z, softplus, CD: tl.constexpr,
                             BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
        """One program = one batch row x BLOCK_D channels, the whole of mamba_ssm's selective_scan_fn: per chunk of
        BLOCK_T steps, delta' = softplus(delta + bias), the discretisation exp(delta' A), delta' B u as
        (BLOCK_D, BLOCK_N, BLOCK_T) register tiles, a scan along time from the carried state, the C contraction,
        + D u, * silu(z). Only out, the state entering each chunk (ckpt) and the last state are written."""
        pid_b = tl.program_id(0)
        dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        nn = tl.arange(0, BLOCK_N)
        tt = tl.arange(0, BLOCK_T)
        dm = dd < D
        dn_mask = dm[:, None] & (nn < N)[None, :]
        A = tl.load(A_ptr + dd[:, None] * N + nn[None, :], mask=dn_mask, other=0.0).to(CD)
        Dv = tl.load(D_ptr + dd, mask=dm, other=0.0).to(CD)
        h = tl.zeros([BLOCK_D, BLOCK_N], dtype=CD)
        ub = pid_b.to(tl.int64) * D * L
        bb = pid_b.to(tl.int64) * N * L
        for c in range(0, n_chunks):
            ck = ((pid_b.to(tl.int64) * n_chunks + c) * D + dd[:, None]) * N + nn[None, :]
            tl.store(ckpt_ptr + ck, h, mask=dn_mask)
            t = c * BLOCK_T + tt
            m_dt = dm[:, None] & (t < L)[None, :]
            m_nt = (nn < N)[:, None] & (t < L)[None, :]
            dt_off = ub + dd[:, None] * L + t[None, :]
            dl, _ = _delta(delta_ptr, bias_ptr, dt_off, dd, D, m_dt, softplus, CD)
            u = tl.load(u_ptr + dt_off, mask=m_dt, other=0.0).to(CD)
            Bt = tl.load(B_ptr + bb + nn[:, None] * L + t[None, :], mask=m_nt, other=0.0).to(CD)
            Ct = tl.load(C_ptr + bb + nn[:, None] * L + t[None, :], mask=m_nt, other=0.0).to(CD)
            dA = tl.exp(dl[:, None, :] * A[:, :, None])
            dBu = (dl * u)[:, None, :] * Bt[None, :, :]
            Ac, Bc = tl.associative_scan((dA, dBu), 2, _combine)
            hs = Ac * h[:, :, None] + Bc
            out = tl.sum(hs * Ct[None, :, :], axis=1) + Dv[:, None] * u
            if has_z != 0:
                z = tl.load(z_ptr + dt_off, mask=m_dt, other=0.0).to(CD)
                out = out * z / (1.0 + tl.exp(-z))
            tl.store(out_ptr + dt_off, out, mask=m_dt)
            h = _pick(hs, tt, BLOCK_T - 1, 2)
        tl.store(last_ptr + (pid_b.to(tl.int64) * D + dd[:, None]) * N + nn[None, :], h, mask=dn_mask)

    @triton.jit
    def selective_bwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, ckpt_ptr, dout_ptr,
                             dlast_ptr, du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr,
                             D, L, N, n_chunks, has_z, softplus, CD: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
        """Chunks from the end. In each: recompute h_{t-1} from the chunk's checkpoint (a scan of the inputs
        shifted by one), reverse-scan g_t = dy_t C_t + a_{t+1} g_{t+1}, then every gradient from (g, h) in
        registers. dA, dD and d(delta_bias) are written per batch row (summed by the caller); dB and dC, shared
        by all channels, are accumulated with atomic adds."""
        pid_b = tl.program_id(0)
        pid_d = tl.program_id(1)
        dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        nn = tl.arange(0, BLOCK_N)
        tt = tl.arange(0, BLOCK_T)
        dm = dd < D
        nm = nn < N
        dn_mask = dm[:, None] & nm[None, :]
        A = tl.load(A_ptr + dd[:, None] * N + nn[None, :], mask=dn_mask, other=0.0).to(CD)
        Dv = tl.load(D_ptr + dd, mask=dm, other=0.0).to(CD)
        st = (pid_b.to(tl.int64) * D + dd[:, None]) * N + nn[None, :]
        dlast = tl.load(dlast_ptr + st, mask=dn_mask, other=0.0).to(CD)      # zeros when not used
        g_next = tl.zeros([BLOCK_D, BLOCK_N], dtype=CD)   # g at the first step of the following chunk
        dA_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=CD)
        dD_acc = tl.zeros([BLOCK_D], dtype=CD)
        dbias_acc = tl.zeros([BLOCK_D], dtype=CD)
        ub = pid_b.to(tl.int64) * D * L
        bb = pid_b.to(tl.int64) * N * L
        for k in range(0, n_chunks):
            c = n_chunks - 1 - k
            t = c * BLOCK_T + tt
            tm = t < L
            tp = (tt >= 1) & tm                                          # t-1 inside this chunk
            tn = t + 1 < L
            dt_off = ub + dd[:, None] * L + t[None, :]
            nt_off = bb + nn[:, None] * L + t[None, :]
            m_dt = dm[:, None] & tm[None, :]
            m_nt = nm[:, None] & tm[None, :]
            dl, ddl = _delta(delta_ptr, bias_ptr, dt_off, dd, D, m_dt, softplus, CD)
            dlp, _ = _delta(delta_ptr, bias_ptr, dt_off - 1, dd, D, dm[:, None] & tp[None, :], softplus, CD)
            dln, _ = _delta(delta_ptr, bias_ptr, dt_off + 1, dd, D, dm[:, None] & tn[None, :], softplus, CD)
            u = tl.load(u_ptr + dt_off, mask=m_dt, other=0.0).to(CD)
            up = tl.load(u_ptr + dt_off - 1, mask=dm[:, None] & tp[None, :], other=0.0).to(CD)
            Bt = tl.load(B_ptr + nt_off, mask=m_nt, other=0.0).to(CD)
            Bp = tl.load(B_ptr + nt_off - 1, mask=nm[:, None] & tp[None, :], other=0.0).to(CD)
            Ct = tl.load(C_ptr + nt_off, mask=m_nt, other=0.0).to(CD)
            dout = tl.load(dout_ptr + dt_off, mask=m_dt, other=0.0).to(CD)
            h_ck = tl.load(ckpt_ptr + ((pid_b.to(tl.int64) * n_chunks + c) * D + dd[:, None]) * N + nn[None, :],
                           mask=dn_mask, other=0.0).to(CD)
            # h_{t-1}: the chunk's scan over the inputs shifted by one step, from the checkpoint
            Ap, Bcp = tl.associative_scan((tl.exp(dlp[:, None, :] * A[:, :, None]), (dlp * up)[:, None, :] * Bp[None, :, :]),
                                          2, _combine)
            hprev = Ap * h_ck[:, :, None] + Bcp
            dA = tl.exp(dl[:, None, :] * A[:, :, None])
            h = dA * hprev + (dl * u)[:, None, :] * Bt[None, :, :]
            # out = (y + D u) * silu(z): dy = dL/dy, dz
            dy = dout
            if has_z != 0:
                z = tl.load(z_ptr + dt_off, mask=m_dt, other=0.0).to(CD)
                sz = 1.0 / (1.0 + tl.exp(-z))
                y = tl.sum(h * Ct[None, :, :], axis=1) + Dv[:, None] * u
                tl.store(dz_ptr + dt_off, dout * y * sz * (1.0 + z * (1.0 - sz)), mask=m_dt)
                dy = dout * z * sz
            # g_t = dL/dh_t = dy_t C_t (+ dlast at L-1) + a_{t+1} g_{t+1}
            an = tl.where(tn[None, None, :], tl.exp(dln[:, None, :] * A[:, :, None]), 0.0)
            bg = dy[:, None, :] * Ct[None, :, :] + tl.where((t == L - 1)[None, None, :], dlast[:, :, None], 0.0)
            Ag, Gg = tl.associative_scan((an, bg), 2, _combine, reverse=True)
            g = Gg + Ag * g_next[:, :, None]
            g_next = _pick(g, tt, 0, 2)
            q = g * hprev * dA                                           # dL/d(delta'_t A)
            gB = tl.sum(g * Bt[None, :, :], axis=1)                      # dL/d(delta'_t u_t)
            ddelta = (tl.sum(q * A[:, :, None], axis=1) + gB * u) * ddl  # through softplus(delta + bias)
            tl.store(ddelta_ptr + dt_off, ddelta, mask=m_dt)
            tl.store(du_ptr + dt_off, gB * dl + dy * Dv[:, None], mask=m_dt)
            dA_acc += tl.sum(q * dl[:, None, :], axis=2)
            dD_acc += tl.sum(dy * u, axis=1)
            dbias_acc += tl.sum(ddelta, axis=1)
            tl.atomic_add(dB_ptr + nt_off, tl.sum(g * (dl * u)[:, None, :], axis=0), mask=m_nt)
            tl.atomic_add(dC_ptr + nt_off, tl.sum(h * dy[:, None, :], axis=0), mask=m_nt)
        tl.store(dA_ptr + st, dA_acc, mask=dn_mask)
        tl.store(dD_ptr + pid_b.to(tl.int64) * D + dd, dD_acc, mask=dm)
        tl.store(dbias_ptr + pid_b.to(tl.int64) * D + dd, dbias_acc, mask=dm)

    # --- grouped matmul -------------------------------------------------------------------------------
    @triton.jit
    def gmm_kernel(x_ptr, w_ptr, y_ptr, tile_group_ptr, tile_row_ptr, group_end_ptr, K, M, G,
                   stride_wg, stride_wk, stride_wm, DOT_DTYPE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """y[rows of g] = x[rows of g] @ w[g] on one (BLOCK_M rows of one group) x (BLOCK_N cols) tile.
        The tile table (group, first row) is built on the device; a tile never spans two groups. Used with
        w's strides swapped for dX = dY w^T."""
        tile = tl.program_id(0)
        g = tl.load(tile_group_ptr + tile)
        active = g < G                                                    # tiles past the last are idle:
        g = tl.minimum(g, G - 1)                                          # no rows, no K steps
        row0 = tl.load(tile_row_ptr + tile)
        row_end = tl.where(active, tl.load(group_end_ptr + g), row0)
        k_end = tl.where(active, K, 0)
        rows = row0 + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        rmask = rows < row_end
        cmask = cols < M
        rows64 = rows.to(tl.int64)
        x_ptrs = x_ptr + rows64[:, None] * K + ks[None, :]
        w_ptrs = w_ptr + g.to(tl.int64) * stride_wg + ks[:, None] * stride_wk + cols[None, :] * stride_wm
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32 if DOT_DTYPE != tl.float64 else tl.float64)
        for k0 in range(0, k_end, BLOCK_K):
            x = tl.load(x_ptrs, mask=rmask[:, None] & (ks[None, :] < K - k0), other=0.0)
            w = tl.load(w_ptrs, mask=(ks[:, None] < K - k0) & cmask[None, :], other=0.0)
            acc = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), acc)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K * stride_wk
        tl.store(y_ptr + rows64[:, None] * M + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=rmask[:, None] & cmask[None, :])

    @triton.jit
    def gmm_dw_kernel(x_ptr, dy_ptr, dw_ptr, group_start_ptr, group_end_ptr, K, M, DOT_DTYPE: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
        """dW[g] = X_g^T dY_g for one (BLOCK_K x BLOCK_N) tile of one group, looping over the group's rows
        (an empty group writes zeros)."""
        g = tl.program_id(0)
        n_n = tl.cdiv(M, BLOCK_N)
        kk = (tl.program_id(1) // n_n) * BLOCK_K + tl.arange(0, BLOCK_K)
        nn = (tl.program_id(1) % n_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        km = kk < K
        nm = nn < M
        start = tl.load(group_start_ptr + g)
        end = tl.load(group_end_ptr + g)
        acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32 if DOT_DTYPE != tl.float64 else tl.float64)
        for r0 in range(start, end, BLOCK_R):
            rr = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
            rm = rr < end
            xt = tl.load(x_ptr + rr[None, :] * K + kk[:, None], mask=km[:, None] & rm[None, :], other=0.0)
            dy = tl.load(dy_ptr + rr[:, None] * M + nn[None, :], mask=rm[:, None] & nm[None, :], other=0.0)
            acc = tl.dot(xt.to(DOT_DTYPE), dy.to(DOT_DTYPE), acc)
        tl.store(dw_ptr + (g.to(tl.int64) * K + kk[:, None]) * M + nn[None, :], acc.to(dw_ptr.dtype.element_ty),
                 mask=km[:, None] & nm[None, :])


# --- autograd wrappers around the kernels ---------------------------------------------------------------
def _real(t):
    return torch.view_as_real(t) if t is not None and t.is_complex() else t


class _LinearScanTriton(torch.autograd.Function):
    """a, b (R, L) contiguous (fp32/bf16/fp64/complex), h0 (R,) or None -> h (R, L) in a's dtype."""

    @staticmethod
    def forward(ctx, a, b, h0):
        R, L = a.shape
        cfg = launch_config("scan_fwd", _target(a))
        h = _empty((R, L), a)
        ctx.has_h0 = h0 is not None
        h0 = torch.zeros(R, dtype=a.dtype, device=a.device) if h0 is None else h0.to(a.dtype).contiguous()
        scan_fwd_kernel[(triton.cdiv(R, cfg["BLOCK_R"]),)](_real(a), _real(b), _real(h0), _real(h), R, L,
                                                           COMPLEX=a.is_complex(), CD=_cd(_real(a).dtype),
                                                           **_launch_args(cfg))
        ctx.save_for_backward(a, h, h0)
        return h

    @staticmethod
    def backward(ctx, dh):
        a, h, h0 = ctx.saved_tensors
        R, L = a.shape
        dh = dh.contiguous()
        cfg = launch_config("scan_bwd", _target(a))
        da, db = _empty((R, L), a), _empty((R, L), a)
        scan_bwd_kernel[(triton.cdiv(R, cfg["BLOCK_R"]),)](
            _real(a), _real(h), _real(h0), _real(dh), _real(da), _real(db), R, L, COMPLEX=a.is_complex(),
            CD=_cd(_real(a).dtype), **_launch_args(cfg))
        dh0 = ((a[:, 0].conj() if a.is_complex() else a[:, 0]) * db[:, 0]).to(h0.dtype) if ctx.has_h0 else None
        return da, db, dh0


class _SelectiveScanTriton(torch.autograd.Function):
    """The whole selective_scan_fn in two kernels. u, delta, z (b, d, L) and B, C (b, n, L) in the input dtype
    (fp32 / bf16; fp64 in the interpreter), A (d, n), D, delta_bias (d,) (zeros when absent), z or None
    -> out (b, d, L) in u's dtype, last state (b, d, n) fp32."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus):
        (b, d, L), n = u.shape, A.shape[1]
        cfg = launch_config("selective_fwd", _target(u), dtype=u.dtype, n_state=n)
        n_chunks = triton.cdiv(L, cfg["BLOCK_T"])
        cd = torch.float64 if u.dtype == torch.float64 else torch.float32
        out, last = _empty((b, d, L), u), _empty((b, d, n), u, cd)
        ckpt = _empty((b, n_chunks, d, n), u, cd)                          # state entering each chunk
        grid = (b, triton.cdiv(d, cfg["BLOCK_D"]))
        selective_fwd_kernel[grid](u, delta, A, B, C, D, u if z is None else z, delta_bias, out, last, ckpt,
                                   d, L, n, n_chunks, int(z is not None), int(softplus), CD=_cd(u.dtype),
                                   **_launch_args(cfg))
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ckpt)
        ctx.softplus = softplus
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
        (b, d, L), n = u.shape, A.shape[1]
        cfg = launch_config("selective_bwd", _target(u), dtype=u.dtype, n_state=n)
        n_chunks = ckpt.shape[1]
        assert triton.cdiv(L, cfg["BLOCK_T"]) == n_chunks, "fwd and bwd must share BLOCK_T"
        cd = ckpt.dtype
        du, ddelta = _empty((b, d, L), u), _empty((b, d, L), delta)
        dz = _empty((b, d, L), z) if z is not None else None
        dA, dD, dbias = _empty((b, d, n), u, cd), _empty((b, d), u, cd), _empty((b, d), u, cd)   # per batch row
        dB, dC = (torch.zeros(b, n, L, dtype=cd, device=u.device) for _ in range(2))   # atomic sums
        dlast = torch.zeros(b, d, n, dtype=cd, device=u.device) if dlast is None else dlast.contiguous()
        selective_bwd_kernel[(b, triton.cdiv(d, cfg["BLOCK_D"]))](
            u, delta, A, B, C, D, u if z is None else z, delta_bias, ckpt, dout.contiguous(), dlast,
            du, ddelta, dA, dB, dC, dD, u if z is None else dz, dbias, d, L, n, n_chunks,
            int(z is not None), int(ctx.softplus), CD=_cd(u.dtype), **_launch_args(cfg))
        return (du, ddelta, dA.sum(0).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype), dD.sum(0).to(D.dtype), dz,
                dbias.sum(0).to(delta_bias.dtype), None)


def _gmm_schedule(group_sizes, T, block_m):
    """Tile table on the device, no host sync: tile i -> (group, first row); groups' [start, end) rows.
    The number of tiles is bounded by cdiv(T, BLOCK_M) + G without reading the sizes; tiles past the
    real count get group G (idle)."""
    sizes = group_sizes.to(torch.int64)
    G = sizes.numel()
    ends = torch.cumsum(sizes, 0).clamp(max=T)
    starts = ends - sizes.clamp(min=0)
    n_tiles = (ends - starts + block_m - 1) // block_m
    tile_end = torch.cumsum(n_tiles, 0)
    ids = torch.arange(-(-T // block_m) + G, device=sizes.device)                 # cdiv(T, BLOCK_M) + G
    tile_group = torch.searchsorted(tile_end, ids, right=True)
    tg = tile_group.clamp(max=G - 1)
    tile_row = starts[tg] + (ids - (tile_end - n_tiles)[tg]) * block_m
    i32 = lambda t: t.to(torch.int32).contiguous()
    return i32(tile_group), i32(tile_row), i32(starts), i32(ends)


def _gmm_launch(x, w, sched, transpose_w):
    """y = x @ w[g] (or w[g]^T) per group with the schedule's tiles."""
    tile_group, tile_row, starts, ends = sched
    G, K = w.shape[0], x.shape[1]
    M = w.shape[1] if transpose_w else w.shape[2]
    sg, sk, sm = (w.stride(0), w.stride(2), w.stride(1)) if transpose_w else w.stride()
    cfg = launch_config("gmm", _target(x), dtype=x.dtype)
    y = _empty((x.shape[0], M), x)
    grid = (tile_group.numel(), triton.cdiv(M, cfg["BLOCK_N"]))
    gmm_kernel[grid](x, w, y, tile_group, tile_row, ends, K, M, G, sg, sk, sm, **_launch_args(cfg))
    return y


class _GroupedMatmulTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, group_sizes):
        x, w = x.contiguous(), w.contiguous()
        cfg = launch_config("gmm", _target(x), dtype=x.dtype)
        sched = _gmm_schedule(group_sizes.to(x.device), x.shape[0], cfg["BLOCK_M"])   # no sync if already there
        ctx.save_for_backward(x, w, *sched)
        return _gmm_launch(x, w, sched, transpose_w=False)

    @staticmethod
    def backward(ctx, dy):
        x, w, *sched = ctx.saved_tensors
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = _gmm_launch(dy, w, sched, transpose_w=True)             # dX = dY W_g^T
        if ctx.needs_input_grad[1]:
            G, K, M = w.shape
            cfg = launch_config("gmm_dw", _target(x), dtype=x.dtype)
            dw = _empty((G, K, M), w)
            grid = (G, triton.cdiv(K, cfg["BLOCK_K"]) * triton.cdiv(M, cfg["BLOCK_N"]))
            gmm_dw_kernel[grid](x, dy, dw, sched[2], sched[3], K, M, **_launch_args(cfg))
        return dx, dw, None
