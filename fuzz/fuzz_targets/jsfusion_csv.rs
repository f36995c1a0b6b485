//! Fuzzes `cots_data::fuzzing::check_jsfusion_csv` (docs/fuzzing.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| cots_data::fuzzing::check_jsfusion_csv(data));
