import math

import pytest
import torch
import torch.nn.functional as F

import megabyte
from megabyte import Config, Megabyte

torch.set_num_threads(1)

P = 4
VARIANTS = {
    "base": dict(),
    "conv": dict(conv_encoder=True),
    "cross": dict(cross_patch=2),
    "conv+cross+untied": dict(conv_encoder=True, cross_patch=P, tie_local_embed=False),
}


def tiny(**kw):
    kw.setdefault("cross_patch", 0)
    torch.manual_seed(0)
    cfg = Config(seq_len=32, patch_size=P, d_global=8, n_layer_global=2, n_head_global=2, d_local=16,
                 n_layer_local=2, n_head_local=2, **kw)
    m = Megabyte(cfg).double().eval()
    with torch.no_grad():                       # pads start at zero-ish; make every parameter matter
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def batch_of(x):
    return dict(tokens=x[:, :-1], targets=x[:, 1:].clone())


@pytest.mark.parametrize("variant", list(VARIANTS) + ["strided"])
def test_causal_at_every_byte(variant):
    kw = dict(strided_inference=True) if variant == "strided" else VARIANTS[variant]
    m = tiny(**kw)
    torch.manual_seed(1)
    x = torch.randint(0, 256, (2, 15))          # 15 % 4 != 0: the padded tail is exercised too
    ref, _, _ = m(dict(tokens=x))
    for s in range(x.shape[1]):                 # s covers first and last bytes of every patch
        y = x.clone()
        y[:, s] = (y[:, s] + 1 + torch.arange(2)) % 256
        out, _, _ = m(dict(tokens=y))
        assert torch.equal(out[:, :s], ref[:, :s]), f"logits before {s} depend on byte {s}"
        assert not torch.allclose(out[:, s], ref[:, s]), f"logits at {s} ignore their own input byte"


@pytest.mark.parametrize("variant", VARIANTS)
def test_global_input_k_independent_of_patches_ge_k(variant):
    m = tiny(**VARIANTS[variant])
    torch.manual_seed(2)
    u = torch.randint(0, 256, (1, 6 * P))
    gin = m.global_inputs(u)
    gout, _ = m.global_model(gin)
    assert gin.shape == (1, 6, P * 8)
    assert torch.equal(gin[:, 0], m.global_pad.expand(1, -1))          # position 0 is the pad patch
    for j in range(6):                          # perturb patch j: global positions 0..j must not move
        v = u.clone()
        v[:, j * P:(j + 1) * P] = (v[:, j * P:(j + 1) * P] + 7) % 256
        gin2 = m.global_inputs(v)
        gout2, _ = m.global_model(gin2)
        assert torch.equal(gin2[:, :j + 1], gin[:, :j + 1])
        assert torch.equal(gout2[:, :j + 1], gout[:, :j + 1])
        if j < 5:
            assert not torch.allclose(gin2[:, j + 1], gin[:, j + 1])   # ... and position j+1 sees patch j


def test_matches_a_loop_over_patches_and_bytes():
    """Sec. 2.2 written out position by position, against the batched forward."""
    m = tiny()
    torch.manual_seed(3)
    x = torch.randint(0, 256, (2, 11))
    T = x.shape[1]
    logits, _, _ = m(dict(tokens=x))
    K = math.ceil((T + 1) / P)
    u = torch.cat((x, torch.zeros(2, K * P - T, dtype=torch.long)), 1)
    h = m.global_embed(u) + m.pos_embed(torch.arange(K * P))
    gin = [m.global_pad.expand(2, -1)] + [h[:, (k - 1) * P:k * P].reshape(2, -1) for k in range(1, K)]
    gout, _ = m.global_model(torch.stack(gin, 1))
    ref = []
    for k in range(K):
        loc = []
        for p in range(P):
            slot = m.w_gl(gout[:, k, p * 8:(p + 1) * 8])
            prev = m.local_pad.expand(2, -1) if p == 0 else m.local_embed(u[:, k * P + p - 1])
            loc.append(slot + prev)
        hl, _ = m.local_model(torch.stack(loc, 1))
        ref.append(hl @ m.local_embed.weight.t())
    ref = torch.cat(ref, 1)[:, 1:T + 1]          # paper position t+1 predicts target t
    torch.testing.assert_close(logits, ref)


def test_padding_never_in_loss():
    m = tiny()
    torch.manual_seed(4)
    x = torch.randint(0, 256, (2, 14))          # 13 inputs: 14 paper positions, padded to 16
    b = batch_of(x)
    b["targets"][0, 3] = -1                     # an ignored target too
    logits, loss, parts = m(b)
    lp = F.log_softmax(logits, -1)
    keep = b["targets"] != -1
    nll = -lp.gather(-1, b["targets"].clamp(min=0)[..., None])[..., 0]
    assert torch.allclose(loss, nll[keep].mean())
    assert torch.allclose(parts["loss_text"], loss)
    # the same bytes inside a longer sequence give the same logits: padding changes nothing real
    longer = torch.cat((x, torch.randint(0, 256, (2, 5))), 1)
    logits_long, _, _ = m(dict(tokens=longer[:, :-1]))
    torch.testing.assert_close(logits_long[:, :13], logits)
    # and the pad byte value is irrelevant: zeros vs. a different filler in _paper_logits
    u = F.pad(b["tokens"], (0, 3), value=200)
    torch.testing.assert_close(m._core(u)[0][:, 1:14], logits)


def test_bpb_is_mean_ce_nats_over_ln2():
    m = tiny()
    torch.manual_seed(5)
    x = torch.randint(0, 256, (3, 10))
    b = batch_of(x)
    logits, loss, _ = m(b)
    p = F.softmax(logits, -1).gather(-1, b["targets"][..., None])[..., 0]
    bits = -torch.log2(p).sum() / p.numel()     # sum of bits over bytes / number of bytes
    assert torch.allclose(loss / math.log(2), bits)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tp", [1, 4, 6])       # prompt ending mid-patch and at a patch boundary
def test_greedy_cached_generation_equals_teacher_forced_argmax(variant, tp):
    m = tiny(**VARIANTS[variant])
    torch.manual_seed(6)
    prompt = torch.randint(0, 256, (2, tp))
    n = 13
    out, step_logits = megabyte.cached_generate(m, prompt, n)
    assert torch.equal(out, m.generate(prompt, n))
    assert out.shape == (2, tp + n) and torch.equal(out[:, :tp], prompt)
    logits, _, _ = m(dict(tokens=out[:, :-1]))
    torch.testing.assert_close(step_logits, logits[:, tp - 1:])              # cache == full forward
    assert torch.equal(out[:, tp:], logits[:, tp - 1:].argmax(-1))            # greedy == teacher-forced argmax


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("tp", [1, 4, 6])
def test_cached_generation_equals_the_plain_recomputing_loop(variant, tp):
    """The speed path (cfg.kv_cache: one global step per patch, P local steps, KV caches) against the plain form
    (the whole forward again for every byte): the same bytes, greedy and sampled with the same seed."""
    m = tiny(**VARIANTS[variant])
    torch.manual_seed(6)
    prompt = torch.randint(0, 256, (2, tp))
    outs = {}
    for cached in (True, False):
        m.cfg.kv_cache = cached
        torch.manual_seed(7)
        outs[cached] = (m.generate(prompt, 13), m.generate(prompt, 13, temperature=1.0))
    assert torch.equal(outs[True][0], outs[False][0])                         # greedy
    assert torch.equal(outs[True][1], outs[False][1])                         # sampled, same seed


def test_sampling_and_length_checks():
    m = tiny()
    torch.manual_seed(7)
    out = m.generate(torch.randint(0, 256, (2, 3)), 9, temperature=1.0)
    assert out.shape == (2, 12) and out.min() >= 0 and out.max() < 256
    with pytest.raises(ValueError, match="seq_len"):
        m.generate(torch.zeros(1, 30, dtype=torch.long), 5)
    m.cfg.kv_cache = False                                  # the plain path checks the same
    with pytest.raises(ValueError, match="seq_len"):
        m.generate(torch.zeros(1, 30, dtype=torch.long), 5)


def test_strided_inference_takes_first_half_of_each_patch():
    m = tiny(strided_inference=True)
    torch.manual_seed(8)
    x = torch.randint(0, 256, (2, 17))
    strided, _, _ = m(dict(tokens=x))
    plain = m._paper_logits(x)
    shifted = m._paper_logits(x[:, P // 2:])    # the pass offset by P/2, computed separately
    for t in range(x.shape[1]):
        idx = (t + 1) % P                       # index of paper position t+1 in its patch
        want = shifted[:, t - P // 2] if (idx >= P // 2 and t + 1 > P // 2) else plain[:, t]
        torch.testing.assert_close(strided[:, t], want)
    m.train()                                   # training uses a single pass
    torch.testing.assert_close(m(dict(tokens=x))[0], plain)


def test_loss_falls_when_overfitting_one_batch():
    torch.manual_seed(9)
    m = Megabyte(Config(seq_len=32, patch_size=P, d_global=8, n_head_global=2, d_local=16, n_head_local=2,
                        cross_patch=2, conv_encoder=True))
    b = batch_of(torch.tensor([list(b"abcabcabdabcabcabdabcabcabd")]))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        _, loss, _ = m(b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_bad_input_raises_value_error():
    m = tiny()
    with pytest.raises(ValueError, match="int64"):
        m(dict(tokens=torch.zeros(1, 4)))
    with pytest.raises(ValueError, match="seq_len"):
        m(dict(tokens=torch.zeros(1, 33, dtype=torch.long)))
    with pytest.raises(ValueError, match="byte ids"):
        m(dict(tokens=torch.full((1, 4), 256)))
    with pytest.raises(ValueError, match="n_modalities"):
        m(dict(tokens=torch.zeros(1, 4, dtype=torch.long), modality=torch.ones(1, 4, dtype=torch.long)))
    with pytest.raises(ValueError, match="even"):
        Megabyte(Config(patch_size=3, strided_inference=True))
    with pytest.raises(ValueError, match="cross_patch"):
        Megabyte(Config(patch_size=4, cross_patch=5))
    with pytest.raises(ValueError, match="heads"):
        Megabyte(Config(d_local=30, n_head_local=4))


def test_registry():
    cfg_cls, model_cls, setting, over = megabyte.MODELS["megabyte"]
    assert (cfg_cls, model_cls, setting) == (Config, Megabyte, "bytes") and cfg_cls(**over).vocab_size == 256


def test_patch_layout_is_what_the_model_reads():
    """patch_layout(T) against the model's gradients: the prediction at trainer position t depends on the global
    embeddings of bytes [0, global_sees) exactly, and on the local embeddings of bytes [global_sees, local_reads]."""
    m = tiny()                                      # cross_patch = 0, no conv: the paper's plain layout
    T = 11
    lay = m.patch_layout(T)
    seen = {}

    def keep(name):
        def hook(mod, inputs, out):
            out.retain_grad()
            seen[name] = out
        return hook
    hooks = [m.global_embed.register_forward_hook(keep("global")), m.local_embed.register_forward_hook(keep("local"))]
    x = torch.randint(0, 256, (1, T))
    for t in range(T):
        m.zero_grad()
        logits, _, _ = m(dict(tokens=x))
        logits[0, t].sum().backward()
        g = seen["global"].grad[0].abs().sum(-1)[:T]
        loc = seen["local"].grad[0].abs().sum(-1)[:T]
        assert (g > 0).nonzero().flatten().tolist() == list(range(int(lay["global_sees"][t]))), t
        assert (loc > 0).nonzero().flatten().tolist() == list(range(int(lay["global_sees"][t]),
                                                                   int(lay["local_reads"][t]) + 1)), t
        assert int(lay["patch"][t]) * P + int(lay["slot"][t]) == t + 1
    for h in hooks:
        h.remove()


def test_patch_position_bits_is_the_eval_loss_by_slot():
    m = tiny()
    assert m.patch_position_bits() is None                  # no eval yet
    torch.manual_seed(2)
    b = batch_of(torch.randint(0, 256, (2, 14)))
    logits, _, _ = m(b)                                     # eval mode (tiny() returns .eval())
    ce = F.cross_entropy(logits.reshape(-1, 256), b["targets"].reshape(-1), reduction="none").view(2, 13)
    slot = m.patch_layout(13)["slot"]
    want = torch.stack([ce[:, slot == p].mean() for p in range(P)]) / math.log(2)
    assert torch.allclose(m.patch_position_bits().double(), want)


def test_supported_settings_are_single_stream():
    assert megabyte.SUPPORTED_SETTINGS == {"megabyte": ("bytes", "text")}
    assert not hasattr(Megabyte, "extra_plots")
