//! The per-CPU loss and activity counters every program keeps (`rover_common::counter`).

use aya::maps::{MapData, PerCpuArray};
use rover_common::counter;

use super::Error;

/// Totals since the program was loaded, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Program runs (on-CPU: samples on any CPU, targeted or not).
    pub seen: u64,
    /// Samples of idle CPUs.
    pub idle: u64,
    /// Samples or episodes added to the aggregates (what drains must sum to).
    pub recorded: u64,
    pub kernel_stack_lost: u64,
    pub user_stack_lost: u64,
    /// Samples dropped entirely because the aggregate map was full.
    pub aggregate_full: u64,
    /// Samples of kernel threads (no user stack).
    pub kernel_only: u64,
    /// Stacks deeper than the agent records (kept, truncated).
    pub stack_truncated: u64,
    /// Off-CPU: switch-outs not recorded because per-thread state could not be allocated.
    pub thread_state_lost: u64,
    /// Off-CPU: switch-outs left out by sampling.
    pub not_sampled: u64,
    /// Off-CPU: episodes shorter than the minimum block time.
    pub too_short: u64,
    /// Off-CPU: preemptions left out on request.
    pub preempt_excluded: u64,
    /// Off-CPU: episodes opened (target threads switched out and kept).
    pub episodes_opened: u64,
    /// Off-CPU: per-thread states created, and deleted when their threads exited.
    pub threads_created: u64,
    pub threads_deleted: u64,
    /// Off-CPU: episodes left out because the switch-in that ended them was never seen.
    pub episode_ends_missed: u64,
    /// Targets removed by the kernel because their process exited.
    pub targets_exited: u64,
    /// Kernel debug log records left out by the rate limit.
    pub logs_suppressed: u64,
}

/// Generates the field list once for reading and for differences.
macro_rules! each_counter {
    ($apply:ident) => {
        $apply!(
            seen,
            idle,
            recorded,
            kernel_stack_lost,
            user_stack_lost,
            aggregate_full,
            kernel_only,
            stack_truncated,
            thread_state_lost,
            not_sampled,
            too_short,
            preempt_excluded,
            episodes_opened,
            threads_created,
            threads_deleted,
            episode_ends_missed,
            targets_exited,
            logs_suppressed
        )
    };
}

impl std::ops::Sub for Counters {
    type Output = Counters;

    /// What happened between two readings (`self` the later one).
    fn sub(self, earlier: Counters) -> Counters {
        macro_rules! difference {
            ($($field:ident),*) => {
                Counters {
                    $($field: self.$field.saturating_sub(earlier.$field),)*
                }
            };
        }
        each_counter!(difference)
    }
}

impl std::ops::AddAssign for Counters {
    fn add_assign(&mut self, other: Counters) {
        macro_rules! sum {
            ($($field:ident),*) => {
                $(self.$field += other.$field;)*
            };
        }
        each_counter!(sum);
    }
}

impl Counters {
    pub(super) fn read(map: &PerCpuArray<MapData, u64>) -> Result<Self, Error> {
        let total = |index: u32| -> Result<u64, Error> {
            let per_cpu = map.get(&index, 0).map_err(|source| Error::Map {
                map: "COUNTERS",
                operation: "lookup",
                source,
            })?;
            Ok(per_cpu.iter().sum())
        };
        Ok(Self {
            seen: total(counter::SAMPLES_SEEN)?,
            idle: total(counter::SAMPLES_IDLE)?,
            recorded: total(counter::RECORDED)?,
            kernel_stack_lost: total(counter::KERNEL_STACK_LOST)?,
            user_stack_lost: total(counter::USER_STACK_LOST)?,
            aggregate_full: total(counter::AGGREGATE_FULL)?,
            kernel_only: total(counter::KERNEL_ONLY)?,
            stack_truncated: total(counter::STACK_TRUNCATED)?,
            thread_state_lost: total(counter::THREAD_STATE_LOST)?,
            not_sampled: total(counter::NOT_SAMPLED)?,
            too_short: total(counter::TOO_SHORT)?,
            preempt_excluded: total(counter::PREEMPT_EXCLUDED)?,
            episodes_opened: total(counter::EPISODES_OPENED)?,
            threads_created: total(counter::THREADS_CREATED)?,
            threads_deleted: total(counter::THREADS_DELETED)?,
            episode_ends_missed: total(counter::EPISODE_ENDS_MISSED)?,
            targets_exited: total(counter::TARGETS_EXITED)?,
            logs_suppressed: total(counter::LOGS_SUPPRESSED)?,
        })
    }

    /// Samples lost in any way (entirely or a stack of them).
    pub fn losses(&self) -> u64 {
        self.kernel_stack_lost + self.user_stack_lost + self.aggregate_full + self.thread_state_lost
    }

    /// Off-CPU: episodes opened but not closed (recorded, too short, lost to a full aggregate
    /// map, or end missed); once the program is detached, those still open when profiling
    /// stopped.
    pub fn open_episodes(&self) -> u64 {
        self.episodes_opened.saturating_sub(
            self.recorded + self.too_short + self.aggregate_full + self.episode_ends_missed,
        )
    }
}
