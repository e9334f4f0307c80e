use std::path::PathBuf;

/// Everything that can keep a guest from running or finishing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestbedError {
    /// A host program the test bed needs is not installed.
    #[error(
        "`{program}` is not installed (needed for {purpose}); run ./scripts/test, which installs the test dependencies"
    )]
    MissingProgram { program: String, purpose: String },
    /// No Debian 6.12 kernel package is available, neither from apt nor in the cache.
    #[error(
        "no linux-image-6.12.*+deb12-amd64-unsigned package is known to apt and none is cached in {cache}; run apt-get update"
    )]
    NoKernelPackage { cache: PathBuf },
    /// A command run while preparing the guest failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        command: String,
        status: String,
        stderr: String,
    },
    /// A file operation failed.
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A workspace binary has not been built.
    #[error(
        "binary `{name}` not found at {path}; build it first with `cargo build --workspace --bins`"
    )]
    MissingBinary { name: String, path: PathBuf },
    /// The guest did not finish in time; it was killed.
    #[error("guest `{guest}` timed out after {secs} s; last console lines:\n{tail}")]
    Timeout {
        guest: String,
        secs: u64,
        tail: String,
    },
    /// A console line the test waited for never came.
    #[error(
        "guest `{guest}` never printed `{pattern}` within {secs} s; last console lines:\n{tail}"
    )]
    PatternNotSeen {
        guest: String,
        pattern: String,
        secs: u64,
        tail: String,
    },
    /// QEMU's machine protocol refused a command.
    #[error("QMP command `{command}` on guest `{guest}` failed: {reply}")]
    Qmp {
        guest: String,
        command: String,
        reply: String,
    },
}
