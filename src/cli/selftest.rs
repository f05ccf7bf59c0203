//! `selftest --device D [--json]`: what a user runs first on a new GPU. (Being written.)

use clap::Args;

use super::Common;
use crate::error::{Error, Result};

#[derive(Args)]
pub struct SelftestArgs {
    #[command(flatten)]
    pub common: Common,
}

pub fn run(_a: SelftestArgs) -> Result<()> {
    Err(Error::usage("selftest is not written yet"))
}
