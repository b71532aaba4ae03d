"""Synthetic thorax PET/CT studies with breathing motion and GTV/IGTV truth."""
