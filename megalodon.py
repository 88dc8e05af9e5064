"""Megalodon: Efficient LLM Pretraining and Inference with Unlimited Context Length
Ma, Yang, Xiong, Chen, Yu, Zhang, May, Zettlemoyer, Levy, Zhou (2024) -- https://arxiv.org/abs/2404.08801

Mega's recipe: a moving average carries information across the whole sequence into a gated softmax attention that
looks only inside fixed-length chunks, so cost grows linearly with length and the context is unlimited. Megalodon
makes the moving average complex (CEMA, Sec. 3.1) and adds timestep normalization (Sec. 3.2), normalized attention
(Sec. 3.3) and a pre-norm with a two-hop residual (Sec. 3.4).

Glossary (paper -> code)
  X, D                  layer input (B, L, D), D = cfg.d_model
  alpha, delta          CEMA.alpha, CEMA.delta (D, N, 1) raw; sigmoid() gives alpha, delta in (0, 1)
  theta (wavelets)      CEMA.theta (D, 1, 1) raw; theta_{j,n} = n * sigmoid(theta_j) * 2 pi / N, n = 1..N
  eta, omega            CEMA.gamma (D, N, 2) = complex (D, N) scaled by N^-1/2; CEMA.omega (D,) the skip
  h, N                  CEMA state (B, D, N) complex; N = cfg.cema_ndim
  X_hat                 TimestepNorm(X): group norm with the statistics of all positions <= t
  M', mx                mx = RMSNorm(CEMA(X_hat))
  Z, Q, K               z = W_z mx, normalized per head; q, k = z * (gamma + 1) / sqrt(d_z) + beta
  V, R                  v = SiLU(W_v X_hat), r = SiLU(W_r mx)
  c                     cfg.chunk_size: attention only inside chunks; rotary positions restart per chunk
  H, Y                  H = W_h1 mx + W_h2 (O * R);  Y = FFN(LayerNorm(X + H)) + X (two-hop residual)

Follows the official code (github.com/XuezheMax/megalodon) where it differs from the paper's Sec. 3.1:
  h_t = p x_t + q h_{t-1}, p = sigmoid(alpha) real, q = (1 - sigmoid(alpha) sigmoid(delta)) e^{i theta}: the phase
  only on the recurrence, no beta expansion (paper: alpha e^{i theta} u_t + ..., u = beta x); so |q| < 1, stable by
  construction. The official code runs CEMA as a causal FFT convolution: cfg.cema_impl = "sequential" is the
  recurrence above (the form to read), "fft" the official convolution (default), "scan" kernels.linear_scan; the
  timestep norm's statistics likewise (cfg.norm_impl). Tests hold every speed path equal to its plain form.
Chunk-wise attention pads the last chunk instead of requiring L % c == 0 (same result, causal).
Left out: 4-D parallelism (Sec. 3.5) and the fused CUDA kernels; dropout (toy scale); the timestep-norm prior
(prior_count = 0 in the official configs); padding masks (no padding here).
Run:  python train.py --compare dense,megalodon --setting bytes      python megalodon.py (demo)
Read next: kernels.py (the scans and grouped matmul every model above calls).
"""
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels


@dataclass
class Config:
    vocab_size: int = 256
    n_modalities: int = 1
    modality_names: tuple = ("text",)   # loss part names (data.py's model_fields fills it)
    seq_len: int = 2048              # longest training sequence (forward(batch) checks it; generate does not)
    d_model: int = 64                # D (model_dim); toy size matched to mot.py's dense baseline
    n_layers: int = 2
    n_heads: int = 1                 # heads share z; z_dim and v_dim are split across them (official 200M: 1)
    z_dim: int = 32                  # shared query/key dimension (official: D / 4)
    v_dim: int = 128                 # value / gate dimension (official: 2 D)
    ffn_dim: int = 128               # FFN hidden size (official SwiGLU configs: 2 D)
    cema_ndim: int = 16              # N, EMA dimensions per channel
    chunk_size: int = 256            # c, attention chunk length
    norm_groups: int = 8             # G, timestep-norm groups
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    swiglu: bool = True              # SwiGLU FFN (official 7B); False: SiLU FFN
    rescale_nffn: bool = False       # layer scale 0.1 * 0.5^layer on the FFN output (official option)
    scale_emb: bool = False          # multiply embeddings by sqrt(D) (official option)
    share_emb: bool = False          # tie the output layer to the embedding (official option)
    cema_impl: str = "fft"           # "sequential" (the recurrence, step by step) | "fft" (causal FFT convolution,
                                     # official) | "scan" (kernels.linear_scan): same results
    scan_backend: str = "auto"       # kernels.linear_scan backend: "auto" | "triton" | "torch"
    norm_impl: str = "scan"          # timestep-norm statistics: "sequential" (one merge per step) | "scan" (log-depth)
    init_mode: str = "he"            # linear layers: "he" (kaiming normal, official) | "torch" (nn.Linear uniform)
    # ablations (paper components, all on by default)
    use_cema: bool = True            # False: no moving average (mx = RMSNorm(X_hat))
    cema_complex: bool = True        # False: theta = 0, a real damped EMA (Mega)
    timestep_norm: bool = True       # False: per-token LayerNorm instead (Mega / Transformer)
    normalized_attention: bool = True  # False: plain q, k projections with 1/sqrt(d) scaling
    two_hop_residual: bool = True    # False: the FFN's residual is the attention output
    # valid values, one rule per field ("int >= 1", "one of a|b", ...; after ";" a note): checked when built
    RANGES: ClassVar[dict] = dict(
        vocab_size="int >= 1", n_modalities="int >= 1", modality_names="names", seq_len="int >= 8",
        d_model="int >= 1", n_layers="int >= 1", n_heads="int >= 1", z_dim="int >= 1", v_dim="int >= 1",
        ffn_dim="int >= 1", cema_ndim="int >= 1", chunk_size="int >= 1", norm_groups="int >= 1",
        norm_eps="float in (0, 1)", rope_base="float > 0", swiglu="bool", rescale_nffn="bool", scale_emb="bool",
        share_emb="bool", cema_impl="one of sequential|fft|scan", scan_backend="one of auto|triton|torch",
        norm_impl="one of sequential|scan", init_mode="one of he|torch", use_cema="bool", cema_complex="bool",
        timestep_norm="bool", normalized_attention="bool", two_hop_residual="bool")

    def __post_init__(self):
        if self.z_dim % self.n_heads or self.v_dim % self.n_heads or (self.z_dim // self.n_heads) % 2:
            raise ValueError(f"z_dim={self.z_dim} and v_dim={self.v_dim} must split into n_heads={self.n_heads} "
                             "heads with an even z head size; change z_dim, v_dim or n_heads")
        if self.d_model % self.norm_groups:
            raise ValueError(f"d_model={self.d_model} is not divisible by norm_groups={self.norm_groups}; change one")
        if len(self.modality_names) < self.n_modalities:
            raise ValueError(f"modality_names={self.modality_names} names fewer than n_modalities={self.n_modalities}")


# ----- Sec. 3.1: complex exponential moving average (CEMA) -----------------------------------------------------
class CEMA(nn.Module):
    """Multi-dimensional damped complex EMA, one per channel: h_t = p x_t + q h_{t-1} (N-dim complex state),
    y_t = Re(gamma . h_t) + omega x_t. State h: (B, D, N) complex64."""
    cp = None   # context_parallel.CPGroup: set by train.py --context_parallel N

    def __init__(self, dim, ndim, complex_=True):
        super().__init__()
        self.dim, self.ndim, self.complex = dim, ndim, complex_
        self.alpha = nn.Parameter(torch.randn(dim, ndim, 1) * 0.2)
        self.delta = nn.Parameter(torch.randn(dim, ndim, 1) * 0.2)
        # theta (official init): log-spaced base frequencies f_j = exp(-j log D / D), permuted over channels, stored
        # as logit(f); channel j's N wavelets are its harmonics n = 1..N
        freqs = torch.exp(-torch.arange(1, dim + 1) * (math.log(dim) / dim))[torch.randperm(dim)]
        self.theta = nn.Parameter(torch.log(freqs / (1 - freqs)).view(dim, 1, 1))
        gamma = torch.randn(dim, ndim, 2)
        gamma[..., 1] = 0.0                                  # imaginary part of eta starts at 0
        self.gamma = nn.Parameter(gamma)
        self.omega = nn.Parameter(nn.init.trunc_normal_(torch.empty(dim), std=0.25, a=-1.0, b=1.0))

    def coeffs(self, polar=False):
        """p (D, N, 1) real, q (D, N, 1) complex with |q| < 1 (or its (|q|, angle) if polar), gamma (D, N) complex."""
        wavelets = torch.arange(1, self.ndim + 1, dtype=torch.float32, device=self.theta.device).view(1, -1, 1)
        theta = torch.sigmoid(self.theta.float()) * (2 * math.pi / self.ndim) * wavelets      # (D, N, 1)
        if not self.complex:
            theta = torch.zeros_like(theta)
        p = torch.sigmoid(self.alpha.float())
        mag = 1.0 - p * torch.sigmoid(self.delta.float())
        gamma = torch.view_as_complex(self.gamma.float().contiguous()) * self.ndim ** -0.5
        return p, ((mag, theta) if polar else torch.polar(mag, theta)), gamma

    def recurrence(self, u, h0=None):
        """The recurrence as written, one step at a time. u (B, D, L) real, h0 (B, D, N) complex or None ->
        Re(gamma . h_t) (B, D, L) and the last state h_L (B, D, N)."""
        B, D, L = u.shape
        p, q, gamma = self.coeffs()
        p, q = p[..., 0], q[..., 0]                                          # (D, N)
        h = torch.zeros(B, D, self.ndim, dtype=torch.complex64, device=u.device) if h0 is None else h0
        ys = []
        for t in range(L):
            h = p * u[:, :, t, None] + q * h                                 # h_t = p x_t + q h_{t-1}
            ys.append((gamma * h).sum(-1).real)                              # Re(gamma . h_t)
        return torch.stack(ys, -1), h

    def kernel(self, L):
        """The impulse response of each channel over L steps, (D, L): y_t = sum_j K_j x_{t-j} + omega x_t, so an
        input impulse at step 0 comes out as K (plus omega at t = 0). Decays as |q|^j, oscillates at the n theta."""
        with torch.no_grad():
            p, (mag, theta), gamma = self.coeffs(polar=True)
            return impulse_response(L, p, mag, theta, gamma)

    def forward(self, x, h0=None, impl="fft", want_state=False, backend="auto"):
        # x: (B, L, D), h0: (B, D, N) complex or None -> y (B, L, D), h_L (B, D, N) complex or None
        with torch.autocast(x.device.type, enabled=False):                  # complex math stays in fp32
            if self.cp is not None:  # context parallel (LASP-2): the slice from 0 gives S_r; with P_r = q^L, H_r
                L = x.shape[1]
                _, S = self._forward(x, None, impl, True, backend)
                _, (mag, theta), _ = self.coeffs(polar=True)
                h0 = self.cp.incoming_state(torch.polar(mag ** L, theta * L).squeeze(-1), S)
            return self._forward(x, h0, impl, want_state, backend)

    def _forward(self, x, h0, impl, want_state, backend):
        B, L, D = x.shape
        u = x.float().transpose(1, 2)                                        # (B, D, L)
        if impl == "sequential":
            y, h_last = self.recurrence(u, h0)
            h_last = h_last if want_state else None
        elif impl == "scan":                                                 # speed paths: end of the file
            y, h_last = cema_scan(self, u, h0, want_state, backend)
        else:
            y, h_last = cema_fft(self, u, h0, want_state)
        y = y + self.omega.float().unsqueeze(-1) * u                         # + omega x_t
        f = cema_flops(B, L, D, self.ndim, impl)                             # FLOPs outside matmuls: kernels' tally
        kernels.add_flops(f)
        if y.requires_grad:
            y.register_hook(lambda g: kernels.add_flops(2 * f))
        return y.transpose(1, 2), h_last


# ----- Sec. 3.2: timestep normalization ------------------------------------------------------------------------
def welford_merge(a, b):
    """Merge two sets of statistics (count, mean, M2) -- Chan et al.'s pairwise form, stable and associative."""
    (na, ma, m2a), (nb, mb, m2b) = a, b
    n = na + nb
    d = mb - ma
    frac = nb / n.clamp_min(1e-12)
    return n, ma + d * frac, m2a + m2b + d * d * na * frac


def welford_sequential(n, mean, m2, start=None):
    """Cumulative statistics along dim 1 (time), one merge per step. n, mean, m2 (B, L, G): each step's own
    statistics; start: statistics (B, 1, G) of earlier steps or None -> the statistics of steps <= t, (B, L, G)."""
    acc = start if start is not None else tuple(torch.zeros_like(t[:, :1]) for t in (n, mean, m2))
    out = []
    for t in range(n.shape[1]):
        acc = welford_merge(acc, (n[:, t:t + 1], mean[:, t:t + 1], m2[:, t:t + 1]))
        out.append(acc)
    return tuple(torch.cat(s, 1) for s in zip(*out))


class TimestepNorm(nn.Module):
    """Group norm whose mean/variance at step t are those of all positions <= t in the group (population var).
    State (carried between calls): count (B,) in time steps, mean (B, G), var (B, G)."""
    cp = None   # context_parallel.CPGroup: set by train.py --context_parallel N

    def __init__(self, dim, groups, eps=1e-5, impl="scan"):
        super().__init__()
        self.dim, self.groups, self.eps, self.impl = dim, groups, eps, impl
        self.weight = nn.Parameter(torch.zeros(dim))                        # used as (1 + weight)
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x, state=None):
        # x: (B, L, D) -> y (B, L, D), new state
        B, L, D = x.shape
        if self.cp is not None:                 # context parallel: the statistics of the earlier ranks' positions
            state = self.cp.timestep_state(x, self.groups)
        xg = x.float().view(B, L, self.groups, D // self.groups)
        step_mean = xg.mean(-1)                                              # (B, L, G) statistics of one step
        step_m2 = (xg - step_mean.unsqueeze(-1)).square().mean(-1)          # its population variance = M2 in steps
        # cumulative (count, mean, M2) over steps <= t, merged after the carried state (Welford: stable)
        if self.impl == "sequential":
            start = None
            if state is not None:
                c0, mu0, var0 = state
                c0 = c0.float().view(B, 1, 1).expand(B, 1, self.groups)
                start = (c0, mu0.unsqueeze(1), var0.unsqueeze(1) * c0)
            n, mean, m2 = welford_sequential(torch.ones_like(step_mean), step_mean, step_m2, start)
        else:                                                                # speed path: end of the file
            n, mean, m2 = welford_prefix(torch.ones_like(step_mean), step_mean, step_m2)
            if state is not None:
                c0, mu0, var0 = state
                c0 = c0.float().view(B, 1, 1).expand_as(n)
                n, mean, m2 = welford_merge((c0, mu0.unsqueeze(1), var0.unsqueeze(1) * c0), (n, mean, m2))
        var = m2 / n
        y = (xg - mean.unsqueeze(-1)) * torch.rsqrt(var.unsqueeze(-1) + self.eps)
        y = y.view(B, L, D) * (1 + self.weight.float()) + self.bias.float()
        return y.to(x.dtype), (n[:, -1, 0], mean[:, -1], var[:, -1])


class LayerNormStateless(nn.LayerNorm):
    """Ablation: per-token LayerNorm in place of timestep norm (same call signature, no state)."""

    def forward(self, x, state=None):
        return super().forward(x), None


# ----- Sec. 3.3: normalized attention within chunks, rotary positions reset per chunk --------------------------
def rotary(x, pos, base):
    # x: (B, L, H, d), pos: (L,) positions inside the chunk -> x rotated by pos * base^(-2i/d), pairs interleaved
    d = x.shape[-1]
    freqs = 1.0 / base ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    rot = torch.polar(torch.ones(1, device=x.device), pos.float().unsqueeze(1) * freqs)       # (L, d/2)
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], d // 2, 2).contiguous())
    return torch.view_as_real(xc * rot.unsqueeze(1)).flatten(-2).to(x.dtype)


def chunk_attention(q, k, v, c, base):
    """Softmax attention inside each chunk of c positions (block-diagonal, causal): linear in L at fixed c.
    q, k: (B, L, H, dz), v: (B, L, H, dv) -> (B, L, H, dv). Scores are q.k (scale folded into q, k)."""
    B, L, H, dz = q.shape
    c = min(c, L)
    pad = (-L) % c
    if pad:                                                                   # pad the last chunk at the end
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
    Lp = L + pad
    pos = torch.arange(Lp, device=q.device) % c                               # rotary positions restart per chunk
    q, k = rotary(q, pos, base), rotary(k, pos, base)
    split = lambda t: t.reshape(B * (Lp // c), c, H, t.shape[-1]).transpose(1, 2)    # (B * nc, H, c, d)
    o = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True, scale=1.0)
    return o.transpose(1, 2).reshape(B, Lp, H, -1)[:, :L]


class MovingAverageGatedAttention(nn.Module):
    """One Megalodon attention layer: timestep norm -> CEMA -> RMSNorm -> shared z -> q, k; v; gate r;
    chunk-wise attention; H = W_h1 mx + W_h2 (o * r); returns X + H."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        D, H = cfg.d_model, cfg.n_heads
        self.dz, self.dv = cfg.z_dim // H, cfg.v_dim // H
        self.timenorm = (TimestepNorm(D, cfg.norm_groups, cfg.norm_eps, cfg.norm_impl) if cfg.timestep_norm
                         else LayerNormStateless(D, eps=cfg.norm_eps))
        self.cema = CEMA(D, cfg.cema_ndim, cfg.cema_complex) if cfg.use_cema else None
        self.rmsnorm = nn.RMSNorm(D, eps=cfg.norm_eps)
        self.wz = nn.Linear(D, cfg.z_dim)
        self.wv = nn.Linear(D, cfg.v_dim)
        self.wr = nn.Linear(D, cfg.v_dim)
        self.wh1 = nn.Linear(D, D)
        self.wh2 = nn.Linear(cfg.v_dim, D, bias=False)
        self.qk_gamma = nn.Parameter(torch.zeros(2, cfg.z_dim))                # per-channel scale (used as 1 + gamma)
        self.qk_beta = nn.Parameter(torch.zeros(2, cfg.z_dim))                 # per-channel offset
        for lin in (self.wz, self.wv, self.wr, self.wh1):
            nn.init.zeros_(lin.bias)

    def forward(self, x, cache=None):
        # x: (B, L, D) -> (B, L, D), new cache (None when cache is None)
        cfg, (B, L, _) = self.cfg, x.shape
        state = cache or {}
        # Sec. 3.2: X_hat = TimestepNorm(X)
        xn, norm_state = self.timenorm(x, state.get("norm"))
        # Sec. 3.1: M' = CEMA(X_hat); mx = RMSNorm(M')
        h_last = None
        if self.cema is not None:
            m, h_last = self.cema(xn, state.get("h"), impl=cfg.cema_impl, want_state=cache is not None,
                                  backend=cfg.scan_backend)
        else:
            m = xn
        mx = self.rmsnorm(m)
        # Sec. 3.3: shared representation z, normalized per head, then q, k = z * (gamma + 1) / sqrt(dz) + beta
        z = self.wz(mx).view(B, L, cfg.n_heads, self.dz)
        if cfg.normalized_attention:
            z = F.rms_norm(z, (self.dz,), eps=cfg.norm_eps).view(B, L, cfg.z_dim)
            g = (self.qk_gamma + 1.0) / math.sqrt(self.dz)
        else:
            z = z.view(B, L, cfg.z_dim)
            g = (self.qk_gamma + 1.0) / self.dz ** 0.25                        # q.k scaled by 1/sqrt(dz) overall
        v = F.silu(self.wv(xn)).view(B, L, cfg.n_heads, self.dv)             # V from X_hat
        q = (z * g[0] + self.qk_beta[0]).view(B, L, cfg.n_heads, self.dz).to(v.dtype)
        k = (z * g[1] + self.qk_beta[1]).view(B, L, cfg.n_heads, self.dz).to(v.dtype)
        r = F.silu(self.wr(mx))                                               # gate R from mx
        if cache is None:
            o = chunk_attention(q, k, v, cfg.chunk_size, cfg.rope_base)
            new_cache = None
        else:                                                                 # streaming decoding (below)
            o, kv = cached_chunk_attention(q, k, v, state.get("kv"), state["pos"], cfg.chunk_size, cfg.rope_base)
            new_cache = {"norm": norm_state, "h": h_last, "kv": kv, "pos": state["pos"] + L}
        h = self.wh1(mx) + self.wh2(o.reshape(B, L, cfg.v_dim) * r)          # H = W_h1 M' + W_h2 (O * R)
        return x + h, new_cache


# ----- Sec. 3.4: normalized FFN with the two-hop residual ------------------------------------------------------
class NormalizedFFN(nn.Module):
    def __init__(self, cfg: Config, layer_id: int):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.fc1 = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.fc3 = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False) if cfg.swiglu else None
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)
        self.alpha = nn.Parameter(torch.full((cfg.d_model,), 0.1 * 0.5 ** layer_id)) if cfg.rescale_nffn else None

    def forward(self, y, residual):
        # y: (B, L, D) attention output, residual: (B, L, D) -> (B, L, D)
        x = self.norm(y)
        hidden = F.silu(self.fc1(x)) * self.fc3(x) if self.fc3 is not None else F.silu(self.fc1(x))
        out = self.fc2(hidden)
        return (out if self.alpha is None else self.alpha * out) + residual


class MegalodonBlock(nn.Module):
    def __init__(self, cfg: Config, layer_id: int):
        super().__init__()
        self.two_hop = cfg.two_hop_residual
        self.mega = MovingAverageGatedAttention(cfg)
        self.nffn = NormalizedFFN(cfg, layer_id)

    def forward(self, x, cache=None):
        # x: (B, L, D) -> (B, L, D).  Two-hop: Y = FFN(Norm(Y_hat)) + X, Y_hat = X + H
        y, cache = self.mega(x, cache)
        return self.nffn(y, x if self.two_hop else y), cache


# ----- the language model ----------------------------------------------------------------------------------------
class Megalodon(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        std = cfg.d_model ** -0.5                       # embedding and output layer: truncated N(0, 1/D) within 3 std
        nn.init.trunc_normal_(self.embed.weight, std=std, a=-3 * std, b=3 * std)
        self.layers = nn.ModuleList(MegalodonBlock(cfg, i) for i in range(cfg.n_layers))
        self.final_norm = (TimestepNorm(cfg.d_model, cfg.norm_groups, cfg.norm_eps, cfg.norm_impl) if cfg.timestep_norm
                           else LayerNormStateless(cfg.d_model, eps=cfg.norm_eps))
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.share_emb:
            self.lm_head.weight = self.embed.weight
        else:
            nn.init.trunc_normal_(self.lm_head.weight, std=std, a=-3 * std, b=3 * std)
        # official init_mode "he": kaiming_normal_(a=sqrt(5)) = N(0, 1/(3 fan_in)), biases zero; "torch" keeps
        # nn.Linear's default uniform init (same std, a uniform shape)
        if cfg.init_mode == "he":
            for layer in self.layers:
                for m in layer.modules():
                    if isinstance(m, nn.Linear):
                        nn.init.kaiming_normal_(m.weight, a=math.sqrt(5))

    def forward_tokens(self, idx, cache=None):
        # idx: (B, T) -> logits (B, T, V), new cache (or None)
        x = self.embed(idx)
        if self.cfg.scale_emb:
            x = x * math.sqrt(self.cfg.d_model)
        new = None if cache is None else {"layers": [], "norm": None}
        for i, layer in enumerate(self.layers):
            x, c = layer(x, None if cache is None else cache["layers"][i])
            if cache is not None:
                new["layers"].append(c)
        x, norm_state = self.final_norm(x, None if cache is None else cache["norm"])
        if cache is not None:
            new["norm"] = norm_state
        return self.lm_head(x), new

    def forward(self, batch):
        # batch["tokens"], ["targets"]: (B, T) -> logits (B, T, V), loss (mean CE in nats), parts
        idx, targets = batch["tokens"], batch["targets"]
        check_batch(self.cfg, batch)
        logits, _ = self.forward_tokens(idx)
        ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="none")
        mask = (targets.flatten() != -1).float()
        loss = (ce * mask).sum() / mask.sum().clamp_min(1)
        parts = {}
        tm = batch.get("target_modality", torch.zeros_like(targets)).flatten()
        for m, name in enumerate(self.cfg.modality_names[:self.cfg.n_modalities]):
            sel = mask * (tm == m).float()
            if sel.sum() > 0:
                parts[f"loss_{name}"] = ((ce * sel).sum() / sel.sum()).detach()
        return logits, loss, parts

    # --- streaming decoding: per layer, the current chunk's keys/values, the CEMA state and the timestep-norm
    # statistics, so the cache does not grow with the sequence (unlimited context) -----------------------------
    def init_cache(self):
        return {"layers": [{"pos": 0} for _ in self.layers], "norm": None}

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=0.0):
        """idx (B, T) -> (B, T + max_new_tokens). Greedy when temperature == 0; may run past cfg.seq_len."""
        check_tokens(self.cfg, idx, limit=False)
        c, cache, pos = self.cfg.chunk_size, self.init_cache(), 0
        while pos < idx.shape[1]:                                            # prefill chunk-aligned pieces
            n = min(c - pos % c, idx.shape[1] - pos)
            logits, cache = self.forward_tokens(idx[:, pos:pos + n], cache)
            pos += n
        out = [idx]
        for i in range(max_new_tokens):
            last = logits[:, -1].float()
            if temperature > 0:
                nxt = torch.multinomial(F.softmax(last / temperature, -1), 1)
            else:
                nxt = last.argmax(-1, keepdim=True)
            out.append(nxt)
            if i + 1 < max_new_tokens:
                logits, cache = self.forward_tokens(nxt, cache)
        return torch.cat(out, 1)


def cached_chunk_attention(q, k, v, cache, start, c, base):
    """chunk_attention for the new positions start..start+L-1 (B, L, H, d), given cache = (k, v) of positions
    chunk_start..start-1 (already rotated). Returns o and the new cache, which keeps only the keys of the chunk
    that the next position falls in (memory bounded by c)."""
    B, L, H, _ = q.shape
    pos = start + torch.arange(L, device=q.device)
    q, k = rotary(q, pos % c, base), rotary(k, pos % c, base)
    k_all, v_all = (torch.cat([cache[0], k], 1), torch.cat([cache[1], v], 1)) if cache is not None else (k, v)
    kstart = start - k_all.shape[1] + L
    kpos = kstart + torch.arange(k_all.shape[1], device=q.device)
    mask = (kpos[None, :] <= pos[:, None]) & (kpos[None, :] // c == pos[:, None] // c)       # (L, Lk)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2),
                                       attn_mask=mask, scale=1.0).transpose(1, 2)
    keep = max(((start + L) // c) * c - kstart, 0)                            # first index of the next chunk's keys
    return o, (k_all[:, keep:], v_all[:, keep:])


# ==== Speed paths: same results as the plain forms above, faster (tests/test_megalodon.py holds them equal) ====
def impulse_response(L, p, mag, theta, gamma):
    """K_j = Re sum_n p_n gamma_n q_n^j, j < L -> (D, L); built in real arithmetic (no complex exp):
    Re(c q^j) = |q|^j (Re c cos(j theta) - Im c sin(j theta))."""
    j = torch.arange(L, device=mag.device, dtype=torch.float32)
    c = p * gamma.unsqueeze(-1)                                          # (D, N, 1) complex
    ang = theta * j                                                      # (D, N, L)
    return (mag ** j * (c.real * torch.cos(ang) - c.imag * torch.sin(ang))).sum(1)


def cema_fft(cema, u, h0, want_state):
    """CEMA as a causal FFT convolution with the impulse response K (the official computation), plus the carried
    state's term Re sum_n gamma_n q_n^{t+1} h0. u (B, D, L) -> Re(gamma . h_t) (B, D, L), h_L or None."""
    B, D, L = u.shape
    p, (mag, theta), gamma = cema.coeffs(polar=True)
    k = impulse_response(L, p, mag, theta, gamma)                        # (D, L)
    n = 2 * L
    y = torch.fft.irfft(torch.fft.rfft(u, n) * torch.fft.rfft(k, n), n)[..., :L]
    j = torch.arange(L + 1, device=u.device, dtype=torch.float32)
    h_last = None
    if h0 is not None or want_state:
        vander = torch.polar(mag ** j, theta * j)                        # (D, N, L + 1): q^j
    if h0 is not None:                                                   # carried state: + Re sum gamma q^{t+1} h0
        y = y + ((gamma * h0).unsqueeze(-1) * vander[:, :, 1:]).sum(2).real
    if want_state:                                                       # h_L = q^L h0 + sum_j p q^{L-1-j} x_j
        w = (p * vander[..., :L].flip(-1))                               # (D, N, L)
        h_last = (w.unsqueeze(0) * u.unsqueeze(2)).sum(-1)              # (B, D, N) complex
        if h0 is not None:
            h_last = h_last + vander[..., L] * h0
    return y, h_last


def cema_scan(cema, u, h0, want_state, backend):
    """CEMA's recurrence as one kernels.linear_scan over time (Triton on CUDA, torch on CPU); it materializes the
    (B, D, N, L) complex state. u (B, D, L) -> Re(gamma . h_t) (B, D, L), h_L or None."""
    B, D, L = u.shape
    p, (mag, theta), gamma = cema.coeffs(polar=True)
    q = torch.polar(mag, theta)
    b = (p * u.unsqueeze(2)).to(torch.complex64)                         # (B, D, N, L)
    a = q.expand(B, D, cema.ndim, L)
    h = kernels.linear_scan(a, b, h0, backend=backend)                   # (B, D, N, L) complex
    y = (gamma.unsqueeze(-1) * h).sum(2).real                            # Re(gamma . h_t)
    return y, (h[..., -1] if want_state else None)


def cema_flops(B, L, D, N, impl="fft"):
    """Analytic FLOPs of one CEMA forward on (B, L, D) without a carried state, added to kernels' tally (a backward
    counts 2x its forward, kernels.py's convention). All paths: omega x_t + y_t, 2 per (B, D, L).
      fft:  3 real FFTs of length n = 2L per (row, channel) -- rfft(x), irfft(product) -- and 1 per channel for
            rfft(K), at 5 n log2 n each (the usual count); the complex product, 6 per (B, D, bin) for n/2 + 1
            bins; building K, 5 per (D, N, step): D (2B + 1) 5 n log2 n + 6 B D (n/2 + 1) + 5 D N L + 2 B D L.
      scan: p x_t, 1 per (B, D, N, L), and the read-out Re(gamma . h_t), 4 per (B, D, N, L): 5 B D N L + 2 B D L;
            kernels.linear_scan counts the recurrence itself (16 per complex element).
      sequential: the scan's count plus its recurrence, 16 per (B, D, N, L).
    Not counted: decoding's carried-state terms (h0, want_state) and transcendental ops (sigmoid, cos, pow)."""
    n = 2 * L
    if impl == "scan":
        return 5 * B * D * N * L + 2 * B * D * L
    if impl == "sequential":
        return 21 * B * D * N * L + 2 * B * D * L
    return int(D * (2 * B + 1) * 5 * n * math.log2(n)) + 6 * B * D * (n // 2 + 1) + 5 * D * N * L + 2 * B * D * L


def welford_prefix(n, mean, m2):
    """welford_sequential in log2(L) vectorised steps (Hillis-Steele scan; the merge is associative)."""
    L, off = n.shape[1], 1
    while off < L:
        shifted = [torch.cat([torch.zeros_like(t[:, :off]), t[:, :-off]], 1) for t in (n, mean, m2)]
        n, mean, m2 = welford_merge(shifted, (n, mean, m2))
        off *= 2
    return n, mean, m2


# ---- input checks ------------------------------------------------------------------------------------------------
def check_tokens(cfg, idx, limit=True):
    if not isinstance(idx, torch.Tensor) or idx.dtype != torch.long or idx.dim() != 2:
        raise ValueError("tokens must be an int64 tensor of shape (B, T); convert with .long() and add a batch dim")
    if idx.shape[1] == 0:
        raise ValueError("tokens are empty (T = 0); pass at least one token")
    if limit and idx.shape[1] > cfg.seq_len:
        raise ValueError(f"sequence length {idx.shape[1]} > cfg.seq_len={cfg.seq_len}; "
                         "raise --seq_len or use generate() for unlimited streaming")
    if idx.numel() and (idx.min() < 0 or idx.max() >= cfg.vocab_size):
        raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}); check the data or vocab_size")


def check_batch(cfg, batch):
    check_tokens(cfg, batch["tokens"])
    if "modality" in batch and batch["modality"].numel() and int(batch["modality"].max()) >= cfg.n_modalities:
        raise ValueError(f"modality ids must be < n_modalities={cfg.n_modalities}; check the data setting")


MODELS = {"megalodon": (Config, Megalodon, "bytes", dict())}
SUPPORTED_SETTINGS = {"megalodon": ("bytes", "text")}   # one token stream; train.py refuses others


if __name__ == "__main__":
    torch.manual_seed(0)
    cfg = Config(seq_len=512, chunk_size=128)
    model = Megalodon(cfg)
    print(f"megalodon: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{cfg.seq_len // cfg.chunk_size} chunks of {cfg.chunk_size}")
    tokens = torch.randint(0, 256, (2, cfg.seq_len + 1))
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(5):
        logits, loss, parts = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"step {step} | loss {loss.item():.3f} nats | bpb {loss.item() / math.log(2):.3f}")
    print("logits", tuple(logits.shape), "| generated:", model.generate(tokens[:, :8], 8)[0, 8:].tolist())
