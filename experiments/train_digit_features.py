"""Train the digit classifier whose features symfast.metrics.frechet_distance uses by default, and
write its weights into the package (symfast/assets/digit_features.safetensors, ~150 KB) with a
JSON record of how it was made and how well it classifies held-out digits.

    python experiments/train_digit_features.py            # ~1 minute on 1 CPU thread

Data: the training split of scikit-learn's digits (symfast.data.digits(16, split="train"), the
first 1500) under all 8 D4 elements, the same images the digit models train on; accuracy is
measured on the 297 held-out digits under D4 (6 and 9 are one class apart by a half-turn, so
the D4 accuracy is below the upright one, also reported).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from symfast._io import atomic_write_bytes, atomic_write_text
from symfast.data import digits, orbit_augmented
from symfast.metrics import DIGIT_FEATURES, DigitClassifier


def accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(images).argmax(1) == labels).float().mean().item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(DIGIT_FEATURES))
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    train_set = orbit_augmented(digits(16, split="train"), "d4")
    test_upright = digits(16, split="test")
    test_set = orbit_augmented(test_upright, "d4")
    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(args.seed)
    n = len(train_set)
    for epoch in range(args.epochs):
        for lr_group in opt.param_groups:  # cosine decay over the epochs
            lr_group["lr"] = 1e-3 * (1 + torch.cos(torch.tensor(epoch / args.epochs * torch.pi)).item())
        perm = torch.randperm(n, generator=gen)
        model.train()
        for i in range(0, n, 128):
            idx = perm[i:i + 128]
            # a little pixel noise, so that the features react smoothly to imperfect samples
            x = train_set.images[idx] + 0.1 * torch.randn(len(idx), 1, 16, 16, generator=gen)
            loss = F.cross_entropy(model(x), train_set.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss.item():.3f}, held-out accuracy (D4) "
              f"{accuracy(model, test_set.images, test_set.labels):.3f}", flush=True)
    from safetensors.torch import save
    blob = save({k: v.contiguous() for k, v in model.state_dict().items()})
    out = Path(args.out)
    atomic_write_bytes(out, blob)
    record = {"command": "python experiments/train_digit_features.py"
                         + (f" --epochs {args.epochs}" if args.epochs != 12 else "")
                         + (f" --seed {args.seed}" if args.seed else ""),
              "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
              "parameters": sum(p.numel() for p in model.parameters()),
              "held_out_accuracy_d4": accuracy(model, test_set.images, test_set.labels),
              "held_out_accuracy_upright": accuracy(model, test_upright.images, test_upright.labels)}
    atomic_write_text(out.with_suffix(".json"), json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    sys.exit(main())
