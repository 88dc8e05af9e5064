"""Mixture-of-Mamba: Enhancing Multi-Modal State-Space Models with Modality-Aware Sparsity
Liang, Shen, Zhang, Dong, Zettlemoyer, Yu (2025) -- https://arxiv.org/abs/2501.16295
Baseline: Mamba, Gu & Dao (2023) -- https://arxiv.org/abs/2312.00752

Mamba is a selective state-space model: every token updates a per-channel state h with an input-dependent step
size Delta and input-dependent B, C (the "selective scan"). Mixture-of-Mamba (MoM) gives each modality (text,
image, speech) its own copy of the block's projections in_proj, x_proj, dt_proj and out_proj, picked by each token's
modality id, while the causal conv1d, A, D and the norms stay shared. Each token runs exactly one copy, so MoM adds
capacity at the FLOPs of the dense Mamba.

Glossary (paper -> code)
    modality m = 1..M              -> ids 0..M-1 (batch["modality"]); cfg.n_modalities, cfg.modality_names
    W_in^m, W_x^m, W_dt^m, W_out^m -> weights[m] of the ModalityLinear in_proj, x_proj, dt_proj, out_proj
    x, z (Mamba Fig. 3)            -> xs, z = in_proj(u).chunk(2)
    Delta, B, C                    -> dt, Bm, Cm = x_proj(x); Delta = softplus(dt_proj(dt)), dt bias per modality
    A = -exp(A_log), D             -> MoMMixer.A_log, MoMMixer.D (shared; S4D-real init A_n = -(n + 1))
    h_t = exp(Delta A) h_{t-1} + Delta B x_t;  y_t = C h_t + D x_t  -> kernels.selective_scan, MoMMixer.step
    N, d_conv, E, R                -> cfg.d_state, cfg.d_conv, cfg.expand, cfg.dt_rank
    decoupling ablation            -> cfg.split_in_proj, split_x_proj, split_dt_proj, split_out_proj
                                      (all True: MoM; all False: exactly Mamba; registered as mom-in, -x, -dt, -out)

Departures from the official code (Weixin-Liang/Mixture-of-Mamba, MixtureOfMamba.py), on purpose:
  * dt bias: there, with dt_proj not split, the shared dt bias is silently dropped. Here dt_proj always holds the
    bias and the scan gets none, so it is added exactly once in every configuration (tested).
  * Decoding: there `step` is called but not defined. Here MoMMixer.step runs the recurrence with a
    (conv_state, ssm_state) cache, O(1) per token, and generation equals the parallel forward (tested).
  * Routing: the plain form (cfg.routing = "masked") picks each modality's tokens with a boolean mask, as the
    official code does; the default sorts the tokens by modality once per forward and runs every split projection
    as one kernels.grouped_matmul (a speed path at the end of the file, tested equal).
Left out: the fused CUDA mamba_inner_fn (kernels.selective_scan is the one scan: Triton on GPU, torch on CPU; its
plain sequential form is kernels.selective_scan_ref), the paper's 1.4B scale and its data (toy data from data.py).
Mamba is causal, so images stay causal too (as in the paper's Transfusion setting): forward_hidden ignores the
bidirectional image mask transfusion.py hands it.

Run:  python train.py --compare mamba,mom --setting chameleon     (or --setting speech)
      python train.py --compare mamba,mom-in,mom-out,mom           (the decoupling ablation)
      python mom.py                                                 (a demo: parameters, loss, generation)
Read first: moma.py.  Read next: transfusion.py (uses this file as a backbone).
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
    # filled in by the trainer from data.make_data(...).model_fields()
    vocab_size: int = 512
    n_modalities: int = 2
    seq_len: int = 256
    modality_offsets: tuple = (0, 256)  # first token id of each modality (for generate)
    modality_names: tuple = ("text", "image")  # loss names (loss_<name>); unnamed modalities: "modality<m>"
    # Mamba block (Gu & Dao 2023, Sec. 3.4); the official defaults except the toy size. Two Mamba blocks hold about
    # the parameters of one Transformer block, so 4 x 64 matches mot.py's dense default (2 x 64) in parameters.
    d_model: int = 64
    n_layer: int = 4
    d_state: int = 16           # N
    d_conv: int = 4             # width of the causal depthwise conv1d
    expand: int = 2             # E: d_inner = E * d_model
    dt_rank: int = 0            # R; 0 means "auto" = ceil(d_model / 16)
    dt_min: float = 0.001       # softplus(dt bias) starts log-uniform in [dt_min, dt_max]
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_scale: float = 1.0
    conv_bias: bool = True
    bias: bool = False          # bias of in_proj / out_proj
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    # Mixture-of-Mamba (Fig. 1): per-modality copies of each projection, decoupled one by one in the ablation
    split_in_proj: bool = True
    split_x_proj: bool = True
    split_dt_proj: bool = True
    split_out_proj: bool = True
    routing: str = "grouped"    # "masked": the plain form (a boolean mask per modality); "grouped": the speed path
    backend: str = "auto"       # kernels backend for the scan and the grouped matmul: auto | torch | triton
    # valid values, one rule per field ("int >= 1", "one of a|b", ...; after ";" a note): checked when built
    RANGES: ClassVar[dict] = dict(
        vocab_size="int >= 1", n_modalities="int >= 1", seq_len="int >= 8", modality_offsets="ints >= 0",
        modality_names="names", d_model="int >= 1", n_layer="int >= 1", d_state="int >= 1",
        d_conv="int >= 1; <= seq_len",
        expand="int >= 1", dt_rank="int >= 0; 0 = ceil(d_model / 16)", dt_min="float > 0", dt_max="float > 0",
        dt_init_floor="float >= 0", dt_scale="float > 0", conv_bias="bool", bias="bool", norm_eps="float in (0, 1)",
        tie_embeddings="bool", split_in_proj="bool", split_x_proj="bool", split_dt_proj="bool", split_out_proj="bool",
        routing="one of grouped|masked", backend="one of auto|torch|triton")

    def __post_init__(self):
        if self.dt_rank == 0:
            self.dt_rank = math.ceil(self.d_model / 16)
        self.modality_offsets = tuple(self.modality_offsets)
        if self.d_conv > self.seq_len:
            raise ValueError(f"d_conv={self.d_conv} > seq_len={self.seq_len}: the causal conv's taps past the sequence "
                             f"only ever multiply its zero padding; use --d_conv <= {self.seq_len} (Mamba: 4)")
        if len(self.modality_offsets) != self.n_modalities:
            raise ValueError(f"modality_offsets {self.modality_offsets} has {len(self.modality_offsets)} entries "
                             f"but n_modalities={self.n_modalities}; give one first token id per modality")
        if len(set(self.modality_names)) != len(self.modality_names):
            raise ValueError(f"modality_names={self.modality_names} must be distinct")

    @property
    def names(self):  # one per modality: modality_names, "modality<m>" for any it does not name
        return tuple(self.modality_names[m] if m < len(self.modality_names) else f"modality{m}"
                     for m in range(self.n_modalities))

    @property
    def d_inner(self):
        return self.expand * self.d_model


# --- MoM (Fig. 1): a projection with one copy per modality, picked by each token's modality id -------------------

class Route:
    """The modality id of every token, flattened once per forward and shared by every split projection.
    routing="grouped" also sorts the tokens by modality here, once (for the speed path, grouped_linear)."""

    def __init__(self, modality, n_modalities, routing="grouped"):
        self.modality, self.order = modality.reshape(-1), None                 # (N,)
        if routing == "grouped":
            self.order, self.group_sizes = kernels.sort_by_group(self.modality, n_modalities)
            self.inverse = torch.argsort(self.order)    # a permutation's argsort is its inverse: unsort = a gather


class ModalityLinear(nn.Module):
    """y_t = x_t W^{m_t} (+ b^{m_t}), m_t = the modality of token t. split=False: one W shared by all (Mamba)."""

    def __init__(self, d_in, d_out, n_modalities, split, bias=False, backend="auto"):
        super().__init__()
        self.split, self.backend = split, backend
        n = n_modalities if split else 1
        bound = 1.0 / math.sqrt(d_in)  # nn.Linear's default init, drawn independently for each modality
        self.weights = nn.ParameterList([nn.Parameter(torch.empty(d_in, d_out).uniform_(-bound, bound))
                                         for _ in range(n)])            # weights[m]: (d_in, d_out)
        self.biases = nn.ParameterList([nn.Parameter(torch.zeros(d_out)) for _ in range(n)]) if bias else None

    def forward(self, x, route):
        # x: (N, d_in) tokens in time order; route: the Route of these N tokens (None if nothing is split) -> (N, d_out)
        if not self.split:                                  # Mamba: one weight for every token
            y = x @ self.weights[0]
            return y + self.biases[0] if self.biases is not None else y
        if route.order is not None:                         # routing="grouped": the speed path (end of file)
            return grouped_linear(self, x, route)
        # MoM: the tokens of modality m, picked by a boolean mask, go through the m-th copy
        y = x.new_zeros(x.shape[0], self.weights[0].shape[1])
        for m, w in enumerate(self.weights):
            rows = route.modality == m                                        # (N,) bool
            y_m = x[rows] @ w if self.biases is None else x[rows] @ w + self.biases[m]
            y[rows] = y_m.to(y.dtype)
        return y


# --- The Mamba block (Mamba Sec. 3.4, Fig. 3) with MoM's split projections ---------------------------------------

class MoMMixer(nn.Module):
    cp = None   # context_parallel.CPGroup: set by train.py --context_parallel N (each rank holds a slice of T)

    def __init__(self, cfg: Config):
        super().__init__()
        d, di, N, R, M = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.dt_rank, cfg.n_modalities
        self.cfg = cfg
        self.in_proj = ModalityLinear(d, 2 * di, M, cfg.split_in_proj, bias=cfg.bias, backend=cfg.backend)  # -> x, z
        # shared across modalities: the causal depthwise conv, A and D
        self.conv1d = nn.Conv1d(di, di, cfg.d_conv, groups=di, padding=cfg.d_conv - 1, bias=cfg.conv_bias)
        self.x_proj = ModalityLinear(di, R + 2 * N, M, cfg.split_x_proj, backend=cfg.backend)  # -> dt, B, C
        # dt_proj holds the dt bias whether split or not, so it is added exactly once (the scan gets none)
        self.dt_proj = ModalityLinear(R, di, M, cfg.split_dt_proj, bias=True, backend=cfg.backend)
        self.out_proj = ModalityLinear(di, d, M, cfg.split_out_proj, bias=cfg.bias, backend=cfg.backend)
        # Mamba Sec. 3.6 / App.: dt_proj weight uniform(+-R^-0.5); each modality's bias = softplus^-1(dt),
        # dt log-uniform in [dt_min, dt_max]
        std = R ** -0.5 * cfg.dt_scale
        for w, b in zip(self.dt_proj.weights, self.dt_proj.biases):
            nn.init.uniform_(w.data, -std, std)
            dt = torch.exp(torch.rand(di) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
            dt = dt.clamp(min=cfg.dt_init_floor)
            b.data.copy_(dt + torch.log(-torch.expm1(-dt)))                   # inverse softplus
        # S4D-real initialisation: A_n = -(n + 1), stored as A_log (Mamba Sec. 3.6)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(di, 1))  # (di, N)
        self.D = nn.Parameter(torch.ones(di))                                                 # skip
        self.A_log._no_weight_decay = self.D._no_weight_decay = True
        for w in self.out_proj.weights:          # GPT-2 / mamba_ssm: scale residual branches by 1/sqrt(n_layer)
            w.data /= math.sqrt(cfg.n_layer)

    def forward(self, u, route, want_state=False):
        # u: (B, T, d_model) -> (B, T, d_model) [, (conv_state (B, di, d_conv), ssm_state (B, di, N))]
        Bsz, T, _ = u.shape
        di, N, R = self.cfg.d_inner, self.cfg.d_state, self.cfg.dt_rank
        xz = self.in_proj(u.reshape(Bsz * T, -1), route).view(Bsz, T, 2 * di)
        xs, z = xz.transpose(1, 2).chunk(2, dim=1)                          # (B, di, T) each
        # causal depthwise conv: pad d_conv - 1 on both sides, keep the first T outputs
        if self.cp is None:
            x = F.silu(self.conv1d(xs)[..., :T])                             # (B, di, T)
        else:                               # context parallel: + the previous rank's last d_conv - 1 inputs (halo)
            x = F.silu(self.cp.causal_conv1d(xs, self.conv1d.weight, self.conv1d.bias))
        x_dbl = self.x_proj(x.transpose(1, 2).reshape(Bsz * T, di), route)   # (B*T, R + 2N)
        dt, Bm, Cm = x_dbl.split([R, N, N], dim=-1)
        dt = self.dt_proj(dt, route)                                          # (B*T, di), dt bias included
        A = -torch.exp(self.A_log)                                           # (di, N), fp32 param
        # Mamba Eq. 2a-2b with the selective (input-dependent) Delta, B, C (Alg. 2); the SiLU(z) gate fused in
        scan = kernels.selective_scan if self.cp is None else self.cp.selective_scan   # cp: LASP-2 across ranks
        out = scan(
            x, dt.view(Bsz, T, di).transpose(1, 2), A, Bm.view(Bsz, T, N).transpose(1, 2),
            Cm.view(Bsz, T, N).transpose(1, 2), D=self.D, z=z, delta_bias=None, delta_softplus=True,
            return_last_state=want_state, backend=self.cfg.backend)
        y, last = out if want_state else (out, None)                          # y: (B, di, T)
        y = self.out_proj(y.transpose(1, 2).reshape(Bsz * T, di), route).view(Bsz, T, -1)
        if not want_state:
            return y
        conv_state = F.pad(xs, (max(0, self.cfg.d_conv - T), 0))[..., -self.cfg.d_conv:]
        return y, (conv_state, last)

    def step(self, u, route, cache):
        # u: (B, d_model) one token per row; cache: (conv_state (B, di, d_conv), ssm_state (B, di, N))
        # -> (B, d_model), new cache. O(1) in the sequence length.
        conv_state, ssm_state = cache
        N, R = self.cfg.d_state, self.cfg.dt_rank
        xs, z = self.in_proj(u, route).chunk(2, dim=-1)                      # (B, di)
        conv_state = torch.cat([conv_state[..., 1:], xs.unsqueeze(-1)], dim=-1)
        x = (conv_state * self.conv1d.weight[:, 0, :]).sum(-1)
        x = F.silu(x + self.conv1d.bias if self.conv1d.bias is not None else x)
        dt, Bm, Cm = self.x_proj(x, route).split([R, N, N], dim=-1)
        cd = torch.float64 if u.dtype == torch.float64 else torch.float32    # the scan's compute dtype (kernels.py)
        dt, x, Bm, Cm = (t.to(cd) for t in (F.softplus(self.dt_proj(dt, route)), x, Bm, Cm))  # (B, di), ..., (B, N)
        A, ssm_state = -torch.exp(self.A_log.to(cd)), ssm_state.to(cd)
        # h_t = exp(Delta A) h_{t-1} + Delta B x_t ;  y_t = C h_t + D x_t  (A by zero-order hold, Mamba Eq. 4;
        # B by the Euler step Delta B, as in the official kernel and kernels.selective_scan)
        ssm_state = torch.exp(dt.unsqueeze(-1) * A) * ssm_state + (dt * x).unsqueeze(-1) * Bm.unsqueeze(1)
        y = (ssm_state @ Cm.unsqueeze(-1)).squeeze(-1) + self.D.to(cd) * x
        y = (y * F.silu(z)).to(u.dtype)
        return self.out_proj(y, route), (conv_state, ssm_state)


class Block(nn.Module):
    """Pre-norm residual block: u + Mixer(RMSNorm(u)); the norm is shared across modalities, as in MoM."""

    def __init__(self, cfg):
        super().__init__()
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer = MoMMixer(cfg)

    def forward(self, u, route, want_state=False):
        # u: (B, T, d_model) -> (B, T, d_model) [, this layer's cache]
        out = self.mixer(self.norm(u), route, want_state)
        return (u + out[0], out[1]) if want_state else u + out

    def step(self, u, route, cache):
        # u: (B, d_model) -> (B, d_model), new cache
        y, cache = self.mixer.step(self.norm(u), route, cache)
        return u + y, cache


class MoMStack(nn.Module):
    """The residual stack and final norm: the backbone transfusion.py reuses (no embedding, no head)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.norm_f = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.any_split = cfg.split_in_proj or cfg.split_x_proj or cfg.split_dt_proj or cfg.split_out_proj

    def route(self, modality):
        return Route(modality, self.cfg.n_modalities, self.cfg.routing) if self.any_split else None

    def forward(self, x, modality, want_state=False):
        # x: (B, T, d_model), modality: (B, T) -> (B, T, d_model) [, per-layer caches]
        route, caches = self.route(modality), []
        for layer in self.layers:
            if want_state:
                x, c = layer(x, route, True)
                caches.append(c)
            else:
                x = layer(x, route)
        x = self.norm_f(x)
        return (x, caches) if want_state else x

    def step(self, x, modality, caches):
        # x: (B, d_model), modality: (B,) -> (B, d_model), new caches
        route, new = self.route(modality), []
        for layer, c in zip(self.layers, caches):
            x, c = layer.step(x, route, c)
            new.append(c)
        return self.norm_f(x), new

    def empty_cache(self, batch_size, device, dtype=torch.float32):
        cfg, sd = self.cfg, torch.float64 if dtype == torch.float64 else torch.float32  # ssm state: the scan's dtype
        return [(torch.zeros(batch_size, cfg.d_inner, cfg.d_conv, device=device, dtype=dtype),
                 torch.zeros(batch_size, cfg.d_inner, cfg.d_state, device=device, dtype=sd))
                for _ in range(cfg.n_layer)]


# --- The language model (Chameleon / speech settings: one token stream, modality ids from data.py) ---------------

class MixtureOfMamba(nn.Module):
    """Mamba LM with modality-specific projections; with every split_* False it is exactly Mamba."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        self.backbone = MoMStack(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def modality_of(self, idx):
        """Modality of token ids from cfg.modality_offsets (marker tokens are text)."""
        edges = torch.tensor(self.cfg.modality_offsets[1:], device=idx.device, dtype=idx.dtype)
        return torch.bucketize(idx.contiguous(), edges, right=True)

    def forward_hidden(self, x, modality, attn_mask=None):
        """x: (B, T, d_model) embeddings, modality: (B, T) -> (B, T, d_model) after the final norm.
        attn_mask is ignored: Mamba is causal, so inside an image it stays causal (as in the paper)."""
        check_inputs(self.cfg, modality=modality, shape=x.shape[:2])
        return self.backbone(x, modality)

    def forward(self, batch):
        # batch: tokens, modality (B, T) [, targets, target_modality (B, T)] -> logits (B, T, V), loss, loss parts
        tokens, modality = batch["tokens"], batch["modality"]
        check_inputs(self.cfg, tokens, modality, max_len=self.cfg.seq_len)
        h = self.backbone(self.tok_emb(tokens), modality)                    # (B, T, d_model)
        logits = self.lm_head(h)                                             # (B, T, V)
        targets = batch.get("targets")
        if targets is None:
            return logits, None, {}
        ce = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                             ignore_index=-1, reduction="none").view_as(targets)
        mask = targets != -1
        loss = ce.sum() / mask.sum().clamp(min=1)
        parts, tm = {}, batch.get("target_modality", modality)
        for m, name in enumerate(self.cfg.names):
            sel = mask & (tm == m)
            if sel.any():
                parts[f"loss_{name}"] = (ce[sel].sum() / sel.sum()).detach()
        return logits, loss, parts

    # -- recurrent inference: a prefill with the parallel scan, then O(1) steps --
    def prefill(self, idx):
        """idx: (B, T) -> last logits (B, V), per-layer (conv_state, ssm_state) after the prompt."""
        h, caches = self.backbone(self.tok_emb(idx), self.modality_of(idx), want_state=True)
        return self.lm_head(h[:, -1]), caches

    def step(self, idx_t, cache):
        """idx_t: (B,) one new token per row, cache from prefill/step -> logits (B, V), new cache."""
        h, cache = self.backbone.step(self.tok_emb(idx_t), self.modality_of(idx_t), cache)
        return self.lm_head(h), cache

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=0.0):
        """idx: (B, T) prompt -> (B, T + max_new_tokens). Greedy at temperature 0. No length limit: recurrent."""
        check_inputs(self.cfg, idx)
        if idx.shape[1] == 0:
            raise ValueError("generate needs a prompt of at least one token (e.g. BOS)")
        logits, cache = self.prefill(idx)
        for _ in range(max_new_tokens):
            if temperature > 0:
                nxt = torch.multinomial(F.softmax(logits.float() / temperature, dim=-1), 1)[:, 0]
            else:
                nxt = logits.argmax(-1)
            idx = torch.cat([idx, nxt[:, None]], dim=1)
            logits, cache = self.step(nxt, cache)
        return idx


# ==== Speed paths: same results as the plain forms above, faster (tests/test_mom.py holds them equal) =============

def grouped_linear(lin, x, route):
    """ModalityLinear.forward with routing="grouped": the tokens sorted by modality (route.order, once per forward),
    then ONE kernels.grouped_matmul over the M weights, so each token runs its own copy only and the FLOPs counted
    are the FLOPs a token really runs. x: (N, d_in) in time order -> (N, d_out) in time order."""
    w = torch.stack(list(lin.weights)).to(x.dtype)                                 # (M, d_in, d_out)
    y = kernels.grouped_matmul(x.index_select(0, route.order), w, route.group_sizes, backend=lin.backend)
    y = y.index_select(0, route.inverse)                                           # (N, d_out), time order
    if lin.biases is not None:                                                     # each token's bias, by modality
        y = y + F.embedding(route.modality, torch.stack(list(lin.biases)))
    return y


# ==== Input checks: a one-line ValueError instead of a deep traceback ===============================================

def check_inputs(cfg, tokens=None, modality=None, shape=None, max_len=None):
    """tokens, modality: (B, T) int64 ids (either may be None); shape: the (B, T) they must have; max_len: T's cap."""
    if tokens is not None:
        if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.long or tokens.dim() != 2:
            raise ValueError(f"tokens must be a (B, T) int64 tensor, got {getattr(tokens, 'dtype', type(tokens))} "
                             f"{tuple(getattr(tokens, 'shape', ()))}; pass LongTensor ids")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= cfg.vocab_size):
            raise ValueError(f"token ids must be in [0, {cfg.vocab_size}); check the data's vocab_size matches "
                             f"cfg.vocab_size")
        if max_len is not None and tokens.shape[1] > max_len:
            raise ValueError(f"sequence length {tokens.shape[1]} > cfg.seq_len={max_len}; shorten the batch or "
                             f"pass --seq_len")
        shape = tokens.shape
    if modality is not None:
        if modality.dtype != torch.long or modality.shape != shape:
            raise ValueError(f"modality must be int64 of shape {tuple(shape)}, got {modality.dtype} "
                             f"{tuple(modality.shape)}; give one modality id per token")
        if modality.numel() and (int(modality.min()) < 0 or int(modality.max()) >= cfg.n_modalities):
            raise ValueError(f"modality ids must be in [0, {cfg.n_modalities}), got [{int(modality.min())}, "
                             f"{int(modality.max())}]; set n_modalities to match the data")


_SHARED = dict(split_in_proj=False, split_x_proj=False, split_dt_proj=False, split_out_proj=False)
MODELS = {
    "mamba": (Config, MixtureOfMamba, "chameleon", dict(_SHARED)),
    "mom": (Config, MixtureOfMamba, "chameleon", dict()),
    # MoM ablation: decouple one projection at a time ("mom" decouples all four jointly)
    "mom-in": (Config, MixtureOfMamba, "chameleon", dict(_SHARED, split_in_proj=True)),
    "mom-x": (Config, MixtureOfMamba, "chameleon", dict(_SHARED, split_x_proj=True)),
    "mom-dt": (Config, MixtureOfMamba, "chameleon", dict(_SHARED, split_dt_proj=True)),
    "mom-out": (Config, MixtureOfMamba, "chameleon", dict(_SHARED, split_out_proj=True)),
}
# MoM with one modality is Mamba, and the transfusion setting's images are not tokens: train.py refuses those
SUPPORTED_SETTINGS = {name: ("chameleon", "speech") for name in MODELS if name != "mamba"}
SUPPORTED_SETTINGS["mamba"] = ("chameleon", "speech", "text", "bytes")


if __name__ == "__main__":   # the shipped trained MoM: captions -> images, and what its per-modality projections do
    import os
    import data
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "docs", "ckpt", "mom.pt")
    if os.path.isfile(path):
        ck = torch.load(path, map_location="cpu", weights_only=True)     # tensors and plain types only
        cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in ck["config"]["model_cfg"].items()})
        model = MixtureOfMamba(cfg).eval()
        model.load_state_dict({k: v.float() for k, v in ck["model"].items()})   # fp16 on disk
        ds = data.make_data("chameleon", cfg.seq_len, ck["config"]["train"]["seed"])
        ev, run = ck["eval"], ck["run_eval"]
        print(f"Mixture-of-Mamba trained {ck['step']} steps on the chameleon setting ({path}): eval loss "
              f"{ev['eval_loss']:.3f} nats/token (text {ev['eval_loss_text']:.3f}, image {ev['eval_loss_image']:.3f})")
        if "gen_image_acc" in run:
            print(f"the run's generation eval (32 scenes, 4 attributes each): caption -> image "
                  f"{run['gen_image_acc']:.2f} right (chance {run['gen_image_chance']:.2f}), image -> caption "
                  f"{run['caption_acc']:.2f} (chance {run['caption_chance']:.2f})")
        ex = ds.scenes(4, seed=1)                        # fixed scenes, none of them a training row
        torch.manual_seed(0)
        imgs = [data.detokenize_image(model.generate(torch.tensor([[data.BOS] + e["caption"] + [data.BOI]]),
                                                     data.N_PATCHES, 1.0)[0, -data.N_PATCHES:].numpy()) for e in ex]
        print("caption -> image, one recurrent step per token (16 image tokens sampled at temperature 1; "
              "'.' = background, a letter = the colour of the object's pixel):")
        print("\n".join(data.image_lines(ex, imgs)))
        # Each token runs its own modality's in_proj, x_proj, dt_proj, out_proj. Route every token through one
        # modality's copies instead (the conv, A, D and norms are shared anyway) and see what each side has learned.
        b = ds.get_batch("val", 4, 0)
        print("eval loss per modality (nats/token, 4 eval rows) when every token runs the projections of:")
        for what, mod in (("its own modality (MoM)", b["modality"]),
                          ("text, for every token", torch.zeros_like(b["modality"])),
                          ("image, for every token", torch.ones_like(b["modality"]))):
            with torch.no_grad():
                _, loss, parts = model(dict(b, modality=mod))
            print(f"  {what:>24s}: text {parts['loss_text']:.3f}, image {parts['loss_image']:.3f}")
    else:
        print(f"no trained checkpoint at {path}: untrained Mamba and MoM models on random tokens instead")
        torch.manual_seed(0)
        B, T = 2, 64
        for name in ("mamba", "mom"):
            C, Model, _, over = MODELS[name]
            cfg = C(**over)
            model = Model(cfg)
            tokens = torch.randint(0, cfg.vocab_size, (B, T))
            modality = model.modality_of(tokens)
            batch = dict(tokens=tokens, modality=modality, targets=torch.roll(tokens, -1, 1),
                         target_modality=torch.roll(modality, -1, 1))
            logits, loss, parts = model(batch)
            loss.backward()
            n_params = sum(p.numel() for p in model.parameters())
            print(f"{name:6s} params {n_params / 1e6:.3f}M  logits {tuple(logits.shape)}  loss {loss.item():.3f}  "
                  + "  ".join(f"{k} {v.item():.3f}" for k, v in parts.items()))
            out = model.generate(tokens[:, :8], 8)
            print(f"{'':6s} generate: prompt (2, 8) -> {tuple(out.shape)}")
