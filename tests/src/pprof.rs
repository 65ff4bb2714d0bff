//! Decoding the agent's pprof output the way pprof tools do: gunzip, then profile.proto.

use std::collections::HashMap;
use std::io::Read as _;
use std::ops::Deref;
use std::path::Path;

use prost::Message as _;
use rover_agent::profile::pprof_proto::Profile;

pub struct DecodedProfile(Profile);

pub fn read(path: &Path) -> DecodedProfile {
    let compressed =
        std::fs::read(path).unwrap_or_else(|error| panic!("reading {}: {error}", path.display()));
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(compressed.as_slice())
        .read_to_end(&mut bytes)
        .unwrap_or_else(|error| panic!("{} is not gzip: {error}", path.display()));
    let profile = Profile::decode(bytes.as_slice())
        .unwrap_or_else(|error| panic!("{} is not a profile.proto: {error}", path.display()));
    DecodedProfile(profile)
}

impl Deref for DecodedProfile {
    type Target = Profile;
    fn deref(&self) -> &Profile {
        &self.0
    }
}

impl DecodedProfile {
    /// `(type, unit)` of each sample value.
    pub fn sample_types(&self) -> Vec<(&str, &str)> {
        let string = |index: i64| self.string(index).as_str();
        self.sample_type
            .iter()
            .map(|value_type| (string(value_type.r#type), string(value_type.unit)))
            .collect()
    }

    pub fn string(&self, index: i64) -> &String {
        usize::try_from(index)
            .ok()
            .and_then(|index| self.string_table.get(index))
            .unwrap_or_else(|| panic!("string index {index} outside the table"))
    }

    /// Sums of the first two values over samples with a frame in function `name`.
    pub fn samples_with_function(&self, name: &str) -> (i64, i64) {
        let functions: HashMap<u64, String> = self
            .function
            .iter()
            .map(|function| (function.id, self.string(function.name).clone()))
            .collect();
        let locations: HashMap<u64, bool> = self
            .location
            .iter()
            .map(|location| {
                let named = location.line.iter().any(|line| {
                    functions.get(&line.function_id).unwrap_or_else(|| {
                        panic!("line refers to missing function {}", line.function_id)
                    }) == name
                });
                (location.id, named)
            })
            .collect();
        self.sample
            .iter()
            .filter(|sample| {
                sample.location_id.iter().any(|id| {
                    *locations
                        .get(id)
                        .unwrap_or_else(|| panic!("sample refers to missing location {id}"))
                })
            })
            .fold((0, 0), |(count, cpu), sample| {
                (count + sample.value[0], cpu + sample.value[1])
            })
    }
}
