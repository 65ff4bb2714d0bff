//! What each pod's processes were last named for, by pod key and by instance: a pod event
//! finds the pods sharing an instance with the changed one without a pass over every pod.

// foldhash: the maps of thousands of processes hashed at every first scan, where SipHash
// cost a fifth of naming them.
use foldhash::{HashMap, HashSet};

use super::{Instance, PodState};

#[derive(Default)]
pub(super) struct PodStates {
    by_key: HashMap<String, PodState>,
    /// The keys of the pods with processes in each instance.
    by_instance: HashMap<Instance, HashSet<String>>,
}

impl PodStates {
    pub(super) fn len(&self) -> usize {
        self.by_key.len()
    }

    pub(super) fn get(&self, key: &str) -> Option<&PodState> {
        self.by_key.get(key)
    }

    pub(super) fn keys(&self) -> impl Iterator<Item = &String> {
        self.by_key.keys()
    }

    pub(super) fn insert(&mut self, key: String, state: PodState) {
        self.unindex(&key);
        for instance in &state.instances {
            self.by_instance
                .entry(instance.clone())
                .or_default()
                .insert(key.clone());
        }
        self.by_key.insert(key, state);
    }

    pub(super) fn remove(&mut self, key: &str) -> Option<PodState> {
        self.unindex(key);
        self.by_key.remove(key)
    }

    /// The keys of the pods with processes in any of `instances`.
    pub(super) fn in_instances<'a>(
        &'a self,
        instances: &'a HashSet<Instance>,
    ) -> impl Iterator<Item = &'a String> {
        instances
            .iter()
            .filter_map(|instance| self.by_instance.get(instance))
            .flatten()
    }

    fn unindex(&mut self, key: &str) {
        let Some(old) = self.by_key.get(key) else {
            return;
        };
        for instance in &old.instances {
            if let Some(keys) = self.by_instance.get_mut(instance) {
                keys.remove(key);
                if keys.is_empty() {
                    self.by_instance.remove(instance);
                }
            }
        }
    }
}
