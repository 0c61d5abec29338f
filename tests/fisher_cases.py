"""Models, data and a brute-force per-example reference for the diagonal Fisher tests."""

from __future__ import annotations

import torch
from torch import nn

from curvmerge.batches import model_outputs
from curvmerge.losses import (
    count_terms,
    flatten_rows,
    output_hessian_matmul,
    resolve_loss,
    sample_targets,
)


class TokenModel(nn.Module):
    """Token-level outputs ``[B, T, C]`` that mix positions (a causal running mean)."""

    def __init__(self, d=3, C=4):
        super().__init__()
        self.inp = nn.Linear(d, 5)
        self.out = nn.Linear(5, C)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = h.cumsum(1) / torch.arange(1, h.shape[1] + 1, dtype=h.dtype)[None, :, None]
        return self.out(h)


class Scale(nn.Module):
    """A layer the engine has no closed form for (the ``torch.func`` fallback)."""

    def __init__(self, d):
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * self.gain


class Tied(nn.Module):
    """One Linear applied twice (per-example gradients summed over both calls)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.shared = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.out = nn.Linear(6, 3, bias=False)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = self.norm(self.shared(h))
        return self.out(h)


class Attn(nn.Module):
    """nn.MultiheadAttention uses ``out_proj`` without calling it: covered by the fallback
    of the nearest called module."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(3, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.emb(x)
        h, _ = self.mha(h, h, h, need_weights=False)
        return self.head(h.mean(1))


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 8), nn.Tanh(), Scale(8), nn.Linear(8, 6), nn.Sigmoid(), nn.Linear(6, 3)
    )


def mlp_plain():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Sigmoid(), nn.Linear(6, 3))


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(4, 4, 3, stride=2, groups=2, padding="valid", bias=False),
        nn.Tanh(),
        nn.Conv2d(4, 2, 2, padding="same", padding_mode="reflect"),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, 3),
    )


def cnn_plain():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 2, 3, stride=2),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, 3),
    )


class TiedConv(nn.Module):
    """One Conv2d applied twice (per-example gradients summed over both calls)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Conv2d(1, 3, 3, padding=1)
        self.shared = nn.Conv2d(3, 3, 3, padding=1, groups=3)
        self.out = nn.Linear(3 * 7 * 7, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        return self.out(self.shared(h).flatten(1))


def conv1d():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(2, 3, 3, padding=1, dilation=1),
        nn.Tanh(),
        nn.Conv1d(3, 2, 2, stride=2, dilation=2),
        nn.Flatten(),
        nn.Linear(2 * 4, 3),
    )


def tiny_bert(seed=0, num_labels=3):
    from curvmerge.models import tiny_bert as build

    return build(
        num_labels,
        vocab_size=30,
        hidden_size=8,
        num_layers=2,
        num_heads=2,
        max_length=16,
        seed=seed,
    )


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=12,
        n_positions=16,
        n_embd=8,
        n_layer=2,
        n_head=2,
        use_cache=False,
        attn_implementation="eager",
    )
    return GPT2LMHeadModel(cfg).eval()


def text_batches(n_batches=2, B=3, T=6, vocab=30, seed=1, labels=3, lm=False):
    """Right-padded token batches (dict inputs)."""
    from curvmerge.losses import causal_lm_targets

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(1, vocab, (B, T), generator=g)
        lengths = torch.randint(2, T + 1, (B,), generator=g)
        lengths[0] = T
        mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).long()
        ids = ids * mask
        inputs = {"input_ids": ids, "attention_mask": mask}
        if lm:
            targets = causal_lm_targets(ids, mask)
        else:
            targets = torch.randint(0, labels, (B,), generator=g)
        out.append((inputs, targets))
    return out


def tensor_batches(shape, n_batches=2, B=4, classes=3, seed=1, loss="cross_entropy"):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        x = torch.randn(B, *shape, generator=g, dtype=torch.float64)
        if loss == "cross_entropy":
            y = torch.randint(0, classes, (B,), generator=g)
        elif loss == "mse":
            y = torch.randn(B, classes, generator=g, dtype=torch.float64)
        else:
            y = (torch.rand(B, classes, generator=g) < 0.5).to(torch.float64)
        out.append((x, y))
    return out


def brute_force(model, loss_fn, data, kind, names=None, mc_samples=1, seed=0):
    """The diagonal Fisher by a Python loop over examples (and classes, for ``exact``), in
    the conventions of :mod:`curvmerge.losses`, independent of the hook engine."""
    spec = resolve_loss(loss_fn)
    named = dict(model.named_parameters())
    names = list(names or named)
    params = [named[n] for n in names]
    acc = [torch.zeros_like(p) for p in params]
    gen = torch.Generator().manual_seed(seed)
    terms = 0
    loss_mod = spec.__class__(spec.name, "sum", spec.ignore_index).module()

    def add(scalar, w=1.0):
        gs = torch.autograd.grad(scalar, params, retain_graph=True, allow_unused=True)
        for a, g in zip(acc, gs, strict=True):
            if g is not None:
                a.add_(g.square(), alpha=w)

    for inputs, targets in data:
        out = model_outputs(model, inputs)
        f, y, ex = flatten_rows(spec, out, targets)
        terms += count_terms(spec, targets)
        if kind == "mc" and f.shape[0]:
            Y = sample_targets(spec, f.detach(), mc_samples, gen)
        for n in range(out.shape[0]):
            rows = (ex == n).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            if kind == "empirical":
                add(loss_mod(f[rows], y[rows]))
            elif kind == "mc":
                for s in range(mc_samples):
                    add(loss_mod(f[rows], Y[s][rows]), 1.0 / mc_samples)
            elif spec.name == "cross_entropy":
                for m in rows:  # sum_c p_c (grad log p_c)^2 per row
                    lp = f[m].log_softmax(-1)
                    p = lp.detach().exp()
                    for c in range(f.shape[1]):
                        add(lp[c], float(p[c]))
            else:  # H diagonal for MSE and BCE: sum_k H_kk (grad f_k)^2
                for m in rows:
                    h = output_hessian_matmul(
                        spec, f[m : m + 1].detach(), torch.ones_like(f[m : m + 1])
                    )
                    for k in range(f.shape[1]):
                        add(f[m, k], float(h[0, k]))
    c = 1.0 / terms if spec.reduction == "mean" else 1.0
    return torch.cat([a.reshape(-1) for a in acc]) * c
