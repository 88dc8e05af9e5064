"""kernels.py: Triton (under TRITON_INTERPRET=1) vs torch path vs a float64 sequential oracle, forward and every
gradient, on fresh random inputs, with every kernel output poisoned (NaN) before the kernel writes it.

Tolerances: float64 1e-9 (relative to the largest reference value); float32 1e-4; bfloat16 inputs 3e-2
(bf16 keeps 8 bits of mantissa: one rounding of the output is 4e-3 relative, and the interpreter truncates
where a GPU rounds). Interpreted sizes stay small (each program ~20 ms, each scan element ~0.1 ms there).
tests/conftest.py sets TRITON_INTERPRET=1 (CPU machines) and skips every backend="triton" case, with its reason,
where triton is not installed or CUDA is present (tests/test_gpu_check.py runs the compiled kernels there)."""
import pytest
import torch

import kernels as K

F64 = torch.float64


@pytest.fixture(autouse=True)
def poison():
    K.POISON = True
    yield
    K.POISON = False


def rel_err(x, ref):
    x, ref = torch.view_as_real(x) if x.is_complex() else x, torch.view_as_real(ref) if ref.is_complex() else ref
    x, ref = x.double(), ref.double()
    assert not torch.isnan(x).any(), "NaN in the output: an element was never written"
    return ((x - ref).abs().max() / ref.abs().max().clamp(min=1.0)).item() if ref.numel() else 0.0


def scan_inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_complex:
        real = F64 if dtype == torch.complex128 else torch.float32
        a = torch.polar(torch.rand(shape, generator=g, dtype=real) * 0.9 + 0.05,
                        torch.randn(shape, generator=g, dtype=real))
        b = torch.randn(shape, generator=g, dtype=dtype)
        h0 = torch.randn(shape[:-1], generator=g, dtype=dtype)
    else:
        a = (torch.rand(shape, generator=g, dtype=F64) * 0.9 + 0.05).to(dtype)
        b = torch.randn(shape, generator=g, dtype=F64).to(dtype)
        h0 = torch.randn(shape[:-1], generator=g, dtype=F64).to(dtype)
    return a, b, h0


def grads(out, inputs, gout):
    """Gradients of <out, gout> (real part) w.r.t. the inputs that are tensors."""
    ins = [t for t in inputs if t is not None]
    loss = sum(((o * go.conj()).real if o.is_complex() else o * go).sum() for o, go in zip(out, gout))
    return torch.autograd.grad(loss, ins, retain_graph=True)


# ------------------------------------------------------------------------------------------------ linear scan

BACKENDS = ["torch", "triton"]


@pytest.mark.requires_triton
def test_combine_is_associative_and_matches_two_steps():
    """The kernels' combine functions (called on torch tensors) compose steps and are associative."""
    g = torch.Generator().manual_seed(1)
    x = [torch.randn(5, generator=g, dtype=F64) for _ in range(6)]
    left = K._combine.fn(*K._combine.fn(x[0], x[1], x[2], x[3]), x[4], x[5])
    right = K._combine.fn(x[0], x[1], *K._combine.fn(x[2], x[3], x[4], x[5]))
    for l_, r_ in zip(left, right):
        torch.testing.assert_close(l_, r_)
    h = torch.randn(5, generator=g, dtype=F64)
    a, b = K._combine.fn(x[0], x[1], x[2], x[3])
    torch.testing.assert_close(a * h + b, x[2] * (x[0] * h + x[1]) + x[3])
    c = [torch.randn(5, generator=g, dtype=F64) for _ in range(12)]
    left = K._combine_complex.fn(*K._combine_complex.fn(*c[:8]), *c[8:])
    right = K._combine_complex.fn(*c[:4], *K._combine_complex.fn(*c[4:]))
    for l_, r_ in zip(left, right):
        torch.testing.assert_close(l_, r_)
    z = [torch.complex(c[i], c[i + 1]) for i in range(0, 8, 2)]         # (a1, b1), (a2, b2) as complex numbers
    ar, ai, br, bi = K._combine_complex.fn(*c[:8])
    torch.testing.assert_close(torch.complex(ar, ai), z[2] * z[0])
    torch.testing.assert_close(torch.complex(br, bi), z[2] * z[1] + z[3])


@pytest.mark.parametrize("dtype", [F64, torch.complex128])
@pytest.mark.parametrize("L", [1, 7, 64, 100])
@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_scan_backends_match_oracle(dtype, L, with_h0, backend):
    a, b, h0 = scan_inputs((2, 3, L), dtype, seed=L)                    # 6 rows: not a multiple of BLOCK_R
    h0 = h0 if with_h0 else None
    ins = [t.requires_grad_() for t in (a, b, h0) if t is not None]
    ref = K.linear_scan_ref(a, b, h0)
    gout = torch.randn_like(ref)
    g_ref = grads([ref], ins, [gout])
    h = K.linear_scan(a, b, h0, backend=backend)
    assert h.dtype == dtype and h.shape == a.shape
    assert rel_err(h, ref) < 1e-9
    for g, gr in zip(grads([h], ins, [gout]), g_ref):
        assert rel_err(g, gr) < 1e-9


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2), (torch.complex64, 1e-4)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_scan_low_precision(dtype, tol, backend):
    a, b, h0 = scan_inputs((3, 40), dtype, seed=3)
    ins = [t.requires_grad_() for t in (a, b, h0)]
    up = (lambda t: t.to(torch.complex128)) if dtype.is_complex else (lambda t: t.to(F64))
    ref = K.linear_scan_ref(up(a), up(b), up(h0))
    gout = torch.randn_like(ref)
    g_ref = grads([ref], ins, [gout])
    h = K.linear_scan(a, b, h0, backend=backend)
    assert h.dtype == dtype
    assert rel_err(h, ref) < tol
    for g, gr in zip(grads([h], ins, [gout.to(dtype)]), g_ref):
        assert rel_err(g, gr) < tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_scan_gradcheck(backend):
    for dtype in (F64, torch.complex128):
        a, b, h0 = scan_inputs((3, 20), dtype, seed=4)                  # 20 > one interpreter chunk (16)
        ins = tuple(t.requires_grad_() for t in (a, b, h0))
        # fast mode (random projections of the Jacobian): a few forwards instead of one per input element,
        # which the interpreter (~20 ms per program) needs
        assert torch.autograd.gradcheck(lambda *x: K.linear_scan(*x, backend=backend), ins,
                                        fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_scan_is_causal(backend):
    a, b, _ = scan_inputs((4, 50), F64, seed=5)
    h = K.linear_scan(a, b, backend=backend)
    b2 = b.clone()
    b2[:, 30] += 1.0
    h2 = K.linear_scan(a, b2, backend=backend)
    assert torch.equal(h[:, :30], h2[:, :30]) and (h[:, 30:] != h2[:, 30:]).all()


# --------------------------------------------------------------------------------------------- selective scan

def ss_inputs(b, d, n, L, softplus, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)
    u = r(b, d, L)
    # without softplus, delta must be positive (as it is in Mamba) or exp(delta A) > 1 and the state explodes
    delta = r(b, d, L) if softplus else torch.rand(b, d, L, generator=g, dtype=F64) * 0.5 + 0.01
    A = -torch.rand(d, n, generator=g, dtype=F64) - 0.1
    B, C, D, z, bias = r(b, n, L), r(b, n, L), r(d), r(b, d, L), r(d) * 0.1
    return [t.to(dtype) for t in (u, delta, A, B, C, D, z, bias)]


SS_CASES = [  # (b, d, n, L, use_D, use_z, use_bias, softplus)
    (2, 3, 4, 1, True, True, True, True),
    (2, 3, 4, 7, False, False, False, False),
    (1, 5, 3, 40, True, False, True, True),
    (2, 3, 2, 100, False, True, False, False),
    (1, 6, 4, 33, True, True, False, True),
]


@pytest.mark.parametrize("case", SS_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_selective_scan_backends_match_oracle(case, backend):
    b, d, n, L, use_D, use_z, use_bias, softplus = case
    u, delta, A, B, C, D, z, bias = ss_inputs(b, d, n, L, softplus, seed=L)
    D, z, bias = (D if use_D else None), (z if use_z else None), (bias if use_bias else None)
    args = [u, delta, A, B, C, D, z, bias]
    ins = [t.requires_grad_() for t in args if t is not None]
    out_ref, last_ref = K.selective_scan_ref(*args, delta_softplus=softplus, return_last_state=True)
    gy, gl = torch.randn_like(out_ref), torch.randn_like(last_ref)
    g_ref = grads([out_ref, last_ref], ins, [gy, gl])
    g_ref_y = grads([out_ref], ins, [gy])
    out, last = K.selective_scan(*args, delta_softplus=softplus, return_last_state=True, backend=backend)
    assert out.shape == (b, d, L) and last.shape == (b, d, n)
    assert rel_err(out, out_ref) < 1e-9 and rel_err(last, last_ref) < 1e-9
    for i, (g, gr) in enumerate(zip(grads([out, last], ins, [gy, gl]), g_ref)):
        assert rel_err(g, gr) < 1e-9, i
    out = K.selective_scan(*args, delta_softplus=softplus, backend=backend)    # no last-state gradient
    for i, (g, gr) in enumerate(zip(grads([out], ins, [gy]), g_ref_y)):
        assert rel_err(g, gr) < 1e-9, i


@pytest.mark.parametrize("backend", BACKENDS)
def test_selective_scan_gradcheck(backend):
    u, delta, A, B, C, D, z, bias = ss_inputs(1, 2, 2, 18, True, seed=7)
    ins = tuple(t.requires_grad_() for t in (u, delta, A, B, C, D, z, bias))
    f = lambda *x: K.selective_scan(*x, delta_softplus=True, return_last_state=True, backend=backend)
    assert torch.autograd.gradcheck(f, ins, atol=1e-6, fast_mode=backend == "triton")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_selective_scan_low_precision(dtype, tol, backend):
    args = ss_inputs(2, 3, 4, 20, True, dtype=dtype, seed=8)
    ins = [t.requires_grad_() for t in args]
    ref = K.selective_scan_ref(*[t.double() for t in args], delta_softplus=True)
    gy = torch.randn_like(ref)
    g_ref = grads([ref], ins, [gy])
    out = K.selective_scan(*args, delta_softplus=True, backend=backend)
    assert out.dtype == dtype
    assert rel_err(out, ref) < tol
    for g, gr in zip(grads([out], ins, [gy.to(dtype)]), g_ref):
        assert rel_err(g, gr) < tol


def test_selective_scan_matches_linear_scan():
    """S6 = a linear scan per (channel, state) with a = exp(delta A), b = delta B u, then y = sum_n C h."""
    u, delta, A, B, C, *_ = ss_inputs(2, 3, 4, 30, False, seed=9)
    a = torch.exp(delta[:, :, None, :] * A[None, :, :, None])
    bb = (delta * u)[:, :, None, :] * B[:, None, :, :]
    h = K.linear_scan(a, bb, backend="torch")
    y = (h * C[:, None, :, :]).sum(2)
    torch.testing.assert_close(K.selective_scan(u, delta, A, B, C, backend="torch"), y)


# -------------------------------------------------------------------------------------------- grouped matmul

GROUPS = [[5, 0, 17], [22], [0, 0, 9, 13], [3, 1, 1], [0, 4, 0]]


@pytest.mark.parametrize("sizes", GROUPS)
@pytest.mark.parametrize("dtype,tol", [(F64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_matmul_backends_match_oracle(sizes, dtype, tol, backend):
    g = torch.Generator().manual_seed(sum(sizes))
    gs = torch.tensor(sizes)
    T = int(gs.sum())
    x = torch.randn(T, 20, generator=g, dtype=F64).to(dtype).requires_grad_()        # K, M not multiples of 16
    w = torch.randn(len(sizes), 20, 18, generator=g, dtype=F64).to(dtype).requires_grad_()
    ref = K.grouped_matmul_ref(x.double(), w.double(), gs)
    gy = torch.randn_like(ref)
    g_ref = grads([ref], [x, w], [gy])
    y = K.grouped_matmul(x, w, gs, backend=backend)
    assert y.dtype == dtype and y.shape == (T, 18)
    assert rel_err(y, ref) < tol
    dx, dw = grads([y], [x, w], [gy.to(dtype)])
    assert rel_err(dx, g_ref[0]) < tol and rel_err(dw, g_ref[1]) < tol
    for gi, n in enumerate(sizes):
        if n == 0:
            assert (dw[gi] == 0).all()                                  # an empty group's weight gets zero


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_matmul_gradcheck(backend):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 5, generator=g, dtype=F64, requires_grad=True)
    w = torch.randn(3, 5, 4, generator=g, dtype=F64, requires_grad=True)
    gs = torch.tensor([4, 0, 5])
    assert torch.autograd.gradcheck(lambda x, w: K.grouped_matmul(x, w, gs, backend=backend), (x, w),
                                    fast_mode=backend == "triton")


def test_gmm_schedule_tiles_cover_rows_once_within_one_group():
    sizes = torch.tensor([5, 0, 33, 16, 1])
    bm = 16
    tile_group, tile_row, starts, ends = K._gmm_schedule(sizes, int(sizes.sum()), bm)
    assert tile_group.numel() == -(-55 // bm) + 5                        # the bound known without reading sizes
    seen = torch.zeros(55, dtype=torch.int64)
    for g, r in zip(tile_group.tolist(), tile_row.tolist()):
        if g >= len(sizes):
            continue                                                     # idle tile
        rows = torch.arange(r, min(r + bm, int(ends[g])))
        assert int(starts[g]) <= r < int(ends[g])                        # the tile starts inside its group
        seen[rows] += 1
    assert (seen == 1).all()


def test_sort_by_group_and_unsort():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4, (3, 7), generator=g)
    ids[ids == 2] = 1                                                    # group 2 empty
    order, sizes = K.sort_by_group(ids, 4)
    assert sizes.tolist() == [int((ids == k).sum()) for k in range(4)]
    flat = ids.reshape(-1)
    assert (flat[order][1:] >= flat[order][:-1]).all()                   # sorted
    for k in range(4):                                                    # stable inside a group
        pos = order[flat[order] == k]
        assert (pos[1:] > pos[:-1]).all()
    x = torch.randn(21, 5, generator=g, requires_grad=True)
    y = K.unsort(x[order] * 2, order)
    torch.testing.assert_close(y, x * 2)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_style_roundtrip_equals_per_token_weights(backend):
    """sort -> grouped_matmul -> unsort equals applying each token's own group weight."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 3, (2, 8), generator=g)
    x = torch.randn(2, 8, 6, generator=g)
    w = torch.randn(3, 6, 5, generator=g)
    order, sizes = K.sort_by_group(ids, 3)
    y = K.unsort(K.grouped_matmul(x.reshape(-1, 6)[order], w, sizes, backend=backend), order).reshape(2, 8, 5)
    torch.testing.assert_close(y, torch.einsum("btk,btkm->btm", x, w[ids]), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ bad input

def test_bad_input_raises_value_error():
    a = torch.rand(2, 5)
    with pytest.raises(ValueError, match="same shape"):
        K.linear_scan(a, torch.rand(2, 4))
    with pytest.raises(ValueError, match="h0"):
        K.linear_scan(a, a, torch.rand(3))
    with pytest.raises(ValueError, match="backend"):
        K.linear_scan(a, a, backend="cuda")
    with pytest.raises(ValueError, match="dtype"):
        K.linear_scan(a.long(), a.long())
    u = torch.rand(2, 3, 5)
    with pytest.raises(ValueError, match="A"):
        K.selective_scan(u, u, torch.rand(4, 2), torch.rand(2, 2, 5), torch.rand(2, 2, 5))
    with pytest.raises(ValueError, match="B"):
        K.selective_scan(u, u, torch.rand(3, 2), torch.rand(2, 3, 5), torch.rand(2, 2, 5))
    with pytest.raises(ValueError, match="sum"):
        K.grouped_matmul(torch.rand(5, 3), torch.rand(2, 3, 4), torch.tensor([2, 2]))
    with pytest.raises(ValueError, match="group_sizes"):
        K.grouped_matmul(torch.rand(5, 3), torch.rand(2, 3, 4), torch.tensor([5]))
    with pytest.raises(ValueError, match="integer"):
        K.sort_by_group(torch.rand(4), 2)


def test_launch_config_rejects_unsupported_gpu_settings():
    with pytest.raises(ValueError, match="capability"):
        K.launch_config("gmm", (7, 5), dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bf16/fp32"):
        K.launch_config("gmm", (9, 0), dtype=torch.float64)
    with pytest.raises(ValueError, match="N <= 64"):
        K.launch_config("selective_fwd", (9, 0), n_state=128)


@pytest.mark.parametrize("backend", BACKENDS)
def test_selective_scan_softplus_threshold_and_extremes(backend):
    """The fused Triton softplus (torch's threshold 20) matches F.softplus over a wide range of delta."""
    u, delta, A, B, C, D, z, bias = ss_inputs(1, 3, 2, 24, True, seed=11)
    delta = torch.linspace(-30, 30, 3 * 24, dtype=F64).reshape(1, 3, 24)
    A = A * 0.01                                                        # keep exp(delta A) in range at delta = 30
    ins = [t.requires_grad_() for t in (u, delta, A, B, C, D, z, bias)]
    ref = K.selective_scan_ref(*ins, delta_softplus=True)
    gy = torch.randn_like(ref)
    g_ref = grads([ref], ins, [gy])
    out = K.selective_scan(*ins, delta_softplus=True, backend=backend)
    assert rel_err(out, ref) < 1e-9
    for g, gr in zip(grads([out], ins, [gy]), g_ref):
        assert rel_err(g, gr) < 1e-9


# ------------------------------------------------------------------------------------------------ FLOP tally

@pytest.mark.parametrize("backend", BACKENDS)
def test_flop_tally_matches_hand_count(backend):
    """The documented analytic counts, by hand: selective scan 9 per (batch, dim, state, step) + 1 per
    (batch, dim, step) each for D and z; linear scan 4 per real element, 16 per complex one; backward 2x."""
    b, d, n, L = 2, 3, 4, 5
    u, delta, A, B, C, D, z, bias = ss_inputs(b, d, n, L, True, seed=12)
    fwd = 9 * 2 * 3 * 4 * 5 + 2 * 3 * 5 + 2 * 3 * 5                     # 1080 + D u + silu(z) gate = 1140
    with K.flop_tally() as t:
        with torch.no_grad():
            K.selective_scan(u, delta, A, B, C, D, z, bias, True, backend=backend)
    assert t.flops == 1140 == fwd
    ins = [x.requires_grad_() for x in (u, delta, A, B, C)]
    with K.flop_tally() as t:
        out, last = K.selective_scan(*ins, return_last_state=True, backend=backend)     # no D, no z: 1080
        assert t.flops == 1080
        (out.sum() + last.sum()).backward()
    assert t.flops == 3 * 1080                                           # + the backward, once for both outputs
    a, bb, _ = scan_inputs((2, 3, 7), F64, seed=13)
    ca, cb, _ = scan_inputs((2, 7), torch.complex128, seed=13)
    with K.flop_tally() as outer:
        with K.flop_tally() as inner:
            K.linear_scan(a, bb, backend=backend)                           # 42 real elements
        K.linear_scan(ca.requires_grad_(), cb, backend=backend).real.sum().backward()   # 14 complex, fwd + bwd
        K.add_flops(7)
    assert inner.flops == 4 * 42 and outer.flops == 4 * 42 + 3 * 16 * 14 + 7
    K.linear_scan(a, bb, backend=backend)                                   # no tally active: nothing counted
    assert outer.flops == 4 * 42 + 3 * 16 * 14 + 7 and not K.flop_tally.active


def test_flop_tally_output_is_usable_in_place():
    """Counting must not change what a model may do with a scan's output (in-place ops, gradients)."""
    a, b, _ = scan_inputs((3, 9), F64, seed=14)
    a.requires_grad_()
    with K.flop_tally():
        h = K.linear_scan(a, b, backend="torch")
        h.mul_(2.0)
        h.sum().backward()
    g = a.grad.clone()
    a.grad = None
    (K.linear_scan(a, b, backend="torch") * 2.0).sum().backward()
    torch.testing.assert_close(a.grad, g)


def test_scans_are_opaque_to_torch_compile():
    """Under torch.compile (dynamo) each scan is one opaque call, not its torch path's time loop unrolled step by step
    (which never finished compiling Mamba). Before torch.compiler.disable: 100 graph nodes for L = 16."""
    torch._dynamo.reset()
    a, b = torch.rand(2, 3, 16) * 0.9, torch.randn(2, 3, 16)
    u, delta, z = torch.randn(1, 4, 16), torch.rand(1, 4, 16), torch.randn(1, 4, 16)
    A, B, C = -torch.rand(4, 3), torch.randn(1, 3, 16), torch.randn(1, 3, 16)
    for f, args in ((lambda a, b: K.linear_scan(a, b) * 2, (a, b)),
                    (lambda u, d, z: K.selective_scan(u, d, A, B, C, z=z) * 2, (u, delta, z))):
        e = torch._dynamo.explain(f)(*args)
        assert sum(len(list(g.graph.nodes)) for g in e.graphs) < 10
        torch.testing.assert_close(torch.compile(f, backend="eager")(*args), f(*args))
    # the grouped matmul too: dynamo would trace its Triton autograd Function on a GPU; here its torch path's matmuls
    x, w, sizes = torch.randn(6, 4), torch.randn(2, 4, 3), torch.tensor([2, 4])
    f = lambda x, w: K.grouped_matmul(x, w, sizes) * 2
    e = torch._dynamo.explain(f)(x, w)
    traced = [str(n.target) for g in e.graphs for n in g.graph.nodes]
    assert not any("matmul" in t or "mm" in t for t in traced), traced
    torch.testing.assert_close(torch.compile(f, backend="eager")(x, w), f(x, w))
    torch._dynamo.reset()


def test_flops_under_torch_paths_match_the_torch_backend():
    """kernels.torch_paths() makes every op take its torch path, so FlopCounterMode counts a Triton model's matmuls
    (it counts 0 for what runs inside a Triton kernel)."""
    from torch.utils.flop_counter import FlopCounterMode
    x, w, sizes = torch.randn(40, 16), torch.randn(3, 16, 8), torch.tensor([10, 0, 30])

    def count(backend, force):
        with FlopCounterMode(display=False) as c, (K.torch_paths() if force else torch.enable_grad()):
            K.grouped_matmul(x, w, sizes, backend=backend)
        return c.get_total_flops()
    assert count("torch", False) == 2 * 40 * 16 * 8
    assert count("triton", True) == count("torch", False)
    with K.torch_paths():
        assert K._use_triton("triton", x) is False


# --- dispatch by compute capability: which path each GPU gets (mocked device properties, no GPU needed) -------------
class FakeCuda:
    """Stands in for a CUDA tensor in kernels._use_triton: only is_cuda and device are read there."""
    is_cuda, device = True, "cuda:0"


@pytest.mark.parametrize("cap", [(7, 0), (7, 5), (8, 0), (8, 6), (8, 9), (9, 0)])
def test_auto_uses_triton_only_on_tested_gpus(monkeypatch, cap):
    monkeypatch.setattr(K, "HAS_TRITON", True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"FakeGPU sm_{cap[0]}{cap[1]}")
    tested = cap >= (8, 0)                         # the compile gate's targets: 8.0, 8.6, 8.9, 9.0
    assert (cap in K.TRITON_TARGETS) == tested
    assert K._use_triton("auto", FakeCuda(), FakeCuda(), None) == tested
    assert K._use_triton("torch", FakeCuda()) is False
    if tested:
        assert K._use_triton("triton", FakeCuda()) is True
    else:                                          # one line naming the card and the fix
        with pytest.raises(ValueError, match=rf"FakeGPU sm_{cap[0]}{cap[1]}\) is {cap[0]}\.{cap[1]}; use backend='auto'"):
            K._use_triton("triton", FakeCuda())
    monkeypatch.setattr(K, "HAS_TRITON", False)    # no triton package: auto never picks it
    assert K._use_triton("auto", FakeCuda()) is False


def test_every_kernel_entry_point_dispatches_through_use_triton(monkeypatch):
    """linear_scan, selective_scan and grouped_matmul all ask _use_triton (so the capability rule covers each)."""
    asked = []
    monkeypatch.setattr(K, "_use_triton", lambda backend, *t: asked.append(backend) or False)
    a = torch.rand(2, 8)
    K.linear_scan(a, a)
    u = torch.randn(1, 2, 8)
    K.selective_scan(u, u.abs(), -torch.rand(2, 4), torch.randn(1, 4, 8), torch.randn(1, 4, 8))
    K.grouped_matmul(torch.randn(4, 3), torch.randn(2, 3, 5), torch.tensor([1, 3]))
    assert asked == ["auto", "auto", "auto"]
