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

pub use crate::model::weights::finite;

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
    let scale = (0..n)
        .map(|i| (x[i * n + i] as f64).abs())
        .fold(0.0, f64::max);
    let pairs = Pairs { x, n, scale };
    // The tiled pass finds whether anything is wrong; the first fault in row order (the
    // one a message names) is then found by the plain scan.
    if pairs.any_fault_tiled() {
        return pairs.first_fault();
    }
    if n <= FULL_TEST_MAX && scale > 0.0 && !cholesky_ok(x, n, scale) {
        return Err("is not positive semi-definite (an eigenvalue is below rounding)".into());
    }
    Ok(())
}

/// The necessary conditions on each diagonal entry and each pair (i, j < i): a diagonal
/// not below rounding, symmetry, and every 2x2 principal minor >= 0.
struct Pairs<'a> {
    x: &'a [f32],
    n: usize,
    scale: f64,
}

/// Rows and columns of a tile of the tiled pass: a tile and its transpose (2 x 16 KiB of
/// f32) stay in L1, where reading column j of row i across a whole row of tiles would
/// touch a new cache line per element (n = 8192 for Llama-3.2-1B's MLP factors).
const TILE: usize = 64;

impl Pairs<'_> {
    fn at(&self, i: usize, j: usize) -> f64 {
        self.x[i * self.n + j] as f64
    }
    fn slack(&self) -> f64 {
        TOL * self.scale
    }
    fn diag_fault(&self, i: usize) -> bool {
        self.at(i, i) < -self.slack()
    }
    fn asymmetric(&self, i: usize, j: usize) -> bool {
        (self.at(i, j) - self.at(j, i)).abs() > self.slack()
    }
    fn minor_fault(&self, i: usize, j: usize) -> bool {
        let (slack, scale) = (self.slack(), self.scale);
        self.at(i, j).powi(2) > self.at(i, i).max(0.0) * self.at(j, j).max(0.0) + slack * scale
    }

    /// Whether any diagonal entry or pair breaks a condition, tile by tile.
    fn any_fault_tiled(&self) -> bool {
        let n = self.n;
        if (0..n).any(|i| self.diag_fault(i)) {
            return true;
        }
        for i0 in (0..n).step_by(TILE) {
            for j0 in (0..=i0).step_by(TILE) {
                for i in i0..(i0 + TILE).min(n) {
                    for j in j0..(j0 + TILE).min(i) {
                        if self.asymmetric(i, j) || self.minor_fault(i, j) {
                            return true;
                        }
                    }
                }
            }
        }
        false
    }

    /// The first fault in row order, with its message (`Ok` if there is none).
    fn first_fault(&self) -> Check {
        for i in 0..self.n {
            if self.diag_fault(i) {
                return Err(format!(
                    "has diagonal entry {} at {i}; a Kronecker factor is positive semi-definite",
                    self.at(i, i)
                ));
            }
            for j in 0..i {
                if self.asymmetric(i, j) {
                    return Err(format!(
                        "is not symmetric: ({i}, {j}) is {} but ({j}, {i}) is {}",
                        self.at(i, j),
                        self.at(j, i)
                    ));
                }
                if self.minor_fault(i, j) {
                    return Err(format!(
                        "is not positive semi-definite: |({i}, {j})| = {} exceeds sqrt(({i}, {i}) ({j}, {j}))",
                        self.at(i, j).abs()
                    ));
                }
            }
        }
        Ok(())
    }
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

    /// The tiled pass finds a fault exactly where the row-order scan does: faults of each
    /// kind placed at tile edges and inside tiles of sizes that are and are not multiples
    /// of the tile.
    #[test]
    fn the_tiled_pass_finds_every_fault_the_scan_finds() {
        for n in [1, 63, 64, 65, 130, 200] {
            // A diagonally dominant symmetric matrix: no fault.
            let clean: Vec<f32> = (0..n * n)
                .map(|k| {
                    let (i, j) = (k / n, k % n);
                    if i == j {
                        2.0 * n as f32
                    } else {
                        ((i * 7 + j * 7) % 13) as f32 * 0.1
                    }
                })
                .collect();
            let p = Pairs {
                x: &clean,
                n,
                scale: 2.0 * n as f64,
            };
            assert!(
                !p.any_fault_tiled() && p.first_fault().is_ok(),
                "n {n}: clean"
            );
            let spots = [
                (n - 1, 0),
                (n / 2, n / 2 - (n > 1) as usize),
                (n - 1, n.saturating_sub(2)),
                (64.min(n - 1), 63.min(n - 1)),
            ];
            for (i, j) in spots.into_iter().filter(|(i, j)| j < i) {
                for (what, fault) in [("asymmetric", 0.5f32), ("minor", 4.0 * n as f32)] {
                    let mut x = clean.clone();
                    x[i * n + j] += fault;
                    if what == "minor" {
                        x[j * n + i] += fault;
                    }
                    let p = Pairs {
                        x: &x,
                        n,
                        scale: 2.0 * n as f64,
                    };
                    assert!(p.any_fault_tiled(), "n {n}: {what} at ({i}, {j}) missed");
                    let e = p.first_fault().unwrap_err();
                    assert!(e.contains(&format!("({i}, {j})")), "n {n}: {e}");
                }
            }
            let mut x = clean.clone();
            x[(n - 1) * n + n - 1] = -1.0;
            let p = Pairs {
                x: &x,
                n,
                scale: 2.0 * n as f64,
            };
            assert!(
                p.any_fault_tiled() && p.first_fault().is_err(),
                "n {n}: diagonal"
            );
        }
    }
}
