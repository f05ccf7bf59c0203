//! Checks on the numbers of a curvature file: a Fisher is a sum of outer products, so its
//! diagonal is non-negative and its Kronecker factors are symmetric positive semi-definite.
//! A file that breaks this was damaged or made by something else, and would make the
//! penalty reward moving away from theta*.

/// Relative slack for f32 rounding, against the factor's largest diagonal entry: sums of
/// f32 outer products are symmetric and PSD to about 1e-6 of it.
const TOL: f64 = 1e-4;

/// Factors up to this size get a full PSD test (a Cholesky factorisation); larger ones
/// the necessary 2x2 conditions, which cost O(n^2) like reading them.
const FULL_TEST_MAX: usize = 256;

type Check = std::result::Result<(), String>;

pub fn finite(data: &[f32]) -> Check {
    match data.iter().position(|x| !x.is_finite()) {
        None => Ok(()),
        Some(i) => Err(format!("holds {} at index {i}", data[i])),
    }
}

pub fn non_negative(data: &[f32]) -> Check {
    match data.iter().position(|&x| x < 0.0) {
        None => Ok(()),
        Some(i) => Err(format!(
            "holds {} at index {i}; a Fisher diagonal is >= 0",
            data[i]
        )),
    }
}

/// `x` (n x n, finite) is symmetric and positive semi-definite within rounding.
pub fn symmetric_psd(x: &[f32], n: usize) -> Check {
    let at = |i: usize, j: usize| x[i * n + j] as f64;
    let scale = (0..n).map(|i| at(i, i).abs()).fold(0.0, f64::max);
    let slack = TOL * scale;
    for i in 0..n {
        if at(i, i) < -slack {
            return Err(format!(
                "has diagonal entry {} at {i}; a Kronecker factor is positive semi-definite",
                at(i, i)
            ));
        }
        for j in 0..i {
            if (at(i, j) - at(j, i)).abs() > slack {
                return Err(format!(
                    "is not symmetric: ({i}, {j}) is {} but ({j}, {i}) is {}",
                    at(i, j),
                    at(j, i)
                ));
            }
            // Every 2x2 principal minor of a PSD matrix is >= 0.
            if at(i, j).powi(2) > at(i, i).max(0.0) * at(j, j).max(0.0) + slack * scale {
                return Err(format!(
                    "is not positive semi-definite: |({i}, {j})| = {} exceeds sqrt(({i}, {i}) ({j}, {j}))",
                    at(i, j).abs()
                ));
            }
        }
    }
    if n <= FULL_TEST_MAX && scale > 0.0 && !cholesky_ok(x, n, scale) {
        return Err("is not positive semi-definite (an eigenvalue is below rounding)".into());
    }
    Ok(())
}

/// Whether `x / scale + TOL I` has a Cholesky factorisation, i.e. every eigenvalue of `x`
/// is above `-TOL * scale`.
fn cholesky_ok(x: &[f32], n: usize, scale: f64) -> bool {
    let mut l = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let mut s = x[i * n + j] as f64 / scale + if i == j { TOL } else { 0.0 };
            for k in 0..j {
                s -= l[i * n + k] * l[j * n + k];
            }
            if i == j {
                if s <= 0.0 {
                    return false;
                }
                l[i * n + i] = s.sqrt();
            } else {
                l[i * n + j] = s / l[j * n + j];
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gram_matrices_pass_and_indefinite_ones_fail() {
        // v v^T + w w^T: PSD of rank 2.
        let (v, w) = ([1.0f32, 2.0, -1.0], [0.5f32, -1.0, 3.0]);
        let gram: Vec<f32> = (0..9)
            .map(|k| v[k / 3] * v[k % 3] + w[k / 3] * w[k % 3])
            .collect();
        assert_eq!(symmetric_psd(&gram, 3), Ok(()));
        assert_eq!(symmetric_psd(&[0.0; 4], 2), Ok(()));
        // Passes the 2x2 test (|x_ij| <= 1 = sqrt(x_ii x_jj)) but has eigenvalue -0.8.
        let indefinite = [1.0, 0.9, -0.9, 0.9, 1.0, 0.9, -0.9, 0.9, 1.0];
        assert!(symmetric_psd(&indefinite, 3).is_err());
        assert!(symmetric_psd(&[1.0, 2.0, 2.0, 1.0], 2).is_err());
        assert!(symmetric_psd(&[1.0, 0.5, 0.0, 1.0], 2).is_err());
        assert!(symmetric_psd(&[-1.0, 0.0, 0.0, 1.0], 2).is_err());
    }
}
