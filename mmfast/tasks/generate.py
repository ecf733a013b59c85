"""Text-to-image generation: a conditional GAN on the frozen text tower of a pretrained CLIPModel,
judged by the same checkpoint's zero-shot classifier (which never sees a generated image in training).

    G(t, z) → image        t: the caption's text feature (B, E), z: noise (B, Z)
    D(image, t) → logit    a conv encoder plus a projection term <h(image), P t>

    L_D = −E[log σ(D(y, t))] − E[log(1 − σ(D(G(t, z), t)))]
        = E[softplus(−D(y, t))] + E[softplus(D(G(t, z), t))]
    L_G = −E[log σ(D(G(t, z), t))] + λ·E|G(t, z) − y|
        = E[softplus(−D(G(t, z), t))] + λ·L1

where y is the caption's real image (one object at the image's centre: Shapes(centred=True)). Both
losses are computed from logits with softplus, never as the log of a sigmoid. losses() returns
{"d": L_D, "g": L_G}; the Trainer backpropagates their sum once, and each network receives only its
own loss's gradient: L_D sees the generated images detached, and L_G's pass through D runs with D's
parameters not requiring grad (simultaneous updates).

Evaluation: images generated for test-split captions (every one names a (colour, shape) pair that
training never shows) are named by the checkpoint's zero-shot classifier; accuracy of the colour,
the shape and the class, against chance and against images generated from shuffled captions.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmfast.data import COLORS, SHAPES, Shapes
from mmfast.tasks.base import EVAL_BATCH, Task, ZeroShot, eval_mode

# ---- the losses ------------------------------------------------------------------------------------
def discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """L_D = −mean log σ(real) − mean log(1 − σ(fake)) = mean softplus(−real) + mean softplus(fake),
    by −log σ(x) = softplus(−x) and −log(1 − σ(x)) = softplus(x): finite for any finite logits
    (softplus(x) → x, its gradient σ(x) → 1, for large x; log σ would be log 0 = −inf)."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_loss(fake_logits: Tensor, fake: Tensor, real: Tensor, recon_weight: float) -> Tensor:
    """L_G = −mean log σ(fake_logits) + λ·mean |fake − real| = mean softplus(−fake_logits) + λ·L1
    (the non-saturating generator loss, −log σ(x) = softplus(−x), plus the reconstruction term)."""
    return F.softplus(-fake_logits).mean() + recon_weight * (fake - real).abs().mean()


@contextlib.contextmanager
def no_param_grad(module: nn.Module):
    """Within: the module's parameters do not require grad (gradients still flow through the module
    to its inputs, but none accumulates into its parameters); restored after."""
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


# ---- the networks ----------------------------------------------------------------------------------
def _halvings(image_size: int) -> tuple[int, int]:
    """(k, s): image_size = s · 2^k with s ≥ 4 and k as large as that allows (32 → (3, 4), 224 → (5, 7))."""
    k, s = 0, image_size
    while s % 2 == 0 and s // 2 >= 4:
        k, s = k + 1, s // 2
    return k, s


class Generator(nn.Module):
    """G(text (B, E), noise (B, Z)) → images (B, C, H, W) in [0, 1]: an MLP to a (width, s, s) map,
    then k blocks of (nearest 2× upsampling, 3×3 conv, text FiLM, LeakyReLU), a 3×3 conv to C
    channels, text FiLM again, and a sigmoid (image_size = s · 2^k, s ≥ 4). FiLM, h · (1 + γ(t)) + β(t)
    per channel with γ and β linear in the text feature and starting at 0, lets the caption set each
    block's features directly: attributes such as colour need not pass through the MLP alone."""

    def __init__(self, text_dim: int, noise_dim: int, image_size: int, width: int = 64, channels: int = 3):
        super().__init__()
        self.noise_dim, self.width = noise_dim, width
        k, self.start = _halvings(image_size)
        self.mlp = nn.Sequential(nn.Linear(text_dim + noise_dim, 4 * width), nn.LeakyReLU(0.2),
                                 nn.Linear(4 * width, width * self.start ** 2), nn.LeakyReLU(0.2))
        convs, films, c = [], [], width
        for i in range(k):
            out = max(width >> i, 16)  # width, width/2, … (at least 16)
            convs.append(nn.Conv2d(c, out, 3, padding=1))
            films.append(nn.Linear(text_dim, 2 * out))
            c = out
        self.convs, self.films = nn.ModuleList(convs), nn.ModuleList(films)
        self.out = nn.Conv2d(c, channels, 3, padding=1)
        self.out_film = nn.Linear(text_dim, 2 * channels)
        for layer in [*films, self.out_film]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, text: Tensor, noise: Tensor) -> Tensor:
        text = text * math.sqrt(text.shape[-1])  # unit-norm features have entries ~1/sqrt(E): now ~1, like the noise's
        x = self.mlp(torch.cat([text, noise], dim=-1)).view(len(text), self.width, self.start, self.start)
        for conv, film in zip(self.convs, self.films):
            x = conv(F.interpolate(x, scale_factor=2, mode="nearest"))
            gamma, beta = film(text)[:, :, None, None].chunk(2, dim=1)
            x = F.leaky_relu(x * (1 + gamma) + beta, 0.2)
        gamma, beta = self.out_film(text)[:, :, None, None].chunk(2, dim=1)
        return torch.sigmoid(self.out(x) * (1 + gamma) + beta)


class Discriminator(nn.Module):
    """D(images (B, C, H, W), text (B, E)) → logits (B,): k stride-2 4×4 convs with LeakyReLU to a
    feature h, then logit = w·h + b + <h, P text> (the projection discriminator's conditioning)."""

    def __init__(self, text_dim: int, image_size: int, width: int = 64, channels: int = 3):
        super().__init__()
        k, s = _halvings(image_size)
        layers, c = [], channels
        for i in range(k):
            out = max(width >> (k - 1 - i), 16)  # …, width/2, width at the end (at least 16)
            layers += [nn.Conv2d(c, out, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            c = out
        self.convs = nn.Sequential(*layers)
        hidden = 2 * width
        self.feature = nn.Sequential(nn.Flatten(), nn.Linear(c * s * s, hidden), nn.LeakyReLU(0.2))
        self.out = nn.Linear(hidden, 1)
        self.project = nn.Linear(text_dim, hidden, bias=False)

    def forward(self, images: Tensor, text: Tensor) -> Tensor:
        h = self.feature(self.convs(images))
        return self.out(h).squeeze(-1) + (h * self.project(text)).sum(-1)


# ---- the task --------------------------------------------------------------------------------------
class Generate(Task):
    """A text-conditioned GAN on the frozen checkpoint (see the module's docstring).

    Options: recon_weight (λ of the L1 reconstruction term), noise_dim (Z), width (the networks'
    channel width). TrainConfig's train_size: centred single-object training images; eval_size:
    test-split captions generated and judged; seed: also the evaluation's noise and shuffling.
    Each evaluation writes OUT_DIR/held_out.png, a grid of the held-out captions' images (with
    matplotlib installed).
    """
    name = "generate"
    headline = "generate_colour_accuracy"
    # recon_weight 100: pix2pix's λ for its L1 term. Measured from the demo checkpoint, batch 64, lr 1e-3:
    # at λ = 10 the held-out colours are still ~50% right after ~150 steps, at 30–100 ~100%.
    defaults = {"recon_weight": 100.0, "noise_dim": 16, "width": 32}
    frozen_backbone = True
    # β1 = 0.5, as GANs are usually trained: with AdamW's 0.9 the colours took ~2× the steps (measured)
    betas = (0.5, 0.999)
    recipe = {"batch_size": 64, "lr": 1e-3, "warmup_steps": 5, "train_size": 4000, "eval_size": 240}

    def __init__(self, model: nn.Module, tokenizer, config, device: torch.device, autocast=contextlib.nullcontext,
                 options: Optional[dict] = None):
        super().__init__(model, tokenizer, config, device, autocast, options)
        o = self.options
        for key in ("noise_dim", "width"):
            if o[key] < 1:
                raise ValueError(f"task_options[{key!r}] must be at least 1, got {o[key]}")
        if o["recon_weight"] < 0:
            raise ValueError(f"task_options['recon_weight'] must be ≥ 0, got {o['recon_weight']}")
        self.size = self.image_size(model)
        self.max_len = model.config.text.max_len
        text_dim = model.config.text.embed_dim
        channels = model.config.image.channels
        self.generator = Generator(text_dim, o["noise_dim"], self.size, o["width"], channels)
        self.discriminator = Discriminator(text_dim, self.size, o["width"], channels)
        self.to(device)
        self._train: Optional[Shapes] = None
        self._eval: Optional[Shapes] = None

    # ---- data ----
    def train_data(self) -> Shapes:
        if self._train is None:
            self._train = Shapes("train", self.config.train_size, seed=self.config.seed, image_size=self.size,
                                 max_shapes=1, centred=True)
        return self._train

    def eval_data(self) -> Shapes:
        """Single-object test-split images: each caption names a held-out (colour, shape) pair."""
        if self._eval is None:
            self._eval = Shapes("test", self.config.eval_size, seed=self.config.seed + 1, image_size=self.size,
                                max_shapes=1, centred=True)
        return self._eval

    def collate(self, items: list) -> dict:
        images = torch.stack([image for image, _ in items])
        ids, mask = self.tokenizer.encode([caption for _, caption in items], self.max_len)
        return {"images": images, "ids": ids, "mask": mask}

    def _text(self, model: nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
        """The frozen text tower's normalised features (B, E), float32, without a graph."""
        with torch.no_grad(), self.autocast():
            return model.encode_text(ids.to(self.device), mask.to(self.device)).float()

    def encode(self, model: nn.Module, captions: Sequence[str]) -> Tensor:
        out = []
        with eval_mode(model):
            for i in range(0, len(captions), EVAL_BATCH):
                ids, mask = self.tokenizer.encode(list(captions[i:i + EVAL_BATCH]), model.config.text.max_len)
                out.append(self._text(model, ids, mask))
        return torch.cat(out)

    # ---- training ----
    def losses(self, model: nn.Module, batch: dict) -> dict:
        real = batch["images"].to(self.device)
        text = self._text(model, batch["ids"], batch["mask"])
        noise = torch.randn(len(text), self.options["noise_dim"], device=self.device)  # the global RNG
        fake = self.generator(text, noise)
        logits = self.discriminator(torch.cat([real, fake.detach()]), torch.cat([text, text])).float()
        real_logits, fake_logits = logits.chunk(2)
        d = discriminator_loss(real_logits, fake_logits)
        with no_param_grad(self.discriminator):
            g_logits = self.discriminator(fake, text).float()
        g = generator_loss(g_logits, fake.float(), real.float(), self.options["recon_weight"])
        return {"d": d, "g": g}

    # ---- generation ----
    @torch.no_grad()
    def generate(self, model: nn.Module, prompts: Sequence[str], seed: int = 0) -> Tensor:
        """Images (N, C, H, W) in [0, 1] on the CPU for N prompts, from noise of torch.Generator(seed)
        (the global RNG is left as it is)."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of str, got a single str; wrap it in a list")
        if len(prompts) == 0:
            raise ValueError("prompts is empty; expected at least one caption")
        text = self.encode(model, prompts)
        noise = torch.randn(len(prompts), self.options["noise_dim"], generator=torch.Generator().manual_seed(seed))
        out = []
        with eval_mode(self.generator):
            for t, z in zip(text.split(EVAL_BATCH), noise.split(EVAL_BATCH)):
                with self.autocast():
                    out.append(self.generator(t, z.to(self.device)).float().cpu())
        return torch.cat(out)

    # ---- evaluation ----
    def _shuffled(self, n: int) -> Tensor:
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed + 1))

    @staticmethod
    def _scores(prefix: str, predicted: Tensor, labels: Tensor) -> dict:
        pc, ps = ZeroShot.colour_and_shape(predicted)
        lc, ls = ZeroShot.colour_and_shape(labels)
        return {f"{prefix}_colour_accuracy": (pc == lc).float().mean().item(),
                f"{prefix}_shape_accuracy": (ps == ls).float().mean().item(),
                f"{prefix}_class_accuracy": (predicted == labels).float().mean().item()}

    def evaluate(self, model: nn.Module) -> dict:
        """The judge's accuracy on images generated for the evaluation captions (generate_*), and on
        images generated from the same captions shuffled (shuffled_*), scored against the captions."""
        data, judge = self.eval_data(), ZeroShot(model, self.tokenizer, self.device, self.autocast)
        seed = self.config.seed
        out = self._scores("generate", judge.predict(self.generate(model, data.captions, seed)), data.labels)
        shuffled = [data.captions[i] for i in self._shuffled(len(data)).tolist()]
        out.update(self._scores("shuffled", judge.predict(self.generate(model, shuffled, seed)), data.labels))
        with contextlib.suppress(ImportError):  # the picture needs matplotlib, an optional extra
            self.write_grid(model, os.path.join(self.config.out_dir, "held_out.png"))
        return out

    def baseline(self, model: nn.Module) -> dict:
        """generate_*: images generated from shuffled captions, scored against the original captions
        (what a generator that ignores the caption scores); real_*: the judge on the real images of
        the same captions (the ceiling a generator can reach)."""
        data, judge = self.eval_data(), ZeroShot(model, self.tokenizer, self.device, self.autocast)
        shuffled = [data.captions[i] for i in self._shuffled(len(data)).tolist()]
        out = self._scores("generate", judge.predict(self.generate(model, shuffled, self.config.seed)),
                           data.labels)
        real = torch.stack([data[i][0] for i in range(len(data))])
        out.update(self._scores("real", judge.predict(real), data.labels))
        return out

    def chance(self) -> dict:
        return {"generate_colour_accuracy": 1 / len(COLORS), "generate_shape_accuracy": 1 / len(SHAPES),
                "generate_class_accuracy": 1 / (len(COLORS) * len(SHAPES))}

    def held_out_captions(self) -> list:
        """The distinct evaluation captions, sorted: one per (size, held-out colour–shape pair)."""
        return sorted(set(self.eval_data().captions))

    def write_grid(self, model: nn.Module, path: str, prompts: Optional[Sequence[str]] = None) -> str:
        """A PNG grid of images generated for prompts (default: the held-out captions), each titled
        with its caption and what the judge names it; returns path."""
        prompts = list(prompts) if prompts is not None else self.held_out_captions()
        images = self.generate(model, prompts, self.config.seed)
        named = ZeroShot(model, self.tokenizer, self.device, self.autocast).predict(images)
        classnames = Shapes.classnames()
        save_grid(images, [f"{p}\n→ {classnames[c]}" for p, c in zip(prompts, named.tolist())], path)
        return path


def save_grid(images: Tensor, titles: Sequence[str], path: str, columns: Optional[int] = None) -> str:
    """Writes a PNG grid of images (N, C, H, W) in [0, 1] (C = 1 or 3), each with its title; returns
    path. Needs matplotlib (an optional extra)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("save_grid needs matplotlib: pip install matplotlib") from e
    images = images.detach().float().cpu().clamp(0, 1)
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1 or 3, H, W), got shape {tuple(images.shape)}")
    n = len(images)
    if n == 0 or len(titles) != n:
        raise ValueError(f"need one title per image and at least one image, got {n} images and {len(titles)} titles")
    columns = columns or min(n, 6)
    rows = math.ceil(n / columns)
    fig = Figure(figsize=(1.9 * columns, 2.2 * rows))
    for i in range(rows * columns):
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.axis("off")
        if i < n:
            image = images[i].permute(1, 2, 0).numpy()
            ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray" if image.shape[-1] == 1 else None,
                      vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(titles[i], fontsize=7)
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
