//! Landlock: the filesystem access a mode keeps, as rules beneath paths.
//! Everything else (reading, writing, making, removing, executing) is
//! refused by the kernel. Best effort: a kernel without Landlock, or with an
//! older ABI, enforces what it can and [`Outcome`] says so.

use std::fmt;
use std::path::{Path, PathBuf};

use landlock::{
    Access as _, AccessFs, BitFlags, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus, ABI,
};

use super::{ConfineError, Result};

/// The rights handled: those of ABI 7 (Linux 6.15). Pinned rather than
/// "the newest the crate knows", so a newer kernel cannot start refusing a
/// right nobody tested (ABI 9's ResolveUnix would refuse connecting to a
/// VMM's socket by path).
const ABI_HANDLED: ABI = ABI::V7;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read files (SIGHUP re-reads serve's settings, token, certificates).
    ReadFiles,
    /// Read files and list directories (/proc/self for metrics).
    ReadTree,
    /// Make and remove sockets (VMM links, the control socket at exit).
    Sockets,
    /// Make and remove sockets and directories (vhost-user's private socket).
    Scratch,
    /// Open a device, read, write and ioctl it (/dev/net/tun).
    Device,
}

impl Access {
    fn rights(self) -> BitFlags<AccessFs> {
        match self {
            Access::ReadFiles => AccessFs::ReadFile.into(),
            Access::ReadTree => AccessFs::ReadFile | AccessFs::ReadDir,
            Access::Sockets => AccessFs::MakeSock | AccessFs::RemoveFile,
            Access::Scratch => {
                AccessFs::MakeSock | AccessFs::RemoveFile | AccessFs::MakeDir | AccessFs::RemoveDir
            }
            Access::Device => AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::IoctlDev,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Rules(Vec<(PathBuf, Access)>);

/// What the kernel made of the rules.
#[derive(Debug)]
pub enum Outcome {
    Full,
    Partly(&'static str),
    /// The kernel has no Landlock.
    Skipped(&'static str),
    /// The settings ask for something Landlock forbids.
    Declined(&'static str),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::Full => "enforced",
            Outcome::Partly(_) => "partly enforced",
            Outcome::Skipped(_) | Outcome::Declined(_) => "off",
        })
    }
}

impl Rules {
    pub fn push(&mut self, path: &Path, access: Access) {
        self.0.push((path.to_owned(), access));
    }

    /// Restrict this thread (and the threads and processes it starts from
    /// now on) to the rules.
    pub fn restrict(&self) -> Result<Outcome> {
        let landlock = |source| ConfineError::Landlock(source);
        let mut ruleset = Ruleset::default()
            .handle_access(AccessFs::from_all(ABI_HANDLED))
            .map_err(landlock)?
            .create()
            .map_err(landlock)?;
        for (path, access) in &self.0 {
            // A path that does not exist holds nothing to allow.
            let Ok(fd) = PathFd::new(path) else {
                tracing::debug!(path = %path.display(), "no Landlock rule for a missing path");
                continue;
            };
            let mut rights = access.rights();
            if !path.is_dir() {
                // Directory rights on a file are an error: keep the file's.
                rights &= AccessFs::from_file(ABI_HANDLED);
            }
            ruleset = ruleset
                .add_rule(PathBeneath::new(fd, rights))
                .map_err(|source| ConfineError::LandlockRule {
                    path: path.clone(),
                    source,
                })?;
        }
        let status = ruleset.restrict_self().map_err(landlock)?;
        Ok(match status.ruleset {
            RulesetStatus::FullyEnforced => Outcome::Full,
            RulesetStatus::PartiallyEnforced => {
                Outcome::Partly("this kernel's Landlock lacks some of the rights slipway uses")
            }
            RulesetStatus::NotEnforced => Outcome::Skipped("this kernel has no Landlock"),
        })
    }
}
