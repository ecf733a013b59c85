"""Evaluation of embedding models from their embeddings, at any scale: every ranking comes from
the streaming top-k (mmfast.topk_similarity) or a chunked count, never from an N×M matrix.

    metrics = mmfast.eval.retrieval_metrics(image_emb, text_emb, text_to_image)   # COCO/Flickr-style
    classifier = mmfast.eval.zero_shot_classifier(encode_text, classnames, templates)
    metrics = mmfast.eval.zero_shot_accuracy(image_emb, labels, classifier)        # ImageNet-style

CLI: python -m mmfast eval-retrieval --image-emb img.npy --text-emb txt.npy --text-to-image map.npy
"""
from mmfast.eval.retrieval import retrieval_metrics
from mmfast.eval.zero_shot import zero_shot_accuracy, zero_shot_classifier

__all__ = ["retrieval_metrics", "zero_shot_accuracy", "zero_shot_classifier"]
