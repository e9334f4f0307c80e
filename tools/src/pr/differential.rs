//! The differential test: the same random PR command sequences, byte for byte, against real
//! I_T nexuses (LIO) and against the emulator, compared after every step — status, sense,
//! keys, generation, reservation holder and type, full status.
//!
//! ```text
//!  discover   each nexus registers a key; READ FULL STATUS gives its TransportID and RTPI
//!  sequence   reset (REGISTER AND IGNORE + CLEAR, drain unit attentions), emulator at the
//!             real PRgeneration; then `steps` times:
//!               one command (PR OUT, READ/WRITE, odd-length PR IN) from a random nexus
//!               READ KEYS + READ RESERVATION + READ FULL STATUS from a random observer
//!             a mismatch ends the sequence and is reported with its history
//! ```
//!
//! The seed of sequence `i` is `seed + i`, so a mismatch is replayed with
//! `--seed <seed + i> --sequences 1`.

use super::Failure;
use super::cli::{Common, exit};
use serde::Serialize;
use serde_json::json;
use std::collections::BTreeMap;
use std::io::Write;
use std::time::Instant;
use tandem_fence::emulator::{Emulator, NexusId, NexusInfo};
use tandem_fence::pr::cdb::PrInCdb;
use tandem_fence::pr::data::{Initiator, PrInData};
use tandem_fence::pr::sense::Sense;
use tandem_fence::pr::{PrInAction, PrOutAction, PrOutCommand};
use tandem_fence::transport::{ScsiSubmit, SgIo};
use tandem_fence::{Operation, PrKey};

/// SplitMix64: small, seedable, good enough to pick commands.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        let n64 = u64::try_from(n.max(1)).unwrap_or(u64::MAX);
        usize::try_from(self.next() % n64).unwrap_or(0)
    }

    fn percent(&mut self, p: u64) -> bool {
        self.next() % 100 < p
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

/// What one side answered, reduced to what must agree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct Outcome {
    status: u8,
    /// Sense key, ASC, ASCQ.
    sense: Option<(u8, u8, u8)>,
    #[serde(skip)]
    data: Vec<u8>,
}

impl Outcome {
    fn category(&self) -> String {
        match (self.status, self.sense) {
            (0, _) => "good".into(),
            (0x18, _) => "conflict".into(),
            (0x02, Some((6, asc, ascq))) => format!("ua-{asc:02x}/{ascq:02x}"),
            (0x02, Some((key, asc, ascq))) => format!("check-{key:x}-{asc:02x}/{ascq:02x}"),
            (s, _) => format!("status-{s:02x}"),
        }
    }
}

fn sense_triple(bytes: &[u8]) -> Option<(u8, u8, u8)> {
    if bytes.is_empty() {
        return None;
    }
    Sense::decode(bytes)
        .ok()
        .map(|s| (s.key.code(), s.asc, s.ascq))
}

/// One command, as bytes.
#[derive(Debug, Clone)]
struct Command {
    label: String,
    cdb: Vec<u8>,
    data_out: Vec<u8>,
    data_in_len: usize,
    /// PR IN action whose data must agree, if any.
    pr_in: Option<PrInAction>,
    /// Compare data bytes exactly (odd allocation lengths).
    raw: bool,
}

struct Bench {
    real: Vec<SgIo>,
    infos: Vec<NexusInfo>,
    block_len: u32,
    emu: Emulator,
    compared: u64,
    coverage: BTreeMap<String, BTreeMap<String, u64>>,
    /// Commands after which the target had written past the data-in length: label →
    /// (count, largest overrun in bytes).
    overruns: std::cell::RefCell<BTreeMap<String, (u64, usize)>>,
}

#[derive(Debug, Serialize)]
struct Mismatch {
    sequence: u32,
    seed: u64,
    step: u32,
    nexus: usize,
    command: String,
    lio: Outcome,
    emulator: Outcome,
    detail: String,
    history: Vec<String>,
}

const RESET_KEY: u64 = 0x7e5e_7000;
const KEYS: [u64; 3] = [0x11, 0x22, 0x33];

impl Bench {
    fn submit_real(&self, n: usize, c: &Command) -> Result<Outcome, Failure> {
        let raw = self.real[n].submit(Operation::Verify, &c.cdb, &c.data_out, c.data_in_len)?;
        if raw.host_status != 0 {
            return Err(anyhow::anyhow!(
                "{}: {} failed in transport (host status 0x{:x})",
                self.real[n].name(),
                c.label,
                raw.host_status
            )
            .into());
        }
        if raw.overrun > 0 {
            let mut overruns = self.overruns.borrow_mut();
            let entry = overruns.entry(c.label.clone()).or_insert((0, 0));
            entry.0 += 1;
            entry.1 = entry.1.max(raw.overrun);
        }
        Ok(Outcome {
            status: raw.status & 0xfe,
            sense: sense_triple(&raw.sense),
            data: raw.data,
        })
    }

    fn submit_emu(&mut self, n: usize, c: &Command) -> Outcome {
        let nexus = NexusId(u16::try_from(n).unwrap_or(0));
        let resp = self.emu.execute(nexus, &c.cdb, &c.data_out);
        let mut data = resp.data;
        data.truncate(c.data_in_len);
        Outcome {
            status: resp.status.0,
            sense: resp.sense.map(|s| (s.key.code(), s.asc, s.ascq)),
            data,
        }
    }

    /// Sends `c` to both sides; `Err(detail)` when they disagree.
    fn both(
        &mut self,
        n: usize,
        c: &Command,
        record: bool,
    ) -> Result<Result<Outcome, (Outcome, Outcome, String)>, Failure> {
        let real = self.submit_real(n, c)?;
        let emu = self.submit_emu(n, c);
        self.compared += 1;
        self.emu.check_invariants();
        if record {
            let op = c.label.split_whitespace().next().unwrap_or("?").to_owned();
            *self
                .coverage
                .entry(op)
                .or_default()
                .entry(real.category())
                .or_default() += 1;
        }
        if real.status != emu.status || real.sense != emu.sense {
            return Ok(Err((real, emu, "status or sense differ".into())));
        }
        if real.status == 0
            && let Some(action) = c.pr_in
        {
            if c.raw {
                // Odd allocation lengths: the bytes themselves must agree.
                if real.data != emu.data {
                    let detail = format!(
                        "data differ: LIO {:02x?} emulator {:02x?}",
                        real.data, emu.data
                    );
                    return Ok(Err((real, emu, detail)));
                }
            } else {
                let a = PrInData::decode(action, &real.data);
                let b = PrInData::decode(action, &emu.data);
                if a != b {
                    let detail = format!("{} differs: LIO {a:?} emulator {b:?}", action.name());
                    return Ok(Err((real, emu, detail)));
                }
            }
        }
        Ok(Ok(real))
    }

    /// Sends `c` to the real side only, re-sending after unit attentions.
    fn real_until_good(&self, n: usize, c: &Command) -> Result<Outcome, Failure> {
        for _ in 0..8 {
            let o = self.submit_real(n, c)?;
            if o.sense.is_some_and(|s| s.0 == 6) {
                continue;
            }
            return Ok(o);
        }
        Err(anyhow::anyhow!("{}: unit attentions do not stop", c.label).into())
    }

    /// Clears the real LU (registrations, reservation, unit attentions); returns PRgeneration.
    fn reset_real(&self) -> Result<u32, Failure> {
        let mut register = PrOutCommand::register_and_ignore(PrKey::new(RESET_KEY));
        let mut o = self.real_until_good(0, &out_command("reset-register", &register))?;
        if o.sense == Some((5, 0x24, 0)) {
            // An ALL_TG_PT registration must be changed with ALL_TG_PT set.
            register.all_tg_pt = true;
            o = self.real_until_good(0, &out_command("reset-register", &register))?;
        }
        if o.status != 0 {
            return Err(anyhow::anyhow!("reset: REGISTER AND IGNORE failed: {o:?}").into());
        }
        let clear = out_command("reset-clear", &PrOutCommand::clear(PrKey::new(RESET_KEY)));
        let o = self.real_until_good(0, &clear)?;
        if o.status != 0 {
            return Err(anyhow::anyhow!("reset: CLEAR failed: {o:?}").into());
        }
        let mut generation = 0;
        for n in 0..self.real.len() {
            let o = self.real_until_good(n, &in_command(PrInAction::ReadKeys, 8192))?;
            let keys = tandem_fence::pr::data::KeyList::decode(&o.data)
                .map_err(|e| anyhow::anyhow!("reset: READ KEYS: {e}"))?;
            if !keys.keys.is_empty() {
                return Err(
                    anyhow::anyhow!("reset: keys left after CLEAR: {:?}", keys.keys).into(),
                );
            }
            generation = keys.generation;
        }
        Ok(generation)
    }

    fn fresh_emulator(&self, generation: u32) -> Emulator {
        let mut emu = Emulator::new().with_generation(generation);
        for info in &self.infos {
            emu.add_nexus(info.clone());
        }
        emu
    }

    /// A random command for nexus `n`, informed by the emulator's state so that many of
    /// them succeed.
    fn random_command(&self, rng: &mut Rng, n: usize, allow_pa: bool) -> Command {
        let me = NexusId(u16::try_from(n).unwrap_or(0));
        let current = self.emu.key_of(me);
        let own = |rng: &mut Rng, p: u64| match current {
            Some(k) if rng.percent(p) => k,
            _ => PrKey::new(rng.pick(&[0, KEYS[0], KEYS[1], KEYS[2]])),
        };
        let any_key =
            |rng: &mut Rng| PrKey::new(rng.pick(&[0, KEYS[0], KEYS[1], KEYS[2], KEYS[n % 3]]));
        let ty = |rng: &mut Rng| {
            if rng.percent(12) {
                rng.pick(&[0u8, 2, 4, 9])
            } else {
                rng.pick(&[1u8, 3, 5, 6, 7, 8])
            }
        };
        let others_key = |rng: &mut Rng| {
            let keys: Vec<PrKey> = self.emu.registrations().iter().map(|r| r.key).collect();
            if !keys.is_empty() && rng.percent(75) {
                keys[rng.below(keys.len())]
            } else {
                any_key(rng)
            }
        };
        let roll = rng.below(100);
        let mut cmd = match roll {
            0..=17 => {
                let rk = if rng.percent(70) {
                    current.unwrap_or(PrKey::ZERO)
                } else {
                    any_key(rng)
                };
                let sark = if rng.percent(20) {
                    PrKey::ZERO
                } else {
                    PrKey::new(rng.pick(&KEYS))
                };
                PrOutCommand::register(rk, sark)
            }
            18..=26 => {
                let sark = if rng.percent(15) {
                    PrKey::ZERO
                } else {
                    PrKey::new(rng.pick(&KEYS))
                };
                PrOutCommand::register_and_ignore(sark)
            }
            27..=40 => PrOutCommand {
                reservation_key: own(rng, 85),
                type_code: ty(rng),
                ..PrOutCommand::new(PrOutAction::Reserve)
            },
            41..=49 => {
                let current_type = self
                    .emu
                    .reservation()
                    .map(|r| r.reservation_type.scsi_code());
                PrOutCommand {
                    reservation_key: own(rng, 85),
                    type_code: match current_type {
                        Some(t) if rng.percent(65) => t,
                        _ => ty(rng),
                    },
                    ..PrOutCommand::new(PrOutAction::Release)
                }
            }
            50..=53 => PrOutCommand::clear(own(rng, 85)),
            54..=67 => {
                let action = if allow_pa && rng.percent(50) {
                    PrOutAction::PreemptAndAbort
                } else {
                    PrOutAction::Preempt
                };
                PrOutCommand {
                    reservation_key: own(rng, 85),
                    service_action_key: if rng.percent(12) {
                        PrKey::ZERO
                    } else {
                        others_key(rng)
                    },
                    type_code: ty(rng),
                    ..PrOutCommand::new(action)
                }
            }
            68..=72 => return self.move_command(rng, n),
            73..=76 => {
                // SPEC_I_PT: register other initiator ports too.
                let mut others: Vec<usize> = (0..self.infos.len()).filter(|&i| i != n).collect();
                let take = 1 + rng.below(others.len());
                let mut ids = Vec::new();
                for _ in 0..take {
                    let i = others.remove(rng.below(others.len()));
                    ids.push(self.infos[i].initiator.clone());
                }
                let mut c = PrOutCommand::register(
                    if rng.percent(80) {
                        PrKey::ZERO
                    } else {
                        any_key(rng)
                    },
                    PrKey::new(rng.pick(&KEYS)),
                );
                c.spec_i_pt = true;
                c.transport_ids = ids;
                c
            }
            77..=89 => return self.data_command(rng.percent(50)),
            _ => {
                let action = rng.pick(&PrInAction::ALL);
                let len = u16::try_from(rng.below(48)).unwrap_or(8);
                let mut c = in_command(action, len);
                c.raw = true;
                c.label = format!(
                    "pr-in-{} alloc={len}",
                    action.name().to_lowercase().replace(' ', "-")
                );
                return c;
            }
        };
        if matches!(
            cmd.action,
            PrOutAction::Register
                | PrOutAction::RegisterAndIgnoreExistingKey
                | PrOutAction::RegisterAndMove
        ) {
            cmd.aptpl = rng.percent(12);
        }
        if matches!(
            cmd.action,
            PrOutAction::Register | PrOutAction::RegisterAndIgnoreExistingKey
        ) && !cmd.spec_i_pt
        {
            cmd.all_tg_pt = rng.percent(8);
        }
        if rng.percent(3) {
            // A stray SPEC_I_PT bit on another service action, or an odd scope.
            if rng.percent(50) {
                cmd.spec_i_pt = cmd.action != PrOutAction::RegisterAndMove;
            } else {
                cmd.scope = 1;
            }
        }
        out_command(&describe(&cmd), &cmd)
    }

    /// REGISTER AND MOVE from nexus `n` to a random nexus.
    fn move_command(&self, rng: &mut Rng, n: usize) -> Command {
        let me = NexusId(u16::try_from(n).unwrap_or(0));
        let dest = rng.below(self.infos.len());
        let info = &self.infos[dest];
        let rtpi = if rng.percent(80) {
            info.relative_target_port
        } else {
            u16::try_from(rng.below(4)).unwrap_or(0)
        };
        let own = match self.emu.key_of(me) {
            Some(k) if rng.percent(85) => k,
            _ => PrKey::new(rng.pick(&[0, KEYS[0], KEYS[1], KEYS[2]])),
        };
        let sark = if rng.percent(10) {
            PrKey::ZERO
        } else {
            PrKey::new(rng.pick(&KEYS))
        };
        let mut c = PrOutCommand::register_and_move(
            own,
            sark,
            info.initiator.clone(),
            rtpi,
            rng.percent(30),
        );
        c.type_code = if rng.percent(12) {
            rng.pick(&[0u8, 2, 4, 9])
        } else {
            rng.pick(&[1u8, 3, 5, 6, 7, 8])
        };
        c.aptpl = rng.percent(12);
        out_command(&describe(&c), &c)
    }

    fn data_command(&self, write: bool) -> Command {
        let len = usize::try_from(self.block_len).unwrap_or(512);
        let mut cdb = vec![if write { 0x2a } else { 0x28 }, 0, 0, 0, 0, 8, 0, 0, 1, 0];
        cdb[5] = 8;
        Command {
            label: if write {
                "write-10".into()
            } else {
                "read-10".into()
            },
            cdb,
            data_out: if write { vec![0x5a; len] } else { Vec::new() },
            data_in_len: if write { 0 } else { len },
            pr_in: None,
            raw: false,
        }
    }
}

fn describe(c: &PrOutCommand) -> String {
    let mut s = format!(
        "{} rk={} sark={} type={}",
        c.action.name().to_lowercase().replace(' ', "-"),
        c.reservation_key,
        c.service_action_key,
        c.type_code
    );
    if c.aptpl {
        s.push_str(" aptpl");
    }
    if c.all_tg_pt {
        s.push_str(" all_tg_pt");
    }
    if c.spec_i_pt {
        s.push_str(&format!(" spec_i_pt({})", c.transport_ids.len()));
    }
    if c.scope != 0 {
        s.push_str(&format!(" scope={}", c.scope));
    }
    if c.action == PrOutAction::RegisterAndMove {
        s.push_str(&format!(
            " rtpi={} unreg={}",
            c.relative_target_port, c.unreg
        ));
    }
    s
}

fn out_command(label: &str, c: &PrOutCommand) -> Command {
    let (cdb, params) = c.to_scsi();
    Command {
        label: label.to_owned(),
        cdb: cdb.to_vec(),
        data_out: params,
        data_in_len: 0,
        pr_in: None,
        raw: false,
    }
}

fn in_command(action: PrInAction, allocation_length: u16) -> Command {
    let cdb = PrInCdb {
        service_action: action.code(),
        allocation_length,
        control: 0,
    };
    Command {
        label: format!("observe-{}", action.name().to_lowercase().replace(' ', "-")),
        cdb: cdb.encode().to_vec(),
        data_out: Vec::new(),
        data_in_len: usize::from(allocation_length),
        pr_in: Some(action),
        raw: false,
    }
}

/// Learns each nexus's TransportID and relative target port from the real LU.
fn discover(real: &[SgIo]) -> Result<Vec<NexusInfo>, Failure> {
    let probe = Bench {
        real: real.to_vec(),
        infos: Vec::new(),
        block_len: 512,
        emu: Emulator::new(),
        compared: 0,
        coverage: BTreeMap::new(),
        overruns: Default::default(),
    };
    probe.reset_real()?;
    for (n, dev) in real.iter().enumerate() {
        let key = 0x1000 + u64::try_from(n).unwrap_or(0);
        let o = probe.real_until_good(
            n,
            &out_command(
                "discover",
                &PrOutCommand::register_and_ignore(PrKey::new(key)),
            ),
        )?;
        if o.status != 0 {
            return Err(anyhow::anyhow!("{}: cannot register: {o:?}", dev.name()).into());
        }
    }
    let o = probe.real_until_good(0, &in_command(PrInAction::ReadFullStatus, 8192))?;
    let status = tandem_fence::pr::data::FullStatus::decode(&o.data)
        .map_err(|e| anyhow::anyhow!("discover: READ FULL STATUS: {e}"))?;
    let mut infos = Vec::new();
    for (n, dev) in real.iter().enumerate() {
        let key = PrKey::new(0x1000 + u64::try_from(n).unwrap_or(0));
        let entry = status
            .entries
            .iter()
            .find(|e| e.key == key)
            .ok_or_else(|| anyhow::anyhow!("discover: {} not in READ FULL STATUS", dev.name()))?;
        let Initiator::Scsi { transport_id } = &entry.initiator else {
            return Err(anyhow::anyhow!("discover: not a SCSI initiator").into());
        };
        // A relative target port identifier names one target port, except 0 (reserved by
        // SPC-4), which LIO's tcm_loop reports for every port: then each nexus has its own.
        let rtpi = entry.relative_target_port;
        let port = if rtpi != 0 {
            rtpi
        } else {
            0x8000 | u16::try_from(n + 1).unwrap_or(0)
        };
        infos.push(NexusInfo::scsi(transport_id.clone(), rtpi).on_target_port(port));
    }
    probe.reset_real()?;
    Ok(infos)
}

/// READ CAPACITY(10): the logical block length.
fn block_length(real: &SgIo) -> Result<u32, Failure> {
    let cdb = [0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let raw = real.submit(Operation::Verify, &cdb, &[], 8)?;
    if raw.status != 0 || raw.data.len() < 8 {
        return Err(anyhow::anyhow!(
            "{}: READ CAPACITY failed (status 0x{:x})",
            real.name(),
            raw.status
        )
        .into());
    }
    Ok(u32::from_be_bytes([
        raw.data[4],
        raw.data[5],
        raw.data[6],
        raw.data[7],
    ]))
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn run(
    common: &Common,
    devices: &[String],
    sequences: u32,
    steps: u32,
    seed: u64,
    allow_pa: bool,
    summary: Option<&str>,
    out: &mut dyn Write,
) -> Result<i32, Failure> {
    if !(2..=4).contains(&devices.len()) {
        return Err(
            super::cli::UsageError("--devices takes 2 to 4 nexuses of one LU".into()).into(),
        );
    }
    let started = Instant::now();
    let real: Vec<SgIo> = devices
        .iter()
        .map(|d| SgIo::open(d, false, common.timeout_ms))
        .collect::<Result<_, _>>()?;
    let infos = discover(&real)?;
    let block_len = block_length(&real[0])?;
    let mut bench = Bench {
        real,
        infos,
        block_len,
        emu: Emulator::new(),
        compared: 0,
        coverage: BTreeMap::new(),
        overruns: Default::default(),
    };
    let mut mismatches = Vec::new();
    let mut steps_run = 0u64;
    let mut sequences_run = 0u32;
    for s in 0..sequences {
        let seq_seed = seed.wrapping_add(u64::from(s));
        let mut rng = Rng(seq_seed);
        let generation = bench.reset_real()?;
        bench.emu = bench.fresh_emulator(generation);
        sequences_run += 1;
        let mut history: Vec<String> = Vec::new();
        'steps: for step in 0..steps {
            // A quarter of the commands come from the reservation holder, so that RELEASE,
            // REGISTER AND MOVE and self-preemption succeed often enough to be compared.
            let mut n = rng.below(bench.real.len());
            if let Some(res) = bench.emu.reservation()
                && rng.percent(25)
            {
                n = usize::from(res.holder.0);
            }
            // And some REGISTER AND MOVEs from the holder, the only nexus it can succeed from.
            let holder = bench.emu.reservation().map(|r| usize::from(r.holder.0));
            let cmd = if let Some(h) = holder.filter(|_| rng.percent(6)) {
                n = h;
                bench.move_command(&mut rng, n)
            } else {
                bench.random_command(&mut rng, n, allow_pa)
            };
            history.push(format!("nexus {n}: {}", cmd.label));
            steps_run += 1;
            let mut checks = vec![(n, cmd, true)];
            let observer = rng.below(bench.real.len());
            for action in [
                PrInAction::ReadKeys,
                PrInAction::ReadReservation,
                PrInAction::ReadFullStatus,
            ] {
                checks.push((observer, in_command(action, 8192), false));
            }
            if step % 4 == 3 {
                checks.push((
                    observer,
                    in_command(PrInAction::ReportCapabilities, 8192),
                    false,
                ));
            }
            for (who, c, record) in checks {
                match bench.both(who, &c, record)? {
                    Ok(o) => {
                        if !record && o.status != 0 {
                            history.push(format!("nexus {who}: {} -> {}", c.label, o.category()));
                        }
                    }
                    Err((lio, emulator, detail)) => {
                        mismatches.push(Mismatch {
                            sequence: s,
                            seed: seq_seed,
                            step,
                            nexus: who,
                            command: c.label.clone(),
                            lio,
                            emulator,
                            detail,
                            history: history.clone(),
                        });
                        break 'steps;
                    }
                }
            }
        }
        if mismatches.len() >= 5 {
            break;
        }
    }
    bench.reset_real()?;
    let report = json!({
        "devices": devices,
        "nexuses": bench.infos,
        "seed": seed,
        "sequences": sequences_run,
        "steps": steps_run,
        "commands_compared": bench.compared,
        "preempt_and_abort": allow_pa,
        "mismatches": mismatches,
        "coverage": bench.coverage,
        "target_overruns": *bench.overruns.borrow(),
        "elapsed_ms": u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    });
    let text = serde_json::to_string_pretty(&report).map_err(anyhow::Error::from)?;
    if let Some(path) = summary {
        std::fs::write(path, &text).map_err(|e| anyhow::anyhow!("writing {path}: {e}"))?;
    }
    writeln!(out, "{text}")?;
    Ok(if mismatches.is_empty() {
        exit::OK
    } else {
        exit::VERIFY_FAILED
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generator_is_deterministic_and_covers_every_kind_of_command() {
        let mut emu = Emulator::new();
        let infos: Vec<NexusInfo> = (0..3u16)
            .map(|i| NexusInfo::sas(0x5001_4050_0000_0000 + u64::from(i), 0).on_target_port(i + 1))
            .collect();
        for i in &infos {
            emu.add_nexus(i.clone());
        }
        let bench = Bench {
            real: Vec::new(),
            infos,
            block_len: 512,
            emu,
            compared: 0,
            coverage: BTreeMap::new(),
            overruns: Default::default(),
        };
        let labels = |seed| {
            let mut rng = Rng(seed);
            (0..400)
                .map(|i| bench.random_command(&mut rng, i % 3, true).label)
                .collect::<Vec<_>>()
        };
        assert_eq!(labels(7), labels(7));
        assert_ne!(labels(7), labels(8));
        let all = labels(7).join("\n");
        for kind in [
            "register ",
            "register-and-ignore",
            "reserve",
            "release",
            "clear",
            "preempt ",
            "preempt-and-abort",
            "register-and-move",
            "spec_i_pt",
            "write-10",
            "read-10",
            "pr-in-",
        ] {
            assert!(all.contains(kind), "no {kind} in 400 commands");
        }
    }

    #[test]
    fn commands_run_on_the_emulator_never_panic() {
        let mut emu = Emulator::new();
        let infos: Vec<NexusInfo> = (0..3u16)
            .map(|i| NexusInfo::sas(0x5001_4050_0000_0000 + u64::from(i), 0).on_target_port(i + 1))
            .collect();
        for i in &infos {
            emu.add_nexus(i.clone());
        }
        let mut bench = Bench {
            real: Vec::new(),
            infos,
            block_len: 512,
            emu,
            compared: 0,
            coverage: BTreeMap::new(),
            overruns: Default::default(),
        };
        let mut rng = Rng(42);
        let mut goods = 0;
        for i in 0..2000 {
            let c = bench.random_command(&mut rng, i % 3, true);
            if bench.submit_emu(i % 3, &c).status == 0 {
                goods += 1;
            }
            bench.emu.check_invariants();
        }
        assert!(
            goods > 400,
            "only {goods} of 2000 commands succeeded: the generator is off"
        );
    }
}
