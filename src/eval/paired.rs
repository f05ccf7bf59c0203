//! Standard errors of differences between two models scored on the same units.
//!
//! A sweep compares models on one fixed evaluation set, so the honest noise is how much a
//! difference would move with another draw of the set's units (sequences, questions), and
//! the comparison is paired: each unit is scored by both models, which cancels most of
//! the variation between units. Tokens of one sequence are not independent draws, so the
//! unit, not the token, is the sample.
//!
//! Per-token mean NLL is a ratio of sums over sequences, `sum_n L_n / sum_n T_n` (`L_n` a
//! sequence's summed loss, `T_n` its predicted tokens), and the difference of two such
//! means over the same sequences is `r = sum_n d_n / sum_n T_n` with `d_n = La_n - Lb_n`.
//! Its standard error is the delta-method (linearised ratio) one: with residuals
//! `e_n = d_n - r T_n`, `SE(r) = sqrt(N / (N - 1) * sum_n e_n^2) / sum_n T_n`. With every
//! weight 1 (per-question 0/1 correctness, say) this is the usual paired standard error
//! `sd(d) / sqrt(N)`, so accuracy differences go through the same function.

use serde::Serialize;

/// A difference `a - b` between two models and its standard error.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Paired {
    pub diff: f64,
    /// Over the units; NaN with fewer than two units (one unit shows no spread).
    pub se: f64,
}

/// `sum(a) / sum(w) - sum(b) / sum(w)` with its paired standard error (module docs).
/// `a[n]`, `b[n]`: unit n's summed score under each model (a sequence's summed loss, or
/// 1.0/0.0 for a right/wrong answer); `w[n]`: what the unit's score is a sum over (its
/// predicted tokens, or 1.0). The three have one entry per unit.
pub fn paired_difference(a: &[f64], b: &[f64], w: &[f64]) -> Paired {
    assert!(
        a.len() == b.len() && b.len() == w.len(),
        "paired scores of different units: {} / {} / {}",
        a.len(),
        b.len(),
        w.len()
    );
    let n = a.len();
    let total: f64 = w.iter().sum();
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let diff = d.iter().sum::<f64>() / total;
    if n < 2 {
        return Paired { diff, se: f64::NAN };
    }
    let ss: f64 = d
        .iter()
        .zip(w)
        .map(|(di, wi)| (di - diff * wi).powi(2))
        .sum();
    let se = (n as f64 / (n as f64 - 1.0) * ss).sqrt() / total;
    Paired { diff, se }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_weights_give_the_textbook_paired_standard_error() {
        // Right/wrong answers of two models on 5 questions: differences 1,0,1,0,-1
        // (mean 0.2, sample sd sqrt(0.7)), so SE = sqrt(0.7/5).
        let a = [1.0, 1.0, 1.0, 0.0, 0.0];
        let b = [0.0, 1.0, 0.0, 0.0, 1.0];
        let p = paired_difference(&a, &b, &[1.0; 5]);
        assert!((p.diff - 0.2).abs() < 1e-12);
        assert!((p.se - (0.7f64 / 5.0).sqrt()).abs() < 1e-12, "{}", p.se);
    }

    #[test]
    fn token_weights_give_the_ratio_estimator() {
        // Sequences of 2 and 6 tokens; differences 1.0 and 1.0 summed nats: r = 2/8 =
        // 0.25; residuals 1 - 0.5 = 0.5 and 1 - 1.5 = -0.5; SE = sqrt(2 * 0.5) / 8.
        let p = paired_difference(&[3.0, 10.0], &[2.0, 9.0], &[2.0, 6.0]);
        assert!((p.diff - 0.25).abs() < 1e-12);
        assert!((p.se - 1.0 / 8.0).abs() < 1e-12, "{}", p.se);
        // The same shift per token on every sequence is no noise at all.
        let q = paired_difference(&[3.0, 9.0], &[2.0, 6.0], &[2.0, 6.0]);
        assert!((q.diff - 0.5).abs() < 1e-12 && q.se.abs() < 1e-12);
    }

    #[test]
    fn pairing_removes_the_spread_between_units() {
        // Units differ wildly, the models barely and consistently: a tiny SE.
        let a = [10.0, 50.0, 90.0, 30.0];
        let b = [9.9, 49.9, 89.9, 29.9];
        let p = paired_difference(&a, &b, &[1.0; 4]);
        assert!((p.diff - 0.1).abs() < 1e-9 && p.se < 1e-9, "{p:?}");
        assert!(paired_difference(&[1.0], &[0.0], &[1.0]).se.is_nan());
    }
}
