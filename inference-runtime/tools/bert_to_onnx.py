"""Writes a BERT-family sentence-embedding model as ONNX, straight from its safetensors weights.

    python3 bert_to_onnx.py SRC_DIR DEST_DIR [--padded]

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

By default the graph is "packed": it gathers the batch's real tokens (attention_mask 1) into
[tokens, hidden] rows, runs every dense op on those rows (one Gemm for Q, K and V together, the
output and feed-forward Gemms, GELU, residuals, LayerNorms), and scatters to the padded
[batch, seq] grid only for the attention scores and the output, whose padding rows are zero.
Same inputs and outputs, same arithmetic per real token; no work on padding outside attention.
`--padded` writes the previous graph, every op on the padded grid (kept for benchmarks).
DEST_DIR/export.json names the graph; it is written last and marks the folder complete.
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


def packed_layers(cfg, w, node, init, layer_norm, hidden, heads, head_dim):
    """The encoder on the batch's real tokens only: every dense op (the QKV, output and
    feed-forward projections, residuals, LayerNorms, GELU) runs on `[tokens, hidden]` rows, the
    padding removed; only the attention scores use the padded `[batch, heads, seq, seq]` grid.
    Returns `[batch, seq, hidden]` with zero rows at the padding."""

    def gemm(x, prefix, name, parts=None):
        names = parts or [prefix]
        wt = np.concatenate([w[n + ".weight"].T for n in names], axis=1)  # torch stores [out, in]
        b = np.concatenate([w[n + ".bias"] for n in names])
        return node("Gemm", [x, init(name + ".weight_t", wt), init(name + ".bias", b)], name)

    init("c_flat", np.array([-1], np.int64))
    init("c_one_i", np.array(1, np.int64))
    init("c_axis0", np.array(0, np.int64))
    init("c_axes_0", np.array([0], np.int64))
    init("c_pad_row", np.array([0, 0, 1, 0], np.int64))
    init("c_zero_i", np.array(0, np.int64))
    init("c_qkv_tail", np.array([3, heads, head_dim], np.int64))
    init("c_hidden_1d", np.array([hidden], np.int64))
    init("c_rows_shape", np.array([-1, hidden], np.int64))
    for k in range(3):
        init(f"c_i{k}", np.array([k], np.int64))

    # Where the real tokens are: `idx` lists their flat positions in [batch * seq] (row-major);
    # `restore` maps each flat position to its token row, and `restore_pad` maps padding to one
    # zero row past the end (for the output). Inside the layers padding may read any row
    # (`restore_any`: token 0): its keys get the -inf mask and its query rows are dropped.
    grid = node("Shape", ["input_ids"], "grid")  # [batch, seq]
    seq = node("Shape", ["input_ids"], "seq_len", start=1, end=2)
    flat_mask = node("Reshape", ["attention_mask", "c_flat"], "mask_flat")
    idx = node("Squeeze", [node("NonZero", [flat_mask], "tok_nz"), "c_axes_0"], "tok_idx")
    count = node("ReduceSum", [flat_mask], "tok_count", keepdims=0)
    before = node("Sub", [node("CumSum", [flat_mask, "c_axis0"], "tok_cum"), "c_one_i"], "tok_row")
    real = node("Cast", [flat_mask], "mask_bool", to=TensorProto.BOOL)
    restore_pad = node("Where", [real, before, count], "tok_restore_pad")
    restore_any = node("Where", [real, before, "c_zero_i"], "tok_restore_any")

    def to_grid(rows, name):  # [tokens, d] -> [batch * seq, d], padding rows from token 0
        return node("Gather", [rows, restore_any], name, axis=0)

    # Embeddings of the real tokens: word + position (flat position mod seq) + token type.
    ids = node("Gather", [node("Reshape", ["input_ids", "c_flat"], "ids_flat"), idx], "tok_ids")
    pos = node("Mod", [idx, seq], "tok_pos")
    typ = node("Gather", [node("Reshape", ["token_type_ids", "c_flat"], "types_flat"), idx], "tok_types")
    word = node("Gather", [init("embeddings.word_embeddings.weight", w["embeddings.word_embeddings.weight"]), ids], "emb_word")
    posv = node("Gather", [init("embeddings.position_embeddings.weight", w["embeddings.position_embeddings.weight"]), pos], "emb_pos")
    typv = node("Gather", [init("embeddings.token_type_embeddings.weight", w["embeddings.token_type_embeddings.weight"]), typ], "emb_type")
    x = node("Add", [node("Add", [word, posv], "emb_sum0"), typv], "emb_sum")
    x = layer_norm(x, "embeddings.LayerNorm", "emb_ln")

    # Additive attention mask, [batch, 1, 1, seq].
    m = node("Cast", ["attention_mask"], "mask_f", to=TensorProto.FLOAT)
    m = node("Mul", [node("Sub", ["c_one_f", m], "mask_inv"), "c_min_f"], "mask_add")
    mask = node("Unsqueeze", [m, "c_axes_12"], "mask_ext")
    qkv_shape = node("Concat", [grid, "c_qkv_tail"], "qkv_shape", axis=0)  # [batch, seq, 3, heads, head_dim]

    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}"
        att = f"{p}.attention.self"
        qkv = gemm(x, None, f"l{i}_qkv", parts=[f"{att}.query", f"{att}.key", f"{att}.value"])
        qkv = node("Reshape", [to_grid(qkv, f"l{i}_qkv_grid"), qkv_shape], f"l{i}_qkv_r")
        qkv = node("Transpose", [qkv], f"l{i}_qkv_t", perm=[2, 0, 3, 1, 4])  # [3, batch, heads, seq, d]
        q, k, v = (
            node("Squeeze", [node("Gather", [qkv, f"c_i{j}"], f"l{i}_{n}0", axis=0), "c_axes_0"], f"l{i}_{n}")
            for j, n in enumerate("qkv")
        )
        k = node("Transpose", [k], f"l{i}_k_t", perm=[0, 1, 3, 2])
        s = node("Mul", [node("MatMul", [q, k], f"l{i}_qk"), "c_scale"], f"l{i}_scores0")
        s = node("Softmax", [node("Add", [s, mask], f"l{i}_scores")], f"l{i}_probs", axis=-1)
        ctx = node("Transpose", [node("MatMul", [s, v], f"l{i}_ctx0")], f"l{i}_ctx_t", perm=[0, 2, 1, 3])
        ctx = node("Gather", [node("Reshape", [ctx, "c_rows_shape"], f"l{i}_ctx_grid"), idx], f"l{i}_ctx", axis=0)
        a = gemm(ctx, f"{p}.attention.output.dense", f"l{i}_attn_out")
        x = layer_norm(node("Add", [a, x], f"l{i}_res1"), f"{p}.attention.output.LayerNorm", f"l{i}_ln1")
        h = gemm(x, f"{p}.intermediate.dense", f"l{i}_inter")
        erf = node("Erf", [node("Div", [h, "c_sqrt2"], f"l{i}_gelu_div")], f"l{i}_gelu_erf")
        g = node("Mul", [h, node("Add", [erf, "c_one_f"], f"l{i}_gelu_add")], f"l{i}_gelu_mul")
        g = node("Mul", [g, "c_half"], f"l{i}_gelu")
        o = gemm(g, f"{p}.output.dense", f"l{i}_out")
        x = layer_norm(node("Add", [o, x], f"l{i}_res2"), f"{p}.output.LayerNorm", f"l{i}_ln2")

    out_shape = node("Concat", [grid, "c_hidden_1d"], "out_shape", axis=0)
    out = node("Gather", [node("Pad", [x, "c_pad_row"], "out_pad"), restore_pad], "out_grid", axis=0)
    return node("Reshape", [out, out_shape], "out_padded")


def build(cfg, w, packed=True):
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

    if packed:
        x = packed_layers(cfg, w, node, init, layer_norm, hidden, heads, head_dim)
    else:
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
    used = {i for n in nodes for i in n.input}
    inits = [t for t in inits if t.name in used]  # the constants one graph kind does not use
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
    if packed:  # the runtime then runs a batch as one pass, not in groups of similar length
        helper.set_model_props(model, {"tessera.graph": "packed"})
    return model


def main():
    args = [a for a in sys.argv[1:] if a != "--padded"]
    if len(args) != 2:
        raise SystemExit("usage: bert_to_onnx.py SRC_DIR DEST_DIR [--padded]")
    src, dest = Path(args[0]), Path(args[1])
    cfg = json.loads((src / "config.json").read_text())
    model = build(cfg, read_safetensors(src / "model.safetensors"), packed="--padded" not in sys.argv[1:])
    onnx.checker.check_model(model, full_check=True)
    dest.mkdir(parents=True, exist_ok=True)
    for name in ["config.json", "tokenizer.json", "sentence_bert_config.json", "modules.json"]:
        if (src / name).is_file():
            shutil.copyfile(src / name, dest / name)
    if (src / "1_Pooling").is_dir():
        shutil.copytree(src / "1_Pooling", dest / "1_Pooling", dirs_exist_ok=True)
    stamp = dest / "export.json"
    stamp.unlink(missing_ok=True)
    tmp = dest / "model.onnx.tmp"
    onnx.save_model(model, str(tmp))
    tmp.rename(dest / "model.onnx")
    graph = "padded" if "--padded" in sys.argv[1:] else "packed"
    stamp.write_text(json.dumps({"graph": graph, "opset": 17}) + "\n")  # last: marks the folder complete
    print(f"bert_to_onnx: {len(model.graph.node)} nodes, {(dest / 'model.onnx').stat().st_size} bytes -> {dest}")


if __name__ == "__main__":
    main()
