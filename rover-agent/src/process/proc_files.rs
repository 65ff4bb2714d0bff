//! The few files of `/proc/PID` process discovery reads, parsed once for the host rules and the
//! Kubernetes pods alike.

use std::fs;
use std::path::Path;

/// The fields of `/proc/PID/stat` a scan needs.
pub(crate) struct Stat {
    pub(crate) comm: String,
    pub(crate) state: char,
    pub(crate) flags: u64,
    /// Clock ticks after boot: with the pid, it names one process (a reused pid starts later).
    pub(crate) start_time: u64,
}

impl Stat {
    /// A zombie or dead process: nothing left to profile.
    pub(crate) fn is_gone(&self) -> bool {
        matches!(self.state, 'Z' | 'X')
    }

    pub(crate) fn is_kernel_thread(&self) -> bool {
        self.flags & PF_KTHREAD != 0
    }
}

/// `PF_KTHREAD` in `stat`'s flags: a kernel thread, which has no user space to profile.
pub(crate) const PF_KTHREAD: u64 = 0x0020_0000;

/// `/proc/PID/stat`: `pid (comm) state ppid … flags(9) … starttime(22)`; comm may hold spaces
/// and parentheses, so fields are counted from its last `)`. `None` when the process vanished
/// or the file is not in that form.
pub(crate) fn read_stat(proc_dir: &Path) -> Option<Stat> {
    let text = fs::read_to_string(proc_dir.join("stat")).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_owned();
    let fields: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    Some(Stat {
        comm,
        state: fields.first()?.chars().next()?,
        flags: fields.get(6)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

/// A process's command line: its arguments joined by spaces (what Rover calls the command
/// line), kept as one string with the length of the first argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CommandLine {
    text: String,
    argv0_len: usize,
}

impl CommandLine {
    #[cfg(test)]
    pub(crate) fn from_args(args: &[&str]) -> Self {
        Self {
            text: args.join(" "),
            argv0_len: args.first().map_or(0, |arg| arg.len()),
        }
    }

    /// The arguments joined by spaces.
    pub(crate) fn as_str(&self) -> &str {
        &self.text
    }

    /// The first argument (argv[0]).
    pub(crate) fn argv0(&self) -> &str {
        &self.text[..self.argv0_len]
    }

    /// No arguments: no user space, or not exec'd yet.
    pub(crate) fn is_empty(&self) -> bool {
        self.text.is_empty()
    }
}

/// `/proc/PID/cmdline`; `None` when the process vanished.
pub(crate) fn read_command_line(proc_dir: &Path) -> Option<CommandLine> {
    let cmdline = fs::read(proc_dir.join("cmdline")).ok()?;
    let mut text = String::with_capacity(cmdline.len());
    let mut argv0_len = None;
    for arg in cmdline
        .strip_suffix(b"\0")
        .unwrap_or(&cmdline)
        .split(|byte| *byte == 0)
    {
        if argv0_len.is_some() {
            text.push(' ');
        }
        text.push_str(&String::from_utf8_lossy(arg));
        argv0_len.get_or_insert(text.len());
    }
    let argv0_len = argv0_len.unwrap_or(0);
    Some(CommandLine { text, argv0_len })
}

/// Whether the agent may open the process's executable (through `/proc/PID/exe`), which it
/// needs to symbolize it: another user's process, without privileges, cannot be profiled.
pub(crate) fn can_open_exe(proc_dir: &Path) -> bool {
    fs::File::open(proc_dir.join("exe")).is_ok()
}

/// The executable's name: `comm`, which the kernel cuts at 15 bytes, completed from argv[0]'s
/// file name when that starts with it (as gopsutil's `Name`, which Rover's `ExeName` is).
pub(crate) fn exe_name(comm: &str, argv0: &str) -> String {
    const COMM_MAX: usize = 15;
    let argv0_name = argv0
        .split(' ')
        .next()
        .and_then(|path| path.rsplit('/').next());
    match argv0_name {
        Some(name) if comm.len() >= COMM_MAX && name.starts_with(comm) => name.to_owned(),
        _ => comm.to_owned(),
    }
}
