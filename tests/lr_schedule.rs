//! The learning rate of every step against transformers' schedules with warm-up, as a torch
//! optimiser steps under them (scripts/check-lr-schedule.py writes
//! `tests/fixtures/lr-schedules.json`): warm-up `lr t / W` from 0 at step 0, then cosine,
//! linear or constant.

mod common;

use common::fixture;
use lalora_engine::train::{Schedule, TrainConfig};
use serde_json::Value;

/// The engine computes in f32 (a cosine and a few products, each within an ulp), the
/// fixture in f64: a few times f32's 6e-8 of the peak rate, with room.
const BOUND: f64 = 1e-6;

#[test]
fn every_steps_rate_matches_transformers() {
    let text = std::fs::read_to_string(fixture("lr-schedules.json")).unwrap();
    let refs: Value = serde_json::from_str(&text).unwrap();
    let cases = refs["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 12);
    for c in cases {
        let name = c["schedule"].as_str().unwrap();
        let cfg = TrainConfig {
            steps: c["steps"].as_u64().unwrap() as usize,
            warmup_steps: c["warmup"].as_u64().unwrap() as usize,
            lr: c["lr"].as_f64().unwrap() as f32,
            schedule: name.parse::<Schedule>().unwrap(),
            ..TrainConfig::default()
        };
        let want = c["lrs"].as_array().unwrap();
        assert_eq!(want.len(), cfg.steps);
        for (t, w) in want.iter().enumerate() {
            let (got, w) = (cfg.lr_at(t) as f64, w.as_f64().unwrap());
            assert!(
                (got - w).abs() <= BOUND * cfg.lr as f64,
                "{name}, {} steps, warm-up {}: step {t} at {got}, transformers {w}",
                cfg.steps,
                cfg.warmup_steps
            );
        }
    }
}
