"""A Hugging Face BERT masked-LM training step on CPU, fp32, with and without mmfast's patch.

    python benchmarks/bench_hf_mlm.py [--batch 16] [--seq 512] [--masked 0.15] [--repeats 2]

The model is BERT-base shaped (transformers' BertConfig defaults: 12 layers, hidden 768, V = 30522),
randomly initialised; the batch is 16 × 512 tokens (T = 8192) with 15% of the positions masked. A
step is forward, backward and AdamW's update. Implementations:
  hf       the model's own forward: the head projects all T positions, (T, V) logits
  mmfast   the same model after mmfast.integrations.transformers.apply_mmfast: the head runs on
           the masked rows only, and mmfast.linear_cross_entropy never forms their logits
Each runs in fresh processes (harness.py): the median step time, and the growth of the peak RSS
over one step once the optimizer's state exists (so the same weights, gradients and state are
resident before the step in both).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import harness  # noqa: E402

IMPLS = ("hf", "mmfast")
VOCAB = 30522  # BertConfig's default


def make_step(impl: str, batch: int, seq: int, masked: float, small: bool):
    """small: a one-layer, 64-wide BERT on 2 × 32 tokens (warms up the code paths)."""
    import transformers

    from mmfast.integrations.transformers import apply_mmfast

    size = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128) if small else {}
    if small:
        batch, seq = 2, 32
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(transformers.BertConfig(**size)).train()
    if impl == "mmfast":
        apply_mmfast(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, VOCAB, (batch, seq), generator=g)
    labels = torch.where(torch.rand(batch, seq, generator=g) < masked, ids, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()

    step()  # the optimizer's state, so that the measured step starts from the steady state
    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--masked", type=float, default=0.15)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--out", default=None, help="results folder (default $OUT, else benchmarks/results)")
    parser.add_argument("--worker", nargs=6, metavar=("MODE", "IMPL", "BATCH", "SEQ", "MASKED", "REPEATS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        mode, impl, batch, seq, masked, repeats = args.worker
        result = harness.measure(lambda small: make_step(impl, int(batch), int(seq), float(masked), small),
                                 mode, int(repeats))
        print(json.dumps(result))
        return 0

    results = {}
    for impl in args.impls:
        print(f"  BERT-base {args.batch}x{args.seq} masked={args.masked} {impl} ...", file=sys.stderr, flush=True)
        results[impl] = harness.run_case(__file__, [impl, str(args.batch), str(args.seq),
                                                    str(args.masked), str(args.repeats)], timeout=3600)
    rows = []
    for impl, r in results.items():
        row = {"impl": impl, "batch": args.batch, "seq": args.seq, "masked": args.masked, **r}
        if "extra_peak_bytes" in r:
            row["extra_peak_mb"] = r["extra_peak_bytes"] / 2**20
        for key, name in (("median_s", "time_vs_hf"), ("extra_peak_bytes", "mem_vs_hf")):
            if key in r and results.get("hf", {}).get(key):
                row[name] = r[key] / results["hf"][key]
        rows.append(row)
    tokens = args.batch * args.seq
    payload = {"bench": "BERT-base masked-LM training step (forward, backward, AdamW)", "device": "cpu",
               "dtype": "float32", "machine": harness.machine(), "tokens": tokens,
               "logits_mb": tokens * VOCAB * 4 / 2**20, "rows": rows}
    harness.report("hf-mlm-bert-cpu", payload, [
        ("impl", "impl", ""), ("median s", "median_s", ".2f"),
        ("extra peak MB", "extra_peak_mb", ".0f"), ("time/hf", "time_vs_hf", ".2f"), ("mem/hf", "mem_vs_hf", ".2f"),
        ("error", "error", ""),
    ], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
