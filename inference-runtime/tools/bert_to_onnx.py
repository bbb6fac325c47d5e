"""Writes a BERT-family sentence-embedding model as ONNX, straight from its safetensors weights.

    python3 bert_to_onnx.py SRC_DIR DEST_DIR

SRC_DIR is a sentence-transformers folder (config.json, model.safetensors, tokenizer.json,
sentence_bert_config.json); DEST_DIR gets model.onnx plus copies of the tokenizer and configs,
so the runtime's `ort` engine reads the same tokenizer, truncation and pooling settings.

The graph is HuggingFace's BertModel forward pass written out op by op (opset 17): embeddings
(word + position + token type, LayerNorm), then per layer self-attention with the additive
mask (1 - mask) * float32.min, residual + LayerNorm, exact erf GELU feed-forward, residual +
LayerNorm. Inputs `input_ids`, `attention_mask`, `token_type_ids` (int64, [batch, seq]); output
`last_hidden_state` (float32, [batch, seq, hidden]). Pooling and normalisation stay in the
runtime, as for the candle engine. No PyTorch needed: only numpy and onnx. Deterministic: the
same weights give the same file.
"""
import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}


def read_safetensors(path):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        arr = np.frombuffer(data[base + start : base + end], dtype=DTYPES[meta["dtype"]])
        out[name.removeprefix("bert.")] = arr.reshape(meta["shape"]).astype(np.float32, copy=False)
    return out


def build(cfg, w):
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = hidden // heads
    eps = float(cfg.get("layer_norm_eps", 1e-12))
    if cfg.get("hidden_act", "gelu") != "gelu" or cfg.get("position_embedding_type", "absolute") != "absolute":
        raise SystemExit("only BERT with exact GELU and absolute positions is supported")
    nodes, inits = [], []

    def init(name, arr):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def node(op, ins, name, **attrs):
        nodes.append(helper.make_node(op, ins, [name], name=name, **attrs))
        return name

    def linear(x, prefix, name):
        wt = init(prefix + ".weight_t", w[prefix + ".weight"].T)  # torch stores [out, in]
        b = init(prefix + ".bias", w[prefix + ".bias"])
        return node("Add", [node("MatMul", [x, wt], name + "_mm"), b], name)

    def layer_norm(x, prefix, name):
        g = init(prefix + ".weight", w[prefix + ".weight"])
        b = init(prefix + ".bias", w[prefix + ".bias"])
        return node("LayerNormalization", [x, g, b], name, axis=-1, epsilon=eps)

    init("c_zero_1d", np.array([0], np.int64))
    init("c_one_f", np.array(1.0, np.float32))
    init("c_min_f", np.array(np.finfo(np.float32).min, np.float32))
    init("c_scale", np.array(1.0 / np.sqrt(head_dim), np.float32))
    init("c_sqrt2", np.array(np.sqrt(2.0), np.float32))
    init("c_half", np.array(0.5, np.float32))
    init("c_split_shape", np.array([0, 0, heads, head_dim], np.int64))
    init("c_merge_shape", np.array([0, 0, hidden], np.int64))
    init("c_axes_12", np.array([1, 2], np.int64))

    # Embeddings.
    # Positions 0..seq: the first `seq` rows of the table (1-D shapes throughout).
    seq = node("Shape", ["input_ids"], "seq_len", start=1, end=2)
    word = node("Gather", [init("embeddings.word_embeddings.weight", w["embeddings.word_embeddings.weight"]), "input_ids"], "emb_word")
    table = init("embeddings.position_embeddings.weight", w["embeddings.position_embeddings.weight"])
    posv = node("Slice", [table, "c_zero_1d", seq, "c_zero_1d"], "emb_pos")
    typ = node("Gather", [init("embeddings.token_type_embeddings.weight", w["embeddings.token_type_embeddings.weight"]), "token_type_ids"], "emb_type")
    x = node("Add", [node("Add", [word, posv], "emb_sum0"), typ], "emb_sum")
    x = layer_norm(x, "embeddings.LayerNorm", "emb_ln")

    # Additive attention mask, [batch, 1, 1, seq].
    m = node("Cast", ["attention_mask"], "mask_f", to=TensorProto.FLOAT)
    m = node("Mul", [node("Sub", ["c_one_f", m], "mask_inv"), "c_min_f"], "mask_add")
    mask = node("Unsqueeze", [m, "c_axes_12"], "mask_ext")

    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}"
        q = linear(x, f"{p}.attention.self.query", f"l{i}_q")
        k = linear(x, f"{p}.attention.self.key", f"l{i}_k")
        v = linear(x, f"{p}.attention.self.value", f"l{i}_v")
        q = node("Transpose", [node("Reshape", [q, "c_split_shape"], f"l{i}_q_r")], f"l{i}_q_t", perm=[0, 2, 1, 3])
        k = node("Transpose", [node("Reshape", [k, "c_split_shape"], f"l{i}_k_r")], f"l{i}_k_t", perm=[0, 2, 3, 1])
        v = node("Transpose", [node("Reshape", [v, "c_split_shape"], f"l{i}_v_r")], f"l{i}_v_t", perm=[0, 2, 1, 3])
        s = node("Mul", [node("MatMul", [q, k], f"l{i}_qk"), "c_scale"], f"l{i}_scores0")
        s = node("Softmax", [node("Add", [s, mask], f"l{i}_scores")], f"l{i}_probs", axis=-1)
        ctx = node("Transpose", [node("MatMul", [s, v], f"l{i}_ctx0")], f"l{i}_ctx_t", perm=[0, 2, 1, 3])
        ctx = node("Reshape", [ctx, "c_merge_shape"], f"l{i}_ctx")
        a = linear(ctx, f"{p}.attention.output.dense", f"l{i}_attn_out")
        x = layer_norm(node("Add", [a, x], f"l{i}_res1"), f"{p}.attention.output.LayerNorm", f"l{i}_ln1")
        h = linear(x, f"{p}.intermediate.dense", f"l{i}_inter")
        erf = node("Erf", [node("Div", [h, "c_sqrt2"], f"l{i}_gelu_div")], f"l{i}_gelu_erf")
        g = node("Mul", [h, node("Add", [erf, "c_one_f"], f"l{i}_gelu_add")], f"l{i}_gelu_mul")
        g = node("Mul", [g, "c_half"], f"l{i}_gelu")
        o = linear(g, f"{p}.output.dense", f"l{i}_out")
        x = layer_norm(node("Add", [o, x], f"l{i}_res2"), f"{p}.output.LayerNorm", f"l{i}_ln2")

    nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="output"))
    ids = lambda n: helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
    graph = helper.make_graph(
        nodes,
        "bert",
        [ids("input_ids"), ids("attention_mask"), ids("token_type_ids")],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", hidden])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tessera bert_to_onnx")
    model.ir_version = 8
    return model


def main():
    src, dest = Path(sys.argv[1]), Path(sys.argv[2])
    cfg = json.loads((src / "config.json").read_text())
    model = build(cfg, read_safetensors(src / "model.safetensors"))
    onnx.checker.check_model(model, full_check=True)
    dest.mkdir(parents=True, exist_ok=True)
    for name in ["config.json", "tokenizer.json", "sentence_bert_config.json", "modules.json"]:
        if (src / name).is_file():
            shutil.copyfile(src / name, dest / name)
    if (src / "1_Pooling").is_dir():
        shutil.copytree(src / "1_Pooling", dest / "1_Pooling", dirs_exist_ok=True)
    tmp = dest / "model.onnx.tmp"
    onnx.save_model(model, str(tmp))
    tmp.rename(dest / "model.onnx")  # last: marks the folder complete
    print(f"bert_to_onnx: {len(model.graph.node)} nodes, {(dest / 'model.onnx').stat().st_size} bytes -> {dest}")


if __name__ == "__main__":
    main()
