"""Mixture-of-Transformers (Liang, Yu, Luo et al. 2024) -- https://arxiv.org/abs/2411.04996
"Mixture-of-Transformers: A Sparse and Scalable Architecture for Multi-Modal Foundation Models".

The idea: every non-embedding parameter -- the attention projections, the feed-forward network, the norms -- has one
copy per modality, and each token uses the copy of its own modality; self-attention stays global, one attention over
the whole interleaved sequence. Routing is fixed by the token's modality (no router, no auxiliary loss), so each token
costs the dense model's FLOPs while the non-embedding parameters grow about n_modalities times. With every untie_*
switch off the same classes are the dense Transformer baseline of the whole repo (RoPE, SwiGLU, RMSNorm).

Glossary (paper -> code):
    M modalities; m_t, token t's modality  -> cfg.n_modalities; the `modality` tensor (B, T), ids from the data
    theta_m, the parameters of modality m  -> weight[m] of every ModalityLinear / ModalityRMSNorm
    W_Q^m, W_K^m, W_V^m  /  W_O^m          -> Attention.qkv.weight[m] (the three fused)  /  Attention.proj.weight[m]
    FFN_m  /  LayerNorm_m                  -> FeedForward.w13, w2 (SwiGLU)  /  Block.norm_attn, norm_ffn, norm_f
    global self-attention                  -> Attention.attend: one causal attention over all tokens
    untying ablations (Sec. 4)             -> cfg.untie_attn, cfg.untie_ffn, cfg.untie_norm
    Chameleon's norm reordering, QK-norm   -> cfg.norm_placement = "post", cfg.qk_norm

Read the plain form first: ModalityLinear.forward is the paper's y_t = x_t W[m_t]. It runs with routing="masked";
the default, routing="grouped", runs the same model on a residual stream sorted by modality with one grouped matmul
per projection (the speed-path section at the end; tests/test_mot.py holds the two equal).

Departures: pre-norm is the default; the official code uses Chameleon's post-norm reordering, but pre-norm makes the
dense baseline stronger at toy scale, and a sparse model is measured against the strongest baseline of its FLOPs.
q, k and v share one matrix per modality (the same math as three). The embedding and the LM head are shared by all
modalities and untied from each other (as in Chameleon).
Left out: the paper's scale and data. The Transfusion setting (diffusion on continuous images) is transfusion.py,
with this file's Transformer as its backbone.
Try: --norm_placement=post, --qk_norm=True; the ablations: --untie_ffn=False (attention and norms per modality),
--untie_ffn=False --untie_norm=False (attention only), --untie_attn=False.
Run:  python train.py --compare dense,mot --setting chameleon     (and --setting speech)
      python mot.py                                              (a short demo)
Read first: data.py (the toy world).  Read next: moma.py (the FFN split, with learned routing inside each modality).
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
    vocab_size: int = 512
    n_modalities: int = 2                    # M; 1 = plain Transformer (bytes)
    modality_offsets: tuple = (0, 256)       # first token id of each modality (data.py sets it; markers are text)
    modality_names: tuple = ("text", "image")  # loss names (loss_<name>), data.py sets it; unnamed: "modality<m>"
    seq_len: int = 256                       # longest sequence accepted (forward and generate)
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64
    ffn_hidden: int = 0                      # SwiGLU hidden size; 0 -> 8/3 * d_model rounded up to a multiple of 16
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    norm_placement: str = "pre"              # "pre": pre-norm; "post": Chameleon's reordering (the official MoT code)
    qk_norm: bool = False                    # RMSNorm on q and k per head (Chameleon); per modality if untie_attn
    untie_attn: bool = False                 # per-modality W_Q, W_K, W_V, W_O (and q/k norms)
    untie_ffn: bool = False                  # per-modality SwiGLU feed-forward
    untie_norm: bool = False                 # per-modality attention / FFN / final norms
    routing: str = "grouped"                 # "grouped": sorted stream, grouped matmul (speed path); "masked": plain
    # valid values, one rule per field ("int >= 1", "one of a|b", ...; after ";" a note): checked when built
    RANGES: ClassVar[dict] = dict(
        vocab_size="int >= 1", n_modalities="int >= 1", modality_offsets="ints >= 0", modality_names="names",
        seq_len="int >= 8", n_layer="int >= 1", n_head="int >= 1", d_model="int >= 1",
        ffn_hidden="int >= 0; 0 = 8/3 d_model rounded up to 16", rope_theta="float > 0", norm_eps="float in (0, 1)",
        norm_placement="one of pre|post", qk_norm="bool", untie_attn="bool", untie_ffn="bool", untie_norm="bool",
        routing="one of grouped|masked")

    def __post_init__(self):
        offs, D, H = list(self.modality_offsets), self.d_model, self.n_head
        if D % H or (D // H) % 2:
            raise ValueError(f"d_model={D} must be a multiple of 2*n_head={2 * H}; change one of them")
        if len(offs) != self.n_modalities:
            raise ValueError(f"modality_offsets={self.modality_offsets} must hold one first-id per modality "
                             f"(n_modalities={self.n_modalities})")
        if offs != sorted(offs) or any(o >= self.vocab_size for o in offs):
            raise ValueError(f"modality_offsets={self.modality_offsets} must be increasing and "
                             f"< vocab_size={self.vocab_size}")
        if len(set(self.modality_names)) != len(self.modality_names):
            raise ValueError(f"modality_names={self.modality_names} must be distinct")


# ==== The method (Sec. 2.2, Algorithm 1): per-modality weights, global self-attention ===============================
# Every non-embedding weight has one copy per modality and token t uses the copy of its modality m_t: the attention
# projections W_Q, W_K, W_V, W_O, the feed-forward network and the norms, all built from the two modules below. The
# tokens of all modalities then meet in ONE causal self-attention over the whole sequence (Attention.attend).
# Each module takes `modality` (B, T), the m_t of every token, beside its input; in the sorted stream (the speed
# path, at the end of the file) a Routing stands in its place and the module hands over to its speed-path version.

class ModalityLinear(nn.Module):
    """y_t = x_t W[m_t]: one (d_in, d_out) weight per modality, each token multiplied by its own modality's weight
    (n=1: a plain bias-free linear layer, shared by all tokens)."""

    def __init__(self, d_in, d_out, n, std=0.02):
        super().__init__()
        self.n = n
        self.weight = nn.ParameterList([nn.Parameter(torch.randn(d_in, d_out) * std) for _ in range(n)])

    def forward(self, x, modality):
        # x: (B, T, d_in), modality: (B, T) -> (B, T, d_out)
        if self.n == 1:                                   # dense: every token uses the same weight
            return x @ self.weight[0]
        if isinstance(modality, Routing):                 # the sorted stream: one grouped matmul (speed paths, below)
            return routed_linear(self, x, modality)
        # Algorithm 1: y_t = x_t W[m_t], as M dense products, each kept on the tokens of its modality (the plainest
        # form; it costs M times the FLOPs, which the grouped matmul of the speed path does not)
        return sum((modality == m).unsqueeze(-1).to(x.dtype) * (x @ w) for m, w in enumerate(self.weight))


class ModalityRMSNorm(nn.Module):
    """RMSNorm whose gain vector g[m_t] is chosen by each token's modality (n=1: plain RMSNorm)."""

    def __init__(self, dim, n, eps=1e-5):
        super().__init__()
        self.n, self.eps = n, eps
        self.weight = nn.ParameterList([nn.Parameter(torch.ones(dim)) for _ in range(n)])

    def forward(self, x, modality):
        # x: (B, T, dim), or (B, T, H, dim) for a q/k norm; modality: (B, T) -> the shape of x
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)
        if self.n == 1:
            return y * self.weight[0]
        if isinstance(modality, Routing):                 # the sorted stream: one gain per block of rows
            return routed_gain(self, y, modality)
        g = torch.stack(list(self.weight))[modality]      # (B, T, dim): each token's g[m_t]
        if x.dim() == 4:                                  # a q/k norm: the same gain for every head
            g = g.unsqueeze(2)
        return y * g


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


# --- Sec. 2.2, Eq. 2-3: modality-specific projections, global self-attention ----------------------------------------

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

    def forward(self, x, modality, cos, sin, attn_mask=None, cache=None):
        # x: (B, T, D), modality: (B, T) -> (B, T, D); cos, sin: (T, hd) rotary tables
        if isinstance(modality, Routing):                              # the sorted stream (speed paths, below)
            return routed_attention(self, x, modality, cos, sin, attn_mask, cache)
        B, T, D = x.shape
        # Eq. 2: each token's query, key and value from its own modality's W_Q^m, W_K^m, W_V^m
        q, k, v = self.qkv(x, modality).view(B, T, 3, self.n_head, self.hd).unbind(2)     # each (B, T, H, hd)
        if self.qk_norm:
            q, k = self.q_norm(q, modality), self.k_norm(k, modality)
        y = self.attend(q, k, v, cos, sin, attn_mask, cache)
        return self.proj(y, modality)                                    # Eq. 3: W_O^m of each token's modality

    def attend(self, q, k, v, cos, sin, attn_mask=None, cache=None):
        # q, k, v: (B, T, H, hd) in sequence order -> (B, T, H * hd). attn_mask: None (causal) or bool, True = may
        # attend; cache: None or a dict with "k", "v" (B, H, T_past, hd), extended in place
        B, T = q.shape[:2]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))                 # (B, H, T, hd)
        causal = attn_mask is None
        if cache is not None:
            if "k" in cache:
                past = cache["k"].shape[2]
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
                if T > 1:                                        # new tokens see the past and causally each other
                    attn_mask = torch.ones(T, past + T, dtype=torch.bool, device=q.device).tril(past)
                causal = False
            cache["k"], cache["v"] = k, v
        # Eq. 3: ONE attention over the whole interleaved sequence (weights per modality, the computation shared)
        if self.cp is not None and cache is None:                      # context parallel: K/V of every rank (ring)
            y = self.cp.attention(q, k, v, mask=attn_mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)
        return y.transpose(1, 2).reshape(B, T, -1)


# --- Sec. 2.2, Eq. 4: modality-specific feed-forward network (SwiGLU) and norms -------------------------------------

class FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        n = cfg.n_modalities if cfg.untie_ffn else 1
        hidden = cfg.ffn_hidden or 16 * math.ceil(8 * cfg.d_model / 3 / 16)
        self.w13 = ModalityLinear(cfg.d_model, 2 * hidden, n)            # gate and up projections, fused
        self.w2 = ModalityLinear(hidden, cfg.d_model, n, 0.02 / math.sqrt(2 * cfg.n_layer))

    def forward(self, x, modality):
        # x: (B, T, D) -> (B, T, D): FFN_m(x) = W2[m] (silu(x W1[m]) * x W3[m]), every op per token
        a, b = self.w13(x, modality).chunk(2, dim=-1)
        return self.w2(F.silu(a) * b, modality)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        n = cfg.n_modalities if cfg.untie_norm else 1
        self.post = cfg.norm_placement == "post"
        self.norm_attn = ModalityRMSNorm(cfg.d_model, n, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm_ffn = ModalityRMSNorm(cfg.d_model, n, cfg.norm_eps)
        self.ffn = FeedForward(cfg)

    def forward(self, x, modality, cos, sin, attn_mask=None, cache=None):
        # x: (B, T, D), modality: (B, T) -> (B, T, D)
        if self.post:   # Chameleon reordering (official MoT code): norm the sublayer's OUTPUT, per modality
            h = x + self.norm_attn(self.attn(x, modality, cos, sin, attn_mask, cache), modality)
            return h + self.norm_ffn(self.ffn(h, modality), modality)
        h = x + self.attn(self.norm_attn(x, modality), modality, cos, sin, attn_mask, cache)
        return h + self.ffn(self.norm_ffn(h, modality), modality)


# --- The model: shared embedding and head, M-way untied blocks ------------------------------------------------------

class Transformer(nn.Module):
    """Decoder-only Transformer; dense when every cfg.untie_* is False, Mixture-of-Transformers otherwise."""

    cp = None   # context_parallel.CPGroup: set by train.py --context_parallel N

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)        # shared by all modalities
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.norm_f = ModalityRMSNorm(cfg.d_model, cfg.n_modalities if cfg.untie_norm else 1, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)  # shared by all modalities
        nn.init.normal_(self.lm_head.weight, std=0.02)

    @property
    def sorted_stream(self):   # routing="grouped" runs the speed path (below) where there is something to sort
        c = self.cfg
        return c.routing == "grouped" and c.n_modalities > 1 and (c.untie_attn or c.untie_ffn or c.untie_norm)

    def forward_hidden(self, x, modality, attn_mask=None, caches=None, pos0=0):
        # x: (B, T, D) embeddings, modality: (B, T) -> (B, T, D): every block, then the final norm.
        # attn_mask: None (causal) or bool (B, 1, T, T) / (T, T), True = may attend; caches: one dict per block
        B, T, D = x.shape
        if self.cp is not None and caches is None:
            pos0 = self.cp.rank * T                                    # context parallel: this rank's positions
        check_modality(self.cfg, modality, (B, T), pos0 + T)
        cos, sin = rope(torch.arange(pos0, pos0 + T), D // self.cfg.n_head, self.cfg.rope_theta, x.device)
        if self.sorted_stream:                                         # the default for MoT (speed paths, below)
            return sorted_forward_hidden(self, x, Routing(modality, self.cfg.n_modalities), cos, sin, attn_mask, caches)
        for i, block in enumerate(self.blocks):
            x = block(x, modality, cos, sin, attn_mask, None if caches is None else caches[i])
        return self.norm_f(x, modality)

    def forward(self, batch):
        # batch["tokens"]: (B, T) -> logits (B, T, V), loss (scalar), parts {loss_<modality>: detached scalar}
        tokens = batch["tokens"]
        modality = batch.get("modality")
        if modality is None and isinstance(tokens, torch.Tensor):
            modality = self.modality_of(tokens)
        check_tokens(self.cfg, tokens)
        logits = self.lm_head(self.forward_hidden(self.tok_emb(tokens), modality))
        targets = batch.get("targets")
        if targets is None:
            return logits, None, {}
        loss_tok = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1, reduction="none")
        mask = targets.flatten() != -1
        loss = loss_tok.sum() / mask.sum().clamp(min=1)
        tmod = batch.get("target_modality")
        tmod = (self.modality_of(targets.clamp(min=0)) if tmod is None else tmod).flatten()
        parts = {}
        for m, name in enumerate(modality_names(self.cfg)):          # one loss per modality, for the logs
            sel = mask & (tmod == m)
            if sel.any():
                parts[f"loss_{name}"] = (loss_tok[sel].mean()).detach()
        return logits, loss, parts

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=0.0):
        """idx: (B, Tp) int64 prompt -> (B, Tp + max_new_tokens), KV-cached; greedy when temperature == 0. Each new
        token's modality comes from its id (modality_of), so the weights switch to image after an image marker."""
        check_tokens(self.cfg, idx, "generate: idx")
        if idx.shape[1] + max_new_tokens > self.cfg.seq_len:
            raise ValueError(f"generate: {idx.shape[1]} + {max_new_tokens} tokens > seq_len={self.cfg.seq_len}; "
                             "shorten the prompt or generate fewer tokens")
        was_training = self.training
        self.eval()
        caches = [dict() for _ in self.blocks]
        out, new, pos = idx, idx, 0
        for _ in range(max_new_tokens):
            h = self.forward_hidden(self.tok_emb(new), self.modality_of(new), caches=caches, pos0=pos)
            pos += new.shape[1]
            logits = self.lm_head(h[:, -1]).float()           # (B, V)
            if temperature > 0:
                new = torch.multinomial(F.softmax(logits / temperature, dim=-1), 1)
            else:
                new = logits.argmax(-1, keepdim=True)
            out = torch.cat([out, new], dim=1)
        self.train(was_training)
        return out

    def modality_of(self, idx):
        """Modality of each token id from cfg.modality_offsets (markers are text). idx: (B, T) -> (B, T)."""
        bounds = torch.tensor(self.cfg.modality_offsets[1:], device=idx.device, dtype=idx.dtype)
        return torch.bucketize(idx.contiguous(), bounds, right=True)

    def modality_parameters(self, m):
        """The nn.Parameters that only tokens of modality m use (weight[m] of every untied module; to freeze one)."""
        return [mod.weight[m] for mod in self.modules()
                if isinstance(mod, (ModalityLinear, ModalityRMSNorm)) and mod.n > 1]

    def num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        return n - (self.tok_emb.weight.numel() + self.lm_head.weight.numel() if non_embedding else 0)


class MoT(Transformer):
    """Mixture-of-Transformers: the Transformer with per-modality weights (registered with every untie_* on)."""


MODELS = {
    "dense": (Config, Transformer, "chameleon", dict()),
    "mot": (Config, MoT, "chameleon", dict(untie_attn=True, untie_ffn=True, untie_norm=True)),
}
# MoT with one modality is the dense model, and the transfusion setting's images are not tokens: train.py refuses those
SUPPORTED_SETTINGS = {"dense": ("chameleon", "speech", "text", "bytes"), "mot": ("chameleon", "speech")}


# ==== Speed paths: same results as the plain forms above, faster (tests/test_mot.py holds them equal) ===============
# routing="grouped" (the default) keeps the residual stream SORTED BY MODALITY, Algorithm 1's grouping of the tokens
# (I_m, X_m) held through every block: the tokens are sorted once per forward, so modality m's rows form one block,
# every per-modality projection is ONE grouped matmul (each token multiplied once: the FLOPs the paper counts) and
# every norm gain scales a block of rows. Per-token ops (norms,
# SwiGLU, residual adds) do not care about row order: Block and FeedForward run unchanged on the stream; only the
# global attention needs sequence order (it unsorts its q, k, v and sorts its output). A model with nothing untied
# has nothing to sort and always runs the plain form.

class Routing:
    """The sorted stream's order, handed to the modules in place of `modality`: sort (B, T, ...) -> (N, ...) rows
    grouped by modality (stable), unsort back to sequence order."""

    def __init__(self, modality, n_modalities):
        self.shape = modality.shape                                            # (B, T)
        self.order, self.sizes = kernels.sort_by_group(modality.reshape(-1), n_modalities)  # sizes: rows per modality
        self.inverse = torch.argsort(self.order)                               # a permutation's argsort: its inverse
        self.modality = modality.reshape(-1)[self.order]                       # (N,): the modality of each row

    def sort(self, x):
        # (B, T, ...) in sequence order -> (N, ...) in the stream's order
        return x.flatten(0, 1).index_select(0, self.order)

    def unsort(self, x):
        # (N, ...) in the stream's order -> (B, T, ...) in sequence order
        x = x.index_select(0, self.inverse)
        return x.view(*self.shape, *x.shape[1:])


def sorted_forward_hidden(model, x, rt, cos, sin, attn_mask=None, caches=None):
    # Transformer.forward_hidden's loop on the stream. x: (B, T, D) -> (B, T, D)
    x = rt.sort(x)                                       # (N, D): sorted by modality once, here
    for i, block in enumerate(model.blocks):
        x = block(x, rt, cos, sin, attn_mask, None if caches is None else caches[i])
    return rt.unsort(model.norm_f(x, rt))                # (B, T, D) in sequence order


def _compute_dtype(x):
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def routed_linear(lin, x, rt):
    # ModalityLinear on the stream. x: (N, d_in) sorted -> (N, d_out); or (B, T, d_in) in sequence order (a caller
    # outside the stream): sort, multiply, unsort
    if x.dim() == 3:
        return rt.unsort(routed_linear(lin, rt.sort(x), rt))
    dt = _compute_dtype(x)
    w = torch.stack(list(lin.weight)).to(dt)             # (M, d_in, d_out)
    return kernels.grouped_matmul(x.to(dt), w, rt.sizes)   # modality m's block of rows @ W[m]


def routed_gain(norm, y, rt):
    # ModalityRMSNorm's gain on the stream. y: (N, ..., dim) normalised rows, sorted -> the same shape
    if not y.is_cuda:   # one gain per block of rows (on CPU cheaper than a per-row gather, whose backward is a
        # scatter-add; the block sizes need the host, so not on a GPU)
        return torch.cat([y_m * w for y_m, w in zip(y.split(rt.sizes.tolist()), norm.weight)])
    w = torch.stack(list(norm.weight))[rt.modality]      # a gain per row: no host sync
    return y * w.view(-1, *([1] * (y.dim() - 2)), w.shape[-1])


def routed_attention(att, x, rt, cos, sin, attn_mask=None, cache=None):
    # Attention on the stream. x: (N, D) sorted -> (N, D); or (B, T, D) in sequence order: sort, attend, unsort
    if x.dim() == 3:
        return rt.unsort(routed_attention(att, rt.sort(x), rt, cos, sin, attn_mask, cache))
    q, k, v = att.qkv(x, rt).view(-1, 3, att.n_head, att.hd).unbind(1)   # each (N, H, hd)
    if att.qk_norm:
        q, k = att.q_norm(q, rt), att.k_norm(k, rt)
    y = att.attend(rt.unsort(q), rt.unsort(k), rt.unsort(v), cos, sin, attn_mask, cache)   # in sequence order
    return att.proj(rt.sort(y), rt)                      # back to the stream's order; W_O^m


# ==== Input checks and names (the Config's fields are checked against RANGES by train.build) =======================

def check_tokens(cfg, tokens, what="tokens"):
    if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.long or tokens.dim() != 2:
        raise ValueError(f"{what} must be an int64 tensor of shape (B, T); convert with .long()")
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= cfg.vocab_size):
        raise ValueError(f"token ids must be in [0, {cfg.vocab_size}); check the data or --vocab_size")


def check_modality(cfg, modality, shape, end):
    # modality: (B, T) int64 in [0, n_modalities); end: the last position + 1, at most seq_len
    if modality.dtype != torch.long or tuple(modality.shape) != tuple(shape):
        raise ValueError(f"modality must be an int64 tensor of shape {tuple(shape)}, got "
                         f"{modality.dtype} {tuple(modality.shape)}")
    if modality.numel() and (modality.min() < 0 or modality.max() >= cfg.n_modalities):
        raise ValueError(f"modality ids must be in [0, {cfg.n_modalities}); got "
                         f"[{int(modality.min())}, {int(modality.max())}]: set --n_modalities or fix the data")
    if end > cfg.seq_len:
        raise ValueError(f"position {end} > seq_len={cfg.seq_len}; crop the sequence or raise --seq_len")


def modality_names(cfg):
    """One name per modality: cfg.modality_names (the data fills it), "modality<m>" for any it does not name."""
    return tuple(cfg.modality_names[m] if m < len(cfg.modality_names) else f"modality{m}"
                 for m in range(cfg.n_modalities))


if __name__ == "__main__":   # the shipped trained MoT draws images from captions and captions images; else untrained
    import os
    import data
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "docs", "ckpt", "mot.pt")
    if os.path.isfile(path):
        ck = torch.load(path, map_location="cpu", weights_only=True)     # tensors and plain types only
        cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in ck["config"]["model_cfg"].items()})
        model = MoT(cfg).eval()
        model.load_state_dict({k: v.float() for k, v in ck["model"].items()})   # fp16 on disk
        ds = data.make_data("chameleon", cfg.seq_len, ck["config"]["train"]["seed"])
        ev = ck["eval"]
        print(f"MoT trained {ck['step']} steps on the chameleon setting ({path}): eval loss {ev['eval_loss']:.3f} "
              f"nats/token (text {ev['eval_loss_text']:.3f}, image {ev['eval_loss_image']:.3f})")
        words = lambda ids: " ".join(data.WORDS[i] for i in ids)
        ex = ds.scenes(4, seed=1)                        # fixed scenes, none of them a training row
        torch.manual_seed(0)
        imgs = []
        for e in ex:   # "<bos> caption . <boi>" -> 16 image tokens, sampled (greedy decoding draws only background)
            out = model.generate(torch.tensor([[data.BOS] + e["caption"] + [data.BOI]]), data.N_PATCHES, 1.0)
            imgs.append(data.detokenize_image(out[0, -data.N_PATCHES:].numpy()))
        print("caption -> image (16 image tokens sampled at temperature 1; '.' = background, a letter = the colour of "
              "the object's pixel):")
        print("\n".join(data.image_lines(ex, imgs)))
        print("image -> caption (greedy, from \"<bos> <boi> 16 image tokens <eoi>\"):")
        for e in ex:
            p = torch.tensor([[data.BOS, data.BOI, *data.tokenize_image(e["image"]), data.EOI]])
            cap = model.generate(p, data.CAPTION_TOKENS)[0, p.shape[1]:].tolist()
            cap = cap[:cap.index(data.SEP) + 1] if data.SEP in cap else cap
            r = data.parse_caption(cap)
            print(f"  image of a {data.describe_scene(e['scene'])}: \"{words(cap)}\" "
                  f"({sum(a == b for a, b in zip(r, e['scene']))} of 4 right)")
        torch.manual_seed(4321)                          # train.py's generation eval, on its 32 scenes
        m = ds.eval_generation(lambda p, n, t: model.generate(p, n, t)[:, p.shape[1]:], n=32)
        run = ck["run_eval"]
        print(f"on the 32 scenes of train.py's generation eval: caption -> image {m['gen_image_acc']:.2f} of the "
              f"attributes right (chance {m['gen_image_chance']:.2f}), image -> caption {m['caption_acc']:.2f} "
              f"(chance {m['caption_chance']:.2f})" + (f"; the run's, in fp32: {run['gen_image_acc']:.2f} and "
                                                       f"{run['caption_acc']:.2f}" if "gen_image_acc" in run else ""))
    else:
        print(f"no trained checkpoint at {path}: untrained dense and MoT models on random tokens instead")
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
