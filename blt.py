"""Byte Latent Transformer: Patches Scale Better Than Tokens (Pagnoni, Pasunuru, Rodriguez et al. 2024)
https://arxiv.org/abs/2412.09871

BLT reads raw bytes grouped into patches of varying size.  A small frozen byte LM (the entropy model) starts a new
patch where the next byte is hard to predict; a light local encoder pools the bytes of each patch into one vector; a
large latent Transformer runs over patches only; a light local decoder turns patch states back into next-byte
predictions.  Predictable bytes share long patches (few global steps), surprising bytes get short ones.

Glossary (paper -> code):
    bytes + specials BOE, BOS, EOS, BPE (Sec. 2)  -> ids b + OFFSET (OFFSET = 4): cfg.vocab_size + 4 = 260 ids
    entropy model, H(x_i) (Sec. 2.3)              -> EntropyModel (registered "blt-entropy"), BLT.entropies()
    global / approx. monotonic constraint (2.3)   -> cfg.patching = "entropy" (theta_g) | "monotonic" (theta_r)
    space patching (2.2), strided patching (2.1)  -> cfg.patching = "space" | "static" (stride cfg.patch_size)
    theta_g / theta_r                             -> cfg.threshold (0: tuned at build to mean cfg.patch_size)
    hash n-gram embeddings (Sec. 3.2.1)           -> hash_ngram_ids(), BLT.hash_embs (n in cfg.hash_ngrams)
    local encoder E, l_E layers (Sec. 3.2)        -> BLT.encoder + BLT.enc_cross (a patch reads its own bytes)
    k query vectors per patch (Sec. 3.2.2)        -> cfg.cross_k
    latent global transformer G (Sec. 3.1)        -> BLT.global_blocks, causal over patches
    local decoder D, l_D layers (Sec. 3.3)        -> BLT.dec_cross (a byte reads ended patches) + BLT.decoder

Official code (facebookresearch/blt) vs paper, matched behind switches: its cross-attention residual is 2x + out
(cfg.cross_residual = 2; default 1, the paper's); its global model ends without a norm (cfg.global_norm = False,
the default); its eleven hash primes.  Departures: under the monotonic constraint byte 2 follows the rule (the
official code always starts a patch there); static patching makes the same real-byte patches without the official
code's BOE padding; the threshold is tuned on a sample of the entropy model, a stand-in for its training data.
Left out: the 8B scale, BPE-delimiter patching and n-gram lookup tables (the hashed embeddings are the paper's main
model); SwiGLU (GELU MLPs here); the entropy-context reset at newlines; incremental local / global stacks in
generation (only the entropy model keeps a KV cache).  The plain masked attention forms come first; the speed paths
(cfg.attention = "fast", the default: window attention in blocks, gathered cross-attention) end the file, tested equal.
Run:  python train.py --model blt-entropy --setting bytes                     (saves the entropy model)
      python train.py --compare dense,megabyte,blt --setting bytes --entropy_ckpt PATH
      python train.py --model blt --patching space                            (no entropy model needed)
      python blt.py                                                           (the shipped trained BLT's patches)
Read next: megalodon.py (a byte model without patches); megabyte.py was the fixed-patch ancestor.
"""
import math
import os
from dataclasses import dataclass, fields
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

OFFSET = 4                                   # Sec. 2: ids 0..3 are the specials BOE, BOS, EOS, BPE; byte b is b + 4
HASH_PRIMES = (1000000007, 5915587277, 1500450271, 3267000013, 5754853343, 4093082899, 9576890767, 3628273133,
               2860486313, 5463458053, 3367900313)   # Sec. 3.2.1: the official code's rolling-hash multipliers


@dataclass
class EntropyConfig:
    """The small causal byte LM of Sec. 2.3 (paper: 100M params, 14 layers, d 512, window 512)."""
    vocab_size: int = 256                    # data bytes (data.py sets it); the model uses vocab_size + OFFSET ids
    seq_len: int = 256
    n_layer: int = 2
    n_head: int = 2
    d_model: int = 32
    window: int = 128                        # sliding-window attention (bytes)
    rope_theta: float = 10000.0
    attention: str = "fast"                  # fast: window attention in blocks | masked: the plain masked form
    # valid values, one rule per field ("int >= 1", "one of a|b", ...; after ";" a note): checked when built
    RANGES: ClassVar[dict] = dict(
        vocab_size="int >= 1", seq_len="int >= 8", n_layer="int >= 1", n_head="int >= 1", d_model="int >= 1",
        window="int >= 1", rope_theta="float > 0", attention="one of fast|masked; the same results")

    def __post_init__(self):
        if self.d_model % (2 * self.n_head):
            raise ValueError(f"d_model/n_head: {self.d_model} must be a multiple of 2 * {self.n_head} (RoPE needs even "
                             "head sizes); change one")


@dataclass
class Config:
    vocab_size: int = 256                    # data bytes (data.py sets it); ids inside are b + OFFSET
    seq_len: int = 256
    # Sec. 2: patching
    patching: str = "entropy"                # entropy (global theta_g) | monotonic (theta_r) | space | static
    entropy_ckpt: str = ""                   # train.py checkpoint of "blt-entropy" (entropy / monotonic patching)
    threshold: float = 0.0                   # theta_g / theta_r in nats; 0 = tuned at build time to mean patch_size
    patch_size: float = 4.0                  # target mean patch size of the tuning (entropy modes); stride (static)
    max_patch_len: int = 16                  # split longer patches (0 = no limit)
    # Sec. 3.2.1: hash n-gram embeddings
    hash_ngrams: tuple = (3, 4, 5, 6, 7, 8)  # () disables them
    hash_vocab: int = 4096                   # buckets per table (paper: 500k)
    hash_functions: int = 1                  # tables per n (official code: several hash functions)
    # Sec. 3.2 / 3.3: local encoder and decoder (byte level, light)
    d_local: int = 32
    n_head_local: int = 2
    n_layer_enc: int = 1                     # l_E (paper: 1)
    n_layer_dec: int = 2                     # l_D (paper: 9 at 8B)
    local_window: int = 64                   # sliding window of the local self-attention
    cross_k: int = 4                         # query vectors per patch (paper: k = d_global / d_local)
    n_head_cross: int = 2
    enc_cross_all_layers: bool = False       # encoder cross-attention after every layer (default: last only)
    dec_cross_all_layers: bool = True        # decoder cross-attention before every layer (default: all, as paper)
    pool: str = "max"                        # how patch queries are initialised: max | mean
    cross_residual: int = 1                  # cross-attention adds out to 1 * x (paper) or 2 * x (official code)
    # Sec. 3.1: latent global transformer (the big one, over patches)
    d_global: int = 128
    n_head_global: int = 4
    n_layer_global: int = 2
    global_norm: bool = False                # RMSNorm after the global model (official code: none)
    rope_theta: float = 10000.0
    attention: str = "fast"                  # fast: window attention, gathered cross-attention | masked: plain forms
    RANGES: ClassVar[dict] = dict(
        vocab_size="int >= 1", seq_len="int >= 8", patching="one of entropy|monotonic|space|static",
        entropy_ckpt="path", threshold="float; 0 = tuned once at build to mean patch_size", patch_size="float >= 1",
        max_patch_len="int >= 0; 0 = no limit", hash_ngrams="ints >= 1; () = off", hash_vocab="int >= 1",
        hash_functions="int in [1, 11]; one official hash prime each", d_local="int >= 1", n_head_local="int >= 1",
        n_layer_enc="int >= 1", n_layer_dec="int >= 1", local_window="int >= 1", n_head_cross="int >= 1",
        cross_k="int >= 1; <= max_patch_len (or seq_len)", enc_cross_all_layers="bool", dec_cross_all_layers="bool",
        pool="one of max|mean", cross_residual="int in [1, 2]; 1 = the paper, 2 = the official code",
        d_global="int >= 1", n_head_global="int >= 1", n_layer_global="int >= 1", global_norm="bool",
        rope_theta="float > 0", attention="one of fast|masked; the same results")

    def __post_init__(self):   # relations between fields (the trainer checks each field's own range)
        for d, h, name in ((self.d_local, self.n_head_local, "d_local/n_head_local"),
                           (self.d_local, self.n_head_cross, "d_local/n_head_cross"),
                           (self.d_global, self.n_head_global, "d_global/n_head_global")):
            if d % (2 * h):
                raise ValueError(f"{name}: {d} must be a multiple of 2 * {h} (RoPE needs even head sizes); change one")
        most = self.max_patch_len or self.seq_len   # Sec. 3.2.2: the k queries of a patch read its bytes only
        if self.cross_k > most:
            raise ValueError(f"cross_k={self.cross_k} queries exceed the bytes a patch holds (at most {most}): its "
                             f"k x d_local numbers are made from at most {most} x d_local; use --cross_k <= {most}")
        # no silent flags: a key that cannot act in this configuration is an error naming the key that enables it
        if self.patching in ("space", "static") and (self.threshold or self.entropy_ckpt):
            raise ValueError(f"threshold and entropy_ckpt act only with --patching entropy or monotonic, "
                             f"not {self.patching}; drop them or change --patching")
        moot = self.patching == "space" or self.threshold        # patch_size is neither a stride nor a tuning target
        if self.patch_size != Config.patch_size and moot or self.patching == "static" and self.patch_size % 1:
            raise ValueError(f"patch_size={self.patch_size}: no effect with --patching space or a fixed --threshold "
                             "(--threshold 0 tunes the threshold to patch_size); static: a whole stride")


# --- Shared Transformer pieces (pre-norm, RoPE, causal sliding-window attention) -------------------------------------
def apply_rope(x, pos, theta):
    # x: (B, H, T, hd), pos: (T,) -> x with each pair (x1[i], x2[i]) of the two halves rotated by pos * theta^(-2i/hd)
    hd = x.shape[-1]
    inv = theta ** (-torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd)
    ang = pos.to(x.device, torch.float32)[:, None] * inv[None]
    c, s = ang.cos(), ang.sin()
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).type_as(x)


class SelfAttention(nn.Module):
    def __init__(self, d, n_head, window, theta, fast=True):
        super().__init__()
        self.n_head, self.window, self.theta, self.fast = n_head, window, theta, fast
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)

    def forward(self, x, cache=None):
        # x: (B, T, D) -> (B, T, D); cache: None or a dict {"k", "v": (B, H, T_past, hd)} updated in place
        B, T, D = x.shape
        q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in self.qkv(x).split(D, dim=-1))
        past = 0 if cache is None or "k" not in cache else cache["k"].shape[2]
        pos = torch.arange(past, past + T, device=x.device)
        q, k = apply_rope(q, pos, self.theta), apply_rope(k, pos, self.theta)
        if past:
            k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
        if cache is not None:
            cache["k"], cache["v"] = k, v
        if self.fast and past == 0 and 0 < 2 * self.window < T:
            y = window_attention(q, k, v, self.window)            # speed path (end of file): T x 2W scores
        elif past == 0 and (self.window <= 0 or self.window >= T):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:   # causal sliding window: query i sees keys j with i - window < j <= i (window 0: every j <= i)
            kpos = torch.arange(k.shape[2], device=x.device)
            mask = (kpos[None, :] <= pos[:, None]) & ((pos[:, None] - kpos[None, :] < self.window) | (self.window <= 0))
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    def __init__(self, d, n_head, window, theta, fast=True):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(d, eps=1e-5), nn.RMSNorm(d, eps=1e-5)
        self.attn = SelfAttention(d, n_head, window, theta, fast)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d, bias=False), nn.GELU(), nn.Linear(4 * d, d, bias=False))

    def forward(self, x, cache=None):   # x: (B, T, D) -> (B, T, D)
        x = x + self.attn(self.norm1(x), cache)
        return x + self.mlp(self.norm2(x))


def _init(module):
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)


def _byte_loss(logits, targets):
    # logits: (B, T, vocab + OFFSET), targets: (B, T) bytes or -1 -> mean cross-entropy in nats per byte (260-way)
    tgt = torch.where(targets >= 0, targets + OFFSET, torch.full_like(targets, -1))
    return F.cross_entropy(logits.flatten(0, 1).float(), tgt.flatten(), ignore_index=-1)


# --- Sec. 2.3: the entropy model, a small causal byte LM, trained first and then frozen ----------------------------
class EntropyModel(nn.Module):
    """Registered as "blt-entropy": train it like any byte LM, then hand its checkpoint to blt."""
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab_size + OFFSET, cfg.d_model)   # bytes + the specials
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_head, cfg.window, cfg.rope_theta, cfg.attention == "fast")
                                    for _ in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.d_model, eps=1e-5)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size + OFFSET, bias=False)
        _init(self)

    def forward_ids(self, x, caches=None):
        # x: (B, T) ids (bytes + OFFSET) -> logits (B, T, 260): the distribution of the NEXT byte at every position
        h = self.emb(x)
        for i, blk in enumerate(self.blocks):
            h = blk(h, None if caches is None else caches[i])
        return self.head(self.norm(h))

    def entropies(self, x, caches=None):
        # Sec. 2.3: H(x_{t+1}) = -sum_v p(v | x_<=t) log p(v | x_<=t), natural log; x: (B, T) ids -> (B, T) float32
        logp = F.log_softmax(self.forward_ids(x, caches).float(), dim=-1)
        return -(logp.exp() * logp).sum(-1)

    def forward(self, batch):
        # batch["tokens"], ["targets"]: (B, T) bytes -> byte logits (B, T, 256), loss (nats per byte) or None, parts
        _check_tokens(batch["tokens"], self.cfg, "blt-entropy")
        logits = self.forward_ids(batch["tokens"] + OFFSET)
        loss = None if batch.get("targets") is None else _byte_loss(logits, batch["targets"])
        return logits[..., OFFSET:], loss, {} if loss is None else {"loss_text": loss.detach()}


# --- Sec. 2: patching functions (all causal: starts[:, i] depends on x_<i only) ------------------------------------
def patch_starts(x, mode, ent=None, threshold=0.0, patch_size=4.0, max_patch_len=0):
    """Where patches start.  x: (B, T) ids (bytes + OFFSET); ent: (B, T) entropies of the next byte,
    ent[:, t] = H(x_{t+1}) (entropy / monotonic only).  -> starts: (B, T + 1) bool, starts[:, i] = byte i begins a
    patch; i = T is the next, unseen byte, decided from H(x_T), which needs x_<T only (the official convention).
    Bytes 0 and 1 always start patches.  Causal: the patches of a prefix are a prefix of the patches."""
    B, T = x.shape
    starts = torch.zeros(B, T + 1, dtype=torch.bool, device=x.device)
    H = None if ent is None else torch.cat([ent.new_zeros(B, 1), ent], 1)     # H[:, i] = H(x_i), i = 1..T
    if mode == "entropy":              # Sec. 2.3 global constraint H(x_i) > theta_g
        starts[:, 2:] = H[:, 2:] > threshold
    elif mode == "monotonic":          # Sec. 2.3 approximate monotonic constraint H(x_i) - H(x_{i-1}) > theta_r
        starts[:, 2:] = H[:, 2:] - H[:, 1:-1] > threshold
    elif mode == "space":              # Sec. 2.2: byte i starts a patch when byte i-1 is space-like and byte i-2 is
        b = x - OFFSET                 # not (the first byte of a run closes a patch, the rest of the run opens one)
        alnum = ((b >= 48) & (b <= 57)) | ((b >= 65) & (b <= 90)) | ((b >= 97) & (b <= 122))
        space_like = ~alnum & ~((b >= 0x80) & (b < 0xC0))        # not a letter, digit or UTF-8 continuation byte
        starts[:, 2:] = space_like[:, 1:] & ~space_like[:, :-1]
    elif mode == "static":             # Sec. 2.1: fixed stride (after the 1-byte first patch)
        i = torch.arange(T + 1, device=x.device)
        starts[:] = ((i - 1) % int(patch_size) == 0)[None]
    else:
        raise ValueError(f"patching={mode!r} is unknown; use one of entropy, monotonic, space, static")
    starts[:, :2] = True                                       # the first byte is a patch of its own
    if max_patch_len > 0:              # split patches longer than max_patch_len (causal: a counter since the start)
        i = torch.arange(T + 1, device=x.device).expand(B, T + 1)
        last = torch.where(starts, i, torch.zeros_like(i)).cummax(1).values
        starts = starts | ((i - last) % max_patch_len == 0)
    return starts


def patch_lengths(starts):
    """starts: (B, T + 1) -> list of per-row lists of patch lengths over the T real bytes (each sums to T)."""
    T = starts.shape[1] - 1
    bounds = [row.nonzero().flatten().tolist() + [T] for row in starts[:, :T]]
    return [[b - a for a, b in zip(s[:-1], s[1:])] for s in bounds]


def patch_index(starts):
    """starts: (B, T + 1) -> pid (B, T) the patch of each byte, dec (B, T) the last patch that ENDED at or before
    byte t (patch j ends at t when byte t + 1 starts patch j + 1), i.e. the patch the decoder at t may read."""
    return starts[:, :-1].long().cumsum(1) - 1, starts[:, 1:].long().cumsum(1) - 1


def threshold_for(ent, x, mode, target, max_patch_len=0, iters=40):
    """Sec. 2.3: the threshold whose mean patch size on the sample (x, ent) is closest to `target` (bisection;
    the mean patch size grows with the threshold)."""
    lo, hi = (float(ent.min()) - 1.0, float(ent.max()) + 1.0) if mode == "entropy" else \
             (float(-(ent.max() - ent.min())) - 1.0, float(ent.max() - ent.min()) + 1.0)
    mean = lambda th: x.numel() / patch_starts(x, mode, ent, th, max_patch_len=max_patch_len)[:, :-1].sum().item()
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean(mid) < target else (lo, mid)
    # bisection ends ON a sample value; move to the middle of the gap around it so that float noise (a prefix vs the
    # full sequence, a KV cache vs none) cannot flip a boundary of this sample
    H = torch.cat([ent.new_zeros(ent.shape[0], 1), ent], 1)
    stat = (H[:, 2:] if mode == "entropy" else H[:, 2:] - H[:, 1:-1]).flatten().float()
    th = (lo + hi) / 2
    below, above = stat[stat <= th], stat[stat > th]
    if len(below) and len(above):
        th = (float(below.max()) + float(above.min())) / 2
    return th


# --- Sec. 3.2.1: hash n-gram embeddings ---------------------------------------------------------------------------
def hash_ngram_ids(x, n, func, buckets):
    """x: (B, T) ids -> (B, T) bucket of the n-gram x_{i-n+1..i} (left zero padding, as the official code):
    sum_j x_{i-n+1+j} * prime^j (int64, wrapping) mod buckets.  Depends on that n-gram only."""
    p = HASH_PRIMES[func]
    powers = [(p ** j) % 2 ** 64 for j in range(n)]
    powers = torch.tensor([w - 2 ** 64 if w >= 2 ** 63 else w for w in powers], dtype=torch.long, device=x.device)
    win = F.pad(x, (n - 1, 0)).unfold(1, n, 1)              # (B, T, n): bytes i-n+1 .. i
    return (win * powers).sum(-1) % buckets


# --- Sec. 3.2.2 / 3.3.1: cross-attention between patches and bytes -----------------------------------------------
class CrossAttention(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.n_head = n_head
        self.q_norm, self.kv_norm = nn.RMSNorm(d, eps=1e-5), nn.RMSNorm(d, eps=1e-5)
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x, kv, mask):
        # x: (B, Q, D) queries, kv: (B, S, D), mask: (B, Q, S) bool (True: query may read that row) -> (B, Q, D)
        B, Q, D = x.shape
        q = self.wq(self.q_norm(x)).view(B, Q, self.n_head, -1).transpose(1, 2)
        kvn = self.kv_norm(kv)
        k, v = (w(kvn).view(B, kv.shape[1], self.n_head, -1).transpose(1, 2) for w in (self.wk, self.wv))
        mask = mask | ~mask.any(-1, keepdim=True)              # padded queries (no keys) read anything, unused
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
        return self.wo(y.transpose(1, 2).reshape(B, Q, D))


# --- The model ---------------------------------------------------------------------------------------------------
class BLT(nn.Module):
    def __init__(self, cfg, entropy_model=None):
        super().__init__()
        cfg.__post_init__()
        self.cfg = cfg
        V, D, G, K = cfg.vocab_size + OFFSET, cfg.d_local, cfg.d_global, cfg.cross_k
        local = (D, cfg.n_head_local, cfg.local_window, cfg.rope_theta, cfg.attention == "fast")   # a byte-level Block
        # Sec. 3.2.1: byte embeddings + hash n-gram embeddings (one table per (hash function, n))
        self.tok_emb = nn.Embedding(V, D)
        self.hash_embs = nn.ModuleList(nn.Embedding(cfg.hash_vocab, D)
                                       for _ in range(cfg.hash_functions) for _ in cfg.hash_ngrams)
        # Sec. 3.2: local encoder + cross-attention pooling bytes into patches
        self.encoder = nn.ModuleList(Block(*local) for _ in range(cfg.n_layer_enc))
        self.enc_cross = nn.ModuleList(CrossAttention(D, cfg.n_head_cross)
                                       for _ in range(cfg.n_layer_enc if cfg.enc_cross_all_layers else 1))
        self.patch_query = nn.Linear(D, K * D, bias=False)       # pooled patch -> k query vectors
        self.to_global = nn.Linear(K * D, G, bias=False) if K * D != G else nn.Identity()
        # Sec. 3.1: latent global transformer over patches
        self.global_blocks = nn.ModuleList(Block(G, cfg.n_head_global, 0, cfg.rope_theta)
                                           for _ in range(cfg.n_layer_global))
        self.global_norm = nn.RMSNorm(G, eps=1e-5) if cfg.global_norm else nn.Identity()
        # Sec. 3.3: local decoder, cross-attention to the patches before every layer, then the byte head
        self.to_decoder = nn.Linear(G, K * D, bias=False)       # patch state -> k key/value slots
        self.dec_cross = nn.ModuleList(CrossAttention(D, cfg.n_head_cross)
                                       for _ in range(cfg.n_layer_dec if cfg.dec_cross_all_layers else 1))
        self.decoder = nn.ModuleList(Block(*local) for _ in range(cfg.n_layer_dec))
        self.norm = nn.RMSNorm(D, eps=1e-5)
        self.head = nn.Linear(D, V, bias=False)
        _init(self)
        # Sec. 2.3: the frozen entropy model, a submodule (saved with BLT; the trainer counts its forward FLOPs only)
        self.entropy_model = None
        if cfg.patching in ("entropy", "monotonic"):
            em = entropy_model if entropy_model is not None else load_entropy_model(cfg.entropy_ckpt, cfg.vocab_size)
            self.entropy_model = em.requires_grad_(False).eval()
        self.register_buffer("threshold", torch.tensor(float(cfg.threshold)))   # saved with the checkpoint
        if self.entropy_model is not None and not cfg.threshold:
            self.tune_threshold(self.sample_bytes())            # build time, once; never in forward / generate

    def train(self, mode=True):
        super().train(mode)
        if self.entropy_model is not None:
            self.entropy_model.eval()                            # frozen: always in eval mode
        return self

    # -- Sec. 2: patching --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def entropies(self, x):   # x: (B, T) ids -> (B, T) H(x_{t+1}) from the frozen entropy model (forward only)
        return self.entropy_model.entropies(x)

    @torch.no_grad()
    def sample_bytes(self, rows=16, length=256, seed=0):
        """(rows, min(length, seq_len)) bytes sampled from the entropy model at temperature 1 with a fixed seed: a
        stand-in for the training data it was trained on, the same on every rank and at every build."""
        em, g = self.entropy_model, torch.Generator(device=self.threshold.device).manual_seed(seed)
        x = torch.full((rows, 1), ord(" ") + OFFSET, device=self.threshold.device)
        caches = [dict() for _ in em.blocks]
        logits = em.forward_ids(x, caches)
        for _ in range(min(length, self.cfg.seq_len) - 1):
            new = torch.multinomial(F.softmax(logits[:, -1, OFFSET:].float(), -1), 1, generator=g) + OFFSET
            x = torch.cat([x, new], 1)
            logits = em.forward_ids(new, caches)
        return x - OFFSET

    @torch.no_grad()
    def tune_threshold(self, tokens):
        """Sec. 2.3: set (and return) the threshold giving mean patch size cfg.patch_size on `tokens` (B, T) bytes.
        Done at build on sample_bytes(); call it on training bytes (the same on every rank) to tune on the data."""
        x, cfg = tokens.to(self.threshold.device) + OFFSET, self.cfg
        if self.entropy_model is None:
            raise ValueError(f"tune_threshold: patching={cfg.patching} has no threshold; use entropy or monotonic")
        self.threshold.fill_(threshold_for(self.entropies(x), x, cfg.patching, cfg.patch_size, cfg.max_patch_len))
        return float(self.threshold)

    def patch(self, x, ent=None):
        """x: (B, T) ids -> starts (B, T + 1) bool (the threshold is fixed: see tune_threshold)."""
        cfg = self.cfg
        if self.entropy_model is not None and ent is None:
            ent = self.entropies(x)
        return patch_starts(x, cfg.patching, ent, float(self.threshold), cfg.patch_size, cfg.max_patch_len)

    def embed(self, x):
        # Sec. 3.2.1: e_i = x_i embedding + sum over hash functions f and n of E_{f,n}[hash_f(n-gram ending at i)]
        e = self.tok_emb(x)
        fn = [(f, n) for f in range(self.cfg.hash_functions) for n in self.cfg.hash_ngrams]
        for emb, (f, n) in zip(self.hash_embs, fn):
            e = e + emb(hash_ngram_ids(x, n, f, self.cfg.hash_vocab))
        return e

    def encode_patches(self, h, layer, pid, P, patches=None):
        """Sec. 3.2.2. h: (B, T, D) byte states, pid: (B, T) patch of each byte -> patches (B, P*k, D).
        Queries start as the pooled bytes of each patch, projected to k vectors; each patch reads its own bytes."""
        B, T, D = h.shape
        K, ca = self.cfg.cross_k, self.enc_cross[layer]
        if patches is None:
            idx = pid[..., None].expand(B, T, D)
            if self.cfg.pool == "max":
                pooled = h.new_full((B, P, D), float("-inf")).scatter_reduce(1, idx, h, "amax", include_self=True)
                pooled = pooled.masked_fill(pooled == float("-inf"), 0.0)   # padded patches (no bytes)
            else:
                s = h.new_zeros(B, P, D).scatter_add_(1, idx, h)
                cnt = torch.zeros(B, P, device=h.device).scatter_add_(1, pid, torch.ones_like(pid, dtype=torch.float))
                pooled = s / cnt.clamp(min=1)[..., None].to(s.dtype)
            patches = self.patch_query(pooled).view(B, P * K, D)
        if self.cfg.attention == "fast" and self.cfg.max_patch_len > 0:   # speed path: P * max_patch_len scores
            return self.cfg.cross_residual * patches + encode_gathered(ca, patches, h, pid, P, self.cfg.max_patch_len)
        # the k queries of patch p read the bytes of patch p only: a (B, P*k, T) mask
        mask = torch.arange(P, device=h.device).repeat_interleave(K)[None, :, None] == pid[:, None, :]
        return self.cfg.cross_residual * patches + ca(patches, h, mask)

    def forward_ids(self, x, starts):
        """x: (B, T) ids, starts: (B, T + 1) -> logits (B, T, V) over the 260 ids."""
        B, D, K = x.shape[0], self.cfg.d_local, self.cfg.cross_k
        pid, dec = patch_index(starts)
        # patches per row, right-padded to the longest row: after every real patch, so no real position reads them
        P = int(pid[:, -1].max()) + 1
        # Sec. 3.2: local encoder (causal, windowed) and cross-attention pooling into patches
        h = self.embed(x)
        patches = None
        for i, blk in enumerate(self.encoder):
            h = blk(h)
            if self.cfg.enc_cross_all_layers or i == len(self.encoder) - 1:
                patches = self.encode_patches(h, i if self.cfg.enc_cross_all_layers else 0, pid, P, patches)
        # Sec. 3.1: the latent global transformer, causal over patches
        g = self.to_global(patches.view(B, P, K * D))
        for blk in self.global_blocks:
            g = blk(g)
        g = self.global_norm(g)                                   # (B, P, d_global)
        # Sec. 3.3: local decoder; before a block, byte t reads the k slots of patch dec[t], the last patch that ended
        # at or before t: the logit at t (which predicts x_{t+1}) depends on x_<=t only, patch boundaries included
        slots = self.to_decoder(g).view(B, P * K, D)                 # k key/value slots per patch
        for i, blk in enumerate(self.decoder):
            if self.cfg.dec_cross_all_layers or i == 0:
                ca = self.dec_cross[i if self.cfg.dec_cross_all_layers else 0]
                if self.cfg.attention == "masked":                 # a (B, T, P*k) mask "slot of patch dec[t]"
                    read = ca(h, slots, dec[:, :, None] == torch.arange(P, device=h.device).repeat_interleave(K))
                else:                                             # speed path (end of file): k scores per byte
                    read = decode_gathered(ca, h, slots, dec, K)
                h = self.cfg.cross_residual * h + read
            h = blk(h)
        return self.head(self.norm(h))

    def forward(self, batch):
        # batch["tokens"], ["targets"]: (B, T) bytes -> logits (B, T, 256): the byte columns of the 260-way head;
        # loss: the 260-way cross-entropy in nats per byte (None without targets); parts, with mean patch sizes
        _check_tokens(batch["tokens"], self.cfg, "blt")
        x = batch["tokens"] + OFFSET
        starts = self.patch(x)
        logits = self.forward_ids(x, starts)
        if batch.get("targets") is None:
            return logits[..., OFFSET:], None, {}
        loss = _byte_loss(logits, batch["targets"])
        s, kind = starts[:, :-1].float(), batch.get("byte_kind")   # s: (B, T), 1 where byte t starts a patch
        parts = {"loss_text": loss.detach(), "patch_size": (s.numel() / s.sum()).detach()}   # bytes per patch
        for k, name in enumerate(("text", "random", "predictable") if kind is not None else ()):   # data.py's kinds
            sel = kind[:, :s.shape[1] - 1].to(s.device) == k        # kind of input byte t = kind of target t-1
            if sel.any():
                parts[f"patch_size_{name}"] = (sel.sum() / s[:, 1:][sel].sum().clamp(min=1)).detach()
        return logits[..., OFFSET:], loss, parts

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=0.0):
        """idx: (B, Tp) bytes -> (B, Tp + max_new_tokens), greedy when temperature == 0.  A prefix's patches never
        change (causal), so one cached entropy-model step per new byte decides if the NEXT byte starts a patch."""
        _check_tokens(idx, self.cfg, "blt.generate", new=max_new_tokens)
        x = idx + OFFSET
        caches = ent = None
        if self.entropy_model is not None:
            caches = [dict() for _ in self.entropy_model.blocks]
            ent = self.entropy_model.entropies(x, caches)        # (B, Tp)
        for _ in range(max_new_tokens):
            starts = self.patch(x, ent)
            logits = self.forward_ids(x, starts)[:, -1, OFFSET:].float()   # (B, 256)
            new = torch.multinomial(F.softmax(logits / temperature, dim=-1), 1) if temperature > 0 else \
                logits.argmax(-1, keepdim=True)
            x = torch.cat([x, new + OFFSET], 1)
            if caches is not None:                               # one incremental entropy step for the new byte
                ent = torch.cat([ent, self.entropy_model.entropies(new + OFFSET, caches)], 1)
        return x - OFFSET


# ==== Speed paths: same results as the plain forms above, faster (tests/test_blt.py holds them equal) ============
def window_attention(q, k, v, W):
    """Causal sliding-window attention computed in blocks of W queries, each against its own and the previous block
    of keys: T * 2W scores instead of T * T (what makes the local models cheap, and what the trainer's FLOP count
    sees).  q, k, v: (B, H, T, hd) -> (B, H, T, hd)."""
    B, H, T, hd = q.shape
    n = -(-T // W)                                                 # blocks of W queries, the last one padded
    q, k, v = (F.pad(t, (0, 0, 0, n * W - T)) for t in (q, k, v))
    q = q.view(B, H * n, W, hd)
    k, v = (torch.cat([F.pad(t, (0, 0, W, 0))[:, :, :n * W], t], -1).view(B, H, n, W, 2, hd)
            .permute(0, 1, 2, 4, 3, 5).reshape(B, H * n, 2 * W, hd) for t in (k, v))   # previous block, own block
    i = torch.arange(W, device=q.device)[:, None] + W              # query position inside its 2W key span
    j = torch.arange(2 * W, device=q.device)[None, :]
    first = (torch.arange(n, device=q.device) == 0)[:, None, None]   # block 0 has no previous block
    mask = (j <= i) & (i - j < W) & ~(first & (j < W))              # (n, W, 2W)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.repeat(H, 1, 1)[None])
    return y.view(B, H, n * W, hd)[:, :, :T]


def gathered_cross_attention(ca, x, kv, index, valid=None):
    """CrossAttention `ca` where query group n reads only the kv rows index[:, n] (where valid): the dense form with
    mask "s is a valid entry of index[group]", at N * L instead of N * S scores.
    x: (B, N, Q, D) queries in N groups, kv: (B, S, D), index: (B, N, L), valid: (B, N, L) bool or None -> x's shape"""
    B, N, Q, D = x.shape
    L, H = index.shape[-1], ca.n_head
    q = ca.wq(ca.q_norm(x)).view(B, N, Q, H, D // H)
    kvn = ca.kv_norm(kv)
    idx = index.reshape(B, N * L, 1).expand(B, N * L, D)
    k, v = (w(kvn).gather(1, idx).view(B, N, L, H, D // H) for w in (ca.wk, ca.wv))
    att = torch.einsum("bnqhd,bnlhd->bnhql", q, k) / math.sqrt(D // H)
    if valid is not None:
        valid = valid | ~valid.any(-1, keepdim=True)          # padded groups (no entries) read anything, unused
        att = att.masked_fill(~valid[:, :, None, None, :], float("-inf"))
    y = torch.einsum("bnhql,bnlhd->bnqhd", att.softmax(-1), v)
    return ca.wo(y.reshape(B, N, Q, D))


def encode_gathered(ca, patches, h, pid, P, L):
    # BLT.encode_patches' cross-attention: patches (B, P*k, D), h: (B, T, D), pid: (B, T) -> (B, P*k, D).
    # Patch p reads its own n[p] <= L bytes, first[p] .. first[p] + n[p] - 1 (L = max_patch_len)
    B, T, D = h.shape
    ar = torch.arange(T, device=h.device).expand(B, T)
    first = torch.full((B, P), T - 1, device=h.device, dtype=torch.long).scatter_reduce(1, pid, ar, "amin")
    n = torch.zeros(B, P, device=h.device, dtype=torch.long).scatter_add_(1, pid, torch.ones_like(pid))
    off = torch.arange(L, device=h.device)
    index = (first[..., None] + off).clamp(max=T - 1)                       # (B, P, L)
    return gathered_cross_attention(ca, patches.view(B, P, -1, D), h, index, off < n[..., None]).view(B, -1, D)


def decode_gathered(ca, h, slots, dec, K):
    # BLT.forward_ids' decoder cross-attention: byte t reads the k slots (B, P*k, D) of patch dec[t] -> (B, T, D)
    idx = dec[..., None] * K + torch.arange(K, device=h.device)             # (B, T, k)
    return gathered_cross_attention(ca, h[:, :, None], slots, idx)[:, :, 0]


# --- Loading the entropy model, input checks ------------------------------------------------------------------------
def load_entropy_model(path, vocab_size):
    """A frozen EntropyModel from a train.py checkpoint of "blt-entropy", or a one-line ValueError.  The file is
    checked before it is trusted: a regular file (a FIFO would block torch.load), tensors and plain types only (a
    pickled object never runs), a config of the right types whose sizes are its weights' (it allocates no more)."""
    def refused(why):
        return ValueError(f"entropy_ckpt {path!r}: {why}; entropy patching needs a trained entropy model: train one "
                          "with `python train.py --model blt-entropy --setting bytes` (or --patching space / static)")
    if not path or not os.path.isfile(path):   # stat only (symlinks followed)
        raise refused("no file" if not path or not os.path.exists(path) else "not a regular file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        name, mcfg, state = ckpt["config"]["model"], dict(ckpt["config"]["model_cfg"]), dict(ckpt["model"])
    except Exception as e:   # noqa: BLE001 -- any unreadable file gets the same one-line answer
        first = (str(e).strip().splitlines() or [""])[0][:120]
        raise refused("it holds pickled Python objects, which are never loaded (weights_only=True)"
                      if "unsupported global" in str(e).lower()   # torch's wording varies in case
                      else f"cannot read it ({type(e).__name__}: {first})") from None
    if name != "blt-entropy":
        raise refused(f"it holds model {name!r}, not 'blt-entropy'")
    kw = {f.name: mcfg[f.name] for f in fields(EntropyConfig) if f.name in mcfg}
    for k, v in kw.items():   # each field of the type of its default (an int where a float is due), never a bool
        default = getattr(EntropyConfig, k)
        if isinstance(v, bool) or not isinstance(v, (int, float) if isinstance(default, float) else type(default)):
            raise refused(f"its config's {k}={v!r} is not a {type(default).__name__}")
    d, n, V = (kw.get(k, getattr(EntropyConfig, k)) for k in ("d_model", "n_layer", "vocab_size"))
    layers = {k.split(".")[1] for k in state if isinstance(k, str) and k.startswith("blocks.")}
    emb = state.get("emb.weight")
    if not (all(isinstance(k, str) and torch.is_tensor(t) for k, t in state.items()) and torch.is_tensor(emb)
            and emb.dim() == 2 and emb.shape[1] == d and len(layers) == n):
        raise refused(f"its weights are not tensors of its config's sizes (d_model {d}, n_layer {n})")
    if V != vocab_size:
        raise ValueError(f"entropy model vocab_size={V} != blt vocab_size={vocab_size}; train it on the same setting")
    try:   # EntropyConfig checks the relations between its fields, load_state_dict every weight's shape
        model = EntropyModel(EntropyConfig(**kw))
        model.load_state_dict(state)
    except (ValueError, RuntimeError) as e:
        raise refused(f"it does not fit EntropyModel ({str(e).splitlines()[0]})") from None
    return model


def _check_tokens(tokens, cfg, who, new=0):   # new: the bytes generate() appends
    if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.long or tokens.dim() != 2 or tokens.shape[1] < 1:
        raise ValueError(f"{who}: tokens must be an int64 tensor of shape (B, T) with T >= 1; convert with .long()")
    if tokens.shape[1] + new > cfg.seq_len:
        raise ValueError(f"{who}: {tokens.shape[1]} + {new} new bytes > seq_len={cfg.seq_len}; crop or raise --seq_len")
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= cfg.vocab_size):
        raise ValueError(f"{who}: byte ids must be in [0, {cfg.vocab_size}); check the data or use --setting bytes")


MODELS = {"blt-entropy": (EntropyConfig, EntropyModel, "bytes", dict()), "blt": (Config, BLT, "bytes", dict())}
SUPPORTED_SETTINGS = {"blt-entropy": ("bytes",), "blt": ("bytes",)}   # byte models (the text setting's ids are words)


if __name__ == "__main__":   # the shipped trained BLT marks where its entropy model starts patches on an eval row
    import data
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, "docs", "ckpt", "blt.pt")
    if not os.path.isfile(path):
        raise SystemExit(f"no trained checkpoint at {path}: restore the shipped one, `git checkout docs/ckpt/blt.pt`")
    ck = torch.load(path, map_location="cpu", weights_only=True)         # tensors and plain types only
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in ck["config"]["model_cfg"].items()}
    kw["entropy_ckpt"] = os.path.join(here, kw["entropy_ckpt"])           # the shipped entropy model (in the repo)
    model = BLT(Config(**kw)).eval()                                      # threshold: the trained one (no tuning)
    model.load_state_dict({k: v.float() for k, v in ck["model"].items()})   # fp16 on disk
    print(f"BLT trained {ck['step']} steps on the bytes setting ({path}): eval "
          f"{ck['eval']['eval_loss'] / math.log(2):.3f} bits/byte; a patch starts where the trained entropy "
          f"model's H(next byte) > {float(model.threshold):.2f} nats")
    b = data.make_data("bytes", seq_len=model.cfg.seq_len, seed=0).get_batch("val", 1, 0)
    x, kind, names = b["tokens"] + OFFSET, b["byte_kind"][0], ("caption", "random", "predictable")
    starts = model.patch(x)[0, :-1]
    print("mean patch length on an eval row, by the data's kind of byte:", ", ".join(
        f"{n} {int((kind == k).sum()) / max(1, int(starts[kind == k].sum())):.1f} bytes" for k, n in enumerate(names)))
    print(f"its first stretches, '/' before every patch: on random bytes H is near-uniform (about a patch per "
          f"byte); elsewhere H stays low and patches run to max_patch_len = {model.cfg.max_patch_len}:")
    kinds, counts = torch.unique_consecutive(kind, return_counts=True)   # the row's runs of one kind of byte
    for k, i, n in list(zip(kinds.tolist(), (counts.cumsum(0) - counts).tolist(), counts.tolist()))[:5]:
        text = "".join(("/" if starts[t] else "") + chr(int(x[0, t]) - OFFSET) for t in range(i, i + min(n, 90)))
        print(f"  {names[k]:>11s}: {text.strip()}")
