//! Every decoder of device answers and command bytes on arbitrary input: it may return an
//! error, never panic. The first byte picks the decoder.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_fence::pr::cdb::{InquiryCdb, PrInCdb, PrOutCdb};
use tandem_fence::pr::data::PrInData;
use tandem_fence::pr::inquiry::InquiryData;
use tandem_fence::pr::nvme::{NvmeCommandWords, NvmeReservation, ReservationStatus};
use tandem_fence::pr::param::{BasicParams, RegisterAndMoveParams};
use tandem_fence::pr::sense::Sense;
use tandem_fence::pr::transport_id::TransportId;
use tandem_fence::pr::{PrInAction, PrOutCommand};

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 12 {
        0 => {
            for action in PrInAction::ALL {
                if let Ok(d) = PrInData::decode(action, rest) {
                    // What decodes must encode again.
                    let _ = d.encode();
                }
            }
        }
        1 => {
            if let Ok(s) = Sense::decode(rest) {
                let _ = s.to_string();
                let _ = s.encode();
            }
        }
        2 => {
            let _ = TransportId::decode_list(rest);
        }
        3 => {
            let _ = TransportId::parse(&String::from_utf8_lossy(rest));
        }
        4 => {
            let _ = BasicParams::decode(rest);
        }
        5 => {
            let _ = RegisterAndMoveParams::decode(rest);
        }
        6 => {
            let _ = PrInCdb::decode(rest);
            let _ = InquiryCdb::decode(rest);
            if let Ok(cdb) = PrOutCdb::decode(rest) {
                let params = rest.get(10..).unwrap_or(&[]);
                let _ = PrOutCommand::from_scsi(&cdb, params);
            }
        }
        7 => {
            let _ = InquiryData::decode(rest);
        }
        8 => {
            let _ = ReservationStatus::decode(rest, false);
            let _ = ReservationStatus::decode(rest, true);
        }
        9 => {
            let word = |at: usize| {
                rest.get(at..at + 4)
                    .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            };
            let words = NvmeCommandWords {
                opcode: rest.first().copied().unwrap_or(0),
                cdw10: word(1),
                cdw11: word(5),
                data_out: rest.get(9..).unwrap_or(&[]).to_vec(),
                data_in_len: 0,
            };
            let _ = NvmeReservation::decode(&words);
        }
        10 => {
            let _ = tandem_fence::pr::nvme::controller_supports_reservations(rest);
        }
        _ => {
            let _ = String::from_utf8_lossy(rest).parse::<tandem_fence::PrKey>();
        }
    }
});
