//! The ONNX Runtime engine against the PyTorch reference and the candle engine, same weights.

use serde_json::json;
use tessera_runtime::config::Serving;

use crate::embeddings::reference;
use crate::support::{self, MINILM, MINILM_ONNX, cosine, get, post};

/// The ONNX graph is the same model: vectors agree with sentence-transformers (PyTorch) and
/// with candle far inside the 0.999 cosine bound; the bound itself is what serving promises.
#[test]
fn onnx_minilm_matches_pytorch_and_candle() {
    let Some((mut ort, plan)) = support::load_ort(MINILM_ONNX) else {
        return;
    };
    let Some(mut candle) = support::load(MINILM) else {
        return;
    };
    assert_eq!(plan.engine.as_str(), "ort");
    let (sentences, want) = reference();
    let enc = ort.tokenizer().encode_batch(sentences.clone(), true).unwrap();
    assert_eq!(enc[3].len(), 256, "the same truncation at max_seq_length");
    let candle_enc = candle.tokenizer().encode_batch(sentences.clone(), true).unwrap();
    for (a, b) in enc.iter().zip(&candle_enc) {
        assert_eq!(a.get_ids(), b.get_ids(), "the same tokenizer");
    }
    let got = ort.embed(&enc).unwrap();
    let from_candle = candle.embed(&candle_enc).unwrap();
    let (mut worst_cos, mut worst_diff) = (1f64, 0f32);
    for i in 0..sentences.len() {
        assert_eq!(got[i].len(), 384);
        let norm: f64 = got[i].iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "sentence {i}: norm {norm}");
        let c_ref = cosine(&got[i], &want[i]);
        let c_candle = cosine(&got[i], &from_candle[i]);
        assert!(c_ref >= 0.999, "sentence {i}: cosine to PyTorch {c_ref}");
        assert!(c_candle >= 0.999, "sentence {i}: cosine to candle {c_candle}");
        let worst = got[i].iter().zip(&want[i]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-4, "sentence {i}: max abs diff to PyTorch {worst}");
        worst_cos = worst_cos.min(c_ref);
        worst_diff = worst_diff.max(worst);
    }
    println!("ORT vs PyTorch: min cosine {worst_cos:.9}, max abs diff {worst_diff:e}");
    // Alone, without batch mates or padding, the vector is the same.
    let one = ort.embed(&enc[2..3]).unwrap();
    assert!(cosine(&one[0], &got[2]) > 0.99999, "padding leaks into the vector");
}

/// The set-up's graph is the packed one (dense ops on the real tokens only): its token rows go
/// back to the right sequences whatever the order and padding of the batch.
#[test]
fn packed_onnx_graph_keeps_rows_with_their_sequences() {
    let Some(dir) = support::model_dir(MINILM_ONNX) else {
        return;
    };
    let stamp = std::fs::read_to_string(dir.join("export.json")).unwrap_or_default();
    assert!(
        stamp.contains("\"graph\": \"packed\""),
        "{} was written by an older exporter ({stamp:?}); run `bash scripts/fetch-models.sh`",
        dir.display()
    );
    let Some((mut ort, _)) = support::load_ort(MINILM_ONNX) else {
        return;
    };
    let (sentences, want) = reference();
    let enc = ort.tokenizer().encode_batch(sentences.clone(), true).unwrap();
    let forward = ort.embed(&enc).unwrap();
    let mut reversed = enc.clone();
    reversed.reverse();
    let backward = ort.embed(&reversed).unwrap();
    for i in 0..sentences.len() {
        let b = &backward[sentences.len() - 1 - i];
        assert!(cosine(&forward[i], b) > 0.99999, "sentence {i}: order changes its vector");
        assert!(cosine(b, &want[i]) >= 0.999, "sentence {i} reversed: cosine to PyTorch");
    }
    // No padding at all: two rows of the same length.
    let same = ort.embed(&[enc[0].clone(), enc[0].clone()]).unwrap();
    assert!(cosine(&same[0], &same[1]) > 0.99999 && cosine(&same[0], &forward[0]) > 0.99999);
}

#[tokio::test]
async fn ort_model_serves_openai_and_kserve_routes() {
    let Some(srv) = support::start(MINILM_ONNX, Serving::default()).await else {
        return;
    };
    let (sentences, want) = reference();
    let r = post(srv.addr, "/v1/embeddings", json!({"model": MINILM_ONNX, "input": sentences})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["model"], MINILM_ONNX);
    for (i, d) in v["data"].as_array().unwrap().iter().enumerate() {
        let got: Vec<f32> = serde_json::from_value(d["embedding"].clone()).unwrap();
        assert!(cosine(&got, &want[i]) >= 0.999, "http sentence {i}");
    }
    let md = get(srv.addr, "/v2/models/minilm-onnx").await.json();
    assert_eq!(md["platform"], "ort_bert");
    assert_eq!(md["parameters"]["engine"], "ort");
    assert_eq!(md["outputs"][0]["shape"], json!([-1, 384]));
}
