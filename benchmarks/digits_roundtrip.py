"""Is the digits autoencoder good enough for diffusion? Class accuracy of its round trip vs the real digits.

    python benchmarks/digits_roundtrip.py [experiments/digits_autoencoder/checkpoints/last.ckpt]

Encodes the 180 held-out val digits (posterior mean), decodes them, and scores originals and reconstructions with
the digits classifier of the `digits` eval suite (trained on the train split). A first stage that the classifier
reads as well as the originals loses nothing the class-conditional model is judged on; PSNR is printed beside it.
"""
import sys
from pathlib import Path

import torch

from ldm.data.digits import DigitsDataset
from ldm.eval.digits_classifier import class_accuracy, digits_classifier
from ldm.eval.reconstruction import psnr
from ldm.utils.checkpoint import load_module


def main(ckpt: Path, classifier_weights: Path = Path("data/eval/digits_classifier.pt")) -> None:
    classifier = digits_classifier(classifier_weights)  # trained on first use (seconds), outside no_grad
    module, _, stored = load_module(ckpt)
    val = DigitsDataset(split="val", resolution=32)
    images, labels = val.images.expand(-1, 3, -1, -1), torch.tensor(val.labels)
    with torch.no_grad():
        reconstructions = module.decode(module.encode(images).mean).clamp(-1, 1)
    print(f"checkpoint {ckpt} (step {stored.get('global_step')})")
    print(f"val PSNR of the round trip     {psnr(reconstructions, images).mean().item():.1f} dB")
    print(f"class accuracy, real val digits {class_accuracy(classifier, images, labels):.3f}")
    print(f"class accuracy, round trip      {class_accuracy(classifier, reconstructions, labels):.3f}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "experiments/digits_autoencoder/checkpoints/last.ckpt"))
