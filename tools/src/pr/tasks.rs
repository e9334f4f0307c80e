//! The task subcommands: status, unfence, fence, verify, leave, watch, derive-key.

use super::cli::{Common, KeyArgs, PolicyArgs, Task, exit};
use super::{Failure, Opened, open_options, output};
use serde_json::json;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tandem_fence::pr::data::Reservation;
use tandem_fence::transport::PrTransport;
use tandem_fence::{
    FenceMethod, FencePolicy, FenceSettings, PrKey, PreemptFlavour, SelfCheckEvent, SelfCheckTask,
};

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn settings(policy: &PolicyArgs, preempt: PreemptFlavour) -> FenceSettings {
    FenceSettings {
        reservation_type: policy.reservation_type,
        preempt,
        aptpl: policy.aptpl,
        retries: policy.retries,
    }
}

/// Opens every path of every device and builds the policy for `key`.
fn policy(
    opened: &mut Opened,
    common: &Common,
    devices: &[String],
    key: &KeyArgs,
    settings: FenceSettings,
) -> Result<FencePolicy, Failure> {
    let key = key.key()?;
    let options = open_options(common, false);
    let mut paths: Vec<Arc<dyn PrTransport>> = Vec::new();
    for device in devices {
        for p in opened.open_paths(device, &options)? {
            paths.push(Arc::from(p));
        }
    }
    Ok(FencePolicy::new(key, paths, settings)?)
}

fn reservation_text(r: Option<&Reservation>) -> String {
    match r {
        None => "none".to_owned(),
        Some(r) if r.key.is_zero() => {
            format!("{} (every registrant holds it)", r.type_description())
        }
        Some(r) => format!("{}, held by key {}", r.type_description(), r.key),
    }
}

fn method_text(m: &FenceMethod) -> String {
    match m {
        FenceMethod::PreemptAndAbort => "PREEMPT AND ABORT".to_owned(),
        FenceMethod::Preempt => "PREEMPT".to_owned(),
        FenceMethod::PreemptAfterAbortRefused { refusal } => {
            format!("PREEMPT (PREEMPT AND ABORT was refused: {refusal})")
        }
        FenceMethod::AlreadyGone => "nothing: the key was not registered".to_owned(),
    }
}

pub(crate) fn run(
    task: &Task,
    common: &Common,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<i32, Failure> {
    let mut opened = Opened;
    let json = common.json;
    match task {
        Task::Status {
            devices,
            cluster_id,
        } => {
            let cluster = cluster_id.as_deref();
            let mut all = Vec::new();
            for device in devices {
                let paths = opened.open_paths(device, &open_options(common, true))?;
                let Some(first) = paths.first() else {
                    continue;
                };
                let keys = first.read_keys()?;
                let reservation = first.read_reservation()?;
                let full = first.read_full_status().map_err(|e| e.to_string());
                let caps = first.report_capabilities().map_err(|e| e.to_string());
                if json {
                    all.push(json!({
                        "device": device,
                        "paths": paths.iter().map(|p| p.name()).collect::<Vec<_>>(),
                        "keys": output::pr_in_json(device, &tandem_fence::pr::data::PrInData::Keys(keys.clone()), cluster),
                        "reservation": output::pr_in_json(device, &tandem_fence::pr::data::PrInData::Reservation(reservation), cluster),
                        "full_status": match &full {
                            Ok(f) => output::pr_in_json(device, &tandem_fence::pr::data::PrInData::FullStatus(f.clone()), cluster),
                            Err(e) => json!({ "error": e }),
                        },
                        "capabilities": match &caps { Ok(c) => json!(c), Err(e) => json!({ "error": e }) },
                    }));
                    continue;
                }
                let names: Vec<&str> = paths.iter().map(|p| p.name()).collect();
                writeln!(
                    out,
                    "{device}  ({} path{}: {})",
                    names.len(),
                    if names.len() == 1 { "" } else { "s" },
                    names.join(", ")
                )?;
                if let Ok(Some(inq)) = first.inquiry() {
                    write!(out, "{}", output::inquiry(&inq))?;
                }
                write!(out, "{}", output::keys(&keys, cluster))?;
                write!(out, "{}", output::reservation(&reservation, cluster))?;
                match &full {
                    Ok(f) => write!(out, "{}", output::full_status(f, cluster))?,
                    Err(e) => writeln!(out, "  READ FULL STATUS: {e}")?,
                }
                match &caps {
                    Ok(c) => write!(out, "{}", output::capabilities(c))?,
                    Err(e) => writeln!(out, "  REPORT CAPABILITIES: {e}")?,
                }
            }
            if json {
                writeln!(out, "{}", serde_json::Value::Array(all))?;
            }
            Ok(exit::OK)
        }
        Task::Unfence {
            devices,
            key,
            policy: p,
        } => {
            let policy = policy(
                &mut opened,
                common,
                devices,
                key,
                settings(p, PreemptFlavour::Preempt),
            )?;
            let record = policy.unfence(now_ms())?;
            if json {
                writeln!(
                    out,
                    "{}",
                    serde_json::to_string(&record).map_err(anyhow::Error::from)?
                )?;
            } else {
                let ok = record.paths.iter().filter(|p| p.error.is_none()).count();
                writeln!(
                    out,
                    "unfenced: key {} registered on {ok} of {} path(s), PR generation=0x{:x}",
                    record.key,
                    record.paths.len(),
                    record.generation
                )?;
                for p in record.paths.iter().filter(|p| p.error.is_some()) {
                    writeln!(
                        out,
                        "  path {} failed: {}",
                        p.path,
                        p.error.as_deref().unwrap_or("")
                    )?;
                }
                writeln!(
                    out,
                    "  reservation: {}{}",
                    reservation_text(record.reservation.as_ref()),
                    if record.reserved {
                        " (reserved now)"
                    } else {
                        ""
                    }
                )?;
                for n in &record.notes {
                    writeln!(out, "  note: {n}")?;
                }
            }
            Ok(if record.is_complete() {
                exit::OK
            } else {
                exit::DEVICE_ERROR
            })
        }
        Task::Fence {
            devices,
            key,
            victim,
            flavour,
            policy: p,
        } => {
            let policy = policy(
                &mut opened,
                common,
                devices,
                key,
                settings(p, flavour.flavour()),
            )?;
            let record = policy.fence(*victim, now_ms())?;
            if json {
                writeln!(
                    out,
                    "{}",
                    serde_json::to_string(&record).map_err(anyhow::Error::from)?
                )?;
            } else {
                writeln!(
                    out,
                    "fenced {} through {} by {}; PR generation=0x{:x}",
                    record.key,
                    record.path,
                    method_text(&record.method),
                    record.generation
                )?;
                writeln!(
                    out,
                    "  reservation: {}",
                    reservation_text(record.reservation.as_ref())
                )?;
                for n in &record.notes {
                    writeln!(out, "  note: {n}")?;
                }
            }
            Ok(exit::OK)
        }
        Task::Verify {
            devices,
            key,
            policy: p,
        } => {
            let policy = policy(
                &mut opened,
                common,
                devices,
                key,
                settings(p, PreemptFlavour::Preempt),
            )?;
            let v = policy.verify()?;
            if json {
                writeln!(
                    out,
                    "{}",
                    serde_json::to_string(&v).map_err(anyhow::Error::from)?
                )?;
            } else if v.is_ok() {
                writeln!(
                    out,
                    "ok: key {} is registered; reservation {}{}",
                    v.key,
                    reservation_text(v.reservation.as_ref()),
                    if v.holder { " (this node)" } else { "" }
                )?;
            } else {
                for problem in &v.problems {
                    writeln!(out, "NOT OK: {problem}")?;
                }
            }
            Ok(if v.is_ok() {
                exit::OK
            } else {
                exit::VERIFY_FAILED
            })
        }
        Task::Leave { devices, key } => {
            let settings = FenceSettings::default();
            let policy = policy(&mut opened, common, devices, key, settings)?;
            let outcomes = policy.leave()?;
            if json {
                writeln!(
                    out,
                    "{}",
                    serde_json::to_string(&outcomes).map_err(anyhow::Error::from)?
                )?;
            } else {
                for o in &outcomes {
                    match &o.error {
                        None => writeln!(out, "{}: unregistered", o.path)?,
                        Some(e) => writeln!(out, "{}: {e}", o.path)?,
                    }
                }
            }
            Ok(if outcomes.iter().all(|o| o.error.is_none()) {
                exit::OK
            } else {
                exit::DEVICE_ERROR
            })
        }
        Task::Watch {
            devices,
            key,
            period_ms,
            exit_on_loss,
            duration_ms,
        } => {
            let policy = policy(&mut opened, common, devices, key, FenceSettings::default())?;
            let (tx, rx) = std::sync::mpsc::channel();
            let task = SelfCheckTask::spawn(
                policy.paths().to_vec(),
                policy.key(),
                Duration::from_millis(*period_ms),
                policy.settings().retries,
                move |event| {
                    let _ = tx.send(event);
                },
            )?;
            let started = Instant::now();
            let deadline =
                (*duration_ms > 0).then(|| started + Duration::from_millis(*duration_ms));
            let mut code = exit::OK;
            loop {
                let wait = deadline.map_or(Duration::from_secs(3600), |d| {
                    d.saturating_duration_since(Instant::now())
                });
                let event = match rx.recv_timeout(wait) {
                    Ok(e) => e,
                    Err(_) if deadline.is_some_and(|d| Instant::now() >= d) => break,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                };
                if json {
                    writeln!(
                        out,
                        "{}",
                        serde_json::to_string(&event).map_err(anyhow::Error::from)?
                    )?;
                } else {
                    match &event {
                        SelfCheckEvent::Confirmed {
                            time_ms,
                            generation,
                        } => writeln!(
                            out,
                            "{time_ms} key {} registered (PR generation=0x{generation:x})",
                            policy.key()
                        )?,
                        SelfCheckEvent::KeyLost {
                            time_ms,
                            generation,
                            last_seen_ms,
                        } => writeln!(
                            out,
                            "{time_ms} KEY LOST: {} is no longer registered (PR generation=0x{generation:x}, last seen {})",
                            policy.key(),
                            last_seen_ms.map_or("never".to_owned(), |t| t.to_string())
                        )?,
                        SelfCheckEvent::KeyBack { time_ms, .. } => {
                            writeln!(out, "{time_ms} key {} is registered again", policy.key())?;
                        }
                        SelfCheckEvent::CheckFailed { time_ms, error } => {
                            writeln!(err, "{time_ms} check failed: {error}")?;
                        }
                    }
                }
                out.flush()?;
                if *exit_on_loss && matches!(event, SelfCheckEvent::KeyLost { .. }) {
                    code = exit::FENCE_NOT_CONFIRMED;
                    break;
                }
            }
            task.stop();
            Ok(code)
        }
        Task::DeriveKey {
            cluster_id,
            node_id,
            incarnation,
        } => {
            let key = PrKey::derive(cluster_id, *node_id, *incarnation);
            if json {
                writeln!(out, "{}", json!({ "key": key, "parts": key.parts() }))?;
            } else {
                writeln!(out, "{key}")?;
            }
            Ok(exit::OK)
        }
        Task::BenchFence {
            fencer,
            victim_device,
            rounds,
            flavour,
            sg_persist,
        } => super::bench::run(
            common,
            fencer,
            victim_device,
            *rounds,
            flavour.flavour(),
            sg_persist,
            out,
        ),
        Task::Differential {
            devices,
            sequences,
            steps,
            seed,
            preempt_and_abort,
            summary,
        } => super::differential::run(
            common,
            devices,
            *sequences,
            *steps,
            *seed,
            *preempt_and_abort,
            summary.as_deref(),
            out,
        ),
        Task::ProbeWrite { device, offset } => super::probe::run(device, *offset, json, out),
    }
}
