"""MEGABYTE: Predicting Million-byte Sequences with Multiscale Transformers
Yu, Simig, Flaherty, Aghajanyan, Zettlemoyer, Lewis (2023) -- https://arxiv.org/abs/2305.07185

A byte sequence is cut into patches of P bytes. A large *global* Transformer runs once per patch (its attention is over
T/P positions and its feed-forward layers, of width P*D_G, run T/P times instead of T); a small *local* Transformer
runs inside each patch and predicts its bytes one by one. The global model sees only earlier patches (a pad patch is
prepended and the last patch dropped), so the whole model stays autoregressive.

Glossary (paper -> code), Sec. 2.2, Eq. 1-6:
    x_t                          -> u[:, t] (bytes; paper position t predicts x_t from x_{<t})
    P, K = T/P                   -> cfg.patch_size, K
    D_G, D_L                     -> cfg.d_global (the global width is P*D_G), cfg.d_local
    E^global-embed, E^pos        -> self.global_embed, self.pos_embed
    E^global-pad                 -> self.global_pad (P*D_G: the patch fed to global position 0)
    transformer^global           -> self.global_model (causal over the K patches)
    w^GL                         -> self.w_gl (D_G -> D_L, applied to each of the P slots)
    E^local-embed, E^local-pad   -> self.local_embed, self.local_pad (the pad replaces the previous byte at p = 0)
    transformer^local            -> self.local_model (causal within a patch; all B*K patches as one batch)
    softmax(E^local-embed h)     -> self.head (tied to E^local-embed unless cfg.tie_local_embed = False)
    Sec. 2.3.1 conv encoder      -> cfg.conv_encoder, cfg.conv_kernels (causal convolutions before patching)
    Sec. 2.3.2 cross-patch       -> cfg.cross_patch = r (the local model also attends to the previous patch's last r)
    Sec. 2.3.3 strided inference -> cfg.strided_inference (eval only: a second pass shifted by P/2)

Departures: the trainer's logits[t] predict x_{t+1}, so the model returns the paper's positions 1..T (_paper_logits);
byte 0 pads the tail to a whole patch (only future positions see it). The conv encoder's layers are residual with a
GELU (the paper names the widths, not the wiring). Strided inference drops the first P/2 bytes for the shifted pass
(that pass has P/2 bytes less context). w^GL starts at the embeddings' scale (a toy-scale need, see __init__).
Generation recomputes the forward for every byte (the plain form); cfg.kv_cache runs one global step per patch and
P local steps with KV caches (the speed path at the end of the file, tested equal).
Left out: the paper's model sizes and data (PG-19, ImageNet-64, audio); here toy sizes on toy bytes.
Run:  python train.py --compare dense,megabyte --setting bytes      Read next: blt.py (dynamic patches)
"""
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    vocab_size: int = 256          # V: bytes
    n_modalities: int = 1          # bytes setting: one modality (text)
    modality_names: tuple = ("text",)  # its name, for the loss part (data.py's model_fields fills it)
    seq_len: int = 2048            # longest input the model accepts (bytes)
    patch_size: int = 8            # P
    d_global: int = 32             # D_G; the global model's width is P * D_G
    n_layer_global: int = 2
    n_head_global: int = 4
    d_local: int = 96              # D_L
    n_layer_local: int = 2
    n_head_local: int = 4
    mlp_ratio: int = 4             # feed-forward width = mlp_ratio * model width
    dropout: float = 0.0
    tie_local_embed: bool = True   # Eq. 6: logits = E^local-embed h^local-out (else a separate head)
    conv_encoder: bool = False     # Sec. 2.3.1: causal convolutions in the patch embedder
    conv_kernels: tuple = (3, 5, 7)
    cross_patch: int = 4           # Sec. 2.3.2: r bytes of the previous patch the local model attends to (0 = off;
                                   # on in the paper's full model, Table 10 ablates it; r = P/2 is our choice)
    strided_inference: bool = False  # Sec. 2.3.3: two passes offset by P/2 at eval (doubles eval cost)
    kv_cache: bool = True          # generate with KV caches (speed path); False: the whole forward for every byte
    # valid values, one rule per field ("int >= 1", "one of a|b", ...; after ";" a note): checked when built
    RANGES: ClassVar[dict] = dict(
        vocab_size="int >= 1", n_modalities="int >= 1", modality_names="names", seq_len="int >= 8",
        patch_size="int >= 1", d_global="int >= 1", n_layer_global="int >= 1", n_head_global="int >= 1",
        d_local="int >= 1", n_layer_local="int >= 1", n_head_local="int >= 1", mlp_ratio="int >= 1",
        dropout="float in [0, 1)", tie_local_embed="bool", conv_encoder="bool", conv_kernels="ints >= 1",
        cross_patch="int >= 0; 0 = off", strided_inference="bool", kv_cache="bool")

    def __post_init__(self):
        P = self.patch_size
        if self.strided_inference and P % 2:
            raise ValueError(f"patch_size={P} must be even for strided_inference; set --patch_size")
        if self.cross_patch > P:
            raise ValueError(f"cross_patch={self.cross_patch} must be in [0, patch_size={P}]; set --cross_patch")
        for d, h, name in ((P * self.d_global, self.n_head_global, "global"),
                           (self.d_local, self.n_head_local, "local")):
            if d % h or (d // h) % 2:
                raise ValueError(f"{name} width {d} must split into {h} heads of even size; change n_head_{name}")

    @property
    def pos_len(self):             # positions 0..seq_len, padded up to a whole number of patches
        return self.patch_size * math.ceil((self.seq_len + 1) / self.patch_size)


# --- Sec. 2.2: the model ---------------------------------------------------------------------------------------

class Megabyte(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        P, DG, DL = cfg.patch_size, cfg.d_global, cfg.d_local
        # Sec. 2.2.1 patch embedder: h^embed_t = E^global-embed_{x_t} + E^pos_t
        self.global_embed = nn.Embedding(cfg.vocab_size, DG)
        self.pos_embed = nn.Embedding(cfg.pos_len, DG)
        self.conv = CausalConvStack(DG, cfg.conv_kernels) if cfg.conv_encoder else None
        self.global_pad = nn.Parameter(torch.zeros(P * DG))      # E^global-pad
        # Sec. 2.2.2 global model over patches, width P*D_G
        self.global_model = Transformer(P * DG, cfg.n_layer_global, cfg.n_head_global, cfg.mlp_ratio, cfg.dropout)
        # Sec. 2.2.3 local model: w^GL maps each of the P global slots (D_G) to D_L
        self.w_gl = nn.Linear(DG, DL, bias=False)
        self.local_embed = nn.Embedding(cfg.vocab_size, DL)      # E^local-embed
        self.local_pad = nn.Parameter(torch.zeros(DL))           # E^local-pad
        self.local_model = Transformer(DL, cfg.n_layer_local, cfg.n_head_local, cfg.mlp_ratio, cfg.dropout,
                                       use_rope=cfg.cross_patch > 0)
        self.lm_head = None if cfg.tie_local_embed else nn.Linear(DL, cfg.vocab_size, bias=False)
        self.apply(self._init)
        # w^GL reads a LayerNorm-ed slot (unit scale): start its output at the embeddings' scale (0.02), so the
        # previous-byte embedding is not drowned by untrained global noise (without this, a long loss plateau)
        nn.init.normal_(self.w_gl.weight, std=0.02 / math.sqrt(DG))
        nn.init.normal_(self.global_pad, std=0.02)
        nn.init.normal_(self.local_pad, std=0.02)
        # latest eval's summed loss (nats) [0] and count [1] by paper index p in patch: patch_position_bits()
        self.register_buffer("patch_pos_loss", torch.zeros(2, P), persistent=False)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv1d)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    # Sec. 2.2.1, Eq. 1 (and Sec. 2.3.1): h^embed_t = E^global-embed_{x_t} + E^pos_t, then the optional conv encoder
    def embed_bytes(self, u, start=0):
        """u (B, L) bytes at absolute positions start..start+L-1 -> h^embed (B, L, D_G)."""
        pos = torch.arange(start, start + u.shape[1], device=u.device)
        h = self.global_embed(u) + self.pos_embed(pos)
        return self.conv(h) if self.conv is not None else h

    # Eq. 2: h^global-in_k = E^global-pad if k = 0, else the embeddings of patch k-1 concatenated (P*D_G)
    def global_inputs(self, u):
        """u (B, K*P) -> h^global-in (B, K, P*D_G): position k holds patch k-1, position 0 the pad patch."""
        B, L = u.shape
        K = L // self.cfg.patch_size
        patches = self.embed_bytes(u).reshape(B, K, -1)
        return torch.cat((self.global_pad.expand(B, 1, -1).to(patches.dtype), patches[:, :-1]), 1)

    # Eq. 4: h^local-in_{k,p} = w^GL h^global-out_{k, p*D_G:(p+1)*D_G} + (E^local-pad if p = 0 else
    # E^local-embed_{x_(kP+p-1)}): the first byte of a patch sees the previous byte only through the global model
    def local_inputs(self, g_out, u):
        """g_out (B, K, P*D_G), u (B, K*P) -> h^local-in (B*K, P, D_L): w^GL slot p + E^local-embed x_{kP+p-1}."""
        B, K, _ = g_out.shape
        P = self.cfg.patch_size
        slots = self.w_gl(g_out.view(B, K, P, -1))                                # (B, K, P, D_L)
        prev = self.local_embed(u).view(B, K, P, -1)[:, :, :-1]                   # byte kP+p-1 for p >= 1
        prev = torch.cat((self.local_pad.expand(B, K, 1, -1).to(prev.dtype), prev), 2)
        return (slots + prev).view(B * K, P, -1)

    # Eq. 6: p(x_t | x_<t) = softmax(E^local-embed h^local-out_{k,p})
    def head(self, h):
        return h @ self.local_embed.weight.t() if self.lm_head is None else self.lm_head(h)

    def _core(self, u):
        """The paper's model on bytes u (B, K*P): logits of paper positions (B, K*P, V), the global output
        (B, K, P*D_G) and the per-layer keys and values of both models (they fill the decoding caches)."""
        B, L = u.shape
        P, K = self.cfg.patch_size, L // self.cfg.patch_size
        g_out, g_kv = self.global_model(self.global_inputs(u))                  # Eq. 3: (B, K, P*D_G)
        x = self.local_inputs(g_out, u)                                           # (B*K, P, D_L)
        r = self.cfg.cross_patch
        pos = torch.arange(L, device=u.device).view(1, K, P).expand(B, K, P).reshape(B * K, P)
        h, l_kv = self.local_model(x, pos, cross=(K, r) if r else None)          # Eq. 5: (B*K, P, D_L)
        return self.head(h).view(B, L, -1), g_out, g_kv, l_kv

    def _paper_logits(self, x):
        """x (B, T) inputs -> (B, T, V) logits where [t] predicts x_{t+1}: paper positions 1..T.
        The trainer's logits[t] must predict targets[t] = x_{t+1} from x_{<=t}: the paper's prediction at position
        t+1. So the paper's layout runs on positions 0..T (zeros pad it to a multiple of P; pad positions come after
        every real one and are never scored), and its prediction of x_0 (from the pad alone) is dropped."""
        B, T = x.shape
        P = self.cfg.patch_size
        L = P * math.ceil((T + 1) / P)
        u = F.pad(x, (0, L - T))
        return self._core(u)[0][:, 1:T + 1]

    def forward(self, batch):
        """batch: tokens (B, T) int64, targets (B, T) with -1 where no loss, optional modality (B, T).
        Returns logits (B, T, V), loss = mean cross-entropy in nats over scored bytes, parts."""
        check_batch(self.cfg, batch)
        x = batch["tokens"]
        B, T = x.shape
        P = self.cfg.patch_size
        logits = self._paper_logits(x)
        if self.cfg.strided_inference and not self.training and T > P // 2:
            # Sec. 2.3.3: a second pass on x[P/2:], whose patches are offset by P/2; every byte is scored by the pass
            # in which it sits in the first half of its patch. Trainer position t is paper position t+1 (index
            # (t+1) % P in its patch); it is taken from the shifted pass when that index is in the second half,
            # except at t+1 = P/2 (position 0 of the shifted pass).
            s = P // 2
            shifted = self._paper_logits(x[:, s:])                               # predicts x_{t+1}, t >= s
            t1 = torch.arange(1, T + 1, device=x.device)
            use = ((t1 % P) >= s) & (t1 > s)
            logits = torch.where(use[None, :, None], F.pad(shifted, (0, 0, s, 0)), logits)
        parts = {}
        loss = None
        if "targets" in batch:
            tgt = batch["targets"]
            logits32 = logits.to(torch.promote_types(logits.dtype, torch.float32))        # fp32 loss under bf16
            ce = F.cross_entropy(logits32.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-1,
                                 reduction="none").view(B, T)
            m = tgt != -1
            loss = (ce * m).sum() / m.sum().clamp(min=1)
            parts[f"loss_{self.cfg.modality_names[0]}"] = loss.detach()
            if self.training:
                self._fresh_eval = True
            else:                                                 # loss by index in patch (paper position t+1)
                if getattr(self, "_fresh_eval", False):           # keep only the latest evaluation
                    self.patch_pos_loss.zero_()
                    self._fresh_eval = False
                p = (torch.arange(1, T + 1, device=x.device) % P).expand(B, T)[m]
                self.patch_pos_loss[0].index_add_(0, p, ce[m].detach().to(self.patch_pos_loss.dtype))
                self.patch_pos_loss[1].index_add_(0, p, torch.ones_like(p, dtype=self.patch_pos_loss.dtype))
        return logits, loss, parts

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=0.0):
        """idx (B, Tp) -> (B, Tp + max_new_tokens). Greedy when temperature == 0. Plain form: the whole (single-pass)
        forward again for every new byte; cfg.kv_cache: the cached speed path (cached_generate)."""
        check_tokens(self.cfg, idx, max_new_tokens)
        if self.cfg.kv_cache:
            return cached_generate(self, idx, max_new_tokens, temperature)[0]
        out = idx
        for _ in range(max_new_tokens):
            nxt = sample(self._paper_logits(out)[:, -1], temperature)           # prediction of the next byte
            out = torch.cat((out, nxt), 1)
        return out

    # --- views for figures and teaching (no plotting here: plots.py draws them) -----------------------------------
    def patch_position_bits(self):
        """Latest evaluation's loss in bits per byte by index p of the predicted byte in its patch (P,), or None
        before any eval: the quantity behind the paper's Fig. 5 and its reason for strided inference (Sec. 2.3.3):
        whether strided inference helps depends on where in a patch the loss is highest."""
        s, n = self.patch_pos_loss.cpu()
        return None if n.sum() == 0 else s / n.clamp(min=1) / math.log(2)

    def patch_layout(self, T):
        """Where each of T trainer positions sits in the paper's layout (trainer position t predicts byte t+1 =
        paper position t+1). Returns int64 tensors (T,): `patch` k and `slot` p of the prediction; `global_sees`
        = kP, the bytes [0, kP) the global model has read (earlier patches only); `local_reads` = the input byte
        the local model reads at that slot (kP + p - 1; -1 = E^local-pad at p = 0)."""
        P = self.cfg.patch_size
        j = torch.arange(1, T + 1)
        k, p = j // P, j % P
        return dict(patch=k, slot=p, global_sees=k * P, local_reads=torch.where(p == 0, -1, j - 1))


def sample(logits, temperature):
    """logits (B, V) -> next byte (B, 1): greedy at temperature 0, else sampled."""
    if temperature > 0:
        return torch.multinomial(F.softmax(logits.float() / temperature, -1), 1)
    return logits.argmax(-1, keepdim=True)


# --- Building blocks: the causal Transformer of both models, with Sec. 2.3.2's cross-patch attention -------------

def rope_angles(pos, inv_freq):
    """Rotary angles for absolute positions pos (N or 1, T) -> (cos, sin), each (N, 1, T, hd/2)."""
    ang = pos.to(torch.float32)[:, None, :, None] * inv_freq
    return ang.cos(), ang.sin()


def rope(x, rot):
    """Rotary embedding (rotate-half form). x (N, H, T, hd), rot = rope_angles(...) -> (N, H, T, hd)."""
    cos, sin = (t.to(x.dtype) for t in rot)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    def __init__(self, d, n_head, use_rope=False):
        super().__init__()
        self.n_head, self.use_rope = n_head, use_rope
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)

    def forward(self, x, rot=None, cache=None, cross=None):
        """x (N, T, D) -> y (N, T, D) and this call's (k, v). rot: rotary (cos, sin) of the absolute positions;
        cross = (K, r): rows of x are the K patches of each sequence in order, and each patch also attends to the
        last r keys/values of the previous patch (Sec. 2.3.2); cache: decoding (speed path, cached_attention)."""
        N, T, D = x.shape
        H = self.n_head
        q, k, v = (t.view(N, T, H, D // H).transpose(1, 2) for t in self.qkv(x).split(D, dim=-1))  # (N, H, T, hd)
        if self.use_rope:
            q, k = rope(q, rot), rope(k, rot)
        if cache is not None:
            y = cached_attention(q, k, v, cache)
        elif cross is not None:                                   # Sec. 2.3.2: prepend the previous patch's last r
            K, r = cross
            prev = [F.pad(t.view(N // K, K, H, T, -1)[:, :-1, :, T - r:], (0, 0, 0, 0, 0, 0, 1, 0)).view(N, H, r, -1)
                    for t in (k, v)]                              # patch 0 gets zeros, masked out below
            own = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            first = (torch.arange(K, device=x.device) > 0)[:, None, None, None].expand(K, 1, T, r)
            mask = torch.cat((first, own.expand(K, 1, T, T)), -1).repeat(N // K, 1, 1, 1)  # (N, 1, T, r+T)
            y = F.scaled_dot_product_attention(q, torch.cat((prev[0], k), 2), torch.cat((prev[1], v), 2),
                                               attn_mask=mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(N, T, D)), (k, v)


class Block(nn.Module):
    def __init__(self, d, n_head, mlp_ratio, dropout, use_rope=False):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, n_head, use_rope)
        self.mlp = nn.Sequential(nn.Linear(d, mlp_ratio * d, bias=False), nn.GELU(),
                                 nn.Linear(mlp_ratio * d, d, bias=False))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, rot=None, cache=None, cross=None):
        # x (N, T, D) -> (N, T, D), this layer's (k, v)
        a, kv = self.attn(self.ln1(x), rot, cache, cross)
        x = x + self.drop(a)
        return x + self.drop(self.mlp(self.ln2(x))), kv


class Transformer(nn.Module):
    """A causal pre-LN decoder stack with a final LayerNorm. x (N, T, D) -> (N, T, D), per-layer (k, v)."""

    def __init__(self, d, n_layer, n_head, mlp_ratio, dropout, use_rope=False):
        super().__init__()
        self.use_rope = use_rope
        hd = d // n_head
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd),
                             persistent=False)
        self.blocks = nn.ModuleList(Block(d, n_head, mlp_ratio, dropout, use_rope) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, x, pos=None, caches=None, cross=None):
        # x (N, T, D), pos (N or 1, T) absolute positions (rotary only) -> (N, T, D), per-layer (k, v)
        rot = rope_angles(pos, self.inv_freq) if self.use_rope else None   # once for all layers
        kvs = []
        for i, blk in enumerate(self.blocks):
            x, kv = blk(x, rot, None if caches is None else caches[i], cross)
            kvs.append(kv)
        return self.ln_f(x), kvs


# --- Sec. 2.3.1: convolutional patch encoder -----------------------------------------------------------------

class CausalConvStack(nn.Module):
    """Causal 1-d convolutions over the byte embeddings, applied before patching. (B, T, D_G) -> (B, T, D_G)."""

    def __init__(self, d, kernels):
        super().__init__()
        self.kernels = tuple(kernels)
        self.convs = nn.ModuleList(nn.Conv1d(d, d, k) for k in self.kernels)
        self.halo = sum(k - 1 for k in self.kernels)              # how far back one output looks

    def forward(self, h):
        x = h.transpose(1, 2)                                     # (B, D_G, T)
        for k, conv in zip(self.kernels, self.convs):
            x = x + F.gelu(conv(F.pad(x, (k - 1, 0))))            # left padding only: causal
        return x.transpose(1, 2)


# ==== Speed paths: same results as the plain forms above, faster (tests/test_megabyte.py holds them equal) ====

def cached_attention(q, k, v, cache):
    """Decoding: the new positions q, k, v (N, H, T, hd) attend to the cached keys/values and to themselves;
    cache = dict(k, v) is extended in place. -> y (N, H, T, hd)."""
    if cache.get("k") is not None:
        k, v = torch.cat((cache["k"], k), 2), torch.cat((cache["v"], v), 2)
    cache["k"], cache["v"] = k, v
    T, Tk = q.shape[2], k.shape[2]
    if T == 1:                                                    # one new position sees everything cached
        return F.scaled_dot_product_attention(q, k, v)
    if T < Tk:
        mask = torch.ones(T, Tk, dtype=torch.bool, device=q.device).tril(Tk - T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@torch.no_grad()
def cached_generate(model, idx, max_new_tokens, temperature=0.0):
    """Megabyte.generate with KV caches: one global step per patch, then P local steps. idx (B, Tp) ->
    (B, Tp + max_new_tokens) and the logits of every step (B, max_new_tokens, V)."""
    cfg = model.cfg
    P, r = cfg.patch_size, cfg.cross_patch
    B, Tp = idx.shape
    # prefill: the teacher-forced pass over the prompt fills both caches. Next byte = paper position Tp.
    L = P * math.ceil((Tp + 1) / P)
    logits, g_all, g_kv, l_kv = model._core(F.pad(idx, (0, L - Tp)))
    k, p = divmod(Tp, P)
    g_cache = [dict(k=kk[:, :, :k + 1], v=vv[:, :, :k + 1]) for kk, vv in g_kv]
    g_out = g_all[:, k]                                           # (B, P*D_G) output of global position k
    l_cache = []
    for kk, vv in l_kv:                                            # (B*K, H, P, hd) -> patch k bytes 0..p
        kk, vv = (t.view(B, L // P, *t.shape[1:]) for t in (kk, vv))
        ck, cv = kk[:, k, :, :p + 1], vv[:, k, :, :p + 1]
        if r and k > 0:                                           # Sec. 2.3.2: the previous patch's last r
            ck, cv = torch.cat((kk[:, k - 1, :, P - r:], ck), 2), torch.cat((vv[:, k - 1, :, P - r:], cv), 2)
        l_cache.append(dict(k=ck, v=cv))
    step_logits = [logits[:, Tp]]
    out = idx
    halo = model.conv.halo if model.conv is not None else 0
    for i in range(max_new_tokens):
        nxt = sample(step_logits[-1], temperature)
        out = torch.cat((out, nxt), 1)
        if i == max_new_tokens - 1:
            break
        t = out.shape[1]                                          # paper position to predict next
        k, p = divmod(t, P)
        if p == 0:                                                # patch complete: one global step
            h = model.embed_bytes(out[:, max(0, t - P - halo):], start=max(0, t - P - halo))[:, -P:]
            g, _ = model.global_model(h.reshape(B, 1, -1), caches=g_cache)
            g_out = g[:, 0]
            for c in l_cache:                                     # keep the last r keys of the finished patch
                c["k"], c["v"] = (c["k"][:, :, -r:], c["v"][:, :, -r:]) if r else (None, None)
            x = model.local_pad.expand(B, -1)
        else:
            x = model.local_embed(nxt[:, 0])
        slot = model.w_gl(g_out.view(B, P, -1)[:, p])
        hl, _ = model.local_model((slot + x)[:, None], torch.full((1, 1), t, device=idx.device), caches=l_cache)
        step_logits.append(model.head(hl[:, 0]))
    return out, torch.stack(step_logits, 1)


# --- input checks ------------------------------------------------------------------------------------------------

def check_tokens(cfg, tokens, extra=0):
    if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.long or tokens.dim() != 2:
        raise ValueError("tokens must be an int64 tensor of shape (B, T); convert with .long()")
    if tokens.shape[1] == 0:
        raise ValueError("tokens is empty (T=0); give at least one byte")
    if tokens.shape[1] + extra > cfg.seq_len:
        raise ValueError(f"sequence of {tokens.shape[1] + extra} bytes exceeds seq_len={cfg.seq_len}; "
                         f"raise --seq_len or shorten the input")
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= cfg.vocab_size):
        raise ValueError(f"byte ids must be in [0, {cfg.vocab_size}); got {tokens.min()}..{tokens.max()}")


def check_batch(cfg, batch):
    x = batch["tokens"]
    check_tokens(cfg, x)
    if "modality" in batch and batch["modality"].numel() and batch["modality"].max() >= cfg.n_modalities:
        raise ValueError(f"modality ids must be < n_modalities={cfg.n_modalities}; MEGABYTE is byte-only")
    if "targets" in batch and batch["targets"].shape != x.shape:
        raise ValueError(f"targets shape {tuple(batch['targets'].shape)} != tokens shape {tuple(x.shape)}")


MODELS = {"megabyte": (Config, Megabyte, "bytes", dict())}
SUPPORTED_SETTINGS = {"megabyte": ("bytes", "text")}   # one token stream; train.py refuses others


if __name__ == "__main__":
    torch.manual_seed(0)
    cfg = Config(seq_len=256)
    model = Megabyte(cfg)
    text = b"MEGABYTE predicts bytes: a global model over patches and a local model inside each patch. " * 3
    x = torch.tensor(list(text[:129]), dtype=torch.long)[None]
    batch = dict(tokens=x[:, :-1], targets=x[:, 1:])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(80):
        _, loss, _ = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    n_g = sum(p.numel() for p in model.global_model.parameters())
    n_l = sum(p.numel() for p in model.local_model.parameters())
    print(f"params global {n_g:,} local {n_l:,} total {sum(p.numel() for p in model.parameters()):,}")
    print(f"loss after 80 steps {loss.item():.3f} nats = {loss.item() / math.log(2):.3f} bits/byte")
    model.eval()
    print(bytes(model.generate(x[:, :20], 60)[0].tolist()))
