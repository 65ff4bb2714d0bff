//! Host processes found by rules over their command line (`process_discovery.scanner.regex[]`,
//! Rover 0.5.0's REGEX scanner): each scan walks `/proc`, names the processes the first matching
//! rule picks through its templates, and returns what changed since the previous scan.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::config::{HostRuleSettings, ScannerSettings};

use super::entity::{EntityNames, ProcessEntity};
use super::host_ip::{self, HostIpError, InterfaceIps};
use super::proc_files::{CommandLine, Stat, can_open_exe, exe_name, read_command_line, read_stat};
use super::rule_template::{
    self, FINDER_METHODS, FinderValues, ProcessValues, ROVER_METHODS, RoverValues, RuleTemplate,
    TemplateError,
};

/// Why a scanner could not be built or could not scan.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error("cannot list the processes in {}", path.display())]
    ListProcesses {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What the rules' templates and the reported properties know of this host and agent.
#[derive(Clone, Debug)]
pub struct HostFacts {
    /// `<cluster_name>::` prefixes service names when set.
    pub cluster_name: Option<String>,
    /// Reported as `host_ip`; the fallback of `.Rover.HostIPV4` for an interface the host lacks.
    pub host_ip: IpAddr,
    /// `.Rover.HostName`.
    pub host_name: String,
    /// `.Rover.InstanceID`: the agent id sent to the backend.
    pub agent_instance_id: String,
}

impl HostFacts {
    /// Facts of the host the agent runs on; the IP is `host_ip_override` when given, else the
    /// node's IP as [`host_ip::host_ip`] finds it.
    pub fn detect(
        cluster_name: Option<String>,
        host_ip_override: Option<IpAddr>,
        agent_instance_id: String,
    ) -> Result<Self, HostIpError> {
        Ok(Self {
            cluster_name,
            host_ip: host_ip::host_ip(host_ip_override)?,
            host_name: host_name(),
            agent_instance_id,
        })
    }
}

/// The changes one scan found. A pid can be both removed and added (reused by a new process, or
/// renamed): apply `removed` first.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ScanChanges {
    /// New processes, and processes whose entity changed, by pid.
    pub added: Vec<ProcessEntity>,
    /// Pids whose previously added entity is gone, in order.
    pub removed: Vec<u32>,
}

/// Finds host processes by rules; keeps what it learnt of each process between scans, so a scan
/// reads one small file (`stat`) per known process and the command line of new ones only.
pub struct HostRuleScanner {
    rules: Vec<CompiledRule>,
    facts: HostFacts,
    proc_root: PathBuf,
    self_pid: u32,
    uses_interfaces: bool,
    known: HashMap<u32, KnownProcess>,
}

struct CompiledRule {
    settings: HostRuleSettings,
    service_name: RuleTemplate,
    instance_name: RuleTemplate,
    process_name: RuleTemplate,
    /// Its names depend only on what a scan keeps of a process (not on the interfaces, the
    /// working directory or the executable's path, which may change): a known process keeps
    /// the names it was given, without rendering them again at every scan.
    stable: bool,
    /// A rendering failure is warned about once per rule, not at every scan.
    warned: bool,
}

/// A process as the previous scan left it. A process is the same while its pid, start time and
/// `comm` stay: a new start time is a reused pid; a new `comm` is an exec, whose command line
/// is read again.
struct KnownProcess {
    start_time: u64,
    comm: String,
    /// Never reported, and never read again unless the kernel says it changed.
    kernel_thread: bool,
    matched: Option<MatchedProcess>,
}

impl KnownProcess {
    fn kernel_thread(stat: Stat) -> Self {
        Self {
            start_time: stat.start_time,
            comm: stat.comm,
            kernel_thread: true,
            matched: None,
        }
    }
}

struct MatchedProcess {
    rule: usize,
    command_line: CommandLine,
    groups: Vec<String>,
    profilable: bool,
    /// The entity last added for it; `None` while its names fail to render.
    reported: Option<ProcessEntity>,
}

impl HostRuleScanner {
    /// Compiles every rule's name templates; a template that does not parse is an error naming
    /// its config key.
    pub fn new(settings: &ScannerSettings, facts: HostFacts) -> Result<Self, Error> {
        let rules = settings
            .rules
            .iter()
            .enumerate()
            .map(|(index, rule)| {
                let compile = |field: &str, source: &str| {
                    let key = format!("process_discovery.scanner.regex[{index}].{field}");
                    RuleTemplate::parse_setting(key, source, &[ROVER_METHODS, FINDER_METHODS])
                };
                let service_name = compile("service_name", &rule.service_name)?;
                let instance_name = compile("instance_name", &rule.instance_name)?;
                let process_name = compile("process_name", &rule.process_name)?;
                let stable = [&service_name, &instance_name, &process_name]
                    .iter()
                    .all(|template| !template.uses_interfaces)
                    && [&rule.service_name, &rule.instance_name, &rule.process_name]
                        .iter()
                        .all(|source| {
                            !source.contains("WorkDir") && !source.contains("ExeFilePath")
                        });
                Ok(CompiledRule {
                    service_name,
                    instance_name,
                    process_name,
                    stable,
                    settings: rule.clone(),
                    warned: false,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let uses_interfaces = rules.iter().any(|rule| {
            [&rule.service_name, &rule.instance_name, &rule.process_name]
                .iter()
                .any(|template| template.uses_interfaces)
        });
        Ok(Self {
            rules,
            facts,
            proc_root: PathBuf::from("/proc"),
            self_pid: std::process::id(),
            uses_interfaces,
            known: HashMap::new(),
        })
    }

    /// Scans another procfs tree than `/proc` (tests build one in a temporary directory).
    pub fn with_proc_root(mut self, proc_root: impl Into<PathBuf>) -> Self {
        self.proc_root = proc_root.into();
        self
    }

    /// Walks the procfs tree once and returns the changes since the previous scan (the first
    /// scan adds every matching process). Blocking: run it off the async runtime.
    ///
    /// `changed`: the processes that exec'd or exited since the previous scan, when the kernel
    /// tells (then the others, known already, are not read again: a scan costs a directory
    /// listing); `None` reads every process's `stat` to find execs and reused pids.
    ///
    /// Never reported: the agent itself, kernel threads, zombies. Processes that vanish while
    /// being read are skipped quietly; one whose names fail to render is skipped with a warning.
    pub fn scan(&mut self, changed: Option<&HashSet<u32>>) -> Result<ScanChanges, Error> {
        let entries = fs::read_dir(&self.proc_root).map_err(|source| Error::ListProcesses {
            path: self.proc_root.clone(),
            source,
        })?;
        let interfaces = self.uses_interfaces.then(interfaces).flatten();
        let mut previous = std::mem::take(&mut self.known);
        let mut changes = ScanChanges::default();
        for entry in entries.flatten() {
            // Only thread-group leaders are listed in /proc: threads live under task/.
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|name| name.parse().ok())
            else {
                continue;
            };
            if pid == self.self_pid {
                continue;
            }
            let proc_dir = entry.path();
            // Known, and the kernel says it neither exec'd nor exited: as it was.
            let unchanged = match changed {
                Some(changed) if !changed.contains(&pid) => previous.remove(&pid),
                _ => None,
            };
            let (mut process, old_entity) = match unchanged {
                Some(known) if known.kernel_thread => {
                    self.known.insert(pid, known);
                    continue;
                }
                Some(mut known) => {
                    let old_entity = known.matched.as_mut().and_then(|m| m.reported.take());
                    (known, old_entity)
                }
                None => {
                    let Some(stat) = read_stat(&proc_dir) else {
                        continue;
                    };
                    if stat.is_gone() {
                        continue;
                    }
                    if stat.is_kernel_thread() {
                        // Remembered, so that it is not read again while the kernel says
                        // nothing of it.
                        self.known.insert(pid, KnownProcess::kernel_thread(stat));
                        continue;
                    }
                    match previous.remove(&pid) {
                        Some(mut known)
                            if known.start_time == stat.start_time && known.comm == stat.comm =>
                        {
                            let old_entity = known.matched.as_mut().and_then(|m| m.reported.take());
                            (known, old_entity)
                        }
                        stale => {
                            if stale.and_then(|known| known.matched?.reported).is_some() {
                                changes.removed.push(pid);
                            }
                            match self.discover(&proc_dir, stat) {
                                Some(process) => (process, None),
                                None => continue,
                            }
                        }
                    }
                }
            };
            if let Some(matched) = process.matched.as_mut()
                && old_entity.is_some()
                && self.rules[matched.rule].stable
            {
                // It would render as before: unchanged.
                matched.reported = old_entity;
                self.known.insert(pid, process);
                continue;
            }
            let new_entity = process.matched.as_ref().and_then(|matched| {
                let rule = &mut self.rules[matched.rule];
                render(
                    rule,
                    &self.facts,
                    interfaces.as_ref(),
                    pid,
                    &proc_dir,
                    &process.comm,
                    matched,
                )
            });
            match (&old_entity, &new_entity) {
                (Some(old), Some(new)) if old == new => {}
                (old, new) => {
                    if old.is_some() {
                        changes.removed.push(pid);
                    }
                    if let Some(new) = new {
                        changes.added.push(new.clone());
                    }
                }
            }
            if let Some(matched) = process.matched.as_mut() {
                matched.reported = new_entity;
            }
            self.known.insert(pid, process);
        }
        changes.removed.extend(
            previous
                .into_iter()
                .filter(|(_, gone)| gone.matched.as_ref().is_some_and(|m| m.reported.is_some()))
                .map(|(pid, _)| pid),
        );
        changes.removed.sort_unstable();
        changes.added.sort_by_key(|entity| entity.pid);
        Ok(changes)
    }

    /// Reads a process seen for the first time: its command line and the first rule matching
    /// it. `None` when it vanished, or has no command line yet (it is read again next scan).
    fn discover(&self, proc_dir: &Path, stat: Stat) -> Option<KnownProcess> {
        let command_line = read_command_line(proc_dir)?;
        if command_line.is_empty() {
            return None;
        }
        let matched = self.rules.iter().enumerate().find_map(|(rule, compiled)| {
            let captures = compiled
                .settings
                .match_cmd
                .captures(command_line.as_str())?;
            let groups = captures
                .iter()
                .map(|group| group.map_or_else(String::new, |group| group.as_str().to_owned()))
                .collect();
            Some(MatchedProcess {
                rule,
                groups,
                // The agent reads the binary through /proc/PID/exe to symbolize it; a process
                // it may not open (another user's, without privileges) cannot be profiled.
                profilable: can_open_exe(proc_dir),
                command_line: command_line.clone(),
                reported: None,
            })
        });
        Some(KnownProcess {
            start_time: stat.start_time,
            comm: stat.comm,
            kernel_thread: false,
            matched,
        })
    }
}

/// The entity of a matched process, `None` (warned once per rule) when a template fails.
fn render(
    rule: &mut CompiledRule,
    facts: &HostFacts,
    interfaces: Option<&HashMap<String, InterfaceIps>>,
    pid: u32,
    proc_dir: &Path,
    comm: &str,
    matched: &MatchedProcess,
) -> Option<ProcessEntity> {
    let context = rule_template::context(
        &ProcessValues {
            pid,
            exe_name: &exe_name(comm, matched.command_line.argv0()),
            argv0: matched.command_line.argv0(),
            command_line: matched.command_line.as_str(),
            proc_dir,
        },
        &RoverValues {
            instance_id: &facts.agent_instance_id,
            host_name: &facts.host_name,
            host_ip: facts.host_ip,
            interfaces,
        },
        &FinderValues {
            layer: &rule.settings.layer,
            groups: &matched.groups,
        },
    );
    let rendered = [
        ("service_name", &rule.service_name),
        ("instance_name", &rule.instance_name),
        ("process_name", &rule.process_name),
    ]
    .map(|(field, template)| template.render(&context).map_err(|error| (field, error)));
    let [service_name, instance_name, process_name] = match rendered {
        [Ok(service), Ok(instance), Ok(process)] => [service, instance, process],
        [service, instance, process] => {
            if !rule.warned {
                rule.warned = true;
                if let Some(Err((field, error))) = [service, instance, process]
                    .into_iter()
                    .find(Result::is_err)
                {
                    tracing::warn!(
                        pid,
                        command_line = matched.command_line.as_str(),
                        "cannot render {field} of host rule {}, processes it matches are not reported \
                         (warned once per rule): {error}",
                        rule.settings.match_cmd
                    );
                }
            }
            return None;
        }
    };
    let names = EntityNames {
        layer: rule.settings.layer.clone(),
        service_name,
        instance_name,
        process_name,
        labels: rule.settings.labels.clone(),
    };
    Some(ProcessEntity::host(
        pid,
        names,
        facts.cluster_name.as_deref(),
        facts.host_ip,
        matched.command_line.as_str(),
        matched.profilable,
    ))
}

/// This scan's interface addresses; without them `.Rover.HostIPV4` falls back to the host IP.
pub(crate) fn interfaces() -> Option<HashMap<String, InterfaceIps>> {
    host_ip::interface_ips_by_name()
        .inspect_err(|error| tracing::warn!("cannot list network interfaces: {error}"))
        .ok()
}

fn host_name() -> String {
    let mut buffer = [0u8; 256];
    // SAFETY: gethostname writes at most buffer.len() bytes into the buffer.
    let result = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) };
    if result != 0 {
        tracing::warn!(
            "cannot read the host name: {}",
            std::io::Error::last_os_error()
        );
        return String::new();
    }
    let end = buffer
        .iter()
        .position(|byte| *byte == 0)
        .unwrap_or(buffer.len());
    String::from_utf8_lossy(&buffer[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::time::Duration;

    use super::*;
    use crate::process::proc_files::PF_KTHREAD;

    const HOST_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));

    /// A procfs tree in a temporary directory: `PID/{stat,cmdline,exe,cwd}`.
    struct FakeProc {
        root: tempfile::TempDir,
    }

    impl FakeProc {
        fn new() -> Self {
            let root = tempfile::tempdir().unwrap();
            fs::write(root.path().join("bin-java"), b"\x7fELF").unwrap();
            Self { root }
        }

        /// A user process with an executable and a working directory.
        fn add(&self, pid: u32, comm: &str, start_time: u64, argv: &[&str]) {
            self.add_raw(pid, comm, 'S', 0, start_time, argv);
            let dir = self.root.path().join(pid.to_string());
            std::os::unix::fs::symlink(self.root.path().join("bin-java"), dir.join("exe")).unwrap();
            std::os::unix::fs::symlink(self.root.path(), dir.join("cwd")).unwrap();
        }

        fn add_raw(
            &self,
            pid: u32,
            comm: &str,
            state: char,
            flags: u64,
            start: u64,
            argv: &[&str],
        ) {
            let dir = self.root.path().join(pid.to_string());
            fs::create_dir_all(&dir).unwrap();
            let stat = format!(
                "{pid} ({comm}) {state} 1 1 1 0 -1 {flags} 0 0 0 0 0 0 0 0 20 0 1 0 {start} 0 0\n"
            );
            fs::write(dir.join("stat"), stat).unwrap();
            let cmdline: Vec<u8> = argv
                .iter()
                .flat_map(|arg| [arg.as_bytes(), b"\0"].concat())
                .collect();
            fs::write(dir.join("cmdline"), cmdline).unwrap();
        }

        fn remove(&self, pid: u32) {
            fs::remove_dir_all(self.root.path().join(pid.to_string())).unwrap();
        }

        fn path(&self) -> &Path {
            self.root.path()
        }
    }

    fn rule(match_cmd: &str, service: &str, instance: &str, process: &str) -> HostRuleSettings {
        HostRuleSettings {
            match_cmd: regex::Regex::new(match_cmd).unwrap(),
            layer: "OS_LINUX".to_owned(),
            service_name: service.to_owned(),
            instance_name: instance.to_owned(),
            process_name: process.to_owned(),
            labels: Vec::new(),
        }
    }

    fn facts(cluster_name: Option<&str>) -> HostFacts {
        HostFacts {
            cluster_name: cluster_name.map(str::to_owned),
            host_ip: HOST_IP,
            host_name: "node-1".to_owned(),
            agent_instance_id: "agent-uuid".to_owned(),
        }
    }

    fn scanner(rules: Vec<HostRuleSettings>, facts: HostFacts, proc: &FakeProc) -> HostRuleScanner {
        let settings = ScannerSettings {
            period: Duration::from_secs(3),
            rules,
        };
        HostRuleScanner::new(&settings, facts)
            .unwrap()
            .with_proc_root(proc.path())
    }

    fn pids(changes: &ScanChanges) -> Vec<u32> {
        changes.added.iter().map(|entity| entity.pid).collect()
    }

    #[test]
    fn first_matching_rule_names_the_process_through_its_templates() {
        let proc = FakeProc::new();
        proc.add(100, "java", 1000, &["/usr/bin/java", "-jar", "shop.jar"]);
        proc.add(101, "python3", 1001, &["python3", "app.py"]);
        proc.add(102, "bash", 1002, &["bash"]);
        let mut java = rule(
            r"java .*?(\w+)\.jar",
            "{{.Finder.RegexMatchGroup 1}}",
            r#"{{.Rover.HostIPV4 "lo"}}"#,
            "{{.Process.ExeName}}-{{.Process.Pid}}",
        );
        java.labels = vec!["b".to_owned(), "a".to_owned()];
        let rules = vec![
            java,
            rule(
                "python|java",
                "scripts",
                "{{.Rover.HostName}}",
                "{{.Process.CommandLine}}",
            ),
        ];
        let mut scanner = scanner(rules, facts(Some("prod")), &proc);

        let changes = scanner.scan(None).unwrap();
        assert_eq!(changes.removed, Vec::<u32>::new());
        assert_eq!(pids(&changes), [100, 101]);
        let shop = &changes.added[0];
        assert_eq!(shop.layer, "OS_LINUX");
        assert_eq!(shop.service_name, "prod::shop");
        assert_eq!(shop.instance_name, "127.0.0.1");
        assert_eq!(shop.process_name, "java-100");
        assert_eq!(shop.labels, ["b", "a"]);
        let properties: Vec<(&str, &str)> = shop
            .properties
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .collect();
        assert_eq!(
            properties,
            [
                ("host_ip", "192.0.2.10"),
                ("pid", "100"),
                ("command_line", "/usr/bin/java -jar shop.jar"),
                ("support_ebpf_profiling", "true"),
            ]
        );
        let script = &changes.added[1];
        assert_eq!(script.service_name, "prod::scripts");
        assert_eq!(script.instance_name, "node-1");
        assert_eq!(script.process_name, "python3 app.py");

        // Nothing changed: nothing to report.
        assert_eq!(scanner.scan(None).unwrap(), ScanChanges::default());
    }

    #[test]
    fn every_rover_template_renders() {
        let proc = FakeProc::new();
        let argv = ["/opt/very-long-server-name", "--port", "80"];
        proc.add(200, "very-long-serve", 1, &argv);
        let process = concat!(
            "{{.Process.ExeName}}|{{.Process.ExeFilePath}}|{{.Process.WorkDir}}|",
            "{{.Process.ExeNameInCommandLine}}|{{.Rover.InstanceID}}|{{.Finder.Layer}}|",
            r#"{{equalsOrDefault "80" "http" (.Finder.RegexMatchGroup 1)}}|"#,
            r#"{{"lo" | .Rover.HostIPV4}}|{{.Rover.HostIPV4 "no-such-iface0"}}"#,
        );
        let rules = vec![rule(r"--port (\d+)", "svc", "inst", process)];
        let mut scanner = scanner(rules, facts(None), &proc);

        let changes = scanner.scan(None).unwrap();
        let root = proc.path().display();
        assert_eq!(
            changes.added[0].process_name,
            format!(
                "very-long-server-name|{root}/bin-java|{root}|/opt/very-long-server-name|\
                 agent-uuid|OS_LINUX|http|127.0.0.1|192.0.2.10"
            )
        );
        assert_eq!(changes.added[0].service_name, "svc");
    }

    #[test]
    fn self_kernel_threads_and_zombies_are_never_reported() {
        let proc = FakeProc::new();
        proc.add(
            std::process::id(),
            "rover-agent",
            1,
            &["rover-agent", "run"],
        );
        proc.add_raw(2, "kthreadd", 'S', PF_KTHREAD, 1, &[]);
        proc.add_raw(3, "kworker/0:1", 'I', PF_KTHREAD, 1, &["kworker"]);
        proc.add_raw(4, "defunct", 'Z', 0, 1, &["defunct"]);
        proc.add(5, "app", 1, &["app"]);
        let mut scanner = scanner(vec![rule(".", "s", "i", "p")], facts(None), &proc);

        assert_eq!(pids(&scanner.scan(None).unwrap()), [5]);
    }

    #[test]
    fn exits_reused_pids_and_execs_are_reported() {
        let proc = FakeProc::new();
        proc.add(10, "app", 100, &["app", "one"]);
        proc.add(11, "app", 101, &["app", "two"]);
        proc.add(12, "app", 102, &["app", "three"]);
        let rules = vec![rule("^app", "s", "i", "{{.Process.CommandLine}}")];
        let mut scanner = scanner(rules, facts(None), &proc);
        assert_eq!(pids(&scanner.scan(None).unwrap()), [10, 11, 12]);

        // 10 exits; 11 is reused by a new process with the same command line; 12 execs.
        proc.remove(10);
        proc.remove(11);
        proc.add(11, "app", 555, &["app", "two"]);
        proc.remove(12);
        proc.add(12, "app2", 102, &["app", "four"]);
        let changes = scanner.scan(None).unwrap();
        assert_eq!(changes.removed, [10, 11, 12]);
        assert_eq!(pids(&changes), [11, 12]);
        assert_eq!(changes.added[1].process_name, "app four");
    }

    #[test]
    fn with_the_kernel_s_changes_only_changed_and_new_processes_are_read() {
        let proc = FakeProc::new();
        proc.add(10, "app", 100, &["app", "one"]);
        proc.add(11, "app", 101, &["app", "two"]);
        proc.add(12, "app", 102, &["app", "three"]);
        proc.add_raw(2, "kthreadd", 'S', PF_KTHREAD, 1, &[]);
        let rules = vec![rule("^app", "s", "i", "{{.Process.CommandLine}}")];
        let mut scanner = scanner(rules, facts(None), &proc);
        assert_eq!(
            pids(&scanner.scan(Some(&HashSet::new())).unwrap()),
            [10, 11, 12]
        );

        // 11 and 12 exec, but the kernel tells of 12 only; 10 exits; 13 is new.
        for (pid, start, argv) in [(11, 101, ["app", "new-two"]), (12, 102, ["app", "new-3"])] {
            proc.remove(pid);
            proc.add(pid, "app2", start, &argv);
        }
        proc.remove(10);
        proc.add(13, "app", 103, &["app", "five"]);
        // A stat that cannot be read would drop a process read again: only 12 and 13 are.
        fs::write(proc.path().join("11/stat"), "garbage").unwrap();
        fs::write(proc.path().join("2/stat"), "garbage").unwrap();
        let changes = scanner.scan(Some(&HashSet::from([12, 10]))).unwrap();
        assert_eq!(changes.removed, [10, 12]);
        assert_eq!(pids(&changes), [12, 13]);
        assert_eq!(changes.added[0].process_name, "app new-3");

        // Without the kernel's word, every process is read again: 11's exec is found (its stat
        // readable again).
        proc.remove(11);
        proc.add(11, "app2", 101, &["app", "new-two"]);
        let changes = scanner.scan(None).unwrap();
        assert_eq!(changes.removed, [11]);
        assert_eq!(pids(&changes), [11]);
    }

    #[test]
    fn changed_names_are_removed_and_added() {
        let proc = FakeProc::new();
        proc.add(20, "app", 1, &["app"]);
        let workdir = proc.path().join("work");
        fs::create_dir(&workdir).unwrap();
        let rules = vec![rule("^app", "s", "i", "{{.Process.WorkDir}}")];
        let mut scanner = scanner(rules, facts(None), &proc);
        assert_eq!(pids(&scanner.scan(None).unwrap()), [20]);

        // The process changed its working directory.
        let cwd = proc.path().join("20/cwd");
        fs::remove_file(&cwd).unwrap();
        std::os::unix::fs::symlink(&workdir, &cwd).unwrap();
        let changes = scanner.scan(None).unwrap();
        assert_eq!(changes.removed, [20]);
        assert_eq!(changes.added[0].process_name, workdir.display().to_string());
    }

    #[test]
    fn unreadable_executable_is_not_profilable_and_render_failures_skip_the_process() {
        let proc = FakeProc::new();
        proc.add_raw(30, "noexe", 'S', 0, 1, &["noexe"]);
        proc.add(31, "v6", 1, &["v6"]);
        let rules = vec![
            rule("^noexe", "s", "i", "p"),
            rule("^v6", "s", r#"{{.Rover.HostIPV6 "no-such-iface0"}}"#, "p"),
            rule(".", "fallback", "i", "p"),
        ];
        let mut scanner = scanner(rules, facts(None), &proc);
        let changes = scanner.scan(None).unwrap();
        // 31's rule fails to render: it is skipped, not handed to a later rule.
        assert_eq!(pids(&changes), [30]);
        assert_eq!(
            changes.added[0].properties[3],
            ("support_ebpf_profiling", "false".to_owned())
        );
        assert_eq!(scanner.scan(None).unwrap(), ScanChanges::default());
    }

    #[test]
    fn scanner_can_move_to_a_blocking_thread() {
        fn assert_send<T: Send + 'static>() {}
        assert_send::<HostRuleScanner>();
    }

    #[test]
    fn bad_template_is_an_error_naming_its_key() {
        let rules = vec![
            rule("a", "s", "i", "p"),
            rule("b", "s", "i", "p"),
            rule("c", "{{.Process.ExeName", "i", "p"),
        ];
        let settings = ScannerSettings {
            period: Duration::from_secs(3),
            rules,
        };
        let Err(error) = HostRuleScanner::new(&settings, facts(None)) else {
            panic!("a template that does not parse must be refused");
        };
        assert!(matches!(error, Error::Template { .. }), "{error:?}");
        let message = error.to_string();
        assert!(
            message.contains("process_discovery.scanner.regex[2].service_name"),
            "{message}"
        );
        assert!(message.contains("{{.Process.ExeName"), "{message}");
    }

    #[test]
    fn finds_a_real_process_and_reports_its_exit() {
        let mut child = std::process::Command::new("sleep")
            .arg("30.123")
            .spawn()
            .unwrap();
        let rules = vec![rule(
            r"^sleep 30\.123$",
            "sleepers",
            "i",
            "{{.Process.ExeName}}",
        )];
        let settings = ScannerSettings {
            period: Duration::from_secs(3),
            rules,
        };
        let mut scanner = HostRuleScanner::new(&settings, facts(None)).unwrap();

        let changes = scanner.scan(None).unwrap();
        assert_eq!(pids(&changes), [child.id()]);
        assert_eq!(changes.added[0].process_name, "sleep");
        assert_eq!(changes.added[0].properties[3].1, "true");

        child.kill().unwrap();
        child.wait().unwrap();
        let changes = scanner.scan(None).unwrap();
        assert_eq!(changes.removed, [child.id()]);
        assert!(changes.added.is_empty());
    }
}
