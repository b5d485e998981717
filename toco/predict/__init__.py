"""Prediction on new images: the Python API (`load_segmenter`, `Segmenter`), the batch writer
behind predict.py, and how predict reads its inputs."""
