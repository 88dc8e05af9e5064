"""README.md, EXERCISES.md and RESULTS.md run as written: every pytest command named there selects at least one
test, every `python train.py ...` command parses and builds each of its models (as train.py would, before training;
a command that needs a checkpoint trained by an earlier command is parsed and its keys checked), and every
`python plots.py ...` command names a known figure or subcommand."""
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import fields

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", "EXERCISES.md", "RESULTS.md")
SHELL_VARS = {"$E": "out/blt-entropy/ckpt.pt", "$D": "out/compare"}   # RESULTS.md's BLT block sets these


def commands(prefix):
    """Every command starting with `prefix` in the docs' inline code and code blocks (split at && and ;, comments
    dropped), with where it was found."""
    found = []
    for doc in DOCS:
        text = open(os.path.join(ROOT, doc)).read()
        spans = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
        rest = re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.S)
        lines = [l for s in spans for l in s.splitlines()] + re.findall(r"`([^`\n]+)`", rest)
        for line in lines:
            line = line.split(" #")[0].strip()
            for part in re.split(r"&&|;", line):
                part = part.strip()
                for var, value in SHELL_VARS.items():
                    part = part.replace(var, value)
                if part.startswith(prefix):
                    found.append((doc, part))
    return found


PYTEST = commands("python -m pytest")
TRAIN = commands("python train.py")
PLOTS = commands("python plots.py")


def test_the_docs_name_commands():
    assert len(PYTEST) >= 18, "EXERCISES.md names a test command per exercise"
    assert any(c == "python -m pytest" for _, c in PYTEST), "README's test command"
    assert len(TRAIN) >= 8


COLLECT = r"""
import json, sys, pytest
codes = [int(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *a])) for a in json.loads(sys.argv[1])]
print("CODES" + json.dumps(codes))
"""


def test_every_pytest_command_selects_a_test():
    # one process collects for every command (pytest's own -k logic): exit 0 = something selected, 5 = nothing
    args = [shlex.split(c)[3:] for _, c in PYTEST]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", COLLECT, json.dumps(args)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    line = [l for l in r.stdout.splitlines() if l.startswith("CODES")]
    assert line, r.stdout[-2000:] + r.stderr[-2000:]
    codes = json.loads(line[-1][5:])
    bad = [f"{doc}: {c} (pytest exit {code})" for (doc, c), code in zip(PYTEST, codes) if code != 0]
    assert not bad, "commands that select no test or fail to collect:\n" + "\n".join(bad)


def build_all(argv):
    """What `python train.py ARGV` builds before its first step: each model with its share of the keys."""
    import train
    flags, over = train.parse_args(argv)
    if "help" in flags:
        return []
    reg = train.registry()
    tc_keys = {f.name for f in fields(train.TrainConfig)}
    if "compare" in over:
        names = [n for n in over.pop("compare").split(",") if n]
        per = {n: {k: v for k, v in over.items() if k in tc_keys or k in {f.name for f in fields(reg[n][1])}}
               for n in names}
        for k in over:
            assert any(k in p for p in per.values()), f"--{k} is a key of none of {names}"
        setting = over.get("setting") or reg[names[0]][3]
        per = {n: {**p, "setting": setting} for n, p in per.items()}
    else:
        name = over.pop("model", train.TrainConfig.model)
        per = {name: over}
    built = []
    needs = [k for k in ("entropy_ckpt", "lmfusion", "upcycle_from") if k in over and not os.path.exists(over[k])]
    if needs:            # made by an earlier command of the same recipe: check the keys, do not build
        for n, o in per.items():
            keys = tc_keys | {f.name for f in fields(reg[n][1])}
            assert all(k in keys for k in o), f"unknown key in {sorted(o)} for {n}"
        return list(per)
    for n, o in per.items():
        t_over = {k: v for k, v in o.items() if k in tc_keys and k not in ("out",)}
        m_over = {k: v for k, v in o.items() if k not in tc_keys}
        if n == "lmfusion" and not os.path.exists(m_over.get("lmfusion", "out/lmfusion-base/ckpt.pt")):
            keys = {f.name for f in fields(reg[n][1])}
            assert all(k in keys for k in m_over)
            built.append((n, None))
            continue
        model, cfg, tc, ds = train.build(n, None, m_over, None, "cpu", t_over)
        if hasattr(train, "check_run"):
            train.check_run(n, model, tc, ds, 1, "cpu")
        built.append((n, tc.setting))
    return built


@pytest.mark.parametrize("doc,cmd", TRAIN, ids=[c for _, c in TRAIN])
def test_every_train_command_builds(doc, cmd, tmp_path, monkeypatch):
    import train
    monkeypatch.chdir(tmp_path)
    argv = shlex.split(cmd)[2:]
    if argv == ["--help"]:
        assert train.main(argv) == 0
        return
    if argv[:1] == ["export"]:   # a finished run's directory and where to write: the run is not there to build
        assert len(argv) >= 3 and not argv[1].startswith("-") and not argv[2].startswith("-"), f"{doc}: `{cmd}`"
        train.parse_args([a for a in argv[3:] if a != "--force"])
        return
    try:
        built = build_all(argv)
    except train.UsageError as e:
        pytest.fail(f"{doc}: `{cmd}` is refused: {e}")
    assert built


@pytest.mark.parametrize("doc,cmd", PLOTS, ids=[c for _, c in PLOTS])
def test_every_plots_command_is_known(doc, cmd):
    import plots
    a = shlex.split(cmd)[2:]
    assert a and a[0] in ("list", "docs", "run", "compare", "mechanism", "toy_world"), f"{doc}: {cmd}"
    if a[0] == "docs":
        assert all(n in plots.DOCS_FIGURES for n in a[1:]), f"{doc}: {cmd}"
    if a[0] == "mechanism":
        import train
        assert a[1] in train.registry(), f"{doc}: {cmd}"


def exercise_functions():
    """(module, dotted name) of every function an 'implement it yourself' exercise asks to rewrite."""
    text = open(os.path.join(ROOT, "EXERCISES.md")).read()
    out = []
    for sec in re.split(r"\n## ", text)[1:]:
        m = re.search(r"`(\w+)\.py`", sec.splitlines()[0])
        if not m:
            continue
        for name in re.findall(r"Rewrite[^`]*`([A-Za-z_][\w.]*)", sec):
            out.append((m.group(1), name))
    return out


def test_every_exercise_names_a_function_that_exists():
    import importlib
    found = exercise_functions()
    assert len(found) >= 14
    for mod, name in found:
        obj = importlib.import_module(mod)
        for part in name.split("."):
            assert hasattr(obj, part), f"EXERCISES.md asks to rewrite {mod}.{name}, which does not exist"
            obj = getattr(obj, part)
        assert callable(obj), f"{mod}.{name}"


# --- every implement-it-yourself exercise: its check catches wrong answers ----------------------------------------
# For each exercise, plausible wrong versions of the function it names (the mistakes a student makes). The exercise's
# own check command (EXERCISES.md's `python -m pytest FILE -k "..."`) must fail with each one patched in and pass with
# the reference. One subprocess runs every check in-process (pytest.main), so torch is imported once.
import math  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import blt  # noqa: E402
import data  # noqa: E402
import kernels  # noqa: E402
import megabyte  # noqa: E402
import megalodon  # noqa: E402
import mom  # noqa: E402
import moma  # noqa: E402
import mot  # noqa: E402
import transfusion  # noqa: E402


# 0.1 data.parse_caption
def parse_caption_one_template(ids):
    """reads the word slots of the first template ("a {s} {c} {h} in the {v} {p}") whatever the template"""
    w = [data.WORDS[int(i)] if 0 <= int(i) < len(data.WORDS) else "" for i in ids] + [""] * 8
    at = lambda values, k: values.index(w[k]) if w[k] in values else None
    pos = data.POSITIONS.index((w[6], w[7])) if (w[6], w[7]) in data.POSITIONS else None
    return at(data.SHAPES, 3), at(data.COLOURS, 2), at(data.SIZES, 1), pos


def parse_caption_vertical_only(ids):
    """the position from its first word only (top -> top left, bottom -> bottom left)"""
    got = list(REFERENCE["data.parse_caption"](ids))
    words = [data.WORDS[int(i)] for i in ids if 0 <= int(i) < len(data.WORDS)]
    v = next((w for w in words if w in ("top", "bottom")), None)
    got[3] = None if v is None else data.POSITIONS.index((v, "left"))
    return tuple(got)


# 1.1 mot.ModalityLinear.forward (the plain form; its first lines kept)
def mot_linear_by_position(self, x, modality):
    """the weight of the position's parity, not of the token's modality"""
    if self.n == 1:
        return x @ self.weight[0]
    if isinstance(modality, mot.Routing):
        return mot.routed_linear(self, x, modality)
    pos = torch.arange(x.shape[1], device=x.device).expand(modality.shape) % self.n
    return sum((pos == m).unsqueeze(-1).to(x.dtype) * (x @ w) for m, w in enumerate(self.weight))


def mot_linear_next_modality(self, x, modality):
    """an indexing slip: the weight of modality m + 1 on the tokens of modality m"""
    if self.n == 1:
        return x @ self.weight[0]
    if isinstance(modality, mot.Routing):
        return mot.routed_linear(self, x, modality)
    return sum((modality == (m + 1) % self.n).unsqueeze(-1).to(x.dtype) * (x @ w) for m, w in enumerate(self.weight))


# 1.2 mot.ModalityRMSNorm.forward
def _mot_norm(layer_norm=False, by_position=False):
    def forward(self, x, modality):
        if layer_norm:
            y = F.layer_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)
        else:
            y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)
        if self.n == 1:
            return y * self.weight[0]
        if isinstance(modality, mot.Routing):
            return mot.routed_gain(self, y, modality)
        if by_position:
            modality = torch.arange(x.shape[1], device=x.device).expand(modality.shape) % self.n
        g = torch.stack(list(self.weight))[modality]
        if x.dim() == 4:
            g = g.unsqueeze(2)
        return y * g
    forward.__doc__ = "LayerNorm (the mean subtracted) instead of RMSNorm" if layer_norm else \
        "the gain of the position's parity, not of the token's modality"
    return forward


# 2.1 moma.MoMaFFN.route (the expert-choice branch; the rest as written)
def _moma_route(wrong):
    def route(self, xf, mf, mode):
        cfg, dev = self.cfg, xf.device
        if not cfg.modality_aware:
            mf = torch.zeros_like(mf)
        toks, exps, gates, counts = [], [], [], torch.zeros(cfg.n_experts_total)
        aux_loss, aux_correct, aux_n = xf.new_zeros((), dtype=torch.float32), 0.0, 0
        for m, E in enumerate(cfg.group_experts):
            idx = (mf == m).nonzero().squeeze(1)
            if wrong == "all_tokens" and mode == "ec":
                idx = torch.arange(mf.shape[0], device=dev)       # every token, not the modality's
            n = idx.numel()
            if n == 0:
                continue
            x_m = xf[idx]
            logits = (x_m @ self.router[m]).float()
            gate = torch.sigmoid(logits)
            if mode == "ec":
                k = min(n, math.floor(cfg.capacity_factor * n / E) if wrong == "floor" else
                        math.ceil(cfg.capacity_factor * n / E))
                if self.training and cfg.gumbel > 0:
                    u = torch.rand(2, *logits.shape, device=dev).clamp_(1e-9, 1 - 1e-9)
                    g2 = -torch.log(-torch.log(u))
                    gate = torch.sigmoid(logits + cfg.gumbel * (g2[0] - g2[1]))
                if wrong == "token_choice":                           # each token picks its best expert
                    best = gate.detach().argmax(1)
                    pair_e, order = best.sort(stable=True)
                    pair_i = order
                    top = None
                else:
                    top = gate.detach().t().topk(k, dim=1).indices.sort(dim=1).values
                    pair_e = torch.arange(E, device=dev).repeat_interleave(k)
                    pair_i = top.reshape(-1)
                if self.aux is not None:
                    target = torch.zeros(n, E, dtype=torch.bool, device=dev)
                    target[pair_i, pair_e] = True
                    l, acc = moma.bce_and_acc(self.aux[m](x_m.detach()), target)
                    aux_loss, aux_correct, aux_n = aux_loss + l * n, aux_correct + acc.item() * n, aux_n + n
            else:
                pick = torch.sigmoid(self.aux[m](x_m)) > cfg.aux_threshold
                pair_e, pair_i = pick.t().nonzero().unbind(1)
            toks.append(idx[pair_i])
            exps.append(pair_e + self.first[m])
            gates.append(gate[pair_i, pair_e])
            counts[self.first[m]:self.first[m] + E] += torch.bincount(pair_e, minlength=E).float().cpu() / n
        stats = dict(counts=counts, aux_loss=aux_loss / max(aux_n, 1), aux_acc=aux_correct / max(aux_n, 1))
        if not toks:
            return None, None, None, stats
        return torch.cat(toks), torch.cat(exps), torch.cat(gates), stats
    route.__doc__ = {"floor": "k = floor(capacity_factor * n / E): the rounding down",
                     "all_tokens": "each expert picks among all tokens, not its modality's",
                     "token_choice": "token choice: each token goes to its best expert"}[wrong]
    return route


# 2.2 moma.Block.forward (the expert-choice part of mixture-of-depths)
def _moma_mod(wrong):
    def forward(self, x, modality, pos, mode, cache=None):
        if not self.is_mod or mode != "ec":
            return REFERENCE["moma.Block.forward"](self, x, modality, pos, mode, cache=cache)
        B, T, D = x.shape
        r = x @ self.mod_router
        k = max(1, round(self.cfg.mod_capacity * T))
        if wrong == "threshold":                                      # every token whose weight is above 1/2
            keep = torch.sigmoid(r.detach()) > 0.5
            new = x.clone()
            for b in range(B):
                sel = keep[b].nonzero().squeeze(1)
                if sel.numel():
                    out, st = self.block(x[b:b + 1, sel], modality[b:b + 1, sel], pos[b:b + 1, sel], mode)
                    w = torch.sigmoid(r[b:b + 1, sel].float())[..., None].to(x.dtype)
                    new[b, sel] = (x[b:b + 1, sel] + w * (out - x[b:b + 1, sel]))[0]
            return new, dict(mod_frac=keep.float().mean().item())
        if wrong == "first_k":                                        # the router ignored: the first k tokens
            sel = torch.arange(k, device=x.device).expand(B, k)
            take = lambda t: t.gather(1, sel if t.dim() == 2 else sel[..., None].expand(-1, -1, t.shape[-1]))
            xs = take(x)
            out, st = self.block(xs, take(modality), take(pos), mode)
            xs = xs + torch.sigmoid(take(r).float())[..., None].to(xs.dtype) * (out - xs)
            return x.scatter(1, sel[..., None].expand(-1, -1, D), xs), dict(st, mod_frac=k / T)
        # "batch": the top k * B tokens of the whole batch, not k per row
        flat = r.detach().reshape(-1).topk(k * B).indices
        keep = torch.zeros(B * T, dtype=torch.bool, device=x.device)
        keep[flat] = True
        keep = keep.view(B, T)
        out, st = self.block(x, modality, pos, mode)
        w = torch.sigmoid(r.float())[..., None].to(x.dtype)
        return torch.where(keep[..., None], x + w * (out - x), x), dict(st, mod_frac=k / T)
    forward.__doc__ = {"threshold": "tokens whose router weight is above 1/2 go through, not the top k per row",
                       "batch": "the top k * B tokens of the whole batch, not the top k of each row",
                       "first_k": "the router ignored: the first k tokens of each row go through"}[wrong]
    forward.__name__ = f"mod_{wrong}"
    return forward


# 3.1 mom.MoMMixer.step
def _mom_step(wrong):
    def step(self, u, route, cache):
        conv_state, ssm_state = cache
        N, R = self.cfg.d_state, self.cfg.dt_rank
        xs, z = self.in_proj(u, route).chunk(2, dim=-1)
        if wrong == "conv_front":                                     # the new input written at the oldest end
            conv_state = torch.cat([xs.unsqueeze(-1), conv_state[..., :-1]], dim=-1)
        else:
            conv_state = torch.cat([conv_state[..., 1:], xs.unsqueeze(-1)], dim=-1)
        x = (conv_state * self.conv1d.weight[:, 0, :]).sum(-1)
        x = F.silu(x + self.conv1d.bias if self.conv1d.bias is not None else x)
        dt, Bm, Cm = self.x_proj(x, route).split([R, N, N], dim=-1)
        cd = torch.float64 if u.dtype == torch.float64 else torch.float32
        dt, x, Bm, Cm = (t.to(cd) for t in (F.softplus(self.dt_proj(dt, route)), x, Bm, Cm))
        A, ssm_state = -torch.exp(self.A_log.to(cd)), ssm_state.to(cd)
        ssm_state = torch.exp(dt.unsqueeze(-1) * A) * ssm_state + (dt * x).unsqueeze(-1) * Bm.unsqueeze(1)
        y = (ssm_state @ Cm.unsqueeze(-1)).squeeze(-1)
        if wrong != "no_skip":
            y = y + self.D.to(cd) * x
        y = (y * F.silu(z)).to(u.dtype)
        return self.out_proj(y, route), (conv_state, ssm_state)
    step.__doc__ = {"conv_front": "the conv state rolled the wrong way (the new input at the front)",
                    "no_skip": "the D x skip term left out"}[wrong]
    return step


# 3.2 mom.ModalityLinear.forward
def _mom_linear(wrong):
    def forward(self, x, route):
        if not self.split:
            y = x @ self.weights[0]
            return y + self.biases[0] if self.biases is not None else y
        if route.order is not None:
            return mom.grouped_linear(self, x, route)
        y = x.new_zeros(x.shape[0], self.weights[0].shape[1])
        M = len(self.weights)
        for m, w in enumerate(self.weights):
            rows = route.modality == m
            j = (m + 1) % M if wrong == "next_modality" else m
            b = None if self.biases is None else self.biases[0 if wrong == "shared_bias" else j]
            y_m = x[rows] @ self.weights[j] if b is None else x[rows] @ self.weights[j] + b
            y[rows] = y_m.to(y.dtype)
        return y
    forward.__doc__ = {"next_modality": "an indexing slip: the copy of modality m + 1 on the tokens of modality m",
                       "shared_bias": "per-modality weights but the first modality's bias for every token"}[wrong]
    return forward


# 4.1 transfusion.attention_mask
def mask_without_drop(gid, drop=None, bidirectional=True):
    """rules 1-2 only: the drop rule (classifier-free guidance) left out"""
    return REFERENCE["transfusion.attention_mask"](gid, None, bidirectional)


def mask_drop_without_boi(gid, drop=None, bidirectional=True):
    """dropped images see their own patches only, not their <boi>"""
    allowed = REFERENCE["transfusion.attention_mask"](gid, None, bidirectional)[:, 0]
    if drop is not None and bool(drop.any()):
        same = (gid[:, :, None] == gid[:, None, :]) & (gid[:, :, None] >= 0)
        allowed = torch.where(drop[:, :, None], same & allowed, allowed)
    return allowed[:, None]


def mask_text_sees_text(gid, drop=None, bidirectional=True):
    """`gid[i] == gid[j]` without `>= 0`: text positions (all -1) see every text position, the future too"""
    B, T = gid.shape
    allowed = torch.ones(T, T, dtype=torch.bool, device=gid.device).tril().expand(B, T, T)
    if bidirectional:
        allowed = allowed | (gid[:, :, None] == gid[:, None, :])
    ref = REFERENCE["transfusion.attention_mask"](gid, drop, bidirectional)[:, 0]
    if drop is not None:
        allowed = torch.where(drop[:, :, None], ref, allowed)
    return allowed[:, None]


# 4.2 transfusion.Diffusion.q_sample
def q_sample_no_sqrt(self, x0, t, noise):
    """alpha_bar_t and 1 - alpha_bar_t without the square roots"""
    ab = self.alpha_bar[t].view(-1, *([1] * (x0.dim() - 1)))
    return ab * x0 + (1 - ab) * noise


def q_sample_t_minus_1(self, x0, t, noise):
    """alpha_bar indexed from 1: alpha_bar[t - 1]"""
    ab = self.alpha_bar[t - 1].view(-1, *([1] * (x0.dim() - 1)))
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def q_sample_swapped(self, x0, t, noise):
    """the two coefficients swapped"""
    ab = self.alpha_bar[t].view(-1, *([1] * (x0.dim() - 1)))
    return (1 - ab).sqrt() * x0 + ab.sqrt() * noise


# 5.1 megabyte.Megabyte.local_inputs
def local_inputs_current_byte(self, g_out, u):
    """the current byte instead of the previous one (no shift, no pad)"""
    B, K, _ = g_out.shape
    P = self.cfg.patch_size
    return (self.w_gl(g_out.view(B, K, P, -1)) + self.local_embed(u).view(B, K, P, -1)).view(B * K, P, -1)


def local_inputs_across_patches(self, g_out, u):
    """the previous byte of the whole sequence: slot 0 of patch k reads the last byte of patch k - 1"""
    B, K, _ = g_out.shape
    P = self.cfg.patch_size
    e = self.local_embed(u)                                               # (B, K*P, D)
    prev = torch.cat((self.local_pad.expand(B, 1, -1).to(e.dtype), e[:, :-1]), 1).view(B, K, P, -1)
    return (self.w_gl(g_out.view(B, K, P, -1)) + prev).view(B * K, P, -1)


# 5.2 megabyte.Megabyte.global_inputs
def global_inputs_no_shift(self, u):
    """patch k at position k: no shift, no pad patch"""
    B, L = u.shape
    return self.embed_bytes(u).reshape(B, L // self.cfg.patch_size, -1)


def global_inputs_byte_shift(self, u):
    """shifted by one byte, not one patch"""
    B, L = u.shape
    P = self.cfg.patch_size
    e = self.embed_bytes(u)                                               # (B, L, D_G)
    e = torch.cat((self.global_pad.view(P, -1)[:1].expand(B, 1, -1).to(e.dtype), e[:, :-1]), 1)
    return e.reshape(B, L // P, -1)


# 6.1 blt.patch_starts
def starts_entropy_after(x, mode, ent=None, threshold=0.0, patch_size=4.0, max_patch_len=0):
    """entropy: byte i starts a patch when ent[:, i] (the entropy of the byte after it) is high"""
    if mode != "entropy":
        return REFERENCE["blt.patch_starts"](x, mode, ent, threshold, patch_size, max_patch_len)
    B, T = x.shape
    starts = torch.zeros(B, T + 1, dtype=torch.bool)
    starts[:, 2:T] = ent[:, 2:] > threshold
    starts[:, :2] = True
    return REFERENCE["blt.patch_starts"](x, "static", patch_size=T + 2, max_patch_len=max_patch_len) | starts


def starts_at_the_space(x, mode, ent=None, threshold=0.0, patch_size=4.0, max_patch_len=0):
    """space: a patch starts AT each space-like byte that follows a letter"""
    if mode != "space":
        return REFERENCE["blt.patch_starts"](x, mode, ent, threshold, patch_size, max_patch_len)
    b = x - blt.OFFSET
    alnum = ((b >= 48) & (b <= 57)) | ((b >= 65) & (b <= 90)) | ((b >= 97) & (b <= 122))
    like = ~alnum & ~((b >= 0x80) & (b < 0xC0))
    starts = torch.zeros(x.shape[0], x.shape[1] + 1, dtype=torch.bool)
    starts[:, 1:x.shape[1]] = like[:, 1:] & ~like[:, :-1]
    starts[:, :2] = True
    return starts


def starts_no_max_len(x, mode, ent=None, threshold=0.0, patch_size=4.0, max_patch_len=0):
    """max_patch_len ignored: long patches not cut"""
    return REFERENCE["blt.patch_starts"](x, mode, ent, threshold, patch_size, 0)


# 6.2 blt.hash_ngram_ids
def _hash(reverse=False, right_pad=False):
    def hash_ngram_ids(x, n, func, buckets):
        p = blt.HASH_PRIMES[func]
        powers = [(p ** (n - 1 - j if reverse else j)) % 2 ** 64 for j in range(n)]
        powers = torch.tensor([w - 2 ** 64 if w >= 2 ** 63 else w for w in powers], dtype=torch.long)
        win = F.pad(x, (0, n - 1) if right_pad else (n - 1, 0)).unfold(1, n, 1)
        return (win * powers).sum(-1) % buckets
    hash_ngram_ids.__doc__ = "the powers of the prime reversed (prime^(n-1-j))" if reverse else \
        "the n bytes starting at i (the future), not ending at i"
    return hash_ngram_ids


# 7.1 megalodon.CEMA.coeffs
def _coeffs(wrong):
    def coeffs(self, polar=False):
        wavelets = torch.arange(1, self.ndim + 1, dtype=torch.float32).view(1, -1, 1)
        if wrong == "one_angle":
            wavelets = torch.ones_like(wavelets)
        theta = torch.sigmoid(self.theta.float()) * (2 * math.pi / self.ndim) * wavelets
        if not self.complex:
            theta = torch.zeros_like(theta)
        p = torch.sigmoid(self.alpha.float())
        mag = 1.0 - p * torch.sigmoid(self.delta.float())
        gamma = torch.view_as_complex(self.gamma.float().contiguous())
        if wrong != "gamma_unscaled":
            gamma = gamma * self.ndim ** -0.5
        return p, ((mag, theta) if polar else torch.polar(mag, theta)), gamma
    coeffs.__doc__ = {"one_angle": "one angle for every n (theta without the factor n)",
                      "gamma_unscaled": "gamma without the 1 / sqrt(N) scale"}[wrong]
    return coeffs


# 7.2 megalodon.welford_merge
def welford_no_cross_term(a, b):
    """M2 = M2_a + M2_b: the delta^2 term left out"""
    (na, ma, m2a), (nb, mb, m2b) = a, b
    n = na + nb
    return n, ma + (mb - ma) * nb / n.clamp_min(1e-12), m2a + m2b


def welford_mean_of_means(a, b):
    """the mean as the plain average of the two means, whatever the counts"""
    (na, ma, m2a), (nb, mb, m2b) = a, b
    n = na + nb
    d = mb - ma
    return n, (ma + mb) / 2, m2a + m2b + d * d * na * nb / n.clamp_min(1e-12)


# 7.3 megalodon.chunk_attention
def _chunk_attention(wrong):
    def chunk_attention(q, k, v, c, base):
        B, L, H, dz = q.shape
        c = min(c, L)
        pad = (-L) % c
        if pad:
            q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
        Lp = L + pad
        if wrong == "whole_sequence":                                # one chunk: plain causal attention
            c = Lp
        pos = torch.arange(Lp) % c
        q, k = megalodon.rotary(q, pos, base), megalodon.rotary(k, pos, base)
        split = lambda t: t.reshape(B * (Lp // c), c, H, t.shape[-1]).transpose(1, 2)
        o = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=wrong != "not_causal",
                                           scale=None if wrong == "scaled" else 1.0)
        return o.transpose(1, 2).reshape(B, Lp, H, -1)[:, :L]
    chunk_attention.__doc__ = {"whole_sequence": "causal attention over the whole sequence, no chunks",
                               "scaled": "scores scaled by 1 / sqrt(d) (the scale is already folded into q, k)",
                               "not_causal": "full attention inside each chunk (not causal)"}[wrong]
    return chunk_attention


# 8.1 kernels._scan_loop
def scan_loop_no_h0(a, b, h0):
    """h0 ignored: the scan always starts from 0"""
    return REFERENCE["kernels._scan_loop"](a, b, None)


def scan_loop_add_first(a, b, h0):
    """h_t = a_t (h_{t-1} + b_t): b added before the decay"""
    hs = b.new_empty(a.shape[0] + 1, *b.shape[1:])
    hs[0] = 0 if h0 is None else h0
    for t in range(a.shape[0]):
        hs[t + 1] = a[t] * (hs[t] + b[t])
    return hs


# exercise -> (the function it names, as module.attr[.attr], [wrong versions])
WRONG = {
    "0.1": ("data.parse_caption", [parse_caption_one_template, parse_caption_vertical_only]),
    "1.1": ("mot.ModalityLinear.forward", [mot_linear_by_position, mot_linear_next_modality]),
    "1.2": ("mot.ModalityRMSNorm.forward", [_mot_norm(layer_norm=True), _mot_norm(by_position=True)]),
    "2.1": ("moma.MoMaFFN.route", [_moma_route("floor"), _moma_route("all_tokens"), _moma_route("token_choice")]),
    "2.2": ("moma.Block.forward", [_moma_mod("threshold"), _moma_mod("batch"), _moma_mod("first_k")]),
    "3.1": ("mom.MoMMixer.step", [_mom_step("conv_front"), _mom_step("no_skip")]),
    "3.2": ("mom.ModalityLinear.forward", [_mom_linear("next_modality"), _mom_linear("shared_bias")]),
    "4.1": ("transfusion.attention_mask", [mask_without_drop, mask_drop_without_boi, mask_text_sees_text]),
    "4.2": ("transfusion.Diffusion.q_sample", [q_sample_swapped, q_sample_t_minus_1, q_sample_no_sqrt]),
    "5.1": ("megabyte.Megabyte.local_inputs", [local_inputs_current_byte, local_inputs_across_patches]),
    "5.2": ("megabyte.Megabyte.global_inputs", [global_inputs_no_shift, global_inputs_byte_shift]),
    "6.1": ("blt.patch_starts", [starts_entropy_after, starts_at_the_space, starts_no_max_len]),
    "6.2": ("blt.hash_ngram_ids", [_hash(reverse=True), _hash(right_pad=True)]),
    "7.1": ("megalodon.CEMA.coeffs", [_coeffs("one_angle"), _coeffs("gamma_unscaled")]),
    "7.2": ("megalodon.welford_merge", [welford_no_cross_term, welford_mean_of_means]),
    "7.3": ("megalodon.chunk_attention", [_chunk_attention("whole_sequence"), _chunk_attention("not_causal"), _chunk_attention("scaled")]),
    "8.1": ("kernels._scan_loop", [scan_loop_no_h0, scan_loop_add_first]),
}

# wrong versions a check does not catch yet (the test that would, for the owner of that test file): strict xfail,
# so the day the check catches them this list must shrink
GAPS = {}


def _gap(ex, i):
    return GAPS.get((ex, WRONG[ex][1][i].__name__))


def _owner(target):
    """'mot.ModalityLinear.forward' -> (the class mot.ModalityLinear, 'forward')"""
    mod, *path = target.split(".")
    obj = sys.modules[mod] if mod in sys.modules else __import__(mod)
    for p in path[:-1]:
        obj = getattr(obj, p)
    return obj, path[-1]


REFERENCE = {t: getattr(*_owner(t)) for t, _ in WRONG.values()}


def exercise_checks():
    """{exercise number: the pytest arguments of its check command} for every implement-it-yourself exercise"""
    text = open(os.path.join(ROOT, "EXERCISES.md")).read()
    out = {}
    for num, body in re.findall(r"\n\*\*(\d+\.\d+) [^\n]*?\*\*(.*?)(?=\n\*\*\d+\.\d+ |\n## |\Z)", text, re.S):
        m = re.search(r"Check: `python -m pytest ([^`]+)`", body)
        if m:
            out[num] = shlex.split(m.group(1))
    return out


def _patch(target, new):
    """Put `new` in place of target's function everywhere it is bound (the module or class, and any module that
    imported the name). Returns the undo."""
    owner, name = _owner(target)
    old = owner.__dict__[name]
    undo = [(owner, name, old)]
    setattr(owner, name, new)
    if isinstance(owner, type(sys)):
        for mod in list(sys.modules.values()):
            for k, v in list(getattr(mod, "__dict__", {}).items()):
                if v is old and mod is not owner:
                    undo.append((mod, k, v))
                    setattr(mod, k, new)
    return lambda: [setattr(o, k, v) for o, k, v in undo]


def run_checks(jobs):
    """jobs: [(exercise, index of the wrong version or -1 for the reference)] -> pytest exit code of each check."""
    checks = exercise_checks()
    for path in {a for args in checks.values() for a in args if a.endswith(".py")}:
        __import__(os.path.basename(path)[:-3])                 # test modules bound once, before any patch
    codes = []
    for ex, i in jobs:
        target, wrong = WRONG[ex]
        undo = _patch(target, wrong[i]) if i >= 0 else (lambda: None)
        try:
            codes.append(int(pytest.main([*checks[ex], "-x", "-q", "--tb=no", "-p", "no:cacheprovider",
                                          "-W", "ignore"])))
        finally:
            undo()
    return codes


JOBS = [(ex, i) for ex, (_, wrong) in WRONG.items() for i in range(-1, len(wrong))]


@pytest.fixture(scope="module")
def check_codes():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    r = subprocess.run([sys.executable, os.path.abspath(__file__), json.dumps(JOBS)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    line = [l for l in r.stdout.splitlines() if l.startswith("CODES")]
    assert line, r.stdout[-3000:] + r.stderr[-3000:]
    return dict(zip(map(tuple, JOBS), json.loads(line[-1][5:])))


def test_every_implement_exercise_has_wrong_versions():
    checks = exercise_checks()
    assert sorted(checks) == sorted(WRONG), "an exercise with a check and no wrong versions here, or the reverse"
    for ex, (target, wrong) in WRONG.items():
        caught = [w for i, w in enumerate(wrong) if not _gap(ex, i)]
        assert len(caught) >= 2 and all(w.__doc__ for w in wrong), ex
        assert target.split(".", 1)[1] in open(os.path.join(ROOT, "EXERCISES.md")).read(), target


@pytest.mark.parametrize("ex,i", [pytest.param(ex, i, marks=pytest.mark.xfail(strict=True, reason=_gap(ex, i)))
                                  if i >= 0 and _gap(ex, i) else (ex, i) for ex, i in JOBS], ids=[f"{ex}-" + ("reference" if i < 0 else WRONG[ex][1][i].__doc__[:40])
                                            for ex, i in JOBS])
def test_check_fails_on_wrong_versions_and_passes_on_the_reference(check_codes, ex, i):
    code = check_codes[(ex, i)]
    if i < 0:
        assert code == 0, f"exercise {ex}: its check fails on the reference (pytest exit {code})"
    else:
        assert code == 1, (f"exercise {ex}: its check does not catch the wrong {WRONG[ex][0]} "
                           f"({WRONG[ex][1][i].__doc__}; pytest exit {code})")


if __name__ == "__main__":        # the subprocess of check_codes: python tests/test_exercises.py JOBS
    print("CODES" + json.dumps(run_checks([tuple(j) for j in json.loads(sys.argv[1])])))
