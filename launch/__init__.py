"""Thin entry points: train.py (DeepSpeed), evaluate.py, predict.py, demo.py."""
