"""Offline data: real photos, real sentences and labelled digits that ship inside PyPI packages."""
from .photos import CALIBRATION_PHOTOS, EVALUATION_PHOTOS, calibration_crops, evaluation_crops, load_photo, photo_crops
from .sentences import real_sentences, sentence_split

__all__ = ["load_photo", "photo_crops", "calibration_crops", "evaluation_crops", "CALIBRATION_PHOTOS", "EVALUATION_PHOTOS",
           "real_sentences", "sentence_split"]
