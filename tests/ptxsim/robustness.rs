//! Robustness: malformed PTX is refused with a line number, never a panic

use super::matrix::{LDMATRIX, tile_values};
use super::*;

#[test]
fn truncated_or_corrupted_modules_are_refused_without_panicking() {
    let d = dev();
    let mut rng = Lcg(97);
    for m in lalora_engine::backend::cuda::kernels::MODULES
        .iter()
        .filter(|m| !m.ptx().is_empty())
    {
        let ptx = m.ptx();
        d.load_module(m.name, ptx)
            .unwrap_or_else(|e| panic!("{}: {e}", m.name));
        let lines: Vec<&str> = ptx.lines().collect();
        for _ in 0..40 {
            // a prefix cut inside a line, a line removed, two lines swapped, a token changed
            let cut = rng.int(0, ptx.len() as i64 - 1) as usize;
            let cut = (0..=cut)
                .rev()
                .find(|&i| ptx.is_char_boundary(i))
                .unwrap_or(0);
            let _ = d.load_module(m.name, &ptx[..cut]);
            let i = rng.int(0, lines.len() as i64 - 1) as usize;
            let j = rng.int(0, lines.len() as i64 - 1) as usize;
            let mut v = lines.clone();
            v.remove(i);
            let _ = d.load_module(m.name, &v.join("\n"));
            let mut v = lines.clone();
            v.swap(i, j);
            let _ = d.load_module(m.name, &v.join("\n"));
            let mut v: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
            v[i] = v[i].replacen(['%', '[', ']', '{', ',', ';'], "", 1);
            let _ = d.load_module(m.name, &v.join("\n"));
        }
    }
    for bad in [
        ".version 9.0\n.target sm_80\n.address_size 64\n.visible .entry k()\n{\n  add.s32 %r1, %r2 %r3;\n}\n",
        ".version 9.0\n.target sm_80\n.address_size 64\n.visible .entry k()\n{\n  .reg .b32 %r<2>;\n  bra $NOWHERE;\n}\n",
        ".version 9.0\n.target sm_80\n.address_size 64\n.visible .entry k()\n{\n  .reg .b32 %r<2>;\n  frobnicate.b32 %r0, %r1;\n}\n",
        ".version 9.0\n.target sm_80\n.address_size 64\n.visible .entry k()\n{\n  .reg .b32 %r<2>;\n  mov.b32 %r5, %r0;\n}\n",
        ".version 9.0\n.target sm_80\n.address_size 64\n.visible .entry k(\n{\n",
        ".version 9.0\n.target sm_80\n.address_size 32\n",
        "\"unterminated",
        ".version 9.0\n.target sm_80\n.address_size 64\n.visible .entry k()\n{\n  .reg .b32 %r<2>;\n  mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%r0}, {%r0}, {%r0}, {%r0};\n}\n",
    ] {
        match d.load_module("bad", bad) {
            Err(SimError::Ptx(line, msg)) => {
                assert!(line > 0 && !msg.is_empty(), "{bad}: {line}: {msg}")
            }
            other => panic!("{bad:?} was accepted: {:?}", other.map(|_| ())),
        }
    }
}

const LATE_FAULT: &str = r#"
.visible .entry late_fault(.param .u64 g)
{
    .reg .pred %p<2>;
    .reg .b32 %r<8>;
    .reg .b64 %rd<4>;
    ld.param.u64 %rd1, [g];
    mov.u32 %r0, %ctaid.x;
    setp.ge.u32 %p1, %r0, 3;
    @%p1 bra $BAD;
    // the first blocks are slow and fine
    mov.u32 %r1, 0;
$LOOP:
    add.u32 %r1, %r1, 1;
    setp.lt.u32 %p1, %r1, 20000;
    @%p1 bra $LOOP;
    ret;
$BAD:
    ld.global.u32 %r2, [%rd1+64]; // BAD
    ret;
}
"#;

#[test]
fn the_reported_fault_is_the_lowest_faulting_block_whatever_the_timing() {
    // blocks run in parallel; the report must not depend on which worker faulted first
    let d = Device::new(Checks::default(), 1 << 20, 2).unwrap();
    let g = zeros::<u32>(&d, 4);
    for _ in 0..5 {
        let f = fault(launch(
            &d,
            &sm80(LATE_FAULT),
            "late_fault",
            cfg(64, 32),
            &[p(g)],
        ));
        assert_eq!((f.check, f.block), (Check::Memcheck, [3, 0, 0]), "{f}");
    }
}

#[test]
fn matrix_instructions_check_rows_and_need_the_whole_warp() {
    let d = dev();
    let src = up(&d, &tile_values());
    let out = zeros::<u32>(&d, 128);
    // a row address that is not 16-byte aligned (9.7.14.5.15: rows are naturally aligned)
    let ptx = sm80(&LDMATRIX.replace("@INST@", "add.u32 %r8, %r8, 4;\n    ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%r9, %r10, %r11, %r12}, [%r8]; // LDM"));
    let f = fault(launch(&d, &ptx, "ldm", cfg(1, 32), &[p(src), p(out)]));
    assert_eq!(
        (f.check, f.line),
        (Check::Memcheck, line_of(&ptx, "// LDM")),
        "{f}"
    );
    assert!(f.detail.contains("misaligned 16-byte"), "{f}");
    // a generic address into global memory
    let ptx = sm80(&LDMATRIX.replace(
        "@INST@",
        "ldmatrix.sync.aligned.m8n8.x1.b16 {%r9}, [%rd1]; // LDM",
    ));
    let f = fault(launch(&d, &ptx, "ldm", cfg(1, 32), &[p(src), p(out)]));
    assert_eq!(
        (f.check, f.line),
        (Check::Memcheck, line_of(&ptx, "// LDM")),
        "{f}"
    );
    assert!(f.detail.contains("not in shared memory"), "{f}");
    // .sync.aligned: every lane of the warp executes it (9.7.14.5.14)
    let body = "setp.ne.u32 %p1, %r0, 3;\n    @%p1 ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%r9}, [%r8]; // LDM";
    let ptx = sm80(&LDMATRIX.replace("@INST@", body).replace(
        ".reg .b32 %r<16>;",
        ".reg .b32 %r<16>;\n    .reg .pred %p<2>;",
    ));
    let f = fault(launch(&d, &ptx, "ldm", cfg(1, 32), &[p(src), p(out)]));
    assert_eq!(
        (f.check, f.thread, f.line),
        (Check::Synccheck, [3, 0, 0], line_of(&ptx, "// LDM")),
        "{f}"
    );
    let body = "setp.eq.u32 %p1, %r0, 3;\n    @%p1 ret;\n    ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%r9}, [%r8]; // LDM";
    let ptx = sm80(&LDMATRIX.replace("@INST@", body).replace(
        ".reg .b32 %r<16>;",
        ".reg .b32 %r<16>;\n    .reg .pred %p<2>;",
    ));
    let f = fault(launch(&d, &ptx, "ldm", cfg(1, 32), &[p(src), p(out)]));
    assert_eq!(
        (f.check, f.line),
        (Check::Synccheck, line_of(&ptx, "// LDM")),
        "{f}"
    );
    assert!(f.detail.contains("exited"), "{f}");
}
