"""fp8lab compare: BF16 vs FP8 recipes side by side, with a verdict and a report."""
