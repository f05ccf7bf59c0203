//! `selftest`: every kernel against its reference at several shapes, then a whole
//! grad + curvature + training step on a built-in tiny model. (Being written.)
