"""Image↔text retrieval metrics (COCO/Flickr-style, several captions per image) from embeddings."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from mmfast.eval import _common
from mmfast.similarity import chunked
from mmfast.similarity.api import topk_similarity


def retrieval_metrics(
    image_emb: Tensor,
    text_emb: Tensor,
    text_to_image: Tensor,
    *,
    ks: Sequence[int] = (1, 5, 10),
    normalize: bool = True,
    backend: Optional[str] = None,
) -> dict:
    """Recall@k both ways and the rank of the first correct item, never forming the N×M matrix.

    image_emb: (N, D), text_emb: (M, D) (any float dtype; scored in fp32), text_to_image: (M,)
    integers, the image of each caption. Scores are cosine similarities (normalize=True, as
    CLIP_benchmark; False: raw dot products). Ranking order, as topk_similarity's: higher score
    first, equal scores by lower index. Returns a dict of Python floats:

      image_to_text_R@{k}       fraction of images with any of their captions among their top k
                                (CLIP_benchmark's definition); images without a caption are left out
      text_to_image_R@{k}       fraction of captions whose image is among their top k
      image_to_text_mean_rank, image_to_text_median_rank
      text_to_image_mean_rank, text_to_image_median_rank
                                1-based rank of the first correct item (an image: its best-ranked
                                caption); median of an even count: the mean of the two middle ones

    Cost: two top-k passes (k = max(ks)); queries whose first correct item ranks below the top k
    take two more chunked passes over the keys to count the keys ranked above it (exact ranks).
    Memory O((N + M)·D + chunks).
    """
    img = _common.embeddings("image_emb", image_emb)
    txt = _common.embeddings("text_emb", text_emb, img, "image_emb")
    n, m = img.shape[0], txt.shape[0]
    owner = _common.index_vector("text_to_image", text_to_image, m, n, img.device, "caption")
    ks = _common.ks_arg(ks)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    if normalize:  # once, so the top-k and the rank count score the very same vectors
        img, txt = chunked.scaled_rows(img, 1.0, True), chunked.scaled_rows(txt, 1.0, True)

    out = {}
    # image → text: a hit is any caption of the image; images without captions have no answer.
    has_caption = torch.bincount(owner, minlength=n) > 0
    k_it = min(max(ks), m)
    _, idx = topk_similarity(img, txt, k_it, backend=backend)
    rank_it = _common.first_hit(owner[idx] == torch.arange(n, device=img.device)[:, None])
    late = torch.nonzero(has_caption & (rank_it == 0))[:, 0]
    if len(late):
        position = torch.full((n,), -1, dtype=torch.int64, device=img.device)
        position[late] = torch.arange(len(late), device=img.device)
        pair_query = position[owner]  # each caption's image, as a row of img[late]
        mine = pair_query >= 0
        rank_it[late] = _common.ranks_after_topk(img[late], txt, pair_query[mine],
                                                 torch.nonzero(mine)[:, 0], k_it)
    _summarise(out, "image_to_text", rank_it[has_caption], ks)

    # text → image: one correct image per caption.
    k_ti = min(max(ks), n)
    _, idx = topk_similarity(txt, img, k_ti, backend=backend)
    rank_ti = _common.first_hit(idx == owner[:, None])
    late = torch.nonzero(rank_ti == 0)[:, 0]
    if len(late):
        rank_ti[late] = _common.ranks_after_topk(txt[late], img, torch.arange(len(late), device=img.device),
                                                 owner[late], k_ti)
    _summarise(out, "text_to_image", rank_ti, ks)
    return out


def _summarise(out: dict, direction: str, ranks: Tensor, ks) -> None:
    for k in ks:
        out[f"{direction}_R@{k}"] = float((ranks <= k).double().mean())
    out[f"{direction}_mean_rank"] = float(ranks.double().mean())
    out[f"{direction}_median_rank"] = _common.median(ranks)
