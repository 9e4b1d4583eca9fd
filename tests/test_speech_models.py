"""Hugging Face speech encoders (tiny, random): wav2vec2-style models have a positional convolution
with ``parametrizations.weight_norm`` (a parametrized tensor, see test_parametrizations.py);
WavLM adds a relative-position bias table; the Conformer projects relative position embeddings
with a Linear on a ``[1, 2T-1, d]`` input shared by the samples, met by the queries through a
broadcasting ``matmul``. Per-sample norms against torch.func (per-sample autograd where its
transforms cannot run the model)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from .oracle import tracked_and_checked

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, conv_dim=(8, 8),
            conv_stride=(5, 2), conv_kernel=(10, 3), num_feat_extract_layers=2, num_conv_pos_embeddings=4,
            num_conv_pos_embedding_groups=2, vocab_size=12, final_dropout=0.0, hidden_dropout=0.0,
            attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0,
            conv_depthwise_kernel_size=3, num_buckets=8, max_bucket_distance=16)


class CTCLogits(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, audio):
        return self.net(input_values=audio).logits


def frame_loss(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum")


@pytest.mark.parametrize("arch", ["wav2vec2", "hubert", "wavlm", "wav2vec2-conformer"])
def test_speech_encoders_match_torch_func(arch):
    config = transformers.AutoConfig.for_model(arch)
    for key, value in TINY.items():
        if hasattr(config, key):
            setattr(config, key, value)
    torch.manual_seed(0)
    net = transformers.AutoModelForCTC.from_config(config)
    # The Conformer's convolution module has a BatchNorm: in training mode it mixes the samples
    # (divebatch gives the decomposition the README describes, not per-sample gradients).
    model = CTCLogits(net.train(arch != "wav2vec2-conformer"))
    audio = torch.randn(3, 400)
    with torch.no_grad():
        frames = model(audio).shape[1]
    routes = tracked_and_checked(model, frame_loss, audio, torch.randint(0, 12, (3, frames)), fused=True)
    if arch == "wav2vec2-conformer":  # the Linear on the shared positions keeps its own route
        assert routes["net.wav2vec2_conformer.encoder.layers.0.self_attn.linear_pos"] in ("ghost", "instantiate")
    else:
        # (the weight-normed positional convolution: its product with the input, no replay)
        assert routes[f"net.{arch}.encoder.pos_conv_embed.conv"] == "generic (computed weights)"
