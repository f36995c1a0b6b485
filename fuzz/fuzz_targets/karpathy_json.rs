//! Fuzzes `cots_data::fuzzing::check_karpathy_json` (docs/fuzzing.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| cots_data::fuzzing::check_karpathy_json(data));
