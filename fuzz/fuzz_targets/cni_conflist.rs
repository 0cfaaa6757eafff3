#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| lattice_fuzz::targets::cni_conflist(data));
