"""Calibration: measuring a model's sensitivity to cache loss, the profiles that keep it, and the quality protocol both use."""
