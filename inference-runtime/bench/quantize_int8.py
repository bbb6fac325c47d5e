"""Writes an int8 variant of an ONNX embedding folder with ONNX Runtime's dynamic quantization
(MatMul weights as signed int8 per tensor, activations quantized at run time), tokenizer and
configs copied. Bench only: accuracy is measured by accuracy.py, not assumed.

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
quantize_dynamic(str(src / "model.onnx"), str(dest / "model.tmp.onnx"), weight_type=QuantType.QInt8)
(dest / "model.tmp.onnx").rename(dest / "model.onnx")
print(f"quantize_int8: {(dest / 'model.onnx').stat().st_size} bytes -> {dest}")
