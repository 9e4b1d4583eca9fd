"""Every model type of one of Hugging Face ``transformers``' auto mappings, built tiny from its
default config, its per-sample norms checked against each sample's own backward.

``bench/hf_coverage.py`` keeps a curated list at a fixed shape; this sweep takes whatever the
installed ``transformers`` registers (196 causal-LM, 51 masked-LM and 127 sequence-classification
types in 5.24), each in a process of its own with a time limit, so that a model that hangs or
crashes its interpreter costs only its own line. Per type: ``AutoConfig.for_model(type)`` with
every field of ``SHRINK`` the config has set (width 16, 2 layers, vocabulary 97, ...) and every
dropout at 0; then the stats of a second tracked backward (unverified, so that the accounting
check cannot hide a misread use: ``tests/oracle.py``'s ``second_backward_stats``) against one
backward per sample (``each_sample_backward``), relative error at most 1e-4.

Results per type: ``exact``; ``WRONG`` (what this sweep exists to find); ``refused`` (divebatch
raised, naming why); ``skipped`` where no reference is meaningful: the model is over 3M
parameters, fails on its own (a config field the shrink broke), or gives other gradients on a
second run (random draws divebatch's reference cannot repeat); ``timeout``/``crashed``.

    python bench/hf_sweep.py --mapping causal --out bench/results/hf_sweep_causal.md
    python bench/hf_sweep.py --mapping masked --batch 4 --length 4     # T = B: no shape tells the layout
    python bench/hf_sweep.py --mapping causal llama gpt2               # some types only

A mapping takes ~25 minutes of one core here (2 cores: ``--jobs 2`` halves it when nothing else runs).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Config fields set where the config has them.
SHRINK = dict(hidden_size=16, d_model=16, n_embd=16, embed_dim=16, num_hidden_layers=2, n_layer=2, num_layers=2,
              num_attention_heads=2, n_head=2, num_heads=2, num_key_value_heads=1, intermediate_size=24,
              ffn_dim=24, d_ff=24, vocab_size=97, head_dim=8, num_experts=3, num_local_experts=3,
              n_routed_experts=3, num_experts_per_tok=2, moe_topk=2, pad_token_id=0, bos_token_id=1,
              eos_token_id=1, use_cache=False, max_position_embeddings=64, num_labels=3)
MAPPINGS = {"causal": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "masked": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
            "seq-cls": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"}
AUTO = {"causal": "AutoModelForCausalLM", "masked": "AutoModelForMaskedLM",
        "seq-cls": "AutoModelForSequenceClassification"}
MAX_PARAMETERS = 3_000_000


def model_types(mapping: str) -> list[str]:
    from transformers.models.auto import modeling_auto
    return list(getattr(modeling_auto, MAPPINGS[mapping]))


def check_one(model_type: str, mapping: str, batch: int, length: int) -> dict:
    """The result for one model type (run in a process of its own by ``main``)."""
    import torch
    import torch.nn.functional as F
    import transformers

    sys.path.insert(0, str(ROOT))
    from tests.oracle import each_sample_backward, rel_err, second_backward_stats

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    try:
        config = transformers.AutoConfig.for_model(model_type)
        for key, value in SHRINK.items():
            try:
                if hasattr(config, key):
                    setattr(config, key, value)
            except NotImplementedError:  # (XLNet's max_position_embeddings: it has no limit)
                pass
        for key in list(vars(config)):
            if "dropout" in key or key.endswith("_pdrop"):
                setattr(config, key, 0.0)
        auto = getattr(transformers, AUTO[mapping])
        with torch.device("meta"):  # (counted before it is built: parts the shrink misses may be large)
            size = sum(p.numel() for p in auto.from_config(config).parameters())
        if size > MAX_PARAMETERS:
            return {"result": "skipped", "detail": f"over 3M parameters ({size / 1e6:.0f}M)"}
        torch.manual_seed(0)
        net = auto.from_config(config).train()
    except Exception as err:  # noqa: BLE001 - a config the shrink cannot build
        return {"result": "skipped", "detail": f"not built: {type(err).__name__}: {str(err)[:100]}"}
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (batch, length), generator=gen)
    if mapping == "seq-cls":
        targets = torch.randint(0, 3, (batch,), generator=gen)
    else:
        targets = torch.randint(3, 97, (batch, length), generator=gen)

    def forward(x):
        return net(input_ids=x).logits

    def loss(out, y):
        return F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.reshape(-1), reduction="sum")

    try:
        reference = each_sample_backward(net, loss, forward, ids, targets)
        again = each_sample_backward(net, loss, forward, ids, targets)
    except Exception as err:  # noqa: BLE001 - the model fails on its own
        return {"result": "skipped", "detail": f"fails alone: {type(err).__name__}: {str(err)[:100]}"}
    if rel_err(again, reference) > 1e-6:
        return {"result": "skipped", "detail": "not deterministic"}
    try:
        stats = second_backward_stats(net, loss, forward, ids, targets)
    except Exception as err:  # noqa: BLE001 - divebatch refused it
        return {"result": "refused", "detail": f"{type(err).__name__}: {str(err)[:160]}"}
    error = rel_err(stats.per_sample, reference)
    return {"result": "exact" if error <= 1e-4 else "WRONG", "detail": f"err {error:.1e}"}


def run_one(model_type: str, args) -> dict:
    command = [sys.executable, __file__, "--one", model_type, "--mapping", args.mapping,
               "--batch", str(args.batch), "--length", str(args.length)]
    start = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"type": model_type, "result": "timeout", "detail": f"over {args.timeout} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        detail = (f"killed by signal {-done.returncode} (9: out of memory?)" if done.returncode < 0 else
                  (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1][:160])
        return {"type": model_type, "result": "crashed", "detail": detail}
    row = json.loads(lines[-1])
    row["type"], row["seconds"] = model_type, round(time.monotonic() - start, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("types", nargs="*", help="model types (default: every type of the mapping)")
    parser.add_argument("--mapping", choices=sorted(MAPPINGS), default="causal")
    parser.add_argument("--batch", type=int, default=3, help="sequences per batch (B)")
    parser.add_argument("--length", type=int, default=8, help="tokens per sequence (T)")
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds per model type")
    parser.add_argument("--jobs", type=int, default=1, help="model types checked at once")
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown table here too")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # (the per-type child process)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(check_one(args.one, args.mapping, args.batch, args.length)), flush=True)
        return
    types = args.types or model_types(args.mapping)
    import torch
    import transformers
    lines = [f"transformers {transformers.__version__}, torch {torch.__version__}; {AUTO[args.mapping]}, "
             f"{args.batch} sequences of {args.length} tokens", "", "| model type | result | detail |", "|---|---|---|"]
    print("\n".join(lines), flush=True)
    counts: dict[str, int] = {}
    with ThreadPoolExecutor(args.jobs) as pool:
        for row in pool.map(lambda t: run_one(t, args), types):
            counts[row["result"]] = counts.get(row["result"], 0) + 1
            detail = " ".join(row["detail"].replace("|", "/").split())
            line = f"| {row['type']} | {row['result']} | {detail} |"
            print(line, flush=True)
            lines.append(line)
    summary = ", ".join(f"{n} {result}" for result, n in sorted(counts.items()))
    lines += ["", f"{len(types)} types: {summary}"]
    print(lines[-1])
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
