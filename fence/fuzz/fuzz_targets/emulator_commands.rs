//! The emulator as a device server under arbitrary command streams: CDBs and parameter
//! lists from three nexuses. It must answer every command and keep its invariants.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_fence::emulator::{Emulator, NexusId, NexusInfo};

fuzz_target!(|data: &[u8]| {
    let mut lu = Emulator::new();
    for i in 0..3u16 {
        lu.add_nexus(NexusInfo::sas(0x5001_4050_0000_0000 + u64::from(i), i + 1));
    }
    // Commands: [nexus, cdb length, cdb..., data length, data...] repeated.
    let mut rest = data;
    while rest.len() >= 2 {
        let nexus = NexusId(u16::from(rest[0] % 4));
        let cdb_len = usize::from(rest[1] % 17);
        let Some(cdb) = rest.get(2..2 + cdb_len) else {
            return;
        };
        rest = &rest[2 + cdb_len..];
        let data_len = usize::from(rest.first().copied().unwrap_or(0) % 64);
        let params = rest.get(1..1 + data_len).unwrap_or(&[]);
        rest = rest.get(1 + data_len..).unwrap_or(&[]);
        let _ = lu.execute(nexus, cdb, params);
        lu.check_invariants();
    }
});
