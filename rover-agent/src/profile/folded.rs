//! Folded stacks: the text format of `stackcollapse-*`/`inferno-collapse-*`, which flame graph
//! tools read.

use std::collections::BTreeMap;
use std::io::{self, Write};

use super::{FrameKind, Profile, ProfileExporter, Weight};

/// Writes one `process;root;...;leaf count` line per distinct rendered stack, sorted by stack.
///
/// Kernel frames carry the `_[k]` suffix flame graph tools colour by; inlined frames look like
/// any other frame (as in `perf script`). Counts are `weight`'s value divided by its divisor,
/// rounded to nearest; stacks that round to 0 are left out unless the divisor is 1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Folded {
    pub weight: Weight,
}

impl ProfileExporter for Folded {
    fn export(&self, profile: &Profile, out: &mut dyn Write) -> io::Result<()> {
        for (stack, count) in folded_stacks(profile, &self.weight)? {
            writeln!(out, "{stack} {count}")?;
        }
        Ok(())
    }
}

/// The stacks of `profile` rendered as folded text (`process;root;...;leaf`) with their scaled
/// counts, as [`Folded`] writes them: stacks with equal text merged, sorted by text.
///
/// Fails with [`io::ErrorKind::InvalidInput`] when `weight` does not fit the profile.
pub(super) fn folded_stacks(profile: &Profile, weight: &Weight) -> io::Result<Vec<(String, u64)>> {
    if weight.divisor == 0 || weight.value_index >= profile.value_types().len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "weight {weight:?} does not fit a profile with {} value types",
                profile.value_types().len()
            ),
        ));
    }
    // Sum raw values before dividing, so that merged stacks are rounded once.
    let mut stacks = BTreeMap::<String, u64>::new();
    for sample in profile.samples() {
        let mut stack = String::new();
        push_sanitized(&mut stack, &sample.process.name);
        for &id in &sample.frames {
            let frame = profile.frame(id);
            stack.push(';');
            push_sanitized(&mut stack, &frame.display_name());
            if frame.kind == FrameKind::Kernel {
                stack.push_str("_[k]");
            }
        }
        let sum = stacks.entry(stack).or_default();
        *sum = sum.saturating_add(sample.values[weight.value_index]);
    }
    Ok(stacks
        .into_iter()
        .map(|(stack, value)| {
            let count = profile.estimate(weight.value_index, value, weight.divisor);
            (stack, count)
        })
        .filter(|&(_, count)| count > 0 || weight.divisor == 1)
        .collect())
}

/// Appends `name` with the characters that would break the line format replaced: `;` separates
/// frames and a line break ends the record.
fn push_sanitized(stack: &mut String, name: &str) {
    stack.extend(name.chars().map(|c| match c {
        ';' => ':',
        c if c.is_control() => ' ',
        c => c,
    }));
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::profile::ValueType;
    use crate::profile::test_support::{process, sample_profile, user};

    fn folded(profile: &Profile, value_index: usize, divisor: u64) -> String {
        let exporter = Folded {
            weight: Weight {
                value_index,
                divisor,
                unit_label: "samples".to_owned(),
            },
        };
        let mut out = Vec::new();
        exporter
            .export(profile, &mut out)
            .expect("export to memory");
        String::from_utf8(out).expect("folded output is UTF-8")
    }

    #[test]
    fn folded_golden() {
        assert_eq!(
            folded(&sample_profile(), 0, 1),
            "app;main;<[u8: 4]>::len 1\n\
             app;main;[unknown] (/usr/bin/app+0x2a) 1\n\
             app;main;run;fill;do_syscall_64_[k] 5\n\
             db;query 5\n"
        );
    }

    #[test]
    fn folded_divides_rounding_to_nearest_and_drops_zeros() {
        // In microseconds: 5.0, 1.4 → 1, 0.4 → dropped, 5.5 → 6.
        assert_eq!(
            folded(&sample_profile(), 1, 1_000),
            "app;main;[unknown] (/usr/bin/app+0x2a) 1\n\
             app;main;run;fill;do_syscall_64_[k] 5\n\
             db;query 6\n"
        );
    }

    #[test]
    fn folded_keeps_zero_counts_without_divisor() {
        let mut profile = Profile::new(vec![ValueType::new("samples", "count")], SystemTime::now());
        profile.add(&process(1, "idle"), &[user("wait\nloop")], &[0]);
        assert_eq!(folded(&profile, 0, 1), "idle;wait loop 0\n");
    }

    #[test]
    fn folded_empty_profile() {
        let profile = Profile::new(vec![ValueType::new("samples", "count")], SystemTime::now());
        assert_eq!(folded(&profile, 0, 1), "");
    }

    #[test]
    fn folded_rejects_weight_that_does_not_fit() {
        let profile = sample_profile();
        for (value_index, divisor) in [(2, 1), (0, 0)] {
            let weight = Weight {
                value_index,
                divisor,
                unit_label: "samples".to_owned(),
            };
            let error = folded_stacks(&profile, &weight).expect_err("invalid weight");
            assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        }
    }

    #[test]
    fn scaled_values_are_summed_before_they_are_rounded() {
        // Sampled with p = 0.3: each kept switch-out stands for 3.33.
        let mut profile =
            Profile::new(vec![ValueType::new("switches", "count")], SystemTime::now());
        profile.set_scale(0, 1.0 / 0.3);
        let app = process(1, "app");
        // One stack in three drains, and another with the same folded line (another pid).
        for _ in 0..3 {
            profile.add(&app, &[user("wait")], &[1]);
        }
        profile.add(&process(2, "app"), &[user("wait")], &[1]);
        profile.add(&app, &[user("other")], &[1]);
        assert_eq!(folded(&profile, 0, 1), "app;other 3\napp;wait 13\n");
        assert_eq!(profile.total(0), 17);
        assert_eq!(profile.recorded_total(0), 5);
    }
}
