"""Post-training quantization: one file per technique, each ``technique(model_or_sim, ...) -> report``.

Float-model passes return ``(model, report)`` and copy the model unless ``inplace=True``:
:func:`fold_batch_norms`, :func:`cross_layer_equalization`, :func:`absorb_high_biases`,
:func:`equalize_activations` and :func:`smooth_linear_inputs` (need data).
Sim passes change the sim in place and return a report: :func:`set_bn_ranges` (data-free ranges),
:func:`correct_bias`, :func:`correct_bias_analytical`, :func:`adaround`, :func:`preserve_filter_sums`, :func:`loss_aware_output_range`.
:func:`quantize` chains them (region by region for detectors: :func:`quantize_regions`).
"""
from .act_eq import ActEqReport, equalize_activations
from .adaround import AdaRoundReport, adaround
from .bias_correction import BiasCorrectionReport, correct_bias, correct_bias_analytical
from .bn_fold import FoldReport, fold_batch_norms
from .dc_round import DCRoundReport, preserve_filter_sums
from .cle import CLEReport, absorb_high_biases, cross_layer_equalization
from .data_free import Moments, clipped_normal_moments, propagate_moments, set_bn_ranges
from .loss_aware import LossAwareReport, loss_aware_output_range
from .pipeline import STAGES, QuantizeReport, QuantizeResult, quantize
from .regions import quantize_regions
from .smooth import SmoothReport, smooth_linear_inputs

__all__ = [
    "fold_batch_norms", "FoldReport", "cross_layer_equalization", "absorb_high_biases", "CLEReport",
    "equalize_activations", "ActEqReport", "smooth_linear_inputs", "SmoothReport",
    "correct_bias", "correct_bias_analytical", "BiasCorrectionReport", "set_bn_ranges", "propagate_moments",
    "Moments", "clipped_normal_moments", "adaround", "AdaRoundReport", "preserve_filter_sums", "DCRoundReport",
    "loss_aware_output_range",
    "LossAwareReport", "quantize", "quantize_regions", "QuantizeResult", "QuantizeReport", "STAGES",
]
