"""Tests for transfusion.py: the mask, the losses, isolation of the image modules, the schedule and samplers,
guidance, causality, cached and per-row generation (earlier images read as images), per-row diffusion draws (a split
batch = the whole batch, exact resume), LMFusion's frozen text model and its safe checkpoint loading, settings and
keys without effect. Every speed path against its plain form: batched image gathers (a loop over images), the KV
cache (recompute), batched rows (one row at a time). Tiny models, CPU, a few seconds each."""
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import data  # noqa: E402
import transfusion as tf  # noqa: E402
from test_moma import host_reads_in_training_step  # noqa: E402

torch.set_num_threads(1)


def tiny_cfg(setting="transfusion", **over):
    ds = data.make_data(setting, seq_len=64)
    size = dict(d_model=32, n_layer=1, **(dict(sample_steps=4) if setting == "transfusion" else {}))
    if over.get("backbone") not in ("mamba", "mom"):
        size["n_head"] = 2
    if over.get("patch_codec") == "unet":
        size["unet_channels"] = 8
    fields = {k: v for k, v in ds.model_fields().items() if hasattr(tf.Config, k)}
    return tf.Config(**{**size, **fields, **over}), ds


def tiny(**over):
    torch.manual_seed(0)
    cfg, ds = tiny_cfg(**over)
    return tf.Transfusion(cfg), ds


# --- the attention mask ----------------------------------------------------------------------------------------
def reference_mask(gid, drop=None):
    """allowed[i, j] = j <= i or same image; a dropped image's patches see only their image and their <boi>."""
    B, T = gid.shape
    m = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        for i in range(T):
            for j in range(T):
                same = gid[b, i] >= 0 and gid[b, i] == gid[b, j]
                ok = j <= i or same
                if drop is not None and drop[b, i]:
                    is_boi = j + 1 < T and gid[b, j] < 0 and gid[b, j + 1] == gid[b, i]
                    ok = same or (is_boi and j <= i)
                m[b, i, j] = ok
    return m


@pytest.mark.parametrize("backbone", ["dense", "mot"])
def test_mask_position_by_position(backbone):
    model, ds = tiny(backbone=backbone)
    b = ds.get_batch("train", 2, 0)
    gid, slot, n_img = model._images(b["image_index"])
    assert n_img >= 2
    m = model.attention_mask(gid)[:, 0]
    assert torch.equal(m, reference_mask(gid))
    # spot checks in the paper's words: <boi> sees only its past; text after <eoi> sees the whole image
    row = gid[0]
    first = int((row >= 0).nonzero()[0])
    boi, last = first - 1, first + model.cfg.n_patches - 1
    assert not m[0, boi, first:].any() and m[0, boi, :boi + 1].all()
    assert m[0, first, first:last + 1].all()                       # first patch sees the last patch of its image
    assert m[0, last + 1, :last + 2].all()                         # <eoi> sees everything before it
    drop = (gid >= 0) & (gid == gid[0, first])
    assert torch.equal(model.attention_mask(gid, drop)[:, 0], reference_mask(gid, drop))
    assert torch.equal(tf.attention_mask(gid, drop), model.attention_mask(gid, drop))   # the method = the function
    causal = tf.Transfusion(tiny_cfg(image_attn="causal")[0]).attention_mask(gid)[:, 0]
    assert torch.equal(causal, torch.ones(gid.shape[1], gid.shape[1], dtype=torch.bool).tril().expand_as(causal))
    assert torch.equal(tf.attention_mask(gid, bidirectional=False)[:, 0], causal)


def test_images_gathered_with_truncation():
    model, ds = tiny()
    b = ds.get_batch("train", 4, 3)
    gid, slot, n_img = model._images(b["image_index"])
    assert n_img == sum(int(r.max()) + 1 for r in b["image_index"] if r.max() >= 0)
    for g in range(n_img):                                        # each image: consecutive slots 0..k-1
        s = slot[gid == g]
        assert torch.equal(s, torch.arange(len(s)))


def test_batched_image_gather_equals_a_loop_over_images():
    """Speed path: _images / _gather put every image of a batch in one (N_img, n_patches, .) tensor and _embed
    scatters the encoded patches back; the same as a loop over rows and images, in values and gradients."""
    model, ds = tiny()
    b = ds.get_batch("train", 4, 3)
    ii, n, F_ = b["image_index"], model.cfg.n_patches, 5
    gid, slot, n_img = model._images(ii)
    v = torch.randn(*ii.shape, F_, requires_grad=True)
    ref, pos_of = [], []
    for r in range(ii.shape[0]):                                  # images in row order, patches in sequence order
        for k in range(int(ii[r].max()) + 1):
            pos = (ii[r] == k).nonzero()[:, 0]
            ref.append(torch.cat([v[r, pos], v.new_zeros(n - len(pos), F_)]))
            pos_of.append((r, pos))
    assert len(ref) == n_img and any(len(p) < n for _, p in pos_of)   # a truncated image is among them
    assert bool((gid[ii < 0] == -1).all())
    for g, (r, pos) in enumerate(pos_of):
        assert torch.equal(gid[r, pos], torch.full_like(pos, g)) and torch.equal(slot[r, pos], torch.arange(len(pos)))
    out, ref = model._gather(v, gid, slot, n_img), torch.stack(ref)
    assert torch.equal(out, ref)
    w = torch.randn_like(out)
    assert torch.equal(*(torch.autograd.grad((o * w).sum(), v)[0] for o in (out, ref)))
    # _embed: token embeddings at text positions, the encoded patch (image g, slot s) at its position
    xt, t = torch.randn(n_img, n, model.cfg.patch_dim), torch.randint(0, 1000, (n_img,))
    x, _ = model._embed(b["tokens"], xt, t, gid, slot)
    e, _ = model.codec.encode(xt, t)
    assert torch.equal(x[ii < 0], model.backbone.tok_emb(b["tokens"])[ii < 0])
    for g, (r, pos) in enumerate(pos_of):
        assert torch.equal(x[r, pos], e[g, :len(pos)])


def test_patchify_matches_data():
    cfg, ds = tiny_cfg()
    img = np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    p = tf.patchify(torch.from_numpy(img), cfg)
    assert np.allclose(p.numpy(), data.to_patches(img))
    assert torch.equal(tf.unpatchify(p, cfg), torch.from_numpy(img))


# --- the losses ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("codec", ["linear", "unet"])
def test_losses_on_the_right_positions(codec):
    model, ds = tiny(patch_codec=codec)
    model.eval()                                                   # fixed noise draws and t
    b = ds.get_batch("train", 2, 0)
    logits, loss, parts = model(b)
    # LM loss = cross-entropy on text positions with a target, computed independently
    sel = (b["targets"] != -1) & (b["image_index"] < 0)
    ref = F.cross_entropy(logits[sel], b["targets"][sel])
    assert torch.allclose(parts["loss_text"], ref, atol=1e-6)
    assert torch.allclose(loss, parts["loss_text"] + model.cfg.lam * parts["loss_image"], atol=1e-5)
    # targets at / into patches never count; patches outside images are never read
    b2 = dict(b)
    b2["targets"] = b["targets"].clone()
    b2["targets"][b["image_index"] >= 0] = 5
    b2["patches"] = b["patches"].clone()
    b2["patches"][b["image_index"] < 0] = 7.0
    _, loss2, parts2 = model(b2)
    assert torch.equal(parts2["loss_text"], parts["loss_text"]) or torch.allclose(parts2["loss_text"], parts["loss_text"])
    # lambda = 0: the diffusion loss does not enter the objective
    model.cfg.lam = 0.0
    assert torch.allclose(model(b)[1], parts["loss_text"], atol=1e-6)


def test_text_only_batch_gives_no_grad_to_image_modules():
    model, ds = tiny()
    b = ds.get_batch("train", 2, 0)
    text = {k: b[k] for k in ("tokens", "targets", "modality", "target_modality", "loss_mask")}
    sel = b["image_index"] < 0                                     # keep a text-only batch: drop image positions
    text = {k: v[:, :20] for k, v in text.items()}
    text["modality"] = torch.zeros_like(text["tokens"])
    text["tokens"] = text["tokens"].clamp(min=1)
    _, loss, parts = model(text)
    assert "loss_image" not in parts
    loss.backward()
    for name, p in model.codec.named_parameters():                # patch encoder/decoder and timestep MLP
        assert p.grad is None or not p.grad.any(), name
    assert model.backbone.tok_emb.weight.grad.abs().sum() > 0
    assert sel.any()


# --- schedule and samplers -----------------------------------------------------------------------------------------
def test_schedule_and_q_sample():
    d = tf.Diffusion(1000, "cosine")
    ab = d.alpha_bar
    assert ab.shape == (1000,) and (ab[1:] < ab[:-1]).all()
    assert ab[0] > 0.999 and ab[-1] < 1e-4
    x0 = torch.rand(4, 16, 48) * 2 - 1
    noise = torch.randn_like(x0)
    xt = d.q_sample(x0, torch.zeros(4, dtype=torch.long), noise)
    assert (xt - x0).abs().max() < 0.03
    xT = d.q_sample(x0, torch.full((4,), 999, dtype=torch.long), noise)
    assert (xT - noise).abs().max() < 0.03
    t = torch.tensor([100, 300, 500, 700])                   # in between, where the square roots matter: Eq. 3
    ab = d.alpha_bar[t].view(4, 1, 1).to(x0.dtype)
    torch.testing.assert_close(d.q_sample(x0, t, noise), ab.sqrt() * x0 + (1 - ab).sqrt() * noise)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize("steps", [1000, 7])
def test_sampler_with_true_noise_recovers_x0(sampler, steps):
    d = tf.Diffusion(1000, "cosine")
    x0 = torch.rand(3, 16, 48) * 2 - 1

    def oracle(xt, t):                                            # the noise actually present in x_t
        ab = d.alpha_bar[t].view(-1, 1, 1)
        return (xt - ab.sqrt() * x0) / (1 - ab).sqrt()

    g = torch.Generator().manual_seed(0)
    out = d.sample(oracle, torch.randn(x0.shape, generator=g), steps, sampler, clip=True, generator=g)
    assert (out - x0).abs().max() < 1e-3


def test_guidance_one_equals_conditional_and_uncond_ignores_caption():
    model, ds = tiny()
    model.eval()
    cfg = model.cfg
    cap = ds.scenes(2)
    prefix = torch.tensor([[cfg.bos_id] + cap[0]["caption"][:6] + [cfg.boi_id],
                           [cfg.bos_id] + cap[1]["caption"][:6] + [cfg.boi_id]])
    xt = torch.randn(2, cfg.n_patches, cfg.patch_dim)
    t = torch.tensor([300, 700])
    with torch.no_grad():
        # independent conditional pass: the B rows alone, plain Transfusion mask
        B, Tp = prefix.shape
        ii = torch.cat([torch.full((B, Tp), -1), torch.zeros(B, cfg.n_patches, dtype=torch.long)], 1)
        gid, slot, n = model._images(ii)
        x, skips = model._embed(torch.cat([prefix, torch.zeros_like(ii[:, Tp:])], 1), xt, t, gid, slot)
        eps_c = model._eps(model.backbone.forward_hidden(x, (ii >= 0).long(), model.attention_mask(gid)), gid, slot, n, skips)
        assert torch.allclose(model.predict_eps(prefix, xt, t, guidance=1.0), eps_c, atol=1e-5)
        # unconditional = the image after a bare <boi> (RoPE is relative: the masked prefix must not matter)
        short = prefix[:, -1:]
        eps_u = model.predict_eps(short, xt, t, guidance=1.0)
        assert not torch.allclose(eps_c, eps_u, atol=1e-4)          # the caption does reach the patches
        g = 3.0
        assert torch.allclose(model.predict_eps(prefix, xt, t, guidance=g), eps_c + (g - 1) * (eps_c - eps_u), atol=1e-4)
        out = model.generate_image(prefix, guidance=1.0, steps=3)
    assert out.shape == (2, cfg.n_patches, cfg.patch_dim) and out.abs().max() <= 1.0


# --- causality, decoding ---------------------------------------------------------------------------------------------
def test_causality_of_text_and_bidirectional_images():
    model, ds = tiny()
    model.eval()
    b = ds.get_batch("train", 1, 0)
    gid, _, _ = model._images(b["image_index"])
    first = int((gid[0] >= 0).nonzero()[0])
    last = first + model.cfg.n_patches - 1
    with torch.no_grad():
        logits0, _, _ = model(b)
        b2 = dict(b, tokens=b["tokens"].clone())
        t = last + 3                                             # a text position after the first image
        b2["tokens"][0, t] = (b["tokens"][0, t] + 1) % model.cfg.vocab_size
        logits1, _, _ = model(b2)
        assert torch.equal(logits0[0, :t], logits1[0, :t]) and not torch.equal(logits0[0, t:], logits1[0, t:])
        # a change in the image's LAST patch reaches its first patch (bidirectional), but not the text before it
        b3 = dict(b, patches=b["patches"].clone())
        b3["patches"][0, last] += 0.5
        h0 = hidden(model, b)
        h1 = hidden(model, b3)
        assert torch.equal(h0[0, :first], h1[0, :first])
        assert not torch.allclose(h0[0, first], h1[0, first])
        assert not torch.allclose(h0[0, last + 1], h1[0, last + 1])   # <eoi> sees the image


def hidden(model, b):
    gid, slot, n = model._images(b["image_index"])
    x0 = torch.zeros(n, model.cfg.n_patches, model.cfg.patch_dim).index_put(
        (gid[gid >= 0], slot[gid >= 0]), b["patches"][gid >= 0])
    t = torch.full((n,), 100)
    x, _ = model._embed(b["tokens"], x0, t, gid, slot)
    return model.backbone.forward_hidden(x, b["modality"], model.attention_mask(gid))


@pytest.mark.parametrize("backbone", ["dense", "mot"])
def test_cached_captioning_equals_recompute(backbone):
    model, ds = tiny(backbone=backbone)
    cfg = model.cfg
    img = torch.rand(2, 3, 16, 16) * 2 - 1
    n_pre = 3 + cfg.n_patches
    idx = torch.tensor([[cfg.bos_id, cfg.boi_id] + [0] * cfg.n_patches + [cfg.eoi_id]] * 2)
    ii = torch.full_like(idx, -1)
    ii[:, 2:2 + cfg.n_patches] = 0
    pp = torch.zeros(2, n_pre, cfg.patch_dim)
    pp[:, 2:2 + cfg.n_patches] = tf.patchify(img, cfg)
    out = model.generate(idx, 8, patches=pp, image_index=ii)
    ref = idx
    with torch.no_grad():                                     # greedy loop, full recompute every step
        for _ in range(8):
            iir = torch.cat([ii, torch.full((2, ref.shape[1] - idx.shape[1]), -1)], 1)
            ppr = torch.cat([pp, torch.zeros(2, ref.shape[1] - idx.shape[1], cfg.patch_dim)], 1)
            gid, slot, n = model._images(iir)                # images in the context at t = 0, image mask
            x0 = torch.zeros(n, cfg.n_patches, cfg.patch_dim).index_put((gid[gid >= 0], slot[gid >= 0]), ppr[gid >= 0])
            x, _ = model._embed(ref, x0, torch.zeros(n, dtype=torch.long), gid, slot)
            h = model.backbone.forward_hidden(x, (iir >= 0).long(), model.attention_mask(gid))
            ref = torch.cat([ref, model.backbone.lm_head(h[:, -1]).argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ref)


def test_generate_switches_to_diffusion_on_boi():
    model, ds = tiny()
    cfg = model.cfg
    # a head that always says <boi>: decoding must switch to diffusion, emit n patches, then <eoi>
    model.backbone.lm_head.register_forward_hook(
        lambda m, i, o: torch.nn.functional.one_hot(torch.full(o.shape[:-1], cfg.boi_id), o.shape[-1]).float())
    out = model.generate(torch.tensor([[cfg.bos_id]]), cfg.n_patches + 3)
    assert out[0, 1] == cfg.boi_id and out[0, 2 + cfg.n_patches] == cfg.eoi_id
    assert len(model.last_images[0]) == 1 and model.last_images[0][0].shape == (cfg.n_patches, cfg.patch_dim)


def test_loss_falls():
    """Overfit one batch: the eval loss (fixed noise draws and t) of text and image both fall."""
    model, ds = tiny(patch_codec="linear")
    b = ds.get_batch("train", 2, 0)

    def eval_parts():
        model.eval()
        with torch.no_grad():
            parts = model(b)[2]
        model.train()
        return parts

    before = eval_parts()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(30):
        model(b)[1].backward()
        opt.step()
        opt.zero_grad()
    after = eval_parts()
    assert after["loss_text"] < 0.7 * before["loss_text"], (before, after)
    assert after["loss_image"] < 0.8 * before["loss_image"], (before, after)


# --- LMFusion ------------------------------------------------------------------------------------------------------
def test_lmfusion_text_frozen_and_text_logits_unchanged(tmp_path):
    torch.manual_seed(0)
    text_ds = data.make_data("text", seq_len=64)
    base_cfg, _ = tiny_cfg("text", backbone="mot")
    base = tf.Transfusion(base_cfg)
    opt = torch.optim.AdamW(base.parameters(), lr=1e-2)
    for i in range(3):                                            # a little text-only training
        base(text_ds.get_batch("train", 2, i))[1].backward()
        opt.step()
        opt.zero_grad()
    path = tmp_path / "ckpt.pt"                                  # the checkpoint exactly as train.py writes it
    import train
    train.save_ckpt(str(path), dict(model=base.state_dict(), optimizer=opt.state_dict(), step=3, time=0.0,
                                    config=dict(model="lmfusion-base", model_cfg=vars(base_cfg)), rng=train.rng_state()))

    cfg, ds = tiny_cfg(backbone="mot", lmfusion=str(path))
    model = tf.Transfusion(cfg)
    text_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    image_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("backbone.") and n.endswith(".weight.1") for n in image_before)
    assert "backbone.tok_emb.weight" in text_before and "backbone.lm_head.weight" in text_before
    # image modules start as copies of the text modules
    qkv = model.backbone.blocks[0].attn.qkv.weight
    assert torch.equal(qkv[0], qkv[1])
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    for i in range(3):
        model(ds.get_batch("train", 2, i))[1].backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if n in text_before:
            assert torch.equal(p, text_before[n]), n            # bit-identical
    assert any(not torch.equal(p, image_before[n]) for n, p in model.named_parameters() if n in image_before)
    # on text-only input the LMFusion model is the base text model
    model.eval(), base.eval()
    tb = text_ds.get_batch("val", 2, 0)
    tb = dict(tb, modality=torch.zeros_like(tb["tokens"]))
    with torch.no_grad():
        assert torch.allclose(model(tb)[0], base(tb)[0], atol=1e-5)


class _Payload:
    """Unpickling this object runs open(marker, "w"): the marker file appears iff pickled code ran."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_lmfusion_refuses_a_checkpoint_with_a_pickled_object(tmp_path):
    base, _ = tiny(backbone="mot")
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    torch.save(dict(model=base.state_dict(), config={}, extra=_Payload(str(marker))), path)
    with pytest.raises(ValueError, match="weights_only") as e:
        tf.Transfusion(tiny_cfg(backbone="mot", lmfusion=str(path))[0])
    assert "\n" not in str(e.value) and "lmfusion-base" in str(e.value)   # one line, naming the fix
    assert not marker.exists()                                             # nothing ran
    torch.load(path, weights_only=False)                                   # the unsafe load would have run it
    assert marker.exists()


def test_lmfusion_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        tf.Transfusion(tiny_cfg(backbone="mot", lmfusion=str(tmp_path / "nope.pt"))[0])
    with pytest.raises(ValueError, match="backbone"):
        tf.Transfusion(tiny_cfg(backbone="dense", lmfusion="x.pt")[0])


# --- bad input ---------------------------------------------------------------------------------------------------------
def test_bad_input_raises_one_line_value_error():
    model, ds = tiny()
    b = ds.get_batch("train", 1, 0)
    with pytest.raises(ValueError, match="int64"):
        model(dict(b, tokens=b["tokens"].float()))
    with pytest.raises(ValueError, match="seq_len"):
        model(dict(b, tokens=torch.zeros(1, 100, dtype=torch.long), modality=torch.zeros(1, 100, dtype=torch.long)))
    with pytest.raises(ValueError, match="n_modalities"):
        model(dict(b, modality=b["modality"] + 2))
    with pytest.raises(ValueError, match="patches"):
        model({k: v for k, v in b.items() if k != "patches"})
    with pytest.raises(ValueError, match="boi"):
        model.generate_image(torch.tensor([[1, 5]]))
    import train                                                   # field ranges: Config.RANGES, checked by build()
    with pytest.raises(train.UsageError, match="backbone"):
        train.build("transfusion", overrides=dict(backbone="rnn"))


@pytest.mark.parametrize("backbone", ["mamba", "mom"])
def test_mamba_backbones_train_and_sample(backbone):
    """mom.py's forward_hidden plugs in: the loss has both parts, the image modules train, sampling runs."""
    model, ds = tiny(backbone=backbone)
    _, loss, parts = model(ds.get_batch("train", 1, 0))
    assert set(parts) == {"loss_text", "loss_image"}
    loss.backward()
    assert model.codec.enc.weight.grad.abs().sum() > 0 if model.cfg.patch_codec == "linear" else True
    out = model.generate_image(torch.tensor([[model.cfg.bos_id, 9, model.cfg.boi_id]]), steps=2)
    assert out.shape == (1, model.cfg.n_patches, model.cfg.patch_dim)


def test_qk_norm_switch_reaches_the_backbone():
    model, ds = tiny(qk_norm=True)
    assert all(b.attn.qk_norm for b in model.backbone.blocks)
    assert not any(b.attn.qk_norm for b in tiny()[0].backbone.blocks)
    _, loss, _ = model(ds.get_batch("train", 2, 0))
    loss.backward()
    assert model.backbone.blocks[0].attn.q_norm.weight[0].grad.abs().sum() > 0


def test_caption_dependence_sees_the_caption_and_is_exact_for_a_fixed_caption():
    model, ds = tiny()
    ex = ds.scenes(6)
    res = model.caption_dependence(ex, ts=(900,))
    assert set(res) == {"x0_mse_t0900", "x0_mse_t0900_wrong"}
    assert res["x0_mse_t0900"] != res["x0_mse_t0900_wrong"]         # another caption changes the prediction
    same = [dict(e, caption=ex[0]["caption"]) for e in ex]          # all captions equal: rolling changes nothing
    res = model.caption_dependence(same, ts=(900,))
    assert res["x0_mse_t0900"] == pytest.approx(res["x0_mse_t0900_wrong"], abs=1e-6)


def test_trunc_snr_weights_training_only_and_never_below_one():
    losses = {}
    for lw in ("uniform", "trunc_snr"):
        model, ds = tiny(loss_weight=lw, cond_dropout=0.0)
        b = ds.get_batch("train", 8, 0)   # enough images that some draw t > 500
        torch.manual_seed(1)
        model.train()
        tr = model(b)[2]["loss_image"].item()
        model.eval()
        losses[lw] = (tr, model(b)[2]["loss_image"].item())
    assert losses["trunc_snr"][0] > losses["uniform"][0]             # w = max(SNR, 1) / SNR >= 1, > 1 for t > 500
    assert losses["trunc_snr"][1] == pytest.approx(losses["uniform"][1])   # eval: the plain eps-MSE


# --- generation: earlier images are images; every row on its own ------------------------------------------------------
def interleaved(model, ds, first_image, k=0):
    """<bos> caption <boi> image <eoi> caption' <boi>: the prompt of a second image after a first one."""
    cfg, ex = model.cfg, ds.scenes(k + 2)
    n = cfg.n_patches
    tok = [cfg.bos_id] + ex[k]["caption"] + [cfg.boi_id] + [0] * n + [cfg.eoi_id] + ex[k + 1]["caption"] + [cfg.boi_id]
    start = len(ex[k]["caption"]) + 2
    ii = torch.full((1, len(tok)), -1)
    ii[0, start:start + n] = 0
    pp = torch.zeros(1, len(tok), cfg.patch_dim)
    pp[0, start:start + n] = first_image
    return torch.tensor([tok]), ii, pp


def test_second_image_is_conditioned_on_the_first_seen_as_an_image():
    model, ds = tiny()
    model.eval()
    cfg, n = model.cfg, model.cfg.n_patches
    img_a, img_b = (torch.rand(n, cfg.patch_dim, generator=torch.Generator().manual_seed(s)) * 2 - 1 for s in (1, 2))
    xt, t = torch.randn(1, n, cfg.patch_dim), torch.tensor([600])
    with torch.no_grad():
        prefix, ii, pa = interleaved(model, ds, img_a)
        eps_a = model.predict_eps(prefix, xt, t, guidance=1.0, image_index=ii, patches=pa)
        eps_b = model.predict_eps(prefix, xt, t, guidance=1.0, image_index=ii, patches=interleaved(model, ds, img_b)[2])
        assert not torch.allclose(eps_a, eps_b, atol=1e-4)             # the first image reaches the second's denoiser
        # independent reference: the whole sequence as in training, first image clean (t = 0), second at t
        Tp = prefix.shape[1]
        ii_f = torch.cat([ii, torch.ones(1, n, dtype=torch.long)], 1)
        gid, slot, n_img = model._images(ii_f)
        x, skips = model._embed(torch.cat([prefix, torch.zeros(1, n, dtype=torch.long)], 1),
                                torch.stack([img_a, xt[0]]), torch.tensor([0, 600]), gid, slot)
        h = model.backbone.forward_hidden(x, (ii_f >= 0).long(), model.attention_mask(gid))
        assert torch.allclose(eps_a, model._eps(h, gid, slot, n_img, skips)[1:], atol=1e-5)
        assert not torch.allclose(eps_a, model.predict_eps(prefix, xt, t, guidance=1.0), atol=1e-4)  # not pad tokens
        # generate(): a prompt ending with <boi> goes to diffusion mode with the first image in its context
        outs = []
        for p in (pa, interleaved(model, ds, img_b)[2]):
            tok = model.generate(prefix, n + 2, patches=p, image_index=ii, seeds=[7])
            assert tok[0, Tp + n] == cfg.eoi_id
            outs.append(model.last_images[0][0])
        direct = model.generate_image(prefix, generator=[torch.Generator().manual_seed(7)], image_index=ii, patches=pa)
        assert torch.allclose(outs[0], direct[0], atol=1e-6) and not torch.allclose(outs[0], outs[1], atol=1e-3)


def boi_when_positive(model):
    """A head that samples <boi> whenever the first hidden feature is > 0: rows switch to images at different steps,
    decided by their own content only."""
    boi = model.cfg.boi_id
    return model.backbone.lm_head.register_forward_hook(
        lambda m, i, o: o + 100.0 * (i[0][..., :1] > 0).float() * F.one_hot(torch.tensor(boi), o.shape[-1]).float())


@pytest.mark.parametrize("backbone", ["mot", "mamba"])
def test_batched_generation_equals_one_by_one_and_cache_equals_recompute(backbone):
    model, ds = tiny(backbone=backbone, seq_len=128)
    cfg, n = model.cfg, model.cfg.n_patches
    img = torch.rand(n, cfg.patch_dim, generator=torch.Generator().manual_seed(3)) * 2 - 1
    p1, ii1, pp1 = interleaved(model, ds, img)                     # row 0: a second image first, then text
    Tp = p1.shape[1]
    texts = [[cfg.bos_id] + e["caption"] * 8 for e in ds.scenes(8)[2:]]
    idx = torch.cat([p1] + [torch.tensor([t[:Tp]]) for t in texts[:3]])
    ii = torch.cat([ii1, torch.full((3, Tp), -1)])
    pp = torch.cat([pp1, torch.zeros(3, Tp, cfg.patch_dim)])
    seeds, new = [11, 12, 13, 14], 2 * (n + 1) + 6
    hook = boi_when_positive(model)
    out = model.generate(idx, new, patches=pp, image_index=ii, seeds=seeds)
    batched = [list(x) for x in model.last_images]
    starts = {int((row[Tp:] == cfg.boi_id).nonzero()[0]) for row in out if (row[Tp:] == cfg.boi_id).any()}
    assert sum(map(len, batched)) >= 3 and len(starts) >= 2        # rows enter diffusion mode at different steps
    for b in range(4):
        one = model.generate(idx[b:b + 1], new, patches=pp[b:b + 1], image_index=ii[b:b + 1], seeds=seeds[b:b + 1])
        assert torch.equal(one[0], out[b])
        assert len(model.last_images[0]) == len(batched[b])
        assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(model.last_images[0], batched[b]))
    again = model.generate(idx, new, patches=pp, image_index=ii, seeds=seeds, use_cache=False)
    assert torch.equal(again, out)
    assert all(torch.allclose(x, y, atol=1e-5) for a, b in zip(model.last_images, batched) for x, y in zip(a, b))
    hook.remove()


# --- per-row diffusion draws: any split of a batch trains on the same noise ---------------------------------------
def counts(b):
    return int(((b["targets"] != -1) & (b["image_index"] < 0)).sum()), int((b["image_index"].max(1).values + 1).sum())


def test_split_batch_equals_whole_batch_loss():
    """Rows draw t, noise and condition dropout from (model seed, row_id): the loss of a batch is the count-weighted
    mean of its halves' losses (each part is a mean over its text positions / its images), whatever the global RNG."""
    model, ds = tiny(cond_dropout=0.5)
    model.train()
    b = ds.get_batch("train", 4, 0)
    b["row_id"] = torch.arange(4) + 1000
    halves = [{k: v[s] for k, v in b.items()} for s in (slice(0, 2), slice(2, 4))]
    torch.manual_seed(0)
    _, loss, parts = model(b)
    nt, ni = counts(b)
    text = img = 0.0
    for i, h in enumerate(halves):
        torch.manual_seed(100 + i)                                   # the global RNG must not matter
        _, l_h, p_h = model(h)
        ht, hi = counts(h)
        text, img = text + float(p_h["loss_text"]) * ht / nt, img + float(p_h["loss_image"]) * hi / ni
    assert text == pytest.approx(float(parts["loss_text"]), rel=1e-6)
    assert img == pytest.approx(float(parts["loss_image"]), rel=1e-6)
    assert loss.item() == pytest.approx(text + model.cfg.lam * img, rel=1e-6)
    b2 = dict(b, row_id=b["row_id"] + 1)                            # other rows' draws: another loss
    assert float(model(b2)[2]["loss_image"]) != pytest.approx(img, rel=1e-3)
    # without row_id (a user's batch) the draws come from torch's global RNG
    plain = {k: v for k, v in b.items() if k != "row_id"}
    torch.manual_seed(5)
    l1 = model(plain)[1]
    torch.manual_seed(5)
    assert torch.equal(model(plain)[1], l1) and not torch.equal(model(plain)[1], l1)


def test_resume_is_exact_with_per_row_draws():
    def step(model, opt, i):
        b = ds.get_batch("train", 2, i)
        b["row_id"] = torch.arange(2) + 2 * i
        model(b)[1].backward()
        opt.step()
        opt.zero_grad()

    model, ds = tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for i in range(4):
        step(model, opt, i)
    resumed, _ = tiny()                                              # built from the same seed, as train.py does
    opt2 = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    for i in range(2):
        step(resumed, opt2, i)
    state = dict(model=resumed.state_dict(), opt=opt2.state_dict())
    again, _ = tiny()
    opt3 = torch.optim.AdamW(again.parameters(), lr=1e-2)
    again.load_state_dict(state["model"]), opt3.load_state_dict(state["opt"])
    torch.manual_seed(12345)                                         # another global RNG state after the restart
    for i in range(2, 4):
        step(again, opt3, i)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))


# --- settings and keys that would do nothing ------------------------------------------------------------------------
def test_supported_settings_need_continuous_images():
    for name, (_, _, setting, _) in tf.MODELS.items():
        assert setting in tf.SUPPORTED_SETTINGS[name]
        assert not {"speech", "chameleon", "bytes"} & set(tf.SUPPORTED_SETTINGS[name])
    assert tf.SUPPORTED_SETTINGS["transfusion"] == ("transfusion",) and tf.SUPPORTED_SETTINGS["lmfusion-base"] == ("text",)


@pytest.mark.parametrize("setting,over,key,enabler", [
    ("transfusion", dict(unet_channels=8, patch_codec="linear"), "unet_channels", "patch_codec"),
    ("transfusion", dict(backbone="mamba", n_head=2), "n_head", "backbone"),
    ("transfusion", dict(backbone="mom", qk_norm=True), "qk_norm", "backbone"),
    ("transfusion", dict(backbone="mamba", image_attn="causal"), "image_attn", "backbone"),
    ("text", dict(patch_codec="unet"), "patch_codec", "setting"),
    ("text", dict(guidance=1.0), "guidance", "setting"),
])
def test_keys_without_effect_are_errors_naming_what_enables_them(setting, over, key, enabler):
    with pytest.raises(ValueError, match=f"--{key}=.*has no effect.*{enabler}"):
        tiny_cfg(setting, **over)
    tiny_cfg("transfusion", patch_codec="unet", unet_channels=8)      # enabled: fine


def test_loss_names_come_from_modality_names():
    model, ds = tiny(modality_names=("words", "pictures"))
    assert set(model(ds.get_batch("train", 1, 0))[2]) == {"loss_words", "loss_pictures"}
    with pytest.raises(ValueError, match="modality_names"):
        tiny_cfg(modality_names=("text",))


@pytest.mark.parametrize("backbone", ["dense", "mot", "mamba", "mom"])
def test_training_step_reads_the_host_a_fixed_number_of_times(backbone, monkeypatch):
    """Host reads of device values in one training step (each stalls a GPU), counted on CPU: the modality id check
    (1), the image count and the patch-slot check (2), row ids and images per row for the per-row draws (1), the
    per-modality losses (1), the backbone's modality id check (2). Gathers and masks read nothing; 7 for any n_layer."""
    for n_layer in (1, 3):
        cfg, ds = tiny_cfg(backbone=backbone, n_layer=n_layer)
        torch.manual_seed(0)
        assert host_reads_in_training_step(tf.Transfusion(cfg), ds.get_batch("train", 2, 0), monkeypatch) <= 7


def test_lmfusion_refuses_a_checkpoint_holding_a_non_tensor(tmp_path):
    """A loadable ckpt.pt whose model dict holds a string where a weight should be: one line, not a traceback."""
    import train
    base, _, _, _ = train.build("lmfusion-base")
    sd = {k: v for k, v in base.state_dict().items()}
    key = next(k for k in sd if k.startswith("backbone."))
    sd[key] = "str"
    path = tmp_path / "ckpt.pt"
    torch.save({"model": sd}, path)
    with pytest.raises(train.UsageError, match="does not match this model"):
        train.build("lmfusion", overrides=dict(lmfusion=str(path)))
