"""Inference: sliding-window prediction, outputs in the input's grid."""
