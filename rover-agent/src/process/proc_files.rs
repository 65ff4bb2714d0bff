//! The few files of `/proc/PID` process discovery reads, parsed once for the host rules and the
//! Kubernetes pods alike.

use std::fs;
use std::ops::Range;
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
/// Nanoseconds per clock tick (`USER_HZ`), the unit of `stat`'s times.
pub(crate) fn ns_per_tick() -> u64 {
    1_000_000_000 / procfs::ticks_per_second().max(1)
}

pub(crate) fn read_stat(proc_dir: &Path) -> Option<Stat> {
    let text = fs::read_to_string(proc_dir.join("stat")).ok()?;
    let (comm, fields) = split_stat(&text)?;
    let fields: Vec<&str> = fields.collect();
    Some(Stat {
        comm: comm.to_owned(),
        state: fields.first()?.chars().next()?,
        flags: fields.get(6)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

/// `/proc/PID/stat` split into the comm and the fields after it, `state` (field 3) first.
pub(crate) fn split_stat(text: &str) -> Option<(&str, std::str::SplitWhitespace<'_>)> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    Some((
        text.get(open + 1..close)?,
        text.get(close + 1..)?.split_whitespace(),
    ))
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
    fs::read(proc_dir.join("cmdline"))
        .ok()
        .map(|cmdline| CommandLine::from_cmdline(&cmdline))
}

/// The longest argument area read from a process's memory; a longer one is read from `cmdline`.
const ARGUMENTS_MAX: usize = 64 * 1024;

/// The command line read from process `pid`'s memory at `arguments` (where the kernel's task
/// iterator says its arguments are): one system call where `cmdline` costs three and a path
/// walk. `None` when that cannot tell (no permission, an area the process rewrote, which
/// `cmdline` reads on from into the environment, an empty or long one): read `cmdline` then.
pub(crate) fn read_arguments(pid: u32, arguments: Range<u64>) -> Option<CommandLine> {
    let len = usize::try_from(arguments.end.checked_sub(arguments.start)?).ok()?;
    if len == 0 || len > ARGUMENTS_MAX {
        return None;
    }
    let mut buffer = vec![0u8; len];
    let local = libc::iovec {
        iov_base: buffer.as_mut_ptr().cast(),
        iov_len: len,
    };
    let remote = libc::iovec {
        iov_base: arguments.start as *mut libc::c_void,
        iov_len: len,
    };
    // SAFETY: `local` covers `buffer`, ours and `len` bytes long; the kernel checks `remote`
    // against the other process's memory.
    let read =
        unsafe { libc::process_vm_readv(i32::try_from(pid).ok()?, &local, 1, &remote, 1, 0) };
    if usize::try_from(read).ok() != Some(len) || buffer.last() != Some(&0) {
        return None;
    }
    Some(CommandLine::from_cmdline(&buffer))
}

impl CommandLine {
    /// From the argument area as `cmdline` gives it: NUL-terminated arguments.
    fn from_cmdline(cmdline: &[u8]) -> Self {
        let mut text = String::with_capacity(cmdline.len());
        let mut argv0_len = None;
        for arg in cmdline
            .strip_suffix(b"\0")
            .unwrap_or(cmdline)
            .split(|byte| *byte == 0)
        {
            if argv0_len.is_some() {
                text.push(' ');
            }
            text.push_str(&String::from_utf8_lossy(arg));
            argv0_len.get_or_insert(text.len());
        }
        let argv0_len = argv0_len.unwrap_or(0);
        Self { text, argv0_len }
    }
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

/// A process as a list of every process gives it (the kernel's task iterator): the fields of its
/// `stat` a scan needs, the text its `/proc/PID/cgroup` would have, when the list could tell it
/// whole (else the file is read), where its arguments are in its memory, and whether it has an
/// executable (what `/proc/PID/exe` links to).
pub struct ListedProcess {
    pub(crate) pid: u32,
    pub(crate) stat: Stat,
    pub(crate) cgroup_file: Option<String>,
    pub(crate) arguments: Range<u64>,
    pub(crate) has_exe_file: bool,
}

/// What the list says, for tests that hold it against procfs.
impl ListedProcess {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn comm(&self) -> &str {
        &self.stat.comm
    }

    /// Clock ticks after boot, as `stat`'s field 22.
    pub fn start_time(&self) -> u64 {
        self.stat.start_time
    }

    pub fn is_kernel_thread(&self) -> bool {
        self.stat.is_kernel_thread()
    }

    /// A zombie or dead process.
    pub fn is_gone(&self) -> bool {
        self.stat.is_gone()
    }

    /// What the cgroup paths listed say; `None` when they were not whole.
    pub fn cgroup_identity(&self) -> Option<super::CgroupIdentity> {
        self.cgroup_file
            .as_deref()
            .map(|text| super::cgroup::parse_cgroup_file(text.as_bytes()))
    }

    pub fn has_exe_file(&self) -> bool {
        self.has_exe_file
    }

    /// The command line read where the list says the arguments are (`None`: `cmdline` would be
    /// read instead).
    pub fn command_line(&self) -> Option<String> {
        read_arguments(self.pid, self.arguments.clone()).map(|line| line.as_str().to_owned())
    }
}

/// Lists every process at once, where reading each process's `stat` and `cgroup` costs six
/// system calls per process.
pub trait ProcessList: Send {
    /// Every process of the host (thread-group leaders).
    fn list(&mut self) -> anyhow::Result<Vec<ListedProcess>>;
}
