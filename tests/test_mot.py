"""Tests for mot.py: the dense Transformer baseline and Mixture-of-Transformers. Tiny configs, CPU, fp32."""
import os
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mot  # noqa: E402

torch.set_num_threads(1)
OFFS3 = (0, 32, 64)


def tiny(n_mod=2, **kw):
    base = dict(vocab_size=96, n_modalities=n_mod, modality_offsets=(0, 32, 64)[:n_mod], seq_len=32, n_layer=2,
                n_head=2, d_model=16)
    base.update(kw)
    return mot.Config(**base)


def untied(**kw):
    return dict(untie_attn=True, untie_ffn=True, untie_norm=True, **kw)


def make_batch(model, B=2, T=24, seed=0, modality=None):
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    if modality is None:
        tokens = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    else:  # every token drawn from the id range of the given modality
        lo = cfg.modality_offsets[modality]
        hi = cfg.modality_offsets[modality + 1] if modality + 1 < cfg.n_modalities else cfg.vocab_size
        tokens = torch.randint(lo, hi, (B, T), generator=g)
    targets = torch.roll(tokens, -1, 1)
    targets[:, -1] = -1
    return dict(tokens=tokens, targets=targets, modality=model.modality_of(tokens),
                target_modality=model.modality_of(targets.clamp(min=0)), loss_mask=targets != -1)


VARIANTS = {
    "dense": dict(),
    "mot": untied(),
    "mot_pre_qk": untied(norm_placement="pre", qk_norm=True),
    "mot_ffn_only": dict(untie_ffn=True),
    "mot_masked": untied(routing="masked"),   # the plain form: every module reads the (B, T) modality tensor
}


def same_logits_and_grads(fast, ref, b, atol, rtol):
    """fast and ref (same weights) give the same logits and every parameter gradient on batch b."""
    (lf, lossf, _), (lr, lossr, _) = fast(b), ref(b)
    torch.testing.assert_close(lf, lr, atol=atol, rtol=rtol)
    lossf.backward()
    lossr.backward()
    for (n, pf), (_, pr) in zip(fast.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(pf.grad, pr.grad, atol=atol, rtol=rtol, msg=n)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_causality(variant):
    torch.manual_seed(0)
    model = mot.Transformer(tiny(3, **VARIANTS[variant]))
    b = make_batch(model)
    logits = model(b)[0]
    t = 10
    tok2 = b["tokens"].clone()
    tok2[:, t + 1:] = torch.randint(0, 96, tok2[:, t + 1:].shape)
    b2 = dict(b, tokens=tok2, modality=model.modality_of(tok2))
    logits2 = model(b2)[0]
    assert torch.allclose(logits[:, :t + 1], logits2[:, :t + 1], atol=1e-6)
    assert not torch.allclose(logits[:, t + 1:], logits2[:, t + 1:], atol=1e-3)


@pytest.mark.parametrize("n_mod", [2, 3])
@pytest.mark.parametrize("variant", ["mot", "mot_pre_qk"])
def test_single_modality_batch_leaves_other_modalities_untouched(n_mod, variant):
    torch.manual_seed(0)
    model = mot.MoT(tiny(n_mod, **VARIANTS[variant]))
    for m in range(n_mod):
        model.zero_grad(set_to_none=True)
        b = make_batch(model, modality=m)
        assert (b["modality"] == m).all()
        model(b)[1].backward()
        own = model.modality_parameters(m)
        assert len(own) > 0 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in own)
        for other in range(n_mod):
            if other != m:
                for p in model.modality_parameters(other):
                    assert p.grad is None or torch.count_nonzero(p.grad) == 0


@pytest.mark.parametrize("extra", [dict(), dict(norm_placement="pre", qk_norm=True)])
def test_copied_weights_reproduce_dense(extra):
    torch.manual_seed(0)
    dense = mot.Transformer(tiny(3, **extra))
    moe = mot.MoT(tiny(3, **untied(**extra)))
    src = dense.state_dict()
    with torch.no_grad():
        for name, p in moe.named_parameters():
            # untied modules hold "...weight.<m>"; the dense model's only copy is "...weight.0"
            key = name.rsplit(".", 1)[0] + ".0" if name.rsplit(".", 1)[-1].isdigit() else name
            p.copy_(src[key])
    b = make_batch(dense)
    assert set(b["modality"].unique().tolist()) == {0, 1, 2}
    ld, loss_d, _ = dense(b)
    lm, loss_m, _ = moe(b)
    assert torch.allclose(ld, lm, atol=1e-6, rtol=0)
    assert abs(loss_d.item() - loss_m.item()) < 1e-6
    assert moe.num_params() > 2.5 * dense.num_params()   # ~M x the non-embedding parameters


def test_earlier_image_token_changes_later_text():
    torch.manual_seed(0)
    model = mot.MoT(tiny(2, **untied()))
    tokens = torch.randint(0, 32, (1, 20))          # text ...
    tokens[0, 3:8] = torch.randint(32, 96, (5,))     # ... with an image in positions 3..7
    b = dict(tokens=tokens, modality=model.modality_of(tokens))
    tok2 = tokens.clone()
    tok2[0, 5] = 32 + (tok2[0, 5] - 32 + 7) % 64      # another image token
    out1 = model(b)[0]
    out2 = model(dict(tokens=tok2, modality=model.modality_of(tok2)))[0]
    assert torch.allclose(out1[:, :5], out2[:, :5], atol=1e-6)
    assert (out1[0, 8:] - out2[0, 8:]).abs().max() > 1e-4   # text after the image sees it (global attention)


@pytest.mark.parametrize("variant", ["dense", "mot", "mot_pre_qk", "mot_masked"])
def test_cached_generation_equals_full_forward(variant):
    torch.manual_seed(0)
    model = mot.Transformer(tiny(3, **VARIANTS[variant]))
    prompt = make_batch(model, B=2, T=7)["tokens"]
    out = model.generate(prompt, 12)
    assert out.shape == (2, 19) and torch.equal(out[:, :7], prompt)
    logits = model(dict(tokens=out[:, :-1]))[0]
    assert torch.equal(logits[:, 6:].argmax(-1), out[:, 7:])   # every cached greedy step = full-forward argmax
    # logits: a prefix, then a multi-token chunk on top of the cache, equal the full forward
    seq = out[:, :16]
    caches = [dict() for _ in model.blocks]
    with torch.no_grad():
        h1 = model.forward_hidden(model.tok_emb(seq[:, :9]), model.modality_of(seq[:, :9]), caches=caches)
        h2 = model.forward_hidden(model.tok_emb(seq[:, 9:]), model.modality_of(seq[:, 9:]), caches=caches, pos0=9)
        full = model.forward_hidden(model.tok_emb(seq), model.modality_of(seq))
    assert torch.allclose(torch.cat([h1, h2], 1), full, atol=1e-5)


def test_plain_modality_layers_are_the_per_token_definition():
    """The plain forms are the paper's per-token rule: y_t = x_t W[m_t], and the norm's gain g[m_t]."""
    torch.manual_seed(0)
    lin, norm = mot.ModalityLinear(8, 5, 3), mot.ModalityRMSNorm(8, 3)
    for p in norm.parameters():
        p.data += torch.randn_like(p)
    x, mod = torch.randn(2, 7, 8), torch.randint(0, 3, (2, 7))
    y, z = lin(x, mod), norm(x, mod)
    for b in range(2):
        for t in range(7):
            m = mod[b, t]
            torch.testing.assert_close(y[b, t], x[b, t] @ lin.weight[m], atol=1e-6, rtol=0)
            torch.testing.assert_close(z[b, t], x[b, t] * torch.rsqrt(x[b, t].pow(2).mean() + norm.eps) * norm.weight[m])
    xh = torch.randn(2, 7, 4, 8)                                       # a q/k norm: (B, T, H, hd), one gain per token
    torch.testing.assert_close(norm(xh, mod), torch.stack([norm(xh[:, :, h], mod) for h in range(4)], 2))


@pytest.mark.parametrize("untie", ["untie_attn", "untie_ffn", "untie_norm"])
def test_sorted_stream_equals_plain_form_for_each_untie_switch(untie):
    """One component untied: the shared ones run on the sorted rows too (attention unsorts around the shared W_QKV);
    forward and every gradient equal the plain form's."""
    torch.manual_seed(0)
    over = {untie: True, "qk_norm": True}
    fast, ref = mot.MoT(tiny(3, **over)), mot.MoT(tiny(3, routing="masked", **over))
    assert fast.sorted_stream and not ref.sorted_stream
    for p in fast.parameters():
        p.data += 0.1 * torch.randn_like(p)
    ref.load_state_dict(fast.state_dict())
    b = make_batch(fast, B=3, T=20)
    same_logits_and_grads(fast, ref, b, atol=1e-6, rtol=0)


def test_grouped_matmul_path_equals_masked_reference():
    torch.manual_seed(0)
    cfg = tiny(3, **untied(qk_norm=True))
    fast = mot.MoT(cfg)
    ref = mot.MoT(tiny(3, **untied(qk_norm=True, routing="masked")))
    ref.load_state_dict(fast.state_dict())
    b = make_batch(fast)
    same_logits_and_grads(fast, ref, b, atol=1e-5, rtol=1e-5)   # torch.allclose's rtol


@pytest.mark.parametrize("placement", ["pre", "post"])
def test_sorted_stream_equals_masked_reference_to_1e6(placement):
    """The sorted residual stream (sort once, grouped matmuls and per-block gains, unsort only around attention)
    equals the masked reference (no permutation at all), forward and every gradient, with one modality absent from
    the batch; and the sequence-order entry points (a (B, T, d) input) equal the stream's."""
    torch.manual_seed(0)
    over = untied(qk_norm=True, norm_placement=placement)
    fast, ref = mot.MoT(tiny(3, **over)), mot.MoT(tiny(3, routing="masked", **over))
    for p in fast.parameters():                                        # gains off 1, so a wrong gain shows
        p.data += 0.1 * torch.randn_like(p)
    ref.load_state_dict(fast.state_dict())
    b = make_batch(fast, B=3, T=20)
    b["tokens"] = b["tokens"] % 64                                     # modalities 0 and 1 only: modality 2 is empty
    b["modality"] = fast.modality_of(b["tokens"])
    same_logits_and_grads(fast, ref, b, atol=1e-6, rtol=0)
    att, x = fast.blocks[0].attn, torch.randn(3, 20, 16)
    rt = mot.Routing(b["modality"], 3)
    cos, sin = mot.rope(torch.arange(20), 8, 1e4, x.device)
    torch.testing.assert_close(att.qkv(x, rt), rt.unsort(att.qkv(rt.sort(x), rt)))
    torch.testing.assert_close(att(x, rt, cos, sin), rt.unsort(att(rt.sort(x), rt, cos, sin)))
    torch.testing.assert_close(att(x, rt, cos, sin), ref.blocks[0].attn(x, b["modality"], cos, sin), atol=1e-6, rtol=0)


def _flops(model, batch):
    with FlopCounterMode(display=False) as fc:
        model(batch)[1].backward()
    return fc.get_total_flops()


def test_flops_equal_for_dense_and_mot():
    torch.manual_seed(0)
    dense = mot.Transformer(tiny(3))
    moe = mot.MoT(tiny(3, **untied()))
    b = make_batch(dense)
    fd, fm = _flops(dense, b), _flops(moe, b)
    assert fd == fm and fd > 0
    import train  # the trainer's counter (attention included) gives the same equality
    assert train.count_flops(dense, b) == train.count_flops(moe, b) > fd / b["tokens"].numel()
    masked = mot.MoT(tiny(3, **untied(routing="masked")))   # the counter sees the M x cost of the reference
    assert _flops(masked, b) > 1.5 * fd


def test_loss_falls_when_overfitting_one_batch():
    torch.manual_seed(0)
    model = mot.MoT(tiny(2, **untied()))
    b = make_batch(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(40):
        loss = model(b)[1]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_frozen_modality_trains_the_others():
    """LMFusion-style: requires_grad=False on modality 0's parameters keeps them fixed, the rest still learn."""
    torch.manual_seed(0)
    model = mot.MoT(tiny(2, **untied()))
    for p in model.modality_parameters(0):
        p.requires_grad_(False)
    before0 = [p.clone() for p in model.modality_parameters(0)]
    before1 = [p.clone() for p in model.modality_parameters(1)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(make_batch(model))[1].backward()
    opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before0, model.modality_parameters(0)))
    assert any(not torch.equal(a, p) for a, p in zip(before1, model.modality_parameters(1)))


def test_forward_hidden_with_bool_mask():
    torch.manual_seed(0)
    model = mot.MoT(tiny(2, **untied()))
    x = torch.randn(2, 10, 16)
    mod = torch.randint(0, 2, (2, 10))
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    h = model.forward_hidden(x, mod)
    assert torch.allclose(model.forward_hidden(x, mod, attn_mask=causal), h, atol=1e-6)
    assert torch.allclose(model.forward_hidden(x, mod, attn_mask=causal.expand(2, 1, 10, 10)), h, atol=1e-6)
    full = torch.ones(10, 10, dtype=torch.bool)          # bidirectional: early positions now see later ones
    assert not torch.allclose(model.forward_hidden(x, mod, attn_mask=full)[:, 0], h[:, 0], atol=1e-4)


def test_bad_input_raises_value_error():
    model = mot.MoT(tiny(2, **untied()))
    b = make_batch(model)
    with pytest.raises(ValueError, match="modality ids"):
        model(dict(b, modality=torch.full_like(b["modality"], 2)))
    with pytest.raises(ValueError, match="modality ids"):
        model(dict(b, modality=torch.full_like(b["modality"], -1)))
    with pytest.raises(ValueError, match="seq_len"):
        model(dict(tokens=torch.zeros(1, 40, dtype=torch.long)))
    with pytest.raises(ValueError, match="int64"):
        model(dict(tokens=b["tokens"].float()))
    with pytest.raises(ValueError, match="seq_len"):
        model.generate(b["tokens"][:, :20], 20)
    with pytest.raises(ValueError, match="modality_offsets"):
        mot.MoT(tiny(2, modality_offsets=(0, 32, 64)))


def test_registry_builds():
    for name, (C, M, setting, over) in mot.MODELS.items():
        model = M(C(**over))
        assert setting == "chameleon"
        assert (len(model.modality_parameters(1)) > 0) == (name == "mot")


@pytest.mark.parametrize("setting,n_mod", [("chameleon", 2), ("speech", 3), ("bytes", 1)])
def test_trainer_builds_dense_and_mot(setting, n_mod):
    import train
    for name in ("dense", "mot"):
        if setting not in mot.SUPPORTED_SETTINGS[name]:  # MoT on one modality is the dense model: refused
            with pytest.raises(train.UsageError, match="supported"):
                train.build(name, setting, overrides=dict(seq_len=64), train_overrides=dict(seq_len=64))
            continue
        model, cfg, tc, ds = train.build(name, setting, overrides=dict(seq_len=64), train_overrides=dict(seq_len=64))
        assert cfg.n_modalities == n_mod and cfg.vocab_size == ds.vocab_size
        b = ds.get_batch("train", 2, 0)
        logits, loss, parts = model(b)
        assert logits.shape == (2, 64, ds.vocab_size) and torch.isfinite(loss)
        assert set(parts) <= {"loss_text", "loss_image", "loss_speech"} and len(parts) >= 1


@pytest.mark.parametrize("name", ["dense", "mot"])
def test_a_fourth_modality_trains_and_reports_its_loss(name):
    """Modality count and names come from the Config: 4 modalities train, generate, and report one loss each."""
    torch.manual_seed(0)
    over = mot.MODELS[name][3]
    names = ("text", "image", "speech", "video")
    cfg = tiny(4, modality_offsets=(0, 24, 48, 72), modality_names=names, **over)
    model = mot.MODELS[name][1](cfg)
    b = make_batch(model, B=3, T=24)
    assert set(b["modality"].unique().tolist()) == {0, 1, 2, 3}
    _, loss, parts = model(b)
    loss.backward()
    assert set(parts) == {f"loss_{n}" for n in names}
    if name == "mot":  # the fourth modality's own weights are trained
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.modality_parameters(3))
    assert model.generate(b["tokens"][:, :4], 4).shape == (3, 8)
    unnamed = mot.MODELS[name][1](tiny(4, modality_offsets=(0, 24, 48, 72), **over))  # names not given: numbered
    assert {"loss_modality2", "loss_modality3"} <= set(unnamed(b)[2])


def test_each_untie_switch_unties_exactly_its_component():
    """The MoT ablation switches: untie_attn -> W_QKV, W_O (and QK-norms), untie_ffn -> the FFN, untie_norm -> the
    attention / FFN / final norms. E.g. --untie_ffn=False keeps attention AND norms per modality."""
    import itertools
    parts = {"attn": {"attn.qkv", "attn.proj", "attn.q_norm", "attn.k_norm"}, "ffn": {"ffn.w13", "ffn.w2"},
             "norm": {"norm_attn", "norm_ffn", "norm_f"}}
    for flags in itertools.product([False, True], repeat=3):
        on = dict(zip(("attn", "ffn", "norm"), flags))
        model = mot.Transformer(tiny(2, qk_norm=True, **{f"untie_{k}": v for k, v in on.items()}))
        untied = {n.split(".", 2)[-1] if n.startswith("blocks.") else n for n, m in model.named_modules()
                  if isinstance(m, (mot.ModalityLinear, mot.ModalityRMSNorm)) and m.n > 1}
        assert untied == set().union(*(parts[k] for k in on if on[k])), on
