//! The policies of the services this node reports processes of: what the next `queryPolicies`
//! sends (each service's last UUID) and what its reply changes.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tracing::{info, warn};

use crate::backend::{Policy, ServicePolicy};

/// Each service's current policy (`None`: none yet, or it was removed) and its UUID.
#[derive(Debug, Default)]
pub(crate) struct Policies {
    services: HashMap<String, Option<Arc<Policy>>>,
    /// The unsupported parts already logged, per service.
    logged: HashSet<String>,
}

impl Policies {
    /// The query for `services` (those with processes on this node now): each with the UUID of
    /// its policy, `""` for none. Services no longer present are forgotten.
    pub fn query(&mut self, services: &HashSet<String>) -> Vec<(String, String)> {
        self.services
            .retain(|service, _| services.contains(service));
        let mut query: Vec<(String, String)> = services
            .iter()
            .map(|service| {
                let uuid = self
                    .policy(service)
                    .map(|policy| policy.uuid.clone())
                    .unwrap_or_default();
                (service.clone(), uuid)
            })
            .collect();
        query.sort();
        query
    }

    pub fn policy(&self, service: &str) -> Option<&Arc<Policy>> {
        self.services.get(service)?.as_ref()
    }

    /// Applies a reply: a new UUID replaces the service's policy, the same UUID changes
    /// nothing, a removed policy stops its checks. Returns whether any policy changed.
    pub fn apply(&mut self, reply: Vec<ServicePolicy>) -> bool {
        let mut changed = false;
        for service_policy in reply {
            for unsupported in service_policy.not_supported() {
                if self
                    .logged
                    .insert(format!("{}\n{unsupported}", service_policy.service))
                {
                    warn!(service = service_policy.service, "{unsupported}");
                }
            }
            let ServicePolicy { service, policy } = service_policy;
            let current = self.services.entry(service.clone()).or_default();
            match policy {
                Some(policy) => {
                    if current.as_ref().is_some_and(|old| old.uuid == policy.uuid) {
                        continue;
                    }
                    info!(
                        service,
                        uuid = policy.uuid,
                        "continuous profiling policy {}",
                        if current.is_some() {
                            "replaced"
                        } else {
                            "received"
                        }
                    );
                    *current = Some(Arc::new(policy));
                    changed = true;
                }
                None => {
                    if current.take().is_some() {
                        info!(
                            service,
                            "continuous profiling policy removed: its checks stop"
                        );
                        changed = true;
                    }
                }
            }
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Monitor, PolicyItem, ProfilingTarget, TargetPolicy};

    fn policy(uuid: &str, threshold: f64) -> Policy {
        Policy {
            uuid: uuid.into(),
            targets: vec![TargetPolicy {
                target: ProfilingTarget::OnCpu,
                items: vec![PolicyItem {
                    monitor: Monitor::ProcessCpu,
                    threshold,
                    period_secs: 5,
                    count: 3,
                    uri_list: Vec::new(),
                    uri_regex: None,
                }],
            }],
        }
    }

    fn reply(service: &str, policy: Option<Policy>) -> Vec<ServicePolicy> {
        vec![ServicePolicy {
            service: service.into(),
            policy,
        }]
    }

    fn services(names: &[&str]) -> HashSet<String> {
        names.iter().map(|name| (*name).to_owned()).collect()
    }

    #[test]
    fn uuids_are_sent_back_and_updates_replace_or_stop() {
        let mut policies = Policies::default();
        let both = services(&["b", "a"]);
        assert_eq!(
            policies.query(&both),
            vec![("a".into(), String::new()), ("b".into(), String::new())]
        );
        assert!(policies.apply(reply("a", Some(policy("u1", 50.0)))));
        assert_eq!(policies.policy("a").map(|p| p.threshold()), Some(50.0));
        assert_eq!(
            policies.query(&both),
            vec![("a".into(), "u1".into()), ("b".into(), String::new())]
        );
        // The same UUID again brings nothing new: the policy (and the windows under it) stay.
        let before = Arc::clone(policies.policy("a").expect("a policy"));
        assert!(!policies.apply(reply("a", Some(policy("u1", 70.0)))));
        assert!(Arc::ptr_eq(
            &before,
            policies.policy("a").expect("a policy")
        ));
        // A new UUID replaces it.
        assert!(policies.apply(reply("a", Some(policy("u2", 70.0)))));
        assert_eq!(policies.policy("a").map(|p| p.threshold()), Some(70.0));
        // UUID "": removed, and the query sends "" again.
        assert!(policies.apply(reply("a", None)));
        assert!(policies.policy("a").is_none());
        assert!(!policies.apply(reply("a", None)), "removed already");
        assert_eq!(policies.query(&both)[0], ("a".into(), String::new()));
    }

    #[test]
    fn a_service_without_processes_is_forgotten() {
        let mut policies = Policies::default();
        policies.query(&services(&["a"]));
        policies.apply(reply("a", Some(policy("u1", 50.0))));
        assert_eq!(
            policies.query(&services(&["b"])),
            vec![("b".into(), String::new())]
        );
        assert!(policies.policy("a").is_none());
        assert_eq!(
            policies.query(&services(&["a"])),
            vec![("a".into(), String::new())]
        );
    }

    #[test]
    fn unsupported_parts_are_logged_once_per_service() {
        let mut policies = Policies::default();
        let mut http = policy("u1", 50.0);
        http.targets[0].items[0].monitor = Monitor::HttpErrorRate;
        policies.apply(reply("a", Some(http.clone())));
        policies.apply(reply("b", Some(http.clone())));
        http.uuid = "u2".into();
        policies.apply(reply("a", Some(http)));
        assert_eq!(policies.logged.len(), 2, "{:?}", policies.logged);
    }

    impl Policy {
        fn threshold(&self) -> f64 {
            self.targets[0].items[0].threshold
        }
    }
}
