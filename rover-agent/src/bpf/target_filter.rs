//! The in-kernel target filter: the `TARGETS` map of TGIDs (plus the load-time `TARGET_ALL`).

use aya::Ebpf;
use aya::maps::{HashMap, MapData};

use super::aggregates::open_map;
use super::{Error, Targets};

pub(super) struct TargetFilter(HashMap<MapData, u32, u8>);

impl TargetFilter {
    /// Takes `TARGETS` out of a loaded object and fills it with the target pids.
    pub(super) fn take(
        ebpf: &mut Ebpf,
        object: &'static str,
        targets: &Targets,
    ) -> Result<Self, Error> {
        let mut filter = Self(open_map(ebpf, object, "TARGETS", HashMap::try_from)?);
        if let Targets::Pids(pids) = targets {
            for &pid in pids {
                filter.add(pid)?;
            }
        }
        Ok(filter)
    }

    pub(super) fn add(&mut self, pid: u32) -> Result<(), Error> {
        self.0.insert(pid, 1, 0).map_err(|source| Error::Map {
            map: "TARGETS",
            operation: "update",
            source,
        })
    }
}

/// The `TARGET_ALL` global: whether every process is a target.
pub(super) fn target_all(targets: &Targets) -> bool {
    matches!(targets, Targets::All)
}
