"""A zoo of small models, one or more per layer family, with inputs and regression targets.

Each entry builds ``(model, inputs, targets)``; the per-sample loss is ``0.5 * ||out_i - y_i||^2``
(``sample_loss``), so the exact per-sample gradients come from ``tests.oracle``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def sample_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed squared error: the loss of the samples in ``out`` (no reduction over the batch)."""
    return 0.5 * (out.float() - y.float()).square().sum()


class SelfAttention(nn.Module):
    """nn.MultiheadAttention as self-attention, batch_first or not (the generic route)."""

    def __init__(self, dim, heads, batch_first):
        super().__init__()
        self.batch_first = batch_first
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=batch_first)

    def forward(self, x):  # x: [B, T, E] always; transposed for the seq-first module
        if not self.batch_first:
            x = x.transpose(0, 1)
        out = self.mha(x, x, x, need_weights=False)[0]
        return out if self.batch_first else out.transpose(0, 1)


class GatedScale(nn.Module):
    """A user's custom module: a raw parameter around a child Linear (the generic route)."""

    def __init__(self, dim):
        super().__init__()
        self.gain = nn.Parameter(torch.randn(dim))
        self.inner = nn.Linear(dim, dim)

    def forward(self, x):
        return torch.tanh(self.inner(x * self.gain)) * self.gain


class ReusedLinear(nn.Module):
    """The same Linear applied twice: per-sample gradients of the two calls must be summed."""

    def __init__(self, dim):
        super().__init__()
        self.lin = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 2)

    def forward(self, x):
        return self.head(self.lin(torch.relu(self.lin(x))))


def _regression(model, x):
    with torch.no_grad():
        y = torch.randn_like(model(x).float())
    return model, x, y


def linear_2d():
    return _regression(nn.Sequential(nn.Linear(7, 9), nn.ReLU(inplace=True), nn.Linear(9, 3)), torch.randn(5, 7))


def linear_3d():
    return _regression(nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 4)), torch.randn(4, 11, 6))


def linear_4d():
    return _regression(nn.Sequential(nn.Linear(5, 6, bias=False), nn.Tanh(), nn.Linear(6, 3)), torch.randn(3, 4, 5, 5))


def conv1d():
    model = nn.Sequential(nn.Conv1d(3, 4, 3, stride=2, padding=1), nn.ReLU(inplace=True),
                          nn.Conv1d(4, 4, 2, padding="same", dilation=2, groups=2, padding_mode="circular"))
    return _regression(model, torch.randn(4, 3, 13))


def conv2d():
    model = nn.Sequential(nn.Conv2d(2, 6, 3, padding="valid"), nn.ReLU(inplace=True),
                          nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=6, padding_mode="reflect"),
                          nn.Conv2d(6, 4, (2, 3), stride=(2, 1), padding=(1, 0), padding_mode="replicate"))
    return _regression(model, torch.randn(3, 2, 9, 8))


def conv3d():
    model = nn.Sequential(nn.Conv3d(2, 4, 2, stride=(1, 2, 1), padding=1, groups=2), nn.ReLU(),
                          nn.Conv3d(4, 3, 3, padding="same", bias=False))
    return _regression(model, torch.randn(2, 2, 5, 6, 4))


def conv_deep():
    """More output channels than output positions (the fused path unfolds and instantiates)."""
    model = nn.Sequential(nn.Conv2d(3, 24, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(24, 20, 3, padding=1, padding_mode="reflect", bias=False), nn.Flatten(2),
                          nn.Conv1d(20, 30, 2, stride=2, dilation=2))
    return _regression(model, torch.randn(3, 3, 6, 6))


def conv3d_deep():
    model = nn.Sequential(nn.Conv3d(2, 12, 2, padding=(1, 0, 0)), nn.Tanh(), nn.Conv3d(12, 9, (2, 1, 1), stride=2))
    return _regression(model, torch.randn(4, 2, 2, 3, 2))


def conv_transpose():
    """A small decoder: transposed convolutions with stride, output_padding, groups, dilation, 1d after 2d."""
    model = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(),
                          nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2), nn.Tanh(),
                          nn.ConvTranspose2d(6, 3, (2, 3), padding=(0, 1), dilation=(2, 1), bias=False), nn.Flatten(2),
                          nn.ConvTranspose1d(3, 2, 3, stride=3))
    return _regression(model, torch.randn(3, 2, 7, 6))


def embedding():
    model = nn.Sequential(nn.Embedding(7, 5, padding_idx=2), nn.Linear(5, 3))
    x = torch.randint(0, 7, (4, 9))
    x[0, :3] = 2  # padding rows get no gradient
    return _regression(model, x)


def embedding_no_pad():
    return _regression(nn.Sequential(nn.Embedding(5, 4), nn.Flatten(), nn.Linear(12, 2)), torch.randint(0, 5, (6, 3)))


class BagFeatures(nn.Module):
    """A recommender's sparse features: bags of ids pooled by two EmbeddingBags (one reading a
    hashed copy of the ids), concatenated into a small MLP."""

    def __init__(self):
        super().__init__()
        self.mean_bag = nn.EmbeddingBag(9, 4, mode="mean", padding_idx=0)
        self.max_bag = nn.EmbeddingBag(5, 3, mode="max")
        self.head = nn.Linear(7, 2)

    def forward(self, ids):
        return self.head(torch.cat([self.mean_bag(ids), self.max_bag(ids % 5)], dim=1))


def embedding_bags():
    x = torch.randint(0, 9, (5, 6))
    x[1] = 0  # a bag of padding only: no gradient
    x[2, :4] = 0
    return _regression(BagFeatures(), x)


def instance_norms():
    """InstanceNorm with each sample's own statistics, and one normalising by running statistics (eval)."""
    running = nn.InstanceNorm2d(4, affine=True, track_running_stats=True).eval()
    with torch.no_grad():
        running.running_mean.uniform_(-0.5, 0.5)
        running.running_var.uniform_(0.5, 2.0)
    # No bias before a norm with the sample's own statistics: its gradient is zero (only rounding).
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.InstanceNorm2d(4, affine=True), nn.ReLU(),
                          nn.Conv2d(4, 4, 3), running, nn.Flatten(), nn.Linear(64, 2))
    with torch.no_grad():  # affine parameters away from their (1, 0) initialisation
        for norm in (model[1], running):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    return _regression(model, torch.randn(5, 3, 8, 8))


def prelu():
    """A slope per channel after a convolution, one shared slope after a Linear."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.PReLU(3, init=0.1), nn.Flatten(), nn.Linear(48, 5),
                          nn.PReLU(init=0.3), nn.Linear(5, 2))
    return _regression(model, torch.randn(6, 2, 6, 6))


class BilinearPairs(nn.Module):
    """``nn.Bilinear`` on two parts of each token (any leading dims), its output through a Linear."""

    def __init__(self):
        super().__init__()
        self.pair = nn.Bilinear(3, 4, 5)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.pair(x[..., :3], x[..., 3:])))


def bilinear():
    return _regression(BilinearPairs(), torch.randn(4, 3, 7))


def norms():
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.RMSNorm(8), nn.Linear(8, 3))
    return _regression(model, torch.randn(4, 5, 6))


def conv_norms_eval():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.GroupNorm(2, 4), nn.Flatten(),
                          nn.Linear(4 * 5 * 5, 2))
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    model.eval()  # BatchNorm with running statistics: a per-sample map, so the oracle is exact
    return _regression(model, torch.randn(3, 3, 7, 7))


def batchnorm1d_eval():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)).eval()
    return _regression(model, torch.randn(5, 4))


def batchnorm3d_eval():
    model = nn.Sequential(nn.Conv3d(2, 3, 2), nn.BatchNorm3d(3), nn.Flatten(), nn.Linear(3 * 27, 2))
    model[1].running_var.uniform_(0.5, 2.0)
    return _regression(model.eval(), torch.randn(3, 2, 4, 4, 4))


def batchnorm_train():
    """BatchNorm in training mode (no per-sample gradient exists: the numbers are the decomposition
    of the batch gradient, so no torch.func oracle; not in ``ZOO``): a BatchNorm2d on channels-last
    feature maps, a BatchNorm1d on ``[B, C]``."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 6),
                          nn.BatchNorm1d(6), nn.Linear(6, 2))
    return _regression(model.to(memory_format=torch.channels_last),
                       torch.randn(5, 3, 7, 7).to(memory_format=torch.channels_last))


def attention_batch_first():
    return _regression(nn.Sequential(SelfAttention(8, 2, True), nn.Linear(8, 2)), torch.randn(3, 5, 8))


def attention_seq_first():
    return _regression(nn.Sequential(SelfAttention(8, 2, False), nn.Linear(8, 2)), torch.randn(3, 5, 8))


class ChannelsFirstNorm(nn.LayerNorm):
    """Hugging Face ConvNeXt's channels-first LayerNorm: its own forward around nn.LayerNorm's."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class FunctionalGroupNorm(nn.Module):
    """``F.group_norm`` with the module's own weight and bias, and a layer scale ``w[:, None, None]``."""

    def __init__(self, channels):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.rand(channels) + 0.5), nn.Parameter(torch.randn(channels))
        self.scale = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x):
        return nn.functional.group_norm(x, 2, self.weight, self.bias) * self.scale[:, None, None]


def functional_norms():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), ChannelsFirstNorm(4), nn.GELU(), FunctionalGroupNorm(4), nn.Flatten(),
                          nn.Linear(4 * 5 * 5, 2))
    return _regression(model, torch.randn(3, 3, 7, 7))


class FlattenedTokensBlock(nn.Module):
    """OPT's MLP block: samples and tokens flattened into rows before a LayerNorm and two Linears
    (``hidden.reshape(-1, d)``), a residual on the flat rows, the batch shape restored after."""

    def __init__(self, dim, hidden, pre_norm=True):
        super().__init__()
        self.norm, self.pre_norm = nn.LayerNorm(dim), pre_norm
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        h = self.norm(rows) if self.pre_norm else rows
        h = rows + self.fc2(torch.relu(self.fc1(h)))
        return h.view(shape) if self.pre_norm else self.norm(h).view(shape)


def flattened_tokens():
    model = nn.Sequential(nn.Linear(4, 6), FlattenedTokensBlock(6, 10), FlattenedTokensBlock(6, 8, pre_norm=False),
                          nn.Linear(6, 2))
    return _regression(model, torch.randn(3, 5, 4))


class InPlaceResiduals(nn.Module):
    """Layer outputs modified in place (``y += x``, ``y.mul_(c)``): a Linear's [B, T, p] output is
    a view of its 2-D product, so a gradient hook on the view alone would be bypassed."""

    def __init__(self, dim):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(dim, dim), nn.LayerNorm(dim), nn.Linear(dim, 2)

    def forward(self, x):
        h = self.fc1(x)
        h += x
        y = self.norm(h)
        y.mul_(0.5)
        return self.fc2(y)


def inplace_residuals():
    return _regression(InPlaceResiduals(6), torch.randn(3, 5, 6))


class ExpertsBlock(nn.Module):
    """A mixture-of-experts block on samples and tokens flattened into rows: a router (its own
    ``[E, d]`` weight, top-2 of a softmax) and experts with ``[E, out, in]`` weights and ``[E, out]``
    biases, applied to each expert's gathered rows and added back with ``index_add_``."""

    def __init__(self, dim, hidden, n_experts=3, k=2):
        super().__init__()
        self.router = nn.Parameter(torch.randn(n_experts, dim) / dim**0.5)
        self.up = nn.Parameter(torch.randn(n_experts, hidden, dim) / dim**0.5)
        self.up_bias = nn.Parameter(0.1 * torch.randn(n_experts, hidden))
        self.down = nn.Parameter(torch.randn(n_experts, dim, hidden) / hidden**0.5)
        self.k = k

    def forward(self, x):
        rows = x.reshape(-1, x.shape[-1])
        scores, index = torch.softmax(F.linear(rows, self.router), dim=-1).topk(self.k, dim=-1)
        out = torch.zeros_like(rows)
        for e in range(self.up.shape[0]):
            token, slot = torch.where(index == e)
            h = F.gelu(F.linear(rows[token], self.up[e]) + self.up_bias[e])
            out.index_add_(0, token, (h @ self.down[e].t()) * scores[token, slot, None])
        return (rows + out).view(x.shape)


def mixture_of_experts():
    return _regression(nn.Sequential(nn.Linear(4, 6), ExpertsBlock(6, 8), nn.Linear(6, 2)), torch.randn(3, 5, 4))


class BlockExperts(nn.Module):
    """Experts applied to every row as ``[E, N, d]`` blocks: ``bmm`` with whole ``[E, in, out]``
    weights (Llama 4's experts)."""

    def __init__(self, n_experts, dim, hidden):
        super().__init__()
        self.gate_up = nn.Parameter(torch.randn(n_experts, dim, 2 * hidden) / dim**0.5)
        self.down = nn.Parameter(torch.randn(n_experts, hidden, dim) / hidden**0.5)

    def forward(self, rows):
        blocks = rows.view(self.gate_up.shape[0], -1, rows.shape[-1])
        gate, up = torch.bmm(blocks, self.gate_up).chunk(2, dim=-1)
        return torch.bmm(F.silu(gate) * up, self.down).view(-1, rows.shape[-1])


class EveryTokenEveryExpert(nn.Module):
    """A mixture of experts that runs every token through every expert, scaled by its router score
    (zero outside the top-k): Llama 4's layout. Row ``e*N + n`` of the experts' input is token ``n``."""

    def __init__(self, dim, hidden, n_experts=3, k=1):
        super().__init__()
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.experts = BlockExperts(n_experts, dim, hidden)
        self.k = k

    def forward(self, x):
        rows = x.reshape(-1, x.shape[-1])
        logits = self.router(rows)
        top, index = logits.topk(self.k, dim=1)
        scores = torch.sigmoid(torch.full_like(logits, float("-inf")).scatter(1, index, top))
        routed = rows.repeat(scores.shape[1], 1) * scores.t().reshape(-1, 1)
        out = self.experts(routed).view(scores.shape[1], -1, rows.shape[-1]).sum(0)
        return (rows + out).view(x.shape)


def experts_on_every_token():
    return _regression(nn.Sequential(nn.Linear(4, 6), EveryTokenEveryExpert(6, 8), nn.Linear(6, 2)),
                       torch.randn(3, 5, 4))


def parametrized():
    """Parametrized weights (``torch.nn.utils.parametrize``): weight_norm on a Linear over tokens,
    then an orthogonal square Linear (the generic route with the originals)."""
    from torch.nn.utils import parametrizations

    return _regression(nn.Sequential(nn.Linear(4, 6), parametrizations.weight_norm(nn.Linear(6, 5)), nn.Tanh(),
                                     parametrizations.orthogonal(nn.Linear(5, 5)), nn.Linear(5, 2)),
                       torch.randn(3, 4, 4))


class StdConv(nn.Conv2d):
    """timm's ``StdConv2d`` (``gain=False``: BiT) and ``ScaledStdConv2d`` (``gain=True``: NF-ResNets,
    NFNets): the weight standardised per output channel by ``F.batch_norm`` over the weight."""

    def __init__(self, *args, gain=True, eps=1e-6, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5) if gain else None
        self.scale, self.eps = self.weight[0].numel() ** -0.5, eps

    def forward(self, x):
        affine = None if self.gain is None else (self.gain * self.scale).view(-1)
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, weight=affine,
                              training=True, momentum=0.0, eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def standardised_convs():
    """Weight-standardised convolutions (``layers/standardised.py``): a 3x3 one whose per-sample
    weight gradients are formed (and fused), then a wide 1x1 one at 2x2 positions, read in closed
    form over the ghost route."""
    return _regression(nn.Sequential(StdConv(3, 8, 3, padding=1), nn.ReLU(), StdConv(8, 32, 1, stride=3),
                                     nn.Flatten(), nn.Linear(128, 2)), torch.randn(4, 3, 6, 6))


class NormalisedTable(nn.Module):
    """DeBERTa-v3's relative positions: a table's weight read whole (its Embedding never called),
    normalised by a LayerNorm on that ``[K, d]`` tensor shared by the samples, projected by the key
    Linear on a ``[1, K, d]`` view (the same Linear is called on the samples) and repeated per
    sample to meet the queries by ``bmm``."""

    def __init__(self, dim=6, positions=4):
        super().__init__()
        self.table, self.norm = nn.Embedding(positions, dim), nn.LayerNorm(dim)
        self.query, self.key = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.head = nn.Linear(positions, 2)

    def forward(self, x):  # [B, T, d]
        rel = self.norm(self.table.weight)
        pos = self.key(rel.unsqueeze(0)).repeat(x.shape[0], 1, 1)  # [B, K, d]
        scores = torch.bmm(self.query(x), pos.transpose(1, 2)) + torch.bmm(self.key(x), pos.transpose(1, 2))
        return self.head(torch.tanh(scores))


def normalised_table():
    return _regression(NormalisedTable(), torch.randn(3, 5, 6))


class TableLayer(nn.Module):
    """DeBERTa v1's attention, reduced: handed a table's weight, it slices it, projects it on a
    ``[1, K, d]`` view and meets the queries, whose bias is split into heads, by a batched matmul."""

    def __init__(self, dim, heads=2):
        super().__init__()
        self.heads = heads
        self.query, self.pos = nn.Linear(dim, dim), nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.randn(dim))

    def forward(self, x, rel):  # x: [B, T, d]; rel: [K, d], the table's weight itself
        B, T, d = x.shape
        q = self.query(x).view(B, T, self.heads, -1).permute(0, 2, 1, 3)
        q = q + self.q_bias[None, None, :].view(1, 1, self.heads, -1).permute(0, 2, 1, 3)
        pos = self.pos(rel[1:].unsqueeze(0)).view(1, -1, self.heads, d // self.heads).permute(0, 2, 1, 3)
        scores = torch.matmul(q, pos.transpose(-1, -2))  # [B, H, T, K - 1]
        return x + torch.tanh(scores).permute(0, 2, 1, 3).reshape(B, T, -1)


class PassedTable(nn.Module):
    """DeBERTa v1's relative positions: the table's weight handed to every layer (its Embedding
    never called)."""

    def __init__(self, dim=6, positions=4):
        super().__init__()
        self.table = nn.Embedding(positions, dim)
        self.layers = nn.ModuleList([TableLayer(dim), TableLayer(dim)])
        self.head = nn.Linear(dim, 2)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x, rel=self.table.weight)
        return self.head(x)


def passed_table():
    return _regression(PassedTable(), torch.randn(3, 5, 6))


class OutputTable(nn.Module):
    """A language model whose own forward applies its Embedding's weight as the output layer
    (OLMo's ``F.linear(h, self.wte.weight)``): the product read as a Linear tied to the Embedding."""

    def __init__(self, vocab=11, dim=6):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim, padding_idx=0)
        self.norm = nn.LayerNorm(dim)
        self.mid = nn.Linear(dim, dim)

    def forward(self, ids):
        h = self.wte(ids)
        h = h + torch.tanh(self.mid(self.norm(h)))
        return F.linear(h, self.wte.weight)


def output_table():
    ids = torch.randint(0, 11, (4, 5))
    ids[0, :2] = 0
    return _regression(OutputTable(), ids)


class RecurrentStack(nn.Module):
    """A bidirectional batch-first LSTM over a 2-layer seq-first LSTM with a given initial state
    (LSTMs only: torch.func, the reference, cannot vmap GRU's and RNN's forward)."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 5, num_layers=2)
        self.top = nn.LSTM(5, 3, batch_first=True, bidirectional=True)
        self.head = nn.Linear(6, 2)

    def forward(self, x):  # x: [B, T, 4]
        h0 = x[:, 0, :].repeat(1, 2)[:, :5].expand(2, -1, -1).contiguous()
        out, _ = self.lstm(x.transpose(0, 1), (h0, torch.zeros_like(h0)))
        out, _ = self.top(out.transpose(0, 1))
        return self.head(out)


def recurrent():
    return _regression(RecurrentStack(), torch.randn(3, 5, 4))


def custom_module():
    return _regression(nn.Sequential(nn.Linear(4, 6), GatedScale(6), nn.Linear(6, 2)), torch.randn(5, 4))


def reused_module():
    return _regression(ReusedLinear(5), torch.randn(4, 3, 5))


ZOO = {f.__name__: f for f in [linear_2d, linear_3d, linear_4d, conv1d, conv2d, conv3d, conv_deep, conv3d_deep,
                              conv_transpose, embedding, embedding_no_pad, embedding_bags, instance_norms, prelu,
                              bilinear, norms, conv_norms_eval, batchnorm1d_eval, batchnorm3d_eval,
                              attention_batch_first, attention_seq_first,
                              functional_norms, flattened_tokens, inplace_residuals, mixture_of_experts,
                              experts_on_every_token, parametrized, normalised_table, passed_table, output_table,
                              recurrent,
                              custom_module, reused_module, standardised_convs]}

#: Models whose per-sample numbers are a decomposition of the batch gradient, not per-sample
#: gradients (BatchNorm in training mode): the engine's own checks apply, torch.func's do not.
DECOMPOSED = {f.__name__: f for f in [batchnorm_train]}


def add_concatenated_qkv(module: nn.Module, dim: int) -> None:
    """timm's BEiT, EVA and SwinV2 attention layout on ``module``: a bias-free ``qkv`` Linear whose
    weight the module applies itself (the Linear never called), q and v biases of its own and a
    constant zero k bias between them (see ``concatenated_qkv``)."""
    module.qkv = nn.Linear(dim, 3 * dim, bias=False)
    module.q_bias, module.v_bias = nn.Parameter(torch.randn(dim)), nn.Parameter(torch.randn(dim))
    module.register_buffer("k_bias", torch.zeros(dim))


def concatenated_qkv(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, qkv.weight, cat((q_bias, k_bias, v_bias)))`` of a module set up by ``add_concatenated_qkv``."""
    return F.linear(x, module.qkv.weight, torch.cat((module.q_bias, module.k_bias, module.v_bias)))
