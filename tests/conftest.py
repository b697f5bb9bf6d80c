"""Shared pytest setup: tests/ on sys.path so test helper modules import by name."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
# Never reach a model hub from tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

try:  # one intra-op thread: small models on a shared 2-core machine run faster without oversubscription
    import torch

    torch.set_num_threads(1)
except ImportError:
    pass
