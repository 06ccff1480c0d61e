#!/usr/bin/env python
"""Train the demo model (ShapesNet) on procedurally drawn shapes; write weights and labels.

Deterministic for a given --seed. Training images go through the handler's own transform
(the same bytes -> tensor path the server runs), so there is no train/serve skew.

    .venv/bin/python scripts/train_demo.py            # writes models/shapes/{shapes_cnn.pt,index_to_name.json}
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

import harness.shapes as shapes
from handler.model.architectures import ShapesNet
from handler.config import HandlerConfig
from handler.decode.images import ImageTransform

ROOT = Path(__file__).resolve().parent.parent

MODEL_DIR = ROOT / "models" / "shapes"


def handler_config() -> HandlerConfig:
    """The demo model's handler settings, as its model-config.yaml declares them."""
    settings = yaml.safe_load((MODEL_DIR / "model-config.yaml").read_text())["handler"]
    return HandlerConfig.from_mapping(settings)


_TRANSFORM: ImageTransform | None = None


def _init_pool(config: HandlerConfig) -> None:
    global _TRANSFORM
    torch.set_num_threads(1)
    _TRANSFORM = ImageTransform(config)


def _example(seed: int) -> tuple[int, torch.Tensor, float]:
    rng = random.Random(seed)
    spec = shapes.random_spec(rng, max_side=256)
    assert _TRANSFORM is not None
    pixels = _TRANSFORM(shapes.encode(shapes.draw(spec), rng))
    # Ease: the shape's share of the model's view, plus a bonus for a plain background.
    ease = spec.size_frac * min(spec.width, spec.height) / max(spec.width, spec.height)
    ease += 0.3 * (spec.background == "plain")
    return shapes.CLASSES.index(spec.label), pixels, ease


def make_dataset(
    seeds: range, config: HandlerConfig, processes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw, encode and transform one example per seed, in parallel: pixels, labels, ease."""
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(processes, initializer=_init_pool, initargs=(config,)) as pool:
        pairs = pool.map(_example, seeds, chunksize=64)
    labels = torch.tensor([p[0] for p in pairs])
    pixels = torch.stack([p[1] for p in pairs])
    return pixels, labels, torch.tensor([p[2] for p in pairs])


def normalize(pixels: torch.Tensor, config: HandlerConfig) -> torch.Tensor:
    mean = torch.tensor(config.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(config.std).view(1, 3, 1, 1) * 255
    return ((pixels.float() - mean) / std).contiguous(memory_format=torch.channels_last)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flips and quarter turns: each class is invariant to them."""
    if torch.rand(1, generator=generator).item() < 0.5:
        x = x.flip(3)
    k = int(torch.randint(0, 4, (1,), generator=generator).item())
    return torch.rot90(x, k, dims=(2, 3)) if k else x


def curriculum_order(ease: torch.Tensor, generator: torch.Generator, window: int = 2048) -> torch.Tensor:
    """Easy examples first (large shapes, plain backgrounds), shuffled within windows: the model
    finds shape features much sooner than on the full mix from the start."""
    order = torch.argsort(ease, descending=True)
    chunks = [c[torch.randperm(len(c), generator=generator)] for c in order.split(window)]
    return torch.cat(chunks)


def downscale(pixels: torch.Tensor, side: int) -> torch.Tensor:
    """uint8 batch -> uint8 batch of side x side, antialiased (in chunks to bound memory)."""
    if side == pixels.shape[-1]:
        return pixels
    chunks = [
        F.interpolate(c.float(), size=(side, side), mode="bilinear", antialias=True).round().clamp(0, 255)
        for c in pixels.split(1024)
    ]
    return torch.cat(chunks).to(torch.uint8)


def train_epoch(model, pixels, labels, order, optimizer, schedule, generator, config, batch_size) -> float:
    """One pass over ``order``; returns the last batch's loss."""
    model.train()
    loss = torch.tensor(0.0)
    for i in range(0, len(order) - batch_size + 1, batch_size):
        idx = order[i : i + batch_size]
        x = augment(normalize(pixels[idx], config), generator)
        loss = F.cross_entropy(model(x), labels[idx], label_smoothing=0.05)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return float(loss.detach())


def report(stage, loss, model, test_x, test_y, config, start) -> float:
    held_out = accuracy(model, test_x, test_y, config)
    print(f"{stage}: loss {loss:.3f}, held-out accuracy {held_out:.4f} ({time.time() - start:.0f}s)", flush=True)
    return held_out


@torch.inference_mode()
def accuracy(model: torch.nn.Module, pixels: torch.Tensor, labels: torch.Tensor, config: HandlerConfig) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(labels), 256):
        logits = model(normalize(pixels[i : i + 256], config))
        correct += int((logits.argmax(1) == labels[i : i + 256]).sum())
    return correct / len(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-size", type=int, default=16000)
    parser.add_argument("--test-size", type=int, default=1500)
    parser.add_argument("--low-res", type=int, default=64, help="side of the phase-1 training images")
    parser.add_argument("--low-epochs", type=int, default=5, help="epochs at --low-res")
    parser.add_argument("--epochs", type=int, default=1, help="epochs at the serving resolution")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=MODEL_DIR)
    args = parser.parse_args()

    start = time.time()
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    config = handler_config()
    base = args.seed * 10_000_000
    train_x, train_y, train_ease = make_dataset(range(base, base + args.train_size), config, processes=2)
    # Held-out examples come from a disjoint seed range.
    test_x, test_y, _ = make_dataset(range(base + 5_000_000, base + 5_000_000 + args.test_size), config, 2)
    print(f"data: {len(train_y)} train / {len(test_y)} held-out images in {time.time() - start:.0f}s", flush=True)

    model = ShapesNet(num_classes=len(shapes.CLASSES)).to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(args.seed)
    # Phase 1: low resolution (4x cheaper per step), easy examples first, one-cycle schedule.
    low_x = downscale(train_x, args.low_res)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.low_epochs * (len(train_y) // args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps, pct_start=0.2)
    for epoch in range(args.low_epochs):
        order = curriculum_order(train_ease, generator) if epoch == 0 else torch.randperm(len(train_y), generator=generator)
        loss = train_epoch(model, low_x, train_y, order, optimizer, schedule, generator, config, args.batch_size)
        report(f"{args.low_res}px epoch {epoch + 1}/{args.low_epochs}", loss, model, test_x, test_y, config, start)
    # Phase 2: the serving resolution, a short cosine fine-tune.
    for group in optimizer.param_groups:
        group["lr"] = args.lr / 3
    steps = args.epochs * (len(train_y) // args.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    held_out = 0.0
    for epoch in range(args.epochs):
        order = torch.randperm(len(train_y), generator=generator)
        loss = train_epoch(model, train_x, train_y, order, optimizer, schedule, generator, config, args.batch_size)
        held_out = report(f"{config.image_size}px epoch {epoch + 1}/{args.epochs}", loss, model, test_x, test_y,
                          config, start)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out_dir / "shapes_cnn.pt")
    labels = {str(i): name for i, name in enumerate(shapes.CLASSES)}
    (args.out_dir / "index_to_name.json").write_text(json.dumps(labels, indent=2) + "\n")
    print(f"held-out accuracy: {held_out:.4f} on {len(test_y)} fresh images; "
          f"wrote {args.out_dir}/shapes_cnn.pt in {time.time() - start:.0f}s total")


if __name__ == "__main__":
    main()
