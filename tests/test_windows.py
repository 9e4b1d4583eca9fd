"""Windowed attention (Swin's layout): each image's tokens are partitioned into windows folded
into the batch dim (``[B * windows, N, C]``). Which image each window row belongs to is read from
the autograd graph (``divebatch/layers/rows.py``: views that keep the rows sample-major, the
attention's products), and the relative-position bias, a module called with no input whose
``[1, H, N, N]`` output every window of every image adds to its scores, is split per image by
grouping the windows' rows. Exact against torch.func; graphs the proof cannot follow are refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from divebatch import GradNormTracker
from divebatch.layers.rows import flattened_samples

from .models_zoo import add_concatenated_qkv, concatenated_qkv
from .oracle import autocast_checked, reference_norms, rel_err, same_forward_norms

RTOL = 1e-4


def partition(h: torch.Tensor, ws: int) -> torch.Tensor:
    """``[B, H, W, C]`` -> ``[B * windows, ws * ws, C]`` (transformers' ``window_partition``)."""
    B, H, W, C = h.shape
    windows = h.view(B, H // ws, ws, W // ws, ws, C).transpose(2, 3).contiguous()
    return windows.view(-1, ws, ws, C).view(-1, ws * ws, C)


class RelativeBiasTable(nn.Module):
    """Swin's relative-position bias: a lookup in its own table, called with no input."""

    def __init__(self, heads: int, ws: int):
        super().__init__()
        self.table = nn.Parameter(torch.randn((2 * ws - 1) ** 2, heads))
        coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
        relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
        self.register_buffer("index", (relative[..., 0] * (2 * ws - 1) + relative[..., 1]).view(-1))
        self.ws = ws

    def forward(self):
        N = self.ws * self.ws
        return self.table[self.index].view(N, N, -1).permute(2, 0, 1).contiguous().unsqueeze(0)


class WindowAttention(nn.Module):
    """A tiny Swin block: tokens of a ``[B, H, W, 3]`` image embedded, (cyclically shifted,)
    partitioned into windows, q/k/v and output projections on the windows' rows, the bias as the
    attention mask (plus, shifted, a constant ``[B * windows, 1, N, N]`` mask, as transformers'
    SwinAttention expands it), windows merged back, a head on the mean token."""

    def __init__(self, shift=False, dropout=0.0, dim=8, heads=2, ws=2):
        super().__init__()
        self.shift, self.dropout, self.heads, self.ws = shift, dropout, heads, ws
        self.embed, self.qkv, self.proj = nn.Linear(3, dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.bias = RelativeBiasTable(heads, ws)
        self.head = nn.Linear(dim, 4)

    def forward(self, x):
        B, H, W, _ = x.shape
        ws, N = self.ws, self.ws * self.ws
        h = self.embed(x)
        C = h.shape[-1]
        if self.shift:
            h = torch.roll(h, shifts=(-1, -1), dims=(1, 2))
        windows = self.partitioned(h)
        q, k, v = self.qkv(windows).view(-1, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        mask = self.bias()
        if self.shift:
            regions = (torch.arange(H)[:, None] >= H - ws).long() * 2 + (torch.arange(W)[None, :] >= W - ws).long()
            region_windows = partition(regions[None, :, :, None].float(), ws).view(-1, N)
            constant = (region_windows[:, None, :] != region_windows[:, :, None]).float() * -100.0
            mask = mask + constant[:, None].unsqueeze(0).expand(B, -1, -1, -1, -1).reshape(-1, 1, N, N)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        out = self.proj(out.transpose(1, 2).reshape(-1, N, C))
        merged = out.view(B, H // ws, W // ws, ws, ws, C).transpose(2, 3).contiguous().view(B, H * W, C)
        return self.head(torch.tanh(merged).mean(1))

    def partitioned(self, h):
        return partition(h, self.ws)


class ScaleRows(torch.autograd.Function):
    """``2 x``: an autograd Function of its own, as a fused kernel is."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x * 2.0

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad * 2.0


class UnknownOpWindows(WindowAttention):
    """Windows passed through an op the row proof does not follow before their first layer: a
    custom Function (``ScaleRows``), or ``torch.gather`` along the windows' dim reversing each
    image's windows or (``"other images"``) taking each image's from the next image."""

    def __init__(self, op: str):
        super().__init__()
        self.op = op

    def partitioned(self, h):
        windows = partition(h, self.ws)
        if self.op == "function":
            return ScaleRows.apply(windows)
        B, per_image = h.shape[0], windows.shape[0] // h.shape[0]
        images = torch.arange(B)[:, None]
        images = (images + 1) % B if self.op == "other images" else images
        order = (images * per_image + torch.arange(per_image).flip(0)[None]).reshape(-1)
        return torch.gather(windows, 0, order[:, None, None].expand_as(windows))


def test_windows_are_rows_of_their_image():
    """The windows of a partition, and the attention's output over them (fused kernel; math path
    with a mask and dropout), are each image's rows, sample-major."""
    h = torch.randn(2, 4, 4, 6, requires_grad=True) * 1.0
    windows = partition(h, 2)  # [8, 4, 6]
    assert flattened_samples(windows) == (2, 4)
    q = k = v = (windows * 2.0).view(8, 4, 2, 3).transpose(1, 2)
    bias = nn.Parameter(torch.randn(1, 2, 4, 4))
    for mask, p in ((None, 0.0), (bias, 0.0), (bias + torch.zeros(8, 1, 4, 4), 0.5)):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        assert flattened_samples(out.transpose(1, 2).reshape(8, 4, 6)) == (2, 4)


@pytest.mark.parametrize("make", [
    lambda h: partition(h.transpose(0, 1), 2),  # images and rows swapped before the partition
    lambda h: torch.softmax(partition(h, 2), dim=0),  # a softmax over the windows of all images
    lambda h: partition(h, 2).flip(0),  # windows reversed
], ids=["batch dim moved", "softmax over rows", "rows reversed"])
def test_windows_of_unknown_order_are_not_assigned(make):
    assert flattened_samples(make(torch.randn(2, 4, 4, 6, requires_grad=True) * 1.0)) is None


def square_loss(out, target):
    return (out - target).square().sum()


def checked_against_torch_func(model, fused):
    """Track one backward on 3 images of 4x4; check the norms against torch.func and that every
    gradient was accounted for. The per-parameter reference norms and the routes taken."""
    torch.manual_seed(0)
    x, y = torch.randn(3, 4, 4, 3), torch.randn(3, 4)
    with GradNormTracker(model, "sum", fused=fused) as tracker:
        square_loss(model(x), y).backward()
        stats = tracker.collect()
        routes = {plan.module: plan.route for plan in tracker.plan()}
    per_sample, per_param, batch = reference_norms(model, square_loss, x, y)
    assert rel_err(stats.per_sample, per_sample) <= RTOL
    assert rel_err(stats.batch_grad_sq, batch) <= RTOL
    assert max(stats.unaccounted.values()) <= 1e-5
    return stats, per_param, routes


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("shift", [False, True], ids=["windows", "shifted-windows"])
def test_window_attention_matches_torch_func(shift, fused):
    torch.manual_seed(0)
    stats, per_param, routes = checked_against_torch_func(WindowAttention(shift=shift), fused)
    assert rel_err(stats.per_layer["bias"], per_param["bias.table"]) <= RTOL
    assert routes["bias"] == "generic (computed weights)"  # its 1-row output's grads taken back to the table


@pytest.mark.parametrize("op", ["function", "gather"])
def test_windows_through_an_op_the_proof_does_not_follow_are_probed(op):
    """An op the row proof does not follow between the partition and the windows' layers is probed
    through its own backward (``merged_rows_order``): each window row is its image's, exact. (A
    gather along the windows' dim was refused before 2026-12-06's third session: the walk stopped
    at an op that moves elements along the samples' dim without asking its backward whether they
    stay within each image.)"""
    torch.manual_seed(0)
    checked_against_torch_func(UnknownOpWindows(op), fused=True)


def test_windows_gathered_from_other_images_are_refused():
    """Each image's windows taken from the next image: the probe finds no layout that keeps the
    images apart (every window row's image is another's), so the windows' layers keep
    ``B * windows`` rows and the batch check refuses them, naming the first it meets."""
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"'(qkv|proj)' \(Linear\) saw a batch of 12 samples but other layers"):
        checked_against_torch_func(UnknownOpWindows("other images"), fused=True)


def test_windows_gathered_by_index_values_that_change_are_read_again():
    """A layout read through an op that moves rows by index values holds for those values: the
    call is walked again each forward. Windows gathered within each image on the first step and
    across images on the second: exact, then refused (kept from the first walk, the second step's
    norms would be those of other images' windows, with no error)."""
    torch.manual_seed(0)
    model = UnknownOpWindows("gather")
    x, y = torch.randn(3, 4, 4, 3), torch.randn(3, 4)
    per_sample, _, _ = reference_norms(model, square_loss, x, y)
    with GradNormTracker(model, "sum") as tracker:
        square_loss(model(x), y).backward()
        assert rel_err(tracker.collect().per_sample, per_sample) <= RTOL
        model.op = "other images"
        with pytest.raises(ValueError, match=r"saw a batch of 12 samples but other layers"):
            square_loss(model(x), y).backward()
            tracker.collect()


def test_window_attention_with_dropout_matches_the_same_forward():
    torch.manual_seed(0)
    model, x, y = WindowAttention(shift=True, dropout=0.3).train(), torch.randn(3, 4, 4, 3), torch.randn(3, 4)
    with GradNormTracker(model, "sum") as tracker:
        torch.manual_seed(5)
        square_loss(model(x), y).backward()
        stats = tracker.collect()
    assert rel_err(stats.per_sample, same_forward_norms(model, square_loss, x, y, 5)) <= RTOL


class CosineWindowAttention(nn.Module):
    """SwinV2's layout: the attention module owns a logit scale (``clamp(scale, max).exp()``,
    broadcast over every window of every image), scores are cosine similarities (``F.normalize``),
    and the position bias is an MLP (in-place ReLU) of a constant coordinates table, gathered by a
    relative index, ``16 * sigmoid`` of it added to the scores: outputs shared by the samples,
    followed through the MLP, the gather and the sigmoid, with no replay."""

    def __init__(self, dim=8, heads=2, ws=2):
        super().__init__()
        self.heads, self.ws = heads, ws
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.logit_scale = nn.Parameter(torch.log(10 * torch.rand(heads, 1, 1) + 1))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 16), nn.ReLU(inplace=True), nn.Linear(16, heads, bias=False))
        span = torch.arange(-(ws - 1), ws, dtype=torch.float32) / (ws - 1)
        self.register_buffer("coords", torch.stack(torch.meshgrid(span, span, indexing="ij"), -1).unsqueeze(0))
        self.register_buffer("index", RelativeBiasTable(heads, ws).index)

    def forward(self, windows):  # [B * windows, N, C]
        rows, N, C = windows.shape
        q, k, v = self.project(windows).view(rows, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        scores = scores * torch.clamp(self.logit_scale, max=4.6).exp()
        table = self.cpb_mlp(self.coords).view(-1, self.heads)
        bias = table[self.index].view(N, N, -1).permute(2, 0, 1).contiguous()
        scores = scores + 16 * torch.sigmoid(bias).unsqueeze(0)
        out = scores.softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(rows, N, C))

    def project(self, windows):
        return self.qkv(windows)


class ConcatenatedBiasCosineAttention(CosineWindowAttention):
    """timm's SwinV2 attention: as above, with q and v biases of its own and a constant zero k bias
    concatenated into the bias of ``F.linear`` with its ``qkv`` Linear's weight (that Linear never
    called): a product with the windows' rows, inside the module."""

    def __init__(self, dim=8, heads=2, ws=2):
        super().__init__(dim, heads, ws)
        add_concatenated_qkv(self, dim)

    def project(self, windows):
        return concatenated_qkv(self, windows)


class CosineWindowModel(nn.Module):
    def __init__(self, dim=8, ws=2, attention=CosineWindowAttention):
        super().__init__()
        self.ws = ws
        self.embed, self.attention, self.head = nn.Linear(3, dim), attention(dim, ws=ws), nn.Linear(dim, 4)

    def forward(self, x):
        B, H, W, _ = x.shape
        h = self.embed(x)
        out = self.attention(partition(h, self.ws))
        return self.head(torch.tanh(out).reshape(B, -1, out.shape[-1]).mean(1))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
def test_cosine_window_attention_matches_torch_func_without_replay(fused):
    torch.manual_seed(0)
    stats, per_param, routes = checked_against_torch_func(CosineWindowModel(), fused)
    assert rel_err(stats.per_layer["attention"], per_param["attention.logit_scale"]) <= RTOL
    assert routes["attention"] == "generic (broadcast uses)"  # the scale read over the windows' rows
    assert routes["attention.proj"] != "generic (vmap vjp)"


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
def test_qkv_applied_inside_the_window_attention_matches_torch_func_without_replay(fused):
    torch.manual_seed(0)
    model = CosineWindowModel(attention=ConcatenatedBiasCosineAttention)
    stats, per_param, routes = checked_against_torch_func(model, fused)
    own = ("logit_scale", "q_bias", "v_bias", "qkv.weight")  # (the bias MLP has its own entries)
    assert routes["attention"] == "generic (computed weights)"  # the qkv product read over each image's windows
    assert rel_err(stats.per_layer["attention"], sum(per_param[f"attention.{n}"] for n in own)) <= RTOL
    assert routes["attention.proj"] != "generic (vmap vjp)"  # its input's windows proven through the product


def test_qkv_inside_the_window_attention_under_cpu_autocast():
    """Under ``torch.autocast`` the concatenated qkv bias reaches ``F.linear`` through a cast to
    bfloat16: the row proof still reads it as made of parameters, so ``proj``'s windows are assigned
    to their images (it saw 12 samples instead of 3). Against each image's own backward through
    the same autocast forward."""
    torch.manual_seed(0)
    model = CosineWindowModel(attention=ConcatenatedBiasCosineAttention)
    autocast_checked(model, square_loss, torch.randn(3, 4, 4, 3), torch.randn(3, 4))


class OwnTableWindowAttention(nn.Module):
    """timm's Swin ``WindowAttention``: the relative-position table is the attention's own
    parameter, gathered into a ``[1, H, N, N]`` bias; a shifted block passes its constant
    ``[windows, N, N]`` mask in, expanded over the images and added to the bias. The bias is SDPA's
    ``attn_mask`` (or, ``explicit``, added to the scores written out)."""

    def __init__(self, dim=8, heads=2, ws=2, explicit=False):
        super().__init__()
        self.heads, self.explicit = heads, explicit
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.table = nn.Parameter(torch.randn((2 * ws - 1) ** 2, heads))
        self.register_buffer("index", RelativeBiasTable(heads, ws).index)

    def forward(self, windows, mask=None):  # [B * windows, N, C], [windows, N, N]
        rows, N, C = windows.shape
        q, k, v = self.qkv(windows).view(rows, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        bias = self.table[self.index].view(N, N, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
        if mask is not None:
            n = mask.shape[0]
            bias = bias + mask.view(1, n, 1, N, N).expand(rows // n, -1, self.heads, -1, -1).reshape(-1, self.heads, N, N)
        if self.explicit:
            out = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 + bias).softmax(-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(rows, N, C))


class OwnTableWindowModel(nn.Module):
    def __init__(self, shift=False, explicit=False, dim=8, ws=2):
        super().__init__()
        self.ws, self.shift = ws, shift
        self.embed, self.head = nn.Linear(3, dim), nn.Linear(dim, 4)
        self.attention = OwnTableWindowAttention(dim, ws=ws, explicit=explicit)

    def forward(self, x):
        B, H, W, _ = x.shape
        ws, N = self.ws, self.ws * self.ws
        h = self.embed(x)
        mask = None
        if self.shift:
            h = torch.roll(h, shifts=(-1, -1), dims=(1, 2))
            regions = (torch.arange(H)[:, None] >= H - ws).long() * 2 + (torch.arange(W)[None, :] >= W - ws).long()
            region_windows = partition(regions[None, :, :, None].float(), ws).view(-1, N)
            mask = (region_windows[:, None, :] != region_windows[:, :, None]).float() * -100.0
        out = self.attention(partition(h, ws), mask)
        return self.head(torch.tanh(out).reshape(B, -1, out.shape[-1]).mean(1))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "hooks"])
@pytest.mark.parametrize("shift", [False, True], ids=["windows", "shifted-windows"])
@pytest.mark.parametrize("explicit", [False, True], ids=["sdpa", "explicit-scores"])
def test_own_table_window_attention_matches_torch_func_without_replay(explicit, shift, fused):
    torch.manual_seed(0)
    stats, per_param, routes = checked_against_torch_func(OwnTableWindowModel(shift, explicit), fused)
    assert rel_err(stats.per_layer["attention"], per_param["attention.table"]) <= RTOL
    assert routes["attention"] == "generic (computed weights)"  # the gathered bias, taken back to its table


@pytest.mark.parametrize("make", [lambda: WindowAttention(shift=True), CosineWindowModel,
                                  lambda: OwnTableWindowModel(shift=True)], ids=["shifted", "cosine", "own-table"])
def test_batch_sizes_that_change_between_steps(make):
    """A batch of 1 (every window is the one image's) between batches of 3 and 2."""
    torch.manual_seed(0)
    model = make()
    with GradNormTracker(model, "sum") as tracker:
        for B in (3, 1, 2):
            x, y = torch.randn(B, 4, 4, 3), torch.randn(B, 4)
            model.zero_grad()
            square_loss(model(x), y).backward()
            stats = tracker.collect()
            assert rel_err(stats.per_sample, reference_norms(model, square_loss, x, y)[0]) <= RTOL, B
