"""context_parallel.py on CPU with gloo: 2 and 4 processes (world 2: cp 2; world 4: cp 4, and dp 2 x cp 2).

Every check runs on every rank of a cp group with the same whole-sequence inputs (a different draw per dp replica):
  - outputs on this rank's slice == the one-process computation on the whole sequence (float64 where the code allows);
  - the gradient of every input and parameter, summed over the cp group (each rank holds its slice's share) == the
    one-process gradient;
  - causality: changing position p changes no output before p on any rank, and does change the last rank's;
  - bytes each rank sends per call (forward + backward): the same at L and 2L for scans, halo and norm statistics;
    doubled at 2L for ring attention;
  - layers of the models (mom.MoMMixer as Mamba and MoM, megalodon.CEMA, mot.Attention) and the whole Megalodon LM
    split across ranks by composing these functions around the model files' parts (used read-only).
All checks of one world size run in ONE set of forked processes (module fixture); each test reads its result.
The last test runs train.py --context_parallel under torchrun against one process.
"""
import json
import os
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import context_parallel as C
import kernels

CHECKS = {}
LAYOUTS = {"world2-cp2": (2, 2), "world4-cp4": (4, 4), "world4-dp2xcp2": (4, 2)}


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


# ---- helpers run inside the workers ---------------------------------------------------------------------------------

def leaf(*shape, dtype=torch.float64, lo=None, hi=None):
    t = torch.randn(*shape, dtype=dtype) if lo is None else lo + (hi - lo) * torch.rand(*shape, dtype=dtype)
    return t.requires_grad_()


def summed_grads(tensors, cp):
    """Each tensor's .grad summed over the cp group (complex via its real view); the grads are then cleared."""
    out = []
    for t in tensors:
        g = torch.view_as_real(t.grad).clone() if t.grad.is_complex() else t.grad.clone()
        dist.all_reduce(g, group=cp.group)
        out.append(torch.view_as_complex(g) if t.grad.is_complex() else g)
        t.grad = None
    return out


def assert_same(cp_fn, ref_fn, inputs, cp, dim=-1, tol=1e-10):
    """cp_fn(inputs) on this rank's slice vs ref_fn(inputs) on the whole sequence: outputs and every input's gradient.
    The loss is a fixed random weighting of the outputs (the same draw on every rank)."""
    ref = ref_fn(*inputs)
    w = torch.randn(ref.shape, dtype=ref.dtype)
    (ref * w).sum().real.backward()
    ref_grads = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    out = cp_fn(*inputs)
    assert out.shape == C.split_sequence(ref, dim, cp).shape
    (out * C.split_sequence(w, dim, cp)).sum().real.backward()
    torch.testing.assert_close(out, C.split_sequence(ref, dim, cp).detach(), rtol=tol, atol=tol)
    for i, (g, rg) in enumerate(zip(summed_grads(inputs, cp), ref_grads)):
        torch.testing.assert_close(g, rg, rtol=tol, atol=tol, msg=lambda m: f"input {i}: {m}")


def assert_causal(cp_fn, inputs, cp, pos_dims, reaches_end=True):
    """Perturb every input at global position p = L/2 - 1 (the last position of rank R/2 - 1): no output before p
    changes (bitwise) on any rank; rank R/2's first output changes (the change crossed the slice boundary), and with
    reaches_end (recurrences, attention) so does the last rank's last output."""
    with torch.no_grad():
        y1 = cp_fn(*inputs)
        bumped = [t.clone() for t in inputs]
        for t, d in zip(bumped, pos_dims):
            if d is not None:
                t.select(d, t.shape[d] // 2 - 1).add_(1.0)
        y2 = cp_fn(*bumped)
    Lr = y1.shape[-1]
    changed = (y1 != y2).reshape(-1, Lr).any(0)                       # per local position (time is the last dim)
    p = (cp.size * Lr) // 2 - 1
    assert not changed[cp.rank * Lr + torch.arange(Lr) < p].any(), "an output before the changed position moved"
    if cp.rank == cp.size // 2:
        assert changed[0], "the change did not cross the slice boundary"
    if reaches_end and cp.rank == cp.size - 1:
        assert changed[-1], "the last rank's last output did not see the change"


def bytes_per_call(fn):
    C.reset_sent()
    out = fn()
    out.real.sum().backward() if out.is_complex() else out.sum().backward()
    return C.SENT["forward"], C.SENT["backward"]


# ---- 1. groups and slices -------------------------------------------------------------------------------------------

@check
def groups_and_slices(cp):
    """cp groups are consecutive ranks; the dp group joins the ranks holding the same slice of other replicas;
    split_sequence / gather_sequence are inverse (and gather is differentiable)."""
    me, world = dist.get_rank(), dist.get_world_size()
    mine, dp = C.make_groups(cp.size)
    assert mine.ranks == tuple(range(me - me % cp.size, me - me % cp.size + cp.size)) and mine.rank == me % cp.size
    t = torch.tensor([float(me)])
    dist.all_reduce(t, group=dp)
    assert t.item() == sum(range(me % cp.size, world, cp.size))
    x = leaf(2, 8, 3)
    y = C.gather_sequence(C.split_sequence(x, 1, cp) * 2, 1, cp)
    torch.testing.assert_close(y, 2 * x.detach())
    y.sum().backward()                                                # each rank's slice gets every rank's gradient
    torch.testing.assert_close(C.split_sequence(x.grad, 1, cp), torch.full((2, 8 // cp.size, 3), 2.0 * cp.size,
                                                                           dtype=torch.float64))
    with pytest.raises(ValueError, match="divisible"):
        C.split_sequence(torch.zeros(2, 8 * cp.size + 1), 1, cp)


# ---- 2. LASP-2 scans -------------------------------------------------------------------------------------------------

def _real_scan_inputs(L):
    return leaf(2, 3, L, lo=0.3, hi=1.0), leaf(2, 3, L)


def _complex_scan_inputs(L):
    a = torch.polar(0.5 + 0.5 * torch.rand(2, 3, L, dtype=torch.float64), 3 * torch.rand(2, 3, L, dtype=torch.float64))
    return a.requires_grad_(), leaf(2, 3, L, dtype=torch.complex128)


@check
def lasp2_linear_scan_real(cp):
    a, b = _real_scan_inputs(16)
    split = lambda t: C.split_sequence(t, -1, cp)
    fn = lambda a, b: C.linear_scan(split(a), split(b), cp)
    assert_same(fn, kernels.linear_scan_ref, [a, b], cp)
    assert_causal(fn, [a, b], cp, [-1, -1])
    sent = [bytes_per_call(lambda: fn(*_real_scan_inputs(L))) for L in (16, 32)]
    assert sent[0] == sent[1] and sent[0][0] > 0, sent
    return {"bytes_fwd_bwd_L16_L32": sent}


@check
def lasp2_linear_scan_complex(cp):
    a, b = _complex_scan_inputs(16)
    split = lambda t: C.split_sequence(t, -1, cp)
    fn = lambda a, b: C.linear_scan(split(a), split(b), cp)
    assert_same(fn, kernels.linear_scan_ref, [a, b], cp)
    assert_causal(fn, [a, b], cp, [-1, -1])
    sent = [bytes_per_call(lambda: fn(*_complex_scan_inputs(L))) for L in (16, 32)]
    assert sent[0] == sent[1], sent
    return {"bytes_fwd_bwd_L16_L32": sent}


def _selective_inputs(L, b=2, d=3, n=4):
    return [leaf(b, d, L), leaf(b, d, L), leaf(d, n, lo=-2.0, hi=-0.2), leaf(b, n, L), leaf(b, n, L), leaf(d),
            leaf(b, d, L), leaf(d)]


@check
def lasp2_selective_scan(cp):
    inputs = _selective_inputs(16)
    sp = lambda t: C.split_sequence(t, -1, cp)

    def fn(u, delta, A, B, Cm, D, z, bias):
        return C.selective_scan(sp(u), sp(delta), A, sp(B), sp(Cm), D, sp(z), bias, True, cp=cp)

    def ref(u, delta, A, B, Cm, D, z, bias):
        return kernels.selective_scan_ref(u, delta, A, B, Cm, D, z, bias, delta_softplus=True)

    assert_same(fn, ref, inputs, cp)
    assert_causal(fn, inputs, cp, [-1, -1, None, -1, -1, None, -1, None])
    # the last state (the prefill cache) on the last rank is the whole sequence's
    _, last = kernels.selective_scan_ref(*inputs[:5], D=inputs[5], z=inputs[6], delta_bias=inputs[7],
                                         delta_softplus=True, return_last_state=True)
    _, mine = C.selective_scan(sp(inputs[0]), sp(inputs[1]), inputs[2], sp(inputs[3]), sp(inputs[4]), inputs[5],
                               sp(inputs[6]), inputs[7], True, return_last_state=True, cp=cp)
    if cp.rank == cp.size - 1:
        torch.testing.assert_close(mine, last, rtol=1e-10, atol=1e-10)
    sent = [bytes_per_call(lambda: fn(*_selective_inputs(L))) for L in (16, 32)]
    assert sent[0] == sent[1], sent
    return {"bytes_fwd_bwd_L16_L32": sent}


# ---- 3. halo exchange ------------------------------------------------------------------------------------------------

@check
def halo_causal_conv1d(cp):
    w = 4
    x, weight, bias = leaf(2, 3, 16), leaf(3, 1, w), leaf(3)
    fn = lambda x, weight, bias: C.causal_conv1d(C.split_sequence(x, -1, cp), weight, bias, cp)
    ref = lambda x, weight, bias: F.conv1d(x, weight, bias, padding=w - 1, groups=3)[..., :16]
    assert_same(fn, ref, [x, weight, bias], cp)
    assert_causal(fn, [x, weight, bias], cp, [-1, None, None], reaches_end=False)
    sent = [bytes_per_call(lambda: fn(leaf(2, 3, L), weight, bias)) for L in (16, 32)]
    assert sent[0] == sent[1], sent
    return {"bytes_fwd_bwd_L16_L32": sent}


# ---- 4. Megalodon's timestep norm ------------------------------------------------------------------------------------

@check
def timestep_norm_moments(cp):
    import megalodon
    tn = megalodon.TimestepNorm(8, 2)
    with torch.no_grad():
        tn.weight.normal_(), tn.bias.normal_()
    x = leaf(2, 16, 8, dtype=torch.float32) * 3 + 1
    x = x.detach().requires_grad_()

    def fn(x, wt, b):
        xs = C.split_sequence(x, 1, cp)
        return tn(xs, C.incoming_moments(*C.slice_moments(xs, 2), cp))[0].transpose(1, 2)

    ref = lambda x, wt, b: tn(x)[0].transpose(1, 2)
    assert_same(fn, ref, [x, tn.weight, tn.bias], cp, tol=2e-5)
    sent = [bytes_per_call(lambda: fn(leaf(2, L, 8, dtype=torch.float32), 0, 0)) for L in (16, 32)]
    assert sent[0] == sent[1], sent
    with pytest.raises(ValueError, match="chunk_size"):
        C.check_chunks_aligned(16, 8 if cp.size == 4 else 16, cp)
    C.check_chunks_aligned(16, 16 // cp.size, cp)
    return {"bytes_fwd_bwd_L16_L32": sent}


# ---- 5. attention ----------------------------------------------------------------------------------------------------

def _qkv(L):
    return leaf(2, 2, L, 4), leaf(2, 2, L, 4), leaf(2, 2, L, 4)


def _attention_check(cp, impl, mask=None):
    q, k, v = _qkv(16)
    sp = lambda t: C.split_sequence(t, 2, cp)
    rows = None if mask is None else C.split_sequence(mask, 2, cp)
    fn = lambda q, k, v: C.attention(sp(q), sp(k), sp(v), cp, mask=rows, impl=impl).transpose(-1, -2)
    ref = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None
                                                         ).transpose(-1, -2)
    assert_same(fn, ref, [q, k, v], cp)
    return fn, [q, k, v]


@check
def ring_attention_causal(cp):
    fn, inputs = _attention_check(cp, "ring")
    assert_causal(fn, inputs, cp, [2, 2, 2])
    # bf16 inputs (GPU autocast): the merge runs in fp32; the output is bf16 and within bf16 rounding of float64
    ref = F.scaled_dot_product_attention(*inputs, is_causal=True).detach()
    low = C.ring_attention(*(C.split_sequence(t.detach().bfloat16(), 2, cp) for t in inputs), cp)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.double(), C.split_sequence(ref, 2, cp), rtol=3e-2, atol=3e-2)
    sent = [bytes_per_call(lambda: fn(*_qkv(L))) for L in (16, 32)]
    assert sent[1] == (2 * sent[0][0], 2 * sent[0][1]), sent             # linear in L
    return {"bytes_fwd_bwd_L16_L32": sent}


@check
def allgather_attention_causal(cp):
    fn, inputs = _attention_check(cp, "allgather")
    assert_causal(fn, inputs, cp, [2, 2, 2])


def _image_mask(L=16):
    """Transfusion's mask: causal, plus bidirectional inside each image; images straddle the slice boundaries."""
    gid = torch.full((2, L), -1)
    gid[0, 3:11], gid[1, 6:14], gid[1, 1:4] = 0, 1, 2
    same = (gid[:, :, None] == gid[:, None, :]) & (gid[:, :, None] >= 0)
    return (torch.ones(L, L, dtype=torch.bool).tril() | same)[:, None]


@check
def ring_attention_image_mask(cp):
    _attention_check(cp, "ring", _image_mask())


@check
def allgather_attention_image_mask(cp):
    _attention_check(cp, "allgather", _image_mask())


# ---- 7. one layer of each model split across ranks (the model files used read-only) -------------------------------

def _layer_check(cp, module, inputs, ref_fn, cp_fn, dim, tol):
    """A whole layer: outputs, the input's gradient and every parameter's gradient (summed over the cp group)."""
    params = [p for p in module.parameters() if p.requires_grad]
    assert_same(lambda x, *ps: cp_fn(x), lambda x, *ps: ref_fn(x), inputs + params, cp, dim=dim, tol=tol)


def _mamba_mixer_cp(mx, u, route, cp):
    """mom.MoMMixer.forward with the sequence mixers replaced: causal_conv1d (halo) and selective_scan (LASP-2)."""
    Bsz, T, _ = u.shape
    di, N, R = mx.cfg.d_inner, mx.cfg.d_state, mx.cfg.dt_rank
    xs, z = mx.in_proj(u.reshape(Bsz * T, -1), route).view(Bsz, T, 2 * di).transpose(1, 2).chunk(2, dim=1)
    x = F.silu(C.causal_conv1d(xs, mx.conv1d.weight, mx.conv1d.bias, cp))
    dt, Bm, Cm = mx.x_proj(x.transpose(1, 2).reshape(Bsz * T, di), route).split([R, N, N], dim=-1)
    dt = mx.dt_proj(dt, route)
    tm = lambda t: t.view(Bsz, T, -1).transpose(1, 2)
    y = C.selective_scan(x, tm(dt), -torch.exp(mx.A_log), tm(Bm), tm(Cm), D=mx.D, z=z, delta_softplus=True, cp=cp)
    return mx.out_proj(y.transpose(1, 2).reshape(Bsz * T, di), route).view(Bsz, T, -1)


def _mom_layer(cp, split):
    import mom
    torch.manual_seed(7)                                               # the same weights on every rank
    cfg = mom.Config(d_model=16, d_state=4, n_modalities=2, split_in_proj=split, split_x_proj=split,
                     split_dt_proj=split, split_out_proj=split)
    mx = mom.MoMMixer(cfg).double()
    torch.manual_seed(1000 + dist.get_rank() // cp.size)
    u, modality = leaf(2, 16, 16), torch.randint(0, 2, (2, 16))
    route = lambda m: mom.Route(m, 2) if split else None
    ref = lambda u: mx(u, route(modality)).transpose(1, 2)
    fn = lambda u: _mamba_mixer_cp(mx, C.split_sequence(u, 1, cp), route(C.split_sequence(modality, 1, cp)),
                                   cp).transpose(1, 2)
    _layer_check(cp, mx, [u], ref, fn, -1, 1e-9)


@check
def layer_mamba_mixer(cp):
    _mom_layer(cp, split=False)


@check
def layer_mom_mixer(cp):
    _mom_layer(cp, split=True)


def _cema_cp(cema, x, cp, impl):
    """megalodon.CEMA on a slice: its final state from zero S_r and decay P_r = q^(L/R) give H_r (LASP-2); the
    slice then runs again from h0 = H_r (CEMA's own carried-state path, exact for both impls)."""
    _, S = cema(x, impl=impl, want_state=True)
    _, (mag, theta), _ = cema.coeffs(polar=True)
    P = torch.polar(mag ** x.shape[1], theta * x.shape[1]).squeeze(-1)   # q^(L/R), (D, N)
    return cema(x, C.incoming_state(P, S, cp), impl=impl)[0]


@check
def layer_megalodon_cema(cp):
    import megalodon
    torch.manual_seed(7)
    cema = megalodon.CEMA(4, 3)
    torch.manual_seed(1000 + dist.get_rank() // cp.size)
    x = leaf(2, 16, 4, dtype=torch.float32)
    for impl in ("scan", "fft"):
        ref = lambda x: cema(x, impl=impl)[0].transpose(1, 2)
        fn = lambda x: _cema_cp(cema, C.split_sequence(x, 1, cp), cp, impl).transpose(1, 2)
        _layer_check(cp, cema, [x], ref, fn, -1, 2e-5)


class _CPTimestepNorm(torch.nn.Module):
    """megalodon.TimestepNorm on a slice, started from the statistics of the earlier ranks' positions."""

    def __init__(self, tn, cp):
        super().__init__()
        self.tn, self.cp = tn, cp

    def forward(self, x, state=None):
        return self.tn(x, self.cp.timestep_state(x, self.tn.groups))


class _CPCEMA(torch.nn.Module):
    def __init__(self, cema, cp):
        super().__init__()
        self.cema, self.cp = cema, cp

    def forward(self, x, h0=None, impl="fft", want_state=False, backend="auto"):
        return _cema_cp(self.cema, x, self.cp, impl), None


@check
def model_megalodon(cp):
    """The whole Megalodon LM (2 blocks + final timestep norm): its timestep norms and CEMAs swapped for the
    context-parallel ones, chunk attention local (chunk_size divides L/R): logits and every parameter's gradient."""
    import megalodon
    for impl in ("fft", "scan"):
        torch.manual_seed(7)
        cfg = megalodon.Config(d_model=16, n_layers=2, z_dim=8, v_dim=16, ffn_dim=16, cema_ndim=4, chunk_size=4,
                               norm_groups=4, seq_len=16, cema_impl=impl)
        model = megalodon.Megalodon(cfg)
        cp_model = megalodon.Megalodon(cfg)
        cp_model.load_state_dict(model.state_dict())
        for layer in cp_model.layers:
            layer.mega.timenorm = _CPTimestepNorm(layer.mega.timenorm, cp)
            layer.mega.cema = _CPCEMA(layer.mega.cema, cp)
        cp_model.final_norm = _CPTimestepNorm(cp_model.final_norm, cp)
        C.check_chunks_aligned(16, cfg.chunk_size, cp)
        torch.manual_seed(1000 + dist.get_rank() // cp.size)
        idx = torch.randint(0, cfg.vocab_size, (2, 16))
        logits = model.forward_tokens(idx)[0]
        out = cp_model.forward_tokens(C.split_sequence(idx, 1, cp))[0]
        torch.testing.assert_close(out, C.split_sequence(logits, 1, cp).detach(), rtol=1e-4, atol=1e-4)
        w = torch.randn(logits.shape)
        (logits * w).sum().backward()
        (out * C.split_sequence(w, 1, cp)).sum().backward()
        cp_params = dict(cp_model.named_parameters())
        names = [n for n, _ in model.named_parameters()]
        cp_names = [n for n, _ in cp_model.named_parameters()]              # the wrappers add ".tn" / ".cema"
        assert len(names) == len(cp_names)
        grads = summed_grads([cp_params[n] for n in cp_names], cp)
        for n, p, g in zip(names, model.parameters(), grads):
            torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-4, msg=lambda m: f"{impl} {n}: {m}")
            p.grad = None
        # the trainer's helper: loss and parts of the whole sequences from the slices; the share's gradients sum to
        # the one-process loss gradient (targets with ignored positions and two modalities)
        targets = torch.randint(0, cfg.vocab_size, (2, 16))
        targets[0, :5] = -1
        tmod = torch.randint(0, 2, (2, 16))
        tmod[:, 5:9] = 0
        batch = dict(tokens=idx, targets=targets, target_modality=tmod, row_id=torch.arange(2))
        cfg.n_modalities, cfg.modality_names = 2, ("text", "image")
        _, loss, parts = model(batch)
        loss.backward()
        share, full, cp_parts = C.model_loss(cp_model, batch, cp, cfg.modality_names)
        share.backward()
        torch.testing.assert_close(full, loss.detach(), rtol=1e-5, atol=1e-5)
        assert cp_parts.keys() == parts.keys()
        for k in parts:
            torch.testing.assert_close(cp_parts[k], parts[k], rtol=1e-5, atol=1e-5)
        grads = summed_grads([cp_params[n] for n in cp_names], cp)
        for n, p, g in zip(names, model.parameters(), grads):
            torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-4, msg=lambda m: f"loss {impl} {n}: {m}")


def _attention_layer_cp(att, x, rt, cp, impl, theta):
    """mot.Attention.forward with rotary positions r L/R + i and context-parallel attention."""
    import mot
    B, T, D = x.shape
    q, k, v = (t.view(B, T, att.n_head, att.hd) for t in att.qkv(x, rt).split(D, dim=-1))
    cos, sin = mot.rope(torch.arange(cp.rank * T, (cp.rank + 1) * T), att.hd, theta, x.device)
    q, k = mot.apply_rope(q, cos, sin), mot.apply_rope(k, cos, sin)
    y = C.attention(*(t.transpose(1, 2) for t in (q, k, v)), cp, impl=impl)
    return att.proj(y.transpose(1, 2).reshape(B, T, D), rt)


@check
def layer_mot_attention(cp):
    import mot
    torch.manual_seed(7)
    cfg = mot.Config(d_model=16, n_head=2, untie_attn=True)
    att = mot.Attention(cfg).double()
    torch.manual_seed(1000 + dist.get_rank() // cp.size)
    x, modality = leaf(2, 16, 16), torch.randint(0, 2, (2, 16))
    cos, sin = mot.rope(torch.arange(16), 8, cfg.rope_theta, x.device)
    ref = lambda x: att(x, mot.Routing(modality, 2), cos, sin).transpose(1, 2)
    for impl in ("ring", "allgather"):
        fn = lambda x: _attention_layer_cp(att, C.split_sequence(x, 1, cp),
                                           mot.Routing(C.split_sequence(modality, 1, cp), 2), cp, impl,
                                           cfg.rope_theta).transpose(1, 2)
        _layer_check(cp, att, [x], ref, fn, -1, 1e-9)


# ---- the worker and the fixture --------------------------------------------------------------------------------------

def _worker(rank, world, cp_sizes, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    results = {}
    for cp_size in cp_sizes:
        cp, _ = C.make_groups(cp_size)
        layout = f"world{world}-" + (f"cp{cp_size}" if cp_size == world else f"dp{world // cp_size}xcp{cp_size}")
        for name, fn in CHECKS.items():
            torch.manual_seed(1000 + rank // cp_size)                 # same data in a cp group, another per dp replica
            try:
                results[f"{name}[{layout}]"] = {"ok": True, "info": fn(cp)}
            except Exception:
                results[f"{name}[{layout}]"] = {"ok": False, "error": traceback.format_exc()}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = {}
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    torch.testing.assert_close(torch.ones(1), torch.ones(1))          # its first call imports for seconds: once, here
    for world, cp_sizes in ((2, (2,)), (4, (4, 2))):
        d = tmp_path_factory.mktemp(f"cp_world{world}")
        mp.start_processes(_worker, args=(world, cp_sizes, str(d / "init"), str(d)), nprocs=world,
                           start_method=method)
        for r in range(world):
            for key, res in json.loads((d / f"rank{r}.json").read_text()).items():
                out.setdefault(key, {})[r] = res
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", CHECKS)
def test_context_parallel(results, name, layout):
    per_rank = results[f"{name}[{layout}]"]
    assert len(per_rank) == LAYOUTS[layout][0]
    for r, res in per_rank.items():
        assert res["ok"], f"rank {r}:\n{res['error']}"


# ---- phase 2: train.py --context_parallel (runs once train.py has the field; until then skipped with the reason) ----

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_ARGS = ["--steps=3", "--seq_len=64", "--batch_size=4", "--gen_n=0", "--log_every=1", "--eval_every=3",
              "--eval_batches=1", "--device=cpu"]


@pytest.mark.parametrize("model,port", [("mamba", 29541), ("megalodon", 29542), ("mot", 29543)])
def test_train_context_parallel_equals_one_process(tmp_path, model, port):
    import subprocess
    import sys
    import train
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = TRAIN_ARGS + (["--chunk_size=16"] if model == "megalodon" else [])
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    r = subprocess.run([sys.executable, "train.py", f"--model={model}", *args, f"--out={one}"], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                        "train.py", f"--model={model}", *args, "--context_parallel=2", f"--out={two}"], cwd=ROOT,
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True)["model"] for d in (one, two))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    rows = [[json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))] for d in (one, two)]
    for r1, r2 in zip(*rows):
        for k, v in r1.items():
            if k != "time" and isinstance(v, float):
                assert v == pytest.approx(r2[k], rel=1e-5), k
