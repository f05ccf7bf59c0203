//! Which runs of a sweep are Pareto-optimal on learning against forgetting, with
//! differences within one standard error taken as ties.

use super::Row;
use crate::eval::paired::{Paired, paired_difference};

/// Pareto marking that ignores differences within the noise. Between two trained runs i
/// and j, each axis compares them directly, paired over the same sequences: the
/// difference in learning (target set) and in forgetting (primary source), each with its
/// standard error (`paired_difference` of run j's losses against run i's). j beats i on
/// an axis when it is better by more than one standard error, and is no worse when it is
/// not worse by more than one. i is dominated when some j beats it on one axis and is no
/// worse on the other; the Pareto-optimal runs are those not dominated. With zero
/// standard errors this is the usual definition; within the noise two runs tie.
pub fn mark_pareto(rows: &mut [Row], weights: &[Vec<f64>]) {
    let optimal = pareto_flags(rows, weights);
    for (r, o) in rows.iter_mut().zip(optimal) {
        r.pareto = o;
    }
}

/// Which of `rows` are Pareto-optimal, as [`mark_pareto`] marks them.
pub(super) fn pareto_flags(rows: &[Row], weights: &[Vec<f64>]) -> Vec<bool> {
    let trained: Vec<usize> = (0..rows.len())
        .filter(|&i| rows[i].lambda.is_some())
        .collect();
    // Positive when j is better than i: less target loss, less source loss.
    let gain = |i: usize, j: usize, set: usize| -> Option<Paired> {
        let (li, lj) = (rows[i].losses.get(set)?, rows[j].losses.get(set)?);
        Some(paired_difference(li, lj, weights.get(set)?))
    };
    let beats = |p: &Paired| p.diff > p.se;
    let no_worse = |p: &Paired| p.diff >= -p.se;
    let dominated: Vec<bool> = (0..rows.len())
        .map(|i| {
            trained.iter().any(|&j| {
                if j == i {
                    return false;
                }
                let learn = gain(i, j, 0);
                // Without a source, forgetting is zero for every run: a tie.
                let forget = gain(i, j, 1).unwrap_or(Paired { diff: 0.0, se: 0.0 });
                match learn {
                    Some(l) => (beats(&l) && no_worse(&forget)) || (beats(&forget) && no_worse(&l)),
                    None => false,
                }
            })
        })
        .collect();
    rows.iter()
        .zip(dominated)
        .map(|(r, d)| r.lambda.is_some() && !d)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A trained run with these per-sequence losses on the target set and one source.
    fn run(lambda: f32, target: &[f64], source: &[f64]) -> Row {
        Row {
            lambda: Some(lambda),
            target_nll: 0.0,
            learning: 0.0,
            learning_se: 0.0,
            sources: Vec::new(),
            choice: Vec::new(),
            exact_match: None,
            final_train_loss: None,
            pareto: false,
            seconds: 0.0,
            cost: Vec::new(),
            grid: None,
            losses: vec![target.to_vec(), source.to_vec()],
        }
    }

    fn pareto(rows: &mut [Row]) -> Vec<bool> {
        let n = rows[0].losses[0].len();
        mark_pareto(rows, &[vec![1.0; n], vec![1.0; n]]);
        rows.iter().map(|r| r.pareto).collect()
    }

    #[test]
    fn pareto_marking_treats_differences_within_one_standard_error_as_ties() {
        // Run 0 has the lowest target loss, but only by noise: its per-sequence
        // differences from run 1 are +-0.5 around a mean of 0.05. Run 1 forgets less by a
        // consistent 1.0 per sequence. An exact comparison would keep both; within the
        // noise run 1 learns as much and forgets less, so it alone is optimal.
        let t1 = [5.0, 5.0, 5.0, 5.0];
        let t0 = [4.4, 5.5, 4.5, 5.4];
        let mut rows = vec![run(0.0, &t0, &[3.0; 4]), run(10.0, &t1, &[2.0; 4])];
        assert_eq!(pareto(&mut rows), [false, true]);
        // Without that tie (run 0 better on every sequence) both are optimal.
        let mut rows = vec![run(0.0, &[4.0; 4], &[3.0; 4]), run(10.0, &t1, &[2.0; 4])];
        assert_eq!(pareto(&mut rows), [true, true]);
    }

    #[test]
    fn pareto_marking_never_drops_a_run_for_a_difference_within_the_noise() {
        // Run 1 learns less on average and forgets the same, but only by noise: both stay.
        let mut rows = vec![
            run(0.0, &[4.0, 5.0, 4.0, 5.0], &[2.0; 4]),
            run(10.0, &[5.0, 4.0, 5.0, 4.1], &[2.0; 4]),
        ];
        assert_eq!(pareto(&mut rows), [true, true]);
        // A clear loss on learning with equal forgetting is dominated; the base row
        // (no lambda) is never marked.
        let mut rows = vec![
            run(0.0, &[4.0; 4], &[2.0; 4]),
            run(10.0, &[5.0, 5.1, 5.0, 5.1], &[2.0; 4]),
        ];
        rows[0].lambda = None;
        assert_eq!(pareto(&mut rows), [false, true]);
        let mut rows = vec![
            run(0.0, &[4.0; 4], &[2.0; 4]),
            run(10.0, &[5.0, 5.1, 5.0, 5.1], &[2.0; 4]),
        ];
        assert_eq!(pareto(&mut rows), [true, false]);
    }
}
