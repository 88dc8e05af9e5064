"""Mixture-of-Mamba (Liang, Shen, Zhang, Dong, Zettlemoyer, Yu 2025) -- arXiv 2501.16295
beside its baseline, Mamba (Gu & Dao 2023) -- arXiv 2312.00752.

Mamba is a selective state-space model: every token updates a per-channel state h with input-dependent
step size delta and input-dependent B, C (the "selective scan"). Mixture-of-Mamba (MoM) adds
*modality-aware sparsity*: each modality (text, image, speech) gets its own copy of the block's projections
(in_proj, x_proj, dt_proj, out_proj), chosen by the modality id of each token, while the causal conv1d,
the state matrix A, the skip D and the norms stay shared. Compute per token is unchanged (each token runs
exactly one copy), so MoM buys capacity at equal FLOPs -- the paper reports the dense Mamba's loss at
34.76% (Transfusion image), 42.50% / 65.40% (Chameleon image / text) and 24.80% (speech) of the FLOPs.

Glossary (paper -> code)
    modalities m = 1..M     -> cfg.n_modalities, ids 0..M-1 from the data (batch["modality"]); cfg.modality_names
                               names them in the losses (loss_<name>)
    W_in^m, W_x^m, W_dt^m, W_out^m -> ModalityLinear weights[m] of in_proj, x_proj, dt_proj, out_proj
    x, z (Mamba Fig. 3)     -> xs, z = in_proj(u).chunk(2)
    Delta, B, C             -> dt, Bm, Cm (from x_proj; Delta = softplus(dt_proj(dt)) with its own bias per modality)
    A = -exp(A_log), D      -> MoMMixer.A_log, MoMMixer.D (shared, S4D-real init A_n = n + 1)
    h_t = exp(Delta A) h_{t-1} + Delta B x_t;  y_t = C h_t + D x_t     -> kernels.selective_scan / MoMMixer.step
    d_state N, d_conv, expand E, dt_rank R -> cfg.d_state, cfg.d_conv, cfg.expand, cfg.dt_rank

Switches (the MoM ablation "decoupling projection components", one at a time or jointly): cfg.split_in_proj,
split_x_proj, split_dt_proj, split_out_proj. All four True = MoM; all False = exactly the Mamba baseline (a test checks that a one-modality
MoM with Mamba's weights gives Mamba's outputs). Registered names: mamba, mom, mom-in, mom-x, mom-dt, mom-out.

Where this departs from the official code (Weixin-Liang/Mixture-of-Mamba, MixtureOfMamba.py), on purpose:
  * dt bias. There, when dt_proj is not split, dt is computed as `dt_proj.weight @ dt` and the scan is called
    with delta_bias=None, so the shared dt bias (and its careful inverse-softplus init) is silently dropped; when
    dt_proj is split the per-modality nn.Linear adds its bias. Here the bias lives in dt_proj in both cases and the
    scan gets delta_bias=None, so it is applied exactly once in every configuration (tested).
  * Decoding. There, `step` is called but not defined and the cache allocation reads a non-existent out_proj when
    it is split. Here MoMMixer.step runs the recurrence with a (conv_state, ssm_state) cache, O(1) per token, and
    generation equals the parallel forward (tested).
  * Routing. There each projection loops over modalities with boolean masks; here tokens are sorted by modality
    once per forward and every split projection is one kernels.grouped_matmul over the sorted tokens, so the
    FLOPs counted are what a token really runs.
Left out: the fused CUDA mamba_inner_fn (kernels.selective_scan is the one scan, Triton on GPU, torch on CPU);
the paper's 1.4B scale and its real data (toy data from data.py).
Causality: Mamba is causal by construction, so inside an image it stays causal (the paper's Transfusion
setting does the same); forward_hidden ignores the bidirectional-image attention mask it is handed.

Run:  python train.py --compare mamba,mom --setting chameleon        (and --setting speech)
      python train.py --compare mamba,mom-in,mom-out,mom              (the ablation)
Read first: moma.py.  Read next: transfusion.py (uses this file as a backbone; the scan itself is in kernels.py).
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
    # Mixture-of-Mamba (method section, Fig. 1): per-modality copies of each projection (ablated one by one)
    split_in_proj: bool = True
    split_x_proj: bool = True
    split_dt_proj: bool = True
    split_out_proj: bool = True
    backend: str = "auto"       # kernels backend for the scan and the grouped matmul: auto | torch | triton
    # valid values, one rule per field ("int >= 1", "one of a|b", ...; after ";" a note): checked when built
    RANGES: ClassVar[dict] = dict(
        vocab_size="int >= 1", n_modalities="int >= 1", seq_len="int >= 8", modality_offsets="ints >= 0",
        modality_names="names", d_model="int >= 1", n_layer="int >= 1", d_state="int >= 1", d_conv="int >= 1",
        expand="int >= 1", dt_rank="int >= 0; 0 = ceil(d_model / 16)", dt_min="float > 0", dt_max="float > 0",
        dt_init_floor="float >= 0", dt_scale="float > 0", conv_bias="bool", bias="bool", norm_eps="float in (0, 1)",
        tie_embeddings="bool", split_in_proj="bool", split_x_proj="bool", split_dt_proj="bool", split_out_proj="bool",
        backend="one of auto|torch|triton")

    def __post_init__(self):
        if self.dt_rank == 0:
            self.dt_rank = math.ceil(self.d_model / 16)
        self.modality_offsets = tuple(self.modality_offsets)
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


# --- MoM method: modality-specific parameters, routed by the modality id of each token ---------------------

class Route:
    """Tokens sorted by modality once per forward; every split projection reuses the same permutation."""

    def __init__(self, modality, n_modalities):
        self.modality = modality.reshape(-1)                                   # (N,)
        self.order, self.group_sizes = kernels.sort_by_group(self.modality, n_modalities)
        self.inverse = torch.argsort(self.order)        # a permutation's argsort is its inverse: unsort = a gather


class ModalityLinear(nn.Module):
    """y = x W_m (+ b_m), m = the modality of the token. split=False: one W shared by all modalities (Mamba).

    Weights are separate Parameters per modality (weights[m]: (d_in, d_out)); the split path stacks them to
    (M, d_in, d_out) and runs one grouped matmul over the tokens sorted by modality."""

    def __init__(self, d_in, d_out, n_modalities, split, bias=False, backend="auto"):
        super().__init__()
        self.split, self.backend = split, backend
        n = n_modalities if split else 1
        bound = 1.0 / math.sqrt(d_in)  # nn.Linear's default init, drawn independently for each modality
        self.weights = nn.ParameterList([nn.Parameter(torch.empty(d_in, d_out).uniform_(-bound, bound))
                                         for _ in range(n)])
        self.biases = nn.ParameterList([nn.Parameter(torch.zeros(d_out)) for _ in range(n)]) if bias else None

    def forward(self, x, route):
        # x: (N, d_in) tokens in time order; route: Route for these N tokens -> (N, d_out)
        if not self.split:
            y = x @ self.weights[0]
            return y + self.biases[0] if self.biases is not None else y
        w = torch.stack(list(self.weights)).to(x.dtype)                                # (M, d_in, d_out)
        y = kernels.grouped_matmul(x.index_select(0, route.order), w, route.group_sizes, backend=self.backend)
        y = y.index_select(0, route.inverse)                                           # (N, d_out), time order
        if self.biases is not None:                                                    # each token's bias, by modality
            y = y + F.embedding(route.modality, torch.stack(list(self.biases)))
        return y


# --- Mamba block (Gu & Dao Sec. 3.4, Fig. 3) with MoM's split projections (MoM Fig. 1) ---------------------

class MoMMixer(nn.Module):
    cp = None   # context_parallel.CPGroup: set by train.py --context_parallel N (each rank holds a slice of T)

    def __init__(self, cfg: Config):
        super().__init__()
        d, di, N, R, M = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.dt_rank, cfg.n_modalities
        self.cfg = cfg
        self.in_proj = ModalityLinear(d, 2 * di, M, cfg.split_in_proj, bias=cfg.bias, backend=cfg.backend)  # -> x, z
        # shared across modalities: causal depthwise conv, A, D
        self.conv1d = nn.Conv1d(di, di, cfg.d_conv, groups=di, padding=cfg.d_conv - 1, bias=cfg.conv_bias)
        self.x_proj = ModalityLinear(di, R + 2 * N, M, cfg.split_x_proj, backend=cfg.backend)  # -> dt, B, C
        # dt_proj carries the dt bias in BOTH cases, so it is added exactly once (see the docstring)
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
        out = self.mixer(self.norm(u), route, want_state)
        return (u + out[0], out[1]) if want_state else u + out

    def step(self, u, route, cache):
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
        return Route(modality, self.cfg.n_modalities) if self.any_split else None

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


# --- the language model (Chameleon / speech settings: one token stream, modality ids from data.py) ----------

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

    # -- input checks: one-line ValueErrors instead of deep tracebacks --
    def _check(self, tokens, modality=None, check_len=True):
        if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.long or tokens.dim() != 2:
            raise ValueError(f"tokens must be a (B, T) int64 tensor, got "
                             f"{getattr(tokens, 'dtype', type(tokens))} {tuple(getattr(tokens, 'shape', ()))}; "
                             f"pass LongTensor ids")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.cfg.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size}); "
                             f"check the data's vocab_size matches cfg.vocab_size")
        if check_len and tokens.shape[1] > self.cfg.seq_len:
            raise ValueError(f"sequence length {tokens.shape[1]} > cfg.seq_len={self.cfg.seq_len}; "
                             f"shorten the batch or pass --seq_len")
        if modality is not None:
            if modality.shape != tokens.shape:
                raise ValueError(f"modality shape {tuple(modality.shape)} != tokens shape {tuple(tokens.shape)}; "
                                 f"give one modality id per token")
            if modality.numel() and (int(modality.min()) < 0 or int(modality.max()) >= self.cfg.n_modalities):
                raise ValueError(f"modality ids must be in [0, {self.cfg.n_modalities}), got "
                                 f"[{int(modality.min())}, {int(modality.max())}]; set n_modalities to match the data")

    def modality_of(self, idx):
        """Modality of token ids from cfg.modality_offsets (marker tokens are text)."""
        edges = torch.tensor(self.cfg.modality_offsets[1:], device=idx.device, dtype=idx.dtype)
        return torch.bucketize(idx.contiguous(), edges, right=True)

    def forward_hidden(self, x, modality, attn_mask=None):
        """x: (B, T, d_model) embeddings, modality: (B, T) -> (B, T, d_model) after the final norm.
        attn_mask is ignored: Mamba is causal, so inside an image it stays causal (as in the paper)."""
        if modality.dtype != torch.long or modality.shape != x.shape[:2]:
            raise ValueError(f"modality must be int64 of shape {tuple(x.shape[:2])}, got "
                             f"{modality.dtype} {tuple(modality.shape)}; pass one modality id per position")
        if modality.numel() and (int(modality.min()) < 0 or int(modality.max()) >= self.cfg.n_modalities):
            raise ValueError(f"modality ids must be in [0, {self.cfg.n_modalities}); set n_modalities to match")
        return self.backbone(x, modality)

    def forward(self, batch):
        tokens, modality = batch["tokens"], batch["modality"]                # (B, T), (B, T)
        self._check(tokens, modality)
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
        self._check(idx, check_len=False)
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


if __name__ == "__main__":
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
