//! One error type for the whole crate. Every variant carries the file (and line, tensor
//! or field) it is about, so the command line can print a single useful line and exit 2.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A problem with the contents of a file (bad header, wrong shape, missing tensor, ...).
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },
    /// A problem on one line of a text file (JSONL rows).
    #[error("{}:{line}: {msg}", path.display())]
    Line {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    /// An operating-system error while touching a file.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Bad arguments or a combination of inputs that cannot work together.
    #[error("{0}")]
    Usage(String),
    /// A device fault: a CUDA error, or a finding of the simulator's checks (the message
    /// names the device and the kernel).
    #[error("{0}")]
    Device(String),
    /// A check the user asked for found a wrong result (`selftest`).
    #[error("{0}")]
    Failed(String),
    /// A NaN or infinity during a run: where (`step 3`, `batch 2`) and the first quantity
    /// found non-finite (the loss, the penalty, or a named tensor). The run stops before
    /// anything is written from it.
    #[error("{at}: non-finite {what}")]
    NonFinite { at: String, what: String },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The process exit code: 3 for a device fault or a non-finite number during a run,
    /// 1 for a failed check, 2 for everything else (bad input).
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Device(_) | Error::NonFinite { .. } => 3,
            Error::Failed(_) => 1,
            _ => 2,
        }
    }
}

impl Error {
    pub fn file(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::File {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }

    pub fn line(path: impl AsRef<Path>, line: usize, msg: impl Into<String>) -> Self {
        Error::Line {
            path: path.as_ref().to_path_buf(),
            line,
            msg: msg.into(),
        }
    }

    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    pub fn usage(msg: impl Into<String>) -> Self {
        Error::Usage(msg.into())
    }
}

/// Attach a path to any `io::Result`.
pub trait IoContext<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
