"""Mixture-of-Transformers (Liang, Yu, Luo et al. 2024) -- arXiv 2411.04996, and the dense Transformer baseline.

"MoT decouples the non-embedding parameters of the model by modality -- including feed-forward networks, attention
matrices, and layer normalization -- enabling modality-specific processing with global self-attention over the full
input sequence." Routing is fixed by each token's modality id: no router, no load balancing, no auxiliary loss. Every
token runs exactly the computation it would run in the dense model, only with its own modality's weights, so the
FLOPs per token equal the dense model's while the non-embedding parameters are about n_modalities times larger.

The same class is the dense Transformer baseline of the whole repo (RoPE, SwiGLU, RMSNorm, causal attention): with
every untie_* switch off, each ModalityLinear / ModalityRMSNorm holds ONE weight and its forward is a plain `x @ W`
(no sorting, no routing). `--model dense --setting bytes` is the byte-level Transformer baseline.

Glossary (paper -> code):
    M modalities                             -> cfg.n_modalities (ids 0..M-1, from the data; markers are text);
                                                 cfg.modality_names names them in the losses (loss_<name>)
    theta_m (modality-m parameters)          -> weight[m] of every ModalityLinear / ModalityRMSNorm (separate
                                                 nn.Parameters per modality, so LMFusion can freeze weight[0])
    W_Q^m, W_K^m, W_V^m (Eq. 2)              -> Attention.qkv.weight[m]  (the three fused in one (D, 3D) matrix)
    W_O^m (Eq. 3)                            -> Attention.proj.weight[m]
    FFN_m, LayerNorm_m (Eq. 4)               -> Block.ffn (SwiGLU w13/w2), Block.norm_attn / norm_ffn
    global self-attention (Eq. 3)            -> one F.scaled_dot_product_attention over the whole mixed sequence
    "untie" ablations (Sec. 4, Fig. 14)      -> cfg.untie_attn, cfg.untie_ffn, cfg.untie_norm
    Chameleon norm reordering                -> cfg.norm_placement = "post" (h = x + Norm_m(Attn(x)),
                                                 out = h + Norm_m(FFN_m(h))); "pre" = standard pre-norm
    QK-norm (Chameleon)                      -> cfg.qk_norm (per modality when untie_attn)

Implementation: the residual stream is kept sorted by modality (Routing): tokens are sorted once per forward
(kernels.sort_by_group), every per-modality projection is ONE kernels.grouped_matmul over the sorted rows with the
per-modality weights stacked to (M, K, N), every norm gain a block of rows; only the global attention puts q, k, v
back in sequence order (and its output back in sorted order). cfg.routing = "masked" is the plain reference (every
modality's weight on every token, then select by mask: M times the FLOPs, for tests only).

API used by transfusion.py (import mot):
    model.forward_hidden(x, modality, attn_mask=None) -> (B, T, D)
        x: (B, T, D) input embeddings; modality: (B, T) int64 in [0, n_modalities); attn_mask: None (causal) or a
        bool (B, 1, T, T) / (T, T) mask, True = may attend. Runs every block and the final norm (no embedding, no head).
    model.modality_parameters(m) -> list of the nn.Parameters specific to modality m (to freeze one, as LMFusion).
    model.generate(idx, max_new_tokens, temperature=0.0) -> (B, T + max_new_tokens), KV-cached; the modality of each
        token comes from its id via cfg.modality_offsets (so it switches to image weights after BOI).
    Classes: Config, RMSNorm-style ModalityRMSNorm, ModalityLinear, Attention, FeedForward, Block, Transformer, MoT.

Toy scale (Config defaults): d_model 64, n_layer 2, pre-norm without QK-norm. The official code's default is
Chameleon's post-norm reordering (--norm_placement=post); here pre-norm is the default because it makes the DENSE
baseline much stronger at toy scale (RESULTS.md), and a sparse model must be measured against the strongest baseline
of its FLOPs. In short runs MoT's text gain comes late: the circuits that text needs -- reading the image for a
caption, the text-only language's lookup -- form sooner in shared weights, which every token trains.
Try: --norm_placement=post, --qk_norm=True; the untie ablation, one switch per component: --untie_ffn=False (attention
and norms per modality, FFN shared), --untie_ffn=False --untie_norm=False (attention only), --untie_attn=False.

Left out: the paper's 7B scale and its data; Transfusion's diffusion head lives in transfusion.py (MoT backbone via
forward_hidden). Departures: the embedding and the LM head are untied from each other (as in Chameleon); q, k and v
are fused into one matrix per modality (same math as three matrices).
Run:  python train.py --compare dense,mot --setting chameleon     (and --setting speech)
      python mot.py                                              (a 20-line demo)
Read first: data.py (the toy world).  Read next: moma.py (the same FFN split, with learned routing inside each modality).
"""
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

@dataclass
class Config:
    vocab_size: int = 512
    n_modalities: int = 2                    # M; 1 = plain Transformer (bytes)
    modality_offsets: tuple = (0, 256)       # first token id of each modality (data.py sets it)
    modality_names: tuple = ("text", "image")  # loss names (loss_<name>), data.py sets it; unnamed: "modality<m>"
    seq_len: int = 256                       # longest sequence accepted (forward and generate)
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64
    ffn_hidden: int = 0                      # SwiGLU hidden size; 0 -> 8/3 * d_model rounded up to a multiple of 16
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    norm_placement: str = "pre"              # "pre": pre-norm (the strong baseline); "post": Chameleon reordering (official MoT code)
    qk_norm: bool = False                    # RMSNorm on q and k per head (Chameleon); per modality if untie_attn
    untie_attn: bool = False                 # per-modality W_Q, W_K, W_V, W_O (and q/k norms)
    untie_ffn: bool = False                  # per-modality SwiGLU feed-forward
    untie_norm: bool = False                 # per-modality attention / FFN / final norms
    routing: str = "grouped"                 # "grouped": sorted tokens + grouped matmul; "masked": reference
    # valid values, one rule per field ("int >= 1", "one of a|b", ...; after ";" a note): checked when built
    RANGES: ClassVar[dict] = dict(
        vocab_size="int >= 1", n_modalities="int >= 1", modality_offsets="ints >= 0", modality_names="names",
        seq_len="int >= 8", n_layer="int >= 1", n_head="int >= 1", d_model="int >= 1",
        ffn_hidden="int >= 0; 0 = 8/3 d_model rounded up to 16", rope_theta="float > 0", norm_eps="float in (0, 1)",
        norm_placement="one of pre|post", qk_norm="bool", untie_attn="bool", untie_ffn="bool", untie_norm="bool",
        routing="one of grouped|masked")


def _check_config(cfg):
    if cfg.d_model % cfg.n_head or (cfg.d_model // cfg.n_head) % 2:
        raise ValueError(f"d_model={cfg.d_model} must be a multiple of 2*n_head={2 * cfg.n_head}; change one of them")
    if cfg.norm_placement not in ("post", "pre"):
        raise ValueError(f"norm_placement={cfg.norm_placement!r} is unknown; use 'post' or 'pre'")
    if cfg.routing not in ("grouped", "masked"):
        raise ValueError(f"routing={cfg.routing!r} is unknown; use 'grouped' or 'masked'")
    if cfg.n_modalities < 1 or len(cfg.modality_offsets) != cfg.n_modalities:
        raise ValueError(f"modality_offsets={cfg.modality_offsets} must hold one first-id per modality "
                         f"(n_modalities={cfg.n_modalities})")
    if list(cfg.modality_offsets) != sorted(cfg.modality_offsets) or cfg.modality_offsets[-1] >= cfg.vocab_size:
        raise ValueError(f"modality_offsets={cfg.modality_offsets} must be increasing and < vocab_size={cfg.vocab_size}")
    if len(set(cfg.modality_names)) != len(cfg.modality_names):
        raise ValueError(f"modality_names={cfg.modality_names} must be distinct")


def modality_names(cfg):
    """One name per modality: cfg.modality_names (the data fills it), "modality<m>" for any it does not name."""
    return tuple(cfg.modality_names[m] if m < len(cfg.modality_names) else f"modality{m}"
                 for m in range(cfg.n_modalities))


# --- Sec. 2.1: modality-specific parameters -------------------------------------------------------------------------

class Routing:
    """Where each token's weights come from, and the order of the residual stream.

    MoT keeps its residual stream SORTED BY MODALITY: tokens are sorted once per forward (sort), so modality m's
    rows form one contiguous block and every per-modality op is a block of rows (one grouped matmul, one gain per
    block); only the global attention needs sequence order (unsort its q, k, v, sort its output). Per-token ops
    (norms, SwiGLU, residual adds) do not care about row order. The dense model (nothing untied) and the "masked"
    reference keep sequence order: sort and unsort are then plain reshapes."""

    def __init__(self, modality, n_modalities, impl="grouped"):
        self.shape, self.impl = modality.shape, impl                          # modality: (B, T) int64
        self.modality, self.order = modality.reshape(-1), None                # (N,): the modality of each row
        if n_modalities > 1 and impl == "grouped":
            self.order, self.sizes = kernels.sort_by_group(self.modality, n_modalities)   # sizes: rows per modality
            self.inverse = torch.argsort(self.order)                           # a permutation's argsort: its inverse
            self.modality = self.modality[self.order]

    def sort(self, x):
        # (B, T, ...) in sequence order -> (N, ...) in the stream's order
        x = x.flatten(0, 1)
        return x if self.order is None else x.index_select(0, self.order)

    def unsort(self, x):
        # (N, ...) in the stream's order -> (B, T, ...) in sequence order
        x = x if self.order is None else x.index_select(0, self.inverse)
        return x.view(*self.shape, *x.shape[1:])


def _compute_dtype(x):
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class ModalityLinear(nn.Module):
    """y_t = x_t @ W[m_t]: one (d_in, d_out) nn.Parameter per modality (n=1: a plain bias-free linear layer)."""

    def __init__(self, d_in, d_out, n, std=0.02):
        super().__init__()
        self.n = n
        self.weight = nn.ParameterList([nn.Parameter(torch.randn(d_in, d_out) * std) for _ in range(n)])

    def forward(self, x, rt):
        # x: (N, d_in) in the stream's order (Routing) -> (N, d_out); or (B, T, d_in) in sequence order -> (B, T, d_out)
        if self.n == 1:                                   # dense: every token uses the same weight
            return x @ self.weight[0]
        if x.dim() == 3:                                  # sequence order (a caller outside the stream): sort, unsort
            return rt.unsort(self(rt.sort(x), rt))
        if rt.impl == "masked":                           # reference: all weights on all tokens, keep the own one
            return sum((rt.modality == m).unsqueeze(-1).to(x.dtype) * (x @ w) for m, w in enumerate(self.weight))
        dt = _compute_dtype(x)
        w = torch.stack(list(self.weight)).to(dt)         # (M, d_in, d_out)
        return kernels.grouped_matmul(x.to(dt), w, rt.sizes)   # sorted rows: modality m's block @ W[m]


class ModalityRMSNorm(nn.Module):
    """RMSNorm whose gain vector is chosen by each token's modality (n=1: plain RMSNorm)."""

    def __init__(self, dim, n, eps=1e-5):
        super().__init__()
        self.n, self.eps = n, eps
        self.weight = nn.ParameterList([nn.Parameter(torch.ones(dim)) for _ in range(n)])

    def forward(self, x, rt):
        # x: (N, ..., dim) in the stream's order -> same shape
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)
        if self.n == 1:
            return y * self.weight[0]
        if rt.order is not None and not x.is_cuda:        # sorted stream: one gain per block of rows (on CPU cheaper
            # than a per-row gather, whose backward is a scatter-add; split sizes need the host, so not on a GPU)
            return torch.cat([y_m * w for y_m, w in zip(y.split(rt.sizes.tolist()), self.weight)])
        w = torch.stack(list(self.weight))[rt.modality]   # any order (and no host sync on a GPU): a gain per row
        return y * w.view(-1, *([1] * (x.dim() - 2)), w.shape[-1])


# --- Rotary position embedding (the Chameleon / Llama backbone) ------------------------------------------------------

def rope(pos, head_dim, theta, device):
    # pos: (T,) int64 -> cos, sin: (T, head_dim), the angles pos * inv[i] once per half; sin signed as (-sin, sin)
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    ang = pos.to(device=device, dtype=torch.float32)[:, None] * inv[None]
    return torch.cat([ang.cos(), ang.cos()], -1), torch.cat([-ang.sin(), ang.sin()], -1)


def apply_rope(x, cos, sin):
    # x: (B, T, H, hd); rotate the pairs (x1[i], x2[i]) of the two halves by angle pos * inv[i]:
    # (x1 cos - x2 sin, x2 cos + x1 sin) = x * cos + (x2, x1) * (-sin, sin): one swap of halves, no split outputs
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos[:, None] + torch.cat([x2, x1], dim=-1) * sin[:, None]).type_as(x)


# --- Sec. 2.2, Eq. 2-3: modality-specific attention projections, global self-attention --------------------------------

class Attention(nn.Module):
    cp = None   # context_parallel.CPGroup: set by train.py --context_parallel N

    def __init__(self, cfg):
        super().__init__()
        n = cfg.n_modalities if cfg.untie_attn else 1
        self.n_head, self.hd = cfg.n_head, cfg.d_model // cfg.n_head
        self.qkv = ModalityLinear(cfg.d_model, 3 * cfg.d_model, n)                       # W_Q^m, W_K^m, W_V^m
        self.proj = ModalityLinear(cfg.d_model, cfg.d_model, n, 0.02 / math.sqrt(2 * cfg.n_layer))  # W_O^m
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = ModalityRMSNorm(self.hd, n, cfg.norm_eps)
            self.k_norm = ModalityRMSNorm(self.hd, n, cfg.norm_eps)

    def forward(self, x, rt, cos, sin, attn_mask=None, cache=None):
        # x: (N, D) in the stream's order -> (N, D), or (B, T, D) in sequence order -> (B, T, D);
        # cache: None or dict with "k", "v" (B, H, T_past, hd), updated in place
        if x.dim() == 3:                                                 # sequence order (a caller outside the stream)
            return rt.unsort(self(rt.sort(x), rt, cos, sin, attn_mask, cache))
        (B, T), D = rt.shape, x.shape[-1]
        q, k, v = self.qkv(x, rt).view(-1, 3, self.n_head, self.hd).unbind(1)   # each token: its modality's W_Q/K/V
        if self.qk_norm:
            q, k = self.q_norm(q, rt), self.k_norm(k, rt)
        q, k, v = (rt.unsort(t) for t in (q, k, v))                      # (B, T, H, hd): attention needs sequence order
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))                 # (B, H, T, hd)
        causal = attn_mask is None
        if cache is not None:
            if "k" in cache:
                past = cache["k"].shape[2]
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
                if T > 1:                                                # new tokens see the past and causally each other
                    attn_mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
                causal = False
            cache["k"], cache["v"] = k, v
        # Eq. 3: ONE attention over the whole interleaved sequence (weights per modality, computation shared)
        if self.cp is not None and cache is None:                      # context parallel: K/V of every rank (ring)
            y = self.cp.attention(q, k, v, mask=attn_mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)
        y = y.transpose(1, 2).reshape(B, T, D)
        return self.proj(rt.sort(y), rt)                                 # back to the stream's order; W_O^m


# --- Sec. 2.2, Eq. 4: modality-specific feed-forward network (SwiGLU) ------------------------------------------------

class FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        n = cfg.n_modalities if cfg.untie_ffn else 1
        hidden = cfg.ffn_hidden or 16 * math.ceil(8 * cfg.d_model / 3 / 16)
        self.w13 = ModalityLinear(cfg.d_model, 2 * hidden, n)            # gate and up projections, fused
        self.w2 = ModalityLinear(hidden, cfg.d_model, n, 0.02 / math.sqrt(2 * cfg.n_layer))

    def forward(self, x, rt):
        # x: (N, D) in the stream's order -> (N, D): every op is per token, so the rows stay sorted throughout
        a, b = self.w13(x, rt).chunk(2, dim=-1)
        return self.w2(F.silu(a) * b, rt)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        n = cfg.n_modalities if cfg.untie_norm else 1
        self.post = cfg.norm_placement == "post"
        self.norm_attn = ModalityRMSNorm(cfg.d_model, n, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm_ffn = ModalityRMSNorm(cfg.d_model, n, cfg.norm_eps)
        self.ffn = FeedForward(cfg)

    def forward(self, x, rt, cos, sin, attn_mask=None, cache=None):
        # x: (N, D) the residual stream (Routing) -> (N, D)
        if self.post:   # Chameleon reordering (official MoT code): norm the sublayer's OUTPUT, per modality
            h = x + self.norm_attn(self.attn(x, rt, cos, sin, attn_mask, cache), rt)
            return h + self.norm_ffn(self.ffn(h, rt), rt)
        h = x + self.attn(self.norm_attn(x, rt), rt, cos, sin, attn_mask, cache)
        return h + self.ffn(self.norm_ffn(h, rt), rt)


# --- The model: shared embedding and head, M-way untied blocks ------------------------------------------------------

class Transformer(nn.Module):
    """Decoder-only Transformer; dense when every cfg.untie_* is False, Mixture-of-Transformers otherwise."""

    cp = None   # context_parallel.CPGroup: set by train.py --context_parallel N

    def __init__(self, cfg):
        super().__init__()
        _check_config(cfg)
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)        # shared by all modalities
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.norm_f = ModalityRMSNorm(cfg.d_model, cfg.n_modalities if cfg.untie_norm else 1, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)  # shared by all modalities
        nn.init.normal_(self.lm_head.weight, std=0.02)

    # -- helpers ------------------------------------------------------------------------------------------------------
    def modality_of(self, idx):
        """Modality of each token id from cfg.modality_offsets (markers are text). idx: (B, T) -> (B, T)."""
        bounds = torch.tensor(self.cfg.modality_offsets[1:], device=idx.device, dtype=idx.dtype)
        return torch.bucketize(idx.contiguous(), bounds, right=True)

    def modality_parameters(self, m):
        """The nn.Parameters that only tokens of modality m use (weight[m] of every untied module)."""
        return [mod.weight[m] for mod in self.modules()
                if isinstance(mod, (ModalityLinear, ModalityRMSNorm)) and mod.n > 1]

    def num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        return n - (self.tok_emb.weight.numel() + self.lm_head.weight.numel() if non_embedding else 0)

    def _check_tokens(self, tokens, modality):
        cfg = self.cfg
        if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.long or tokens.dim() != 2:
            raise ValueError("tokens must be an int64 tensor of shape (B, T); convert with .long()")
        if tokens.shape[1] > cfg.seq_len:
            raise ValueError(f"sequence length {tokens.shape[1]} > seq_len={cfg.seq_len}; crop it or raise --seq_len")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= cfg.vocab_size):
            raise ValueError(f"token ids must be in [0, {cfg.vocab_size}); check the data or --vocab_size")
        self._check_modality(modality, tokens.shape)

    def _check_modality(self, modality, shape):
        if modality.dtype != torch.long or tuple(modality.shape) != tuple(shape):
            raise ValueError(f"modality must be an int64 tensor of shape {tuple(shape)}, got "
                             f"{modality.dtype} {tuple(modality.shape)}")
        if modality.numel() and (modality.min() < 0 or modality.max() >= self.cfg.n_modalities):
            raise ValueError(f"modality ids must be in [0, {self.cfg.n_modalities}); got "
                             f"[{int(modality.min())}, {int(modality.max())}]: set --n_modalities or fix the data")

    # -- forward ------------------------------------------------------------------------------------------------------
    def forward_hidden(self, x, modality, attn_mask=None, caches=None, pos0=0):
        """All blocks + final norm. x: (B, T, D) embeddings, modality: (B, T) -> (B, T, D).
        attn_mask: None (causal) or bool (B, 1, T, T) / (T, T), True = may attend."""
        B, T, D = x.shape
        self._check_modality(modality, (B, T))
        if self.cp is not None and caches is None:
            pos0 = self.cp.rank * T                                    # context parallel: this rank's positions
        if pos0 + T > self.cfg.seq_len:
            raise ValueError(f"position {pos0 + T} > seq_len={self.cfg.seq_len}; crop the sequence or raise --seq_len")
        cfg = self.cfg
        untied = cfg.untie_attn or cfg.untie_ffn or cfg.untie_norm
        rt = Routing(modality, cfg.n_modalities if untied else 1, cfg.routing)   # dense: no sorting
        cos, sin = rope(torch.arange(pos0, pos0 + T), D // cfg.n_head, cfg.rope_theta, x.device)
        x = rt.sort(x)                                       # (N, D): MoT's stream is sorted by modality once, here
        for i, block in enumerate(self.blocks):
            x = block(x, rt, cos, sin, attn_mask, None if caches is None else caches[i])
        return rt.unsort(self.norm_f(x, rt))                 # (B, T, D) in sequence order

    def forward(self, batch):
        # batch["tokens"]: (B, T) -> logits (B, T, V), loss (scalar), parts {loss_<modality>: detached scalar}
        tokens = batch["tokens"]
        modality = batch.get("modality")
        if modality is None and isinstance(tokens, torch.Tensor):
            modality = self.modality_of(tokens)
        self._check_tokens(tokens, modality)
        h = self.forward_hidden(self.tok_emb(tokens), modality)
        logits = self.lm_head(h)
        targets = batch.get("targets")
        if targets is None:
            return logits, None, {}
        loss_tok = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1, reduction="none")
        mask = targets.flatten() != -1
        loss = loss_tok.sum() / mask.sum().clamp(min=1)
        parts = {}
        tmod = batch.get("target_modality")
        tmod = self.modality_of(targets.clamp(min=0)) if tmod is None else tmod
        tmod = tmod.flatten()
        for m, name in enumerate(modality_names(self.cfg)):
            sel = mask & (tmod == m)
            if sel.any():
                parts[f"loss_{name}"] = (loss_tok[sel].mean()).detach()
        return logits, loss, parts

    # -- generation with a KV cache -----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=0.0):
        """idx: (B, Tp) int64 prompt -> (B, Tp + max_new_tokens). Greedy when temperature == 0."""
        if not isinstance(idx, torch.Tensor) or idx.dtype != torch.long or idx.dim() != 2:
            raise ValueError("generate: idx must be an int64 tensor of shape (B, T)")
        if idx.shape[1] + max_new_tokens > self.cfg.seq_len:
            raise ValueError(f"generate: {idx.shape[1]} + {max_new_tokens} tokens > seq_len={self.cfg.seq_len}; "
                             "shorten the prompt or generate fewer tokens")
        was_training = self.training
        self.eval()
        caches = [dict() for _ in self.blocks]
        out, new, pos = idx, idx, 0
        for _ in range(max_new_tokens):
            mod = self.modality_of(new)                       # each new token's modality from its id
            self._check_tokens(new, mod)
            h = self.forward_hidden(self.tok_emb(new), mod, caches=caches, pos0=pos)
            pos += new.shape[1]
            logits = self.lm_head(h[:, -1]).float()           # (B, V)
            if temperature > 0:
                new = torch.multinomial(F.softmax(logits / temperature, dim=-1), 1)
            else:
                new = logits.argmax(-1, keepdim=True)
            out = torch.cat([out, new], dim=1)
        self.train(was_training)
        return out


class MoT(Transformer):
    """Mixture-of-Transformers: the Transformer with per-modality weights (registered with every untie_* on)."""


MODELS = {
    "dense": (Config, Transformer, "chameleon", dict()),
    "mot": (Config, MoT, "chameleon", dict(untie_attn=True, untie_ffn=True, untie_norm=True)),
}
# MoT with one modality is the dense model, and the transfusion setting's images are not tokens: train.py refuses those
SUPPORTED_SETTINGS = {"dense": ("chameleon", "speech", "text", "bytes"), "mot": ("chameleon", "speech")}


if __name__ == "__main__":
    torch.manual_seed(0)
    B, T = 4, 64
    for name, (C, M, _, over) in MODELS.items():
        cfg = C(**over)
        model = M(cfg)
        tokens = torch.randint(0, cfg.vocab_size, (B, T))
        batch = dict(tokens=tokens, targets=torch.roll(tokens, -1, 1), modality=model.modality_of(tokens))
        logits, loss, parts = model(batch)
        loss.backward()
        print(f"{name:5s} logits {tuple(logits.shape)} loss {loss.item():.3f} "
              f"{ {k: round(v.item(), 3) for k, v in parts.items()} } "
              f"params {model.num_params(False):,} (non-embedding {model.num_params():,})")
        print("       generate:", model.generate(tokens[:1, :8], 8)[0, 8:].tolist())
