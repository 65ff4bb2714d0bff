//! Where a profile goes: format choice, an early writability check, an atomic write.

use std::io::{self, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use clap::ValueEnum;

use crate::profile::{FlameGraphSvg, Folded, Pprof, Profile, ProfileExporter, Weight};
use crate::task::{ProfileWindow, WindowSink};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Folded stacks, one `process;frame;...;leaf count` line per stack.
    Folded,
    /// An SVG flame graph.
    Svg,
    /// gzipped pprof protobuf (`go tool pprof`, Grafana, Pyroscope...).
    Pprof,
}

impl Format {
    fn from_path(path: &Path) -> Option<Self> {
        let name = path.file_name()?.to_str()?;
        if name.ends_with(".svg") {
            Some(Self::Svg)
        } else if name.ends_with(".pb.gz") || name.ends_with(".pprof") || name.ends_with(".pb") {
            Some(Self::Pprof)
        } else if name.ends_with(".folded") || name.ends_with(".txt") {
            Some(Self::Folded)
        } else {
            None
        }
    }
}

/// A destination checked before profiling starts, so a bad path fails in a second rather
/// than after the whole profile.
pub(super) struct Output {
    format: Format,
    destination: Destination,
}

enum Destination {
    Stdout,
    /// A regular file: written to a temporary file beside `path`, renamed over it when complete,
    /// so that an interrupted write never leaves half a profile.
    File {
        path: PathBuf,
        temporary: tempfile::NamedTempFile,
    },
    /// Something that is not a regular file (`/dev/null`, a FIFO, a terminal): opened and
    /// written in place; renaming over it would replace a device with a file.
    Special {
        path: PathBuf,
        file: std::fs::File,
    },
}

impl Output {
    pub(super) fn prepare(format: Option<Format>, path: Option<&Path>) -> anyhow::Result<Self> {
        let format = format
            .or_else(|| path.and_then(Format::from_path))
            .unwrap_or(Format::Folded);
        let path = match (path, format) {
            (Some(path), _) => path.to_owned(),
            (None, Format::Folded) => PathBuf::from("-"),
            (None, Format::Svg) => PathBuf::from("profile.svg"),
            (None, Format::Pprof) => PathBuf::from("profile.pb.gz"),
        };
        if path == Path::new("-") {
            if format == Format::Pprof && is_terminal() {
                anyhow::bail!("pprof output is binary: give --output FILE instead of a terminal");
            }
            return Ok(Self {
                format,
                destination: Destination::Stdout,
            });
        }
        if let Ok(metadata) = std::fs::metadata(&path)
            && !metadata.is_file()
        {
            if metadata.is_dir() {
                anyhow::bail!(
                    "--output {} is a directory: name a file in it",
                    path.display()
                );
            }
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .with_context(|| format!("cannot write --output {}", path.display()))?;
            return Ok(Self {
                format,
                destination: Destination::Special { path, file },
            });
        }
        let directory = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        let temporary = tempfile::Builder::new()
            .prefix(".rover-profile")
            // What a plain file creation would give, not tempfile's private 0600.
            .permissions(std::fs::Permissions::from_mode(0o644))
            .tempfile_in(directory)
            .with_context(|| {
                format!(
                    "cannot write --output {}: creating a file in {} failed",
                    path.display(),
                    directory.display()
                )
            })?;
        Ok(Self {
            format,
            destination: Destination::File { path, temporary },
        })
    }

    /// Writes the profile and says where it went.
    pub(super) fn write(
        self,
        profile: &Profile,
        weight: &Weight,
        title: &str,
    ) -> anyhow::Result<String> {
        let exporter: Box<dyn ProfileExporter> = match self.format {
            Format::Folded => Box::new(Folded {
                weight: weight.clone(),
            }),
            Format::Svg => Box::new(FlameGraphSvg {
                weight: weight.clone(),
                title: title.to_owned(),
            }),
            Format::Pprof => Box::new(Pprof),
        };
        let format = format!("{:?}", self.format).to_lowercase();
        match self.destination {
            Destination::Stdout => {
                let mut stdout = io::stdout().lock();
                exporter
                    .export(profile, &mut stdout)
                    .and_then(|()| stdout.flush())
                    .context("writing the profile to stdout")?;
                Ok(format!("wrote {format} to stdout"))
            }
            Destination::File {
                path,
                mut temporary,
            } => {
                exporter
                    .export(profile, temporary.as_file_mut())
                    .and_then(|()| temporary.as_file_mut().flush())
                    .with_context(|| format!("writing the profile to {}", path.display()))?;
                temporary.persist(&path).with_context(|| {
                    format!("moving the profile into place at {}", path.display())
                })?;
                Ok(format!("wrote {format} to {}", path.display()))
            }
            Destination::Special { path, mut file } => {
                exporter
                    .export(profile, &mut file)
                    .and_then(|()| file.flush())
                    .with_context(|| format!("writing the profile to {}", path.display()))?;
                Ok(format!("wrote {format} to {}", path.display()))
            }
        }
    }
}

/// What the file sink wrote, for the summary line.
#[derive(Debug)]
pub(super) struct Written {
    /// "wrote FORMAT to DESTINATION".
    pub description: String,
    /// The profile's estimated totals (samples or switches, then nanoseconds).
    pub totals: [u64; 2],
    pub distinct_stacks: usize,
}

/// The file exporters as a task's sink: the profile of a run (its single window) written to a
/// destination checked before profiling started.
pub(super) struct FileSink {
    output: Option<Output>,
    weight: Weight,
    title: String,
    written: Arc<Mutex<Option<anyhow::Result<Written>>>>,
}

impl FileSink {
    pub(super) fn new(
        output: Output,
        weight: Weight,
        title: String,
        written: Arc<Mutex<Option<anyhow::Result<Written>>>>,
    ) -> Self {
        Self {
            output: Some(output),
            weight,
            title,
            written,
        }
    }
}

impl WindowSink for FileSink {
    fn window(&mut self, window: ProfileWindow) -> anyhow::Result<()> {
        anyhow::ensure!(
            window.last,
            "a file holds one profile: a task writing to a file has a single window"
        );
        let output = self
            .output
            .take()
            .context("the profile was written already")?;
        let profile = &window.profile;
        let result = output
            .write(profile, &self.weight, &self.title)
            .map(|description| Written {
                description,
                totals: [profile.total(0), profile.total(1)],
                distinct_stacks: profile.samples().len(),
            });
        let failed = result.as_ref().err().map(|error| format!("{error:#}"));
        if let Ok(mut written) = self.written.lock() {
            *written = Some(result);
        }
        match failed {
            Some(error) => anyhow::bail!(error),
            None => Ok(()),
        }
    }
}

fn is_terminal() -> bool {
    use std::io::IsTerminal as _;
    io::stdout().is_terminal()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_follows_the_extension_unless_given() {
        assert_eq!(
            Format::from_path(Path::new("a/flame.svg")),
            Some(Format::Svg)
        );
        assert_eq!(
            Format::from_path(Path::new("cpu.pb.gz")),
            Some(Format::Pprof)
        );
        assert_eq!(
            Format::from_path(Path::new("out.folded")),
            Some(Format::Folded)
        );
        assert_eq!(Format::from_path(Path::new("noext")), None);
    }

    #[test]
    fn special_files_are_written_in_place_not_replaced() {
        use std::os::unix::fs::FileTypeExt as _;
        let dir = tempfile::tempdir().expect("temp dir");
        let fifo = dir.path().join("profile.fifo");
        let name = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: mkfifo with a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0, "mkfifo");
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::read(fifo).expect("read fifo"))
        };
        let output = Output::prepare(Some(Format::Folded), Some(&fifo)).expect("prepare");
        let profile = Profile::new(
            vec![crate::profile::ValueType::new("samples", "count")],
            std::time::SystemTime::now(),
        );
        let weight = Weight {
            value_index: 0,
            divisor: 1,
            unit_label: "samples".to_owned(),
        };
        output.write(&profile, &weight, "title").expect("write");
        reader.join().expect("reader");
        let kind = std::fs::metadata(&fifo).expect("still there").file_type();
        assert!(kind.is_fifo(), "the FIFO was replaced by {kind:?}");
    }

    #[test]
    fn a_directory_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let error = Output::prepare(None, Some(dir.path()))
            .err()
            .map(|error| format!("{error:#}"))
            .unwrap_or_default();
        assert!(error.contains("is a directory"), "{error}");
    }

    #[test]
    fn an_unwritable_directory_fails_before_profiling() {
        let error = Output::prepare(None, Some(Path::new("/nonexistent-dir/x.svg")))
            .err()
            .map(|error| format!("{error:#}"))
            .unwrap_or_default();
        assert!(
            error.contains("cannot write --output /nonexistent-dir/x.svg"),
            "{error}"
        );
    }
}
