//! Rendering PR data the way sg_persist prints it, and as JSON.

use serde_json::{Value, json};
use std::fmt::Write;
use tandem_fence::PrKey;
use tandem_fence::pr::data::{
    Capabilities, FullStatus, Initiator, KeyList, PrInData, ReservationInfo,
};
use tandem_fence::pr::inquiry::InquiryData;
use tandem_fence::pr::nvme::host_id_hex;
use tandem_fence::pr::type_code_description;

/// `  VENDOR    PRODUCT           REV ` and the device type line.
pub fn inquiry(inq: &InquiryData) -> String {
    format!(
        "  {:<8}  {:<16}  {:<4}\n  Peripheral device type: {}\n",
        inq.vendor,
        inq.product,
        inq.revision,
        inq.device_type_name()
    )
}

/// A key, with its node and incarnation when it carries `cluster`'s tag.
pub fn key_text(key: PrKey, cluster: Option<&str>) -> String {
    match cluster {
        Some(c) if key.is_of_cluster(c) => {
            let p = key.parts();
            format!(
                "{key}  (tandem node {}, incarnation {})",
                p.node_id, p.incarnation
            )
        }
        _ => key.to_string(),
    }
}

pub fn keys(list: &KeyList, cluster: Option<&str>) -> String {
    let mut s = String::new();
    let n = list.keys.len();
    if n == 0 {
        let _ = writeln!(
            s,
            "  PR generation=0x{:x}, there are NO registered reservation keys",
            list.generation
        );
    } else {
        let _ = writeln!(
            s,
            "  PR generation=0x{:x}, {n} registered reservation key{} follow{}:",
            list.generation,
            if n == 1 { "" } else { "s" },
            if n == 1 { "s" } else { "" }
        );
        for k in &list.keys {
            let _ = writeln!(s, "    {}", key_text(*k, cluster));
        }
    }
    if list.truncated {
        let _ = writeln!(s, "  (more keys than the allocation length allowed)");
    }
    s
}

pub fn reservation(info: &ReservationInfo, cluster: Option<&str>) -> String {
    match &info.reservation {
        None => format!(
            "  PR generation=0x{:x}, there is NO reservation held\n",
            info.generation
        ),
        Some(r) => format!(
            "  PR generation=0x{:x}, Reservation follows:\n    Key={}\n    scope: {},  type: {}\n",
            info.generation,
            key_text(r.key, cluster),
            scope_name(r.scope),
            r.type_description()
        ),
    }
}

fn scope_name(scope: u8) -> String {
    if scope == 0 {
        "LU_SCOPE".to_owned()
    } else {
        format!("obsolete or reserved scope [0x{scope:x}]")
    }
}

pub fn full_status(status: &FullStatus, cluster: Option<&str>) -> String {
    let mut s = format!("  PR generation=0x{:x}\n", status.generation);
    if status.entries.is_empty() {
        s.push_str("  No full status descriptors\n");
    }
    for e in &status.entries {
        let _ = writeln!(s, "    Key={}", key_text(e.key, cluster));
        let _ = writeln!(
            s,
            "      All target ports bit {}",
            if e.all_tg_pt { "set" } else { "clear" }
        );
        if !e.all_tg_pt {
            let _ = writeln!(
                s,
                "      Relative port address: 0x{:x}",
                e.relative_target_port
            );
        }
        if e.reservation_holder {
            let _ = writeln!(s, "      << Reservation holder >>");
            let _ = writeln!(
                s,
                "      scope: {},  type: {}",
                scope_name(e.scope),
                type_code_description(e.type_code)
            );
        } else {
            let _ = writeln!(s, "      not reservation holder");
        }
        match &e.initiator {
            Initiator::Scsi { transport_id } => {
                let _ = writeln!(
                    s,
                    "      Transport Id of initiator:\n        {transport_id}"
                );
            }
            Initiator::Nvme {
                controller_id,
                host_id,
            } => {
                let _ = writeln!(
                    s,
                    "      NVMe controller id: 0x{controller_id:x}\n      Host identifier: {}",
                    host_id_hex(host_id)
                );
            }
        }
    }
    if status.truncated {
        s.push_str("  (more descriptors than the allocation length allowed)\n");
    }
    s
}

pub fn capabilities(c: &Capabilities) -> String {
    let b = |v: bool| u8::from(v);
    let mut s = String::from("Report capabilities response:\n");
    let _ = writeln!(
        s,
        "  Replace Lost Reservation Capable(RLR_C): {}",
        b(c.replace_lost_reservation)
    );
    let _ = writeln!(
        s,
        "  Compatible Reservation Handling(CRH): {}",
        b(c.compatible_reservation_handling)
    );
    let _ = writeln!(
        s,
        "  Specify Initiator Ports Capable(SIP_C): {}",
        b(c.specify_initiator_ports)
    );
    let _ = writeln!(
        s,
        "  All Target Ports Capable(ATP_C): {}",
        b(c.all_target_ports)
    );
    let _ = writeln!(
        s,
        "  Persist Through Power Loss Capable(PTPL_C): {}",
        b(c.persist_through_power_loss)
    );
    let _ = writeln!(s, "  Type Mask Valid(TMV): {}", b(c.type_mask_valid));
    let _ = writeln!(s, "  Allow Commands: {}", c.allow_commands);
    let _ = writeln!(
        s,
        "  Persist Through Power Loss Active(PTPL_A): {}",
        b(c.persist_through_power_loss_active)
    );
    if c.type_mask_valid {
        s.push_str("    Support indicated in Type mask:\n");
        use tandem_fence::pr::ReservationType as T;
        for ty in [
            T::WriteExclusiveAllRegistrants,
            T::ExclusiveAccessRegistrantsOnly,
            T::WriteExclusiveRegistrantsOnly,
            T::ExclusiveAccess,
            T::WriteExclusive,
            T::ExclusiveAccessAllRegistrants,
        ] {
            let _ = writeln!(
                s,
                "      {}: {}",
                ty.description(),
                u8::from(c.type_mask & Capabilities::type_mask_bit(ty) != 0)
            );
        }
    }
    s
}

/// Any PR IN answer in sg_persist's words.
pub fn pr_in(data: &PrInData, cluster: Option<&str>) -> String {
    match data {
        PrInData::Keys(k) => keys(k, cluster),
        PrInData::Reservation(r) => reservation(r, cluster),
        PrInData::Capabilities(c) => capabilities(c),
        PrInData::FullStatus(f) => full_status(f, cluster),
    }
}

/// sg3_utils' hex dump: offset, then 16 bytes in two groups of 8.
pub fn hex_dump(bytes: &[u8]) -> String {
    let mut s = String::new();
    for (i, chunk) in bytes.chunks(16).enumerate() {
        let _ = write!(s, " {:02x}     ", i * 16);
        for (j, b) in chunk.iter().enumerate() {
            if j == 8 {
                s.push(' ');
            }
            let _ = write!(s, "{b:02x} ");
        }
        s.truncate(s.trim_end().len());
        s.push('\n');
    }
    s
}

/// sg_persist's `-H` output of a PR IN answer.
pub fn pr_in_hex(data: &PrInData, raw: &[u8]) -> String {
    match data {
        PrInData::Capabilities(_) => hex_dump(raw),
        _ => {
            let generation = raw
                .get(..4)
                .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
            let add_len = raw
                .get(4..8)
                .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
            let mut s = format!("  PR generation=0x{generation:x}, Additional length={add_len}\n");
            let body = raw.get(8..).unwrap_or(&[]);
            if body.is_empty() {
                // sg_persist says it once more when there is nothing to dump.
                s.push_str(&format!("Additional length={add_len}\n"));
            }
            s.push_str(&hex_dump(body));
            s
        }
    }
}

fn key_json(key: PrKey, cluster: Option<&str>) -> Value {
    match cluster {
        Some(c) if key.is_of_cluster(c) => {
            let p = key.parts();
            json!({ "key": key, "node_id": p.node_id, "incarnation": p.incarnation })
        }
        _ => json!({ "key": key }),
    }
}

/// JSON for a PR IN answer.
pub fn pr_in_json(device: &str, data: &PrInData, cluster: Option<&str>) -> Value {
    match data {
        PrInData::Keys(k) => json!({
            "device": device,
            "action": "read-keys",
            "generation": k.generation,
            "keys": k.keys,
            "decoded": k.keys.iter().map(|&key| key_json(key, cluster)).collect::<Vec<_>>(),
            "truncated": k.truncated,
        }),
        PrInData::Reservation(r) => json!({
            "device": device,
            "action": "read-reservation",
            "generation": r.generation,
            "reservation": r.reservation.map(|res| json!({
                "key": res.key,
                "scope": res.scope,
                "type": res.type_code,
                "type_name": res.type_description(),
            })),
        }),
        PrInData::Capabilities(c) => json!({
            "device": device,
            "action": "report-capabilities",
            "capabilities": c,
        }),
        PrInData::FullStatus(f) => json!({
            "device": device,
            "action": "read-full-status",
            "generation": f.generation,
            "registrations": f.entries.iter().map(|e| json!({
                "key": e.key,
                "all_tg_pt": e.all_tg_pt,
                "reservation_holder": e.reservation_holder,
                "scope": e.scope,
                "type": e.type_code,
                "relative_target_port": e.relative_target_port,
                "initiator": e.initiator,
            })).collect::<Vec<_>>(),
            "truncated": f.truncated,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_fence::pr::data::{FullStatusEntry, Reservation};
    use tandem_fence::pr::transport_id::TransportId;

    #[test]
    fn looks_like_sg_persist() {
        let inq = InquiryData {
            peripheral_qualifier: 0,
            device_type: 0,
            vendor: "LIO-ORG".into(),
            product: "FILEIO".into(),
            revision: "4.0".into(),
        };
        assert_eq!(
            inquiry(&inq),
            "  LIO-ORG   FILEIO            4.0 \n  Peripheral device type: disk\n"
        );
        let two = KeyList {
            generation: 2,
            keys: vec![PrKey::new(0xa1), PrKey::new(0xb2)],
            truncated: false,
        };
        assert_eq!(
            keys(&two, None),
            "  PR generation=0x2, 2 registered reservation keys follow:\n    0xa1\n    0xb2\n"
        );
        let one = KeyList {
            generation: 4,
            keys: vec![PrKey::new(0xb3)],
            truncated: false,
        };
        assert!(keys(&one, None).contains("1 registered reservation key follows:"));
        assert_eq!(
            keys(&KeyList::default(), None),
            "  PR generation=0x0, there are NO registered reservation keys\n"
        );
        let res = ReservationInfo {
            generation: 2,
            reservation: Some(Reservation {
                key: PrKey::new(0xa1),
                scope: 0,
                type_code: 5,
            }),
        };
        assert_eq!(
            reservation(&res, None),
            "  PR generation=0x2, Reservation follows:\n    Key=0xa1\n    scope: LU_SCOPE,  type: Write Exclusive, registrants only\n"
        );
        let status = FullStatus {
            generation: 2,
            entries: vec![FullStatusEntry {
                key: PrKey::new(0xa1),
                all_tg_pt: false,
                reservation_holder: true,
                scope: 0,
                type_code: 5,
                relative_target_port: 0,
                initiator: Initiator::Scsi {
                    transport_id: TransportId::Sas {
                        address: [0x50, 0x01, 0x40, 0x52, 0xe6, 0xf4, 0x52, 0x00],
                    },
                },
            }],
            truncated: false,
        };
        assert_eq!(
            full_status(&status, None),
            "  PR generation=0x2\n    Key=0xa1\n      All target ports bit clear\n      Relative port address: 0x0\n      << Reservation holder >>\n      scope: LU_SCOPE,  type: Write Exclusive, registrants only\n      Transport Id of initiator:\n        SAS address: 0x50014052e6f45200\n"
        );
        assert_eq!(
            hex_dump(&[0, 0, 0, 0, 0, 0, 0, 0xa1, 0, 0, 0, 0, 1, 5, 0, 0, 0x10]),
            " 00     00 00 00 00 00 00 00 a1  00 00 00 00 01 05 00 00\n 10     10\n"
        );
    }

    #[test]
    fn tandem_keys_are_decoded() {
        let key = PrKey::derive("prod", 3, 9);
        assert!(key_text(key, Some("prod")).contains("tandem node 3, incarnation 9"));
        assert_eq!(key_text(key, Some("other")), key.to_string());
    }
}
