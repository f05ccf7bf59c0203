//! Curvature files that are damaged, incomplete, not a Fisher (negative diagonal,
//! asymmetric or indefinite factors), or made for another model: `train` refuses them
//! naming the file, before writing anything.

use std::collections::BTreeMap;

use lalora_engine::io::{TensorFile, write_safetensors};

use super::*;

type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Make a `scheme` curvature file on the tiny model (q_proj and down_proj at rank 2).
fn estimate(dir: &Path, scheme: &str) -> TensorFile {
    let p = dir.join(format!("{scheme}.safetensors"));
    let r = run_args(&argv(&[
        &"curvature",
        &"--model",
        &fixture("tiny-gqa/model"),
        &"--data",
        &fixture("tiny-gqa/batch.jsonl"),
        &"--scheme",
        &scheme,
        &"--rank",
        &"2",
        &"--targets",
        &"q_proj,down_proj",
        &"--out",
        &p,
    ]));
    assert_runs(&r, scheme);
    TensorFile::read(&p).unwrap()
}

/// The first tensor whose name starts with `prefix` and ends with `suffix`.
fn first<'a>(t: &'a mut Tensors, prefix: &str, suffix: &str) -> &'a mut (Vec<usize>, Vec<f32>) {
    t.iter_mut()
        .find(|(k, _)| k.starts_with(prefix) && k.ends_with(suffix))
        .map(|(_, v)| v)
        .unwrap()
}

/// `train` with `file` edited by `edit`: refused naming it, nothing written.
fn assert_refused(
    dir: &Path,
    file: &TensorFile,
    edit: &dyn Fn(&mut BTreeMap<String, String>, &mut Tensors),
    needle: &str,
    what: &str,
) {
    let (mut meta, mut tensors) = (file.metadata.clone(), file.tensors.clone());
    edit(&mut meta, &mut tensors);
    let p = dir.join("edited.safetensors");
    let list: Vec<(String, Vec<usize>, &[f32])> = tensors
        .iter()
        .map(|(k, (s, d))| (k.clone(), s.clone(), d.as_slice()))
        .collect();
    write_safetensors(&p, &list, meta).unwrap();
    let out = dir.join("out");
    let r = run_args(&argv(&[
        &"train",
        &"--model",
        &fixture("tiny-gqa/model"),
        &"--data",
        &fixture("tiny-gqa/batch.jsonl"),
        &"--curvature",
        &p,
        &"--lambda",
        &"1",
        &"--steps",
        &"1",
        &"--out",
        &out,
    ]));
    assert_clean_error(&r, "edited.safetensors", what);
    assert!(r.stderr.contains(needle), "{what}: {}", r.stderr);
    assert!(!out.exists(), "{what}: output written");
}

/// Replace the `n x n` matrix `x` by one that passes every 2x2 test but has the
/// eigenvalue -0.8 (its top-left block is [[1, .9, -.9], [.9, 1, .9], [-.9, .9, 1]]).
fn indefinite(x: &mut [f32], n: usize) {
    x.fill(0.0);
    for i in 0..n {
        x[i * n + i] = 1.0;
    }
    for (i, j, v) in [(0, 1, 0.9), (0, 2, -0.9), (1, 2, 0.9)] {
        x[i * n + j] = v;
        x[j * n + i] = v;
    }
}

#[test]
fn curvature_files_are_checked() {
    let d = tempfile::tempdir().unwrap();
    let (diag, kfac) = (estimate(d.path(), "diag"), estimate(d.path(), "kfac"));
    type Edit = Box<dyn Fn(&mut BTreeMap<String, String>, &mut Tensors)>;
    let diag_cases: Vec<(&str, Edit, &str)> = vec![
        (
            "negative diag",
            Box::new(|_, t| first(t, "diag.", "B.weight").1[0] = -1.0),
            ">= 0",
        ),
        (
            "NaN diag",
            Box::new(|_, t| first(t, "diag.", "A.weight").1[1] = f32::NAN),
            "NaN",
        ),
        (
            "infinite mean",
            Box::new(|_, t| first(t, "mean.", "A.weight").1[0] = f32::INFINITY),
            "inf",
        ),
        (
            "a mean tensor missing",
            Box::new(|_, t| {
                let k = t.keys().find(|k| k.starts_with("mean.")).unwrap().clone();
                t.remove(&k);
            }),
            "missing",
        ),
        (
            "a layer the model lacks",
            Box::new(|_, t| {
                let name = "mean.base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight";
                t.insert(name.into(), (vec![2, 64], vec![0.0; 128]));
            }),
            "layer 7",
        ),
        (
            "a kfac tensor in a diag file",
            Box::new(|_, t| {
                let name = "kfac_in.base_model.model.model.layers.0.self_attn.q_proj.lora_B";
                t.insert(name.into(), (vec![2, 2], vec![0.0; 4]));
            }),
            "unexpected",
        ),
        (
            "n_sequences 0",
            Box::new(|m, _| _ = m.insert("n_sequences".into(), "0".into())),
            "n_sequences",
        ),
        (
            "alpha NaN",
            Box::new(|m, _| _ = m.insert("lora_alpha".into(), "nan".into())),
            "lora_alpha",
        ),
        (
            "targets",
            Box::new(|m, _| _ = m.insert("lora_targets".into(), "q_proj".into())),
            "lora_targets",
        ),
        (
            "rslora",
            Box::new(|m, _| _ = m.insert("lora_rslora".into(), "yes".into())),
            "lora_rslora",
        ),
        (
            "another model",
            Box::new(|m, _| _ = m.insert("model".into(), "other.gguf (123 bytes)".into())),
            "other.gguf",
        ),
    ];
    for (what, edit, needle) in &diag_cases {
        assert_refused(d.path(), &diag, edit, needle, what);
    }
    let kfac_cases: Vec<(&str, Edit, &str)> = vec![
        (
            "asymmetric factor",
            Box::new(|_, t| first(t, "kfac_out.", "q_proj.lora_B").1[1] += 5.0),
            "not symmetric",
        ),
        (
            "negative-definite factor",
            Box::new(|_, t| {
                first(t, "kfac_in.", "q_proj.lora_A")
                    .1
                    .iter_mut()
                    .for_each(|x| *x = -*x)
            }),
            "positive semi-definite",
        ),
        (
            "indefinite factor",
            Box::new(|_, t| {
                let (s, x) = first(t, "kfac_out.", "q_proj.lora_B");
                indefinite(x, s[0]);
            }),
            "positive semi-definite",
        ),
        (
            // The message names the first damaged tensor in name order (`kfac_in.`
            // before `kfac_out.`), whichever was damaged first.
            "two damaged factors",
            Box::new(|_, t| {
                first(t, "kfac_out.", "q_proj.lora_B").1[1] += 5.0;
                first(t, "kfac_in.", "q_proj.lora_A").1[1] += 5.0;
            }),
            "`kfac_in.",
        ),
        (
            "factor shape",
            Box::new(|_, t| first(t, "kfac_in.", "lora_B").0 = vec![1, 4]),
            "shape",
        ),
    ];
    for (what, edit, needle) in &kfac_cases {
        assert_refused(d.path(), &kfac, edit, needle, what);
    }
}
