"""Tests for mom.py: Mamba baseline and Mixture-of-Mamba. Tiny configs, CPU, fp64 where equality is asserted."""
import itertools
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mom  # noqa: E402

torch.set_num_threads(1)
SPLITS = ("split_in_proj", "split_x_proj", "split_dt_proj", "split_out_proj")
ALL_OFF = {k: False for k in SPLITS}
ROUTINGS = ("grouped", "masked")   # the speed path (default) and the plain form


def tiny(n_modalities=2, **kw):
    offsets = {1: (0,), 2: (0, 20), 3: (0, 20, 40), 4: (0, 15, 30, 45)}[n_modalities]
    base = dict(vocab_size=60, n_modalities=n_modalities, modality_offsets=offsets, seq_len=32, d_model=16,
                n_layer=2, d_state=4, d_conv=4, expand=2)
    base.update(kw)
    torch.manual_seed(0)
    return mom.MixtureOfMamba(mom.Config(**base)).double()


def make_batch(model, B=2, T=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.cfg.vocab_size, (B, T), generator=g)
    modality = model.modality_of(tokens)
    targets = torch.roll(tokens, -1, 1)
    targets[:, -1] = -1
    return dict(tokens=tokens, modality=modality, targets=targets, target_modality=torch.roll(modality, -1, 1),
                loss_mask=targets != -1)


def ref_selective_scan(u, delta, A, B, C, D, z):
    """Independent oracle: the plain recurrence h_t = exp(d_t A) h_{t-1} + d_t B_t u_t, y_t = C_t h_t + D u_t."""
    b, d, L = u.shape
    h = torch.zeros(b, d, A.shape[1], dtype=u.dtype)
    ys = []
    for t in range(L):
        dt = F.softplus(delta[:, :, t])
        h = torch.exp(dt[..., None] * A) * h + (dt * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1) + D * u[:, :, t])
    return torch.stack(ys, -1) * F.silu(z)


def test_parallel_scan_equals_sequential_recurrence():
    torch.manual_seed(0)
    b, d, n, L = 2, 6, 4, 9
    u, delta, z = (torch.randn(b, d, L, dtype=torch.float64) for _ in range(3))
    A = -torch.rand(d, n, dtype=torch.float64) - 0.5
    B, C = (torch.randn(b, n, L, dtype=torch.float64) for _ in range(2))
    D = torch.randn(d, dtype=torch.float64)
    y = mom.kernels.selective_scan(u, delta, A, B, C, D=D, z=z, delta_softplus=True)
    torch.testing.assert_close(y, ref_selective_scan(u, delta, A, B, C, D, z))


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("split", [False, True])
def test_model_forward_equals_step_by_step_recurrence(split, routing):
    model = tiny(routing=routing, **({} if split else ALL_OFF))
    batch = make_batch(model)
    logits, _, _ = model(batch)
    cache = model.backbone.empty_cache(2, "cpu", torch.float64)
    steps = []
    for t in range(batch["tokens"].shape[1]):
        lt, cache = model.step(batch["tokens"][:, t], cache)
        steps.append(lt)
    torch.testing.assert_close(torch.stack(steps, 1), logits)


@pytest.mark.parametrize("split", [False, True])
def test_generate_with_cache_equals_parallel_forward(split):
    model = tiny(**({} if split else ALL_OFF))
    prompt = make_batch(model, T=5)["tokens"]
    out = model.generate(prompt, 7)
    assert out.shape == (2, 12) and torch.equal(out[:, :5], prompt)
    # the same greedy decoding with a full parallel forward per token (no cache)
    idx = prompt
    for _ in range(7):
        logits, _, _ = model(dict(tokens=idx, modality=model.modality_of(idx)))
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, idx)
    # and the cached logits equal the parallel logits at every generated position
    logits_par, _, _ = model(dict(tokens=out[:, :-1], modality=model.modality_of(out[:, :-1])))
    lt, cache = model.prefill(prompt)
    cached = [lt]
    for t in range(5, 11):
        lt, cache = model.step(out[:, t], cache)
        cached.append(lt)
    torch.testing.assert_close(torch.stack(cached, 1), logits_par[:, 4:])


def test_prefill_state_continues_the_sequence():
    # prompts shorter than d_conv exercise the left-padded conv state
    model = tiny()
    tokens = make_batch(model, T=10)["tokens"]
    for cut in (1, 3, 6):
        lt, cache = model.prefill(tokens[:, :cut])
        for t in range(cut, 10):
            lt, cache = model.step(tokens[:, t], cache)
        full, _, _ = model(dict(tokens=tokens, modality=model.modality_of(tokens)))
        torch.testing.assert_close(lt, full[:, -1])


def expert_params(model, m):
    out = {}
    for i, layer in enumerate(model.backbone.layers):
        for proj in ("in_proj", "x_proj", "dt_proj", "out_proj"):
            out[f"{i}.{proj}.weights.{m}"] = getattr(layer.mixer, proj).weights[m]
        out[f"{i}.dt_proj.biases.{m}"] = layer.mixer.dt_proj.biases[m]
    return out


def shared_params(model):
    return {f"{i}.{k}": p for i, layer in enumerate(model.backbone.layers)
            for k, p in (("conv1d", layer.mixer.conv1d.weight), ("A_log", layer.mixer.A_log), ("D", layer.mixer.D))}


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("n_mod", [2, 3])
def test_isolation_and_shared_params_get_grads_from_every_modality(n_mod, routing):
    model = tiny(n_modalities=n_mod, routing=routing)
    for m in range(n_mod):
        model.zero_grad(set_to_none=True)
        lo, hi = model.cfg.modality_offsets[m], (model.cfg.modality_offsets + (60,))[m + 1]
        tokens = torch.randint(lo, hi, (2, 10), generator=torch.Generator().manual_seed(m))
        batch = dict(tokens=tokens, modality=model.modality_of(tokens), targets=torch.roll(tokens, -1, 1),
                     target_modality=model.modality_of(tokens))
        assert (batch["modality"] == m).all()
        model(batch)[1].backward()
        for other in range(n_mod):
            for k, p in expert_params(model, other).items():
                if other == m:
                    assert p.grad is not None and p.grad.abs().sum() > 0, f"modality {m}: {k} got no gradient"
                else:
                    assert p.grad is None or p.grad.abs().sum() == 0, f"modality {m} leaked into expert {other} {k}"
        for k, p in shared_params(model).items():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"shared {k} got no gradient from modality {m}"


@pytest.mark.parametrize("routing", ROUTINGS)
def test_out_proj_per_position_isolation(routing):
    # one layer: the output at position t passes through out_proj of t's modality only
    model = tiny(n_layer=1, routing=routing)
    batch = make_batch(model, T=12)
    mixer = model.backbone.layers[0].mixer
    for t in (3, 7, 11):
        model.zero_grad(set_to_none=True)
        h = model.forward_hidden(model.tok_emb(batch["tokens"]), batch["modality"])
        h[0, t].sum().backward()
        m = int(batch["modality"][0, t])
        for other, w in enumerate(mixer.out_proj.weights):
            touched = w.grad is not None and w.grad.abs().sum() > 0
            assert touched == (other == m), f"position {t} (modality {m}) -> out_proj[{other}] touched={touched}"


def copy_from_mamba(mamba, n_modalities, routing="grouped"):
    """A MoM (all projections split) whose every modality copy holds the Mamba weights."""
    mixture = tiny(n_modalities=n_modalities, routing=routing)
    sd = {}
    for k, v in mamba.state_dict().items():
        if ".weights.0" in k or ".biases.0" in k:
            for m in range(n_modalities):
                sd[k.replace(".weights.0", f".weights.{m}").replace(".biases.0", f".biases.{m}")] = v
        else:
            sd[k] = v
    mixture.load_state_dict(sd)
    return mixture


@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("n_mod", [1, 2])
def test_mom_with_mamba_weights_equals_mamba(n_mod, routing):
    mamba = tiny(n_modalities=n_mod, **ALL_OFF)
    mixture = copy_from_mamba(mamba, n_mod, routing)
    assert all(getattr(mixture.cfg, k) for k in SPLITS)
    batch = make_batch(mamba, T=12, seed=3)
    if n_mod == 2:
        assert batch["modality"].min() == 0 and batch["modality"].max() == 1   # a genuinely mixed batch
    la, lossa, _ = mamba(batch)
    lb, lossb, _ = mixture(batch)
    torch.testing.assert_close(lb, la)
    torch.testing.assert_close(lossb, lossa)
    # and different modality weights really change the result
    with torch.no_grad():
        mixture.backbone.layers[0].mixer.in_proj.weights[-1].mul_(1.5)
    assert not torch.allclose(mixture(batch)[0], la)


@pytest.mark.parametrize("split", [False, True])
def test_causality(split):
    model = tiny(**({} if split else ALL_OFF))
    batch = make_batch(model, T=14)
    logits, _, _ = model(batch)
    t = 6
    tokens = batch["tokens"].clone()
    tokens[:, t] = (tokens[:, t] + 25) % 60          # changes the token and (mostly) its modality
    logits2, _, _ = model(dict(tokens=tokens, modality=model.modality_of(tokens)))
    torch.testing.assert_close(logits2[:, :t], logits[:, :t])
    assert (logits2[:, t:] - logits[:, t:]).abs().amax(-1).min() > 0


@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=4)))
def test_dt_bias_applied_exactly_once(flags, monkeypatch):
    model = tiny(**dict(zip(SPLITS, flags)))
    batch = make_batch(model, T=10)
    mixer = model.backbone.layers[0].mixer
    seen = {}
    mixer.dt_proj.register_forward_hook(lambda mod, inp, out: seen.update(dt_low=inp[0]))
    real = mom.kernels.selective_scan

    def spy(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, **kw):
        seen.setdefault("delta", delta)
        seen.setdefault("delta_bias", delta_bias)
        seen.setdefault("softplus", delta_softplus)
        return real(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus, **kw)

    monkeypatch.setattr(mom.kernels, "selective_scan", spy)
    model(batch)
    # what the scan sees before softplus, per token (B*T, d_inner)
    eff = seen["delta"].transpose(1, 2).reshape(-1, model.cfg.d_inner)
    if seen["delta_bias"] is not None:
        eff = eff + seen["delta_bias"]
    mods = batch["modality"].reshape(-1)
    w = lambda m: mixer.dt_proj.weights[m if flags[2] else 0]
    b = lambda m: mixer.dt_proj.biases[m if flags[2] else 0]
    expected = torch.stack([seen["dt_low"][i] @ w(int(m)) + b(int(m)) for i, m in enumerate(mods)])
    assert seen["softplus"]
    torch.testing.assert_close(eff, expected)
    assert b(0).abs().min() > 0.5           # the inverse-softplus init is far from zero: a dropped bias shows


def test_bad_inputs_raise_value_error():
    model = tiny()
    batch = make_batch(model)
    bad = dict(batch, modality=batch["modality"] + 2)
    with pytest.raises(ValueError, match="modality ids"):
        model(bad)
    with pytest.raises(ValueError, match="int64"):
        model(dict(batch, tokens=batch["tokens"].float()))
    with pytest.raises(ValueError, match="seq_len"):
        long = torch.zeros(1, 40, dtype=torch.long)
        model(dict(tokens=long, modality=long))
    with pytest.raises(ValueError, match="modality"):
        model.forward_hidden(torch.zeros(1, 4, 16, dtype=torch.float64), torch.full((1, 4), 5))
    with pytest.raises(ValueError, match="modality_offsets"):
        mom.Config(n_modalities=3, modality_offsets=(0, 10))


def test_loss_parts_and_overfit_one_batch():
    model = tiny().float()
    batch = make_batch(model, B=4, T=16)
    _, loss, parts = model(batch)
    assert set(parts) == {"loss_text", "loss_image"}
    n = {m: ((batch["target_modality"] == m) & batch["loss_mask"]).sum() for m in (0, 1)}
    torch.testing.assert_close(loss.detach(), (parts["loss_text"] * n[0] + parts["loss_image"] * n[1]) / (n[0] + n[1]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = loss.item()
    for _ in range(60):
        opt.zero_grad()
        loss = model(batch)[1]
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first


def test_registry_and_ablation_switches():
    names = {"mamba": (), "mom": SPLITS, "mom-in": ("split_in_proj",), "mom-out": ("split_out_proj",),
             "mom-x": ("split_x_proj",), "mom-dt": ("split_dt_proj",)}
    counts = {}
    for name, on in names.items():
        C, M, setting, over = mom.MODELS[name]
        assert setting == "chameleon"
        cfg = C(**over)
        assert {k for k in SPLITS if getattr(cfg, k)} == set(on), name
        counts[name] = sum(p.numel() for p in M(cfg).parameters())
    assert counts["mamba"] < counts["mom-x"] < counts["mom-out"] < counts["mom-in"] < counts["mom"]


@pytest.mark.parametrize("split", [False, True])
def test_fp64_recurrent_step_equals_parallel_forward_to_fp64_precision(split):
    """In float64 the O(1) recurrent step (from an empty cache or after a prefill) runs in float64 like the parallel
    scan: the two agree to ~1e-12, not to float32's ~1e-8."""
    model = tiny(**({} if split else ALL_OFF))
    batch = make_batch(model, T=16)
    logits = model(batch)[0]
    cache, steps = model.backbone.empty_cache(2, "cpu", torch.float64), []
    for t in range(16):
        lt, cache = model.step(batch["tokens"][:, t], cache)
        steps.append(lt)
    assert all(c.dtype == torch.float64 for layer in cache for c in layer)
    torch.testing.assert_close(torch.stack(steps, 1), logits, atol=1e-12, rtol=1e-12)
    lt, cache = model.prefill(batch["tokens"][:, :6])
    for t in range(6, 16):
        lt, cache = model.step(batch["tokens"][:, t], cache)
        torch.testing.assert_close(lt, logits[:, t], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name", ["mamba", "mom"])
def test_a_fourth_modality_trains_and_reports_its_loss(name):
    """Modality count and names come from the Config: 4 modalities train, generate, and report one loss each."""
    names = ("text", "image", "speech", "video")
    model = tiny(4, modality_names=names, **mom.MODELS[name][3])
    b = make_batch(model, B=3, T=20)
    assert set(b["modality"].unique().tolist()) == {0, 1, 2, 3}
    _, loss, parts = model(b)
    loss.backward()
    assert set(parts) == {f"loss_{n}" for n in names}
    if name == "mom":  # the fourth modality's own projections are trained
        assert all(p.grad.abs().sum() > 0 for p in expert_params(model, 3).values())
    assert model.generate(b["tokens"][:, :4], 4).shape == (3, 8)
    unnamed = tiny(4, **mom.MODELS[name][3])  # names not given: numbered
    assert {"loss_modality2", "loss_modality3"} <= set(unnamed(b)[2])


# --- the speed path (routing="grouped": tokens sorted by modality, one grouped matmul) equals the plain form -------

def run_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    logits, loss, parts = model(batch)
    loss.backward()
    grads = {k: p.grad for k, p in model.named_parameters()}
    assert all(g is not None for g in grads.values()), [k for k, g in grads.items() if g is None]
    return logits, loss, parts, grads


CASES = [(2, (True,) * 4, False), (3, (True,) * 4, True)] + [
    (2, tuple(i == j for j in range(4)), i % 2 == 0) for i in range(4)]   # each projection split alone, bias or not


@pytest.mark.parametrize("n_mod,flags,bias", CASES, ids=lambda v: str(v))
def test_grouped_routing_equals_masked_forward_and_grads(n_mod, flags, bias):
    models = {r: tiny(n_mod, routing=r, bias=bias, **dict(zip(SPLITS, flags))) for r in ROUTINGS}
    for k, v in models["grouped"].state_dict().items():                 # the same weights (same seed)
        assert torch.equal(v, models["masked"].state_dict()[k]), k
    batch = make_batch(models["grouped"], B=3, T=14, seed=5)
    assert batch["modality"].unique().numel() == n_mod                  # every modality present
    got, ref = (run_and_grads(models[r], batch) for r in ROUTINGS)
    torch.testing.assert_close(got[0], ref[0])                           # logits
    torch.testing.assert_close(got[1], ref[1])                           # loss
    assert got[2].keys() == ref[2].keys()
    assert got[3].keys() == ref[3].keys()
    for k in ref[3]:                                                     # every parameter's gradient
        torch.testing.assert_close(got[3][k], ref[3][k], msg=k)


def test_grouped_routing_equals_masked_with_an_absent_modality_and_in_decoding():
    models = {r: tiny(3, routing=r, bias=True) for r in ROUTINGS}
    g = torch.Generator().manual_seed(2)
    tokens = torch.where(torch.rand(2, 12, generator=g) < 0.5, torch.randint(0, 20, (2, 12), generator=g),
                         torch.randint(40, 60, (2, 12), generator=g))    # modalities 0 and 2 only
    batch = dict(tokens=tokens, modality=models["masked"].modality_of(tokens), targets=torch.roll(tokens, -1, 1))
    assert set(batch["modality"].unique().tolist()) == {0, 2}
    got, ref = (run_and_grads(models[r], batch) for r in ROUTINGS)
    torch.testing.assert_close(got[0], ref[0])
    for k in ref[3]:
        torch.testing.assert_close(got[3][k], ref[3][k], msg=k)
    assert ref[3]["backbone.layers.0.mixer.in_proj.weights.1"].abs().sum() == 0     # the absent copy is untouched
    outs = [models[r].generate(tokens[:, :4], 6) for r in ROUTINGS]                 # prefill + recurrent steps
    assert torch.equal(outs[0], outs[1])


def test_grouped_and_masked_routing_count_the_same_flops():
    # both forms run each token through its own copy only: the matmul FLOPs (forward + backward) are equal
    from torch.utils.flop_counter import FlopCounterMode
    flops = {}
    for r in ROUTINGS:
        model = tiny(3, routing=r)
        batch = make_batch(model, B=2, T=12)
        with FlopCounterMode(display=False) as counter:
            model(batch)[1].backward()
        flops[r] = counter.get_total_flops()
    assert flops["grouped"] == flops["masked"] > 0
