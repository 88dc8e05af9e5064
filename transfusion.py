"""Transfusion: Predict the Next Token and Diffuse Images with One Multi-Modal Model (Zhou, Yu, Babu et al. 2024),
arXiv 2408.11039; and LMFusion: Adapting Pretrained Language Models for Multimodal Generation (Shi, Han, Zhou et al.
2024), arXiv 2412.15188.

One transformer reads mixed sequences: text as discrete tokens, trained by next-token prediction, and each image as
continuous patch vectors between <boi> and <eoi>, noised by DDPM, whose noise the same transformer predicts. Attention
is causal across the sequence and bidirectional inside each image. LMFusion starts from a text-only LM, adds an image
copy of every module (MoT-style, attention joint), freezes the text side and trains the image side.

Glossary (paper -> code):
    x_0 (clean latent patches)          -> an image's patches (n_patches, patch_dim): batch["patches"] at its positions
    t ~ U{0..T-1}, one per image; T     -> t (N_img,); cfg.diffusion_steps
    alpha_bar_t, x_t (Sec. 2.2, Eq. 3)  -> Diffusion.alpha_bar (cosine schedule), Diffusion.q_sample
    eps_theta(x_t, t, c) (Eq. 4)        -> Transfusion._eps (backbone + patch decoder); predict_eps adds guidance
    L_LM (Eq. 1), L_DDPM (Eq. 4)        -> parts["loss_text"], parts["loss_image"]; L = L_LM + cfg.lam L_DDPM (Eq. 5)
    patch encoder / decoder (Sec. 3.2)  -> PatchCodec: "linear" or "unet" (cfg.patch_codec); timestep MLP -> t_mlp
    Transfusion attention (Sec. 3.3)    -> attention_mask; cfg.image_attn="causal" is the paper's ablation
    BOI / EOI; classifier-free guidance -> cfg.boi_id / cfg.eoi_id; cfg.cond_dropout (training), cfg.guidance
    noise limiting (Sec. 4)             -> cfg.noise_limit: images that precede their caption get t < noise_limit
    LMFusion theta_text, theta_img      -> modality 0 / 1 weights of the MoT backbone; cfg.lmfusion = base ckpt path

Departures from the paper (the measurements behind them: RESULTS.md):
  * no VAE: toy 16x16x3 images in [-1, 1], cut into 16 patches of 4x4x3, stand in for latents.
  * cfg.backbone from mot.py ("dense" = mot.Transformer with every untie_* off, so "dense" and "mot" differ only in
    the untied weights) or mom.py ("mamba" / "mom": causal everywhere, the image mask does not apply).
  * U-Net codec: two conv levels, AdaGroupNorm on t (the paper: AdaLayerNorm), skip connections around the transformer.
  * the eps head is v-parametrized (cfg.eps_param="v"; "direct" = the paper); the loss stays the eps-MSE, weighted per
    image by cfg.loss_weight="trunc_snr" (Salimans & Ho 2022; "uniform" = the paper, "min_snr" = Min-SNR-5).
  * a learned embedding of each patch's place in its image (cfg.patch_pos_emb), beside RoPE.
  * sampling: 50 DDIM steps by default, for fast CPU evals (the paper: 250); --sampler=ddpm --sample_steps=250.
  * each row's diffusion draws (t, noise, caption dropout) come from a generator seeded by (model seed, row_id), so
    any split of a batch (micro-batches, DDP ranks) trains on the same noise.
Left out, for a CPU toy: the 7B scale and 2T tokens, the VAE, image editing, and FID / CLIP metrics (data.py's pixel
scorer stands in).

Run:   python train.py --model transfusion     (also transfusion-mot, -mamba, -mom; python transfusion.py: a demo)
       python train.py --model transfusion --patch_codec=unet --eps_param=direct --loss_weight=uniform   (paper-like)
       python train.py --model lmfusion-base && python train.py --model lmfusion     (LMFusion in two steps)
Read first: mot.py (the Transformer backbone), mom.py (the Mamba backbones).  Read next: megabyte.py.
"""
import math
import os
from dataclasses import dataclass, fields
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
import mot


IMAGE = 1   # the modality id of image patches (data.py's IMAGE); every other position is a discrete token


@dataclass
class Config:
    # data (train.py copies these from ds.model_fields())
    vocab_size: int = 64
    n_modalities: int = 2
    modality_names: tuple = ("text", "image")   # loss names in parts: loss_<name>; IMAGE names the image modality
    seq_len: int = 256
    bos_id: int = 1
    boi_id: int = 2
    eoi_id: int = 3
    patch_dim: int = 48                 # p*p*C values per patch
    n_patches: int = 16                 # patches per image
    image_size: int = 16
    patch_size: int = 4
    channels: int = 3
    # backbone (Sec. 3.2: one transformer; MoT / Mamba / MoM via their files)
    backbone: str = "dense"             # dense | mot | mamba | mom
    n_layer: int = 2
    n_head: int = 4                     # attention heads (dense / mot)
    d_model: int = 64
    norm_placement: str = "pre"         # pre-norm, as the paper's Llama-2 blocks | post (Chameleon / MoT's default)
    qk_norm: bool = False               # RMSNorm on queries and keys per head (Chameleon's fix for logit growth)
    # Sec. 3.2: patch encoder/decoder (Sec. 4 compares linear vs U-Net)
    patch_codec: str = "linear"         # linear | unet (the paper's better codec; slower on CPU)
    unet_channels: int = 16             # U-Net width at full resolution (x2 after the down block); patch_codec=unet
    # Sec. 2.2 / 3.4: diffusion
    diffusion_steps: int = 1000         # T
    schedule: str = "cosine"            # cosine (paper) | linear (DDPM's)
    lam: float = 5.0                    # lambda in L = L_LM + lambda * L_DDPM
    noise_limit: int = 500              # Sec. 4: t < noise_limit for images before their caption (0 = off)
    image_attn: str = "bidirectional"   # bidirectional (paper) | causal (the paper's attention ablation)
    cond_dropout: float = 0.2           # P(drop the caption) for classifier-free guidance (toy choice)
    sampler: str = "ddim"               # sampling: ddim (deterministic, eta=0) | ddpm (ancestral)
    sample_steps: int = 50              # denoising steps at inference (paper: 250)
    guidance: float = 3.0               # classifier-free guidance scale (1 = conditional only)
    clip_x0: bool = True                # clip the predicted x_0 to [-1, 1] at every sampling step
    eps_param: str = "v"                # direct: the network outputs eps | v: eps = sqrt(ab) v + sqrt(1-ab) x_t
    loss_weight: str = "trunc_snr"      # uniform: plain eps-MSE (paper) | min_snr | trunc_snr (training only)
    patch_pos_emb: bool = True          # a learned embedding of each patch's place in the image, added by the encoder
    lmfusion: str = ""                  # LMFusion: a text-only ckpt.pt (lmfusion-base); freezes text, trains image
    RANGES: ClassVar[dict] = dict(
        vocab_size="int >= 1", n_modalities="int >= 1", modality_names="names", seq_len="int >= 8", bos_id="int >= 0",
        boi_id="int >= 0", eoi_id="int >= 0", patch_dim="int >= 1", n_patches="int >= 1", image_size="int >= 1",
        patch_size="int >= 1", channels="int >= 1", backbone="one of dense|mot|mamba|mom", n_layer="int >= 1",
        n_head="int >= 1", d_model="int >= 1", norm_placement="one of pre|post", qk_norm="bool",
        patch_codec="one of linear|unet", unet_channels="int >= 1", diffusion_steps="int >= 1",
        schedule="one of cosine|linear", lam="float >= 0", noise_limit="int >= 0; 0 = off",
        image_attn="one of bidirectional|causal", cond_dropout="float in [0, 1]", sampler="one of ddim|ddpm",
        sample_steps="int >= 1", guidance="float >= 0", clip_x0="bool", eps_param="one of direct|v",
        loss_weight="one of uniform|min_snr|trunc_snr", patch_pos_emb="bool", lmfusion="path")

    def __post_init__(self):
        # each field's valid range is in RANGES above (checked when built); here: relations between fields
        g = self.image_size // self.patch_size
        if (self.patch_dim, self.n_patches) != (self.patch_size ** 2 * self.channels, g * g):
            raise ValueError("patch_dim, n_patches disagree with image_size, patch_size, channels: use data.py's")
        if max(self.noise_limit, self.sample_steps) > self.diffusion_steps:
            raise ValueError("need noise_limit <= diffusion_steps and sample_steps <= diffusion_steps")
        if len(self.modality_names) < self.n_modalities:
            raise ValueError(f"modality_names={self.modality_names} has fewer than n_modalities={self.n_modalities} "
                             "names; take both from data.py's model_fields()")
        default = {f.name: f.default for f in fields(self)}       # a key without effect here names what enables it
        image_keys = list(default)[list(default).index("patch_codec"):]     # the image-only keys: patch_codec on
        for off, keys, needs in ((self.patch_codec != "unet", ("unet_channels",), "--patch_codec=unet"),
                                 (self.backbone in ("mamba", "mom"), ("n_head", "norm_placement", "qk_norm",
                                  "image_attn"), "an attention backbone (--backbone=dense or mot)"),
                                 (self.n_modalities < 2, image_keys, "a setting with images (--setting transfusion)"),
                                 (self.backbone != "mot", ("lmfusion",), "--backbone=mot: LMFusion adds MoT-style "
                                  "image modules (or use --model lmfusion)")):
            bad = [k for k in keys if off and getattr(self, k) != default[k]]
            if bad:
                raise ValueError(f"--{bad[0]}={getattr(self, bad[0])} has no effect here; it needs {needs}")


# --- Sec. 3.3: Transfusion attention -- causal across the sequence, bidirectional inside each image ----------------

def attention_mask(gid, drop=None, bidirectional=True):
    """gid: (B, T) the image id of each position (-1 at text) -> (B, 1, T, T) bool, True = query i may attend to key j
    (as SDPA takes it): allowed[i, j] = (j <= i) or (i and j are patches of the same image). A text token sees its past
    (an image once its <eoi> is behind), <boi> sees its past, every patch sees its whole image. bidirectional=False:
    causal everywhere (the paper's ablation). drop: (B, T) bool, True on the patches of images whose condition is
    dropped (classifier-free guidance): they see only their own image and its <boi>."""
    B, T = gid.shape
    allowed = torch.ones(T, T, dtype=torch.bool, device=gid.device).tril().expand(B, T, T)   # causal: j <= i
    same = (gid[:, :, None] == gid[:, None, :]) & (gid[:, :, None] >= 0)   # i and j in the same image
    if bidirectional:
        allowed = allowed | same                                          # a patch sees its whole image
    if drop is not None:                        # unconditional images (CFG): their own patches and <boi> only
        nxt = torch.cat([gid[:, 1:], gid.new_full((B, 1), -1)], 1)                   # the image id at i + 1
        boi_of = torch.where((gid < 0) & (nxt >= 0), nxt, gid.new_full((B, T), -2))   # <boi> -> its image id
        own = (same | (boi_of[:, None, :] == gid[:, :, None])) & allowed
        allowed = torch.where(drop[:, :, None], own, allowed)
    return allowed[:, None]


# --- Sec. 2.2: DDPM -- the forward process (noising) on a cosine schedule; the reverse process (DDPM, DDIM) --------

class Diffusion(nn.Module):
    """Noise schedule (buffers only) + q_sample + the two samplers. Time t is an integer in [0, T)."""

    def __init__(self, T=1000, schedule="cosine"):
        super().__init__()
        if schedule == "cosine":   # Nichol & Dhariwal 2021, Eq. 17: alpha_bar(t) = f(t) / f(0), beta clipped at 0.999
            s = 0.008
            f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        else:                      # Ho et al. 2020
            betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
        self.T = T
        self.register_buffer("alpha_bar", torch.cumprod(1 - betas, 0).float(), persistent=False)   # (T,)

    # Eq. 3: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
    def q_sample(self, x0, t, noise):
        # x0, noise: (N, ...), t: (N,) int64 -> x_t (N, ...)
        ab = self.alpha_bar[t].view(-1, *([1] * (x0.dim() - 1)))
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    @torch.no_grad()
    def sample(self, eps_fn, x, n_steps, sampler="ddim", clip=True, generator=None):
        """Reverse process from x = x_T (pure noise). eps_fn(x_t, t: (N,) int64) -> eps prediction like x.
        DDIM (eta = 0, Song et al. 2021 Eq. 12) is deterministic; DDPM draws the posterior q(x_s | x_t, x0_hat)."""
        ts = torch.linspace(self.T - 1, 0, n_steps).round().long().unique_consecutive().tolist()   # "respacing"
        for i, t in enumerate(ts):
            s = ts[i + 1] if i + 1 < len(ts) else -1                 # next (smaller) timestep; -1 = done
            ab_t, ab_s = self.alpha_bar[t], (self.alpha_bar[s] if s >= 0 else torch.ones_like(self.alpha_bar[t]))
            eps = eps_fn(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))
            x0 = (x - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()          # predicted x_0
            if clip:
                x0 = x0.clamp(-1, 1)
                eps = (x - ab_t.sqrt() * x0) / (1 - ab_t).sqrt()     # the noise consistent with the clipped x_0
            if sampler == "ddim":
                x = ab_s.sqrt() * x0 + (1 - ab_s).sqrt() * eps
            else:   # posterior of the respaced chain, beta' = 1 - ab_t / ab_s (Ho et al. Eq. 6-7)
                beta = 1 - ab_t / ab_s
                mean = ab_s.sqrt() * beta / (1 - ab_t) * x0 + (1 - beta).sqrt() * (1 - ab_s) / (1 - ab_t) * x
                var = beta * (1 - ab_s) / (1 - ab_t)
                x = mean + (var.sqrt() * randn(x.shape, generator, x.device) if s >= 0 else 0)
        return x


# --- Sec. 3.2: patch encoder and decoder (linear, or U-Net down/up blocks), conditioned on t ------------------------

def timestep_embedding(t, dim):
    """Sinusoidal embedding of integer timesteps (Transformer / DDPM). t: (N,) -> (N, dim)."""
    ang = t.float()[:, None] * torch.exp(-math.log(10000.0) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    return torch.cat([ang.cos(), ang.sin()], dim=-1)


def unpatchify(p, cfg):
    """(N, n_patches, p*p*C) -> (N, C, H, W), data.py's layout: raster order of patches, each (p, p, C) channel last."""
    g, ps, C = cfg.image_size // cfg.patch_size, cfg.patch_size, cfg.channels
    return p.reshape(-1, g, g, ps, ps, C).permute(0, 5, 1, 3, 2, 4).reshape(-1, C, g * ps, g * ps)


def patchify(img, cfg):
    """(N, C, H, W) -> (N, n_patches, p*p*C), the inverse of unpatchify."""
    g, ps, C = cfg.image_size // cfg.patch_size, cfg.patch_size, cfg.channels
    return img.reshape(-1, C, g, ps, g, ps).permute(0, 2, 4, 3, 5, 1).reshape(-1, g * g, ps * ps * C)


class ResBlock(nn.Module):
    """GroupNorm -> AdaGN(t) scale/shift -> SiLU -> conv -> GroupNorm -> SiLU -> conv, plus a 1x1 skip."""

    def __init__(self, c_in, c_out, d_t):
        super().__init__()
        self.n1, self.n2 = nn.GroupNorm(min(8, c_in), c_in), nn.GroupNorm(min(8, c_out), c_out)
        self.ada = nn.Linear(d_t, 2 * c_in)                 # AdaGN: the timestep sets the norm's scale and shift
        self.c1, self.c2 = nn.Conv2d(c_in, c_out, 3, padding=1), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, temb):
        # x: (N, c_in, h, w), temb: (N, d_t) -> (N, c_out, h, w)
        scale, shift = self.ada(temb)[:, :, None, None].chunk(2, dim=1)
        h = self.c1(F.silu(self.n1(x) * (1 + scale) + shift))
        return self.skip(x) + self.c2(F.silu(self.n2(h)))


class PatchCodec(nn.Module):
    """encode(x_t patches, t) -> transformer inputs; decode(transformer outputs, t) -> eps patches.
    linear: one Linear each way, plus the timestep embedding added to every patch vector (Sec. 3.2).
    unet:   image -> conv + ResBlock (full res) -> strided conv down to one cell per patch -> ResBlock -> 1x1 to D;
            decode mirrors it (up blocks), with skip connections from the down blocks around the transformer."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg, D = cfg, cfg.d_model
        self.t_mlp = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D))   # the timestep MLP
        self.pos = nn.Parameter(torch.randn(cfg.n_patches, D) * 0.02) if cfg.patch_pos_emb else None
        if cfg.patch_codec == "linear":
            self.enc, self.dec = nn.Linear(cfg.patch_dim, D), nn.Linear(D, cfg.patch_dim)
            return
        c, C, ps = cfg.unet_channels, cfg.channels, cfg.patch_size
        self.conv_in, self.down1 = nn.Conv2d(C, c, 3, padding=1), ResBlock(c, c, D)
        self.down = nn.Conv2d(c, 2 * c, ps, stride=ps)                  # H x W -> (H/p) x (W/p): one cell per patch
        self.down2, self.to_d = ResBlock(2 * c, 2 * c, D), nn.Conv2d(2 * c, D, 1)
        self.from_d, self.up2 = nn.Conv2d(D, 2 * c, 1), ResBlock(4 * c, 2 * c, D)    # up2: concat with down2's output
        self.up, self.up1 = nn.ConvTranspose2d(2 * c, c, ps, stride=ps), ResBlock(2 * c, c, D)   # up1: + down1's
        self.conv_out = nn.Sequential(nn.GroupNorm(min(8, c), c), nn.SiLU(), nn.Conv2d(c, C, 3, padding=1))

    def encode(self, x, t):
        # x: (N, n_patches, patch_dim) noisy patches, t: (N,) -> tokens (N, n_patches, D), skips for decode
        temb = self.t_mlp(timestep_embedding(t, self.cfg.d_model))                  # (N, D)
        ctx = dict(xt=x, t=t, temb=temb)
        if self.cfg.patch_codec == "linear":
            e = self.enc(x) + temb[:, None]
        else:
            ctx["h1"] = self.down1(self.conv_in(unpatchify(x, self.cfg)), temb)      # (N, c, H, W)
            ctx["h2"] = self.down2(self.down(ctx["h1"]), temb)                       # (N, 2c, g, g)
            e = self.to_d(ctx["h2"]).flatten(2).transpose(1, 2)                      # raster order = patch order
        if self.pos is not None:
            e = e + self.pos                                                         # which patch of the image
        return e, ctx

    def decode(self, h, ctx):
        # h: (N, n_patches, D) transformer outputs, ctx from encode -> (N, n_patches, patch_dim)
        if self.cfg.patch_codec == "linear":
            return self.dec(h)
        h1, h2, temb = ctx["h1"], ctx["h2"], ctx["temb"]
        g = self.cfg.image_size // self.cfg.patch_size
        u = self.from_d(h.transpose(1, 2).reshape(h.shape[0], -1, g, g))
        u = self.up(self.up2(torch.cat([u, h2], 1), temb))
        u = self.up1(torch.cat([u, h1], 1), temb)
        return patchify(self.conv_out(u), self.cfg)


# --- The model: one backbone over the mixed sequence, two losses --------------------------------------------------

def _build_backbone(cfg):
    """The transformer (or Mamba) that reads the mixed sequence: an LM with tok_emb, lm_head and forward_hidden.
    Routing comes from batch["modality"] and images have no token ids, so modality_offsets are dummies. Pre-norm by
    default: with post-norm (Chameleon's) the encoded patches outscale the text embeddings in the first attention."""
    common = dict(vocab_size=cfg.vocab_size, n_modalities=cfg.n_modalities, seq_len=cfg.seq_len, n_layer=cfg.n_layer,
                  d_model=cfg.d_model, modality_offsets=tuple(range(cfg.n_modalities)))
    if cfg.backbone in ("dense", "mot"):
        u = cfg.backbone == "mot"
        return mot.Transformer(mot.Config(**common, n_head=cfg.n_head, norm_placement=cfg.norm_placement,
                                          qk_norm=cfg.qk_norm, untie_attn=u, untie_ffn=u, untie_norm=u))
    import mom                                   # only needed for the Mamba backbones
    s = cfg.backbone == "mom"
    return mom.MixtureOfMamba(mom.Config(**common, split_in_proj=s, split_x_proj=s, split_dt_proj=s, split_out_proj=s))


class Transfusion(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        cfg.__post_init__()                             # checks a config changed after construction
        self.cfg = cfg
        self.backbone = _build_backbone(cfg)            # tok_emb, blocks, norm, lm_head (shared by modalities)
        self.codec = PatchCodec(cfg)                    # image-only modules: patch encoder/decoder + timestep MLP
        self.diffusion = Diffusion(cfg.diffusion_steps, cfg.schedule)
        self.noise_seed = int(torch.randint(2 ** 31, ()))   # the model's seed for per-row diffusion draws (_draws)
        self.bucket_history = []                        # loss_by_t of every evaluation (plots.py draws first / last)
        if cfg.lmfusion:
            self.load_lmfusion(cfg.lmfusion)

    def attention_mask(self, gid, drop=None):           # Sec. 3.3: the mask above, with this model's cfg.image_attn
        return attention_mask(gid, drop, self.cfg.image_attn == "bidirectional")

    # -- Sec. 3.4: L = L_LM + lambda * L_DDPM (Eq. 5) ---------------------------------------------------------------
    def forward(self, batch):
        # batch: tokens/modality/targets (B, T), patches (B, T, patch_dim), image_index (B, T) (index of the image in
        # its row, -1 at text), image_first (B, T), row_id (B,), loss_share (2,) (optional) -> logits (B, T, V), loss,
        # {loss_<name>}
        self._check(batch)
        cfg, tokens, modality, targets = self.cfg, batch["tokens"], batch["modality"], batch.get("targets")
        image_index = batch.get("image_index", torch.full_like(tokens, -1))
        gid, slot, n_img = self._images(image_index)    # (B, T) image id in the batch (-1: text), patch slot in it
        is_img, dev = gid >= 0, tokens.device
        xt = t = drop = None
        if n_img:
            x0 = self._gather(batch["patches"].float(), gid, slot, n_img)          # (N_img, n_patches, patch_dim)
            u, noise, u_drop = self._draws(batch, (image_index.max(1).values + 1).clamp(min=0), n_img, dev)
            # every image gets its own t ~ U{0..T-1}. Sec. 4 (noise limiting): an image that precedes its caption is
            # noised at most to t = noise_limit, so the caption that follows sees a recognisable image
            t_max = torch.full((n_img,), cfg.diffusion_steps, device=dev)
            if cfg.noise_limit and "image_first" in batch:
                first = self._gather(batch["image_first"][..., None].float(), gid, slot, n_img).amax(1)[:, 0] > 0
                t_max = torch.where(first, cfg.noise_limit, t_max)
            t = (u * t_max).long().clamp(max=cfg.diffusion_steps - 1)
            if "diffusion_t" in batch:                       # evaluation at one fixed t (loss per timestep bucket)
                t = torch.full_like(t, int(batch["diffusion_t"]))
            xt = self.diffusion.q_sample(x0, t, noise)       # Sec. 2.2, Eq. 3
            if self.training and cfg.cond_dropout > 0:       # classifier-free guidance: drop the caption sometimes
                drop = (u_drop < cfg.cond_dropout)[gid.clamp(min=0)] & is_img
        x, skips = self._embed(tokens, xt, t, gid, slot)
        h = self.backbone.forward_hidden(x, modality, self.attention_mask(gid, drop) if n_img else None)  # None: causal
        logits = self.backbone.lm_head(h)                           # (B, T, V)
        if targets is None:
            return logits, None, {}
        # Sec. 2.1, Eq. 1: L_LM on discrete positions, never at or into a patch; reported per predicted modality
        lm_mask, tm = (targets != -1) & ~is_img, batch.get("target_modality", modality)
        ce = F.cross_entropy(logits.float().flatten(0, 1), targets.clamp(min=0).flatten(), reduction="none")
        ce = ce.view_as(targets) * lm_mask
        # loss_share (train.py): this batch's share of the global batch's text targets and images (accumulation, DDP)
        w_text, w_img = batch.get("loss_share", (1.0, 1.0))
        loss = ce.sum() / lm_mask.sum().clamp(min=1) * w_text
        at, n_m = kernels.sort_by_group(torch.where(lm_mask, tm, cfg.n_modalities), cfg.n_modalities + 1)
        parts = {f"loss_{cfg.modality_names[m]}": (ce.flatten()[a].sum() / n_m[m]).detach()    # one host read: each
                 for m, a in enumerate(at.split(n_m.tolist())[:cfg.n_modalities]) if len(a)}   # modality's LM positions
        if n_img:
            # Sec. 2.2, Eq. 4: L_DDPM = ||eps - eps_theta(x_t, t, c)||^2, averaged over each image's present patches
            # (a partial image at the end of a packed row: data.py truncates), then over images
            valid = self._gather(is_img[..., None].float(), gid, slot, n_img)[..., 0]
            se = ((self._eps(h, gid, slot, n_img, skips) - noise) ** 2).mean(-1) * valid
            per_img = se.sum(1) / valid.sum(1).clamp(min=1)
            if cfg.loss_weight != "uniform" and "diffusion_t" not in batch and self.training:
                # trunc_snr (Salimans & Ho): max(SNR, 1) / SNR, the x_0-MSE where SNR < 1: at high t, where the caption
                # decides the image, eps-MSE ~ SNR * x_0-MSE barely trains the caption path. min_snr: min(SNR, 5) / SNR
                snr = self.diffusion.alpha_bar[t] / (1 - self.diffusion.alpha_bar[t])
                per_img = per_img * (snr.clamp(max=5.0) if cfg.loss_weight == "min_snr" else snr.clamp(min=1.0)) / snr
            loss = loss + cfg.lam * per_img.mean() * w_img          # Sec. 3.4, Eq. 5
            parts[f"loss_{cfg.modality_names[IMAGE]}"] = per_img.mean().detach()
        return logits, loss, parts

    def loss_counts(self, batch):
        """(2,) what the loss's two means run over, from the batch alone: text targets (Eq. 1) and images (Eq. 4)."""
        image_index = batch.get("image_index", torch.full_like(batch["tokens"], -1))
        n_text = ((batch["targets"] != -1) & (image_index < 0)).sum()
        return torch.stack([n_text, (image_index.max(1).values + 1).clamp(min=0).sum()])

    def _embed(self, tokens, xt, t, gid, slot):
        """Input vectors (Sec. 3.1): token embeddings at text positions, encoded noisy patches at image positions."""
        x, skips, is_img = self.backbone.tok_emb(tokens), None, gid >= 0             # (B, T, D)
        if xt is not None and len(xt):
            e, skips = self.codec.encode(xt, t)                                      # (N_img, n_patches, D)
            x = torch.where(is_img[..., None], F.pad(e, (0, 0, 0, 0, 0, 1))[gid, slot].to(x.dtype), x)   # text: -1
        return x, skips

    def _eps(self, h, gid, slot, n_img, ctx):
        """eps_theta: the transformer outputs of every image, gathered to (N_img, n_patches, D), decoded to eps."""
        out = self.codec.decode(self._gather(h, gid, slot, n_img), ctx).float()
        if self.cfg.eps_param == "v":
            # v-prediction (Salimans & Ho 2022): x_0 = sqrt(ab) x_t - sqrt(1 - ab) v has no 1/sqrt(ab) error blow-up
            # (a plain eps head's error near t = T is multiplied by 1/sqrt(ab) in x_0: saturated samples)
            ab = self.diffusion.alpha_bar[ctx["t"]].view(-1, 1, 1)
            out = ab.sqrt() * out + (1 - ab).sqrt() * ctx["xt"].float()
        return out

    # -- Sec. 3.5: inference -- noise prediction with classifier-free guidance, then mixed-modal decoding ------------
    def predict_eps(self, prefix, xt, t, guidance=None, image_index=None, patches=None):
        """prefix: (B, Tp) int64 ending with <boi>, earlier images given by image_index (B, Tp) and clean patches
        (B, Tp, patch_dim) (they enter as images: t = 0, image mask); xt: (B, n_patches, patch_dim) the new image at
        time t (B,) -> guided eps = eps_c + (g - 1)(eps_c - eps_u) (g = 1: exactly conditional), one batch of 2B.
        The unconditional half drops the condition with the training mask: the new image sees only itself and <boi>."""
        cfg, g = self.cfg, self.cfg.guidance if guidance is None else guidance
        (B, Tp), n, dev = prefix.shape, cfg.n_patches, xt.device
        ii = prefix.new_full((B, Tp), -1) if image_index is None else image_index
        pp = xt.new_zeros(B, Tp, cfg.patch_dim) if patches is None else patches.to(xt.dtype)
        ii = torch.cat([ii, (ii.max(1).values + 1).clamp(min=0)[:, None].expand(B, n)], 1).repeat(2, 1)  # + new image
        gid, slot, n_img = self._images(ii)
        new = gid[:, -1]                                                    # global id of each row's new image
        x_img = self._gather(torch.cat([pp, xt], 1).repeat(2, 1, 1), gid, slot, n_img)
        t_img = torch.zeros(n_img, dtype=torch.long, device=dev).index_put((new,), t.repeat(2))   # earlier: t = 0
        drop = (gid == new[:, None]) & (torch.arange(2 * B, device=dev) >= B)[:, None]      # 2nd half: unconditional
        x, skips = self._embed(torch.cat([prefix, prefix.new_zeros(B, n)], 1).repeat(2, 1), x_img, t_img, gid, slot)
        h = self.backbone.forward_hidden(x, (gid >= 0).long() * IMAGE, self.attention_mask(gid, drop))
        eps_c, eps_u = self._eps(h, gid, slot, n_img, skips)[new].chunk(2)
        return eps_c + (g - 1) * (eps_c - eps_u)

    @torch.no_grad()
    def generate_image(self, prefix, guidance=None, sampler=None, steps=None, generator=None, image_index=None,
                       patches=None):
        """Text (and earlier images: image_index, patches as in predict_eps) -> image. prefix: (B, Tp) int64 ending
        with <boi>; generator: one, or a list of one per row (a row's image is then the same in any batch)."""
        cfg = self.cfg
        if prefix.dim() != 2 or prefix.dtype != torch.long or bool((prefix[:, -1] != cfg.boi_id).any()):
            raise ValueError(f"generate_image: prefix must be an int64 (B, T) ending with <boi> (id {cfg.boi_id})")
        x = randn((prefix.shape[0], cfg.n_patches, cfg.patch_dim), generator, prefix.device)   # x_T
        return self.diffusion.sample(lambda xt, t: self.predict_eps(prefix, xt, t, guidance, image_index, patches),
                                     x, steps or cfg.sample_steps, sampler or cfg.sampler, cfg.clip_x0, generator)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=0.0, patches=None, image_index=None, seeds=None,
                 use_cache=True):
        """idx: (B, Tp) int64, with images given by image_index (B, Tp) and patches (B, Tp, patch_dim) -> tokens
        (B, Tp + max_new_tokens), id 0 at generated patches; self.last_images[b]: row b's images (n_patches, patch_dim).
        Sec. 3.5: text autoregressively (greedy at temperature 0); a row ending with <boi> (if the image fits) goes to
        diffusion mode: n_patches noise patches denoised with the row so far as context (earlier images read as
        images), then <eoi>, then text again. A batch gives what each row gives alone; seeds: one int per row for its
        sampling and sampler noise (default: from torch's RNG). use_cache: the KV-cached speed path (dense / MoT)."""
        cfg = self.cfg
        if not (isinstance(idx, torch.Tensor) and idx.dtype == torch.long and idx.dim() == 2) or \
                idx.shape[1] + max_new_tokens > cfg.seq_len:
            raise ValueError(f"generate: idx must be int64 (B, T) with T + max_new_tokens <= seq_len={cfg.seq_len}")
        (B, Tp), dev, end, n = idx.shape, idx.device, idx.shape[1] + max_new_tokens, cfg.n_patches
        ii = torch.full_like(idx, -1) if image_index is None else image_index
        pp = torch.zeros(B, Tp, cfg.patch_dim, device=dev) if patches is None else patches.float()
        seeds = torch.randint(2 ** 62, (B,)).tolist() if seeds is None else [int(s) for s in seeds]
        rows = [dict(b=b, tok=idx[b], ii=ii[b], pp=pp[b], done=0, g=torch.Generator(device=dev).manual_seed(seeds[b]))
                for b in range(B)]
        self.last_images = [[] for _ in range(B)]      # (inference needs no eval(): no layer differs in training)
        step = self._text_step_cached if use_cache and cfg.backbone in ("dense", "mot") else self._text_step
        while any(len(r["tok"]) < end for r in rows):
            boi = [r for r in rows if int(r["tok"][-1]) == cfg.boi_id and end - len(r["tok"]) > n]
            for grp in _groups(boi, lambda r: len(r["tok"])):       # diffusion mode, rows of one length batched
                st = [torch.stack([r[k] for r in grp]) for k in ("tok", "ii", "pp")]
                imgs = self.generate_image(st[0], generator=[r["g"] for r in grp], image_index=st[1], patches=st[2])
                for r, img in zip(grp, imgs):
                    self._append(r, [0] * n + [cfg.eoi_id], [int(r["ii"].max()) + 1] * n + [-1],
                                 torch.cat([img, img.new_zeros(1, cfg.patch_dim)]))
                    r["done"] = 0
                    self.last_images[r["b"]].append(img)
            for grp in _groups([r for r in rows if len(r["tok"]) < end], lambda r: (len(r["tok"]), r["done"])):
                step(grp, temperature)                               # text mode, rows of one length batched
        return torch.stack([r["tok"] for r in rows])

    def _text_step(self, grp, temperature, start=0, **cache):
        """One decoding step of rows of equal length, as one batch: read each row from position `start` (0: whole),
        its images clean (t = 0), and append each row's next token (sampled at temperature; greedy at 0)."""
        tok, ii, pp = (torch.stack([r[k] for r in grp])[:, start:] for k in ("tok", "ii", "pp"))
        gid, slot, n_img = self._images(ii)
        x, _ = self._embed(tok, self._gather(pp, gid, slot, n_img), gid.new_zeros(n_img), gid, slot)
        h = self.backbone.forward_hidden(x, (gid >= 0).long() * IMAGE, self.attention_mask(gid) if n_img else None,
                                         **cache)
        logits = self.backbone.lm_head(h[:, -1]).float()
        for j, r in enumerate(grp):
            nxt = (int(torch.multinomial(F.softmax(logits[j] / temperature, -1), 1, generator=r["g"]))
                   if temperature > 0 else int(logits[j].argmax()))
            self._append(r, [nxt], [-1], pp.new_zeros(1, self.cfg.patch_dim))

    @staticmethod
    def _append(r, tok, ii, pp):   # extend a decoding row: tokens, image index, patches
        r["tok"], r["ii"] = (torch.cat([r[k], r[k].new_tensor(v)]) for k, v in (("tok", tok), ("ii", ii)))
        r["pp"] = torch.cat([r["pp"], pp])

    # -- evaluation: generation scored by data.py, diffusion loss per timestep bucket ---------------------------------
    @torch.no_grad()
    def gen_metrics(self, ds, n=32):
        """Caption -> image (scored by ds.score_image_pixels) and image -> caption (ds.score_captions), on n fixed
        scenes with fixed sampler noise; the caption dependence; the eval diffusion loss in 10 timestep buckets."""
        if getattr(ds, "setting", None) != "transfusion":
            return {}
        cfg, ex = self.cfg, ds.scenes(n)
        truth, x0 = [e["scene"] for e in ex], self._scene_patches(ex)
        imgs = self.images_for_captions([e["caption"] for e in ex]).float().cpu().numpy()
        # image -> caption: <bos> <boi> clean image <eoi> => caption (greedy, batched, KV cache), image at t = 0
        idx = torch.tensor([[cfg.bos_id, cfg.boi_id] + [0] * cfg.n_patches + [cfg.eoi_id]] * n, device=x0.device)
        pp = torch.cat([x0.new_zeros(n, 2, cfg.patch_dim), x0, x0.new_zeros(n, 1, cfg.patch_dim)], 1)
        caps = self.generate(idx, 14, patches=pp, image_index=torch.where(idx == 0, 0, -1), seeds=range(n))
        out = dict(zip(("gen_image_acc", "gen_image_chance"), ds.score_image_pixels(imgs, truth)))
        out.update(zip(("caption_acc", "caption_chance"), ds.score_captions(caps[:, -14:].cpu().numpy(), truth)))
        return {**out, **self.caption_dependence(ex), **self.loss_by_t(ds.get_batch("val", 8, 0))}

    def _scene_patches(self, ex):   # ds.scenes(n) -> their images as patches (n, n_patches, patch_dim) in [-1, 1]
        img = torch.stack([torch.as_tensor(e["image"]) for e in ex]).to(self.diffusion.alpha_bar.device)
        return patchify(img * 2 - 1, self.cfg)

    def _by_caption(self, captions, fn):
        """fn(prompts "<bos> caption <boi>" (n, Tp) int64, indices) -> (n, ...) per caption length, in caption order."""
        out, c, dev = [None] * len(captions), self.cfg, self.diffusion.alpha_bar.device
        for g in _groups(range(len(captions)), lambda i: len(captions[i])):
            prompts = torch.tensor([[c.bos_id] + list(captions[i]) + [c.boi_id] for i in g], device=dev)
            for i, o in zip(g, fn(prompts, g)):
                out[i] = o
        return torch.stack(out)

    @torch.no_grad()
    def caption_dependence(self, ex, ts=(700, 900)):
        """Does the image use its caption? ex: ds.scenes(n) -> {x0_mse_tXXXX, x0_mse_tXXXX_wrong}: x_0-MSE of the
        conditional branch (fixed noise) with each image's own caption / another scene's, at high t. Equal = ignored."""
        caps, res, x0 = [e["caption"] for e in ex], {}, self._scene_patches(ex)
        noise = torch.randn(x0.shape, generator=torch.Generator(x0.device).manual_seed(4321), device=x0.device)
        for t in ts:
            tt = torch.full((len(ex),), t, dtype=torch.long, device=x0.device)
            xt, ab = self.diffusion.q_sample(x0, tt, noise), self.diffusion.alpha_bar[t]
            for name, cc in (("", caps), ("_wrong", caps[1:] + caps[:1])):
                eps = self._by_caption(cc, lambda p, g: self.predict_eps(p, xt[g], tt[g], guidance=1.0))
                res[f"x0_mse_t{t:04d}{name}"] = float((((xt - (1 - ab).sqrt() * eps) / ab.sqrt() - x0) ** 2).mean())
        return res

    @torch.no_grad()
    def images_for_captions(self, captions, guidance=None, seed=0):
        """captions: list of text id lists (ending with ".") -> images (N, C, H, W) in [-1, 1] from the prompts
        "<bos> caption <boi>", with fixed sampler noise (seed) so evaluations compare."""
        g = torch.Generator(self.diffusion.alpha_bar.device).manual_seed(seed)
        return unpatchify(self._by_caption(captions, lambda p, _: self.generate_image(p, guidance, generator=g)),
                          self.cfg)

    @torch.no_grad()
    def loss_by_t(self, batch, n_buckets=10):
        """Eval diffusion loss at the centre t of each of n_buckets equal timestep buckets (fixed noise draws)."""
        was, name, T = self.training, self.cfg.modality_names[IMAGE], self.cfg.diffusion_steps
        self.eval()
        batch = {k: v.to(self.diffusion.alpha_bar.device) for k, v in batch.items()}
        res = {f"loss_{name}_t{t:04d}": float(self({**batch, "diffusion_t": t})[2][f"loss_{name}"])
               for t in [int((k + 0.5) * T / n_buckets) for k in range(n_buckets)]}
        self.bucket_history.append(res)
        self.train(was)
        return res

    # -- LMFusion: a frozen text LM + trainable image copies of every module -----------------------------------------
    def load_lmfusion(self, path):
        """Load the text model (a ckpt.pt of `lmfusion-base`), initialise every image module as a copy of its text
        module (LMFusion Sec. 3), freeze all text modules, embeddings and the head. Trainable afterwards: the image
        modules of the backbone, the patch encoder/decoder and the timestep MLP."""
        fix = "make it with python train.py --model lmfusion-base (the same d_model / n_layer / n_head)"
        if not os.path.isfile(path):
            raise ValueError(f"lmfusion={path!r}: no such file; {fix}")
        try:   # weights_only: tensors and plain types only; a pickled object could run code on load
            text = {k[9:]: v for k, v in torch.load(path, "cpu", weights_only=True)["model"].items()
                    if k.startswith("backbone.")}
        except Exception as e:
            raise ValueError(f"lmfusion={path!r} is refused: not a train.py checkpoint of tensors and plain types "
                             f"({type(e).__name__} under weights_only=True); {fix}") from None
        own = self.backbone.state_dict()
        bad = [k for k in own if not k.endswith(tuple(f".weight.{m}" for m in range(1, 8)))   # image weights: new
               and not (torch.is_tensor(text.get(k)) and text[k].shape == own[k].shape)]
        if bad:
            raise ValueError(f"lmfusion={path!r} does not match this model ({bad[0]}: missing or another shape); {fix}")
        with torch.no_grad():
            for k in own.keys() & text.keys():
                own[k].copy_(text[k])
            for mod in self.backbone.modules():                  # theta_img starts as a copy of theta_text
                for m in range(1, mod.n if isinstance(mod, (mot.ModalityLinear, mot.ModalityRMSNorm)) else 1):
                    mod.weight[m].copy_(mod.weight[0])
        image = {id(p) for m in range(1, self.cfg.n_modalities) for p in self.backbone.modality_parameters(m)}
        for p in self.backbone.parameters():
            p.requires_grad_(id(p) in image)

    # ==== Bookkeeping: per-row random draws, input checks ============================================================
    def _draws(self, batch, per_row, n_img, dev):
        """Every image's u (N,) -> t, noise (N, n_patches, patch_dim), u_drop (N,) -> condition dropout. With row_id,
        a generator per row seeded by (model seed, row_id) (module docstring); else torch's RNG. Eval: seed 1234."""
        shape, rid = (self.cfg.n_patches, self.cfg.patch_dim), batch.get("row_id")
        draw = lambda k, g, d: (torch.rand(k, generator=g, device=d), torch.randn(k, *shape, generator=g, device=d),
                                torch.rand(k, generator=g, device=d))
        if rid is None:
            return draw(n_img, None if self.training else torch.Generator(dev).manual_seed(1234), dev)
        base = self.noise_seed if self.training else 1234      # CPU generators: the same draws on any device
        draws = [draw(k, torch.Generator().manual_seed((base * 0x9E3779B97F4A7C15 + r) % 2 ** 64), "cpu")
                 for r, k in zip(*torch.stack([rid, per_row]).tolist())]   # one host read per batch
        return tuple(torch.cat(d).to(dev, non_blocking=True) for d in zip(*draws))   # copied without a sync

    def _check(self, batch):   # the batch forward reads: one ValueError naming the fix
        tok, mod, rid, p, ii = (batch.get(k) for k in ("tokens", "modality", "row_id", "patches", "image_index"))
        T, M, P = self.cfg.seq_len, self.cfg.n_modalities, self.cfg.patch_dim
        if not (isinstance(tok, torch.Tensor) and tok.dtype == torch.long and tok.ndim == 2) or tok.shape[1] > T:
            raise ValueError(f"batch['tokens'] must be int64 (B, T <= seq_len={T}): .long(), crop or raise --seq_len")
        if mod is None or mod.shape != tok.shape or mod.dtype != torch.long or (mod.numel() and int(mod.max()) >= M):
            raise ValueError(f"batch['modality'] : int64 like tokens, ids < {M}: use data.py's or set --n_modalities")
        if ii is not None and (p is None or tuple(p.shape) != (*tok.shape, P)) and bool((ii >= 0).any()):
            raise ValueError(f"batch['patches'] must be (B, T, {P}) float at image positions; use data.make_data")
        if rid is not None and (rid.dtype != torch.long or tuple(rid.shape) != tok.shape[:1]):
            raise ValueError(f"batch['row_id'] must be an int64 tensor of shape ({tok.shape[0]},); data.py makes it")

    # ==== Speed paths: same results as the plain forms above, faster (tests/test_transfusion.py holds them equal) ====
    def _text_step_cached(self, grp, temperature):
        """_text_step with a KV cache (dense / MoT): rows of equal length and equal cached length read only their
        positions after the cache. The cache is dropped after an image, which is then read again whole (its mask)."""
        done = grp[0]["done"]
        caches = [{k: torch.cat([r["cache"][i][k] for r in grp]) for k in ("k", "v")} if done else {}
                  for i in range(len(self.backbone.blocks))]
        self._text_step(grp, temperature, done, pos0=done, caches=caches)       # fills caches in place
        for j, r in enumerate(grp):
            r["cache"], r["done"] = [{k: c[k][j:j + 1] for k in c} for c in caches], len(r["tok"]) - 1

    # batched gathers: every image of a batch in one (N_img, n_patches, .) tensor, so the codec runs once per batch
    def _images(self, image_index):
        """image_index: (B, T) -> gid (B, T) global image id, slot (B, T) patch index inside its image, N_img."""
        (B, T), is_img = image_index.shape, image_index >= 0
        per_row = (image_index.max(1).values + 1).clamp(min=0)                      # images per row
        row_base = torch.cumsum(per_row, 0) - per_row
        gid = torch.where(is_img, image_index + row_base[:, None], torch.full_like(image_index, -1))
        n_img = int(per_row.sum())                     # a host read: the size of every per-image tensor
        pos = torch.arange(T, device=image_index.device).expand(B, T)
        first = torch.full((n_img + 1,), T, dtype=torch.long, device=image_index.device)   # [n_img]: text's
        first = first.scatter_reduce(0, (gid % (n_img + 1)).flatten(), pos.flatten(), "amin")
        slot = torch.where(is_img, pos - first[gid.clamp(min=0)], torch.full_like(pos, -1))
        if slot.numel() and int(slot.max()) >= self.cfg.n_patches:   # (text's slot -1: no image, no error)
            raise ValueError(f"an image has more than n_patches={self.cfg.n_patches} patches; check image_index")
        return gid, slot, n_img

    def _gather(self, v, gid, slot, n_img):
        """Per-position values v (B, T, F) of every image -> (N_img, n_patches, F) (zeros where a patch is absent).
        Text (gid = slot = -1) goes to an extra, last image, dropped (_embed reads a zero one): no boolean indexing."""
        return v.new_zeros(n_img + 1, self.cfg.n_patches, v.shape[-1]).index_put((gid, slot), v)[:n_img]


# batched rows (generate, evaluation): rows of a batch decoded together give what each row gives alone
def _groups(rows, key):   # rows grouped by key(row), in first-seen order
    keys = [key(r) for r in rows]
    return [[r for r, k in zip(rows, keys) if k == u] for u in dict.fromkeys(keys)]


def randn(shape, generator, device):
    """torch.randn, or with a list of per-row generators one draw per row (so a batch equals its rows one by one)."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.randn(shape[1:], generator=g, device=device) for g in generator])
    return torch.randn(shape, generator=generator, device=device)


MODELS = {
    **{"transfusion" + ("-" + b if b != "dense" else ""): (Config, Transfusion, "transfusion", dict(backbone=b))
       for b in ("dense", "mot", "mamba", "mom")},
    # LMFusion: 1) a text-only LM on data.py's text stream (the MoT backbone with one modality = a dense LM);
    #           2) its weights frozen as the text half of a 2-modality MoT, image half trained with Transfusion's loss
    "lmfusion-base": (Config, Transfusion, "text", dict(backbone="mot")),
    "lmfusion": (Config, Transfusion, "transfusion", dict(backbone="mot", lmfusion="out/lmfusion-base/ckpt.pt")),
}
# train.py refuses other settings: without continuous images (chameleon, speech) Transfusion would train a text-only LM
SUPPORTED_SETTINGS = {name: (setting,) for name, (_, _, setting, _) in MODELS.items()}


if __name__ == "__main__":   # the shipped trained model samples images from captions; then the attention mask
    import data
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "docs", "ckpt", "transfusion.pt")
    if os.path.isfile(path):
        ck = torch.load(path, map_location="cpu", weights_only=True)     # tensors and plain types only
        model = Transfusion(Config(**{k: tuple(v) if isinstance(v, list) else v
                                      for k, v in ck["config"]["model_cfg"].items()})).eval()
        model.load_state_dict({k: v.float() for k, v in ck["model"].items()})   # fp16 on disk
        cfg, ev, run = model.cfg, ck["eval"], ck["run_eval"]
        print(f"Transfusion ({cfg.backbone} backbone) trained {ck['step']} steps on the transfusion setting ({path}): "
              f"eval text loss {ev['eval_loss_text']:.3f} nats/token, diffusion loss {ev['eval_loss_image']:.4f}")
        if "gen_image_acc" in run:
            print(f"the run's generation eval (32 scenes, 4 attributes each): caption -> image "
                  f"{run['gen_image_acc']:.2f} right (chance {run['gen_image_chance']:.2f}), image -> caption "
                  f"{run['caption_acc']:.2f} (chance {run['caption_chance']:.2f})")
        ex = data.make_data("transfusion", cfg.seq_len, ck["config"]["train"]["seed"]).scenes(4, seed=1)   # held out
        imgs = ((model.images_for_captions([e["caption"] for e in ex]) + 1) / 2).clamp(0, 1).numpy()   # [0, 1]
        print(f"caption -> image: 16 continuous patches denoised from Gaussian noise in {cfg.sample_steps} "
              f"{cfg.sampler.upper()} steps, classifier-free guidance {cfg.guidance:g} ('.' = background, a letter = "
              f"the colour of the object's pixel, as the scorer sees them):")
        print("\n".join(data.image_lines(ex, imgs)))
    else:
        print(f"no trained checkpoint at {path}: `git checkout docs/ckpt/transfusion.pt` restores it (now: untrained)")
        model = Transfusion(Config())
    print("mask of <bos> <boi> p p p <eoi> word (1 = may attend):")
    print(model.attention_mask(torch.tensor([[-1, -1, 0, 0, 0, -1, -1]]))[0, 0].int())
