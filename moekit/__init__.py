"""moekit: profile, shrink and run Mixture-of-Experts language models on the hardware you have."""

__version__ = "0.1.0"
