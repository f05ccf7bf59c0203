//! `delegate_backend!`: the `Backend` methods of a wrapper that hands them to the backend
//! it wraps unchanged. Wrappers (the self-test's label tap, the FLOP count in
//! `tests/cost.rs`, the per-op timer of `--op-times`) override the few ops they watch and list the rest here, so a method
//! added to the trait is forwarded by adding one arm below, not by copying its signature
//! into every wrapper.

/// Inside `impl Backend for W`, where `W` has a field `inner: &B` and declares
/// `type Buf = B::Buf; type Weight = B::Weight;`:
/// `delegate_backend!(B; describe, buf, linear, ...);` defines each named method as a call
/// of `self.inner`'s. The structs typed by the backend (`ProjFwd`, `ProjBwd`,
/// `DiagPenalty`) are rebuilt for `B` from the same buffers. A method a wrapper leaves out
/// of the list keeps the trait's default (`project_group` as `linear` + `lora_forward`,
/// so that a wrapper watching those sees each projection).
///
/// `delegate_backend!(B, watch = f; ...)` also calls `self.f("op")` before each forwarded
/// call and keeps what it returns until the call ends (`timed::Timed`'s stopwatch).
#[doc(hidden)]
#[macro_export]
macro_rules! delegate_backend {
    ($inner:ty; $($name:ident),* $(,)?) => {
        $( $crate::delegate_backend!(@one $inner; []; $name); )*
    };
    ($inner:ty, watch = $watch:ident; $($name:ident),* $(,)?) => {
        $( $crate::delegate_backend!(@one $inner; [$watch]; $name); )*
    };
    (@one $inner:ty; [$($watch:ident)?]; describe) => {
        fn describe(&self) -> String {
            $(let _watch = self.$watch("describe");)?
            self.inner.describe()
        }
    };
    (@one $inner:ty; [$($watch:ident)?]; device_memory) => {
        fn device_memory(&self) -> Option<(u64, u64)> {
            $(let _watch = self.$watch("device_memory");)?
            self.inner.device_memory()
        }
    };
    (@one $inner:ty; [$($watch:ident)?]; reset_device_peak) => {
        fn reset_device_peak(&self) {
            $(let _watch = self.$watch("reset_device_peak");)?
            self.inner.reset_device_peak()
        }
    };
    (@one $inner:ty; [$($watch:ident)?]; buf) => {
        fn buf(&self, host: Vec<f32>) -> $crate::Result<Self::Buf> {
            $(let _watch = self.$watch("buf");)?
            self.inner.buf(host)
        }
    };
    (@one $inner:ty; [$($watch:ident)?]; zeros) => {
        fn zeros(&self, n: usize) -> $crate::Result<Self::Buf> {
            $(let _watch = self.$watch("zeros");)?
            self.inner.zeros(n)
        }
    };
    (@one $inner:ty; [$($watch:ident)?]; to_host) => {
        fn to_host(&self, x: &Self::Buf) -> $crate::Result<Vec<f32>> {
            $(let _watch = self.$watch("to_host");)?
            self.inner.to_host(x)
        }
    };
    (@one $inner:ty; [$($watch:ident)?]; take_host) => {
        fn take_host(&self, x: Self::Buf) -> $crate::Result<Vec<f32>> {
            $(let _watch = self.$watch("take_host");)?
            self.inner.take_host(x)
        }
    };
    (@one $inner:ty; [$($watch:ident)?]; weight) => {
        fn weight(&self, host: Vec<f32>, rows: usize, cols: usize) -> $crate::Result<Self::Weight> {
            $(let _watch = self.$watch("weight");)?
            self.inner.weight(host, rows, cols)
        }
    };
    (@one $inner:ty; [$($watch:ident)?]; weight_stored) => {
        fn weight_stored(
            &self,
            host: Vec<f32>,
            stored: $crate::model::quant::StoredMatrix,
            rows: usize,
            cols: usize,
        ) -> $crate::Result<Self::Weight> {
            $(let _watch = self.$watch("weight");)?
            self.inner.weight_stored(host, stored, rows, cols)
        }
    };
    (@one $inner:ty; [$($watch:ident)?]; copy_into) => {
        fn copy_into(&self, dst: &mut Self::Buf, offset: usize, src: &Self::Buf) -> $crate::Result<()> {
            $(let _watch = self.$watch("copy_into");)?
            self.inner.copy_into(dst, offset, src)
        }
    };
    (@one $inner:ty; [$($watch:ident)?]; slice) => {
        fn slice(&self, src: &Self::Buf, offset: usize, len: usize) -> $crate::Result<Self::Buf> {
            $(let _watch = self.$watch("slice");)?
            self.inner.slice(src, offset, len)
        }
    };
    (@one $inner:ty; [$($watch:ident)?]; embedding) => {
        fn embedding(&self, table: &Self::Weight, ids: &[u32], dim: usize) -> $crate::Result<Self::Buf> {
            $(let _watch = self.$watch("embedding");)?
            self.inner.embedding(table, ids, dim)
        }
    };
    (@one $inner:ty; [$($watch:ident)?]; rmsnorm) => {
        fn rmsnorm(
            &self,
            x: &Self::Buf,
            w: &Self::Buf,
            rows: usize,
            dim: usize,
            eps: f32,
        ) -> $crate::Result<(Self::Buf, Self::Buf)> {
            $(let _watch = self.$watch("rmsnorm");)?
            self.inner.rmsnorm(x, w, rows, dim, eps)
        }
    };
    (@one $inner:ty; [$($watch:ident)?]; add_rmsnorm) => {
        fn add_rmsnorm(
            &self,
            h: &mut Self::Buf,
            delta: &Self::Buf,
            w: &Self::Buf,
            rows: usize,
            dim: usize,
            eps: f32,
        ) -> $crate::Result<(Self::Buf, Self::Buf)> {
            $(let _watch = self.$watch("add_rmsnorm");)?
            self.inner.add_rmsnorm(h, delta, w, rows, dim, eps)
        }
    };
    (@one $inner:ty; [$($watch:ident)?]; rmsnorm_backward) => {
        fn rmsnorm_backward(
            &self,
            dy: &Self::Buf,
            x: &Self::Buf,
            w: &Self::Buf,
            rstd: &Self::Buf,
            rows: usize,
            dim: usize,
            dx: &mut Self::Buf,
        ) -> $crate::Result<()> {
            $(let _watch = self.$watch("rmsnorm_backward");)?
            self.inner.rmsnorm_backward(dy, x, w, rstd, rows, dim, dx)
        }
    };
    (@one $inner:ty; [$($watch:ident)?]; linear) => {
        fn linear(
            &self,
            x: &Self::Buf,
            w: &Self::Weight,
            m: usize,
            k: usize,
            n: usize,
        ) -> $crate::Result<Self::Buf> {
            $(let _watch = self.$watch("linear");)?
            self.inner.linear(x, w, m, k, n)
        }
    };
    (@one $inner:ty; [$($watch:ident)?]; linear_backward) => {
        fn linear_backward(
            &self,
            dy: &Self::Buf,
            w: &Self::Weight,
            m: usize,
            k: usize,
            n: usize,
            dx: &mut Self::Buf,
            accumulate: bool,
        ) -> $crate::Result<()> {
            $(let _watch = self.$watch("linear_backward");)?
            self.inner.linear_backward(dy, w, m, k, n, dx, accumulate)
        }
    };
    (@one $inner:ty; [$($watch:ident)?]; lora_forward) => {
        fn lora_forward(
            &self,
            x: &Self::Buf,
            a: &Self::Buf,
            b: &Self::Buf,
            dims: $crate::backend::LoraDims,
            y: &mut Self::Buf,
        ) -> $crate::Result<Self::Buf> {
            $(let _watch = self.$watch("lora_forward");)?
            self.inner.lora_forward(x, a, b, dims, y)
        }
    };
    (@one $inner:ty; [$($watch:ident)?]; lora_backward) => {
        fn lora_backward(
            &self,
            g: &Self::Buf,
            x: &Self::Buf,
            u: &Self::Buf,
            a: &Self::Buf,
            b: &Self::Buf,
            dims: $crate::backend::LoraDims,
            dx: &mut Self::Buf,
            grads: Option<(&mut Self::Buf, &mut Self::Buf)>,
        ) -> $crate::Result<Self::Buf> {
            $(let _watch = self.$watch("lora_backward");)?
            self.inner.lora_backward(g, x, u, a, b, dims, dx, grads)
        }
    };
    (@one $inner:ty; [$($watch:ident)?]; project_group) => {
        fn project_group(
            &self,
            x: &Self::Buf,
            m: usize,
            d_in: usize,
            lora: $crate::backend::group::LoraGroup,
            projs: &[$crate::backend::group::ProjFwd<'_, Self>],
        ) -> $crate::Result<Vec<$crate::backend::group::Projected<Self::Buf>>> {
            $(let _watch = self.$watch("project_group");)?
            let projs: Vec<$crate::backend::group::ProjFwd<'_, $inner>> = projs
                .iter()
                .map(|p| $crate::backend::group::ProjFwd {
                    w: p.w,
                    d_out: p.d_out,
                    lora: p.lora,
                    feeds: p.feeds,
                    rope: p.rope,
                })
                .collect();
            self.inner.project_group(x, m, d_in, lora, &projs)
        }
    };
    (@one $inner:ty; [$($watch:ident)?]; project_group_backward) => {
        fn project_group_backward(
            &self,
            x: &Self::Buf,
            m: usize,
            d_in: usize,
            lora: $crate::backend::group::LoraGroup,
            projs: Vec<$crate::backend::group::ProjBwd<'_, Self>>,
            dx: &mut Self::Buf,
            accumulate: bool,
        ) -> $crate::Result<Vec<Option<Self::Buf>>> {
            $(let _watch = self.$watch("project_group_backward");)?
            let projs: Vec<$crate::backend::group::ProjBwd<'_, $inner>> = projs
                .into_iter()
                .map(|p| $crate::backend::group::ProjBwd {
                    w: p.w,
                    d_out: p.d_out,
                    g: p.g,
                    lora: p.lora.map(|l| $crate::backend::group::LoraBwd {
                        a: l.a,
                        b: l.b,
                        u: l.u,
                        grads: l.grads,
                    }),
                })
                .collect();
            self.inner
                .project_group_backward(x, m, d_in, lora, projs, dx, accumulate)
        }
    };
    (@one $inner:ty; [$($watch:ident)?]; rope) => {
        fn rope(
            &self,
            x: &mut Self::Buf,
            table: &$crate::backend::RopeTable<Self::Buf>,
            rows: usize,
            n_heads: usize,
            head_dim: usize,
            inverse: bool,
        ) -> $crate::Result<()> {
            $(let _watch = self.$watch("rope");)?
            self.inner.rope(x, table, rows, n_heads, head_dim, inverse)
        }
    };
    (@one $inner:ty; [$($watch:ident)?]; attention) => {
        fn attention(
            &self,
            q: &Self::Buf,
            k: &Self::Buf,
            v: &Self::Buf,
            s: &$crate::backend::AttnShape,
        ) -> $crate::Result<(Self::Buf, $crate::backend::AttnSaved<Self::Buf>)> {
            $(let _watch = self.$watch("attention");)?
            self.inner.attention(q, k, v, s)
        }
    };
    (@one $inner:ty; [$($watch:ident)?]; attention_out) => {
        fn attention_out(
            &self,
            q: &Self::Buf,
            k: &Self::Buf,
            v: &Self::Buf,
            s: &$crate::backend::AttnShape,
        ) -> $crate::Result<Self::Buf> {
            $(let _watch = self.$watch("attention_out");)?
            self.inner.attention_out(q, k, v, s)
        }
    };
    (@one $inner:ty; [$($watch:ident)?]; attention_dout) => {
        fn attention_dout(
            &self,
            saved: &$crate::backend::AttnSaved<Self::Buf>,
            n: usize,
        ) -> $crate::Result<Self::Buf> {
            $(let _watch = self.$watch("attention_dout");)?
            self.inner.attention_dout(saved, n)
        }
    };
    (@one $inner:ty; [$($watch:ident)?]; attention_backward) => {
        fn attention_backward(
            &self,
            dout: &Self::Buf,
            q: &Self::Buf,
            k: &Self::Buf,
            v: &Self::Buf,
            out: &Self::Buf,
            saved: &$crate::backend::AttnSaved<Self::Buf>,
            rope: Option<&$crate::backend::RopeTable<Self::Buf>>,
            feeds: $crate::backend::group::GradFeeds,
            s: &$crate::backend::AttnShape,
        ) -> $crate::Result<(Self::Buf, Self::Buf, Self::Buf)> {
            $(let _watch = self.$watch("attention_backward");)?
            self.inner.attention_backward(dout, q, k, v, out, saved, rope, feeds, s)
        }
    };
    (@one $inner:ty; [$($watch:ident)?]; swiglu) => {
        fn swiglu(&self, gate: &Self::Buf, up: &Self::Buf) -> $crate::Result<Self::Buf> {
            $(let _watch = self.$watch("swiglu");)?
            self.inner.swiglu(gate, up)
        }
    };
    (@one $inner:ty; [$($watch:ident)?]; swiglu_backward) => {
        fn swiglu_backward(
            &self,
            dact: &Self::Buf,
            gate: &Self::Buf,
            up: &Self::Buf,
            feeds: $crate::backend::group::GradFeeds,
        ) -> $crate::Result<(Self::Buf, Self::Buf)> {
            $(let _watch = self.$watch("swiglu_backward");)?
            self.inner.swiglu_backward(dact, gate, up, feeds)
        }
    };
    (@one $inner:ty; [$($watch:ident)?]; add_assign) => {
        fn add_assign(&self, a: &mut Self::Buf, b: &Self::Buf) -> $crate::Result<()> {
            $(let _watch = self.$watch("add_assign");)?
            self.inner.add_assign(a, b)
        }
    };
    (@one $inner:ty; [$($watch:ident)?]; cross_entropy) => {
        fn cross_entropy(
            &self,
            logits: &Self::Buf,
            rows: usize,
            vocab: usize,
            targets: $crate::backend::CeTargets<'_>,
            grad_scale: Option<f32>,
        ) -> $crate::Result<(Vec<f32>, Option<Self::Buf>)> {
            $(let _watch = self.$watch("cross_entropy");)?
            self.inner.cross_entropy(logits, rows, vocab, targets, grad_scale)
        }
    };
    (@one $inner:ty; [$($watch:ident)?]; classifier) => {
        fn classifier(
            &self,
            hidden: &Self::Buf,
            head: &Self::Weight,
            rows: usize,
            dim: usize,
            vocab: usize,
            targets: $crate::backend::CeTargets<'_>,
            grad_scale: Option<f32>,
        ) -> $crate::Result<$crate::backend::ClassifierOut<Self::Buf>> {
            $(let _watch = self.$watch("classifier");)?
            self.inner
                .classifier(hidden, head, rows, dim, vocab, targets, grad_scale)
        }
    };
    (@one $inner:ty; [$($watch:ident)?]; gram_accumulate) => {
        fn gram_accumulate(
            &self,
            x: &Self::Buf,
            dx: usize,
            y: &Self::Buf,
            dy: usize,
            segments: &[$crate::backend::Segment],
            alpha: f32,
            out: &mut Self::Buf,
        ) -> $crate::Result<()> {
            $(let _watch = self.$watch("gram_accumulate");)?
            self.inner
                .gram_accumulate(x, dx, y, dy, segments, alpha, out)
        }
    };
    (@one $inner:ty; [$($watch:ident)?]; gram_accumulate_upper) => {
        fn gram_accumulate_upper(
            &self,
            x: &Self::Buf,
            d: usize,
            segments: &[$crate::backend::Segment],
            alpha: f32,
            out: &mut Self::Buf,
        ) -> $crate::Result<()> {
            $(let _watch = self.$watch("gram_accumulate_upper");)?
            self.inner.gram_accumulate_upper(x, d, segments, alpha, out)
        }
    };
    (@one $inner:ty; [$($watch:ident)?]; mirror_upper) => {
        fn mirror_upper(&self, out: &mut Self::Buf, n: usize) -> $crate::Result<()> {
            $(let _watch = self.$watch("mirror_upper");)?
            self.inner.mirror_upper(out, n)
        }
    };
    (@one $inner:ty; [$($watch:ident)?]; segment_sum) => {
        fn segment_sum(
            &self,
            x: &Self::Buf,
            dim: usize,
            segments: &[$crate::backend::Segment],
            mean: bool,
        ) -> $crate::Result<Self::Buf> {
            $(let _watch = self.$watch("segment_sum");)?
            self.inner.segment_sum(x, dim, segments, mean)
        }
    };
    (@one $inner:ty; [$($watch:ident)?]; sq_grad_accumulate) => {
        fn sq_grad_accumulate(
            &self,
            g: &Self::Buf,
            dg: usize,
            y: &Self::Buf,
            dy: usize,
            segments: &[$crate::backend::Segment],
            alpha: f32,
            out: &mut Self::Buf,
        ) -> $crate::Result<()> {
            $(let _watch = self.$watch("sq_grad_accumulate");)?
            self.inner
                .sq_grad_accumulate(g, dg, y, dy, segments, alpha, out)
        }
    };
    (@one $inner:ty; [$($watch:ident)?]; matmul) => {
        fn matmul(
            &self,
            a: &Self::Buf,
            b: &Self::Buf,
            m: usize,
            k: usize,
            n: usize,
            ta: bool,
            tb: bool,
        ) -> $crate::Result<Self::Buf> {
            $(let _watch = self.$watch("matmul");)?
            self.inner.matmul(a, b, m, k, n, ta, tb)
        }
    };
    (@one $inner:ty; [$($watch:ident)?]; dup) => {
        fn dup(&self, x: &Self::Buf) -> $crate::Result<Self::Buf> {
            $(let _watch = self.$watch("dup");)?
            self.inner.dup(x)
        }
    };
    (@one $inner:ty; [$($watch:ident)?]; mul_assign) => {
        fn mul_assign(&self, a: &mut Self::Buf, b: &Self::Buf) -> $crate::Result<()> {
            $(let _watch = self.$watch("mul_assign");)?
            self.inner.mul_assign(a, b)
        }
    };
    (@one $inner:ty; [$($watch:ident)?]; scale) => {
        fn scale(&self, x: &mut Self::Buf, k: f32) -> $crate::Result<()> {
            $(let _watch = self.$watch("scale");)?
            self.inner.scale(x, k)
        }
    };
    (@one $inner:ty; [$($watch:ident)?]; axpy) => {
        fn axpy(&self, alpha: f32, x: &Self::Buf, y: &mut Self::Buf) -> $crate::Result<()> {
            $(let _watch = self.$watch("axpy");)?
            self.inner.axpy(alpha, x, y)
        }
    };
    (@one $inner:ty; [$($watch:ident)?]; dot) => {
        fn dot(&self, x: &Self::Buf, y: &Self::Buf) -> $crate::Result<f64> {
            $(let _watch = self.$watch("dot");)?
            self.inner.dot(x, y)
        }
    };
    (@one $inner:ty; [$($watch:ident)?]; dots) => {
        fn dots(&self, pairs: &[(&Self::Buf, &Self::Buf)]) -> $crate::Result<Vec<f64>> {
            $(let _watch = self.$watch("dots");)?
            self.inner.dots(pairs)
        }
    };
    (@one $inner:ty; [$($watch:ident)?]; adamw_step) => {
        fn adamw_step(
            &self,
            p: &mut Self::Buf,
            g: &Self::Buf,
            m: &mut Self::Buf,
            v: &mut Self::Buf,
            h: &$crate::backend::AdamHyper,
            grad_scale: f32,
            penalty: Option<$crate::backend::DiagPenalty<'_, Self>>,
        ) -> $crate::Result<()> {
            $(let _watch = self.$watch("adamw_step");)?
            let penalty = penalty.map(|d| $crate::backend::DiagPenalty::<$inner> {
                mean: d.mean,
                precision: d.precision,
                lambda: d.lambda,
            });
            self.inner.adamw_step(p, g, m, v, h, grad_scale, penalty)
        }
    };
}
