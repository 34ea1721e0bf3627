"""Sample quality of a digits prior, measured on the real digits.

    python benchmarks/quality_digits.py [--model PRIOR_RUN] [--samples 1000]

A small CNN classifier is trained on the training split of the bundled digits (4,000
images; every fifth digit of each class is held out) and cached in
benchmarks/.cache/. Then, for each set of 32x32 images below, it reports the share
classified with confidence >= 0.9, the class histogram, and a Frechet distance between
the classifier's penultimate features of the set and of the 1,000 held-out real digits:

    real (train split)   1,000 real digits the classifier and the models trained on
    train split, recon.  the same 1,000 through the VQ-GAN: what a prior that exactly
                         reproduced its training tokens would score (the floor)
    reconstructions      held-out digits through the VQ-GAN (encode + decode)
    samples              the prior's samples at its recipe's default sampler settings
                         (a class-conditional prior is given classes 0..9 in turn,
                         as `sundae sample` does)
    random tokens        uniformly random token grids decoded by the VQ-GAN

The distance is computed in-project on this classifier's features: it is NOT
comparable to a published FID. Targets for the bundled model: >= 85% confident, every
class between 5% and 15% of samples, and a distance at most 3x the reconstructions'.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sundae_cli.datasets import digit_cells, in_split
from sundae_cli.fid import FeatureStats, frechet_distance
from sundae_cli.generation import class_of
from sundae_cli.images import fit_to, to_tensor
from sundae_cli.models import (
    autoencoder_for_prior,
    load_checkpoint,
    resolve_prior_ref,
)
from sundae_cli.sampler import SamplerSettings, derive_seed, sample_tokens

CACHE = Path(__file__).parent / ".cache"
CONFIDENT = 0.9
EPOCHS = 12


class DigitClassifier(nn.Module):
    """Two conv blocks and a 128-wide penultimate layer, on 32x32 greyscale."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(128, 10)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, 1, 32, 32) in [-1, 1] -> (logits (b, 10), features (b, 128))."""
        features = self.features(images)
        return self.head(features), features


def real_digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits of one split fitted to 32x32 like the pipeline: (b, 3, 32, 32), labels."""
    images, labels = [], []
    for label, index, cell in digit_cells():
        if in_split(index, split):
            images.append(to_tensor(fit_to(cell.convert("RGB"), (32, 32))))
            labels.append(label)
    return torch.stack(images), torch.tensor(labels)


def grey(images: torch.Tensor) -> torch.Tensor:
    return images.float().clamp(-1, 1).mean(dim=1, keepdim=True)


def train_classifier(images: torch.Tensor, labels: torch.Tensor) -> DigitClassifier:
    path = CACHE / "digit_classifier_v2.pt"
    model = DigitClassifier()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    # Train to confidence: the last epochs at a lower rate and without shifts, so
    # real digits are classified with confidence >= 0.9 (this is the yardstick).
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=8, gamma=0.1)
    inputs = grey(images)
    for epoch in range(EPOCHS):
        order = torch.randperm(len(inputs))
        for start in range(0, len(inputs), 64):
            batch = order[start : start + 64]
            # Small random shifts make the classifier robust to generated digits.
            shifted = torch.roll(
                inputs[batch], tuple(np.random.randint(-2, 3, 2)), (2, 3)
            )
            loss = nn.functional.cross_entropy(model(shifted)[0], labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
        print(f"classifier epoch {epoch + 1}: loss {loss.item():.3f}", file=sys.stderr)
    CACHE.mkdir(exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


@torch.no_grad()
def classify(model: DigitClassifier, images: torch.Tensor):
    logits, features = [], []
    for chunk in grey(images).split(256):
        out_logits, out_features = model(chunk)
        logits.append(out_logits)
        features.append(out_features)
    return torch.cat(logits).softmax(-1), torch.cat(features).double().numpy()


def report(name: str, probs, features, reference: FeatureStats) -> dict:
    confident = float((probs.max(-1).values >= CONFIDENT).float().mean())
    histogram = np.bincount(probs.argmax(-1).numpy(), minlength=10) / len(probs)
    stats = FeatureStats.of(features)
    distance = frechet_distance(stats.mu, stats.sigma, reference.mu, reference.sigma)
    return {"name": name, "confident": confident, "hist": histogram, "fd": distance}


@torch.no_grad()
def sample_images(
    prior, decoder, count: int, seed: int, overrides: dict
) -> tuple[torch.Tensor, list]:
    """Samples at the recipe's sampler settings, unless overridden by flags."""
    section = prior.recipe.sampling
    settings = SamplerSettings(
        steps=overrides.get("steps") or section.steps,
        temperature=overrides.get("temperature") or tuple(section.temperature),
        proportion=overrides.get("proportion") or tuple(section.proportion),
        top_k=section.top_k,
        update=overrides.get("update") or section.update,
        min_steps=section.min_steps,
        early_stop=section.early_stop,
    )
    # A class-conditional prior gets the labels `sundae sample` gives it by default:
    # sample i is conditioned on class i mod num_classes.
    num_classes = int(getattr(prior.recipe.prior.config, "num_classes", 0) or 0)
    images, steps = [], []
    for start in range(0, count, section.batch_size):
        indices = range(start, min(count, start + section.batch_size))
        classes = [class_of(num_classes, None, i) for i in indices]
        result = sample_tokens(
            lambda tokens, labels: prior.model(tokens, labels),
            batch_size=len(indices),
            grid=prior.recipe.grid,
            codebook_size=prior.recipe.codebook_size,
            seeds=[derive_seed(seed, i) for i in indices],
            settings=settings,
            class_labels=None if not num_classes else torch.tensor(classes),
        )
        images.append(decoder.model.decode(result.tokens).cpu())
        steps += result.steps_used
    return torch.cat(images), steps


def schedule(values: list[float] | None) -> tuple[float, float] | None:
    """(start, end) from one or two command-line values."""
    if not values:
        return None
    if len(values) > 2:
        sys.exit("give one value or START END")
    return (values[0], values[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="prior run (default: newest, else bundled)")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    tuning = "override (tuning only): one value, or START END of a linear schedule"
    parser.add_argument("--temperature", type=float, nargs="+", help=tuning)
    parser.add_argument("--proportion", type=float, nargs="+", help=tuning)
    parser.add_argument("--steps", type=int, help="override (tuning only)")
    parser.add_argument("--update", choices=["random", "confidence"], help="override")
    args = parser.parse_args()
    overrides = {
        "temperature": schedule(args.temperature),
        "proportion": schedule(args.proportion),
        "steps": args.steps,
        "update": args.update,
    }
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    device = torch.device("cpu")

    ckpt, bundled = resolve_prior_ref(args.model)
    prior = load_checkpoint(ckpt, "prior", device)
    decoder = autoencoder_for_prior(prior, device)
    print(f"prior: {ckpt} ({'bundled' if bundled else 'run store'})", file=sys.stderr)

    train_images, train_labels = real_digits("train")
    test_images, test_labels = real_digits("test")
    classifier = train_classifier(train_images, train_labels)
    test_probs, test_features = classify(classifier, test_images)
    accuracy = float((test_probs.argmax(-1) == test_labels).float().mean())
    reference = FeatureStats.of(test_features)

    started = time.perf_counter()
    samples, steps = sample_images(prior, decoder, args.samples, args.seed, overrides)
    seconds = time.perf_counter() - started
    with torch.no_grad():
        recon = torch.cat([decoder.model(c)[0] for c in test_images.split(256)])
        grid = prior.recipe.grid
        generator = torch.Generator().manual_seed(args.seed)
        shape = (args.samples, *grid)
        random_tokens = torch.randint(
            prior.recipe.codebook_size, shape, generator=generator
        )
        random_images = decoder.model.decode(random_tokens)
    pick = torch.randperm(len(train_images), generator=generator)[: args.samples]
    with torch.no_grad():
        train_recon = torch.cat(
            [decoder.model(c)[0] for c in train_images[pick].split(256)]
        )

    sets = {
        "real (train split)": train_images[pick],
        "reconstructions": recon,
        "train split, recon.": train_recon,
        "samples": samples,
        "random tokens": random_images,
    }
    rows = [
        report(name, *classify(classifier, x), reference) for name, x in sets.items()
    ]
    print_table(rows, accuracy, args.samples, seconds, steps)


def print_table(rows, accuracy, count, seconds, steps) -> None:
    print(f"classifier accuracy on the 1,000 held-out real digits: {accuracy:.1%}")
    print(f"sampling: {count} samples in {seconds:.1f} s ({seconds / count * 1000:.1f} "
          f"ms/image), mean steps used {np.mean(steps):.1f}")  # fmt: skip
    print("feature distance: in-project (classifier features), not a published FID")
    header = f"{'set':<20} {'confident':>9} {'distance':>9}  class histogram (0..9, %)"
    print(header)
    for row in rows:
        hist = " ".join(f"{100 * v:4.1f}" for v in row["hist"])
        print(f"{row['name']:<20} {row['confident']:>9.1%} {row['fd']:>9.2f}  {hist}")
    by_name = {row["name"]: row for row in rows}
    samples, recon = by_name["samples"], by_name["reconstructions"]
    # The reconstructions are the reference digits themselves through the VQ-GAN, so
    # their distance has no sampling term. Independent digits (the train split, or
    # its reconstructions: what a prior that reproduced its training tokens exactly
    # would give) show the floor that any set of 1,000 other images sits on.
    floor = by_name["train split, recon."]["fd"] / max(recon["fd"], 1e-9)
    print(f"floor: train split reconstructions / reconstructions ratio: {floor:.2f}")
    checks = [
        ("samples >= 85% confident", samples["confident"] >= 0.85),
        ("every class 5%..15%", bool(((samples["hist"] >= 0.05) &
                                       (samples["hist"] <= 0.15)).all())),
        ("distance <= 3x reconstructions'", samples["fd"] <= 3 * recon["fd"]),
    ]  # fmt: skip
    ratio = samples["fd"] / max(recon["fd"], 1e-9)
    print(f"samples / reconstructions distance ratio: {ratio:.2f}")
    for name, ok in checks:
        print(f"target {name}: {'PASS' if ok else 'FAIL'}")


if __name__ == "__main__":
    main()
