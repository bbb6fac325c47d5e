"""Python baseline for docs/benchmarks.md: sentence-transformers behind FastAPI's /v1/embeddings.

One uvicorn worker, one torch thread, one encode at a time (a lock) — the same compute budget
as tessera-runtime's single worker with RAYON_NUM_THREADS=1. No batching across requests.

    pip install sentence-transformers fastapi uvicorn
    python inference-runtime/bench/baseline.py MODEL_DIR --port 8001
"""
import argparse
import threading

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from sentence_transformers import SentenceTransformer

parser = argparse.ArgumentParser()
parser.add_argument("model_dir")
parser.add_argument("--port", type=int, default=8001)
parser.add_argument("--name", default="minilm")
args = parser.parse_args()

torch.set_num_threads(1)
model = SentenceTransformer(args.model_dir, device="cpu")
lock = threading.Lock()
app = FastAPI()


class Req(BaseModel):
    model: str
    input: str | list[str]


@app.post("/v1/embeddings")
def embeddings(req: Req):  # sync: FastAPI runs it in its thread pool; the lock serialises compute
    texts = [req.input] if isinstance(req.input, str) else req.input
    with lock:
        emb = model.encode(texts, normalize_embeddings=True, batch_size=32)
    return {
        "object": "list",
        "model": args.name,
        "data": [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(emb)],
    }


uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", workers=1)
