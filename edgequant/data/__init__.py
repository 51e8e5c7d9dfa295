"""Offline data: real photos and labelled digits that ship inside PyPI packages."""
from .photos import CALIBRATION_PHOTOS, EVALUATION_PHOTOS, calibration_crops, evaluation_crops, load_photo, photo_crops

__all__ = ["load_photo", "photo_crops", "calibration_crops", "evaluation_crops", "CALIBRATION_PHOTOS", "EVALUATION_PHOTOS"]
