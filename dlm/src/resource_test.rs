//! Table tests of the queue and flag rules: `testdata/queues.txt`.
//!
//! Each case is a list of commands, each followed by the exact outcomes it must produce
//! (indented). Lock `a` belongs to node 1 with id 1, `b` to node 2 with id 2, and so on.

use super::*;
use crate::types::{LVB_LEN, Lvb};

fn who(name: &str) -> (NodeId, LockId) {
    let c = name.as_bytes()[0];
    assert!(
        c.is_ascii_lowercase(),
        "lock names are single letters: {name}"
    );
    let n = u32::from(c - b'a' + 1);
    (NodeId(n), LockId(u64::from(n)))
}

fn name_of(owner: NodeId) -> char {
    char::from(b'a' + u8::try_from(owner.0 - 1).unwrap())
}

fn parse_flags(words: &[&str]) -> (Flags, Option<Lvb>) {
    let mut flags = Flags::NONE;
    let mut lvb = None;
    for w in words {
        if let Some(hex) = w.strip_prefix("lvb=") {
            lvb = Some(Lvb::from_hex(hex).unwrap());
        } else {
            flags = flags.with(Flags::from_name(w).unwrap_or_else(|| panic!("flag {w}")));
        }
    }
    (flags, lvb)
}

fn render(o: &Outcome) -> String {
    match o {
        Outcome::Granted {
            owner,
            mode,
            lvb,
            demoted,
            ..
        } => {
            let mut s = format!("granted {} {mode}", name_of(*owner));
            if *demoted {
                s.push_str(" demoted");
            }
            if let Some(l) = lvb {
                s.push_str(&format!(
                    " lvb={} seq={} {}",
                    short(&l.value),
                    l.seq,
                    if l.valid { "valid" } else { "invalid" }
                ));
            }
            s
        }
        Outcome::Failed {
            owner,
            status,
            mode,
            ..
        } => match mode {
            Some(m) => format!("failed {} {status} {m}", name_of(*owner)),
            None => format!("failed {} {status}", name_of(*owner)),
        },
        Outcome::Unlocked { owner, .. } => format!("unlocked {}", name_of(*owner)),
        Outcome::CancelMissed { owner, .. } => format!("missed {}", name_of(*owner)),
        Outcome::Blocking { owner, mode, .. } => format!("blocking {} {mode}", name_of(*owner)),
    }
}

/// The value block as hex without trailing zero bytes ("0" if all zero).
fn short(v: &Lvb) -> String {
    let end = v.0.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
    if end == 0 {
        "0".into()
    } else {
        v.0[..end].iter().map(|b| format!("{b:02x}")).collect()
    }
}

fn queues(res: &Resource) -> String {
    let mut parts = Vec::new();
    for q in [Queue::Granted, Queue::Converting, Queue::Waiting] {
        let items: Vec<String> = res
            .locks()
            .filter(|(qq, _)| *qq == q)
            .map(|(_, l)| match (q, l.grmode) {
                (Queue::Converting, Some(g)) => format!("{}:{g}>{}", name_of(l.owner), l.rqmode),
                (_, Some(g)) => format!("{}:{g}", name_of(l.owner)),
                (_, None) => format!("{}:{}", name_of(l.owner), l.rqmode),
            })
            .collect();
        parts.push(format!("{}=[{}]", q.name(), items.join(",")));
    }
    parts.join(" ")
}

#[test]
fn queue_rules_table() {
    let text = include_str!("../testdata/queues.txt");
    let mut cases = 0;
    let mut res = Resource::new();
    let mut case = String::new();
    let mut pending: Vec<String> = Vec::new();
    let mut last_cmd = String::new();
    let flush = |pending: &mut Vec<String>, case: &str, cmd: &str| {
        assert!(
            pending.is_empty(),
            "case {case:?}, after {cmd:?}: outcomes not produced: {pending:?}"
        );
    };
    for raw in text.lines() {
        let line = raw.trim_end();
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        if let Some(expect) = line.strip_prefix("  ") {
            let expect = expect.trim();
            if let Some(q) = expect.strip_prefix("queues ") {
                assert_eq!(queues(&res), q, "case {case:?} after {last_cmd:?}");
                continue;
            }
            if let Some(l) = expect.strip_prefix("lvb ") {
                let v = res.lvb();
                let got = format!(
                    "{} seq={} {}",
                    short(&v.value),
                    v.seq,
                    if v.valid { "valid" } else { "invalid" }
                );
                assert_eq!(got, l, "case {case:?} after {last_cmd:?}");
                continue;
            }
            assert!(
                !pending.is_empty(),
                "case {case:?}, after {last_cmd:?}: expected {expect:?}, got nothing more"
            );
            let got = pending.remove(0);
            assert_eq!(got, expect, "case {case:?}, after {last_cmd:?}");
            continue;
        }
        flush(&mut pending, &case, &last_cmd);
        let words: Vec<&str> = line.split_whitespace().collect();
        if words[0] == "case" {
            case = words[1..].join(" ");
            res = Resource::new();
            cases += 1;
            continue;
        }
        last_cmd = line.to_owned();
        let mut out = Vec::new();
        match words[0] {
            "lock" => {
                let (owner, id) = who(words[1]);
                let (flags, _) = parse_flags(&words[3..]);
                res.request(owner, id, words[2].parse().unwrap(), flags, &mut out);
            }
            "convert" => {
                let (owner, id) = who(words[1]);
                let (flags, lvb) = parse_flags(&words[3..]);
                res.convert(owner, id, words[2].parse().unwrap(), flags, lvb, &mut out);
            }
            "unlock" => {
                let (owner, id) = who(words[1]);
                let (_, lvb) = parse_flags(&words[2..]);
                res.unlock(owner, id, lvb, &mut out);
            }
            "cancel" => {
                let (owner, id) = who(words[1]);
                res.cancel(owner, id, &mut out);
            }
            "purge" => {
                let lost: Vec<NodeId> = words[1..].iter().map(|w| who(w).0).collect();
                res.purge(|n| lost.contains(&n));
            }
            "grant" => {
                res.grant_pending(&mut out);
                res.send_basts(&mut out);
            }
            other => panic!("unknown command {other}"),
        }
        res.check().unwrap();
        pending = out.iter().map(render).collect();
    }
    flush(&mut pending, &case, &last_cmd);
    assert!(cases >= 20, "only {cases} cases");
}

#[test]
fn recovered_value_block_rules() {
    let copy = |b: u8, seq: u64, valid: bool| {
        let mut v = [0u8; LVB_LEN];
        v[0] = b;
        Some(LvbCopy {
            value: Lvb(v),
            seq,
            valid,
        })
    };
    let lock = |n: u32, mode: Mode, lvb: Option<LvbCopy>| RecoveredLock {
        owner: NodeId(n),
        id: LockId(u64::from(n)),
        mode,
        flags: Flags::VALBLK,
        lvb,
    };
    // A PR holder pins the value: taken as valid even if an NL copy has a higher version.
    let r = Resource::recovered(vec![
        lock(1, Mode::NL, copy(9, 9, true)),
        lock(2, Mode::PR, copy(5, 5, true)),
    ]);
    assert_eq!(r.lvb(), copy(5, 5, true).unwrap());
    // Only NL/CR holders: the newest copy, marked invalid.
    let r = Resource::recovered(vec![
        lock(1, Mode::NL, copy(3, 3, true)),
        lock(2, Mode::CR, copy(7, 7, true)),
    ]);
    assert_eq!(r.lvb(), copy(7, 7, false).unwrap());
    // No holder with VALBLK: zero and invalid.
    let mut l = lock(1, Mode::EX, None);
    l.flags = Flags::NONE;
    let r = Resource::recovered(vec![l]);
    assert!(!r.lvb().valid);
    // An EX holder whose copy was already invalid keeps it invalid.
    let r = Resource::recovered(vec![lock(1, Mode::EX, copy(1, 1, false))]);
    assert!(!r.lvb().valid);
    // A valid PR copy wins over an invalid PR copy with a higher version.
    let r = Resource::recovered(vec![
        lock(1, Mode::PR, copy(8, 8, false)),
        lock(2, Mode::PR, copy(4, 4, true)),
    ]);
    assert_eq!(r.lvb(), copy(4, 4, true).unwrap());
    r.check().unwrap();
}
