//! PEFT adapters whose adapter_config.json and tensors disagree, options that change the
//! model and are not supported, and LoRA flags that contradict an adapter or curvature
//! file (PEFT takes the shape from the file; a flag that says otherwise is an error).

use std::collections::BTreeMap;

use lalora_engine::io::{TensorFile, write_safetensors};
use serde_json::{Value, json};

use super::*;

/// A named edit of adapter_config.json and the words its error must contain.
type Refusal = (&'static str, Box<dyn Fn(&mut Value)>, &'static str);
/// A named edit of adapter_config.json and which tensors (by name) the adapter keeps.
type Acceptance<'a> = (
    &'static str,
    Box<dyn Fn(&mut Value)>,
    &'a dyn Fn(&str) -> bool,
);

/// A copy of the fixture adapter: config.json edited by `edit`, tensors kept by `keep`.
fn adapter_with(dir: &Path, edit: impl FnOnce(&mut Value), keep: impl Fn(&str) -> bool) -> PathBuf {
    let (src, a) = (fixture("tiny-gqa/adapter"), dir.join("adapter"));
    std::fs::create_dir_all(&a).unwrap();
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap())
            .unwrap();
    edit(&mut cfg);
    std::fs::write(a.join("adapter_config.json"), cfg.to_string()).unwrap();
    let t = TensorFile::read(&src.join("adapter_model.safetensors")).unwrap();
    let kept: Vec<(String, Vec<usize>, &[f32])> = t
        .tensors
        .iter()
        .filter(|(name, _)| keep(name))
        .map(|(name, (shape, data))| (name.clone(), shape.clone(), data.as_slice()))
        .collect();
    write_safetensors(&a.join("adapter_model.safetensors"), &kept, BTreeMap::new()).unwrap();
    a
}

fn eval_with(adapter: &Path) -> Run {
    run_args(&argv(&[
        &"eval",
        &"--model",
        &fixture("tiny-gqa/model"),
        &"--adapter",
        &adapter,
        &"--data",
        &fixture("tiny-gqa/batch.jsonl"),
    ]))
}

#[test]
fn adapter_config_must_describe_its_tensors() {
    let all = |_: &str| true;
    let refused: Vec<Refusal> = vec![
        (
            "q_proj only",
            Box::new(|c| c["target_modules"] = json!(["q_proj"])),
            "k_proj",
        ),
        (
            "layer 0 only",
            Box::new(|c| c["layers_to_transform"] = json!([0])),
            "layers.1",
        ),
        (
            "exclude k_proj",
            Box::new(|c| c["exclude_modules"] = json!(["k_proj"])),
            "k_proj",
        ),
        (
            "lm_head",
            Box::new(|c| c["target_modules"] = json!(["q_proj", "lm_head"])),
            "lm_head",
        ),
        (
            "bad regex",
            Box::new(|c| c["target_modules"] = json!("(")),
            "regex",
        ),
        (
            "modules_to_save",
            Box::new(|c| c["modules_to_save"] = json!(["lm_head"])),
            "modules_to_save",
        ),
        (
            "layers_pattern",
            Box::new(|c| c["layers_pattern"] = json!("blocks")),
            "layers_pattern",
        ),
        (
            "layer_replication",
            Box::new(|c| c["layer_replication"] = json!([[0, 2]])),
            "layer_replication",
        ),
        ("fractional r", Box::new(|c| c["r"] = json!(4.5)), "`r`"),
        (
            "huge r",
            Box::new(|c| c["r"] = json!(100_000)),
            "hidden size",
        ),
        (
            "rslora string",
            Box::new(|c| c["use_rslora"] = json!("yes")),
            "use_rslora",
        ),
        (
            "no targets (PEFT: q, v)",
            Box::new(|c| c["target_modules"] = Value::Null),
            "k_proj",
        ),
    ];
    for (what, edit, needle) in refused {
        let d = tempfile::tempdir().unwrap();
        let r = eval_with(&adapter_with(d.path(), edit, all));
        assert_clean_error(&r, "adapter_config.json", what);
        assert!(r.stderr.contains(needle), "{what}: {}", r.stderr);
    }
    // What PEFT selects is honoured: these agree with their tensors and run.
    let layer0 = |n: &str| n.contains(".layers.0.");
    let no_k = |n: &str| !n.contains("k_proj");
    let q_v = |n: &str| n.contains("q_proj") || n.contains("v_proj");
    let accepted: Vec<Acceptance> = vec![
        (
            "all-linear",
            Box::new(|c| c["target_modules"] = json!("all-linear")),
            &all,
        ),
        (
            "regex",
            Box::new(|c| c["target_modules"] = json!(r".*\.(self_attn|mlp)\..*_proj")),
            &all,
        ),
        (
            "layers_to_transform [0]",
            Box::new(|c| c["layers_to_transform"] = json!([0])),
            &layer0,
        ),
        (
            "layers_to_transform 0",
            Box::new(|c| c["layers_to_transform"] = json!(0)),
            &layer0,
        ),
        (
            "exclude k_proj",
            Box::new(|c| c["exclude_modules"] = json!(["k_proj"])),
            &no_k,
        ),
        (
            "no targets (PEFT: q, v)",
            Box::new(|c| c["target_modules"] = Value::Null),
            &q_v,
        ),
    ];
    for (what, edit, keep) in accepted {
        let d = tempfile::tempdir().unwrap();
        assert_runs(&eval_with(&adapter_with(d.path(), edit, keep)), what);
    }
}

#[test]
fn lora_flags_must_agree_with_the_files() {
    let d = tempfile::tempdir().unwrap();
    let (model, data) = (fixture("tiny-gqa/model"), fixture("tiny-gqa/batch.jsonl"));
    let adapter = fixture("tiny-gqa/adapter");
    let curvature = |name: &str, flags: &[&str]| {
        let p = d.path().join(name);
        let mut a = curvature_args(&model, &data, &p);
        a.extend(flags.iter().map(OsString::from));
        assert_runs(&run_args(&a), name);
        p
    };
    let c16 = curvature("r8-alpha16.safetensors", &[]);
    let c2 = curvature("r2.safetensors", &["--rank", "2"]);
    let out = d.path().join("out");
    let train = |flags: &[&dyn AsRef<OsStr>]| {
        let mut a = argv(&[
            &"train", &"--model", &model, &"--data", &data, &"--steps", &"1",
        ]);
        a.extend(argv(flags));
        a.extend(argv(&[&"--out", &out]));
        run_args(&a)
    };
    let cases: [(&[&dyn AsRef<OsStr>], &str, &str); 5] = [
        (
            &[&"--adapter", &adapter, &"--rank", &"16"],
            "adapter_config.json",
            "--rank 16",
        ),
        (
            &[&"--adapter", &adapter, &"--targets", &"q_proj"],
            "adapter_config.json",
            "--targets",
        ),
        (
            &[&"--adapter", &adapter, &"--rslora"],
            "adapter_config.json",
            "--rslora",
        ),
        (
            &[&"--curvature", &c16, &"--alpha", &"32"],
            "r8-alpha16",
            "--alpha 32",
        ),
        (
            &[&"--curvature", &c2, &"--adapter", &adapter],
            "r2.safetensors",
            "r=2",
        ),
    ];
    for (flags, file, needle) in cases {
        let r = train(flags);
        assert_clean_error(&r, file, needle);
        assert!(r.stderr.contains(needle), "{needle}: {}", r.stderr);
        assert!(!out.exists(), "{needle}: output written");
    }
    let r = run_args(&argv(&[
        &"curvature",
        &"--model",
        &model,
        &"--data",
        &data,
        &"--adapter",
        &adapter,
        &"--rank",
        &"2",
        &"--out",
        &d.path().join("c.safetensors"),
    ]));
    assert_clean_error(&r, "adapter_config.json", "curvature --adapter --rank");
    // Repeating the file's own values is no contradiction.
    assert_runs(
        &train(&[&"--adapter", &adapter, &"--rank", &"4", &"--alpha", &"8"]),
        "flags equal to the adapter's",
    );
}

#[test]
fn partial_adapters_round_trip() {
    // An adapter on layer 0 only, and one without k_proj on layer 1: trained and saved,
    // the adapter written must select exactly its modules again.
    let cases: [Acceptance; 2] = [
        (
            "layers_to_transform [0]",
            Box::new(|c| c["layers_to_transform"] = json!([0])),
            &|n| n.contains(".layers.0."),
        ),
        (
            "exclude layer 1 k_proj",
            Box::new(|c| c["exclude_modules"] = json!(["model.layers.1.self_attn.k_proj"])),
            &|n| !n.contains(".layers.1.self_attn.k_proj"),
        ),
    ];
    for (what, edit, keep) in cases {
        let d = tempfile::tempdir().unwrap();
        let a = adapter_with(d.path(), edit, keep);
        let out = d.path().join("trained");
        let r = run_args(&argv(&[
            &"train",
            &"--model",
            &fixture("tiny-gqa/model"),
            &"--data",
            &fixture("tiny-gqa/batch.jsonl"),
            &"--adapter",
            &a,
            &"--steps",
            &"1",
            &"--out",
            &out,
        ]));
        assert_runs(&r, what);
        assert_runs(&eval_with(&out), &format!("{what}, reloaded"));
        let t = TensorFile::read(&out.join("adapter_model.safetensors")).unwrap();
        let before = TensorFile::read(&a.join("adapter_model.safetensors")).unwrap();
        let names = |f: &TensorFile| f.tensors.keys().cloned().collect::<Vec<_>>();
        assert_eq!(names(&t), names(&before), "{what}: modules changed");
    }
}
