//! The window a policy item is checked on: one value per second, the last `len` seconds kept.

/// The last `len` one-second slots of one monitor of one process (or of the host, for the
/// load). A slot holds the latest value recorded in its second, or nothing when no value came
/// (the process was not readable, sampling started later). Values are `f32` (NaN = empty): CPU
/// %, thread counts and load averages need no more, and a window of an hour stays 14 KiB.
#[derive(Clone, Debug)]
pub struct CheckWindow {
    /// Second `s` lives in slot `s % len`.
    slots: Box<[f32]>,
    /// The newest second recorded; `None` before the first value.
    newest: Option<u64>,
}

impl CheckWindow {
    /// A window of `len_secs` slots (at least one).
    pub fn new(len_secs: u32) -> Self {
        Self {
            slots: vec![f32::NAN; len_secs.max(1) as usize].into_boxed_slice(),
            newest: None,
        }
    }

    pub fn len_secs(&self) -> u32 {
        self.slots.len() as u32
    }

    fn slot(&self, second: u64) -> usize {
        (second % self.slots.len() as u64) as usize
    }

    /// Whether `second` is still in the window.
    fn holds(&self, second: u64) -> bool {
        self.newest
            .is_some_and(|newest| second <= newest && newest - second < self.slots.len() as u64)
    }

    /// Records `value` for `second` (seconds on the caller's monotonic clock). A later value of
    /// the same second replaces the earlier one; seconds skipped since the newest are emptied;
    /// a second older than the window is ignored.
    pub fn record(&mut self, second: u64, value: f64) {
        let len = self.slots.len() as u64;
        match self.newest {
            Some(newest) if second <= newest => {
                if newest - second >= len {
                    return;
                }
            }
            Some(newest) => {
                // At most one turn of the ring needs emptying.
                for skipped in (newest + 1)..second.min(newest + 1 + len) {
                    let slot = self.slot(skipped);
                    self.slots[slot] = f32::NAN;
                }
                self.newest = Some(second);
            }
            None => self.newest = Some(second),
        }
        let slot = self.slot(second);
        self.slots[slot] = value as f32;
    }

    /// The value of the newest second, if it has one.
    pub fn latest(&self) -> Option<f64> {
        let value = self.slots[self.slot(self.newest?)];
        (!value.is_nan()).then_some(f64::from(value))
    }

    /// Whether a policy item fires at `now` (a second on the same clock as `record`): at least
    /// `count` of the seconds `now - period + 1 ..= now` have a value ≥ `threshold`. Returns the
    /// most recent such value (the cause's `current`). A period longer than the window is cut to
    /// it.
    pub fn fires(&self, now: u64, period_secs: u32, count: u32, threshold: f64) -> Option<f64> {
        let period = u64::from(period_secs.max(1)).min(self.slots.len() as u64);
        let mut matched = 0;
        let mut current = None;
        for second in (now.saturating_sub(period - 1)..=now).rev() {
            if !self.holds(second) {
                continue;
            }
            let value = self.slots[self.slot(second)];
            if !value.is_nan() && f64::from(value) >= threshold {
                matched += 1;
                current.get_or_insert(f64::from(value));
            }
        }
        current.filter(|_| matched >= count.max(1))
    }

    /// Changes the length (a policy update), keeping the values still inside the new window.
    pub fn resize(&mut self, len_secs: u32) {
        let mut resized = Self::new(len_secs);
        if let Some(newest) = self.newest {
            let keep = u64::from(resized.len_secs()).min(self.slots.len() as u64);
            for second in newest.saturating_sub(keep - 1)..=newest {
                let value = self.slots[self.slot(second)];
                resized.record(second, f64::from(value));
            }
        }
        *self = resized;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A window of `len` fed `values[i]` at second `start + i` (`None`: nothing that second).
    fn fed(len: u32, start: u64, values: &[Option<f64>]) -> CheckWindow {
        let mut window = CheckWindow::new(len);
        for (i, value) in values.iter().enumerate() {
            if let Some(value) = value {
                window.record(start + i as u64, *value);
            }
        }
        window
    }

    #[test]
    fn fires_when_count_of_the_last_period_slots_reach_the_threshold() {
        // The policy: PROCESS_CPU ≥ 50, Count 3 of Period 5.
        let w = fed(
            5,
            100,
            &[Some(10.0), Some(60.0), Some(20.0), Some(50.0), Some(55.0)],
        );
        assert_eq!(
            w.fires(104, 5, 3, 50.0),
            Some(55.0),
            "3 of 5 (50 itself counts)"
        );
        assert_eq!(w.fires(104, 5, 4, 50.0), None, "only 3");
        assert_eq!(w.fires(104, 2, 2, 50.0), Some(55.0), "the last 2");
        assert_eq!(w.fires(104, 3, 3, 50.0), None, "20 in the last 3");
        assert_eq!(w.fires(104, 5, 1, 60.5), None, "nothing reaches 60.5");
        assert_eq!(
            w.fires(104, 5, 1, 60.0),
            Some(60.0),
            "the most recent match"
        );
    }

    #[test]
    fn the_window_slides_and_old_seconds_leave_it() {
        let mut w = fed(
            5,
            0,
            &[Some(90.0), Some(90.0), Some(90.0), Some(0.0), Some(0.0)],
        );
        assert_eq!(w.fires(4, 5, 3, 50.0), Some(90.0));
        w.record(5, 0.0);
        assert_eq!(w.fires(5, 5, 3, 50.0), None, "second 0 left the window");
        assert_eq!(w.fires(5, 5, 2, 50.0), Some(90.0));
        // Checked later than the newest value: seconds without values count as not reached.
        assert_eq!(w.fires(7, 5, 2, 50.0), None);
        assert_eq!(w.fires(6, 5, 1, 50.0), Some(90.0));
    }

    #[test]
    fn skipped_seconds_are_empty_not_stale() {
        let mut w = fed(4, 0, &[Some(80.0), Some(80.0), Some(80.0), Some(80.0)]);
        // No values for seconds 4..=5 (the process was unreadable), then one at 6.
        w.record(6, 80.0);
        assert_eq!(w.fires(6, 4, 2, 50.0), Some(80.0), "seconds 3 and 6");
        assert_eq!(w.fires(6, 4, 3, 50.0), None, "4 and 5 are empty");
        // A gap longer than the window empties it all.
        w.record(100, 1.0);
        assert_eq!(w.fires(100, 4, 1, 50.0), None);
        assert_eq!(w.latest(), Some(1.0));
    }

    #[test]
    fn the_latest_value_of_a_second_wins_and_late_values_fill_their_slot() {
        let mut w = CheckWindow::new(3);
        assert_eq!(w.latest(), None);
        w.record(10, 70.0);
        w.record(10, 30.0);
        assert_eq!(w.latest(), Some(30.0));
        assert_eq!(w.fires(10, 3, 1, 50.0), None, "70 was replaced");
        w.record(12, 1.0);
        w.record(11, 99.0);
        assert_eq!(
            w.fires(12, 3, 1, 50.0),
            Some(99.0),
            "a late value in its own slot"
        );
        assert_eq!(w.latest(), Some(1.0), "the newest second is still 12");
        w.record(9, 99.0);
        assert_eq!(
            w.fires(12, 3, 2, 50.0),
            None,
            "second 9 is outside the window"
        );
    }

    #[test]
    fn early_seconds_and_oversized_periods() {
        let w = fed(3, 0, &[Some(60.0), Some(60.0)]);
        assert_eq!(
            w.fires(1, 3, 2, 50.0),
            Some(60.0),
            "fewer seconds than the period"
        );
        assert_eq!(
            w.fires(1, 10, 2, 50.0),
            Some(60.0),
            "period cut to the window"
        );
        assert_eq!(CheckWindow::new(0).len_secs(), 1);
        assert_eq!(
            CheckWindow::new(0).fires(0, 1, 1, 0.0),
            None,
            "nothing recorded"
        );
    }

    #[test]
    fn resizing_keeps_the_newest_values() {
        let mut w = fed(
            5,
            0,
            &[Some(1.0), Some(2.0), Some(3.0), Some(60.0), Some(70.0)],
        );
        w.resize(2);
        assert_eq!(w.len_secs(), 2);
        assert_eq!(w.fires(4, 2, 2, 50.0), Some(70.0));
        w.resize(10);
        assert_eq!(w.len_secs(), 10);
        assert_eq!(w.fires(4, 10, 2, 50.0), Some(70.0), "the two kept values");
        assert_eq!(w.fires(4, 10, 1, 2.5), Some(70.0));
        assert_eq!(
            w.fires(4, 10, 3, 2.5),
            None,
            "1, 2, 3 were cut by the first resize"
        );
        w.record(5, 80.0);
        assert_eq!(w.fires(5, 10, 3, 50.0), Some(80.0));
        let mut empty = CheckWindow::new(3);
        empty.resize(6);
        assert_eq!(empty.latest(), None);
    }
}
