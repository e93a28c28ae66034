#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dsql_proxy_fuzz_targets::aurora_status(data));
