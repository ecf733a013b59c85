"""`python -m mmfast eval-retrieval`: retrieval metrics from embeddings saved as .npy files.

    python -m mmfast eval-retrieval --image-emb img.npy --text-emb txt.npy --text-to-image map.npy \\
        [--k 1 5 10] [--json out.json] [--no-normalize] [--backend cpu]

img.npy: (N, D) floats, txt.npy: (M, D) floats, map.npy: (M,) integers in [0, N), the image of
each caption. Prints a table and, with --json, writes {"num_images", "num_texts", "ks", "metrics"}
(metrics: the dict of mmfast.eval.retrieval_metrics). Mismatched files exit with status 2 and a
message naming the file.
"""
from __future__ import annotations

import argparse
import json
import sys


class InputError(Exception):
    pass


def add_parser(sub) -> None:
    p = sub.add_parser("eval-retrieval", help="image-text retrieval recall@k and ranks from .npy embeddings",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-emb", required=True, help="(N, D) float array, one row per image")
    p.add_argument("--text-emb", required=True, help="(M, D) float array, one row per caption")
    p.add_argument("--text-to-image", required=True, help="(M,) integer array: the image of each caption")
    p.add_argument("--k", type=int, nargs="+", default=[1, 5, 10], help="recall cut-offs (default 1 5 10)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--no-normalize", action="store_true", help="rank raw dot products, not cosine similarities")
    p.add_argument("--backend", default=None, help="mmfast backend (default: by device)")


def _load(path: str, flag: str):
    import numpy as np

    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{flag} {path}: cannot read a .npy array ({exc})") from None


def load_inputs(args):
    """The three arrays as tensors, each checked against the others (errors name the file)."""
    import numpy as np
    import torch

    img, txt, owner = (_load(args.image_emb, "--image-emb"), _load(args.text_emb, "--text-emb"),
                       _load(args.text_to_image, "--text-to-image"))
    for arr, flag, path, what in ((img, "--image-emb", args.image_emb, "(N, D)"), (txt, "--text-emb", args.text_emb, "(M, D)")):
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating) or 0 in arr.shape:
            raise InputError(f"{flag} {path}: expected a non-empty {what} float array, got {arr.dtype} of shape {arr.shape}")
    if img.shape[1] != txt.shape[1]:
        raise InputError(f"--text-emb {args.text_emb} has D={txt.shape[1]} but --image-emb {args.image_emb} has "
                         f"D={img.shape[1]}: the embeddings must share their dimension")
    if owner.ndim != 1 or not np.issubdtype(owner.dtype, np.integer):
        raise InputError(f"--text-to-image {args.text_to_image}: expected a 1-D integer array, got {owner.dtype} "
                         f"of shape {owner.shape}")
    if owner.shape[0] != txt.shape[0]:
        raise InputError(f"--text-to-image {args.text_to_image} has {owner.shape[0]} entries but --text-emb "
                         f"{args.text_emb} has {txt.shape[0]} rows: expected one image index per caption")
    if owner.min() < 0 or owner.max() >= img.shape[0]:
        raise InputError(f"--text-to-image {args.text_to_image}: values must be image rows in [0, {img.shape[0]}) "
                         f"(--image-emb has {img.shape[0]} rows), got values in [{owner.min()}, {owner.max()}]")
    as_f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    return as_f32(img), as_f32(txt), torch.from_numpy(owner.astype(np.int64))


def table(metrics: dict, ks) -> str:
    header = ["", *(f"R@{k}" for k in ks), "mean rank", "median rank"]
    lines = [header]
    for direction, label in (("image_to_text", "image→text"), ("text_to_image", "text→image")):
        lines.append([label, *(f"{100 * metrics[f'{direction}_R@{k}']:.2f}" for k in ks),
                      f"{metrics[f'{direction}_mean_rank']:.2f}", f"{metrics[f'{direction}_median_rank']:.1f}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
           for line in lines]
    return "\n".join(out) + "\n(recall in %; ranks 1-based)"


def run(args) -> int:
    from mmfast.eval import retrieval_metrics

    try:
        img, txt, owner = load_inputs(args)
        metrics = retrieval_metrics(img, txt, owner, ks=tuple(args.k), normalize=not args.no_normalize,
                                    backend=args.backend)
    except (InputError, ValueError, TypeError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{img.shape[0]} images, {txt.shape[0]} captions, D = {img.shape[1]}")
    print(table(metrics, args.k))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"num_images": img.shape[0], "num_texts": txt.shape[0], "ks": list(args.k), "metrics": metrics}, f,
                      indent=2)
        print(f"written {args.json}")
    return 0
