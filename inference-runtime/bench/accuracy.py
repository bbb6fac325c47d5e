"""Cosine similarity of each server's /v1/embeddings to sentence-transformers run here, on the
same texts (the runtime's fixture sentences, the load generator's texts and a few more).
Prints one JSON line per server: min and mean cosine, max abs difference.

    python accuracy.py MODEL_DIR NAME=URL [NAME=URL ...]
"""
import json
import sys
import urllib.request

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

torch.set_num_threads(1)
model_dir, servers = sys.argv[1], sys.argv[2:]
texts = [
    "The quick brown fox jumps over the lazy dog.",
    "Tessera places inference servers on MIG slices.",
    "Ünïcödé text, emoji 🚀 and numbers 12345.",
    " ".join(["GPU"] * 400),
    "Tessera places inference servers on MIG slices and whole GPUs.",
    "A small embedding model can share an accelerator with many others.",
    "Kubernetes schedules pods; the extender decides which GPU slice they get.",
    "Dynamic batching trades a few milliseconds of waiting for much higher throughput.",
    "What is the capital of France?",
    "Sentence embeddings map text to vectors whose cosine similarity reflects meaning.",
    "Graceful drain fails readiness first, then finishes the requests already accepted.",
    "Paris is the capital and most populous city of France.",
    "int8 quantization trades a little accuracy for speed and memory.",
    "a",
    "The scheduler refuses a pod whose annotation is malformed, and says which one.",
    "Mixed-length batches are split into groups so padding stays small.",
]
want = SentenceTransformer(model_dir, device="cpu").encode(texts, normalize_embeddings=True, batch_size=32)
for s in servers:
    name, url = s.split("=", 1)
    req = urllib.request.Request(
        url + "/v1/embeddings",
        data=json.dumps({"model": "minilm", "input": texts}).encode(),
        headers={"content-type": "application/json"},
    )
    got = np.array([d["embedding"] for d in json.load(urllib.request.urlopen(req, timeout=120))["data"]])
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    print(json.dumps({"accuracy": name, "texts": len(texts), "min_cosine": float(cos.min()),
                      "mean_cosine": float(cos.mean()), "max_abs_diff": float(np.abs(got - want).max())}))
