"""Writes an int8 variant of an ONNX embedding folder with ONNX Runtime's dynamic quantization:
the weight MatMuls only, weights signed int8 per output channel, activations quantized per
batch at run time; embeddings, attention and LayerNorm stay f32 (quantizing those too, ORT's
default, measured min cosine 0.91 against sentence-transformers; this 0.99). Tokenizer and
configs are copied. Bench only: accuracy is measured by accuracy.py, not assumed.

    python quantize_int8.py SRC_DIR DEST_DIR
"""
import shutil
import sys
from pathlib import Path

from onnxruntime.quantization import QuantType, quantize_dynamic

src, dest = Path(sys.argv[1]), Path(sys.argv[2])
dest.mkdir(parents=True, exist_ok=True)
for f in src.iterdir():
    if f.name != "model.onnx":
        (shutil.copytree(f, dest / f.name, dirs_exist_ok=True) if f.is_dir() else shutil.copyfile(f, dest / f.name))
quantize_dynamic(
    str(src / "model.onnx"),
    str(dest / "model.tmp.onnx"),
    weight_type=QuantType.QInt8,
    op_types_to_quantize=["MatMul"],
    per_channel=True,
    extra_options={"MatMulConstBOnly": True},
)
(dest / "model.tmp.onnx").rename(dest / "model.onnx")
print(f"quantize_int8: {(dest / 'model.onnx').stat().st_size} bytes -> {dest}")
