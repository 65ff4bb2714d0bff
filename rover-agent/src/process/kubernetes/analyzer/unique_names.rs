//! Process names unique within a service instance: the OAP's process id is a hash of the process
//! name and the instance, without the pid, so two processes of one instance with one name (two
//! `python` workers of a pod) would merge into one backend process.

use foldhash::{HashMap, HashMapExt as _};

use crate::process::entity::EntityNames;

/// A named process, for [`make_process_names_unique`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedProcess {
    pub pid: u32,
    /// `starttime` of `/proc/PID/stat` (clock ticks after boot): the older process keeps the name.
    pub start_time: u64,
    pub names: EntityNames,
}

/// Where several processes of one instance (same service and instance names) share a process
/// name, the oldest (earliest start, then lowest pid) keeps it and each other one gets
/// `<name>-<pid>`.
///
/// Why this rule: the names depend only on the live processes, not on the order they were seen,
/// so a rescan and a restarted agent give the same names; the common case (one process per
/// name) keeps the bare name, which stays the same backend process across the process's
/// restarts; a process that starts later never renames one already reported (it is younger); the
/// only rename is a suffixed process taking the bare name when the older holder exits.
pub fn make_process_names_unique(processes: &mut [NamedProcess]) {
    // A suffixed name may, in theory, equal another process's own name (`java-42`): rounds go on
    // until no clash is left. Each round leaves one process per clash as it was and lengthens the
    // others' names, so a few rounds end it; the bound only guards against a pid given twice.
    for _ in 0..processes.len() {
        let mut by_name: HashMap<(&str, &str, &str), Vec<usize>> = HashMap::new();
        for (index, process) in processes.iter().enumerate() {
            let names = &process.names;
            by_name
                .entry((
                    &names.service_name,
                    &names.instance_name,
                    &names.process_name,
                ))
                .or_default()
                .push(index);
        }
        let mut to_rename: Vec<usize> = Vec::new();
        for mut clash in by_name.into_values().filter(|indexes| indexes.len() > 1) {
            clash.sort_by_key(|&index| (processes[index].start_time, processes[index].pid));
            to_rename.extend(&clash[1..]);
        }
        if to_rename.is_empty() {
            return;
        }
        for index in to_rename {
            let process = &mut processes[index];
            process.names.process_name = format!("{}-{}", process.names.process_name, process.pid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(pid: u32, start_time: u64, instance: &str, name: &str) -> NamedProcess {
        NamedProcess {
            pid,
            start_time,
            names: EntityNames {
                layer: "K8S_SERVICE".to_owned(),
                service_name: "shop.default".to_owned(),
                instance_name: instance.to_owned(),
                process_name: name.to_owned(),
                labels: vec!["k8s-service".to_owned()],
            },
        }
    }

    fn names(processes: &[NamedProcess]) -> Vec<&str> {
        processes
            .iter()
            .map(|process| process.names.process_name.as_str())
            .collect()
    }

    #[test]
    fn the_oldest_keeps_the_name_and_the_others_get_their_pid() {
        let mut processes = vec![
            process(30, 500, "pod-a", "python"),
            process(10, 900, "pod-a", "python"),
            process(20, 500, "pod-a", "python"),
            process(40, 100, "pod-a", "envoy"),
            // Another instance: its python is no clash.
            process(50, 1, "pod-b", "python"),
        ];
        make_process_names_unique(&mut processes);
        assert_eq!(
            names(&processes),
            ["python-30", "python-10", "python", "envoy", "python"]
        );
    }

    #[test]
    fn the_same_processes_in_another_order_get_the_same_names() {
        let mut forward = vec![
            process(7, 2, "pod-a", "sh"),
            process(8, 1, "pod-a", "sh"),
            process(9, 3, "pod-a", "sh"),
        ];
        let mut backward: Vec<NamedProcess> = forward.iter().rev().cloned().collect();
        make_process_names_unique(&mut forward);
        make_process_names_unique(&mut backward);
        backward.reverse();
        assert_eq!(forward, backward);
        assert_eq!(names(&forward), ["sh-7", "sh", "sh-9"]);

        // A younger process joins: the names already given stay.
        let mut joined = forward.clone();
        joined.push(process(3, 4, "pod-a", "sh"));
        make_process_names_unique(&mut joined);
        assert_eq!(names(&joined), ["sh-7", "sh", "sh-9", "sh-3"]);
    }

    #[test]
    fn a_suffix_that_meets_another_name_is_suffixed_again() {
        let mut processes = vec![
            process(7, 1, "pod-a", "java-9"),
            process(5, 2, "pod-a", "java"),
            process(9, 3, "pod-a", "java"),
        ];
        make_process_names_unique(&mut processes);
        assert_eq!(names(&processes), ["java-9", "java", "java-9-9"]);

        // A pid given twice cannot be told apart: the rounds are bounded.
        let mut twice = vec![process(1, 1, "p", "a"), process(1, 1, "p", "a")];
        make_process_names_unique(&mut twice);
        assert_eq!(twice.len(), 2);
    }
}
