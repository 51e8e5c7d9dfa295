"""Statistics collectors (observers) and the range methods that turn them into quantization parameters."""
from .ranges import RANGE_METHODS, choose_range, compute_qparams, make_observer
from .stats import HistogramObserver, MeanMinMaxObserver, MedianMinMaxObserver, MinMaxObserver, MovingAverageMinMaxObserver

__all__ = ["MinMaxObserver", "MovingAverageMinMaxObserver", "MeanMinMaxObserver", "MedianMinMaxObserver", "HistogramObserver", "RANGE_METHODS",
           "make_observer", "choose_range", "compute_qparams"]
