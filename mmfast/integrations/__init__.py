"""mmfast inside the training stacks people already run.

    mmfast.integrations.transformers   apply_mmfast(model): Hugging Face masked-LM and CLIP/SigLIP models
    mmfast.integrations.open_clip      patch(): open_clip's trainer (open_clip_train) with mmfast's losses

Neither stack is a dependency of mmfast: each module imports its stack when first used and says
which package is missing, or too old, if it cannot.
"""
