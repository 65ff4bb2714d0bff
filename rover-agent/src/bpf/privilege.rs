//! Whether this process may load and attach eBPF profilers.

use std::{fs, io};

use super::Error;

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The effective capabilities that matter for profiling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Privilege {
    pub cap_bpf: bool,
    pub cap_perfmon: bool,
    pub cap_sys_admin: bool,
}

impl Privilege {
    /// From the `CapEff:` hex mask of `/proc/self/status`.
    pub fn from_effective_mask(mask: u64) -> Self {
        let has = |capability: u32| mask & (1 << capability) != 0;
        Self {
            cap_bpf: has(CAP_BPF),
            cap_perfmon: has(CAP_PERFMON),
            cap_sys_admin: has(CAP_SYS_ADMIN),
        }
    }

    /// What is missing to load programs and open system-wide perf events, if anything.
    pub fn missing(&self) -> Option<String> {
        if self.cap_sys_admin || (self.cap_bpf && self.cap_perfmon) {
            return None;
        }
        let missing: Vec<&str> = [(self.cap_bpf, "CAP_BPF"), (self.cap_perfmon, "CAP_PERFMON")]
            .into_iter()
            .filter(|(held, _)| !held)
            .map(|(_, name)| name)
            .collect();
        Some(format!("this process lacks {}", missing.join(" and ")))
    }
}

/// Reads this process's effective capabilities.
pub fn check_privilege() -> io::Result<Privilege> {
    effective_capabilities().map(Privilege::from_effective_mask)
}

/// This process's effective capability mask (`CapEff:` of `/proc/self/status`; bit N is
/// capability N).
pub fn effective_capabilities() -> io::Result<u64> {
    let status = fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .ok_or_else(|| io::Error::other("no CapEff line in /proc/self/status"))
}

/// Fails with [`Error::MissingPrivilege`] when loading programs is bound to fail; when the
/// capabilities cannot be read, lets the kernel decide.
pub fn require_privilege() -> Result<(), Error> {
    match check_privilege().map(|privilege| privilege.missing()) {
        Ok(Some(missing)) => Err(Error::MissingPrivilege { missing }),
        Ok(None) | Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_has_everything() {
        assert_eq!(
            Privilege::from_effective_mask(u64::MAX >> 23).missing(),
            None
        );
    }

    #[test]
    fn bpf_and_perfmon_suffice_without_sys_admin() {
        let mask = (1 << CAP_BPF) | (1 << CAP_PERFMON);
        assert_eq!(Privilege::from_effective_mask(mask).missing(), None);
    }

    #[test]
    fn names_each_missing_capability() {
        let none = Privilege::from_effective_mask(0)
            .missing()
            .unwrap_or_default();
        assert!(none.contains("CAP_BPF and CAP_PERFMON"), "{none}");
        let only_bpf = Privilege::from_effective_mask(1 << CAP_BPF).missing();
        assert_eq!(only_bpf.as_deref(), Some("this process lacks CAP_PERFMON"));
    }
}
