//! `kubernetes-validate` (PyPI), with which `tests/tests/deploy.rs` checks the manifests of
//! `deploy/kubernetes` against the Kubernetes JSON schemas it bundles (no network when it runs).
//! Installed by `cargo xtask test` into a virtual environment under the target directory, once:
//! later runs find the pinned version there and touch no registry.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;

use crate::{output, run, target_dir};

/// The release whose schemas the manifests are checked against (it validates for Kubernetes
/// 1.37 by default). Pinned, so a new release cannot change a test's verdict unannounced.
const VERSION: &str = "1.37.0";

/// Where the tests look for it: `<target>/tools/kubernetes-validate`.
fn venv_dir() -> PathBuf {
    target_dir().join("tools").join("kubernetes-validate")
}

/// Installs the pinned `kubernetes-validate` unless the virtual environment already has it.
pub(crate) fn ensure() -> anyhow::Result<()> {
    let venv = venv_dir();
    let program = venv.join("bin").join("kubernetes-validate");
    if installed_version(&program).as_deref() == Some(VERSION) {
        return Ok(());
    }
    eprintln!(
        "xtask: installing kubernetes-validate {VERSION} (PyPI) into {}",
        venv.display()
    );
    run(Command::new("python3").arg("-m").arg("venv").arg(&venv)).with_context(|| {
        format!(
            "creating a Python virtual environment in {} (needs python3 with the venv module, \
             e.g. Debian's python3-venv)",
            venv.display()
        )
    })?;
    run(Command::new(venv.join("bin").join("python"))
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .arg(format!("kubernetes-validate=={VERSION}")))
    .context("installing kubernetes-validate from PyPI")?;
    match installed_version(&program) {
        Some(version) if version == VERSION => Ok(()),
        other => anyhow::bail!(
            "{} reports version {other:?} after installing {VERSION}",
            program.display()
        ),
    }
}

/// The version `program --version` prints (`1.37.0`), if it runs.
fn installed_version(program: &Path) -> Option<String> {
    let text = output(Command::new(program).arg("--version")).ok()?;
    parse_version(&text)
}

/// The last word of the output: the bare version, or a version after the program's name.
fn parse_version(text: &str) -> Option<String> {
    text.split_whitespace().last().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_version_line() {
        assert_eq!(parse_version("1.37.0\n").as_deref(), Some("1.37.0"));
        assert_eq!(
            parse_version("kubernetes-validate 1.37.0").as_deref(),
            Some("1.37.0")
        );
        assert_eq!(parse_version(""), None);
    }
}
