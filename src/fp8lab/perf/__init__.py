"""Performance models and measurements below training: the roofline (roofline.py), GEMM and
layer timings with their caches (measure.py), and the layer policy, which linears FP8 makes
faster (layer_policy.py). Imports nothing here: the roofline stays usable without torch."""
