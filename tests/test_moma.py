"""Tests for moma.py: modality isolation, exact expert-choice capacity, 1t1i == FFN-only MoT, (non-)causality of the
two routings, MoD capacity, upcycling, KV-cached generation, FLOPs, learning, bad input, and the speed paths against
the plain forms (grouped matmul vs the per-expert loop, KV cache vs the full forward). Tiny models, CPU, seconds."""
import math
import os

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import mot
import moma

torch.set_num_threads(1)
OFFS = (0, 64)
V = 128


def cfg_(**kw):
    base = dict(vocab_size=V, n_modalities=2, modality_offsets=OFFS, seq_len=64, d_model=32, n_head=2, n_layer=2)
    base.update(kw)
    return moma.Config(**base)


def batch_(B=2, T=32, seed=0, text_only=False):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 64 if text_only else V, (B, T), generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    b = dict(tokens=tokens, targets=targets)
    b["modality"] = torch.bucketize(tokens, torch.tensor(OFFS[1:]), right=True)
    b["target_modality"] = torch.bucketize(targets, torch.tensor(OFFS[1:]), right=True)
    b["loss_mask"] = targets != -1
    return b


@pytest.mark.parametrize("mode,gumbel", [("ec", 0.0), ("ec", 1.0), ("aux", 0.0)])
def test_experts_of_group_m_only_get_modality_m_tokens(mode, gumbel):
    torch.manual_seed(0)
    cfg = cfg_(experts=(3, 2), capacity_factor=1.5, gumbel=gumbel)
    ffn = moma.MoMaFFN(cfg).train()
    x, mf = torch.randn(70, cfg.d_model), (torch.rand(70) < 0.4).long()
    tok, exp, g, _ = ffn.route(x, mf, mode)
    group_of_expert = torch.tensor([0, 0, 0, 1, 1])
    assert torch.equal(mf[tok], group_of_expert[exp])          # every pair: token modality == expert's group
    assert torch.all(exp[1:] >= exp[:-1])                      # pairs sorted by expert (one grouped matmul)
    if mode == "ec":                                           # each expert takes exactly k_e = ceil(c T_m / E_m)
        n = [int((mf == m).sum()) for m in range(2)]
        k = [math.ceil(1.5 * n[0] / 3)] * 3 + [math.ceil(1.5 * n[1] / 2)] * 2
        assert torch.bincount(exp, minlength=5).tolist() == k
        for e in range(5):                                     # ... k_e DISTINCT tokens: its top-k by gate score
            assert len(set(tok[exp == e].tolist())) == k[e]


def test_text_only_batch_gives_zero_gradient_to_image_experts():
    torch.manual_seed(0)
    model = moma.MoMa(cfg_())
    _, loss, _ = model(batch_(text_only=True))
    loss.backward()
    for blk in model.blocks:
        assert blk.ffn.w_up.grad[4:].abs().sum() == 0 and blk.ffn.w_down.grad[4:].abs().sum() == 0
        assert blk.ffn.w_up.grad[:4].abs().sum() > 0
        assert blk.ffn.router[1].grad is None or blk.ffn.router[1].grad.abs().sum() == 0


def test_every_expert_processes_exactly_k_e_tokens_in_training(monkeypatch):
    torch.manual_seed(0)
    model = moma.MoMa(cfg_(capacity_factor=1.0))
    b = batch_(B=3, T=40)
    seen = []
    real = moma.kernels.grouped_matmul
    monkeypatch.setattr(moma.kernels, "grouped_matmul", lambda x, w, s, **k: (seen.append(s.tolist()), real(x, w, s, **k))[1])
    model.train()
    model(b)
    n = [int((b["modality"] == m).sum()) for m in range(2)]
    want = [math.ceil(n[0] / 4)] * 4 + [math.ceil(n[1] / 4)] * 4
    assert len(seen) == 2 * cfg_().n_layer and all(s == want for s in seen)


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_1t1i_full_capacity_equals_ffn_only_mot(norm):
    """MoMa with one expert per modality takes every token (k_e = T_m): it is an FFN-only MoT. The sigmoid gate is
    the one difference: with a zero router it is exactly 1/2, so MoMa's w_down = 2 * MoT's w2."""
    torch.manual_seed(0)
    kw = dict(vocab_size=V, n_modalities=2, modality_offsets=OFFS, seq_len=64, d_model=32, n_head=2, n_layer=2,
              norm_placement=norm)
    ref = mot.Transformer(mot.Config(untie_ffn=True, **kw))
    model = moma.MoMa(moma.Config(experts=(1,), capacity_factor=1.0, **kw))
    with torch.no_grad():
        model.tok_emb.weight.copy_(ref.tok_emb.weight)
        model.lm_head.weight.copy_(ref.lm_head.weight)
        model.norm_f.weight.copy_(ref.norm_f.weight[0])
        for a, r in zip(model.blocks, ref.blocks):
            a.attn.qkv.copy_(r.attn.qkv.weight[0])
            a.attn.proj.copy_(r.attn.proj.weight[0])
            a.norm_attn.weight.copy_(r.norm_attn.weight[0])
            a.norm_ffn.weight.copy_(r.norm_ffn.weight[0])
            for m in range(2):
                a.ffn.w_up[m].copy_(r.ffn.w13.weight[m])
                a.ffn.w_down[m].copy_(2 * r.ffn.w2.weight[m])
                a.ffn.router[m].zero_()
    b = batch_()
    model.train()
    l1, loss1, _ = model(b)
    l2, loss2, _ = ref(b)
    torch.testing.assert_close(l1, l2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss1, loss2)


def _future_changes_past(model, routing, t=20):
    b = batch_(B=2, T=32, seed=1)
    b2 = {k: v.clone() for k, v in b.items()}
    b2["tokens"][:, t:] = torch.randint(0, 64, b2["tokens"][:, t:].shape)  # new text tokens in the future
    b2["modality"][:, t:] = 0
    with torch.no_grad():
        l1 = model(b, routing=routing)[0][:, :t]
        l2 = model(b2, routing=routing)[0][:, :t]
    return (l1 - l2).abs().max().item()


@pytest.mark.parametrize("mod", [False, True])
def test_expert_choice_is_not_causal_but_aux_routing_is(mod):
    torch.manual_seed(0)
    model = moma.MoMa(cfg_(mod=mod, mod_capacity=0.5))
    model.eval()
    # EC: the top-k_e of an expert looks at the whole batch, so future tokens change earlier tokens' routing/output
    assert _future_changes_past(model, "ec") > 1e-4
    # aux routers: every token decides from its own hidden state alone -> the past is untouched by the future
    # (up to float rounding: the future changes which rows share a matmul, and so BLAS's blocking)
    assert _future_changes_past(model, "aux") < 1e-6


def test_mod_passes_exactly_the_capacity_fraction():
    torch.manual_seed(0)
    cfg = cfg_(mod=True, mod_capacity=0.25, mod_every=1)
    model = moma.MoMa(cfg)
    T, passed, top = 32, [], []
    k = round(0.25 * T)
    for blk in model.blocks:
        def hook(mod, inp, out):
            changed = (out[0] != inp[0]).any(-1)                          # (B, T): the tokens that went through
            passed.append(changed.sum(1).tolist())
            score = inp[0] @ mod.mod_router                                # Sec. 2.3: the router's score per token
            want = torch.zeros_like(changed).scatter_(1, score.topk(k, dim=1).indices, True)
            top.append(torch.equal(changed, want))
        blk.register_forward_hook(hook)
    model.train()
    model(batch_(B=3, T=T))
    assert passed == [[k] * 3] * cfg.n_layer  # per row: exactly beta*T tokens changed, the rest skip
    assert all(top)                           # and they are the top-k by the router's score


@pytest.mark.parametrize("mod", [False, True])
def test_cached_generation_equals_full_aux_forward(mod):
    """generate's KV cache (a speed path, moma.kv_cache) gives the tokens the plain full forward would pick."""
    torch.manual_seed(0)
    model = moma.MoMa(cfg_(mod=mod, mod_capacity=0.5, aux_threshold=0.5))
    with torch.no_grad():  # biases so that aux routers pick some and skip some tokens
        for blk in model.blocks:
            for a in blk.ffn.aux:
                a.fc2.bias.normal_(0, 1.0)
            if blk.is_mod:
                blk.mod_aux.fc2.bias.fill_(0.0)
                blk.mod_aux.fc2.weight.normal_(0, 1.0)
    prompt = batch_(B=2, T=6)["tokens"]
    out = model.generate(prompt, 10)
    full = dict(tokens=out[:, :-1], targets=None)
    logits = model(full, routing="aux")[0]
    torch.testing.assert_close(logits[:, 5:].argmax(-1), out[:, 6:])  # greedy tokens = full-forward argmax


@pytest.mark.parametrize("split", [1, 2])
def test_upcycled_equals_parent_at_step_0_when_noise_off(tmp_path, split):
    torch.manual_seed(0)
    pcfg = cfg_(experts=(1,), capacity_factor=1.0)
    parent = moma.MoMa(pcfg)
    opt = torch.optim.AdamW(parent.parameters(), lr=1e-2)
    for i in range(3):  # a briefly trained parent, so that weights are not at their init
        loss = parent(batch_(seed=i))[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": parent.state_dict(), "config": {}}, path)
    b = batch_(seed=9)
    parent.eval()
    ref = parent(b, routing="ec")[0]
    # every expert takes every token of its group (capacity factor = E_m): the upcycled model IS the parent
    kw = dict(experts=(4,), capacity_factor=4.0, expert_hidden=pcfg.d_expert // split, upcycle_from=str(path))
    child = moma.MoMa(cfg_(**kw)).eval()
    torch.testing.assert_close(child(b, routing="ec")[0], ref, atol=1e-5, rtol=1e-5)
    noisy = moma.MoMa(cfg_(**kw, upcycle_noise=0.05)).eval()
    assert (noisy(b, routing="ec")[0] - ref).abs().max() > 1e-4
    with pytest.raises(ValueError, match="1t1i"):
        torch.save({"model": noisy.state_dict(), "config": {}}, tmp_path / "bad.pt")
        moma.MoMa(cfg_(upcycle_from=str(tmp_path / "bad.pt")))


def _flops_per_token(model, b):
    with FlopCounterMode(display=False) as fc:
        model(b)[1].backward()
    return fc.get_total_flops() / b["tokens"].numel()


def test_active_flops_per_token_match_dense():
    torch.manual_seed(0)
    kw = dict(vocab_size=V, n_modalities=2, modality_offsets=OFFS, seq_len=64, d_model=32, n_head=2, n_layer=2)
    b = batch_(B=4, T=64)
    dense = _flops_per_token(mot.Transformer(mot.Config(**kw)), b)
    ours = _flops_per_token(moma.MoMa(moma.Config(**kw)), b)
    # routers + aux routers are the only extra matmuls; k_e rounding up adds at most E tokens per group
    assert 1.0 <= ours / dense < 1.08, (ours, dense)


def test_loss_falls_and_aux_routers_learn():
    torch.manual_seed(0)
    model = moma.MoMa(cfg_(mod=True))
    b = batch_(B=4, T=32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        _, loss, parts = model(b)
        first = first or (loss.item(), parts["router_bce"].item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first[0] - 0.5
    assert parts["router_bce"].item() < first[1]


def test_headline_eval_is_causal_with_expert_choice_beside():
    """Eval's loss is the aux-router (causal) routing's; the expert-choice figure is reported as loss*_ec."""
    torch.manual_seed(0)
    model = moma.MoMa(cfg_()).eval()
    b = batch_()
    with torch.no_grad():
        for blk in model.blocks:  # aux routers that pick no expert: the two routings differ clearly
            for a in blk.ffn.aux:
                a.fc2.bias.fill_(-10.0)
        _, loss, parts = model(b)
        aux_loss, ec_loss = model(b, routing="aux")[1], model(b, routing="ec")[1]
    assert {"loss_text", "loss_image", "loss_ec", "loss_text_ec", "loss_image_ec", "router_acc"} <= set(parts)
    torch.testing.assert_close(loss, aux_loss)
    torch.testing.assert_close(parts["loss_ec"], ec_loss)
    assert abs(parts["loss_ec"] - loss) > 1e-6  # two routings, two numbers (small at init: tiny FFN outputs)
    rec = model.history[-1]  # the record the routing figure is drawn from: both routings, per layer and expert
    assert len(rec["counts"]) == len(rec["aux_counts"]) == len(rec["acc"]) == model.cfg.n_layer
    assert len(rec["counts"][0]) == model.cfg.n_experts_total
    ec = moma.MoMa(cfg_(routing="ec")).eval()  # the paper's figure as the headline: the causal one beside it
    with torch.no_grad():
        assert {"loss_aux", "loss_text_aux", "loss_image_aux"} <= set(ec(b)[2])


def test_bad_input_raises_one_line_value_error():
    model = moma.MoMa(cfg_())
    b = batch_()
    with pytest.raises(ValueError, match="int64"):
        model(dict(b, tokens=b["tokens"].float()))
    with pytest.raises(ValueError, match="modality ids"):
        model(dict(b, modality=b["modality"] + 2))
    with pytest.raises(ValueError, match="seq_len"):
        model(batch_(T=80))
    with pytest.raises(ValueError, match="experts"):
        cfg_(experts=(4, 4, 4))
    with pytest.raises(ValueError, match="seq_len"):
        model.generate(b["tokens"], 40)


def test_stage2_fit_aux_routers_trains_only_the_aux_routers():
    torch.manual_seed(0)
    model = moma.MoMa(cfg_(mod=True))
    main = {n: p.detach().clone() for n, p in model.named_parameters() if ".aux." not in n and "mod_aux" not in n}
    b = batch_(B=4, T=32)
    model.eval()
    acc0 = model(b, routing="ec")[2]["router_acc"].item()
    acc = model.fit_aux_routers([b] * 40, lr=1e-2)
    assert acc > acc0 + 0.05
    assert all(torch.equal(p, main[n]) for n, p in model.named_parameters() if n in main)


@pytest.mark.parametrize("mod", [False, True])
def test_main_model_trains_exactly_as_without_aux_routers(mod):
    """Aux routers are drawn from a side random stream and clipped apart (MoMa.clip_grad_norm_): the main model's
    init, its Gumbel noise and every training step are bit-identical with and without them. The clip is tight, so
    it is active at every step (one global clip over both would differ here)."""
    runs = []
    for aux in (False, True):
        torch.manual_seed(0)
        model = moma.MoMa(cfg_(aux_router=aux, routing="ec", gumbel=1.0, mod=mod, mod_every=1))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for i in range(4):
            loss = model(batch_(seed=i))[1]
            opt.zero_grad()
            loss.backward()
            norm = model.clip_grad_norm_(0.05)
            opt.step()
        runs.append(({n: p.detach().clone() for n, p in model.named_parameters()}, norm))
    (plain, norm0), (with_aux, norm1) = runs
    assert norm0 > 0.05 and torch.equal(norm0, norm1)
    assert set(plain) < set(with_aux)
    for n, p in plain.items():
        assert torch.equal(p, with_aux[n]), n


@pytest.mark.parametrize("routing", ["aux", "ec"])
def test_a_fourth_modality_trains_and_reports_its_loss(routing):
    """Modality count and names come from the Config: with 4 modalities every group gets its experts, every
    modality's loss is reported (train and eval, both routings), and generation runs."""
    torch.manual_seed(0)
    offs, names = (0, 32, 64, 96), ("text", "image", "speech", "video")
    model = moma.MoMa(cfg_(n_modalities=4, modality_offsets=offs, modality_names=names, routing=routing))
    g = torch.Generator().manual_seed(0)
    tokens, targets = torch.randint(0, V, (3, 32), generator=g), torch.randint(0, V, (3, 32), generator=g)
    mod = lambda t: torch.bucketize(t, torch.tensor(offs[1:]), right=True)
    b = dict(tokens=tokens, targets=targets, modality=mod(tokens), target_modality=mod(targets))
    assert set(b["modality"].unique().tolist()) == {0, 1, 2, 3}
    _, loss, parts = model.train()(b)
    loss.backward()
    assert {f"loss_{n}" for n in names} <= set(parts)
    assert all(blk.ffn.w_up.grad[12:].abs().sum() > 0 for blk in model.blocks)  # the fourth group's experts train
    other = "ec" if routing == "aux" else "aux"
    with torch.no_grad():
        parts = model.eval()(b)[2]
    assert {f"loss_{n}" for n in names} | {f"loss_{n}_{other}" for n in names} <= set(parts)
    assert model.generate(tokens[:, :4], 4).shape == (3, 8)
    unnamed = moma.MoMa(cfg_(n_modalities=4, modality_offsets=offs))  # names not given: numbered
    assert {"loss_modality2", "loss_modality3"} <= set(unnamed(b)[2])


def test_paper_4t4i_has_full_width_experts_at_capacity_one_over_E(monkeypatch):
    """`moma-paper` is the paper's 4t4i: four experts of the dense FFN's width per modality, each taking T_m / E_m
    tokens (capacity 1/|E_m|), at the dense model's active FLOPs. The default `moma` has half-width experts at c = 2."""
    kw = dict(vocab_size=V, n_modalities=2, modality_offsets=OFFS, seq_len=64, d_model=32, n_head=2, n_layer=2)
    dense_model = mot.Transformer(mot.Config(**kw))
    dense_hidden = dense_model.blocks[0].ffn.w2.weight[0].shape[0]
    paper = moma.MoMa(moma.Config(**kw, **moma.MODELS["moma-paper"][3]))
    default = moma.MoMa(moma.Config(**kw, **moma.MODELS["moma"][3]))
    assert paper.cfg.d_expert == dense_hidden and default.cfg.d_expert == dense_hidden // 2
    assert paper.blocks[0].ffn.w_up.shape == (8, 32, 2 * dense_hidden)       # 4 full-width experts per modality
    b = batch_(B=4, T=64)
    seen, real = [], moma.kernels.grouped_matmul
    monkeypatch.setattr(moma.kernels, "grouped_matmul", lambda x, w, s, **k: (seen.append(s.tolist()), real(x, w, s, **k))[1])
    paper.train()(b)
    n = [int((b["modality"] == m).sum()) for m in range(2)]
    assert seen[0] == [math.ceil(n[0] / 4)] * 4 + [math.ceil(n[1] / 4)] * 4  # each expert: T_m / E_m tokens
    monkeypatch.setattr(moma.kernels, "grouped_matmul", real)
    ratio = _flops_per_token(paper, b) / _flops_per_token(dense_model, b)
    assert 1.0 <= ratio < 1.08, ratio


def test_causal_routing_does_not_depend_on_the_batch_split_but_expert_choice_does():
    """Expert choice's capacity is per forward batch: a row's output depends on the other rows it is batched with,
    so the training loss depends on the micro-batch / DDP split (train.py's DDP test compares moma only at equal
    forward batches). The causal aux routing (the headline eval) is per token: any split gives the same result."""
    torch.manual_seed(0)
    model = moma.MoMa(cfg_(mod=True, mod_every=1)).eval()
    b = batch_(B=4, T=32, seed=3)
    halves = [{k: v[i:i + 2] for k, v in b.items()} for i in (0, 2)]
    with torch.no_grad():
        for routing, differs in (("aux", False), ("ec", True)):
            whole = model(b, routing=routing)[0]
            split = torch.cat([model(h, routing=routing)[0] for h in halves])
            assert ((whole - split).abs().max() > 1e-4) == differs, routing
    model.train()
    loss_whole = model(b)[1].item()
    loss_split = sum(model(h)[1].item() for h in halves) / 2  # the trainer's mean over 2 micro-batches
    assert abs(loss_whole - loss_split) > 1e-5


@pytest.mark.parametrize("routing,mod", [("ec", False), ("ec", True), ("aux", False), ("aux", True)])
def test_grouped_matmul_speed_path_equals_the_plain_per_expert_loop(routing, mod, monkeypatch):
    """expert_impl="grouped" (the default: one grouped matmul over all experts' (token, expert) pairs) against "loop"
    (the plain form: one matmul per expert): the same logits, loss and gradients of every parameter, under expert
    choice in training (with Gumbel noise and the aux routers' BCE) and under the causal aux routing."""
    calls, real = [], moma.kernels.grouped_matmul
    monkeypatch.setattr(moma.kernels, "grouped_matmul", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    b, runs = batch_(B=3, T=32, seed=5), {}
    for impl in ("grouped", "loop"):
        torch.manual_seed(0)
        model = moma.MoMa(cfg_(expert_impl=impl, experts=(3, 2), capacity_factor=1.5, gumbel=1.0, mod=mod,
                               mod_capacity=0.5, mod_every=1)).train()
        with torch.no_grad():  # aux routers that pick some tokens and skip others
            for blk in model.blocks:
                for a in blk.ffn.aux:
                    a.fc2.bias.normal_(0, 1.0)
                if mod:
                    blk.mod_aux.fc2.weight.normal_(0, 1.0)
        n_calls = len(calls)
        torch.manual_seed(1)   # the same Gumbel noise in both runs
        logits, loss, _ = model(b, routing=routing)
        loss.backward()
        runs[impl] = (logits, loss, {n: p.grad for n, p in model.named_parameters()}, len(calls) - n_calls)
    (lg, sg, gg, cg), (ll, sl, gl, cl) = runs["grouped"], runs["loop"]
    assert cg > 0 and cl == 0                              # the loop never calls the grouped kernel
    torch.testing.assert_close(ll, lg, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sl, sg, atol=1e-6, rtol=1e-6)
    assert gl.keys() == gg.keys() and any(g is not None and g.abs().sum() > 0 for n, g in gg.items() if ".w_up" in n)
    for n in gg:
        assert (gg[n] is None) == (gl[n] is None), n
        if gg[n] is not None:
            torch.testing.assert_close(gl[n], gg[n], atol=1e-6, rtol=1e-5, msg=n)


# --- host syncs: on a GPU every read of a device value (item, int, bool, tolist, nonzero, boolean indexing, bincount)
# stalls the step until the device catches up; counted here on CPU at the dispatcher, for one training step
HOST_READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::bincount", "aten::_unique2",
              "aten::unique_consecutive", "aten::unique_dim", "aten::masked_scatter"}


class HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n, self.paused = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        idx = args[1] if name in ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_") else ()
        bool_index = any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in idx)
        unsized = name == "aten::repeat_interleave" and (kwargs or {}).get("output_size") is None
        self.n += not self.paused and (name in HOST_READS or bool_index or unsized)
        return func(*args, **(kwargs or {}))


def host_reads_in_training_step(model, batch, monkeypatch):
    """Host reads of device values in one training forward + backward of model (CPU). Not counted: the grouped
    matmul and mot's per-block norm gain, whose CPU reference paths read their sizes (on a GPU: no host read)."""
    mode = HostReads()

    def wrap(fn, paused):   # fn, counted as one read (paused=False) or with the counting paused inside
        def run(*a, **k):
            mode.n += not (paused or mode.paused)
            mode.paused += paused
            try:
                return fn(*a, **k)
            finally:
                mode.paused -= paused
        return run
    monkeypatch.setattr(moma.kernels, "grouped_matmul", wrap(moma.kernels.grouped_matmul, True))
    monkeypatch.setattr(mot, "routed_gain", wrap(mot.routed_gain, True))
    for method in ("tolist", "cpu", "numpy"):   # reads that dispatch no op
        monkeypatch.setattr(torch.Tensor, method, wrap(getattr(torch.Tensor, method), False))
    model.train()
    with mode:
        model(batch)[1].backward()
    return mode.n


@pytest.mark.parametrize("name", list(moma.MODELS))
def test_training_step_reads_the_host_a_fixed_number_of_times(name, monkeypatch):
    """Bound: the token and modality id checks (1 each), the token groups (1: once per forward, every layer reuses
    them), the per-modality losses (1); plus 1 per MoD layer (its token subset's groups). Not growing with n_layer."""
    for n_layer in (2, 6):
        torch.manual_seed(0)
        cfg = cfg_(**moma.MODELS[name][3], n_layer=n_layer, gumbel=1.0)
        n_mod = sum(cfg.is_mod_layer(l) for l in range(n_layer))
        assert host_reads_in_training_step(moma.MoMa(cfg), batch_(B=2, T=32), monkeypatch) <= 4 + n_mod


# --- --upcycle_from: every bad file is one line, exit 2 (never a traceback, never a hang) ---------------------------
class _RunsCode:
    def __reduce__(self):
        return (os.system, ("true",))


def _bad_upcycle_file(kind, path, parent):
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        os.mkdir(path)
    elif kind == "pickled object":   # a global no torch version allows under weights_only (it would run a command)
        torch.save({"model": _RunsCode()}, path)
    elif kind == "non-tensor":
        torch.save({"model": {**parent, "blocks.0.ffn.w_up": "x"}}, path)
    elif kind == "wrong shapes":
        torch.save({"model": {**parent, "blocks.0.ffn.w_down": torch.zeros(1, 3, 5)}}, path)
    elif kind == "not a dict":
        torch.save({"model": [1, 2]}, path)
    else:
        open(path, "wb").write({"empty": b"", "garbage": b"\x80\x02garbage" * 10}[kind])


@pytest.mark.parametrize("kind", ["fifo", "directory", "pickled object", "empty", "garbage", "non-tensor",
                                  "wrong shapes", "not a dict"])
def test_upcycle_from_a_bad_file_is_one_line_exit_2(kind, tmp_path, capsys):
    import train
    parent = moma.MoMa(cfg_(experts=(1,), capacity_factor=1.0)).state_dict()
    path = str(tmp_path / "parent.pt")
    _bad_upcycle_file(kind, path, parent)
    with pytest.raises(ValueError) as e:
        moma.MoMa(cfg_(experts=(2,), capacity_factor=1.0, upcycle_from=path))
    assert len(str(e.value).splitlines()) == 1 and "upcycle_from" in str(e.value)
    argv = ["--model", "moma", "--d_model", "32", "--n_layer", "1", "--n_head", "2", "--seq_len", "64",
            "--gen_n", "0", "--upcycle_from", path, "--out", str(tmp_path / "out")]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "upcycle_from" in err, err
    if kind == "pickled object":
        assert "pickled Python objects" in err
