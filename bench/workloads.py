"""The reference per-sample-norm workloads of ../shared/BENCHMARKS.md.

Each workload gives a model factory, a batch, the scale ``c`` of its loss
(``L = c * sum_i l_i``) and the per-sample loss, so every method computes the same numbers:
per-sample ``||g_i||^2`` of the unscaled ``l_i``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Workload:
    """One benchmark workload: ``make_model()``, ``make_batch()`` -> (x, y), loss and its scale."""

    name: str
    make_model: Callable[[], nn.Module]
    make_batch: Callable[[torch.device], tuple[torch.Tensor, torch.Tensor]]
    scale: Callable[[torch.Tensor, torch.Tensor], float]  # c for a batch
    token_level: bool = False

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The scaled loss ``c * sum_i l_i`` the user would call backward on (mean reduction)."""
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="mean")

    def sample_loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Unscaled loss of the samples in ``out`` (summed over samples and tokens)."""
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum")


def _mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                         nn.Linear(1024, 10))


def _cnn():
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1, stride=2),
                         nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3136, 10))


class StandardizedConv2d(nn.Conv2d):
    """A weight-standardised convolution as NF-ResNets and NFNets use it (timm's ScaledStdConv2d):
    each output channel's weight normalised to zero mean and unit variance by ``F.batch_norm`` over
    the weight, times a learned gain and ``fan_in ** -0.5``, in the module's own forward."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1))
        self.scale = self.weight[0].numel() ** -0.5

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                              weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0,
                              eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _cnn_ws():
    return nn.Sequential(StandardizedConv2d(1, 32, 3, padding=1), nn.ReLU(),
                         StandardizedConv2d(32, 64, 3, padding=1, stride=2), nn.ReLU(),
                         StandardizedConv2d(64, 64, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3136, 10))


def _nf_bottleneck():
    """NF-ResNet-style stages of weight-standardised convolutions on 32x32 colour images: a strided
    stem, then bottlenecks whose 1x1 convolutions widen to 1024 channels at 8x8 and 4x4 positions,
    where each sample's weight gradient (up to 1024 x 1024) is far larger than its rows."""
    def bottleneck(cin, mid, cout, stride):
        return [StandardizedConv2d(cin, mid, 1), nn.ReLU(), StandardizedConv2d(mid, mid, 3, stride=stride, padding=1),
                nn.ReLU(), StandardizedConv2d(mid, cout, 1), nn.ReLU()]
    return nn.Sequential(StandardizedConv2d(3, 64, 3, stride=2, padding=1), nn.ReLU(),
                         *bottleneck(64, 128, 512, 2), *bottleneck(512, 256, 1024, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1024, 10))


class Block(nn.Module):
    """Pre-norm residual MLP block of the seq workload."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


class SeqModel(nn.Module):
    """Embedding -> n_blocks x Block -> vocabulary head (the seq workloads); ``tied`` shares the
    embedding table with the head's weight, as GPT-2-style language models do."""

    def __init__(self, vocab=1000, dim=256, hidden=1024, n_blocks=2, tied=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.Sequential(*[Block(dim, hidden) for _ in range(n_blocks)])
        self.head = nn.Linear(dim, vocab)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, idx):
        return self.head(self.blocks(self.embed(idx)))


class FunctionalTiedSeqModel(SeqModel):
    """SeqModel whose own forward applies the embedding table as the output layer, with no head
    module (OLMo's ``F.linear(x, self.wte.weight)``): the products the tracker reads with a
    torch-function mode around this forward (divebatch.layers.tied.TableProducts)."""

    def __init__(self, vocab=1000, dim=256, hidden=1024, n_blocks=2):
        super().__init__(vocab, dim, hidden, n_blocks)
        del self.head

    def forward(self, idx):
        return F.linear(self.blocks(self.embed(idx)), self.embed.weight)


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs with BatchNorm, projection shortcut when needed)."""

    def __init__(self, cin, cout, stride, norm=nn.BatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.short(x))


def resnet18(num_classes=1000, norm=nn.BatchNorm2d):
    """ResNet-18 for 224x224 inputs (torchvision does not import beside the CPU torch here);
    ``norm(channels)`` builds each normalisation layer."""
    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), norm(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        layers += [BasicBlock(cin, cout, stride, norm), BasicBlock(cout, cout, 1, norm)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


class EncoderModel(nn.Module):
    """Embedding -> n_layers x nn.TransformerEncoderLayer (nn.MultiheadAttention inside) -> head."""

    def __init__(self, vocab=1000, dim=256, hidden=1024, n_layers=2, heads=4, dropout=0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.Sequential(*[nn.TransformerEncoderLayer(dim, heads, hidden, dropout=dropout, batch_first=True)
                                      for _ in range(n_layers)])
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx):
        return self.head(self.layers(self.embed(idx)))


class PatchViT(nn.Module):
    """A ViT laid out as timm's: patch convolution, class token and position table as parameters of
    the model itself, pre-norm nn.TransformerEncoderLayer blocks, head on the class token."""

    def __init__(self, dim=192, depth=4, heads=3, patch=8, image=64, classes=10):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, (image // patch) ** 2 + 1, dim))
        self.blocks = nn.Sequential(*[nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True,
                                                                 norm_first=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


class GPT2Logits(nn.Module):
    """Hugging Face GPT2LMHeadModel (tied wte/lm_head, Conv1D projections) returning logits, with
    per-sample position ids (the default [1, T] ones are broadcast, see the README's limits)."""

    def __init__(self, vocab=1000, dim=256, n_layer=2, n_head=4, T=128):
        super().__init__()
        import transformers  # only this workload needs it

        config = transformers.GPT2Config(vocab_size=vocab, n_positions=T, n_embd=dim, n_layer=n_layer,
                                         n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                         bos_token_id=0, eos_token_id=0)
        self.lm = transformers.GPT2LMHeadModel(config)

    def forward(self, idx):
        positions = torch.arange(idx.shape[1], device=idx.device).expand(idx.shape[0], -1)
        return self.lm(input_ids=idx, position_ids=positions).logits


class LlamaLogits(nn.Module):
    """Hugging Face LlamaForCausalLM (RMSNorm, grouped-query attention, SiLU MLP, rotary positions,
    untied head) returning logits."""

    def __init__(self, vocab=1000, dim=256, n_layer=2, n_head=4, n_kv_head=2, hidden=688, T=128):
        super().__init__()
        import transformers  # only this workload needs it

        config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=dim, num_hidden_layers=n_layer,
                                          num_attention_heads=n_head, num_key_value_heads=n_kv_head,
                                          intermediate_size=hidden, max_position_embeddings=T)
        self.lm = transformers.LlamaForCausalLM(config)

    def forward(self, idx):
        return self.lm(input_ids=idx).logits


class OPTLogits(nn.Module):
    """Hugging Face OPTForCausalLM (pre-norm; its MLP runs on samples and tokens flattened into
    rows, ``hidden.reshape(-1, d)``; learned positions; tied head) returning logits."""

    def __init__(self, vocab=1000, dim=256, n_layer=2, n_head=4, hidden=1024, T=128):
        super().__init__()
        import transformers  # only this workload needs it

        config = transformers.OPTConfig(vocab_size=vocab, hidden_size=dim, num_hidden_layers=n_layer,
                                        ffn_dim=hidden, num_attention_heads=n_head, max_position_embeddings=T,
                                        word_embed_proj_dim=dim, dropout=0.0, attention_dropout=0.0)
        self.lm = transformers.OPTForCausalLM(config)

    def forward(self, idx):
        return self.lm(input_ids=idx).logits


class MixtralLogits(nn.Module):
    """Hugging Face MixtralForCausalLM (sparse mixture-of-experts MLP: a top-2 router over 4
    experts with 3-D weights, on samples and tokens flattened into rows) returning logits.
    ``experts_implementation``: transformers' ``"grouped_mm"`` (its default), ``"eager"`` or
    ``"batched_mm"``."""

    def __init__(self, vocab=1000, dim=256, n_layer=2, n_head=4, n_kv_head=2, hidden=512, experts=4, T=128,
                 experts_implementation="grouped_mm"):
        super().__init__()
        import transformers  # only this workload needs it

        config = transformers.MixtralConfig(vocab_size=vocab, hidden_size=dim, num_hidden_layers=n_layer,
                                            num_attention_heads=n_head, num_key_value_heads=n_kv_head,
                                            intermediate_size=hidden, num_local_experts=experts,
                                            num_experts_per_tok=2, max_position_embeddings=T)
        config._experts_implementation = experts_implementation
        self.lm = transformers.MixtralForCausalLM(config)

    def forward(self, idx):
        return self.lm(input_ids=idx).logits


class Llama4Logits(nn.Module):
    """Hugging Face Llama4ForCausalLM (text only): every token runs through every expert as
    ``[E, tokens, d]`` blocks scaled by its top-1 router score, plus a shared expert; returning
    logits."""

    def __init__(self, vocab=1000, dim=256, n_layer=2, n_head=4, n_kv_head=2, hidden=512, experts=4, T=128):
        super().__init__()
        import transformers  # only this workload needs it

        config = transformers.Llama4TextConfig(vocab_size=vocab, hidden_size=dim, num_hidden_layers=n_layer,
                                               num_attention_heads=n_head, num_key_value_heads=n_kv_head,
                                               head_dim=dim // n_head, intermediate_size=hidden,
                                               intermediate_size_mlp=hidden, num_local_experts=experts,
                                               num_experts_per_tok=1, max_position_embeddings=T)
        self.lm = transformers.Llama4ForCausalLM(config)

    def forward(self, idx):
        return self.lm(input_ids=idx).logits


class DebertaLogits(nn.Module):
    """A Hugging Face DeBERTa masked LM with relative attention, returning logits; dropout 0, so
    that torch.func can be the reference. ``version=3``: DebertaV2ForMaskedLM with
    microsoft/deberta-v3-*'s layout (2x64 log-bucketed positions, the position table read whole and
    normalised by the encoder's LayerNorm, keys shared with the positions' projections).
    ``version=1``: DebertaForMaskedLM with microsoft/deberta-*'s (2T positions; the table's weight
    handed to every layer, sliced and projected there). No absolute positions in either."""

    def __init__(self, version=3, vocab=1000, dim=256, n_layer=2, n_head=4, hidden=1024, T=128):
        super().__init__()
        import transformers  # only these workloads need it

        sizes = dict(vocab_size=vocab, hidden_size=dim, num_hidden_layers=n_layer, num_attention_heads=n_head,
                     intermediate_size=hidden, max_position_embeddings=T, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, relative_attention=True, max_relative_positions=-1,
                     pos_att_type=["p2c", "c2p"], position_biased_input=False)
        if version == 1:
            self.lm = transformers.DebertaForMaskedLM(transformers.DebertaConfig(**sizes))
        else:
            config = transformers.DebertaV2Config(**sizes, position_buckets=64, norm_rel_ebd="layer_norm",
                                                  share_att_key=True)
            self.lm = transformers.DebertaV2ForMaskedLM(config)

    def forward(self, idx):
        return self.lm(input_ids=idx).logits


class SwinLogits(nn.Module):
    """A Hugging Face Swin image classifier returning logits (dropout 0, so that torch.func can be
    the reference): windows of 4x4 patches folded into the batch dim, shifted every other block."""

    def __init__(self, image=64, classes=10):
        super().__init__()
        import transformers  # only these workloads need it

        config = transformers.SwinConfig(image_size=image, patch_size=4, num_channels=3, embed_dim=48,
                                         depths=[2, 2], num_heads=[3, 6], window_size=4, num_labels=classes,
                                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                         drop_path_rate=0.0)
        self.net = transformers.SwinForImageClassification(config)

    def forward(self, x):
        return self.net(pixel_values=x).logits


class LSTMModel(nn.Module):
    """Embedding(1000, 128) -> 2-layer nn.LSTM(128, 256) -> Linear(256, 1000): a recurrent
    language model (token cross-entropy)."""

    def __init__(self, vocab=1000, dim=128, hidden=256, n_layers=2, cell=nn.LSTM):
        super().__init__()
        self.emb, self.rnn = nn.Embedding(vocab, dim), cell(dim, hidden, num_layers=n_layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, idx):
        return self.head(self.rnn(self.emb(idx))[0])


class PackedLSTMModel(LSTMModel):
    """``LSTMModel`` on sequences of different lengths through ``pack_padded_sequence``: sample b
    keeps ``T - 4 (b % 8)`` tokens (the padding's outputs are zeros, as ``pad_packed_sequence``
    gives them)."""

    def forward(self, idx):
        B, T = idx.shape
        lengths = torch.tensor([T - 4 * (b % 8) for b in range(B)])
        packed = nn.utils.rnn.pack_padded_sequence(self.emb(idx), lengths, batch_first=True, enforce_sorted=False)
        out, _ = nn.utils.rnn.pad_packed_sequence(self.rnn(packed)[0], batch_first=True, total_length=T)
        return self.head(out)


class BagRecommender(nn.Module):
    """A DLRM-style click model: ``features`` sparse features, each a bag of ids pooled by its own
    ``EmbeddingBag(vocab, dim, mode="sum")``, concatenated into an MLP with 2 outputs. Input: ids
    ``[B, features, L]``."""

    def __init__(self, features=8, vocab=10_000, dim=32, hidden=256):
        super().__init__()
        self.tables = nn.ModuleList(nn.EmbeddingBag(vocab, dim, mode="sum") for _ in range(features))
        self.mlp = nn.Sequential(nn.Linear(features * dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 2))

    def forward(self, ids):
        return self.mlp(torch.cat([table(ids[:, f]) for f, table in enumerate(self.tables)], dim=1))


def _bags(batch, features, L, vocab):
    """Ids drawn with a power-law skew (popular ids repeat within and across bags), and click labels."""
    def make(device):
        g = torch.Generator().manual_seed(1)
        ids = (torch.rand(batch, features, L, generator=g) ** 3 * vocab).long()
        return ids.to(device), torch.randint(0, 2, (batch,), generator=g).to(device)
    return make


def _images(batch, shape, memory_format=torch.contiguous_format):
    def make(device):
        g = torch.Generator().manual_seed(1)
        return (torch.randn(batch, *shape, generator=g).to(device).contiguous(memory_format=memory_format),
                torch.randint(0, 10, (batch,), generator=g).to(device))
    return make


def _tokens(batch, T, vocab):
    def make(device):
        g = torch.Generator().manual_seed(1)
        return (torch.randint(0, vocab, (batch, T), generator=g).to(device),
                torch.randint(0, vocab, (batch, T), generator=g).to(device))
    return make


def _timm(name: str, **kwargs):
    """A factory of a randomly initialised timm model (10 classes, no dropout or stochastic depth)."""
    def make():
        try:
            import timm
        except ImportError as err:
            raise RuntimeError("the timm-* workloads need timm, which needs torchvision: it has no build for the "
                               "torch of ./run setup, so use a venv with `pip install torch==2.14.1 "
                               "torchvision==0.29.1 timm` and this tree on PYTHONPATH (see docs/figures.md)") from err
        return timm.create_model(name, pretrained=False, num_classes=10, drop_rate=0.0, drop_path_rate=0.0, **kwargs)
    return make


_SMALL_TIMM_VIT = dict(depth=3, embed_dim=192, num_heads=3)

WORKLOADS = {
    "mlp": Workload("mlp", _mlp, _images(256, (1, 28, 28)), lambda x, y: 1.0 / x.shape[0]),
    "cnn": Workload("cnn", _cnn, _images(128, (1, 28, 28)), lambda x, y: 1.0 / x.shape[0]),
    # Not in BENCHMARKS.md: the cnn workload with weight-standardised convolutions (NF-ResNets'):
    # modules with their own forward, whose weight is computed from their parameters.
    "cnn-ws": Workload("cnn-ws", _cnn_ws, _images(128, (1, 28, 28)), lambda x, y: 1.0 / x.shape[0]),
    "nf-bottleneck": Workload("nf-bottleneck", _nf_bottleneck, _images(32, (3, 32, 32)), lambda x, y: 1.0 / x.shape[0]),
    "seq": Workload("seq", SeqModel, _tokens(16, 128, 1000), lambda x, y: 1.0 / y.numel(), token_level=True),
    # Not in BENCHMARKS.md: seq with the embedding tied to the head (the cross term's cost).
    "seq-tied": Workload("seq-tied", lambda: SeqModel(tied=True), _tokens(16, 128, 1000),
                         lambda x, y: 1.0 / y.numel(), token_level=True),
    # Not in BENCHMARKS.md: seq-tied with the table applied by the model's own forward (no head module).
    "seq-tied-functional": Workload("seq-tied-functional", FunctionalTiedSeqModel, _tokens(16, 128, 1000),
                                    lambda x, y: 1.0 / y.numel(), token_level=True),
    # Not in BENCHMARKS.md: the seq workload's size with nn.TransformerEncoderLayer blocks
    # (dropout 0, so that torch.func can be the reference).
    "transformer": Workload("transformer", EncoderModel, _tokens(16, 128, 1000), lambda x, y: 1.0 / y.numel(),
                            token_level=True),
    # Not in BENCHMARKS.md: a 2-layer Hugging Face GPT-2 of the seq workload's size.
    "gpt2": Workload("gpt2", GPT2Logits, _tokens(16, 128, 1000), lambda x, y: 1.0 / y.numel(), token_level=True),
    # Not in BENCHMARKS.md: a small ViT with timm's layout (tokens on the model: generic route).
    "vit": Workload("vit", PatchViT, _images(32, (3, 64, 64)), lambda x, y: 1.0 / x.shape[0]),
    # Not in BENCHMARKS.md: a 2-layer Hugging Face Llama of the seq workload's size.
    "llama": Workload("llama", LlamaLogits, _tokens(16, 128, 1000), lambda x, y: 1.0 / y.numel(), token_level=True),
    # Not in BENCHMARKS.md: a 2-layer Hugging Face OPT of the seq workload's size (flattened-row MLP).
    "opt": Workload("opt", OPTLogits, _tokens(16, 128, 1000), lambda x, y: 1.0 / y.numel(), token_level=True),
    # Not in BENCHMARKS.md: a 2-layer Hugging Face Mixtral of the seq workload's size (4 experts of
    # 512, top-2; experts and routers on flattened rows).
    "mixtral": Workload("mixtral", MixtralLogits, _tokens(16, 128, 1000), lambda x, y: 1.0 / y.numel(),
                        token_level=True),
    # Not in BENCHMARKS.md: Llama 4's layout at the same size (4 experts of 512, top-1, a shared expert;
    # every token through every expert).
    "llama4": Workload("llama4", Llama4Logits, _tokens(16, 128, 1000), lambda x, y: 1.0 / y.numel(),
                       token_level=True),
    # Not in BENCHMARKS.md: DeBERTa-v3's layout at the same size (relative attention through a table
    # shared by the samples).
    "deberta": Workload("deberta", DebertaLogits, _tokens(16, 128, 1000), lambda x, y: 1.0 / y.numel(),
                        token_level=True),
    # Not in BENCHMARKS.md: DeBERTa v1's layout at the same size (the table handed to every layer).
    "deberta-v1": Workload("deberta-v1", lambda: DebertaLogits(version=1), _tokens(16, 128, 1000),
                           lambda x, y: 1.0 / y.numel(), token_level=True),
    # Not in BENCHMARKS.md: a small Hugging Face Swin (windowed attention) on 64x64 images, batch 32.
    "swin": Workload("swin", SwinLogits, _images(32, (3, 64, 64)), lambda x, y: 1.0 / x.shape[0]),
    # Not in BENCHMARKS.md: recurrent language models (2 layers of 256, batch 16 x 64 tokens).
    "lstm": Workload("lstm", LSTMModel, _tokens(16, 64, 1000), lambda x, y: 1.0 / y.numel(), token_level=True),
    "gru": Workload("gru", lambda: LSTMModel(cell=nn.GRU), _tokens(16, 64, 1000), lambda x, y: 1.0 / y.numel(),
                    token_level=True),
    # The lstm workload with PackedSequence inputs of 36-64 tokens.
    "lstm-packed": Workload("lstm-packed", PackedLSTMModel, _tokens(16, 64, 1000), lambda x, y: 1.0 / y.numel(),
                            token_level=True),
    # Not in BENCHMARKS.md: ResNet-18 with GroupNorm (per-sample gradients are defined, as DP
    # training needs) at a CPU-sized 112x112, batch 16: its deep layers have 512 channels at 4x4.
    "resnet": Workload("resnet", lambda: resnet18(10, lambda c: nn.GroupNorm(32, c)), _images(16, (3, 112, 112)),
                       lambda x, y: 1.0 / x.shape[0]),
    # Not in BENCHMARKS.md: timm image models at 224x224, batch 8, cut to 3 blocks of width 192 (ViT,
    # and BEiT: relative-position tables gathered into SDPA's mask, q/v biases concatenated into the
    # qkv Linear's bias) or to Swin-T's layout at width 48 (window attention with its own tables).
    "timm-vit": Workload("timm-vit", _timm("vit_small_patch16_224", **_SMALL_TIMM_VIT), _images(8, (3, 224, 224)),
                         lambda x, y: 1.0 / x.shape[0]),
    "timm-beit": Workload("timm-beit", _timm("beit_base_patch16_224", **_SMALL_TIMM_VIT), _images(8, (3, 224, 224)),
                          lambda x, y: 1.0 / x.shape[0]),
    "timm-swin": Workload("timm-swin", _timm("swin_tiny_patch4_window7_224", embed_dim=48, depths=(2, 2, 2, 2),
                                             num_heads=(2, 2, 4, 4)), _images(8, (3, 224, 224)),
                          lambda x, y: 1.0 / x.shape[0]),
    # timm's ResNet-50 (bottlenecks of 1x1 convolutions) in eval mode, where its BatchNorm layers use
    # their running statistics and every sample's gradient is its own; 128x128, batch 16.
    "timm-resnet50": Workload("timm-resnet50", lambda: _timm("resnet50")().eval(), _images(16, (3, 128, 128)),
                              lambda x, y: 1.0 / x.shape[0]),
    # timm's NF-ResNet-26 (ScaledStdConv2d everywhere: layers/standardised.py), 64x64, batch 16.
    "timm-nf-resnet26": Workload("timm-nf-resnet26", _timm("nf_resnet26"), _images(16, (3, 64, 64)),
                                 lambda x, y: 1.0 / x.shape[0]),
    # Not in BENCHMARKS.md: a recommender's sparse features, 8 EmbeddingBag tables of 10,000 x 32
    # (bags of 20 ids, sum) into an MLP, batch 256, click labels.
    "dlrm": Workload("dlrm", BagRecommender, _bags(256, 8, 20, 10_000), lambda x, y: 1.0 / x.shape[0]),
    # GPU only (bf16 there): a large transformer-MLP stack and ResNet-18-sized convolutions.
    "seq-large": Workload("seq-large", lambda: SeqModel(32000, 4096, 16384, 2), _tokens(8, 2048, 32000),
                          lambda x, y: 1.0 / y.numel(), token_level=True),
    # GroupNorm, as in "resnet" (and Opacus' ModuleValidator): BatchNorm in training mode couples the
    # samples, so no per-sample gradient exists for torch.func to check against.
    "conv-large": Workload("conv-large", lambda: resnet18(1000, lambda c: nn.GroupNorm(32, c)),
                           _images(64, (3, 224, 224)), lambda x, y: 1.0 / x.shape[0]),
    # Not in BENCHMARKS.md: conv-large in channels-last memory (model and input), the layout GPU
    # convolutions prefer, where the implicit convolution kernels load their patches as vectors.
    "conv-large-cl": Workload(
        "conv-large-cl", lambda: resnet18(1000, lambda c: nn.GroupNorm(32, c)).to(memory_format=torch.channels_last),
        _images(64, (3, 224, 224), torch.channels_last), lambda x, y: 1.0 / x.shape[0]),
}
