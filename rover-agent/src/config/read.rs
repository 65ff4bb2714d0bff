//! Reading the parsed YAML with its key path at hand, so every error names the full key
//! (`process_discovery.scanner.regex[1].match_cmd`) and every key nobody read is reported.

use std::net::Ipv4Addr;
use std::time::Duration;

use serde_yaml::Value;

use super::ConfigError;
use super::env::substitute;

/// What reading carries along: the environment lookup and the warnings for the caller.
pub(super) struct Cx<'e> {
    pub env: &'e dyn Fn(&str) -> Option<String>,
    pub warnings: Vec<String>,
}

/// One value of the document and its key path.
pub(super) struct Node<'a> {
    pub path: String,
    value: &'a Value,
}

/// A mapping being read. Keys match ASCII case-insensitively, because Rover's Viper lowercases
/// them (`enable_TLS` and `enable_tls` are the same key). Every key asked for is recorded, and
/// [`Map::finish`] rejects the keys nobody asked for.
pub(super) struct Map<'a> {
    path: String,
    entries: Vec<(String, &'a Value)>,
    asked: Vec<&'static str>,
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        Value::Sequence(_) => "a list".into(),
        Value::Mapping(_) => "a mapping".into(),
        Value::Tagged(t) => format!("a value tagged {}", t.tag),
    }
}

impl<'a> Node<'a> {
    pub fn root(value: &'a Value) -> Self {
        Node {
            path: String::new(),
            value,
        }
    }

    fn invalid(&self, value: String, expected: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            key: if self.path.is_empty() {
                "(the whole file)".into()
            } else {
                self.path.clone()
            },
            value,
            expected: expected.into(),
        }
    }

    /// This value as a mapping; null (`key:` with nothing after it) is an empty one.
    pub fn map(&self) -> Result<Map<'a>, ConfigError> {
        match self.value {
            Value::Null => Ok(Map {
                path: self.path.clone(),
                entries: Vec::new(),
                asked: Vec::new(),
            }),
            Value::Mapping(m) => Ok(Map {
                path: self.path.clone(),
                entries: m.iter().map(|(k, v)| (describe(k), v)).collect(),
                asked: Vec::new(),
            }),
            other => Err(self.invalid(describe(other), "a mapping of keys")),
        }
    }

    /// This value as a list; null is an empty one. Items are named `path[i]`.
    pub fn list(&self) -> Result<Vec<Node<'a>>, ConfigError> {
        match self.value {
            Value::Null => Ok(Vec::new()),
            Value::Sequence(items) => Ok(items
                .iter()
                .enumerate()
                .map(|(i, value)| Node {
                    path: format!("{}[{i}]", self.path),
                    value,
                })
                .collect()),
            other => Err(self.invalid(describe(other), "a list")),
        }
    }

    /// This scalar as text after `${ENV:default}` substitution; `None` when null.
    pub fn text(&self, cx: &mut Cx) -> Result<Option<String>, ConfigError> {
        match self.value {
            Value::Null => Ok(None),
            Value::Bool(_) | Value::Number(_) => Ok(Some(describe(self.value))),
            Value::String(raw) => {
                let s = substitute(raw, cx.env);
                if let Some(placeholder) = s.dropped_around {
                    cx.warnings.push(format!(
                        "{}: the text around {placeholder} is dropped, as Rover does; the value is `{}`",
                        self.path, s.value
                    ));
                }
                Ok(Some(s.value))
            }
            other => Err(self.invalid(describe(other), "a single value")),
        }
    }
}

impl<'a> Map<'a> {
    /// The entry for `key`, recorded as known.
    pub fn get(&mut self, key: &'static str) -> Result<Option<Node<'a>>, ConfigError> {
        self.asked.push(key);
        let mut found = self
            .entries
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(key));
        let first = found.next();
        if let Some((again, _)) = found.next() {
            return Err(ConfigError::Invalid {
                key: join(&self.path, again),
                value: again.clone(),
                expected: format!("`{key}` only once (keys ignore case, as in Rover)"),
            });
        }
        Ok(first.map(|(_, value)| Node {
            path: join(&self.path, key),
            value,
        }))
    }

    /// The mapping under `key`, empty when the key is missing.
    pub fn section(&mut self, key: &'static str) -> Result<Map<'a>, ConfigError> {
        match self.get(key)? {
            Some(node) => node.map(),
            None => Ok(Map {
                path: join(&self.path, key),
                entries: Vec::new(),
                asked: Vec::new(),
            }),
        }
    }

    /// Fails on the first key that was never asked for, suggesting the closest known one.
    pub fn finish(self) -> Result<(), ConfigError> {
        for (key, _) in &self.entries {
            if !self.asked.iter().any(|k| k.eq_ignore_ascii_case(key)) {
                return Err(ConfigError::UnknownKey {
                    key: join(&self.path, key),
                    suggestion: closest(key, &self.asked).map(|k| join(&self.path, k)),
                });
            }
        }
        Ok(())
    }

    /// The text of `key`; `None` when missing or null (an empty string stays `Some("")`).
    pub fn string(
        &mut self,
        cx: &mut Cx,
        key: &'static str,
    ) -> Result<Option<String>, ConfigError> {
        match self.get(key)? {
            Some(node) => node.text(cx),
            None => Ok(None),
        }
    }

    /// `key` parsed by `parse`; `None` when missing, null or empty (the default applies), an
    /// error naming the key, the value and `expected` when `parse` refuses it.
    pub fn scalar<T>(
        &mut self,
        cx: &mut Cx,
        key: &'static str,
        expected: &str,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Result<Option<T>, ConfigError> {
        let Some(node) = self.get(key)? else {
            return Ok(None);
        };
        let Some(text) = node.text(cx)? else {
            return Ok(None);
        };
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Ok(None);
        }
        match parse(trimmed) {
            Some(v) => Ok(Some(v)),
            None => Err(node.invalid(text, expected)),
        }
    }

    pub fn bool(&mut self, cx: &mut Cx, key: &'static str) -> Result<Option<bool>, ConfigError> {
        self.scalar(cx, key, "true or false", parse_bool)
    }

    /// A duration greater than zero.
    pub fn duration(
        &mut self,
        cx: &mut Cx,
        key: &'static str,
    ) -> Result<Option<Duration>, ConfigError> {
        self.scalar(
            cx,
            key,
            "a duration greater than zero, such as 500ms, 5s or 1h30m",
            |s| parse_duration(s).filter(|d| !d.is_zero()),
        )
    }
}

/// Go's `strconv.ParseBool`, which Rover's decoding uses for strings.
pub(super) fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// A decimal integer (digits only: no sign, no separators).
pub(super) fn parse_u64(s: &str) -> Option<u64> {
    if s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse().ok()
    } else {
        None
    }
}

/// A whole number of at least 1 that fits a `u32` (a period in heartbeats, a cap on runs).
pub(super) fn parse_count(s: &str) -> Option<u32> {
    parse_u64(s)
        .and_then(|n| u32::try_from(n).ok())
        .filter(|n| *n >= 1)
}

/// Go's `time.ParseDuration` syntax, as Rover's files write durations: a sequence of decimal
/// numbers, each with an optional fraction and a unit (`ns`, `us`, `µs`, `μs`, `ms`, `s`, `m`,
/// `h`), e.g. `1h30m`, `1.5s`; `0` alone is zero. Own parser because `humantime` reads `m`
/// differently from Go in places, has no fractions, and accepts units Go refuses. Negative
/// durations are refused (no Rover setting means one).
pub(super) fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.strip_prefix('+').unwrap_or(s);
    if s == "0" {
        return Some(Duration::ZERO);
    }
    if s.is_empty() {
        return None;
    }
    const UNITS: [(&str, u128); 8] = [
        ("ns", 1),
        ("us", 1_000),
        ("µs", 1_000),
        ("μs", 1_000),
        ("ms", 1_000_000),
        ("s", 1_000_000_000),
        ("m", 60_000_000_000),
        ("h", 3_600_000_000_000),
    ];
    let mut rest = s;
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (int, after) = rest.split_at(int_len);
        let (frac, after) = match after.strip_prefix('.') {
            Some(f) => {
                let n = f.bytes().take_while(u8::is_ascii_digit).count();
                f.split_at(n)
            }
            None => ("", after),
        };
        if int.is_empty() && frac.is_empty() {
            return None;
        }
        // Longest unit first: `ms` before `m`.
        let (unit, scale) = UNITS
            .iter()
            .filter(|(u, _)| after.starts_with(u))
            .max_by_key(|(u, _)| u.len())?;
        rest = &after[unit.len()..];
        let whole: u128 = if int.is_empty() { 0 } else { int.parse().ok()? };
        let mut nanos = whole.checked_mul(*scale)?;
        if !frac.is_empty() {
            // Digits past 1e-20 of a unit cannot change a nanosecond count.
            let digits = &frac[..frac.len().min(20)];
            let f: u128 = digits.parse().ok()?;
            let part = f.checked_mul(*scale)? / 10u128.pow(digits.len() as u32);
            nanos = nanos.checked_add(part)?;
        }
        total = total.checked_add(nanos)?;
    }
    let secs = u64::try_from(total / 1_000_000_000).ok()?;
    Some(Duration::new(secs, (total % 1_000_000_000) as u32))
}

/// A byte size such as `32MiB`, `16 MiB`, `1.5GiB` or a plain number of bytes (`bytesize`'s
/// syntax; `MB` is 10^6, `MiB` 2^20).
pub(super) fn parse_bytes(s: &str) -> Option<u64> {
    s.parse::<bytesize::ByteSize>().ok().map(|b| b.as_u64())
}

/// Splits a comma-separated list, dropping empty items (Rover's `labels`, `namespaces`).
pub(super) fn comma_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A host name, or an IPv4 address when it looks like one.
pub(super) fn valid_host(host: &str) -> bool {
    if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return host.parse::<Ipv4Addr>().is_ok();
    }
    host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// The known key closest to a misspelt one, when the misspelling is small.
fn closest<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    let key = key.to_ascii_lowercase();
    known
        .iter()
        .map(|k| (edit_distance(&key, &k.to_ascii_lowercase()), *k))
        .filter(|(d, k)| *d <= 2 && *d < k.len())
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        let ms = Duration::from_millis;
        assert_eq!(parse_duration("20s"), Some(Duration::from_secs(20)));
        assert_eq!(parse_duration("9ms"), Some(ms(9)));
        assert_eq!(parse_duration("10m"), Some(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500us"), Some(Duration::from_micros(500)));
        assert_eq!(parse_duration("500µs"), Some(Duration::from_micros(500)));
        assert_eq!(parse_duration("1.5s"), Some(ms(1500)));
        assert_eq!(parse_duration(".5s"), Some(ms(500)));
        assert_eq!(parse_duration("1m0.25s"), Some(ms(60_250)));
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_duration("+2s"), Some(ms(2000)));
        for bad in [
            "",
            "5",
            "s",
            "-1s",
            "1x",
            "1 s",
            "1.s5",
            ".s",
            "1e3s",
            "5sec",
            "99999999999999999999999999999999999999999h",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn hosts() {
        for good in ["localhost", "oap.skywalking", "10.0.0.1", "a_b-c.d"] {
            assert!(valid_host(good), "{good}");
        }
        for bad in ["", "10.0.0.256", "1.2.3", "a..b", "-a", "http://x", "a b"] {
            assert!(!valid_host(bad), "{bad}");
        }
    }

    #[test]
    fn suggestions() {
        assert_eq!(closest("adr", &["addr", "enable_TLS"]), Some("addr"));
        assert_eq!(
            closest("ENABLE_TSL", &["addr", "enable_TLS"]),
            Some("enable_TLS")
        );
        assert_eq!(closest("zzzzzz", &["addr", "enable_TLS"]), None);
    }
}
