"""Agreement of mmfast's clip_loss / siglip_loss with open_clip's losses run in float64, at the
benchmark's sizes: relative error ‖ours − theirs‖/‖theirs‖ of the loss and of every gradient.

    python benchmarks/check_agreement.py [--sizes 4096 8192 16384] [--d 512] [--backend cpu]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import mmfast  # noqa: E402
import peers  # noqa: E402


def grads(fn, tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    loss = fn(*leaves)
    return [loss] + list(torch.autograd.grad(loss, leaves))


def rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--backend", default="cpu")
    args = parser.parse_args(argv)
    oc = peers.open_clip_loss()
    if oc is None:
        raise SystemExit("open-clip-torch is not installed")
    for n in args.sizes:
        g = torch.Generator().manual_seed(n)
        a = torch.nn.functional.normalize(torch.randn(n, args.d, generator=g), dim=1)
        b = torch.nn.functional.normalize(a + 0.5 * torch.randn(n, args.d, generator=g), dim=1)  # correlated pairs
        s, bias = torch.tensor(100.0), torch.tensor(-10.0)
        for name, ours, theirs, tensors in [
            ("clip", lambda a, b, s: mmfast.clip_loss(a, b, s, backend=args.backend), oc.ClipLoss(), [a, b, s]),
            ("siglip", lambda a, b, s, bi: mmfast.siglip_loss(a, b, s, bi, backend=args.backend), oc.SigLipLoss(),
             [a, b, s, bias]),
        ]:
            mine = grads(ours, tensors)
            ref = grads(theirs, [t.double() for t in tensors])
            errors = {k: rel(x, r) for k, x, r in zip(["loss", "d_a", "d_b", "d_scale", "d_bias"], mine, ref)}
            print(json.dumps({"loss": name, "N": n, "D": args.d, "backend": args.backend, "rel_err": errors}), flush=True)
            del mine, ref
    return 0


if __name__ == "__main__":
    sys.exit(main())
