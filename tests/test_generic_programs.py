"""Random forwards of a module with its own parameters (the generic route), checked against
torch.func: a program of 2 to 5 steps, each a function of the parameters alone (``tanh(v)``,
``m.flip(-1)``, an in-place ``mul_`` on a copy), of the input alone, or of both (``x * v``,
``F.linear(x, m, v)``, ``x @ m.T``, ``torch.where``, ``F.rms_norm(x, (d,), v)``, ...). The second
backward of each (not verified, so no accounting check can catch a misread use) must give
torch.func's per-sample norms, whichever way the route read the forward (broadcast uses, row
products, computed weights, the replay). Found: a bias or weight computed from a parameter beside
an own weight in one ``F.linear`` was left out of the row products (72% off, refused on verified
backwards only)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from .oracle import each_sample_backward, reference_norms, rel_err, second_backward_stats

D = 4

#: Functions of a parameter-derived tensor (applied to the vector ``v`` or the matrix ``m``).
OF_PARAMETERS = {
    "exp": lambda p: p.exp() * 0.5, "tanh": torch.tanh, "square": lambda p: p * p, "neg": lambda p: -p,
    "softplus": F.softplus, "abs": torch.abs, "affine": lambda p: 2.0 * p + 1.0, "sigmoid": torch.sigmoid,
    "flip": lambda p: p.flip(-1), "roll": lambda p: torch.roll(p, 1, -1), "clamp": lambda p: p.clamp(-0.5, 0.5),
    "normalised": lambda p: p / (p.norm() + 1), "cumsum": lambda p: p.cumsum(-1) * 0.3,
    "in-place mul": lambda p: (p * 1.0).mul_(1.5), "in-place add": lambda p: (p + 0).add_(0.1),
    "item assigned": lambda p: _assigned(p),
}


def _assigned(p):
    p = p * 1.0
    p[..., 0] = 0.25
    return p
#: Functions of the input alone.
OF_INPUT = {
    "tanh": torch.tanh, "relu": F.relu, "in-place relu": lambda x: F.relu(x * 1.0, inplace=True),
    "layer norm": lambda x: F.layer_norm(x, (D,)), "square": lambda x: x * x * 0.5, "gelu": F.gelu,
    "flip": lambda x: x.flip(-1), "softmax": lambda x: F.softmax(x, -1), "in-place mul": lambda x: (x + 0).mul_(0.7),
}
#: Functions of the input ``x [B, D]``, the vector ``v [D]`` and the matrix ``m [D, D]``.
OF_BOTH = {
    "mul": lambda x, v, m: x * v, "add": lambda x, v, m: x + v, "rsub": lambda x, v, m: v - x,
    "div": lambda x, v, m: x / (v.abs() + 1), "linear": lambda x, v, m: F.linear(x, m),
    "linear with bias": lambda x, v, m: F.linear(x, m, v), "matmul": lambda x, v, m: x @ m,
    "matmul by .T": lambda x, v, m: x @ m.T, "addcmul": lambda x, v, m: torch.addcmul(x, x, v, value=0.5),
    "where": lambda x, v, m: torch.where(x > 0, x * v, x), "in-place add": lambda x, v, m: (x * 1.0).add_(v),
    "in-place mul": lambda x, v, m: (x * 1.0).mul_(v), "lerp": lambda x, v, m: torch.lerp(x, v.expand_as(x), 0.3),
    "maximum": lambda x, v, m: torch.maximum(x, v), "einsum": lambda x, v, m: torch.einsum("bi,ij->bj", x, m),
    "bmm": lambda x, v, m: torch.bmm(x.unsqueeze(1), m.expand(x.shape[0], D, D)).squeeze(1),
    "gate": lambda x, v, m: x * torch.sigmoid(x @ m), "rms norm": lambda x, v, m: F.rms_norm(x, (D,), v),
    "layer norm": lambda x, v, m: F.layer_norm(x, (D,), v, v * 0.5),
}

STEP = st.one_of(
    st.tuples(st.just("parameters"), st.sampled_from(sorted(OF_PARAMETERS)), st.sampled_from(["v", "m"])),
    st.tuples(st.just("input"), st.sampled_from(sorted(OF_INPUT)), st.just("")),
    st.tuples(st.just("both"), st.sampled_from(sorted(OF_BOTH)), st.just("")),
)


class Program(nn.Module):
    def __init__(self, steps):
        super().__init__()
        self.v = nn.Parameter(torch.randn(D) * 0.5)
        self.m = nn.Parameter(torch.randn(D, D) * 0.5)
        self.steps = steps

    def forward(self, x):
        values = {"v": self.v, "m": self.m}
        for kind, name, target in self.steps:
            if kind == "parameters":
                values[target] = OF_PARAMETERS[name](values[target])
            elif kind == "input":
                x = OF_INPUT[name](x)
            else:  # ("both", or "tokens" for [B, T, D] inputs)
                x = (OF_TOKENS if kind == "tokens" else OF_BOTH)[name](x, values["v"], values["m"])
        return x


def loss(out, y):
    return F.cross_entropy(out, y, reduction="sum")


@settings(max_examples=200, deadline=None)
@given(st.lists(STEP, min_size=2, max_size=5), st.integers(0, 2**16), st.booleans())
def test_random_forwards_match_torch_func(steps, seed, fused):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, D), Program(steps), nn.Linear(D, 3))
    x, y = torch.randn(5, 3), torch.randint(0, 3, (5,))
    stats = second_backward_stats(model, loss, model, x, y, fused=fused)
    per_sample, _, batch = reference_norms(model, loss, x, y)
    assert rel_err(stats.per_sample, per_sample) < 1e-4
    assert rel_err(stats.batch_grad_sq, batch) < 1e-4


#: Under CPU autocast: ``torch.lerp`` refuses a low-precision input with a float32 end.
AUTOCAST_STEP = st.one_of(
    st.tuples(st.just("parameters"), st.sampled_from(sorted(OF_PARAMETERS)), st.sampled_from(["v", "m"])),
    st.tuples(st.just("input"), st.sampled_from(sorted(OF_INPUT)), st.just("")),
    st.tuples(st.just("both"), st.sampled_from(sorted(set(OF_BOTH) - {"lerp"})), st.just("")),
)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(AUTOCAST_STEP, min_size=2, max_size=5), st.sampled_from([torch.bfloat16, torch.float16]),
       st.integers(0, 2**16), st.booleans())
def test_random_forwards_under_cpu_autocast(steps, dtype, seed, fused):
    """The same under ``torch.autocast("cpu", dtype)`` (the Linear before the module hands it a
    low-precision input), against each sample's own backward through the same autocast forward.
    It found the per-sample replay run outside autocast: its ops met a bfloat16 input with float32
    parameters (a dtype error in the backward, 30 of 200 programs)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, D), Program(steps), nn.Linear(D, 3))
    x, y = torch.randn(5, 3), torch.randint(0, 3, (5,))

    def forward(inputs):
        with torch.autocast("cpu", dtype=dtype):
            return model(inputs).float()

    stats = second_backward_stats(model, loss, forward, x, y, fused=fused)
    assert rel_err(stats.per_sample, each_sample_backward(model, loss, forward, x, y)) < 2e-2


#: Functions of ``x [B, T, D]`` (samples and tokens), ``v`` and ``m``: rows flattened and viewed back,
#: products over tokens, attention, a token of the module's own, convolutions written with its weight.
OF_TOKENS = {
    "linear on flattened rows": lambda x, v, m: F.linear(x.reshape(-1, D), m, v).view(x.shape),
    "product on flattened rows": lambda x, v, m: (x.reshape(-1, D) * v).view(x.shape),
    "mixed over tokens": lambda x, v, m: x + torch.einsum("btd,de->bte", x.mean(1, keepdim=True).expand_as(x), m),
    "transposed product": lambda x, v, m: (x.transpose(1, 2) * v[:, None]).transpose(1, 2),
    "attention": lambda x, v, m: F.scaled_dot_product_attention(x @ m, x, x * v),
    "token weights": lambda x, v, m: x * F.softmax(x @ v, dim=1).unsqueeze(-1),
    "own token": lambda x, v, m: torch.cat([v.expand(x.shape[0], 1, D), x], 1)[:, 1:] + v,
    "cumulative": lambda x, v, m: torch.cumsum(x * v, 1) * 0.3,
    "pointwise convolution": lambda x, v, m: F.conv1d(x.transpose(1, 2), m.unsqueeze(-1)).transpose(1, 2),
    "batched product": lambda x, v, m: torch.bmm(x, m.expand(x.shape[0], D, D)),
    "linear": lambda x, v, m: F.linear(x, m, v),
    "heads": lambda x, v, m: (x.unflatten(-1, (2, D // 2)) * v.view(2, D // 2)).flatten(-2),
}

TOKEN_STEP = st.one_of(
    st.tuples(st.just("parameters"), st.sampled_from(sorted(OF_PARAMETERS)), st.sampled_from(["v", "m"])),
    st.tuples(st.just("tokens"), st.sampled_from(sorted(OF_TOKENS)), st.just("")),
    st.tuples(st.just("both"), st.sampled_from(sorted(set(OF_BOTH) - {"linear", "matmul", "matmul by .T", "einsum",
                                                                       "bmm", "gate"})), st.just("")),
)


@settings(max_examples=80, deadline=None)
@given(st.lists(TOKEN_STEP, min_size=2, max_size=5), st.integers(0, 2**16), st.booleans())
def test_random_forwards_over_tokens_match_torch_func(steps, seed, fused):
    """The same on ``[B, T, D]`` inputs: rows flattened and viewed back, products over tokens,
    attention, a token of the module's own (the row products and the replay on rows)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, D), Program(steps), nn.Linear(D, 3))
    x, y = torch.randn(5, 6, 3), torch.randint(0, 3, (5,))

    def token_loss(out, target):
        return loss(out.mean(1), target)

    stats = second_backward_stats(model, token_loss, model, x, y, fused=fused)
    per_sample, _, batch = reference_norms(model, token_loss, x, y)
    assert rel_err(stats.per_sample, per_sample) < 1e-4
    assert rel_err(stats.batch_grad_sq, batch) < 1e-4
