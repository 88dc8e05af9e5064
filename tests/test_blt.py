"""Tests for blt.py: causality with the entropy model in the loop, incremental patching, hash n-grams, cross-attention
isolation, patch bookkeeping, row independence, generation, the entropy checkpoint, learning, and the speed paths
(window attention, gathered cross-attention) equal to the plain masked forms."""
import math
import os
import pickle

import pytest
import torch

import blt
import train
from blt import BLT, OFFSET, Config, EntropyConfig, EntropyModel

torch.set_num_threads(1)
T = 48
TEXT = (b"the red cat sat on the mat | the red cat sat on the mat | 17 18 19 20 21 xQ#7p@Lz2&k9 the cat. " * 2)


def text_batch(B=2, T=T, shift=0):
    rows = [list(TEXT[shift + 7 * b: shift + 7 * b + T + 1]) for b in range(B)]
    t = torch.tensor(rows)
    return dict(tokens=t[:, :-1].contiguous(), targets=t[:, 1:].contiguous())


def small_cfg(**kw):
    base = dict(seq_len=64, d_local=16, n_head_local=2, n_head_cross=2, d_global=32, n_head_global=2,
                n_layer_global=2, cross_k=2, hash_vocab=64, local_window=8, max_patch_len=6, patch_size=3.0)
    base.update(kw)
    if base.get("patching") == "space" and "patch_size" not in kw:
        del base["patch_size"]                  # no effect with space patching (an error if given)
    return Config(**base)


def entropy_model(seed=0):
    torch.manual_seed(seed)
    m = EntropyModel(EntropyConfig(seq_len=64, d_model=16, n_head=2, window=16))
    with torch.no_grad():                       # spread its entropies so that thresholds cut at varied places
        m.head.weight.mul_(40.0)
    return m


def make_model(mode="entropy", seed=0, **kw):
    torch.manual_seed(seed)
    ent = entropy_model(seed) if mode in ("entropy", "monotonic") else None
    model = BLT(small_cfg(patching=mode, **kw), entropy_model=ent)
    model.eval()
    if ent is not None:
        model.tune_threshold(text_batch()["tokens"])   # the explicit tuning step, on "training" text
    return model


MODES = ["entropy", "monotonic", "space", "static"]


def build_error(**over):
    """The trainer's one-line UsageError for these model overrides (field ranges live in Config.RANGES)."""
    with pytest.raises(train.UsageError) as e:
        train.build("blt", overrides=over, train_overrides=dict(seq_len=64))
    return str(e.value)


@pytest.mark.parametrize("mode", MODES)
def test_causal_including_patch_boundaries(mode):
    model = make_model(mode)
    x = text_batch(B=1)["tokens"]
    starts = model.patch(x + OFFSET)[0]
    ends = [t for t in range(T - 1) if starts[t + 1]]          # bytes that close a patch
    inner = [t for t in range(1, T - 1) if not starts[t + 1]]
    assert ends and (inner or mode == "static")
    ref, _, _ = model(dict(tokens=x))
    g = torch.Generator().manual_seed(1)
    for t in sorted(set(ends[:6] + ends[-3:] + inner[:4])):
        x2 = x.clone()
        x2[0, t + 1:] = torch.randint(0, 256, (T - t - 1,), generator=g)
        out, _, _ = model(dict(tokens=x2))
        assert torch.allclose(out[0, :t + 1], ref[0, :t + 1], atol=1e-5), f"logits <= {t} changed"
        assert torch.equal(model.patch(x2 + OFFSET)[0, :t + 2], starts[:t + 2])   # patches up to t+1 too


@pytest.mark.parametrize("mode", MODES)
def test_incremental_patching(mode):
    model = make_model(mode)
    x = text_batch(B=2)["tokens"] + OFFSET
    full = model.patch(x)
    for t in range(1, T + 1):
        assert torch.equal(model.patch(x[:, :t]), full[:, :t + 1]), f"prefix {t}"


@pytest.mark.parametrize("mode", MODES)
def test_patch_lengths_sum_to_T_and_respect_max(mode):
    model = make_model(mode, max_patch_len=5)
    starts = model.patch(text_batch(B=3)["tokens"] + OFFSET)
    for lens in blt.patch_lengths(starts):
        assert sum(lens) == T and min(lens) >= 1 and max(lens) <= 5 and lens[0] == 1


def test_patching_rules_by_hand():
    x = torch.tensor([list(b"ab  cd,e")]) + OFFSET
    s = blt.patch_starts(x, "space")[0].tolist()
    assert [i for i, v in enumerate(s) if v] == [0, 1, 3, 7]          # "a" "b " " cd," "e"
    s = blt.patch_starts(x, "static", patch_size=3)[0].tolist()
    assert [i for i, v in enumerate(s) if v] == [0, 1, 4, 7]
    ent = torch.tensor([[0.1, 3.0, 0.2, 0.3, 2.5, 2.6, 0.1, 5.0]])   # ent[t] = H(x_{t+1})
    s = blt.patch_starts(x, "entropy", ent, threshold=1.0)[0].tolist()
    assert [i for i, v in enumerate(s) if v] == [0, 1, 2, 5, 6, 8]
    s = blt.patch_starts(x, "monotonic", ent, threshold=1.0)[0].tolist()
    assert [i for i, v in enumerate(s) if v] == [0, 1, 2, 5, 8]
    s = blt.patch_starts(x, "static", patch_size=100, max_patch_len=3)[0].tolist()
    assert [i for i, v in enumerate(s) if v] == [0, 1, 4, 7]


def test_threshold_tuner_hits_target():
    torch.manual_seed(0)
    ent = torch.rand(4, 200) * 4
    x = torch.zeros(4, 200, dtype=torch.long)
    for target in (2.0, 4.0, 6.0):
        th = blt.threshold_for(ent, x, "entropy", target)
        n = blt.patch_starts(x, "entropy", ent, th)[:, :-1].sum().item()
        assert abs(x.numel() / n - target) / target < 0.05


@pytest.mark.parametrize("mode", ["entropy", "monotonic"])
def test_threshold_tuned_once_at_build_same_on_every_rank_and_never_by_forward(mode):
    ths = []
    for rank in range(2):                       # two ranks / builds: different global RNG states, same threshold
        torch.manual_seed(100 + rank)
        model = BLT(small_cfg(patching=mode), entropy_model=entropy_model())
        ths.append(float(model.threshold))
    assert ths[0] == ths[1] and ths[0] != 0.0
    sample = model.sample_bytes()               # the build-time sample: bytes from the entropy model, fixed seed
    assert torch.equal(sample, model.sample_bytes()) and sample.shape == (16, 64) and int(sample.max()) < 256
    x = sample + OFFSET                         # tuned on it: the mean patch size there is patch_size
    n = blt.patch_starts(x, mode, model.entropies(x), ths[0], max_patch_len=6)[:, :-1].sum().item()
    assert abs(x.numel() / n - 3.0) < 0.3
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for train_mode in (True, False):            # forward (train / eval) and generation never touch the threshold
        model.train(train_mode)
        model(text_batch(shift=train_mode))[1]
    model.generate(text_batch(B=1)["tokens"][:, :8], 8)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    th = model.tune_threshold(text_batch(B=3)["tokens"])   # retuning is explicit (e.g. on training bytes)
    assert th == float(model.threshold) and th != ths[0]


def test_config_refuses_flags_without_effect():
    with pytest.raises(ValueError, match="threshold 0"):
        small_cfg(threshold=3.0, patch_size=6.0)            # explicit threshold: no tuning, patch_size unused
    with pytest.raises(ValueError, match="--patching entropy or monotonic"):
        small_cfg(patching="space", threshold=3.0)
    with pytest.raises(ValueError, match="--patching entropy or monotonic"):
        small_cfg(patching="static", entropy_ckpt="x.pt")
    with pytest.raises(ValueError, match="no effect with --patching space"):
        small_cfg(patching="space", patch_size=6.0)
    with pytest.raises(ValueError, match="whole stride"):
        small_cfg(patching="static", patch_size=4.5)            # was silently stride 4
    model = BLT(small_cfg(threshold=1.5, patch_size=4.0), entropy_model=entropy_model())
    assert float(model.threshold) == 1.5                    # a fixed threshold is used as given
    with pytest.raises(ValueError, match="has no threshold"):
        make_model("space").tune_threshold(text_batch()["tokens"])


# the official code's hash multipliers (facebookresearch/blt, bytelatent/model/blt.py), one per hash function
OFFICIAL_PRIMES = (1000000007, 5915587277, 1500450271, 3267000013, 5754853343, 4093082899, 9576890767, 3628273133,
                   2860486313, 5463458053, 3367900313)


def test_hash_ids_match_reference_and_depend_only_on_ngram():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 260, (2, 20), generator=g)
    assert blt.HASH_PRIMES == OFFICIAL_PRIMES
    for n in (3, 5, 8):
        for f in (0, 1, 8, 10):                                    # functions 9..11 no longer wrap to 1..3
            ids = blt.hash_ngram_ids(x, n, f, 1000)
            p = OFFICIAL_PRIMES[f]
            for b in range(2):
                for i in range(20):
                    win = [0] * max(0, n - 1 - i) + x[b, max(0, i - n + 1): i + 1].tolist()
                    s = sum(v * p ** j for j, v in enumerate(win)) % 2 ** 64
                    s = s - 2 ** 64 if s >= 2 ** 63 else s
                    assert ids[b, i].item() == s % 1000
    y = torch.randint(0, 260, (1, 20), generator=g)
    y[0, 10:14] = x[0, 10:14]                                      # same 4-gram ending at 13, different elsewhere
    assert blt.hash_ngram_ids(x[:1], 4, 0, 997)[0, 13] == blt.hash_ngram_ids(y, 4, 0, 997)[0, 13]
    small_cfg(hash_functions=11)
    assert "--hash_functions=12 is out of range; valid: int in [1, 11]" in build_error(hash_functions=12)


def test_static_layout_equals_official_in_real_bytes():
    # official: ps - 1 BOE ids prepended, lengths [ps, ps, ..., rest] over BOEs + T bytes + the next byte
    for T_, ps in ((20, 3), (21, 4), (9, 5), (4, 4)):
        L = ps - 1 + T_ + 1
        official = [ps] * (L // ps) + ([L % ps] if L % ps else [])
        official[0] -= ps - 1                                      # drop the BOE padding ...
        official[-1] -= 1                                          # ... and the next byte
        official = [n for n in official if n]
        x = torch.zeros(1, T_, dtype=torch.long) + OFFSET
        assert blt.patch_lengths(blt.patch_starts(x, "static", patch_size=ps))[0] == official


def test_monotonic_byte_2_follows_the_rule():
    # documented departure: the official code always starts a patch at byte 2; here H(x_2) - H(x_1) > theta decides
    x = torch.zeros(2, 6, dtype=torch.long) + OFFSET
    ent = torch.tensor([[3.0, 0.5, 0.6, 0.7, 0.8, 0.9], [0.5, 3.0, 0.6, 0.7, 0.8, 0.9]])   # ent[t] = H(x_{t+1})
    s = blt.patch_starts(x, "monotonic", ent, threshold=1.0)
    assert s[:, :2].all() and s[:, 2].tolist() == [False, True]


def _decoder_and_global_io(model, b, monkeypatch):
    """The input and output of the first decoder cross-attention, the next block's input, the global model's last
    output and what the decoder projection reads."""
    rec, ca = {}, model.dec_cross[0]
    orig = blt.decode_gathered

    def wrap(ca_, h, *a):                                           # the speed path (attention="fast")
        out = orig(ca_, h, *a)
        if ca_ is ca:
            rec["x"], rec["out"] = h, out
        return out
    monkeypatch.setattr(blt, "decode_gathered", wrap)
    hooks = [ca.register_forward_hook(lambda m, a, o: rec.update(x=a[0], out=o)),   # the plain form ("masked")
             model.decoder[0].register_forward_pre_hook(lambda m, a: rec.__setitem__("block_in", a[0])),
             model.global_blocks[-1].register_forward_hook(lambda m, a, o: rec.__setitem__("g", o)),
             model.to_decoder.register_forward_pre_hook(lambda m, a: rec.__setitem__("dec_in", a[0]))]
    model(b)
    for h in hooks:
        h.remove()
    monkeypatch.undo()
    return rec


@pytest.mark.parametrize("attention", ["fast", "masked"])
@pytest.mark.parametrize("r", [1, 2])
def test_cross_residual_switch(r, attention, monkeypatch):
    model = make_model("space", cross_residual=r, attention=attention)
    rec = _decoder_and_global_io(model, text_batch(), monkeypatch)   # decoder: r * h + cross(h)
    assert torch.allclose(rec["block_in"], r * rec["x"] + rec["out"], atol=1e-6)
    x = text_batch()["tokens"] + OFFSET                             # encoder: r * queries + cross(queries)
    pid, _ = blt.patch_index(model.patch(x))
    P = int(pid.max()) + 1
    torch.manual_seed(0)
    h, q = torch.randn(2, T, 16), torch.randn(2, P * 2, 16)
    out = model.encode_patches(h, 0, pid, P, q)
    model.cfg.cross_residual = 1
    assert torch.allclose(out - model.encode_patches(h, 0, pid, P, q), (r - 1) * q, atol=1e-6)
    assert "--cross_residual=3 is out of range" in build_error(cross_residual=3)


@pytest.mark.parametrize("norm", [False, True])
def test_global_norm_switch(norm, monkeypatch):
    model = make_model("space", global_norm=norm)
    rec = _decoder_and_global_io(model, text_batch(), monkeypatch)
    g = rec["g"]
    ref = torch.nn.functional.rms_norm(g, (g.shape[-1],), eps=1e-5) if norm else g   # official: no norm (False)
    assert torch.allclose(rec["dec_in"], ref, atol=1e-5)


@pytest.mark.parametrize("max_len,attention", [(6, "fast"), (0, "fast"), (6, "masked")])   # gathered, dense, dense
def test_encoder_cross_attention_reads_only_own_bytes(max_len, attention):
    model = make_model("space", max_patch_len=max_len, attention=attention)
    x = text_batch(B=2)["tokens"] + OFFSET
    pid, _ = blt.patch_index(model.patch(x))
    P = int(pid.max()) + 1
    torch.manual_seed(0)
    h = torch.randn(2, T, 16)
    enc = lambda h: model.encode_patches(h, 0, pid, P).view(2, P, 2, 16)
    ref = enc(h)
    for p in (1, int(pid[0, -1]) // 2, int(pid[0, -1])):
        h2 = h.clone()
        h2[pid != p] += torch.randn_like(h2[pid != p])             # change every byte outside patch p
        assert torch.allclose(enc(h2)[0, p], ref[0, p], atol=1e-5)
        h3 = h.clone()
        h3[pid == p] += 1.0                                          # its own bytes do matter
        assert not torch.allclose(enc(h3)[0, p], ref[0, p])
    if max_len and attention == "fast":   # the gathered form equals the dense masked cross-attention
        model.cfg.max_patch_len = 0
        assert torch.allclose(enc(h)[:, :int(pid[:, -1].min()) + 1], ref[:, :int(pid[:, -1].min()) + 1], atol=1e-5)
        model.cfg.max_patch_len, model.cfg.attention = max_len, "masked"
        assert torch.allclose(enc(h)[:, :int(pid[:, -1].min()) + 1], ref[:, :int(pid[:, -1].min()) + 1], atol=1e-5)


def test_window_attention_equals_masked_reference():
    torch.manual_seed(0)
    for T_, W in ((50, 8), (33, 5)):
        q, k, v = (torch.randn(2, 3, T_, 4) for _ in range(3))
        pos = torch.arange(T_)
        mask = (pos[None] <= pos[:, None]) & (pos[:, None] - pos[None] < W)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        assert torch.allclose(blt.window_attention(q, k, v, W), ref, atol=1e-5)


def test_decoder_reads_only_patches_ended_before():
    model = make_model("space")
    x = text_batch(B=1)["tokens"] + OFFSET
    starts = model.patch(x)
    pid, dec = blt.patch_index(starts)
    s = starts[0].nonzero().flatten().tolist()
    for t in range(T):            # reference: the last patch whose end (next start - 1) is <= t
        assert dec[0, t] == max(j for j in range(len(s) - 1) if s[j + 1] - 1 <= t)
        assert dec[0, t] <= pid[0, t]
    P = int(pid.max()) + 1
    torch.manual_seed(0)
    h, slots = torch.randn(1, T, 16), torch.randn(1, P * 2, 16)
    ca = model.dec_cross[0]
    read = lambda sl: blt.decode_gathered(ca, h, sl, dec, 2)
    ref = read(slots)
    idx = dec[..., None] * 2 + torch.arange(2)
    assert torch.equal(blt.gathered_cross_attention(ca, h[:, :, None], slots, idx)[:, :, 0], ref)
    # the gathered form equals dense cross-attention masked to "slot belongs to patch dec[t]"
    mask = torch.arange(P).repeat_interleave(2)[None, None, :] == dec[:, :, None]
    assert torch.allclose(ca(h, slots, mask), ref, atol=1e-5)
    for t in (3, T // 2, T - 1):
        slots2 = slots.clone().view(1, P, 2, 16)
        slots2[0, dec[0, t] + 1:] += 5.0                              # patches not yet ended at t
        slots2[0, :dec[0, t]] += 5.0                                  # (and older ones: only the latest is read)
        assert torch.allclose(read(slots2.view(1, P * 2, 16))[0, t], ref[0, t], atol=1e-5)


@pytest.mark.parametrize("mode", ["entropy", "space"])
def test_rows_independent(mode):
    model = make_model(mode)
    b = text_batch(B=3)
    b["tokens"][2] = torch.tensor(list(b"x" * T))                 # very different patch count in row 2
    out, _, _ = model(b)
    for r in range(3):
        alone, _, _ = model(dict(tokens=b["tokens"][r:r + 1]))
        assert torch.allclose(out[r], alone[0], atol=1e-5)


@pytest.mark.parametrize("mode", ["entropy", "space"])
def test_greedy_generation_equals_teacher_forced_argmax(mode):
    model = make_model(mode)
    prompt = text_batch(B=2)["tokens"][:, :10]
    out = model.generate(prompt, 20)
    assert out.shape == (2, 30) and torch.equal(out[:, :10], prompt)
    logits, _, _ = model(dict(tokens=out[:, :-1]))
    assert torch.equal(logits.argmax(-1)[:, 9:], out[:, 10:])


def test_entropy_checkpoint_roundtrip_and_errors(tmp_path):
    ent = entropy_model()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": ent.state_dict(), "config": {"model": "blt-entropy", "model_cfg": vars(ent.cfg)}}, path)
    model = BLT(small_cfg(entropy_ckpt=str(path)))
    x = text_batch()["tokens"] + OFFSET
    assert torch.allclose(model.entropies(x), ent.entropies(x), atol=1e-6)
    assert not any(p.requires_grad for p in model.entropy_model.parameters())
    with pytest.raises(ValueError, match="entropy"):
        BLT(small_cfg())                                            # no checkpoint given
    with pytest.raises(ValueError, match="no file"):
        BLT(small_cfg(entropy_ckpt=str(tmp_path / "missing.pt")))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        BLT(small_cfg(entropy_ckpt=str(tmp_path / "junk.pt")))
    torch.save({"model": {}, "config": {"model": "dense", "model_cfg": {}}}, tmp_path / "dense.pt")
    with pytest.raises(ValueError, match="not 'blt-entropy'"):
        BLT(small_cfg(entropy_ckpt=str(tmp_path / "dense.pt")))
    BLT(small_cfg(patching="space"))                                # no entropy model needed


class _Marker:
    """Unpickling this object would create a file: proof that code in a checkpoint ran."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_entropy_checkpoint_with_pickled_object_is_refused_and_nothing_runs(tmp_path):
    ent, marker = entropy_model(), tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    cfg = {"model": "blt-entropy", "model_cfg": vars(ent.cfg), "extra": _Marker(str(marker))}
    torch.save({"model": ent.state_dict(), "config": cfg}, path)
    with pytest.raises(ValueError, match="pickled Python objects.*weights_only=True.*blt-entropy") as e:
        BLT(small_cfg(entropy_ckpt=str(path)))
    assert "\n" not in str(e.value) and not marker.exists()


@pytest.mark.parametrize("message", ["Weights only load failed. Unsupported global: GLOBAL x.Y was not an allowed global",
                                     "Weights only load failed. WeightsUnpickler error: unsupported GLOBAL x.Y"])
def test_entropy_checkpoint_pickled_object_message_in_any_case(tmp_path, monkeypatch, message):
    path = tmp_path / "evil.pt"
    path.write_bytes(b"x")

    def refuse(*a, **kw):
        raise pickle.UnpicklingError(message)
    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(ValueError, match="holds pickled Python objects, which are never loaded"):
        blt.load_entropy_model(str(path), 256)


def _grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode,kw", [("entropy", {}), ("space", dict(enc_cross_all_layers=True, n_layer_enc=2,
                                                                      dec_cross_all_layers=False, pool="mean"))])
def test_speed_paths_equal_masked_forms_forward_and_gradients(mode, kw):
    # attention="fast": window attention (T > 2 * local_window) and gathered cross-attention (max_patch_len > 0)
    b = text_batch(B=2)
    out = {}
    for attention in ("fast", "masked"):
        model = make_model(mode, attention=attention, **kw)
        assert 2 * model.cfg.local_window < T and model.cfg.max_patch_len > 0
        logits, loss, _ = model(b)
        loss.backward()
        out[attention] = logits, _grads(model)
    (lf, gf), (lm, gm) = out["fast"], out["masked"]
    assert torch.allclose(lf, lm, atol=1e-5)
    assert gf.keys() == gm.keys() and len(gf) > 20
    for k in gf:
        assert torch.allclose(gf[k], gm[k], atol=1e-5, rtol=1e-4), k


def test_entropy_model_window_attention_equals_masked_form_forward_and_gradients():
    b = text_batch(B=2)
    out = {}
    for attention in ("fast", "masked"):
        torch.manual_seed(0)
        m = EntropyModel(EntropyConfig(seq_len=64, d_model=16, n_head=2, window=16, attention=attention))
        assert 2 * m.cfg.window < T
        logits, loss, _ = m(b)
        loss.backward()
        out[attention] = logits, _grads(m)
    (lf, gf), (lm, gm) = out["fast"], out["masked"]
    assert torch.allclose(lf, lm, atol=1e-5)
    for k in gf:
        assert torch.allclose(gf[k], gm[k], atol=1e-5, rtol=1e-4), k


def test_frozen_entropy_model_gets_no_gradient_and_loss_falls():
    torch.manual_seed(0)
    model = BLT(small_cfg(), entropy_model=entropy_model())
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    b = text_batch(B=2)
    losses = []
    for _ in range(30):
        _, loss, parts = model(b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.grad is None for p in model.entropy_model.parameters())
    assert losses[0] > math.log(200) and losses[-1] < 0.6 * losses[0]
    assert set(parts) >= {"loss_text", "patch_size"}


def test_entropy_model_and_bad_input():
    em = entropy_model()
    b = text_batch()
    logits, loss, parts = em(b)
    assert logits.shape == (2, T, 256) and loss.item() > 0 and "loss_text" in parts
    model = make_model("space")
    with pytest.raises(ValueError, match="int64"):
        model(dict(tokens=b["tokens"].float()))
    with pytest.raises(ValueError, match="seq_len"):
        model(dict(tokens=torch.zeros(1, 65, dtype=torch.long)))
    with pytest.raises(ValueError, match="byte ids"):
        model(dict(tokens=torch.full((1, 4), 300)))
    assert "--patching=bpe is out of range; valid: one of entropy|monotonic|space|static" in build_error(patching="bpe")
    with pytest.raises(ValueError, match="patching"):
        blt.patch_starts(b["tokens"] + OFFSET, "bpe")
    with pytest.raises(ValueError, match="seq_len"):
        model.generate(b["tokens"], 40)


# --- --entropy_ckpt: every bad file is one line, exit 2 (never a traceback, never a hang, never a huge build) -------
def _bad_entropy_file(kind, path):
    ent = entropy_model()
    good = {"model": ent.state_dict(), "config": {"model": "blt-entropy", "model_cfg": dict(vars(ent.cfg))}}
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        os.mkdir(path)
    elif kind == "empty":
        open(path, "wb").close()
    elif kind == "non-tensor weight":
        torch.save({**good, "model": {**good["model"], "emb.weight": "x"}}, path)
    elif kind == "config of the wrong type":
        good["config"]["model_cfg"]["d_model"] = "x"
        torch.save(good, path)
    elif kind == "a config larger than its weights":
        good["config"]["model_cfg"]["n_layer"] = 10 ** 9
        torch.save(good, path)
    elif kind == "weights of another shape":
        torch.save({**good, "model": {**good["model"], "head.weight": torch.zeros(3, 3)}}, path)
    elif kind == "model is a list":
        torch.save({**good, "model": [1]}, path)


@pytest.mark.parametrize("kind", ["fifo", "directory", "empty", "non-tensor weight", "config of the wrong type",
                                  "a config larger than its weights", "weights of another shape", "model is a list"])
def test_entropy_ckpt_bad_file_is_one_line_exit_2(kind, tmp_path, capsys):
    path = str(tmp_path / "ent.pt")
    _bad_entropy_file(kind, path)
    with pytest.raises(ValueError) as e:
        blt.load_entropy_model(path, 256)
    assert len(str(e.value).splitlines()) == 1 and "entropy" in str(e.value)
    argv = ["--model", "blt", "--d_local", "32", "--d_global", "32", "--n_layer_global", "1", "--n_layer_dec", "1",
            "--seq_len", "64", "--entropy_ckpt", path, "--out", str(tmp_path / "out")]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "entropy" in err, err
