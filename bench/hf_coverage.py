"""Which Hugging Face architectures divebatch tracks exactly, replays or refuses.

For each architecture: a tiny randomly initialised model (2 layers, width 32, vocabulary 97, no
dropout), one tracked backward of a summed token cross-entropy on 3 sequences of 8 tokens, and
the per-sample norms against torch.func. Causal and masked LMs get per-sample position ids where
their forward takes them (``position_ids=arange(T).expand(B, T)``), else their defaults;
encoder-decoder models get the tokens on both sides. Prints a Markdown table.

    python bench/hf_coverage.py --out bench/results/hf_coverage.md
    python bench/hf_coverage.py llama gemma t5          # some architectures only

``--padded`` checks the way a fine-tuning loop calls the model instead: sequences of 8, 5 and 3
tokens padded to 8, ``model(input_ids, attention_mask=..., labels=...)`` with ``-100`` labels on
the padding, and the model's own loss (a mean over the labelled tokens, so ``loss_reduction`` is
``1 / n_labelled``). ``--dropout P`` trains with every dropout of the config at ``P``. Both take
as reference the per-sample gradients of the tracked forward itself (a backward of each sample's
summed token loss over the same logits, seeded alike), which holds for any random draws.

    python bench/hf_coverage.py --padded --dropout 0.1 --out bench/results/hf_coverage_padded.md

``--square`` runs the default check on 4 sequences of 4 tokens: there no layer's input shape tells
``[B, T, d]`` from ``[T, B, d]`` (Longformer's attention transposes to the latter in its own code).

    python bench/hf_coverage.py --square --out bench/results/hf_coverage_square.md

``--vision`` checks image classifiers (``AutoModelForImageClassification``, 3 images of 32x32,
the model's own ``labels=`` loss, dropout and stochastic depth at ``--dropout``) the same way; their BatchNorm layers run
in eval mode, where a sample's gradient is defined (in training mode divebatch gives the batch
decomposition the README describes).

    python bench/hf_coverage.py --vision --dropout 0.1 --out bench/results/hf_coverage_vision.md

``--choices`` checks the masked-LM architectures' multiple-choice heads
(``AutoModelForMultipleChoice``: 3 questions of 4 padded choices of 6 tokens, merged into 12 rows
by the model) the same way, one norm per question.

    python bench/hf_coverage.py --choices --dropout 0.1 --out bench/results/hf_coverage_choices.md

``--autocast`` runs ``--padded`` or ``--vision`` forwards (the tracked one and the reference's) under
``torch.autocast("cpu", dtype=torch.bfloat16)``; "exact" then means within 2e-2 of the reference,
whose autograd gradients are themselves bfloat16 products.

    python bench/hf_coverage.py --padded --autocast --out bench/results/hf_coverage_autocast.md

``--compile`` runs the tracked forward through ``torch.compile`` (backend ``aot_eager`` unless
``--compile-backend`` names another: dynamo's graph breaks and AOTAutograd's compiled backward, which are what the tracker's
hooks meet, without inductor's minutes of C++ compilation for 66 models); the reference runs
eagerly.

    python bench/hf_coverage.py --compile --out bench/results/hf_coverage_compile.md
"""

from __future__ import annotations

import argparse
import collections
import contextlib
from functools import partial
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import transformers
from divebatch import GradNormTracker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.oracle import reference_norms, rel_err, same_forward_norms  # noqa: E402

TINY = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=48, max_position_embeddings=32, n_embd=32, n_layer=2, n_head=4, d_model=32,
            encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=48, decoder_ffn_dim=48, num_layers=2, num_heads=4, d_ff=48, d_kv=8, ffn_dim=48,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, dropout=0.0, attention_dropout=0.0,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, hidden_dropout=0.0, activation_dropout=0.0,
            head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=0,
            embedding_size=32, word_embed_proj_dim=32, rotary_dim=8, dropout_rate=0.0, classifier_dropout=0.0,
            decoder_vocab_size=97)
DROPOUTS = [key for key in TINY if "drop" in key]
CAUSAL = ["gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "phi3", "gpt_neox", "opt",
          "bloom", "gptj", "stablelm", "olmo", "olmo2", "cohere", "starcoder2", "granite", "smollm3", "mixtral",
          "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "phimoe", "gemma3_text", "mpt", "codegen", "xglm",
          "mamba", "deepseek_v2", "deepseek_v3", "glm4_moe", "dots1", "ernie4_5_moe", "minimax", "exaone_moe",
          "flex_olmo", "hunyuan_v1_moe", "llama4_text", "jetmoe", "afmoe", "cohere2_moe", "granitemoeshared",
          "granitemoe_swa", "minimax_m2", "sarvam_moe", "solar_open", "glm4_moe_lite"]
MASKED = ["bert", "roberta", "distilbert", "albert", "electra", "mobilebert", "modernbert", "xlm-roberta", "roformer",
          "deberta-v2", "deberta", "mpnet", "xlm", "longformer"]
SEQ2SEQ = ["t5", "bart", "mbart", "pegasus", "marian"]


# DeepSeek-style mixtures of experts: latent attention sizes that fit TINY, 4 routed experts in one
# group, the first layer dense and the second a mixture.
_DEEPSEEK = dict(n_routed_experts=4, moe_intermediate_size=16, n_shared_experts=1, first_k_dense_replace=1, n_group=1,
                 topk_group=1, num_experts_per_tok=2)
# (Latent attention has as many key/value heads as query heads: the eager and masked SDPA paths
# repeat the keys by num_attention_heads / num_key_value_heads.)
_LATENT = dict(q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, head_dim=4, v_head_dim=8, qk_nope_head_dim=4,
               num_key_value_heads=4)
EXTRA = {"deepseek_v2": {**_DEEPSEEK, **_LATENT}, "deepseek_v3": {**_DEEPSEEK, **_LATENT}, "glm4_moe": _DEEPSEEK, "glm4_moe_lite": {**_DEEPSEEK, **_LATENT},
         "dots1": _DEEPSEEK, "hunyuan_v1_moe": dict(num_experts=4, moe_topk=2),
         "llama4_text": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size_mlp=48),
         # microsoft/deberta-v3-*'s layout (model type deberta-v2), and DeBERTa v1's relative attention.
         "deberta-v2": dict(relative_attention=True, position_buckets=4, max_relative_positions=-1,
                            norm_rel_ebd="layer_norm", share_att_key=True, pos_att_type=["p2c", "c2p"],
                            position_biased_input=False),
         "deberta": dict(relative_attention=True, max_relative_positions=-1, pos_att_type=["p2c", "c2p"],
                         position_biased_input=False),
         # (Its attention works on [T, B, d] in its own code; windows of 4 tokens.)
         "longformer": dict(attention_window=[4, 4])}


def tiny_model(name: str) -> nn.Module:
    config = transformers.AutoConfig.for_model(name)
    for key, value in TINY.items():
        if hasattr(config, key):
            setattr(config, key, value)
    for key, value in EXTRA.get(name, {}).items():  # set even where the config class has no default (DeBERTa's)
        setattr(config, key, value)
    auto = (transformers.AutoModelForSeq2SeqLM if name in SEQ2SEQ else
            transformers.AutoModelForMaskedLM if name in MASKED else transformers.AutoModelForCausalLM)
    return auto.from_config(config).train()


class Logits(nn.Module):
    def __init__(self, net: nn.Module, mode: str):
        super().__init__()
        self.net, self.mode = net, mode

    def forward(self, tokens):
        if self.mode == "seq2seq":
            return self.net(input_ids=tokens, decoder_input_ids=tokens).logits
        if self.mode == "positions":
            positions = torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1)
            return self.net(input_ids=tokens, position_ids=positions).logits
        return self.net(input_ids=tokens).logits


def token_loss(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.reshape(-1), reduction="sum")


def built(name: str):
    """``(tiny_model(name), None)``, or ``(None, row)`` with the table's row where it cannot be built."""
    torch.manual_seed(0)
    try:
        return tiny_model(name), None
    except Exception as err:  # noqa: BLE001 - a config this script cannot shrink
        return None, {"arch": name, "result": "not built", "detail": f"{type(err).__name__}: {str(err)[:120]}"}


#: (sequences, tokens) of the default check's batch; ``--square``: as many tokens as sequences.
SHAPE = (3, 8)


def check(name: str) -> dict:
    net, row = built(name)
    if net is None:
        return row
    tokens, targets = torch.randint(3, 97, SHAPE), torch.randint(3, 97, SHAPE)
    modes = ["seq2seq"] if name in SEQ2SEQ else ["positions", "default"]
    row = {}
    for mode in modes:
        model = Logits(net, mode)
        try:
            with GradNormTracker(model, "sum") as tracker:
                torch.manual_seed(1)  # the same draws as same_forward_norms (PhiMoE's router jitter)
                token_loss(_compiled(model)(tokens), targets).backward()
                stats = tracker.collect()
                plans = tracker.plan()
        except TypeError as err:  # e.g. a forward that takes no position_ids
            row = {"arch": name, "result": "refused", "detail": f"TypeError: {str(err)[:160]}"}
            net.zero_grad()
            continue
        except (ValueError, RuntimeError) as err:
            row = {"arch": name, "result": "refused", "detail": f"{type(err).__name__}: {str(err)[:160]}"}
            net.zero_grad()
            continue
        net.zero_grad()
        routes = collections.Counter(plan.route for plan in plans)
        replayed = sorted({type(model.get_submodule(p.module)).__name__ for p in plans if p.route == "generic (vmap vjp)"})
        try:
            per_sample, _, _ = reference_norms(model, token_loss, tokens, targets)
            err = f"{rel_err(stats.per_sample, per_sample):.1e}"
            result = "exact"
        except Exception as ref_err:  # noqa: BLE001 - torch.func cannot run some attention code
            if "random" not in str(ref_err):
                err = f"no torch.func reference ({type(ref_err).__name__})"
                result = "tracked, unchecked"
            else:  # the model draws random numbers: per-sample backwards over the tracked forward's draws
                err = f"{rel_err(stats.per_sample, same_forward_norms(model, token_loss, tokens, targets, 1)):.1e}"
                err += " (same-forward reference: it draws random numbers)"
                result = "exact"
        if replayed:
            result += ", replays " + ", ".join(replayed)
        return {"arch": name, "result": result,
                "detail": f"{mode}; err {err}; " + ", ".join(f"{k} {v}" for k, v in sorted(routes.items()))}
    return row


def padded_batch(name: str):
    """Token ids [3, 8] with padded tails (lengths 8, 5, 3), the attention mask, and labels with
    -100 on the padding (and on the first token of a sequence-to-sequence target, as if cut)."""
    tokens = torch.randint(3, 97, (3, 8))
    mask = torch.ones_like(tokens)
    mask[1, 5:] = mask[2, 3:] = 0
    tokens = tokens.masked_fill(mask == 0, TINY["pad_token_id"])
    labels = tokens.masked_fill(mask == 0, -100)
    return tokens, mask, labels


def sample_token_losses(name: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B]: each sample's summed token loss, as transformers' loss counts them (causal LMs
    predict the next token; masked and sequence-to-sequence LMs the labelled ones)."""
    if name in CAUSAL:
        logits, labels = logits[:, :-1], labels[:, 1:]
    losses = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                             ignore_index=-100, reduction="none")
    return losses.view(labels.shape[0], -1).sum(1)


def check_padded(name: str) -> dict:
    """A padded batch through the model's own ``labels=`` loss (see the module docstring)."""
    net, row = built(name)
    if net is None:
        return row
    tokens, mask, labels = padded_batch(name)
    inputs = dict(input_ids=tokens, attention_mask=mask)
    if name in SEQ2SEQ:
        inputs["decoder_input_ids"] = tokens
    labelled = int((labels[:, 1:] if name in CAUSAL else labels).ne(-100).sum())
    try:
        with _precision():
            net(**inputs)  # the model itself (a tiny config that does not fit the mask fails here)
    except Exception as err:  # noqa: BLE001
        return {"arch": name, "result": "not run", "detail": f"the model fails alone: {type(err).__name__}: "
                                                             f"{str(err)[:120]}"}
    net.zero_grad()
    stats, plans, refused = _own_loss_tracked(name, net, 1.0 / labelled, dict(inputs, labels=labels))
    if refused is not None:
        return refused
    net.zero_grad()
    torch.manual_seed(1)
    with _precision():
        logits = net(**inputs).logits
    return _compared(net, stats, plans, sample_token_losses(name, logits.float(), labels))


#: The forwards' precision (``--autocast``): None, or the dtype of a CPU autocast around each forward.
AUTOCAST: torch.dtype | None = None


def _precision():
    """The context the forwards run in (see ``AUTOCAST``)."""
    return torch.autocast("cpu", dtype=AUTOCAST) if AUTOCAST is not None else contextlib.nullcontext()


#: The ``torch.compile`` backend of the tracked forwards (``--compile``), or None: eager.
COMPILE: str | None = None


def _compiled(model: nn.Module):
    """``model``, or ``torch.compile(model)`` under ``--compile`` (dynamo's caches reset first: 66
    architectures calling one wrapper's forward would pass its recompile limit and run eagerly)."""
    if COMPILE is None:
        return model
    torch._dynamo.reset()
    return torch.compile(model, backend=COMPILE)


def _own_loss_tracked(name: str, net, loss_reduction, inputs: dict):
    """One tracked backward of ``net(**inputs).loss``, seeded as the reference's forward:
    ``(stats, plans, None)``, or ``(None, None, row)`` with the table's row where it is refused."""
    try:
        with GradNormTracker(net, loss_reduction) as tracker:
            torch.manual_seed(1)
            with _precision():
                loss = _compiled(net)(**inputs).loss
            loss.float().backward()
            return tracker.collect(), tracker.plan(), None
    except (ValueError, RuntimeError, TypeError) as err:
        return None, None, {"arch": name, "result": "refused", "detail": f"{type(err).__name__}: {str(err)[:160]}"}


VISION = ["vit", "beit", "data2vec-vision", "vit_msn", "dinov2", "convnext", "convnextv2", "focalnet", "swin",
          "swinv2", "resnet", "regnet", "mobilenet_v2", "efficientnet"]
VISION_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=32,
                   patch_size=8, num_channels=3, hidden_sizes=[8, 16], depths=[2, 2], embed_dim=16, num_heads=[2, 2],
                   window_size=2, embedding_size=8, num_labels=3)


def check_choices(name: str) -> dict:
    """A multiple-choice head through its own ``labels=`` loss (see the module docstring)."""
    torch.manual_seed(0)
    try:
        config = transformers.AutoConfig.for_model(name)
        for key, value in {**TINY, **EXTRA.get(name, {})}.items():
            if hasattr(config, key) or key in EXTRA.get(name, {}):
                setattr(config, key, value)
        config.pooler_hidden_size = config.hidden_size  # (DeBERTa's pooler: its default is not TINY's)
        net = transformers.AutoModelForMultipleChoice.from_config(config).train()
    except Exception as err:  # noqa: BLE001 - an architecture without such a head, or a config it cannot shrink to
        return {"arch": name, "result": "not built", "detail": f"{type(err).__name__}: {str(err)[:120]}"}
    ids = torch.randint(3, 97, (3, 4, 6))
    mask = torch.ones_like(ids)
    mask[1, :, 4:] = mask[2, 2, 3:] = 0
    labels = torch.tensor([0, 3, 1])
    stats, plans, refused = _own_loss_tracked(name, net, "mean", dict(input_ids=ids, attention_mask=mask, labels=labels))
    if refused is not None:
        return refused
    net.zero_grad()
    torch.manual_seed(1)
    losses = F.cross_entropy(net(input_ids=ids, attention_mask=mask).logits.float(), labels, reduction="none")
    return _compared(net, stats, plans, losses)


def check_vision(name: str, dropout: float) -> dict:
    """An image classifier through its own ``labels=`` loss (see the module docstring)."""
    torch.manual_seed(0)
    try:
        config = transformers.AutoConfig.for_model(name)
        for key, value in VISION_TINY.items():
            if hasattr(config, key):
                setattr(config, key, value)
        for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout_rate", "classifier_dropout_prob",
                    "drop_path_rate"):  # (stochastic depth: one draw per sample)
            if hasattr(config, key):
                setattr(config, key, dropout)
        net = transformers.AutoModelForImageClassification.from_config(config).train()
    except Exception as err:  # noqa: BLE001 - a config this script cannot shrink
        return {"arch": name, "result": "not built", "detail": f"{type(err).__name__}: {str(err)[:120]}"}
    batch_norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in batch_norms:
        m.eval()
    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 2, 1])
    stats, plans, refused = _own_loss_tracked(name, net, "mean", dict(pixel_values=images, labels=labels))
    if refused is not None:
        return refused
    net.zero_grad()
    torch.manual_seed(1)
    with _precision():
        logits = net(pixel_values=images).logits
    losses = F.cross_entropy(logits.float(), labels, reduction="none")
    detail = f"{len(batch_norms)} BatchNorm in eval mode; " if batch_norms else ""
    return _compared(net, stats, plans, losses, detail)


def _compared(net, stats, plans, losses: torch.Tensor, detail: str = "") -> dict:
    """The table row: ``stats.per_sample`` against each sample's loss ``losses[b]`` backpropagated
    through the same forward, and the routes taken."""
    params = [p for p in net.parameters() if p.requires_grad]
    reference = torch.stack([
        sum(g.double().square().sum() for g in torch.autograd.grad(
            losses[b], params, retain_graph=True, allow_unused=True, materialize_grads=True))
        for b in range(losses.shape[0])])
    routes = collections.Counter(plan.route for plan in plans)
    replayed = sorted({type(net.get_submodule(p.module)).__name__ for p in plans if p.route == "generic (vmap vjp)"})
    err = rel_err(stats.per_sample, reference)
    result = ("exact" if err <= (2e-2 if AUTOCAST is not None else 1e-4) else "WRONG") + (
        ", replays " + ", ".join(replayed) if replayed else "")
    return {"result": result,
            "detail": f"{detail}err {err:.1e}; " + ", ".join(f"{k} {v}" for k, v in sorted(routes.items()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("archs", nargs="*", help="model types (default: a list of popular ones)")
    parser.add_argument("--out", help="write the Markdown table here too")
    parser.add_argument("--padded", action="store_true",
                        help="padded sequences, attention mask and the model's own labels= loss")
    parser.add_argument("--vision", action="store_true",
                        help="image classifiers through their own labels= loss")
    parser.add_argument("--choices", action="store_true",
                        help="multiple-choice heads of the masked LMs through their own labels= loss")
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="every dropout probability of the config (with --padded or --vision)")
    parser.add_argument("--autocast", action="store_true",
                        help="forwards under CPU autocast to bfloat16 (with --padded or --vision)")
    parser.add_argument("--compile", action="store_true",
                        help="the tracked forward through torch.compile (not with --vision or --choices)")
    parser.add_argument("--compile-backend", default="aot_eager", help="torch.compile's backend (default aot_eager)")
    parser.add_argument("--square", action="store_true",
                        help="the default check on 4 sequences of 4 tokens: where no layer's input shape tells "
                             "[B, T, d] from [T, B, d]")
    args = parser.parse_args()
    if args.square and (args.padded or args.vision or args.choices):
        parser.error("--square is for the default check")
    global SHAPE
    SHAPE = (4, 4) if args.square else SHAPE
    if args.compile and (args.vision or args.choices):
        parser.error("--compile is for the default and --padded checks")
    global COMPILE
    COMPILE = args.compile_backend if args.compile else None
    if args.autocast and not (args.padded or args.vision):
        parser.error("--autocast needs --padded or --vision (their reference is the tracked forward's own)")
    global AUTOCAST
    AUTOCAST = torch.bfloat16 if args.autocast else None
    if args.dropout and not (args.padded or args.vision or args.choices):
        parser.error("--dropout needs --padded, --vision or --choices (their reference is the tracked forward's "
                     "own draws)")
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    for key in DROPOUTS:
        TINY[key] = args.dropout
    setting = "; CPU autocast to bfloat16" if args.autocast else ""
    setting += f"; tracked forward through torch.compile (backend {COMPILE})" if args.compile else ""
    setting += "; 4 sequences of 4 tokens (T = B)" if args.square else ""
    setting += (f"; padded batch, the model's own loss, dropout {args.dropout}" if args.padded else
               f"; image classifiers, the model's own loss, dropout {args.dropout}" if args.vision else
               f"; multiple-choice heads, the model's own loss, dropout {args.dropout}" if args.choices else "")
    lines = [f"transformers {transformers.__version__}, torch {torch.__version__}{setting}", "",
             "| architecture | result | detail |", "|---|---|---|"]
    names = args.archs or (VISION if args.vision else MASKED if args.choices else CAUSAL + MASKED + SEQ2SEQ)
    check_one = (partial(check_vision, dropout=args.dropout) if args.vision else check_choices if args.choices
                 else check_padded if args.padded else check)
    write_table(lines, names, check_one, args.out)


def write_table(lines: list[str], names, check_one, out: str | None) -> None:
    """Print the header ``lines``, then one row per name as it is checked (``check_one(name)``
    returns ``{"result", "detail"}``); write the whole table to ``out`` too if given."""
    print("\n".join(lines), flush=True)
    for name in names:
        row = check_one(name)
        line = f"| {name} | {row['result']} | {row['detail'].replace('|', '/')} |"
        print(line, flush=True)
        lines.append(line)
    if out:
        Path(out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
