//! `curvature --data self:N`: the model writes its own source set, kept as JSONL beside
//! the curvature file; the estimate is reproducible from that file.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{bin, fixture, smollm2};
use serde_json::Value;

fn curvature(args: &[&str]) -> std::process::Output {
    let model = fixture("tiny-gqa/model");
    let mut cmd = bin();
    cmd.arg("curvature")
        .arg("--model")
        .arg(&model)
        .args(["--quiet", "--scheme", "diag", "--fisher", "mc"])
        .args(args);
    cmd.output().unwrap()
}

fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn refused(out: std::process::Output, says: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let last = err.lines().last().unwrap_or("");
    assert!(last.contains(says), "{last}");
}

fn rows(p: &Path) -> Vec<(Vec<i64>, Vec<i64>)> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let ints = |k: &str| {
                v[k].as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_i64().unwrap())
                    .collect::<Vec<_>>()
            };
            (ints("input_ids"), ints("labels"))
        })
        .collect()
}

/// Tensor bytes by name, and the metadata, of a safetensors file.
fn tensors(p: &Path) -> (BTreeMap<String, Vec<u8>>, BTreeMap<String, String>) {
    let b = std::fs::read(p).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let header: BTreeMap<String, Value> = serde_json::from_slice(&b[8..8 + n]).unwrap();
    let mut t = BTreeMap::new();
    let mut meta = BTreeMap::new();
    for (k, v) in header {
        if k == "__metadata__" {
            for (mk, mv) in v.as_object().unwrap() {
                meta.insert(mk.clone(), mv.as_str().unwrap().to_string());
            }
            continue;
        }
        let off = v["data_offsets"].as_array().unwrap();
        let (s, e) = (
            off[0].as_u64().unwrap() as usize,
            off[1].as_u64().unwrap() as usize,
        );
        t.insert(k, b[8 + n + s..8 + n + e].to_vec());
    }
    (t, meta)
}

#[test]
fn self_generated_source_is_kept_and_reproduces_the_estimate() {
    let d = tempfile::tempdir().unwrap();
    let five = d.path().join("five.safetensors");
    let three = d.path().join("three.safetensors");
    let again = d.path().join("again.safetensors");
    let tokens = ["--self-tokens", "12"];
    ok(curvature(
        &[
            &["--data", "self:5", "--out", five.to_str().unwrap()],
            &tokens[..],
        ]
        .concat(),
    ));
    ok(curvature(
        &[
            &["--data", "self:3", "--out", three.to_str().unwrap()],
            &tokens[..],
        ]
        .concat(),
    ));
    let kept = d.path().join("five.self.jsonl");
    let seqs = rows(&kept);
    assert_eq!(seqs.len(), 5);
    for (ids, labels) in &seqs {
        // BOS (the tiny config's id 1) is context; every sampled token is a target.
        assert_eq!(ids[0], 1);
        assert_eq!(labels[0], -100);
        assert_eq!(&ids[1..], &labels[1..]);
        assert!((2..=13).contains(&ids.len()), "{}", ids.len());
        assert!(ids.iter().all(|&t| (0..512).contains(&t)));
    }
    // Distinct seeds per sequence, and self:3 is the first three of self:5.
    assert_ne!(seqs[0], seqs[1]);
    assert_eq!(rows(&d.path().join("three.self.jsonl")), seqs[..3]);

    let (t5, meta) = tensors(&five);
    assert!(
        meta["data"].starts_with("self-generated: 5 sequences"),
        "{}",
        meta["data"]
    );
    assert_eq!(meta["n_sequences"], "5");
    // The kept file reproduces the estimate bit for bit (same batches, same MC seed).
    ok(curvature(&[
        "--data",
        kept.to_str().unwrap(),
        "--out",
        again.to_str().unwrap(),
    ]));
    let (t_again, meta_again) = tensors(&again);
    assert_eq!(t5, t_again);
    assert_eq!(meta_again["data"], kept.to_str().unwrap());
}

#[test]
fn self_generated_source_refuses_bad_requests() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("c.safetensors");
    let out = out.to_str().unwrap();
    refused(
        curvature(&["--data", "self:0", "--out", out]),
        "`self:N` with N >= 1 sequences",
    );
    refused(
        curvature(&["--data", "self:2", "--self-tokens", "200", "--out", out]),
        "max_position_embeddings",
    );
    let prompts = d.path().join("prompts.txt");
    std::fs::write(&prompts, "Once upon a time\n").unwrap();
    // The tiny fixture has no tokenizer to read prompts with.
    refused(
        curvature(&[
            "--data",
            "self:2",
            "--self-prompts",
            prompts.to_str().unwrap(),
            "--out",
            out,
        ]),
        "prompts.txt: --self-prompts needs a tokenizer",
    );
    let batch = fixture("tiny-gqa/batch.jsonl");
    refused(
        curvature(&[
            "--data",
            batch.to_str().unwrap(),
            "--self-prompts",
            prompts.to_str().unwrap(),
            "--out",
            out,
        ]),
        "--self-prompts goes with --data self:N",
    );
    // So does --self-tokens (it was ignored without a word).
    refused(
        curvature(&[
            "--data",
            batch.to_str().unwrap(),
            "--self-tokens",
            "12",
            "--out",
            out,
        ]),
        "--self-tokens goes with --data self:N",
    );
    assert!(!Path::new(out).exists());
    assert!(!d.path().join("c.self.jsonl").exists());
}

/// On the default model, from prompts: prompt tokens are context, samples are targets.
#[test]
fn self_generated_source_from_prompts_on_smollm2() {
    let d = tempfile::tempdir().unwrap();
    let prompts = d.path().join("prompts.txt");
    std::fs::write(
        &prompts,
        "The weather today\n\nIn the history of science,\n",
    )
    .unwrap();
    let out = d.path().join("c.safetensors");
    let mut cmd = bin();
    cmd.arg("curvature")
        .arg("--model")
        .arg(smollm2())
        .args([
            "--quiet", "--scheme", "diag", "--fisher", "mc", "--data", "self:3",
        ])
        .args(["--self-tokens", "6", "--rank", "2", "--targets", "q_proj"])
        .arg("--self-prompts")
        .arg(&prompts)
        .arg("--out")
        .arg(&out);
    ok(cmd.output().unwrap());
    let seqs = rows(&d.path().join("c.self.jsonl"));
    assert_eq!(seqs.len(), 3);
    let (a, b) = (&seqs[0].0, &seqs[1].0);
    // Sequences 0 and 2 start from the first prompt, 1 from the second (blank lines skipped).
    assert_eq!(seqs[2].0[..3], a[..3]);
    assert_ne!(a[..3], b[..3]);
    for (ids, labels) in &seqs {
        let context = labels.iter().take_while(|&&l| l == -100).count();
        assert!(context >= 3, "the prompt is context: {labels:?}");
        assert_eq!(&ids[context..], &labels[context..]);
        assert!((1..=6).contains(&(ids.len() - context)));
    }
    let (_, meta) = tensors(&out);
    assert!(meta["data"].contains("2 prompts from"), "{}", meta["data"]);
}
