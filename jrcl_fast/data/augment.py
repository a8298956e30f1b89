"""Augmentation settings per kind of image, shared by the torchvision and DALI paths
so that both apply the same transforms.

The eval transform is pixel-equal up to resampler rounding (tests/test_dali.py). The
random train transforms have the same parameters but are not bit-identical: DALI's
colour jitter applies brightness, contrast and saturation in a fixed order with
contrast about mid-grey, where torchvision shuffles the order and uses the image's
mean grey. Both rotate with nearest-neighbour interpolation (torchvision's default)."""

from __future__ import annotations

from dataclasses import dataclass

from jrcl_fast.registry import DATASETS


@dataclass(frozen=True)
class Augmentation:
    crop_scale: tuple[float, float]  # random resized crop, area fraction
    flip: bool
    rotation_degrees: float
    color_jitter: float  # brightness, contrast and saturation strength; 0 = none
    eval_crop_fraction: float  # eval: resize to size / fraction, then centre crop
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # Decode to one channel and replicate to RGB at the end (DALI path: cheaper crops).
    grayscale: bool = False


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GRAY_MEAN, GRAY_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

AUGMENTATIONS = {
    "natural": Augmentation((0.08, 1.0), True, 0.0, 0.4, 0.875, IMAGENET_MEAN, IMAGENET_STD),
    # Chest X-rays: grayscale, laterality matters (no flip), no colour; mild crop and rotation.
    "xray": Augmentation((0.7, 1.0), False, 10.0, 0.0, 0.875, GRAY_MEAN, GRAY_STD, True),
    # Digits: 8 px originals; a flipped 2 is not a 2.
    "digits": Augmentation((0.6, 1.0), False, 10.0, 0.0, 1.0, GRAY_MEAN, GRAY_STD, True),
    # Animal silhouettes: 28 px, grey; a mirrored animal is still that animal.
    "silhouettes": Augmentation((0.6, 1.0), True, 10.0, 0.0, 1.0, GRAY_MEAN, GRAY_STD, True),
}



def augmentation_for(dataset_name: str) -> Augmentation:
    """The profile the data set's registry entry names."""
    return AUGMENTATIONS[DATASETS.get(dataset_name).augmentation]


def eval_resize(image_size: int, aug: Augmentation) -> int:
    return int(round(image_size / aug.eval_crop_fraction))
