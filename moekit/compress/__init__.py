"""Compression: calibration statistics in, a plan out; applying a plan edits the model's experts in place."""
