use half::bf16;

use super::*;
use crate::backend::cuda::BaseDtype;

/// Values spread over many binades, with low bits set (so every piece is non-zero).
fn values(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let v = ((i * 7919 + 13) % 1000) as f32 / 997.0 - 0.5;
            v * 2f32.powi((i % 9) as i32 - 4) * (1.0 + 1e-6 * i as f32)
        })
        .collect()
}

/// The kernels' host twins, bit for bit: the pieces by the `half` crate's rounding to
/// nearest even, each piece the rest after the earlier ones; their sum in piece order,
/// scaled, added with one rounding. The split matrix is a 5 x 3 window (row stride 4)
/// written side by side (piece stride 3, row stride 9, as gA and B are split) and
/// stacked (piece stride 15, as A is), and the first two pieces only; the sum reads
/// side-by-side partials (as u's) and stacked ones (as dA's), and one piece is a
/// strided copy.
#[test]
fn pieces_split_and_sum_as_their_host_twins() {
    let g = CudaBackend::sim(2, BaseDtype::Bf16).expect("sim");
    let (rows, cols, ld) = (5, 3, 4);
    let host = values(rows * ld);
    let src = g.upload(&host).expect("upload");
    let window = Rows {
        ptr: src.ptr(),
        rows,
        cols,
        ld,
    };
    let pieces = |v: f32| {
        let mut rest = v;
        (0..PIECES)
            .map(|_| {
                let p = bf16::from_f32(rest);
                rest -= p.to_f32();
                p
            })
            .collect::<Vec<_>>()
    };
    for (ld_dst, piece_off) in [(PIECES * cols, cols), (cols, rows * cols)] {
        let dst = g.uninit::<u16>(PIECES * rows * cols).expect("alloc");
        g.split_pieces(window, dst.ptr(), ld_dst, piece_off)
            .expect("split");
        let got = g.download(&dst).expect("download");
        for i in 0..rows {
            for j in 0..cols {
                let v = host[i * ld + j];
                let ps = pieces(v);
                let total: f64 = ps.iter().map(|p| p.to_f32() as f64).sum();
                assert_eq!(total, v as f64, "three pieces hold {v} exactly");
                for (k, p) in ps.iter().enumerate() {
                    let at = i * ld_dst + k * piece_off + j;
                    assert_eq!(got[at], p.to_bits(), "piece {k} of ({i}, {j})");
                }
            }
        }
    }
    // Partials side by side: (rows, PIECES * cols); dst a window of row stride 4.
    let partials = values(rows * PIECES * cols);
    let src = g.upload(&partials).expect("upload");
    let src = Rows {
        cols,
        ..Rows::dense(&src, rows, PIECES * cols)
    };
    let before = values(rows * ld)
        .iter()
        .map(|v| v * 3.0)
        .collect::<Vec<_>>();
    for accumulate in [false, true] {
        let dst = g.upload(&before).expect("upload");
        let out = Rows {
            ld,
            ..Rows::dense(&dst, rows, cols)
        };
        g.sum_pieces(src, cols, out, 0.7, accumulate).expect("sum");
        let got = g.download(&dst).expect("download");
        for i in 0..rows {
            for j in 0..ld {
                let at = i * ld + j;
                let want = if j >= cols {
                    before[at]
                } else {
                    let p = |k: usize| partials[i * PIECES * cols + k * cols + j];
                    let s = (p(0) + p(1)) + p(2);
                    if accumulate {
                        0.7f32.mul_add(s, before[at])
                    } else {
                        0.7 * s
                    }
                };
                assert_eq!(
                    got[at].to_bits(),
                    want.to_bits(),
                    "({i}, {j}), {accumulate}"
                );
            }
        }
    }
    // Stacked partials, as dA's: piece k of element e at k * rows * cols + e.
    let dst = g.uninit::<f32>(rows * cols).expect("alloc");
    let stacked = g.upload(&partials).expect("upload");
    let stacked = Rows::dense(&stacked, rows, cols);
    g.sum_pieces(
        stacked,
        rows * cols,
        Rows::dense(&dst, rows, cols),
        1.0,
        false,
    )
    .expect("sum");
    let got = g.download(&dst).expect("download");
    for (e, v) in got.iter().enumerate() {
        let p = |k: usize| partials[k * rows * cols + e];
        assert_eq!(v.to_bits(), ((p(0) + p(1)) + p(2)).to_bits(), "stacked {e}");
    }
    // One piece: a strided copy (dx's gA side by side); two pieces: the first two
    // only (the update's), the third slot left as it was.
    let dst = g.upload(&vec![7.0f32; rows * 2 * cols]).expect("upload");
    let strided = Rows {
        ld: 2 * cols,
        ..Rows::dense(&dst, rows, cols)
    };
    g.sum_first_pieces(window, 0, 1, strided.offset(cols), (1.0, false))
        .expect("copy");
    let got = g.download(&dst).expect("download");
    for i in 0..rows {
        for j in 0..cols {
            assert_eq!(got[i * 2 * cols + j], 7.0, "left of the copy");
            assert_eq!(got[i * 2 * cols + cols + j], host[i * ld + j], "copied");
        }
    }
    let dst = g
        .upload(&vec![0x5555u16; PIECES * rows * cols])
        .expect("upload");
    g.split_first_pieces(window, dst.ptr(), PIECES * cols, cols, 2)
        .expect("split");
    let got = g.download(&dst).expect("download");
    for i in 0..rows {
        for j in 0..cols {
            let ps = pieces(host[i * ld + j]);
            let at = |k: usize| got[i * PIECES * cols + k * cols + j];
            assert_eq!((at(0), at(1)), (ps[0].to_bits(), ps[1].to_bits()));
            assert_eq!(at(2), 0x5555, "the third piece is not written");
        }
    }
}
