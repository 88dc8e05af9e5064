"""MoMa: Efficient Early-Fusion Pre-training with Mixture of Modality-Aware Experts
Lin, Shrivastava, Luo et al., 2024 -- arXiv 2407.21770 (https://arxiv.org/abs/2407.21770)

An early-fusion (Chameleon-style) transformer whose attention is shared by all tokens, while every feed-forward layer
is split into modality-aware expert groups: text tokens only visit text experts, image tokens only image experts.
Inside its group a token meets expert-choice (EC) routing: every expert takes its top k_e tokens by a sigmoid gate,
so the load is balanced by construction. EC looks at the whole batch, so for causal inference small auxiliary
routers learn to predict, from a token's own hidden state, whether each expert would have taken it.

Glossary (paper -> code)
    modality groups, "4t4i"       cfg.experts = (4,): experts per group; group m = modality m (0 text, 1 image)
    expert e_{m,i}                MoMaFFN.w_up[g], w_down[g]; g = global expert id (groups laid out in order)
    router W_m, gate g_{m,i}(x)   MoMaFFN.router[m] (D, E_m); gate = sigmoid(x W_m)                  (Sec. 2.2)
    capacity factor c_e, k_e      cfg.capacity_factor c = c_e * E_m; k_e = ceil(c * T_m / E_m), T_m = modality-m tokens
    Gumbel-sigmoid noise, s       cfg.gumbel, in training only                                        (Eq. 5)
    auxiliary router              AuxRouter (D -> cfg.aux_hidden -> E_m), BCE on the EC choices       (Sec. 2.4)
    MoD router, capacity beta     Block.mod_router, cfg.mod_capacity; every cfg.mod_every-th layer    (Sec. 2.3)
    upcycling                     cfg.upcycle_from (a ckpt.pt of a 1t1i MoMa), cfg.upcycle_noise      (Sec. 2.5)
Training always routes by EC. Outside training cfg.routing picks "aux" (causal: what generate uses, the headline
eval loss) or "ec" (the paper's non-causal loss); every eval reports the other routing beside it (loss_ec, loss_aux).
Departures: the EC batch is the whole forward batch (B x T tokens of a modality), not one sequence, so the training
loss depends on how a batch is split into micro-batches or ranks (the causal aux routing does not). The aux routers
train alongside the main model (the paper: a second stage, MoMa.fit_aux_routers) without changing its training.
The default `moma` has half-width experts at c = 2 (the paper's full-width experts at c = 1 is `moma-paper`): the
same active FLOPs, fewer dropped tokens at toy scale. Upcycling splits the parent's hidden units when the experts are
narrower. The MoD output is scaled by sigmoid(router score) (Raposo et al. use the raw score).
Left out: the paper's scale, data and image tokenizer (data.py's toy world stands in: the method is the same).
The code: MoMaFFN.route (grouping, EC, aux routers) and MoMaFFN.forward (one matmul per expert) are the method; what
runs by default is one grouped matmul over all experts (cfg.expert_impl, the speed-path section at the end).
Run:  python train.py --compare dense,mot,moma --setting chameleon        python moma.py   (a demo)
Read first: mot.py (the dense and MoT baselines).  Read next: mom.py (the same idea for state-space models).
"""
import math
import os
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels


@dataclass
class Config:
    # copied from the data by the trainer
    vocab_size: int = 320
    n_modalities: int = 2
    seq_len: int = 256
    modality_offsets: tuple = (0, 64)
    modality_names: tuple = ("text", "image")  # for the loss names (loss_<name>); unnamed modalities: "modality<m>"
    # backbone: mot.py's dense defaults, so that the comparison is compute-matched
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64
    ffn_hidden: int = 0          # the dense model's SwiGLU hidden size; 0 -> 8/3 * d_model rounded up to 16 (as mot.py)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    norm_placement: str = "pre"   # "pre": pre-norm (as mot.py's default); "post": Chameleon's h = x + Norm(Attn(x)), ...
    # Sec. 2.2: modality-aware experts with expert-choice routing
    experts: tuple = (4,)        # experts per modality group: (4,) = 4 in every group ("4t4i"), or e.g. (4, 2)
    modality_aware: bool = True   # False: ONE group of experts[0] experts for all tokens (the paper's mixed-modal EC MoE)
    capacity_factor: float = 2.0  # c: each expert takes k_e = ceil(c * T_m / E_m) tokens of its modality (1: moma-paper)
    expert_hidden: int = 0        # hidden size of one expert; 0 = ffn_hidden / capacity_factor: dense FLOPs/token
    gumbel: float = 0.0           # scale s of the Gumbel-sigmoid noise in training (Eq. 5; 0 = off)
    expert_impl: str = "grouped"  # "grouped": one grouped matmul over all experts (speed path); "loop": one per expert
    # Sec. 2.4: auxiliary routers for causal inference
    aux_router: bool = True
    aux_hidden: int = 16
    aux_threshold: float = 0.5
    routing: str = "aux"          # routing outside training: "aux" (causal, generate's) or "ec" (non-causal)
    # Sec. 2.3: mixture-of-depths
    mod: bool = False
    mod_capacity: float = 0.25    # fraction of each row's tokens that go through a MoD layer
    mod_every: int = 2            # layers l with (l + 1) % mod_every == 0 are MoD layers
    # Sec. 2.5: upcycling
    upcycle_from: str = ""        # path to a train.py ckpt.pt of a 1t1i MoMa ("" = off)
    upcycle_noise: float = 0.0    # relative std of the noise added to copied experts/routers (symmetry breaking)
    init_std: float = 0.02
    # valid values, one rule per field ("int >= 1", "one of a|b", ...; after ";" a note): checked when built
    RANGES: ClassVar[dict] = dict(
        vocab_size="int >= 1", n_modalities="int >= 1", seq_len="int >= 8", modality_offsets="ints >= 0",
        modality_names="names", n_layer="int >= 1", n_head="int >= 1", d_model="int >= 1",
        ffn_hidden="int >= 0; 0 = 8/3 d_model rounded up to 16", rope_theta="float > 0", norm_eps="float in (0, 1)",
        norm_placement="one of pre|post", experts="ints >= 1", modality_aware="bool", capacity_factor="float > 0",
        expert_hidden="int >= 0; 0 = ffn_hidden / capacity_factor", gumbel="float >= 0", expert_impl="one of grouped|loop",
        aux_router="bool", aux_hidden="int >= 1", aux_threshold="float in (0, 1)", routing="one of ec|aux", mod="bool",
        mod_capacity="float in (0, 1]", mod_every="int >= 1", upcycle_from="path", upcycle_noise="float >= 0",
        init_std="float > 0")

    def __post_init__(self):  # relations between fields (each field's range: RANGES); derived sizes are properties
        n_groups = self.n_modalities if self.modality_aware else 1
        if len(self.experts) not in (1, n_groups):
            raise ValueError(f"experts={self.experts}: give one number or one per group ({n_groups}), e.g. --experts=4,4")
        if self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
            raise ValueError(f"d_model={self.d_model} must be a multiple of 2*n_head={2 * self.n_head}; change one of them")
        if self.routing == "aux" and not self.aux_router:
            raise ValueError("routing='aux' (causal) needs the auxiliary routers: set aux_router=True or routing='ec'")
        if len(set(self.modality_names)) != len(self.modality_names):
            raise ValueError(f"modality_names={self.modality_names} must be distinct")

    @property
    def group_experts(self):  # E_m for every group m (experts broadcast over the groups)
        n_groups = self.n_modalities if self.modality_aware else 1
        return tuple(int(e) for e in self.experts) * (n_groups if len(self.experts) == 1 else 1)

    @property
    def n_experts_total(self):
        return sum(self.group_experts)

    @property
    def d_expert(self):  # one expert's hidden size: the dense FFN's / capacity_factor (equal active FLOPs)
        dense = self.ffn_hidden or 16 * math.ceil(8 * self.d_model / 3 / 16)
        return self.expert_hidden or max(1, round(dense / self.capacity_factor))

    def is_mod_layer(self, layer):
        return self.mod and (layer + 1) % self.mod_every == 0


# --- Sec. 2.2: modality-aware expert groups, expert-choice routing inside each group ------------------------------
class MoMaFFN(nn.Module):
    """The FFN of one layer: E_m SwiGLU experts for each modality group m, all groups' experts stored together as
    w_up (G, D, 2H) = [w1 | w3] and w_down (G, H, D); expert i of group m has global id g = first[m] + i."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg, D, H, G, std = cfg, cfg.d_model, cfg.d_expert, cfg.n_experts_total, cfg.init_std
        self.first = [sum(cfg.group_experts[:m]) for m in range(len(cfg.group_experts))]  # global id of group m's expert 0
        self.router = nn.ParameterList([nn.Parameter(torch.randn(D, e) * std) for e in cfg.group_experts])  # W_m
        self.w_up = nn.Parameter(torch.randn(G, D, 2 * H) * std)                        # [w1 | w3] of every expert
        self.w_down = nn.Parameter(torch.randn(G, H, D) * std / math.sqrt(2 * cfg.n_layer))  # w2 of every expert
        self.aux = (side_stream(lambda: nn.ModuleList([AuxRouter(D, cfg.aux_hidden, e) for e in cfg.group_experts]))
                    if cfg.aux_router else None)

    def route(self, xf, mf, mode, groups=None):
        """Hierarchical routing. xf (N, D) tokens, mf (N,) modality, mode "ec" | "aux" -> tok (P,) token index,
        exp (P,) global expert id, g (P,) gate of the (token, expert) pairs, sorted by expert, then token (None when
        no token is routed); stats, as device tensors: routed fraction per expert ("counts"), aux BCE and accuracy."""
        cfg, dev = self.cfg, xf.device
        groups = token_groups(cfg, mf) if groups is None else groups  # Sec. 2.2, stage 1 (trunk: once per forward)
        toks, exps, gates, counts = [], [], [], torch.zeros(cfg.n_experts_total, device=dev)
        aux_loss, aux_correct, aux_n = xf.new_zeros((), dtype=torch.float32), xf.new_zeros((), dtype=torch.float64), 0
        for m, (E, idx) in enumerate(zip(cfg.group_experts, groups)):
            n = idx.numel()
            if n == 0:
                continue
            x_m = xf[idx]
            logits = (x_m @ self.router[m]).float()          # (n, E)
            gate = torch.sigmoid(logits)                      # Sec. 2.2: sigmoid gate, independent per expert
            if mode == "ec":                                  # stage 2, expert choice: each expert takes k_e tokens
                k = min(n, math.ceil(cfg.capacity_factor * n / E))
                if self.training and cfg.gumbel > 0:         # Eq. 5: Gumbel-sigmoid, training only
                    u = torch.rand(2, *logits.shape, device=dev).clamp_(1e-9, 1 - 1e-9)
                    g2 = -torch.log(-torch.log(u))
                    gate = torch.sigmoid(logits + cfg.gumbel * (g2[0] - g2[1]))
                top = gate.detach().t().topk(k, dim=1).indices.sort(dim=1).values  # (E, k) its tokens, in time order
                pair_e = torch.arange(E, device=dev).repeat_interleave(k)
                pair_i = top.reshape(-1)
                if self.aux is not None:                      # Sec. 2.4: learn to predict the EC choice
                    target = torch.zeros(n, E, dtype=torch.bool, device=dev)
                    target[top, torch.arange(E, device=dev)[:, None]] = True
                    l, acc = bce_and_acc(self.aux[m](x_m.detach()), target)
                    aux_loss, aux_correct, aux_n = aux_loss + l * n, aux_correct + acc.double() * n, aux_n + n
            else:                                             # Sec. 2.4, causal: each token decides alone
                pick = torch.sigmoid(self.aux[m](x_m)) > cfg.aux_threshold  # (n, E)
                pair_e, pair_i = pick.t().nonzero().unbind(1)  # sorted by expert, then by token (a host read)
            toks.append(idx[pair_i])
            exps.append(pair_e + self.first[m])
            gates.append(gate[pair_i, pair_e])
            counts[self.first[m]:self.first[m] + E] += (pair_e[:, None] == torch.arange(E, device=dev)).sum(0) / n
        stats = dict(counts=counts, aux_loss=aux_loss / max(aux_n, 1), aux_acc=aux_correct / max(aux_n, 1))
        if not toks:
            return None, None, None, stats
        return torch.cat(toks), torch.cat(exps), torch.cat(gates), stats

    def forward(self, h, modality, mode, groups=None):
        """h (B, T, D) FFN input, modality (B, T), mode "ec" | "aux" -> y (B, T, D), stats dict."""
        if self.cfg.expert_impl == "grouped":
            return grouped_ffn(self, h, modality, mode, groups)
        B, T, D = h.shape
        x = h.reshape(-1, D)
        tok, exp, gate, stats = self.route(x, modality.reshape(-1), mode, groups)
        out = torch.zeros_like(x)                    # a token no expert took adds nothing: it rides the residual
        if tok is None:                              # (aux routing may pick no token at all)
            return out.view(B, T, D), stats
        for g in range(self.cfg.n_experts_total):
            sel = exp == g                           # expert g's pairs: the tokens it took
            a, b = (x[tok[sel]] @ self.w_up[g]).chunk(2, dim=-1)
            y = (F.silu(a) * b) @ self.w_down[g]     # SwiGLU expert
            # Eq. 1: a token's output is the gate-weighted sum over the experts that took it
            out.index_add_(0, tok[sel], (gate[sel, None] * y).to(x.dtype))
        return out.view(B, T, D), stats


def token_groups(cfg, mf):
    """Sec. 2.2, stage 1: mf (N,) modality -> each group's token indices, in order; ONE host read (the group sizes)."""
    order, sizes = kernels.sort_by_group(mf if cfg.modality_aware else torch.zeros_like(mf), len(cfg.group_experts))
    return list(order.split(sizes.tolist()))   # (what nonzero gives per group; the sizes fix each expert's k_e)


# --- Sec. 2.4: auxiliary routers, for causal inference -------------------------------------------------------------
class AuxRouter(nn.Module):
    """Predicts from one token's hidden state (B', D) whether each of n_out routers would select it -> logits."""

    def __init__(self, d, hidden, n_out):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, n_out)

    def forward(self, x):
        return self.fc2(F.silu(self.fc1(x)))


def bce_and_acc(logits, target):
    """Aux-router loss (BCE against the EC choices, a bool target) and accuracy (threshold 0.5 on the probability)."""
    return F.binary_cross_entropy_with_logits(logits.float(), target.float()), ((logits > 0) == target).float().mean()


def side_stream(make):
    """make() run on a side random stream seeded from the global one, which is then restored: modules built so
    (the auxiliary routers) leave the main model's init, and every later draw, as they would be without them."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2 ** 62, ())) ^ 0x5EED)
        return make()


# --- one block: shared attention + MoMaFFN, on MoD layers wrapped in mixture-of-depths (Sec. 2.3) -----------------
class Block(nn.Module):
    def __init__(self, cfg, is_mod):
        super().__init__()
        self.cfg, self.is_mod = cfg, is_mod
        self.norm_attn, self.norm_ffn = RMSNorm(cfg.d_model, cfg.norm_eps), RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn, self.ffn = Attention(cfg), MoMaFFN(cfg)
        if is_mod:
            self.mod_router = nn.Parameter(torch.randn(cfg.d_model) * cfg.init_std)    # Sec. 2.3: w_MoD
            self.mod_aux = side_stream(lambda: AuxRouter(cfg.d_model, cfg.aux_hidden, 1)) if cfg.aux_router else None

    def block(self, x, modality, pos, mode, key_ok=None, cache=None, groups=None):
        """The transformer block proper: x (B, T, D) -> (B, T, D), stats. Shared norms (only the FFN is split)."""
        if self.cfg.norm_placement == "post":  # Chameleon's norm reordering (as mot.py)
            h = x + self.norm_attn(self.attn(x, pos, key_ok, cache))
            y, st = self.ffn(h, modality, mode, groups)
            return h + self.norm_ffn(y), st
        h = x + self.attn(self.norm_attn(x), pos, key_ok, cache)
        y, st = self.ffn(self.norm_ffn(h), modality, mode, groups)
        return h + y, st

    def forward(self, x, modality, pos, mode, cache=None, groups=None):
        """x (B, T, D), modality (B, T), pos (B, T) -> (B, T, D), stats. groups: token_groups of modality."""
        if not self.is_mod:
            return self.block(x, modality, pos, mode, cache=cache, groups=groups)
        B, T, D = x.shape
        r = x @ self.mod_router                                  # (B, T) Sec. 2.3: MoD router score
        if mode == "ec":                                         # top beta*T tokens of each row go through
            k = max(1, round(self.cfg.mod_capacity * T))
            sel = r.detach().topk(k, dim=1).indices.sort(dim=1).values  # (B, k) kept in time order: causal inside
            take = lambda t: t.gather(1, sel if t.dim() == 2 else sel[..., None].expand(-1, -1, t.shape[-1]))
            xs = take(x)
            out, st = self.block(xs, take(modality), take(pos), mode)  # its own token groups: one host read
            xs = xs + torch.sigmoid(take(r).float())[..., None].to(xs.dtype) * (out - xs)  # x + w_MoD(x) * f(x)
            new = x.scatter(1, sel[..., None].expand(-1, -1, D), xs)                      # the rest skip the block
            if self.mod_aux is not None:
                target = torch.zeros(B, T, dtype=torch.bool, device=x.device).scatter_(1, sel, True)
                l, acc = bce_and_acc(self.mod_aux(x.detach()).squeeze(-1), target)
                st = dict(st, mod_loss=l, mod_acc=acc.double())
            st["mod_frac"] = k / T
            return new, st
        # causal: every token decides alone; tokens that skip leave no key (masked) and keep their residual
        go = torch.sigmoid(self.mod_aux(x).squeeze(-1).float()) > self.cfg.aux_threshold  # (B, T)
        out, st = self.block(x, modality, pos, mode, key_ok=go, cache=cache, groups=groups)
        new = torch.where(go[..., None], x + torch.sigmoid(r.float())[..., None].to(x.dtype) * (out - x), x)
        st["mod_frac"] = go.float().mean()
        return new, st


class MoMa(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.tok_emb.weight, std=cfg.init_std)
        self.blocks = nn.ModuleList([Block(cfg, cfg.is_mod_layer(l)) for l in range(cfg.n_layer)])
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        nn.init.normal_(self.lm_head.weight, std=cfg.init_std)
        self.history = []   # one record per eval forward, for plots: MoMa._record's per-layer routing stats
        if cfg.upcycle_from:
            self.upcycle(cfg.upcycle_from, cfg.upcycle_noise)

    def num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        return n - (self.tok_emb.weight.numel() + self.lm_head.weight.numel() if non_embedding else 0)

    def modality_of(self, idx):
        """Modality of each token id from cfg.modality_offsets (markers are text). idx (B, T) -> (B, T)."""
        return torch.bucketize(idx.contiguous(), torch.tensor(self.cfg.modality_offsets[1:], device=idx.device), right=True)

    def trunk(self, tokens, modality, mode, pos=None, caches=None):
        """tokens, modality (B, T) -> final hidden (B, T, D), list of per-block stats"""
        pos = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens) if pos is None else pos
        x, stats, groups = self.tok_emb(tokens), [], token_groups(self.cfg, modality.reshape(-1))  # for every layer
        for l, block in enumerate(self.blocks):
            x, st = block(x, modality, pos, mode, None if caches is None else caches[l], groups)
            stats.append(st)
        return self.norm_f(x), stats

    def forward(self, batch, routing=None):
        """batch: tokens, targets, modality, target_modality (B, T) -> logits (B, T, V), loss, parts.
        routing: None = EC in training, cfg.routing otherwise; or force "ec" / "aux"."""
        tokens = batch["tokens"]
        modality = checked_input(self, tokens, batch.get("modality"))
        mode = routing or ("ec" if self.training else self.cfg.routing)
        x, stats = self.trunk(tokens, modality, mode)
        logits = self.lm_head(x)
        if batch.get("targets") is None:
            return logits, None, {}
        loss, parts = self._lm_loss(logits, batch)
        if mode == "ec" and self.cfg.aux_router:
            # Sec. 2.4, trained alongside: the aux routers see detached hidden states, and their BCE enters
            # straight-through-valued (the loss value stays the LM loss; its gradient reaches only the aux routers)
            aux = sum(s["aux_loss"] + s.get("mod_loss", 0.0) for s in stats)
            loss = loss + (aux - aux.detach())
            parts.update(self._router_parts(stats))
        if not self.training and routing is None:  # an eval: the other routing beside (its gap to the causal loss
            rec = {"mode": mode, **self._record(mode, stats)}  # is what causal inference loses), and a record
            if self.cfg.aux_router:
                other = "aux" if mode == "ec" else "ec"
                with torch.no_grad():
                    xo, st_o = self.trunk(tokens, modality, other)
                    loss_o, parts_o = self._lm_loss(self.lm_head(xo), batch)
                parts.update({f"{k}_{other}": v for k, v in dict(loss=loss_o, **parts_o).items()})
                rec.update(self._record(other, st_o))
                if other == "ec":
                    parts.update(self._router_parts(st_o))
            self.history.append(rec)
        return logits, loss, parts

    @staticmethod
    def _router_parts(stats):
        """Aux routers against the EC choices of one EC pass: accuracy and BCE (and MoD's accuracy)."""
        aux = sum(s["aux_loss"] + s.get("mod_loss", 0.0) for s in stats)
        parts = dict(router_acc=(sum(s["aux_acc"] for s in stats) / len(stats)).float(),
                     router_bce=(aux / len(stats)).detach())
        mods = [s["mod_acc"] for s in stats if "mod_acc" in s]
        if mods:
            parts["mod_router_acc"] = (sum(mods) / len(mods)).float()
        return parts

    @staticmethod
    def _record(mode, stats):
        """One routing's entry in self.history, per layer: each expert's share of its group's tokens ("counts"), MoD
        fractions (keys prefixed "aux_" under the aux routing); under EC the aux routers' accuracy (acc, mod_acc)."""
        pre = "" if mode == "ec" else "aux_"
        rec = {pre + "counts": [s["counts"].tolist() for s in stats],
               pre + "mod_frac": [float(s.get("mod_frac", 1.0)) for s in stats]}
        if mode == "ec":
            rec.update(acc=[float(s["aux_acc"]) for s in stats],
                       mod_acc=[float(s["mod_acc"]) if "mod_acc" in s else None for s in stats])
        return rec

    def _lm_loss(self, logits, batch):
        """Next-token cross-entropy over the targets != -1, and its mean per target modality (loss_<name>)."""
        targets, tmod = batch["targets"], batch.get("target_modality")
        tmod = self.modality_of(targets.clamp(min=0)) if tmod is None else tmod
        ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1, reduction="none")
        valid, M = targets.flatten() != -1, self.cfg.n_modalities
        loss = ce.sum() / valid.sum().clamp(min=1)
        order, n = kernels.sort_by_group(torch.where(valid, tmod.flatten(), M), M + 1)  # ignored targets: group M
        names = [self.cfg.modality_names[m] if m < len(self.cfg.modality_names) else f"modality{m}" for m in range(M)]
        parts = {f"loss_{names[m]}": ce[sel].mean().detach()     # each target modality's positions: one host read
                 for m, sel in enumerate(order.split(n.tolist())[:M]) if len(sel)}
        return loss, parts

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=0.0):
        """idx (B, Tp) int64 prompt -> (B, Tp + max_new_tokens); experts (and MoD) chosen by the aux routers (causal),
        with a KV cache: each step runs only the new token."""
        if not self.cfg.aux_router:
            raise ValueError("generate needs auxiliary routers (expert choice is not causal); set aux_router=True")
        checked_input(self, idx, None, n_new=max_new_tokens)
        was = self.training
        self.eval()
        caches, out, new, start = [dict() for _ in self.blocks], idx, idx, 0
        for _ in range(max_new_tokens):
            pos = torch.arange(start, start + new.shape[1], device=idx.device).expand(idx.shape[0], -1)
            x, _ = self.trunk(new, self.modality_of(new), "aux", pos=pos, caches=caches)
            logits = self.lm_head(x[:, -1]).float()
            new = (torch.multinomial(F.softmax(logits / temperature, -1), 1) if temperature > 0
                   else logits.argmax(-1, keepdim=True))
            start += pos.shape[1]
            out = torch.cat([out, new], 1)
        self.train(was)
        return out

    # --- Sec. 2.4: the auxiliary routers train on their own loss, clipped apart from the main model ---
    def aux_parameters(self):
        """The auxiliary routers' parameters (experts' and MoD's)."""
        return [p for n, p in self.named_parameters() if ".aux." in n or "mod_aux" in n]

    def clip_grad_norm_(self, max_norm):
        """Clip the main model's gradients and the aux routers' apart, each to max_norm -> the main model's norm.
        train.py calls this, not one global clip, so that the main model trains exactly as without aux routers."""
        aux = {id(p) for p in self.aux_parameters()}
        norm = torch.nn.utils.clip_grad_norm_([p for p in self.parameters() if id(p) not in aux], max_norm)
        torch.nn.utils.clip_grad_norm_(self.aux_parameters(), max_norm)   # (a no-op without aux routers)
        return norm

    # --- Sec. 2.4, stage 2: refit the auxiliary routers with the main model frozen ---
    def fit_aux_routers(self, batches, lr=3e-3):
        """batches: iterable of data batches, e.g. (ds.get_batch("train", 16, 10**4 + i) for i in range(150)).
        Trains only the aux routers on EC targets; returns the last accuracy."""
        opt, was, acc = torch.optim.AdamW(self.aux_parameters(), lr=lr, weight_decay=0.0), self.training, 0.0
        self.eval()  # no Gumbel noise; EC targets from the frozen main model
        for batch in batches:
            _, stats = self.trunk(batch["tokens"], batch["modality"], "ec")
            loss = sum(s["aux_loss"] + s.get("mod_loss", 0.0) for s in stats)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            acc = sum(s["aux_acc"] for s in stats) / len(stats)
        self.zero_grad(set_to_none=True)
        self.train(was)
        return float(acc)

    # --- Sec. 2.5: upcycling from a trained 1t1i model ---
    @torch.no_grad()
    def upcycle(self, path, noise=0.0):
        """Initialise from a train.py checkpoint of a 1t1i MoMa: shared weights as they are; expert j of group m gets
        chunk j mod s of the hidden units of the parent's modality-m FFN (s = parent width / expert width; s = 1: a
        full copy; a SwiGLU FFN is the sum of its hidden-unit chunks), its down-projection scaled by s / c, and the
        parent's router column; plus relative noise to break symmetry. A token picked by c experts on average then
        gets the parent's FFN output in expectation, and exactly when every expert takes every token (c = E_m)."""
        sd = load_weights(path, "upcycle_from", "train one with --model moma-1t1i")
        cfg, own, H, n_groups = self.cfg, self.state_dict(), self.cfg.d_expert, len(self.cfg.group_experts)
        up, down = (sd.get(f"blocks.0.ffn.{w}", torch.zeros(0)) for w in ("w_up", "w_down"))
        n_par, Hp = (up.shape[0], down.shape[1]) if up.dim() == down.dim() == 3 else (-1, 0)  # experts, width
        if n_par != n_groups or Hp % H:
            raise ValueError(f"upcycle_from={path!r} is not a 1t1i MoMa checkpoint (need {n_groups} experts of a width "
                             f"expert_hidden={H} divides, got {n_par} of {Hp}); train one with --model moma-1t1i")
        s = Hp // H
        jitter = lambda w: w + noise * w.std() * torch.randn_like(w) if noise > 0 else w.clone()
        par = [(m, j % s) for m, e in enumerate(cfg.group_experts) for j in range(e)]  # (parent group, chunk)
        for k, v in sd.items():
            if k not in own or ".aux." in k or "mod_aux" in k:
                continue  # fresh aux routers: the parent's learned a trivial (all-selected) target
            try:
                if k.endswith("ffn.w_up"):  # [w1 | w3] of width 2 s H: hidden chunk q of both halves
                    v = torch.stack([jitter(v[m].unflatten(1, (2, s, H))[:, :, q].flatten(1)) for m, q in par])
                elif k.endswith("ffn.w_down"):
                    v = torch.stack([jitter(v[m][q * H:(q + 1) * H]) for m, q in par]) * (s / cfg.capacity_factor)
                elif ".ffn.router." in k:
                    v = jitter(v.expand(-1, own[k].shape[1]))
            except (IndexError, RuntimeError):  # a parent tensor of another rank or size
                v = None
            if v is None or v.shape != own[k].shape:
                raise ValueError(f"upcycle_from={path!r}: the parent's {k} {tuple(sd[k].shape)} does not fit this "
                                 f"model's {tuple(own[k].shape)}; use the parent's d_model, n_layer and vocabulary")
            own[k].copy_(v)


# --- the shared backbone: RMSNorm, RoPE, causal attention (the same numerics and names as mot.py's dense model) ---
class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(d))

    def forward(self, x):
        # x: (..., D) -> same shape; normalised in fp32 as mot.py
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def apply_rope(x, pos, theta):
    """x (B, H, T, hd), pos (B, T) absolute positions -> x rotated (the two halves rotate as pairs, as mot.py)."""
    hd = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd)
    ang = pos.to(torch.float32)[:, None, :, None] * inv  # (B, 1, T, hd/2)
    c, s = ang.cos(), ang.sin()
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).type_as(x)


class Attention(nn.Module):
    """Shared by all modalities: W_Q, W_K, W_V fused in one (D, 3D) matrix, W_O (D, D); global causal attention."""

    def __init__(self, cfg):
        super().__init__()
        D, self.n_head, self.theta = cfg.d_model, cfg.n_head, cfg.rope_theta
        self.qkv = nn.Parameter(torch.randn(D, 3 * D) * cfg.init_std)
        self.proj = nn.Parameter(torch.randn(D, D) * cfg.init_std / math.sqrt(2 * cfg.n_layer))

    def forward(self, x, pos, key_ok=None, cache=None):
        """x (B, T, D), pos (B, T) positions -> (B, T, D). key_ok (B, T) bool: the tokens that may be attended to
        (MoD under aux routing: a token that skips the layer leaves no key); cache: generate's KV cache."""
        B, T, D = x.shape
        q, k, v = (t.view(B, T, self.n_head, D // self.n_head).transpose(1, 2) for t in (x @ self.qkv).split(D, -1))
        q, k = apply_rope(q, pos, self.theta), apply_rope(k, pos, self.theta)  # (B, H, T, hd)
        ok = key_ok if key_ok is not None else torch.ones(B, T, dtype=torch.bool, device=x.device)
        k, v, ok, past = kv_cache(cache, k, v, ok) if cache is not None else (k, v, ok, 0)
        if key_ok is None and past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # causal over (cache + new) keys, only keys that are ok; a query always sees itself (no empty rows)
            qi = torch.arange(T, device=x.device)[:, None] + past
            kj = torch.arange(k.shape[2], device=x.device)[None, :]
            mask = ((kj <= qi)[None] & ok[:, None, :]) | (kj == qi)[None]  # (B, T, Tk)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
        return y.transpose(1, 2).reshape(B, T, D) @ self.proj


# ==== Speed paths: same results as the plain forms above, faster (tests/test_moma.py holds them equal) ============
def grouped_ffn(ffn, h, modality, mode, groups=None):
    """MoMaFFN.forward with every expert of every group in ONE grouped matmul per projection (kernels.grouped_matmul,
    a Triton kernel on GPU) over the (token, expert) pairs, which route() returns sorted by expert."""
    xf = h.reshape(-1, h.shape[-1])                                             # (N, D)
    tok, exp, g, stats = ffn.route(xf, modality.reshape(-1), mode, groups)
    if tok is None:
        return torch.zeros_like(h), stats
    sizes = (exp[:, None] == torch.arange(ffn.cfg.n_experts_total, device=exp.device)).sum(0)  # pairs per expert
    dev = xf.device.type                                 # one dtype for the kernel: autocast's when it is on, else x's
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else xf.dtype
    a, b = kernels.grouped_matmul(xf[tok].to(dt), ffn.w_up.to(dt), sizes).chunk(2, dim=-1)  # (P, H): w1, w3 per pair
    y = kernels.grouped_matmul(F.silu(a) * b, ffn.w_down.to(dt), sizes)        # (P, D): SwiGLU expert outputs
    y = y * g[:, None].to(y.dtype)                                              # Eq. 1: gate-weighted ...
    out = torch.zeros_like(xf).index_add_(0, tok, y.to(xf.dtype))              # ... and summed per token
    return out.view_as(h), stats


def kv_cache(cache, k, v, ok):
    """generate's KV cache (a dict, appended to in place): this step's keys, values (B, H, T, hd) and key mask
    (B, T) after the cached ones -> all keys, values, mask, and the number of cached positions before this step."""
    past = cache["k"].shape[2] if "k" in cache else 0
    if past:
        k, v, ok = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2), torch.cat([cache["ok"], ok], 1)
    cache.update(k=k, v=v, ok=ok)
    return k, v, ok, past


# --- guard rails: runtime input checks and the checkpoint loader (one-line ValueErrors) ----------------------------
def checked_input(model, tokens, modality, n_new=0):
    """tokens (B, T), modality (B, T) or None (from the token ids), n_new tokens to generate -> modality."""
    cfg = model.cfg
    if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.long or tokens.dim() != 2:
        raise ValueError("tokens must be an int64 tensor of shape (B, T); convert with .long()")
    if tokens.shape[1] + n_new > cfg.seq_len:
        raise ValueError(f"{tokens.shape[1]} tokens + {n_new} new > seq_len={cfg.seq_len}; crop or raise --seq_len")
    modality = model.modality_of(tokens) if modality is None else modality
    if modality.dtype != torch.long or modality.shape != tokens.shape:
        raise ValueError(f"modality must be an int64 tensor of shape {tuple(tokens.shape)}, got {modality.dtype} "
                         f"{tuple(modality.shape)}")
    for what, ids, n, fix in (("token", tokens, cfg.vocab_size, "check the data or --vocab_size"),
                              ("modality", modality, cfg.n_modalities, "set --n_modalities (and --experts)")):
        if ids.numel() and bool((ids.min() < 0) | (ids.max() >= n)):
            raise ValueError(f"{what} ids must be in [0, {n}), got {int(ids.min())}..{int(ids.max())}; {fix}")
    return modality


def load_weights(path, flag, fix):
    """The weights (name -> tensor) of a train.py ckpt.pt, or a one-line ValueError naming what is wrong. Only a
    regular file is opened (a FIFO would block torch.load for ever); pickled objects never run (weights_only=True)."""
    if not os.path.isfile(path):  # stat only (symlinks followed)
        raise ValueError(f"{flag}={path!r} is {'not a regular file' if os.path.exists(path) else 'missing'}; {fix}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)["model"]
    except Exception as e:  # noqa: BLE001 -- an empty, garbage or pickled file: the same one-line answer
        why = ("it holds pickled Python objects, never loaded" if "unsupported global" in str(e).lower() else
               f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:80]}")
        raise ValueError(f"{flag}={path!r} is not a train.py checkpoint with a 'model' entry ({why}); {fix}") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise ValueError(f"{flag}={path!r}: its 'model' entry is not a dict of tensors; {fix}")
    return sd


MODELS = {
    "moma": (Config, MoMa, "chameleon", dict()),                            # 4t4i: 4 half-width experts, c = 2
    "moma-paper": (Config, MoMa, "chameleon", dict(capacity_factor=1.0)),   # the paper's 4t4i: full width, c = 1
    "moma-1t1i": (Config, MoMa, "chameleon", dict(experts=(1,), capacity_factor=1.0)),  # = FFN-only MoT (+ gate)
    "moma-mod": (Config, MoMa, "chameleon", dict(mod=True)),               # 4t4i + mixture-of-depths
    "moma-ec8": (Config, MoMa, "chameleon", dict(experts=(8,), modality_aware=False)),  # mixed-modal EC baseline
}
SUPPORTED_SETTINGS = {name: ("chameleon", "speech") for name in MODELS}  # modality-aware: token modalities only


if __name__ == "__main__":   # the shipped trained MoMa's routing, as text (untrained when the file is missing)
    import data
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "docs", "ckpt", "moma.pt")
    if os.path.isfile(path):
        ck = torch.load(path, map_location="cpu", weights_only=True)     # tensors and plain types only
        cfg = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in ck["config"]["model_cfg"].items()})
        model, ev, seed = MoMa(cfg).eval(), ck["eval"], ck["config"]["train"]["seed"]
        model.load_state_dict({k: v.float() for k, v in ck["model"].items()})   # fp16 on disk
        print(f"MoMa trained {ck['step']} steps on the chameleon setting ({path}): eval loss {ev['eval_loss']:.3f} "
              f"nats/token routed causally by the auxiliary routers ({ev['eval_loss_ec']:.3f} by expert choice, which "
              f"sees the whole batch); the aux routers agree with expert choice on {ev['eval_router_acc']:.0%} of "
              f"(token, expert) decisions")
    else:
        print(f"no trained checkpoint at {path}: an untrained MoMa instead (`git checkout docs/ckpt/moma.pt`)")
        torch.manual_seed(0)
        model, seed = MoMa(Config()).eval(), 0
    cfg, E = model.cfg, model.cfg.group_experts
    print(f"every FFN has {E[0]} text experts (t0-t{E[0] - 1}) and {E[1]} image experts (i0-i{E[1] - 1}); a token "
          f"only ever reaches the experts of its own modality, then each expert takes the tokens it scores highest")
    batch = data.make_data("chameleon", cfg.seq_len, seed).get_batch("val", 8, 0)
    picks = []                                           # per layer: (B*T, experts) bool, who takes each token

    def who(ffn, inp, out):                              # an FFN's input (h, modality), routed by the aux routers
        tok, exp, _, _ = ffn.route(inp[0].reshape(-1, cfg.d_model), inp[1].reshape(-1), "aux")
        picks.append(torch.zeros(inp[1].numel(), cfg.n_experts_total, dtype=torch.bool))
        if tok is not None:
            picks[-1][tok, exp] = True
    for block in model.blocks:
        block.ffn.register_forward_hook(who)
    with torch.no_grad():
        model(batch, routing="aux")
    names = [f"{'ti'[m]}{i}" for m in range(len(E)) for i in range(E[m])]
    tok = batch["tokens"].reshape(-1)
    label = lambda t: data.word(t) if t < data.N_TEXT else f"i{t - data.N_TEXT}"
    print("the experts that take each of the first 32 tokens of an eval row (the tokens of "
          "docs/moma_routing_tokens.png; causal aux routers, what generate uses; - = none: the residual only):")
    head = f"{'token':>7s}  " + "".join(f"{f'layer {l}':13s}" for l in range(len(picks)))
    print("  " + head + "   " + head)
    cell = lambda t: f"{label(int(tok[t])):>7s}  " + "".join(
        f"{' '.join(names[e] for e in p[t].nonzero()[:, 0].tolist()) or '-':13s}" for p in picks)
    for t in range(16):
        print("  " + cell(t) + "   " + cell(t + 16))
    obj, where = data.SHAPES + data.COLOURS, data.SIZES + ("top", "bottom", "left", "right")
    has = lambda ids: torch.isin(tok, torch.tensor(list(ids)))
    fg = torch.tensor((data.codebook().reshape(-1, data.PATCH ** 2, data.CH).max(-1) > 0.5).any(-1))  # object pixels
    img, fg = tok >= data.N_TEXT, fg[(tok - data.N_TEXT).clamp(min=0)]     # an image token, and its patch has them
    cats = {"markers <bos> <boi> <eoi> .": has([data.BOS, data.BOI, data.EOI, data.SEP]),
            "shape and colour words": has(data.WORD_ID[x] for x in obj),
            "size and position words": has(data.WORD_ID[x] for x in where),
            "other words": has(data.WORD_ID[x] for x in data.WORDS[len(data.SPECIALS):] if x not in obj + where),
            "image: background patches": img & ~fg, "image: patches of the object": img & fg}
    print(f"the share of each kind of token that each expert takes, over {tok.numel():,} tokens of 8 eval rows "
          f"(causal aux routers):")
    for l, p in enumerate(picks):
        print(f"  layer {l}: {'':24s}" + " ".join(f"{n:>4s}" for n in names))
        for k, sel in cats.items():
            share = p[sel].float().mean(0) if sel.any() else torch.zeros(len(names))
            print(f"    {k:>30s} " + " ".join("   ." if s == 0 else f"{s:4.0%}" for s in share.tolist()))
