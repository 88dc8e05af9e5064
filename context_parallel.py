"""Context (sequence) parallelism: one sequence split across the R ranks of a group, exact, for scans and attention.

Rank r of a context-parallel group holds positions [r L/R, (r+1) L/R) of every sequence. Token-wise layers
(projections, FFNs, norms over features) need no communication; only the sequence mixers do, and each gets a short
function below with the same outputs and gradients as one process on the whole sequence:

  sequence mixer                            method                                   each rank sends per call
  h_t = a_t h_{t-1} + b_t (CEMA, complex;   LASP-2 (Sun et al. 2025, arXiv 2502.07563): one state: constant in L
    Mamba's selective scan)                   ONE all-gather of (P_r, S_r), a prefix
  causal conv1d of width w (Mamba)          halo exchange with the previous rank      (batch, channels, w - 1)
  running statistics (timestep norm)        the same prefix on (count, mean, M2)      one state: constant in L
  softmax attention                         Ring Attention (Liu et al. 2023,          R - 1 K/V blocks: linear in L
                                              arXiv 2310.01889), or all-gather K/V
                                              (LASP-2H's choice; here the reference)

What each rank holds and sends (R = 3; the sequence x_0 .. x_{L-1}):
  holds         rank 0: x[0 : L/3]        rank 1: x[L/3 : 2L/3]        rank 2: x[2L/3 : L]
  scans         (P_0, S_0) ------------------- all-gather (one state each) -------------- (P_2, S_2)
                H_0 = 0                    H_1 = S_0                    H_2 = P_1 S_0 + S_1
  conv1d        last w-1 inputs ---------> halo   last w-1 inputs ---------> halo
  ring attn     step i: rank r attends to the K/V block of rank r - i, then passes it to rank r + 1
                (blocks of later ranks travel on but are skipped: causal)

Glossary (paper -> code): R -> cp.size, r -> cp.rank, P_r (the slice's total decay), S_r (its final state from 0),
H_r (the state entering slice r) -> incoming_state(P, S, cp), (P1, S1) o (P2, S2) -> lasp2_combine,
lse (log-sum-exp of a row of scores) -> lse.

Every function takes `cp`, a CPGroup (make_groups builds them; world = dp x cp), or None for one process (then it
is the plain computation). The collectives are differentiable (their backward is the reverse communication), so
backward on every rank gives each rank its slice's share of every gradient; summed over the cp group it is the
one-process gradient (model_loss: the trainer's side).

Left out: ZeCO's All-Scan (a pipelined collective that hands each rank only its own incoming state: same math, less
traffic at large R); overlapping communication with compute (LightSeq; here each ring step sends after its block is
computed); the zig-zag layout that balances causal ring attention (rank r holds chunks r and 2R-1-r): with
contiguous slices rank R-1 computes R blocks and rank 0 one.
Run: python context_parallel.py [R]     Tests: tests/test_context_parallel.py (gloo, CPU)     Read next: train.py
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

import kernels

# ==== 0. Bytes each rank sends (every collective below adds to it) ===================================================

SENT = {"forward": 0, "backward": 0}


def reset_sent():
    SENT["forward"] = SENT["backward"] = 0


# ==== 1. Groups, slices, differentiable collectives ==================================================================

@dataclass
class CPGroup:
    group: object       # the torch.distributed process group of the R ranks that share each sequence
    rank: int           # r: which slice this process holds
    size: int           # R
    ranks: tuple        # global rank of each group rank (point-to-point calls take global ranks)

    attention_impl: str = "ring"   # "ring" | "allgather" (train.py --cp_attention)

    # the sequence mixers bound to this group: a model holding `cp` calls cp.attention(...) etc. without importing
    # this file (paper files import only torch, numpy and kernels)
    def attention(self, q, k, v, mask=None, scale=None):
        return attention(q, k, v, self, mask, scale, self.attention_impl)

    def selective_scan(self, *args, **kw):
        return selective_scan(*args, cp=self, **kw)

    def linear_scan(self, a, b, **kw):
        return linear_scan(a, b, self, **kw)

    def causal_conv1d(self, x, weight, bias):
        return causal_conv1d(x, weight, bias, self)

    def incoming_state(self, P, S):
        return incoming_state(P, S, self)

    def timestep_state(self, x, groups):
        """megalodon.TimestepNorm's carried state entering this slice: the statistics of all earlier positions."""
        return incoming_moments(*slice_moments(x, groups), self)

    @property
    def next(self):
        return self.ranks[(self.rank + 1) % self.size]

    @property
    def prev(self):
        return self.ranks[(self.rank - 1) % self.size]


def make_groups(cp_size):
    """world = dp x cp: consecutive global ranks share sequences (cp group d = ranks [d cp, (d+1) cp)), and ranks
    with the same slice index form a data-parallel group. Every process must call this (new_group is collective).
    -> (CPGroup of this process, dp process group)."""
    world, me = dist.get_world_size(), dist.get_rank()
    if cp_size < 1 or world % cp_size:
        raise ValueError(f"context_parallel={cp_size} must divide the world size {world}")
    cp = dp = None
    for d in range(world // cp_size):                                   # the same calls, in the same order, everywhere
        ranks = tuple(range(d * cp_size, (d + 1) * cp_size))
        g = dist.new_group(list(ranks))
        if me in ranks:
            cp = CPGroup(g, ranks.index(me), cp_size, ranks)
    for s in range(cp_size):
        g = dist.new_group(list(range(s, world, cp_size)))
        if me % cp_size == s:
            dp = g
    return cp, dp


def split_sequence(x, dim, cp):
    """This rank's contiguous slice of x along dim (the sequence length must divide by R)."""
    if cp is None:
        return x
    if x.shape[dim] % cp.size:
        raise ValueError(f"sequence length {x.shape[dim]} must be divisible by context_parallel={cp.size}")
    return x.chunk(cp.size, dim)[cp.rank]


class _AllGather(torch.autograd.Function):
    """Forward: every rank gets every rank's x. Backward: reduce-scatter (each rank gets the sum over ranks of the
    gradients of ITS x), written as an all-reduce of the stacked gradients (gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, cp):
        ctx.cp = cp
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(cp.size)]
        dist.all_gather(out, x, group=cp.group)
        SENT["forward"] += (cp.size - 1) * x.nbytes
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        g = torch.stack(grads)
        dist.all_reduce(g, group=ctx.cp.group)
        SENT["backward"] += 2 * (ctx.cp.size - 1) * g[0].nbytes                        # a ring all-reduce's traffic
        return g[ctx.cp.rank], None


def all_gather(x, cp):
    """Differentiable all-gather -> list of R tensors (complex tensors travel as their real view)."""
    if x.is_complex():
        return [torch.view_as_complex(t) for t in _AllGather.apply(torch.view_as_real(x), cp)]
    return list(_AllGather.apply(x, cp))


def gather_sequence(x, dim, cp):
    """The whole sequence from the slices (differentiable; the inverse of split_sequence)."""
    return x if cp is None else torch.cat(all_gather(x, cp), dim)


def _send_recv(send, recv_like, dst, src, cp, direction):
    """Send `send` to global rank dst and receive a tensor shaped like recv_like from src (either side may be None)."""
    ops = []   # posted together (batch_isend_irecv): NCCL pairs them, so no rank waits on a send nobody receives
    recv = None if recv_like is None else torch.empty_like(recv_like).contiguous()
    if send is not None:
        send = send.contiguous()
        ops.append(dist.P2POp(dist.isend, send, dst, group=cp.group))
        SENT[direction] += send.nbytes
    if recv is not None:
        ops.append(dist.P2POp(dist.irecv, recv, src, group=cp.group))
    for q in dist.batch_isend_irecv(ops) if ops else []:
        q.wait()
    return recv


# The trainer's side: slice a batch, run the model on the slice, make its loss the whole sequences' loss.
SEQUENCE_KEYS = ("tokens", "targets", "modality", "target_modality", "loss_mask")   # (B, T) batch entries


def split_batch(batch, cp):
    return {k: split_sequence(v, 1, cp) if k in SEQUENCE_KEYS else v for k, v in batch.items()}


def model_loss(model, batch, cp, names):
    """model(batch) of a token-mean cross-entropy LM (loss = mean over targets != -1, parts loss_<name> = the mean
    over targets of modality m = batch["target_modality"]) on this rank's slice of the sequences.
    -> (this rank's share of the loss: summed over the cp group it is the whole-sequence loss, so backward on
    share x R under DDP's mean over dp x cp ranks; the whole-sequence loss and parts, detached, on every rank)."""
    _, loss, parts = model(split_batch(batch, cp))
    valid, tm = batch["targets"] != -1, batch["target_modality"]
    sel = [valid] + [valid & (tm == m) for m in range(len(names))]
    weight = [split_sequence(s, 1, cp).sum() / s.sum().clamp(min=1) for s in sel]        # local / global count
    share = loss * weight[0]
    values = [share.detach()] + [parts.get(f"loss_{n}", torch.zeros(())).to(share) * w
                                 for n, w in zip(names, weight[1:])]
    total = torch.stack([v.float().reshape(()) for v in values])
    dist.all_reduce(total, group=cp.group)
    logged = {f"loss_{n}": total[i + 1] for i, n in enumerate(names) if sel[i + 1].any()}
    return share, total[0], logged


# ==== 2. LASP-2: linear recurrences across ranks =====================================================================
# A slice's effect on the state is the affine map h -> P h + S, with P = prod_t a_t (its total decay) and S its final
# state from h = 0. Maps compose associatively:  (P1, S1) o (P2, S2) = (P1 P2, P2 S1 + S2)   (first 1, then 2),
# so rank r's incoming state is H_r = S of (P_0, S_0) o ... o (P_{r-1}, S_{r-1}), and within the slice
#   h_t = h_t^local + (prod_{s <= t} a_s) H_r.

def lasp2_combine(x, y):
    """(P1, S1) o (P2, S2) = (P1 P2, P2 S1 + S2): run slice 1, then slice 2."""
    (P1, S1), (P2, S2) = x, y
    return P1 * P2, P2 * S1 + S2


def incoming_state(P, S, cp):
    """LASP-2's one collective. P: decay of this slice (broadcastable to S), S: its final state from zero, both the
    size of ONE state -> H_r, the state entering this slice. All R incoming states are formed on every rank and this
    rank's is picked, so every rank uses the gathered tensors (the gather's backward must run on all ranks)."""
    if cp is None:
        return torch.zeros_like(S)
    gathered = all_gather(torch.stack([P.expand_as(S), S]), cp)       # ONE all-gather of (P_r, S_r), r = 0..R-1
    acc, incoming = (torch.ones_like(S), torch.zeros_like(S)), []
    for PS in gathered:
        incoming.append(acc[1])                                       # H_j = S of (P_0, S_0) o ... o (P_{j-1}, S_{j-1})
        acc = lasp2_combine(acc, (PS[0], PS[1]))
    return torch.stack(incoming)[cp.rank]


def linear_scan(a, b, cp, *, backend="auto"):
    """h_t = a_t h_{t-1} + b_t over the whole sequence, this rank holding a, b (..., L/R) (real or complex, as
    kernels.linear_scan) -> h (..., L/R). The backward of the gather carries dL/dH_r to the earlier ranks."""
    h = kernels.linear_scan(a, b, backend=backend)                     # the slice scanned from h = 0
    if cp is None:
        return h
    decay = torch.cumprod(a, -1)                                      # prod_{s <= t} a_s within the slice
    H = incoming_state(decay[..., -1], h[..., -1], cp)                # P_r = the slice's total decay, S_r = h_last
    return h + decay * H.unsqueeze(-1)                                # h_t = h_t^local + (prod a) H_r


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, cp=None, *, backend="auto"):
    """Mamba's selective scan (kernels.selective_scan's arguments) over the whole sequence; this rank holds
    u, delta, z (b, d, L/R), B, C (b, n, L/R) -> out (b, d, L/R).
      h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,  y_t = C_t . h_t + D u_t,  out = y * silu(z)
    Slice decay P_r = exp(A sum_t delta_t) (b, d, n); correction y_t += C_t . (exp(A sum_{s<=t} delta_s) H_r),
    which materialises (b, d, n, L/R) like the reference scan (a scan with an initial state would avoid it)."""
    cd = torch.float64 if u.dtype == torch.float64 else torch.float32
    delta = delta.to(cd)
    if delta_bias is not None:
        delta = delta + delta_bias.to(cd)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    y, S = kernels.selective_scan(u, delta, A, B, C, return_last_state=True, backend=backend)  # from h = 0
    y = y.to(cd)
    if cp is not None:
        decay = torch.exp(delta.cumsum(-1).unsqueeze(2) * A.to(cd)[None, :, :, None])   # (b, d, n, L/R)
        H = incoming_state(decay[..., -1], S, cp)                                        # (b, d, n)
        y = y + torch.einsum("bnl,bdnl,bdn->bdl", C.to(cd), decay, H)
        S = S + decay[..., -1] * H                                                       # the true last state
    out = y if D is None else y + u.to(cd) * D.to(cd)[:, None]
    if z is not None:
        out = out * F.silu(z.to(cd))
    return (out.to(u.dtype), S) if return_last_state else out.to(u.dtype)


# ==== 3. Halo exchange: a causal convolution across the slice boundary ===============================================

class _Halo(torch.autograd.Function):
    """Forward: send my last w-1 inputs to the next rank, receive the previous rank's (zeros on rank 0).
    Backward: the reverse: the gradient of the received halo goes back to the rank that sent it."""

    @staticmethod
    def forward(ctx, tail, cp):
        ctx.cp = cp
        r, R = cp.rank, cp.size
        halo = _send_recv(tail if r < R - 1 else None, tail if r > 0 else None, cp.next, cp.prev, cp, "forward")
        return torch.zeros_like(tail) if halo is None else halo

    @staticmethod
    def backward(ctx, g):
        cp = ctx.cp
        r, R = cp.rank, cp.size
        dtail = _send_recv(g if r > 0 else None, g if r < R - 1 else None, cp.prev, cp.next, cp, "backward")
        return (torch.zeros_like(g) if dtail is None else dtail), None


def causal_conv1d(x, weight, bias, cp):
    """Depthwise causal conv1d (Mamba's, nn.Conv1d(C, C, w, groups=C) weight (C, 1, w)): y_t = sum_k W_k x_{t-w+1+k}.
    x (B, C, L/R) -> (B, C, L/R). The first w-1 outputs of a slice read the previous rank's last w-1 inputs."""
    w = weight.shape[-1]
    if cp is None:
        halo = x.new_zeros(*x.shape[:-1], w - 1)                      # one process: causal zero padding
    else:
        if x.shape[-1] < w - 1:
            raise ValueError(f"slice length {x.shape[-1]} < d_conv - 1 = {w - 1}: use fewer ranks or longer sequences")
        halo = _Halo.apply(x[..., x.shape[-1] - (w - 1):], cp)
    return F.conv1d(torch.cat([halo, x], -1), weight, bias, groups=x.shape[1])


# ==== 4. Megalodon: timestep normalization and chunked attention across ranks ========================================
# Timestep norm's statistics at step t are those of all steps <= t: the state (count n, mean, M2) of a slice merges
# like LASP-2's (P, S), with Chan et al.'s associative merge
#   n = n_a + n_b,  mean = mean_a + (mean_b - mean_a) n_b / n,  M2 = M2_a + M2_b + (mean_b - mean_a)^2 n_a n_b / n.

def chan_merge(a, b):
    (na, ma, m2a), (nb, mb, m2b) = a, b
    n = na + nb
    d = mb - ma
    frac = nb / n.clamp(min=1e-12)
    return n, ma + d * frac, m2a + m2b + d * d * na * frac


def slice_moments(x, groups):
    """(count, mean, M2) of this slice per (row, group), in megalodon.TimestepNorm's units (a time step counts 1, its
    M2 is the population variance over the group's channels). x (B, L/R, D) -> three (B, G) tensors."""
    B, L, D = x.shape
    xg = x.float().view(B, L, groups, D // groups)
    step_mean = xg.mean(-1)                                           # (B, L, G)
    step_m2 = (xg - step_mean.unsqueeze(-1)).square().mean(-1)
    mean = step_mean.mean(1)
    m2 = step_m2.sum(1) + (step_mean - mean.unsqueeze(1)).square().sum(1)   # Chan's merge of the L steps
    return torch.full_like(mean, L), mean, m2


def incoming_moments(n, mean, m2, cp):
    """The statistics of all earlier ranks' positions, as megalodon.TimestepNorm's carried state
    (count (B,), mean (B, G), var (B, G)); count 0 on rank 0. Same single all-gather and prefix as LASP-2."""
    if cp is None:
        zero = torch.zeros_like(mean)
        return zero[:, 0], zero, zero
    gathered = all_gather(torch.stack([n, mean, m2]), cp)
    acc, incoming = (torch.zeros_like(n),) * 3, []
    for s in gathered:
        incoming.append(acc)
        acc = chan_merge(acc, (s[0], s[1], s[2]))
    n0, mean0, m20 = (torch.stack(t)[cp.rank] for t in zip(*incoming))
    return n0[:, 0], mean0, m20 / n0.clamp(min=1)


def check_chunks_aligned(seq_len, chunk_size, cp):
    """Megalodon's attention sees only its chunk (rotary positions restart per chunk): it is local to every rank,
    with no exchange, when chunk boundaries fall on slice boundaries, i.e. chunk_size divides L/R."""
    if cp is not None and (seq_len % cp.size or (seq_len // cp.size) % chunk_size):
        raise ValueError(f"context parallel megalodon needs chunk_size={chunk_size} to divide seq_len/R = "
                         f"{seq_len}/{cp.size}: pick a smaller chunk_size or fewer ranks")


# ==== 5. Attention: Ring Attention, and the all-gather reference =====================================================
# q, k, v (B, H, L/R, d). Causal by default; `mask` (B or 1, 1, L/R, L) bool, True = may attend, gives this rank's
# rows of any other mask (e.g. Transfusion's bidirectional images), which must allow the diagonal.

def _block_mask(mask, cp, src, Lq, Lk, device):
    """Which of this rank's queries may see the keys of rank src's block; None = all of them."""
    if mask is not None:
        return mask[..., src * Lk:(src + 1) * Lk]
    if src < cp.rank:
        return None
    if src == cp.rank:
        return torch.ones(Lq, Lk, dtype=torch.bool, device=device).tril()
    return torch.zeros(Lq, Lk, dtype=torch.bool, device=device)      # a later rank's keys: skipped


def _block_scores(q, k, m, scale):
    s = (q @ k.transpose(-1, -2)) * scale
    return s if m is None else s.masked_fill(~m, float("-inf"))


def _block_attention(q, k, v, m, scale):
    """Softmax attention of q on one K/V block -> output o_b and its log-sum-exp lse_b (-inf where nothing is seen)."""
    s = _block_scores(q, k, m, scale)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.masked_fill(lse == float("-inf"), 0).unsqueeze(-1))
    return p @ v, lse


def _ring_pass(tensors, cp, direction):
    """Send these tensors to the next rank on the ring and receive the previous rank's (one message)."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    flat = _send_recv(flat, flat, cp.next, cp.prev, cp, direction)
    return [t.view_as(ref) for t, ref in zip(flat.split([t.numel() for t in tensors]), tensors)]


class _RingAttention(torch.autograd.Function):
    """Ring Attention. Step i (i = 0..R-1): this rank holds the K/V block of rank src = r - i, attends to it and
    merges by log-sum-exp:   lse' = log(e^lse + e^lse_b),  o' = o e^(lse - lse') + o_b e^(lse_b - lse').
    Causal: blocks of later ranks are skipped (still passed on). Backward (flash attention's, per block, with the final
    o and lse): p = exp(q k^T s - lse), dV = p^T dO, dS = p (dO V^T - rowsum(dO o)), dQ = dS K s, dK = dS^T Q s; dK and
    dV of a block travel around the ring with it and come home after R passes."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale, cp):
        r, R, (Lq, Lk) = cp.rank, cp.size, (q.shape[-2], k.shape[-2])
        o = torch.zeros_like(q[..., :1].expand(*q.shape[:-1], v.shape[-1]))
        lse = torch.full_like(q[..., 0], float("-inf"))
        kb, vb = k, v
        for i in range(R):
            src = (r - i) % R
            m = _block_mask(mask, cp, src, Lq, Lk, q.device)
            if m is None or m.any():                                   # skip blocks this rank may not see
                o_b, lse_b = _block_attention(q, kb, vb, m, scale)
                new = torch.logaddexp(lse, lse_b)
                o = o * torch.exp(lse - new).unsqueeze(-1) + o_b * torch.exp(lse_b - new).unsqueeze(-1)
                lse = new
            if i < R - 1:
                kb, vb = _ring_pass([kb, vb], cp, "forward")
        ctx.save_for_backward(q, k, v, o, lse, mask)
        ctx.scale, ctx.cp = scale, cp
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, mask = ctx.saved_tensors
        scale, cp = ctx.scale, ctx.cp
        r, R, (Lq, Lk) = cp.rank, cp.size, (q.shape[-2], k.shape[-2])
        Dr = (do * o).sum(-1, keepdim=True)                              # rowsum(dO o)
        dq = torch.zeros_like(q)
        kb, vb, dkb, dvb = k, v, torch.zeros_like(k), torch.zeros_like(v)
        for i in range(R):
            src = (r - i) % R
            m = _block_mask(mask, cp, src, Lq, Lk, q.device)
            if m is None or m.any():
                p = torch.exp(_block_scores(q, kb, m, scale) - lse.unsqueeze(-1))
                dvb = dvb + p.transpose(-1, -2) @ do
                ds = p * (do @ vb.transpose(-1, -2) - Dr)
                dq = dq + (ds @ kb) * scale
                dkb = dkb + (ds.transpose(-1, -2) @ q) * scale
            if i < R - 1:
                kb, vb, dkb, dvb = _ring_pass([kb, vb, dkb, dvb], cp, "backward")
            else:                                                      # one more pass: dK, dV of my block come home
                dkb, dvb = _ring_pass([dkb, dvb], cp, "backward")
        return dq, dkb, dvb, None, None, None


def ring_attention(q, k, v, cp, mask=None, scale=None):
    """softmax(q k^T scale + mask) v over the whole sequence's keys; q, k, v (B, H, L/R, d) -> (B, H, L/R, d_v).
    Memory O(L/R) per rank (one visiting K/V block); each rank sends R - 1 K/V blocks forward, 2R - 1 blocks (K, V
    and their gradients) backward."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if cp is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)
    acc = torch.float32 if q.dtype in (torch.bfloat16, torch.float16) else q.dtype   # merge softmaxes in fp32
    return _RingAttention.apply(q.to(acc), k.to(acc), v.to(acc), mask, scale, cp).to(q.dtype)


def allgather_attention(q, k, v, cp, mask=None, scale=None):
    """The simple reference: all-gather K and V (memory O(L) per rank), then ordinary attention of the local queries
    (global positions r L/R + i) on all keys."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if cp is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)
    K, V = gather_sequence(k, -2, cp), gather_sequence(v, -2, cp)
    if mask is None:
        Lq = q.shape[-2]
        qpos = cp.rank * Lq + torch.arange(Lq, device=q.device)
        mask = torch.arange(K.shape[-2], device=q.device)[None, :] <= qpos[:, None]
    return F.scaled_dot_product_attention(q, K, V, attn_mask=mask, scale=scale)


def attention(q, k, v, cp, mask=None, scale=None, impl="ring"):
    """Context-parallel attention, impl "ring" (Ring Attention, the one to read) or "allgather" (the reference)."""
    if impl not in ("ring", "allgather"):
        raise ValueError(f"attention impl={impl!r}: use 'ring' or 'allgather'")
    return (ring_attention if impl == "ring" else allgather_attention)(q, k, v, cp, mask, scale)


# ==== Demo: python context_parallel.py [R] -- R gloo processes on CPU: each mixer = one process; bytes vs L =========

def _demo(rank, R, init):
    import time
    torch.manual_seed(0)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=R)
    cp, _ = make_groups(R)
    d = lambda *s: torch.randn(*s, dtype=torch.float64)
    mixers = {   # name -> (the whole-sequence inputs for length L, each input's time dim (None: a parameter), call)
        "linear_scan": (lambda L: [torch.rand(4, 16, L, dtype=torch.float64), d(4, 16, L)], (-1, -1),
                        lambda g, a, b: linear_scan(a, b, g)),
        "selective_scan": (lambda L: [d(4, 16, L), d(4, 16, L), -torch.rand(16, 8, dtype=torch.float64), d(4, 8, L),
                                      d(4, 8, L)], (-1, -1, None, -1, -1),
                           lambda g, u, t, A, B, C: selective_scan(u, t, A, B, C, delta_softplus=True, cp=g)),
        "causal_conv1d": (lambda L: [d(4, 16, L), d(16, 1, 4)], (-1, None),
                          lambda g, x, w: causal_conv1d(x, w, None, g)),
        "ring_attention": (lambda L: [d(1, 2, L, 8) for _ in range(3)], (-2, -2, -2),
                           lambda g, q, k, v: ring_attention(q, k, v, g).transpose(-1, -2)),
        "allgather_attn": (lambda L: [d(1, 2, L, 8) for _ in range(3)], (-2, -2, -2),
                           lambda g, q, k, v: allgather_attention(q, k, v, g).transpose(-1, -2)),
    }
    if rank == R - 1:
        print(f"{'mixer':>15} {'L':>5} {'sent (B)':>10} {'saved for backward':>19} {'ms fwd+bwd':>10} {'max |err|':>9}")
    for name, (make, dims, call) in mixers.items():
        for L in (256, 1024, 4096):
            xs = make(L)
            ref = call(None, *xs)                                     # one process, the whole sequence
            mine = [t if dim is None else split_sequence(t, dim, cp).clone() for t, dim in zip(xs, dims)]
            saved = {}                                                # storage -> bytes, of what autograd keeps

            def pack(t):
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t
            reset_sent()
            t0 = time.perf_counter()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                y = call(cp, *[t.requires_grad_() for t in mine])
            y.sum().backward()
            ms = 1000 * (time.perf_counter() - t0)
            err = (y - split_sequence(ref, -1, cp)).abs().max().detach()
            dist.all_reduce(err, op=dist.ReduceOp.MAX)
            if rank == R - 1:
                print(f"{name:>15} {L:>5} {SENT['forward'] + SENT['backward']:>10} "
                      f"{sum(saved.values()) / 2 ** 10:>15.0f} KiB {ms:>10.1f} {float(err):>9.0e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    import sys
    import tempfile
    import torch.multiprocessing as mp
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    print(f"{n} CPU processes (gloo), one float64 sequence split in {n} slices. Per call of each mixer on the last\n"
          f"rank: bytes it sends (forward + backward), what autograd keeps for backward, time, and the largest\n"
          f"difference from one process on the whole sequence.")
    mp.start_processes(_demo, args=(n, tempfile.mkdtemp() + "/init"), nprocs=n, start_method="spawn")
